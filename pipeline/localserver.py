"""localserver.py: the bundled OpenAI-compatible endpoint for the demo, the tests and the benchmarks.

Owns an aiohttp server that answers `POST /v1/chat/completions` (streaming with
`stream_options.include_usage`, and not), `GET /v1/models` and `GET /health`. It validates what it
receives (a JSON body, a model, messages, and a `data:image/...;base64,` URL that decodes to a real
image) and answers with a caption computed from the pixels: orientation, size, dominant colours and
brightness. Honest, deterministic, and clearly not a language model. Token usage follows OpenAI's
counting rules, so cost and TPM code can be tested against it. For tests and benchmarks it can add
latency, enforce RPM/TPM/concurrency limits with OpenAI's headers and 429 bodies, and inject faults
(`LocalServer.fail_next`); every chat request is recorded as an `Observed` value.

It also serves the Files and Batches APIs (`/v1/files`, `/v1/batches`): a batch's lines go through
the same request checks and captioning as chat, after a configurable delay
(`LocalServer.set_batch_delay`), with injectable batch ends (`fail_next_batch`: failed, expired,
cancelled) and line faults (`fail_batch_lines`), output in shuffled order by default; every created
batch is recorded (`LocalServer.batches()`).

It must not share protocol code with the client side: it imports nothing from `pipeline` (no payload
builder, no SSE reader or writer in common), only aiohttp.web, Pillow and the standard library. A bug
shared by both sides would pass every test and still fail against real servers.

The server runs on its own event loop in a daemon thread, so synchronous tests and the CLI can drive
it; the behaviour controls are thread-safe.

Protocol sources (the facts below are taken from these pages):
- chat.completion and chat.completion.chunk objects, `stream_options.include_usage` (a last chunk
  with `choices: []` and the usage, other chunks with `usage: null`), `data: [DONE]`:
  https://platform.openai.com/docs/api-reference/chat/object and
  https://platform.openai.com/docs/api-reference/chat/streaming
- error body `{"error": {"message", "type", "param", "code"}}` and status meanings:
  https://platform.openai.com/docs/guides/error-codes
- `x-ratelimit-*` headers, reset values as Go durations ("6m0s", "1s"), TPM counting `max_tokens`,
  rejected requests counting against RPM: https://platform.openai.com/docs/guides/rate-limits
- image tokens (85 for low detail; otherwise fit 2048x2048, shortest side 768, 170 per 512 px tile
  plus 85): https://platform.openai.com/docs/guides/images-vision
- reasoning models reject `max_tokens` and non-default `temperature`:
  https://platform.openai.com/docs/guides/reasoning
- event-stream framing (`data: ...` lines, a blank line ends an event):
  https://html.spec.whatwg.org/multipage/server-sent-events.html
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hmac
import io
import json
import logging
import math
import random
import re
import secrets
import signal
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image, ImageStat

__all__ = ["LocalServer", "Observed", "BatchSeen", "serve_forever", "FAULTS", "BATCH_OUTCOMES", "BATCH_LINE_FAULTS"]

log = logging.getLogger(__name__)

MODEL_ID = "local-caption"
REASONING_PREFIX = "local-reasoning"  # models named so emulate OpenAI's reasoning models
REASONING_TOKENS = 16  # hidden reasoning tokens a reasoning model reports per answer
SYSTEM_FINGERPRINT = "fp_localcaption"
THUMB_SIDE_PX = 64  # long side of the thumbnail the caption is computed from (and kept in Observed)
COLOUR_GRID_PX = 16  # colours are counted on at most 16x16 pixels
MAX_OBSERVED = 200_000  # observations kept; older ones fall off so a benchmark stays flat in memory
THUMBS_KEPT = 1_000  # only the newest observations keep their thumbnail (~12 kB each)
MAX_BODY_BYTES = 64 * 1024 * 1024  # aiohttp's default is 1 MiB, too small for a large data URL
HANG_S = 3600.0  # how long the "hang" fault stays silent (cancelled on disconnect or stop)
WORDS_PER_DELTA = 3  # words per streamed content delta
DECODE_THREADS = 4  # Pillow releases the GIL while decoding, so images decode in parallel
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
SHUTDOWN_GRACE_S = 1.0  # aiohttp's wait for handlers at stop; ours are cancelled before that

_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+);base64,", re.IGNORECASE)
_MIME_BY_FORMAT = {  # Pillow format → the MIME type a data URL must declare for it
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",  # a JPEG with extra pictures (many cameras)
    "WEBP": "image/webp",
    "GIF": "image/gif",
}
_DETAILS = ("low", "high", "auto")

# Injected faults whose answer is a fixed JSON error: status, message, type, code.
_FAULT_ERRORS: dict[str, tuple[int, str, str, str | None]] = {
    "500": (500, "The server had an error while processing your request. Sorry about that!", "server_error", None),
    "502": (502, "Bad gateway.", "server_error", None),
    "503": (503, "The server is overloaded or not ready yet.", "server_error", None),
    "504": (504, "Gateway timeout.", "server_error", None),
    "408": (408, "Request timed out.", "server_error", None),
    "400": (400, "Invalid image", "invalid_request_error", "invalid_image"),
    "413": (413, "Request too large", "invalid_request_error", "request_too_large"),
    "422": (422, "Unprocessable entity", "invalid_request_error", None),
    "401": (401, "Incorrect API key provided", "invalid_request_error", "invalid_api_key"),
    # one-api / new-api gateways answer an exhausted user quota like this
    "403_quota": (403, "user quota is not enough", "new_api_error", "insufficient_user_quota"),
    "429_quota": (
        429,
        "You exceeded your current quota, please check your plan and billing details.",
        "insufficient_quota",
        "insufficient_quota",
    ),
}
_CONTENT_FAULTS = {"empty": "", "bad_json": "Sure! Here is the JSON you asked for: {caption: "}
_STREAM_FAULTS = ("stream_error", "no_done", "no_finish", "no_usage", "malformed", "drop", "hang", "empty",
                  "bad_json")
FAULTS: tuple[str, ...] = (
    *_FAULT_ERRORS,
    "html502",
    "404_model",
    "429",
    "429_bare",
    "error200",
    *_STREAM_FAULTS,
)
"""Every fault name `LocalServer.fail_next` accepts."""

_NGINX_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
_GATEWAY_ERROR = {"error": {"message": "upstream error: overloaded", "type": "upstream_error", "code": 500}}
_STREAM_ERROR = {"error": {"message": "upstream stream interrupted", "type": "server_error"}}


@dataclass(frozen=True, slots=True)
class Observed:
    """One chat request as the server received it and chose to answer it."""

    t: float  # time.monotonic() at arrival, seconds
    status: int  # HTTP status the server answered with; 0 when it sent none ("drop"/"hang" without stream)
    fault: str | None  # the injected fault, or the limit that answered 429 ("rpm", "tpm", "concurrency", "penalty")
    model: str | None
    stream: bool
    body_keys: tuple[str, ...]  # sorted top-level keys of the JSON body
    max_tokens: Any  # as received, None when absent
    max_completion_tokens: Any
    temperature: Any
    detail: str | None  # image_url.detail of the first image, None when absent
    image_mime: str | None  # the MIME type the first image's data URL declared
    image_size: tuple[int, int] | None  # (width, height) of the decoded first image, pixels
    thumb: Image.Image | None = field(default=None, compare=False, repr=False)  # RGB, long side <= 64 px
    authorized: bool = True  # Authorization matched the server's key (True when it has none)


class _RequestError(Exception):
    """A request the server refuses, with the OpenAI error fields to answer with."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return _error_body(self.message, "invalid_request_error", param=self.param, code=self.code)


def _invalid(message: str, param: str | None, code: str | None = None) -> _RequestError:
    return _RequestError(400, message, param=param, code=code)


# ---------------------------------------------------------------------------------------------
# Pure helpers: token counting, durations, captions. No I/O.


def _image_tokens(width: int, height: int, detail: str | None) -> int:
    """Return the prompt tokens OpenAI bills for one image of this size and detail.

    Low detail costs 85. High and auto: fit inside 2048x2048, then shrink the shortest side to 768,
    never upscaling; each 512 px tile costs 170, plus 85 (images-vision guide, "Calculating costs").
    """
    if detail == "low":
        return 85
    w, h = float(width), float(height)
    scale = min(1.0, 2048 / max(w, h))
    w, h = w * scale, h * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    tiles = math.ceil(w / 512 - 1e-9) * math.ceil(h / 512 - 1e-9)
    return 170 * tiles + 85


def _text_tokens(chars: int) -> int:
    """Return the tokens we charge for `chars` characters of text: one per four, rounded up."""
    return math.ceil(chars / 4)


def _go_duration(seconds: float) -> str:
    """Format a wait like Go's time.Duration.String(), as OpenAI's x-ratelimit-reset-* headers do.

    Rounded up to whole milliseconds: "0s", "547ms", "1s", "2m52.8s", "6m0s", "1h0m0s".
    """
    ms = math.ceil(seconds * 1000 - 1e-6)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest // 1000}.{rest % 1000:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    return f"{minutes}m{secs}" if minutes else secs


def _make_thumb(img: Image.Image) -> Image.Image:
    """Return a small RGB copy of an opened image (long side <= 64 px), alpha flattened onto white.

    `thumbnail` picks a JPEG draft scale and reduces before resampling, so large images stay cheap.
    """
    img.thumbnail((THUMB_SIDE_PX, THUMB_SIDE_PX), Image.Resampling.BILINEAR)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    flat = Image.new("RGB", rgba.size, (255, 255, 255))
    flat.paste(rgba, mask=rgba.getchannel("A"))
    return flat


def _colour_name(hue: int, sat: int, val: int) -> str:
    """Name one pixel from Pillow's HSV bytes (each 0-255)."""
    if val < 40:
        return "black"
    if sat < 40:
        return "white" if val > 215 else "grey"
    degrees = hue * 360 / 256
    for limit, name in ((15, "red"), (40, "orange"), (70, "yellow"), (165, "green"), (195, "cyan"),
                        (255, "blue"), (290, "purple"), (345, "pink"), (361, "red")):
        if degrees < limit:
            break
    if name == "orange" and val < 170:
        return "brown"
    if val < 140:
        return f"dark {name}"
    if sat < 100 and val > 190:
        return f"light {name}"
    return name


def _dominant_colours(thumb: Image.Image) -> list[str]:
    """Return up to three colour names that each cover at least 15% of the image, commonest first."""
    grid = thumb.copy()
    grid.thumbnail((COLOUR_GRID_PX, COLOUR_GRID_PX), Image.Resampling.BILINEAR)
    data = grid.convert("HSV").tobytes()
    counts: dict[str, int] = {}
    for i in range(0, len(data), 3):
        name = _colour_name(data[i], data[i + 1], data[i + 2])
        counts[name] = counts.get(name, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    pixels = len(data) // 3
    names = [name for name, count in ranked[:3] if count >= 0.15 * pixels]
    return names or [ranked[0][0]]


def _brightness_word(thumb: Image.Image) -> str:
    """Return a word for the mean luminance (0-255) of the image."""
    mean = ImageStat.Stat(thumb.convert("L")).mean[0]
    for limit, word in ((45, "very dark"), (95, "dark"), (160, "moderately bright"), (210, "bright")):
        if mean < limit:
            return word
    return "very bright"


def _caption(size: tuple[int, int], thumb: Image.Image) -> str:
    """Return the deterministic caption of an image: orientation, size, colours, brightness."""
    width, height = size
    orientation = "landscape" if width > height else "portrait" if height > width else "square"
    names = _dominant_colours(thumb)
    colours = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"A {orientation} image, {width}×{height} pixels, mostly {colours}, {_brightness_word(thumb)} overall."


def _answer_text(fields: _Fields, size: tuple[int, int], thumb: Image.Image) -> str:
    """The answer's content: the caption, or a JSON document when `response_format` asks for one.

    json_schema: an object built from the schema (strings get the caption, arrays of strings the
    colour names, booleans say whether the image is bright, numbers its size); json_object: a
    fixed object. Structured outputs: https://platform.openai.com/docs/guides/structured-outputs
    """
    caption = _caption(size, thumb)
    spec = fields.response_format
    kind = spec.get("type") if isinstance(spec, dict) else None
    facts = {"caption": caption, "colours": _dominant_colours(thumb), "bright": "bright" in _brightness_word(thumb),
             "number": max(size)}
    if kind == "json_schema":
        schema = (spec.get("json_schema") or {}).get("schema") or {}
        return json.dumps(_value_for(schema, facts), ensure_ascii=False)
    if kind == "json_object":
        return json.dumps({"caption": caption, "colours": facts["colours"], "bright": facts["bright"]},
                          ensure_ascii=False)
    return caption


def _value_for(schema: Any, facts: dict[str, Any]) -> Any:
    """A deterministic value of the schema's type, made from the image's facts."""
    if not isinstance(schema, dict):
        return facts["caption"]
    if "enum" in schema and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    kind = next((k for k in kind if k != "null"), "string") if isinstance(kind, list) else kind
    if kind == "object" or "properties" in schema:
        return {name: _value_for(sub, facts) for name, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        items = schema.get("items") or {}
        if isinstance(items, dict) and items.get("type", "string") == "string" and "enum" not in items:
            return list(facts["colours"])
        return [_value_for(items, facts)]
    if kind == "boolean":
        return facts["bright"]
    if kind in ("integer", "number"):
        return facts["number"]
    return facts["caption"]


def _split_words(text: str) -> list[str]:
    """Cut text into pieces of a few words each; the pieces join back to exactly `text`."""
    words = [w for w in re.split(r"(?<=\s)(?=\S)", text) if w]
    return ["".join(words[i : i + WORDS_PER_DELTA]) for i in range(0, len(words), WORDS_PER_DELTA)]


def _error_body(message: str, type_: str, *, param: str | None = None, code: Any = None) -> dict[str, Any]:
    """Return OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _json_response(status: int, body: Any, headers: dict[str, str]) -> web.Response:
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return web.Response(status=status, text=text, content_type="application/json", headers=headers)


def _sse(payload: Any) -> bytes:
    """Frame one event: `data: <json>` and a blank line."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


# ---------------------------------------------------------------------------------------------
# Reading and validating a request body.


@dataclass(frozen=True, slots=True)
class _Fields:
    """What observations and answers need from a body, read leniently (no validation)."""

    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    body_keys: tuple[str, ...] = ()
    max_tokens: Any = None
    max_completion_tokens: Any = None
    temperature: Any = None
    detail: str | None = None
    image_mime: str | None = None
    response_format: Any = None  # as sent: {"type": "json_schema", "json_schema": {...}} or the like


@dataclass(frozen=True, slots=True)
class _ImagePart:
    """One image_url part that passed the structural checks; its bytes are not decoded yet."""

    mime: str  # as the data URL declared it
    base64_text: str
    detail: str  # "low" | "high" | "auto"
    param: str  # where it sits, for error messages: messages[0].content[1]


@dataclass(frozen=True, slots=True)
class _Picture:
    """A decoded image: its size, its thumbnail and what it costs in prompt tokens."""

    size: tuple[int, int]
    thumb: Image.Image
    tokens: int


def _parse_json(raw: bytes) -> Any:
    """Return the decoded body, or None when it is not JSON."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def _first_image_url(messages: Any) -> dict[str, Any] | None:
    """Return the image_url object of the first image part in the user messages, if any."""
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") == "image_url" and isinstance(part.get("image_url"), dict):
                return part["image_url"]
    return None


def _read_fields(payload: Any) -> _Fields:
    """Pick the observed fields out of a body that may be anything."""
    if not isinstance(payload, dict):
        return _Fields()
    image = _first_image_url(payload.get("messages")) or {}
    url = image.get("url")
    match = _DATA_URL.match(url) if isinstance(url, str) else None
    options = payload.get("stream_options")
    return _Fields(
        model=payload["model"] if isinstance(payload.get("model"), str) else None,
        stream=payload.get("stream") is True,
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        body_keys=tuple(sorted(payload)),
        max_tokens=payload.get("max_tokens"),
        max_completion_tokens=payload.get("max_completion_tokens"),
        temperature=payload.get("temperature"),
        detail=image.get("detail") if isinstance(image.get("detail"), str) else None,
        image_mime=match.group(1).lower() if match else None,
        response_format=payload.get("response_format"),
    )


def _check_request(payload: Any) -> tuple[list[_ImagePart], int]:
    """Validate a chat request body the way OpenAI does; return its image parts and text length.

    Raises _RequestError (400) naming the offending parameter.
    """
    if not isinstance(payload, dict):
        raise _invalid("We could not parse the JSON body of your request: expected a JSON object.", None)
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("you must provide a model parameter", "model")
    if model.startswith(REASONING_PREFIX):
        _check_reasoning_options(payload)
    _check_options(payload)
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("Invalid 'messages': expected a non-empty array of messages.", "messages")
    parts: list[_ImagePart] = []
    chars = 0
    for index, message in enumerate(messages):
        found, length = _check_message(message, f"messages[{index}]")
        parts.extend(found)
        chars += length
    if not parts:
        raise _invalid("This server captions images: a user message must carry an image_url part.", "messages")
    return parts, chars


def _check_options(payload: dict[str, Any]) -> None:
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid("Invalid type for 'stream': expected a boolean.", "stream", "invalid_type")
    if payload.get("stream_options") is not None:
        if stream is not True:
            raise _invalid("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options")
        if not isinstance(payload["stream_options"], dict):
            raise _invalid("Invalid type for 'stream_options': expected an object.", "stream_options", "invalid_type")
    for name in ("max_tokens", "max_completion_tokens"):
        value = payload.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise _invalid(f"Invalid type for '{name}': expected an integer.", name, "invalid_type")
        if value < 1:
            raise _invalid(
                f"Invalid '{name}': integer below minimum value. Expected a value >= 1, but got {value} instead.",
                name,
                "integer_below_min_value",
            )
    temperature = payload.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))):
        raise _invalid("Invalid type for 'temperature': expected a number.", "temperature", "invalid_type")
    if temperature is not None and not 0 <= temperature <= 2:
        raise _invalid(f"Invalid 'temperature': expected a value from 0 to 2, but got {temperature}.", "temperature")


def _check_reasoning_options(payload: dict[str, Any]) -> None:
    """Reject what OpenAI's reasoning models reject (reasoning guide, "unsupported parameters")."""
    if payload.get("max_tokens") is not None:
        raise _invalid(
            "Unsupported parameter: 'max_tokens' is not supported with this model. "
            "Use 'max_completion_tokens' instead.",
            "max_tokens",
            "unsupported_parameter",
        )
    temperature = payload.get("temperature")
    if temperature is not None and temperature != 1:
        raise _invalid(
            f"Unsupported value: 'temperature' does not support {json.dumps(temperature)} with this model. "
            "Only the default (1) value is supported.",
            "temperature",
            "unsupported_value",
        )


def _check_message(message: Any, where: str) -> tuple[list[_ImagePart], int]:
    """Validate one message; return its image parts (user messages only) and its text length."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise _invalid(f"Invalid '{where}': expected an object with a string 'role'.", where)
    content = message.get("content")
    if isinstance(content, str):
        return [], len(content)
    if not isinstance(content, list):
        raise _invalid(f"Invalid '{where}.content': expected a string or an array of parts.", f"{where}.content")
    parts: list[_ImagePart] = []
    chars = 0
    for index, part in enumerate(content):
        here = f"{where}.content[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            chars += len(part["text"])
        elif kind == "image_url" and message["role"] == "user":
            parts.append(_check_image_part(part, here))
        else:
            raise _invalid(f"Invalid '{here}': expected a text part, or an image_url part in a user message.", here)
    return parts, chars


def _check_image_part(part: dict[str, Any], where: str) -> _ImagePart:
    """Check an image_url part's shape and data URL header (the bytes are decoded later)."""
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else None
    if not isinstance(url, str):
        raise _invalid(f"Missing required parameter: '{where}.image_url.url'.", f"{where}.image_url.url",
                       "missing_required_parameter")
    detail = image.get("detail", "auto")
    if detail not in _DETAILS:
        raise _invalid(f"Invalid value: {detail!r}. Supported values are: 'low', 'high', and 'auto'.",
                       f"{where}.image_url.detail", "invalid_value")
    match = _DATA_URL.match(url)
    if match is None:
        raise _invalid("Invalid image URL: this local server accepts only data:image/<type>;base64,... URLs.",
                       f"{where}.image_url.url", "invalid_image_url")
    mime = match.group(1).lower()
    if mime not in _MIME_BY_FORMAT.values():
        raise _invalid(f"Invalid MIME type {mime}: supported are image/png, image/jpeg, image/webp and image/gif.",
                       f"{where}.image_url.url", "invalid_image_format")
    return _ImagePart(mime=mime, base64_text=url[match.end():], detail=detail, param=f"{where}.image_url.url")


def _decode_picture(part: _ImagePart) -> _Picture:
    """Decode an image part's bytes with Pillow; runs in the decode threads.

    Raises _RequestError (400) for bad base64, an undecodable image, or one that is not the type
    its data URL declared.
    """
    try:
        data = base64.b64decode(part.base64_text, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid("Invalid base64 image data.", part.param, "invalid_image_url") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            actual = _MIME_BY_FORMAT.get(img.format or "")
            if actual != part.mime:
                raise _invalid(f"The image data is {img.format}, not the declared {part.mime}.", part.param,
                               "invalid_image_format")
            size = img.size
            thumb = _make_thumb(img)
    except _RequestError:
        raise
    except Exception as err:  # Pillow's decoders raise many types for broken input; all mean "not an image"
        raise _invalid(f"You uploaded an unsupported image ({type(err).__name__}).", part.param,
                       "invalid_image_format") from None
    return _Picture(size=size, thumb=thumb, tokens=_image_tokens(size[0], size[1], part.detail))


def _decode_pictures(parts: list[_ImagePart]) -> list[_Picture]:
    return [_decode_picture(part) for part in parts]


# ---------------------------------------------------------------------------------------------
# Answers: the completion and its wire forms.


@dataclass(frozen=True, slots=True)
class _Completion:
    """The answer to one request, before it is written as JSON or as a stream."""

    id: str
    created: int  # Unix seconds
    model: str
    content: str
    finish_reason: str | None
    usage: dict[str, Any] | None

    def as_object(self) -> dict[str, Any]:
        """The chat.completion object (API reference, "The chat completion object")."""
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.content, "refusal": None},
                    "logprobs": None,
                    "finish_reason": self.finish_reason,
                }
            ],
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if self.usage is not None:
            body["usage"] = self.usage
        return body

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None, *, usage_key: bool) -> dict[str, Any]:
        """One chat.completion.chunk; with include_usage, every chunk but the last says usage: null."""
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if usage_key:
            body["usage"] = None
        return body

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk when include_usage is set: no choices, the usage of the whole request."""
        body = self.chunk({}, usage_key=False)
        body["choices"] = []
        body["usage"] = self.usage
        return body


def _output_cap(fields: _Fields) -> int | None:
    """The output token budget: the smaller of max_tokens and max_completion_tokens, None if neither."""
    given = [v for v in (fields.max_tokens, fields.max_completion_tokens) if isinstance(v, int)]
    return min(given) if given else None


def _compose(fields: _Fields, caption: str, prompt_tokens: int, fault: str | None) -> _Completion:
    """Return the completion for a valid request, shaped by the content faults."""
    model = fields.model or MODEL_ID
    reasoning = REASONING_TOKENS if model.startswith(REASONING_PREFIX) else 0
    cap = _output_cap(fields)
    text = _CONTENT_FAULTS.get(fault, caption)
    finish: str | None = "stop"
    if cap is not None and _text_tokens(len(text)) > cap - reasoning:
        text = text[: max(0, 4 * (cap - reasoning))]  # reasoning tokens spend the budget first
        finish = "length"
    completion_tokens = _text_tokens(len(text)) + reasoning
    usage: dict[str, Any] | None = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }
    if fault in ("no_usage", "no_finish"):
        usage = None
    if fault == "no_finish":
        finish = None
    return _Completion(_new_id("chatcmpl-"), int(time.time()), model, text, finish, usage)


def _stream_events(completion: _Completion, fault: str | None, include_usage: bool) -> list[bytes]:
    """Return the events after the first chunk, in order, shaped by the stream faults."""
    pieces = _split_words(completion.content)
    if fault == "malformed":
        return [b"data: {not json\n\n", b"data: [DONE]\n\n"]
    if fault == "stream_error":
        pieces = pieces[: max(1, len(pieces) // 2)]
    events = [_sse(completion.chunk({"content": piece}, usage_key=include_usage)) for piece in pieces]
    if fault == "stream_error":
        return [*events, _sse(_STREAM_ERROR), b"data: [DONE]\n\n"]
    if completion.finish_reason is not None:
        events.append(_sse(completion.chunk({}, completion.finish_reason, usage_key=include_usage)))
    if include_usage and completion.usage is not None:
        events.append(_sse(completion.usage_chunk()))
    if fault != "no_done":
        events.append(b"data: [DONE]\n\n")
    return events


# ---------------------------------------------------------------------------------------------
# Rate limits.


class _Bucket:
    """A token bucket holding up to `limit` units that refills continuously at `limit` per minute."""

    def __init__(self, limit: int, now: float):
        self.limit = limit
        self.level = float(limit)
        self.stamp = now

    def refill(self, now: float) -> None:
        self.level = min(float(self.limit), self.level + (now - self.stamp) * self.limit / 60)
        self.stamp = now

    def wait_s(self, cost: float) -> float:
        """Seconds until the bucket holds `cost` units."""
        return max(0.0, (cost - self.level) * 60 / self.limit)

    def used(self) -> int:
        return self.limit - math.floor(self.level)

    def headers(self, kind: str) -> dict[str, str]:
        """x-ratelimit-{limit,remaining,reset}-{kind}; reset is the time until the bucket is full."""
        return {
            f"x-ratelimit-limit-{kind}": str(self.limit),
            f"x-ratelimit-remaining-{kind}": str(max(0, math.floor(self.level))),
            f"x-ratelimit-reset-{kind}": _go_duration(self.wait_s(self.limit)),
        }


@dataclass(frozen=True, slots=True)
class _Verdict:
    """What the limits say about one request."""

    headers: dict[str, str]  # x-ratelimit-* to send (and retry-after* on a rejection)
    limit: str | None = None  # "rpm" | "tpm" | "penalty" when rejected
    body: dict[str, Any] | None = None  # the 429 body when rejected


class _Limits:
    """RPM/TPM buckets, the concurrency cap and the penalty window. Guarded by LocalServer._lock."""

    def __init__(self, rpm: int | None, tpm: int | None, concurrency: int | None, headers: bool,
                 penalty_s: float, now: float):
        self.requests = _Bucket(rpm, now) if rpm else None
        self.tokens = _Bucket(tpm, now) if tpm else None
        self.concurrency = concurrency
        self.send_headers = headers
        self.penalty_s = penalty_s
        self.penalty_until = 0.0

    def admit(self, cost: int, model: str, now: float) -> _Verdict:
        """Charge one request of `cost` TPM tokens; say whether it passes.

        A rejected request still uses an RPM unit, as OpenAI counts it (rate-limits guide).
        """
        for bucket in (self.requests, self.tokens):
            if bucket is not None:
                bucket.refill(now)
        if now < self.penalty_until:
            self._charge_request()
            wait = self.penalty_until - now
            return self._reject("penalty", f"Rate limit reached for {model}: too many requests after a limit "
                                f"was hit. Please try again in {_go_duration(wait)}.", "requests", wait)
        if self.requests is not None and self.requests.level < 1:
            self._charge_request()
            self.trip(now)
            wait = max(self.requests.wait_s(1), self.penalty_until - now)  # the penalty, when set, is the wait
            return self._reject("rpm", f"Rate limit reached for {model} on requests per min (RPM): Limit "
                                f"{self.requests.limit}, Used {self.requests.used()}, Requested 1. Please try "
                                f"again in {_go_duration(wait)}.", "requests", wait)
        self._charge_request()
        return self._admit_tokens(cost, model, now)

    def _admit_tokens(self, cost: int, model: str, now: float) -> _Verdict:
        bucket = self.tokens
        if bucket is None:
            return _Verdict(self.headers())
        if cost > bucket.limit:
            return self._reject("tpm", f"Request too large for {model} on tokens per min (TPM): Limit "
                                f"{bucket.limit}, Requested {cost}. The input or output tokens must be "
                                "reduced in order to run successfully.", "tokens", None)
        if bucket.level < cost:
            self.trip(now)
            wait = max(bucket.wait_s(cost), self.penalty_until - now)
            return self._reject("tpm", f"Rate limit reached for {model} on tokens per min (TPM): Limit "
                                f"{bucket.limit}, Used {bucket.used()}, Requested {cost}. Please try again "
                                f"in {_go_duration(wait)}.", "tokens", wait)
        bucket.level -= cost
        return _Verdict(self.headers())

    def _charge_request(self) -> None:
        if self.requests is not None:
            self.requests.level = max(0.0, self.requests.level - 1)

    def trip(self, now: float) -> None:
        """A limit answered 429: open the penalty window, if there is one."""
        if self.penalty_s > 0:
            self.penalty_until = now + self.penalty_s

    def headers(self) -> dict[str, str]:
        if not self.send_headers:
            return {}
        headers: dict[str, str] = {}
        if self.requests is not None:
            headers.update(self.requests.headers("requests"))
        if self.tokens is not None:
            headers.update(self.tokens.headers("tokens"))
        return headers

    def _reject(self, limit: str, message: str, kind: str, wait_s: float | None) -> _Verdict:
        headers = self.headers()
        if self.send_headers and wait_s is not None:
            headers.update(_retry_after_headers(wait_s))
        body = _error_body(message, kind, code="rate_limit_exceeded")
        return _Verdict(headers, limit, body)


def _retry_after_headers(wait_s: float) -> dict[str, str]:
    """retry-after in whole seconds (rounded up, RFC 9110 10.2.3) and retry-after-ms, as OpenAI sends."""
    return {"retry-after": str(max(0, math.ceil(wait_s))), "retry-after-ms": str(max(0, math.ceil(wait_s * 1000)))}


# ---------------------------------------------------------------------------------------------
# Files and Batches: the objects and the pure parts of running one batch.
#
# Protocol sources:
# - Batch API guide (request line `{"custom_id", "method", "url", "body"}`, output and error files
#   whose lines are `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`,
#   output order not guaranteed, unfinished requests of an expired batch in the error file with
#   code `batch_expired`): https://platform.openai.com/docs/guides/batch
# - Batch object (status validating|failed|in_progress|finalizing|completed|expired|cancelling|
#   cancelled, request_counts {total, completed, failed}, metadata), create, retrieve, cancel, and
#   list (`limit`, `after`, newest first, `has_more`/`first_id`/`last_id`):
#   https://platform.openai.com/docs/api-reference/batch
# - File object, upload (multipart `purpose` + `file`), retrieve, content:
#   https://platform.openai.com/docs/api-reference/files


@dataclass(frozen=True, slots=True)
class BatchSeen:
    """One batch as the server saw it created: for tests to assert "exactly one batch per chunk"."""

    id: str
    metadata: dict[str, str]
    lines: int  # request lines in its input file
    status: str  # its status when `batches()` was called


@dataclass(frozen=True, slots=True)
class _StoredFile:
    id: str
    filename: str
    purpose: str
    created_at: int
    data: bytes

    def as_object(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": len(self.data), "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed"}


@dataclass(slots=True)
class _BatchJob:
    """A batch and its progress; mutated on the server loop only."""

    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str]
    created_at: int
    lines: int
    outcome: str | None  # an injected end: "failed" | "expired" | "cancelled", or None
    run_lines: int | None  # with "expired"/"cancelled": how many lines run before it
    status: str = "validating"
    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    stamps: dict[str, int] = field(default_factory=dict)  # in_progress_at, completed_at, ...
    cancel: asyncio.Event = field(default_factory=asyncio.Event)

    def set_status(self, status: str) -> None:
        self.status = status
        self.stamps[f"{status}_at"] = int(time.time())

    def as_object(self) -> dict[str, Any]:
        stamps = ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")
        body: dict[str, Any] = {
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status, "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "created_at": self.created_at, "expires_at": self.created_at + 86_400,
            "request_counts": {"total": self.lines, "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata or None,
        }
        body.update({f"{name}_at": self.stamps.get(f"{name}_at") for name in stamps})
        return body


BATCH_OUTCOMES = ("failed", "expired", "cancelled", "queue_full")
"""Batch ends `LocalServer.fail_next_batch` can inject."""
BATCH_LINE_FAULTS = ("400", "413", "500", "503", "batch_expired")
"""Per-line faults `LocalServer.fail_batch_lines` can inject."""
_BATCH_ENDPOINTS = ("/v1/chat/completions",)
_TERMINAL = ("completed", "failed", "expired", "cancelled")


def _batch_input_lines(data: bytes, endpoint: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split and check an input file: return (request lines, errors as the batch object lists them)."""
    lines: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        line = _parse_json(raw)
        problem = None
        if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
            problem = ("invalid_json_line", "each line must be a JSON object with a string custom_id")
        elif line["custom_id"] in seen:
            problem = ("duplicate_custom_id", f"custom_id {line['custom_id']!r} is used twice in the file")
        elif line.get("method") != "POST" or line.get("url") != endpoint:
            problem = ("invalid_url", f"each line must POST to {endpoint}, the batch's endpoint")
        elif not isinstance(line.get("body"), dict):
            problem = ("invalid_body", "each line's body must be a JSON object")
        if problem is not None:
            errors.append({"code": problem[0], "message": problem[1], "param": None, "line": number})
            continue
        seen.add(line["custom_id"])
        lines.append(line)
    if not lines and not errors:
        errors.append({"code": "empty_file", "message": "the input file holds no requests", "param": None,
                       "line": None})
    return lines, errors


def _batch_line(custom_id: str, response: dict[str, Any] | None, error: dict[str, Any] | None) -> bytes:
    line = {"id": _new_id("batch_req_"), "custom_id": custom_id, "response": response, "error": error}
    return json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _expired_line(custom_id: str) -> bytes:
    message = "This request could not be executed before the completion window expired."
    return _batch_line(custom_id, None, {"code": "batch_expired", "message": message})


# ---------------------------------------------------------------------------------------------
# The server.


@dataclass(slots=True)
class _Exchange:
    """What the server learned about one chat request so far."""

    arrival: float
    request_id: str
    fields: _Fields
    authorized: bool
    picture: _Picture | None = None  # the first image, once decoded


class LocalServer:
    """An OpenAI-compatible captioning server on its own event loop in a daemon thread.

    Use as a context manager (`with LocalServer() as server: server.base_url`), or call `start()`
    and `stop()`. The behaviour controls (`set_latency`, `fail_next`, `rate_limit`, `reset`) and
    `observed()` may be called from any thread while it runs.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, latency_s: float = 0.0,
                 latency_sigma: float = 0.0, api_key: str | None = None, seed: int = 0):
        _check_latency(latency_s, latency_sigma)
        self._host = host
        self._port = port
        self._api_key = api_key
        self._defaults = (latency_s, latency_sigma, seed)
        self._lock = threading.Lock()  # guards the five fields below and _in_flight
        self._latency = (latency_s, latency_sigma)
        self._rng = random.Random(seed)
        self._faults: deque[tuple[str, float | None]] = deque()
        self._limits: _Limits | None = None
        self._observed: deque[Observed] = deque(maxlen=MAX_OBSERVED)
        self._files: dict[str, _StoredFile] = {}
        self._batches: dict[str, _BatchJob] = {}  # in creation order
        self._batch_delay_s = 0.0
        self._batch_outcomes: deque[tuple[str, int | None]] = deque()
        self._line_faults: deque[str] = deque()
        self._shuffle_output = True
        self._retrieve_faults: list[int] = [0, 0]  # [ended-batch retrieves to let through, then to fail]
        self._batch_tasks: set[asyncio.Task[Any]] = set()
        # loop-thread state: touched only by the server thread once it runs
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._bound_port: int | None = None
        self._startup_error: BaseException | None = None
        self._in_flight = 0
        self._handlers: set[asyncio.Task[Any]] = set()

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The OpenAI base URL of the running server, e.g. "http://127.0.0.1:41234/v1"."""
        if self._bound_port is None:
            raise RuntimeError("LocalServer is not running; call start() first")
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._bound_port}/v1"

    def start(self) -> str:
        """Start serving in a daemon thread; return the base URL once the socket is bound.

        Raises RuntimeError if already running, OSError if the address cannot be bound.
        """
        if self._thread is not None:
            raise RuntimeError("LocalServer is already running")
        ready = threading.Event()
        self._startup_error = None
        self._pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="localserver-decode")
        self._thread = threading.Thread(target=self._run_loop, args=(ready,), name="localserver", daemon=True)
        self._thread.start()
        if not ready.wait(START_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"LocalServer did not start within {START_TIMEOUT_S} s")
        if self._startup_error is not None:
            error = self._startup_error
            self.stop()
            raise error
        log.debug("local server listening on %s", self.base_url)
        return self.base_url

    def stop(self) -> None:
        """Stop serving: cancel what is in flight, close the socket, join the thread. Idempotent."""
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and stop_event is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop_event.set)
            except RuntimeError:  # the loop closed between the check and the call
                pass
        thread.join(STOP_TIMEOUT_S)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._thread = self._loop = self._stop_event = self._pool = None
        self._bound_port = None

    def __enter__(self) -> LocalServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run_loop(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(ready))
        except BaseException as err:  # report a failed start to start(), which re-raises it
            self._startup_error = err
        finally:
            ready.set()
            loop.close()

    async def _serve(self, ready: threading.Event) -> None:
        self._stop_event = asyncio.Event()
        runner = web.AppRunner(self._make_app(), handler_cancellation=True, access_log=None,
                               shutdown_timeout=SHUTDOWN_GRACE_S)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port)
            await site.start()
            self._bound_port = runner.addresses[0][1]
            ready.set()
            await self._stop_event.wait()
        finally:
            pending = [*self._handlers, *self._batch_tasks]
            for task in pending:  # "hang" and latency sleeps end now
                task.cancel()
            await runner.cleanup()
            await asyncio.gather(*pending, return_exceptions=True)  # let them finish cancelling

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/chat/completions", self._handle_chat)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_get("/health", self._handle_health)
        app.router.add_post("/v1/files", self._handle_file_upload)
        app.router.add_get("/v1/files/{file_id}", self._handle_file_get)
        app.router.add_get("/v1/files/{file_id}/content", self._handle_file_content)
        app.router.add_post("/v1/batches", self._handle_batch_create)
        app.router.add_get("/v1/batches", self._handle_batch_list)
        app.router.add_get("/v1/batches/{batch_id}", self._handle_batch_get)
        app.router.add_post("/v1/batches/{batch_id}/cancel", self._handle_batch_cancel)
        return app

    # -- behaviour controls (any thread) ---------------------------------------------------------

    def set_latency(self, seconds: float, sigma: float = 0.0) -> None:
        """Delay every chat answer by `seconds`; with sigma > 0, draw lognormal delays with that median.

        Draws come from a RNG seeded at construction, so a run's delays repeat.
        """
        _check_latency(seconds, sigma)
        with self._lock:
            self._latency = (seconds, sigma)

    def fail_next(self, fault: str, times: int = 1, *, retry_after_s: float | None = None) -> None:
        """Queue `fault` for the next `times` chat requests that pass validation and limits (FIFO).

        A request that gets 400/401 or a limit's 429 does not use up a queued fault. The faults:

        - "500" "502" "503" "504" "408": that status, JSON error of type server_error.
        - "html502": 502 with nginx's HTML error page.
        - "400" (invalid image), "413", "422": client-error statuses with an OpenAI error body.
        - "401", "403_quota" (one-api/new-api quota), "404_model", "429_quota": fatal-class errors.
        - "429": rate_limit_exceeded, with retry-after and retry-after-ms when `retry_after_s` is given.
        - "429_bare": 429 with an empty body and no headers at all.
        - "error200": 200 whose JSON body is a gateway-style error (also for stream requests).
        - "stream_error": a few content deltas, an error event, [DONE] (without stream: as error200).
        - "no_done": the stream ends without [DONE] (without stream: half the body, then EOF).
        - "no_finish": no finish_reason and no usage anywhere (one-api dropping an upstream error).
        - "no_usage": a normal answer without usage.
        - "malformed": a body (or a stream event) that is not JSON.
        - "drop": the connection is cut (for a stream, after the first chunk).
        - "hang": nothing (for a stream, after the first chunk) until the client gives up.
        - "empty": a normal answer whose content is "".
        - "bad_json": a normal answer whose content is chatty text, not the JSON that was asked for.

        Raises ValueError for a name not in FAULTS or a negative count.
        """
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known faults: {', '.join(FAULTS)}")
        if times < 0:
            raise ValueError(f"times must be >= 0, not {times}")
        with self._lock:
            self._faults.extend([(fault, retry_after_s)] * times)

    def rate_limit(self, *, rpm: int | None = None, tpm: int | None = None, concurrency: int | None = None,
                   headers: bool = True, penalty_s: float = 0.0) -> None:
        """Replace the limits: requests and tokens per minute, requests in flight, 429 penalty window.

        None means no limit. Buckets start full. With headers=False, no x-ratelimit-* or retry-after
        headers are sent. Raises ValueError for a limit below 1 or a negative penalty.
        """
        for name, value in (("rpm", rpm), ("tpm", tpm), ("concurrency", concurrency)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1 or None, not {value!r}")
        if penalty_s < 0:
            raise ValueError(f"penalty_s must be >= 0, not {penalty_s}")
        limits = None
        if rpm or tpm or concurrency:
            limits = _Limits(rpm, tpm, concurrency, headers, penalty_s, time.monotonic())
        with self._lock:
            self._limits = limits

    def reset(self) -> None:
        """Forget faults, limits and observations; latency and the RNG go back to their start values."""
        latency_s, latency_sigma, seed = self._defaults
        with self._lock:
            self._faults.clear()
            self._limits = None
            self._latency = (latency_s, latency_sigma)
            self._rng = random.Random(seed)
            self._observed.clear()
            self._files.clear()
            self._batches.clear()
            self._batch_delay_s = 0.0
            self._batch_outcomes.clear()
            self._line_faults.clear()
            self._shuffle_output = True
            self._retrieve_faults = [0, 0]

    def observed(self) -> list[Observed]:
        """Return a copy of the observations of every chat request, in arrival order.

        Only the newest THUMBS_KEPT keep their thumbnail; at most MAX_OBSERVED are kept.
        """
        with self._lock:
            return list(self._observed)

    # -- handlers (server thread) ----------------------------------------------------------------

    async def _handle_health(self, request: web.Request) -> web.Response:
        return _json_response(200, {"status": "ok"}, {"x-request-id": _new_id("req_")})

    async def _handle_models(self, request: web.Request) -> web.Response:
        headers = {"x-request-id": _new_id("req_")}
        if not self._authorized(request):
            return _json_response(401, _auth_error(request), headers)
        model = {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "caption"}
        return _json_response(200, {"object": "list", "data": [model]}, headers)

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        arrival = time.monotonic()
        request_id = _new_id("req_")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            exchange = _Exchange(arrival, request_id, _Fields(), self._authorized(request))
            error = _error_body("Request too large", "invalid_request_error", code="request_too_large")
            return self._reply_now(exchange, _json_response(413, error, {"x-request-id": request_id}))
        payload = _parse_json(raw)
        exchange = _Exchange(arrival, request_id, _read_fields(payload), self._authorized(request))
        if not exchange.authorized:
            return self._reply_now(exchange, _json_response(401, _auth_error(request), {"x-request-id": request_id}))
        if not self._enter():
            return self._reply_now(exchange, _concurrency_rejection(request_id), "concurrency")
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            return await self._serve_admitted(request, exchange, payload)
        finally:
            self._in_flight -= 1
            self._handlers.discard(task)

    async def _serve_admitted(self, request: web.Request, exchange: _Exchange, payload: Any) -> web.StreamResponse:
        """Validate, decode, apply limits and faults, then answer."""
        headers = {"x-request-id": exchange.request_id}
        try:
            parts, text_chars = _check_request(payload)
            loop = asyncio.get_running_loop()
            pictures = await loop.run_in_executor(self._pool, _decode_pictures, parts)
        except _RequestError as err:
            return self._reply_now(exchange, _json_response(err.status, err.body(), headers))
        exchange.picture = pictures[0]
        prompt_tokens = sum(p.tokens for p in pictures) + _text_tokens(text_chars)
        verdict = self._admit(exchange.fields, prompt_tokens)
        headers.update(verdict.headers)
        if verdict.limit is not None:
            return self._reply_now(exchange, _json_response(429, verdict.body, headers), verdict.limit)
        fault, retry_after_s = self._pop_fault()
        caption = _answer_text(exchange.fields, pictures[0].size, pictures[0].thumb)
        completion = _compose(exchange.fields, caption, prompt_tokens, fault)
        return await self._answer(request, exchange, completion, fault, retry_after_s, headers)

    async def _answer(self, request: web.Request, exchange: _Exchange, completion: _Completion,
                      fault: str | None, retry_after_s: float | None, headers: dict[str, str]) -> web.StreamResponse:
        """Record the request, wait the drawn latency, then send the answer the fault calls for."""
        fields = exchange.fields
        silent = fault in ("drop", "hang") and not fields.stream  # no status line at all
        response = _fault_response(fault, fields, retry_after_s, headers)
        if response is None and not fields.stream and not silent:
            response = _json_response(200, completion.as_object(), headers)
        if silent:
            status = 0
        else:
            status = response.status if response is not None else 200  # None: a stream, always 200
        self._observe(exchange, status, fault)
        await asyncio.sleep(self._draw_latency())
        if silent:
            return await _go_silent(request, fault == "drop")
        if fault == "no_done" and not fields.stream:
            return await _send_truncated(request, completion, headers)
        if response is not None:
            return response
        include_usage = fields.include_usage and fault not in ("no_usage", "no_finish")
        return await self._send_stream(request, completion, fault, include_usage, headers)

    async def _send_stream(self, request: web.Request, completion: _Completion, fault: str | None,
                           include_usage: bool, headers: dict[str, str]) -> web.StreamResponse:
        """Write the answer as server-sent events, one write per event."""
        response = web.StreamResponse(status=200, headers={**headers, "Cache-Control": "no-cache"})
        response.content_type = "text/event-stream"
        await response.prepare(request)
        first = completion.chunk({"role": "assistant", "content": "", "refusal": None}, usage_key=include_usage)
        await response.write(_sse(first))
        if fault in ("drop", "hang"):
            return await _go_silent(request, fault == "drop")
        for event in _stream_events(completion, fault, include_usage):
            await response.write(event)
        await response.write_eof()
        return response

    # -- Files and Batches: controls (any thread) -----------------------------------------------

    def set_batch_delay(self, seconds: float) -> None:
        """Let every new batch stay `in_progress` for `seconds` before its lines run."""
        if seconds < 0:
            raise ValueError(f"batch delay must be >= 0, not {seconds}")
        with self._lock:
            self._batch_delay_s = seconds

    def fail_next_batch(self, outcome: str, *, run_lines: int | None = None) -> None:
        """Make the next created batch end as `outcome` ("failed", "expired" or "cancelled").

        "failed" runs nothing (as a batch that fails validation); "queue_full" fails the same way with
        code token_limit_exceeded (the provider's queue of enqueued tokens is full). "expired" runs `run_lines` lines
        (default half), then lists the rest in the error file with code `batch_expired`.
        "cancelled" runs `run_lines` lines (default half); the rest appear in neither file.
        """
        if outcome not in BATCH_OUTCOMES:
            raise ValueError(f"unknown batch outcome {outcome!r}; known: {', '.join(BATCH_OUTCOMES)}")
        with self._lock:
            self._batch_outcomes.append((outcome, run_lines))

    def fail_batch_lines(self, fault: str, times: int = 1) -> None:
        """Answer the next `times` batch request lines that run with `fault` (see BATCH_LINE_FAULTS):
        that HTTP status in the line's response, or "batch_expired" in its error."""
        if fault not in BATCH_LINE_FAULTS:
            raise ValueError(f"unknown batch line fault {fault!r}; known: {', '.join(BATCH_LINE_FAULTS)}")
        with self._lock:
            self._line_faults.extend([fault] * times)

    def fail_ended_retrieves(self, times: int = 1, *, after: int = 0) -> None:
        """Answer 503 to `times` retrieves of an ended batch, after letting `after` of them through."""
        with self._lock:
            self._retrieve_faults = [after, times]

    def shuffle_batch_output(self, shuffle: bool) -> None:
        """Write output and error files in random order (the default, as OpenAI does not promise
        an order) or in input order."""
        with self._lock:
            self._shuffle_output = shuffle

    def batches(self) -> list[BatchSeen]:
        """Every batch created since the last reset, oldest first, with its metadata and line count."""
        with self._lock:
            return [BatchSeen(b.id, dict(b.metadata), b.lines, b.status) for b in self._batches.values()]

    # -- Files and Batches: handlers (server thread) --------------------------------------------

    async def _handle_file_upload(self, request: web.Request) -> web.Response:
        headers = {"x-request-id": _new_id("req_")}
        if not self._authorized(request):
            return _json_response(401, _auth_error(request), headers)
        purpose, filename, data = None, "upload.jsonl", None
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if part.name == "purpose":
                    purpose = (await part.text()).strip()
                elif part.name == "file":
                    filename = part.filename or filename
                    data = bytes(await part.read())
        except (ValueError, AssertionError, KeyError):
            data = None
        if data is None or purpose is None:
            error = _error_body("Expected a multipart body with 'file' and 'purpose'.", "invalid_request_error",
                                param="file")
            return _json_response(400, error, headers)
        if purpose != "batch":
            error = _error_body(f"This server accepts purpose 'batch' only, not {purpose!r}.",
                                "invalid_request_error", param="purpose")
            return _json_response(400, error, headers)
        stored = self._store_file(filename, "batch", data)
        return _json_response(200, stored.as_object(), headers)

    async def _handle_file_get(self, request: web.Request) -> web.Response:
        stored, failure = self._file_or_error(request)
        return failure or _json_response(200, stored.as_object(), {"x-request-id": _new_id("req_")})

    async def _handle_file_content(self, request: web.Request) -> web.Response:
        stored, failure = self._file_or_error(request)
        if failure is not None:
            return failure
        return web.Response(status=200, body=stored.data, content_type="application/octet-stream",
                            headers={"x-request-id": _new_id("req_")})

    async def _handle_batch_create(self, request: web.Request) -> web.Response:
        headers = {"x-request-id": _new_id("req_")}
        if not self._authorized(request):
            return _json_response(401, _auth_error(request), headers)
        body = _parse_json(await request.read())
        try:
            job = self._new_batch(body)
        except _RequestError as err:
            return _json_response(err.status, err.body(), headers)
        task = asyncio.get_running_loop().create_task(self._run_batch(job))
        self._batch_tasks.add(task)
        task.add_done_callback(self._batch_tasks.discard)
        return _json_response(200, job.as_object(), headers)

    async def _handle_batch_get(self, request: web.Request) -> web.Response:
        job, failure = self._batch_or_error(request)
        if failure:
            return failure
        body = job.as_object()
        with self._lock:
            if body["status"] in ("completed", "failed", "expired", "cancelled") and self._retrieve_faults[1]:
                if self._retrieve_faults[0]:
                    self._retrieve_faults[0] -= 1
                else:
                    self._retrieve_faults[1] -= 1
                    return _json_response(503, _error_body("The server is overloaded.", "server_error"),
                                          {"x-request-id": _new_id("req_")})
        return _json_response(200, body, {"x-request-id": _new_id("req_")})

    async def _handle_batch_list(self, request: web.Request) -> web.Response:
        headers = {"x-request-id": _new_id("req_")}
        if not self._authorized(request):
            return _json_response(401, _auth_error(request), headers)
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            return _json_response(400, _error_body("limit must be from 1 to 100", "invalid_request_error",
                                                   param="limit"), headers)
        with self._lock:
            newest_first = list(reversed(self._batches.values()))
        after = request.query.get("after")
        if after is not None:
            ids = [b.id for b in newest_first]
            newest_first = newest_first[ids.index(after) + 1:] if after in ids else []
        page = newest_first[:limit]
        body = {"object": "list", "data": [b.as_object() for b in page], "has_more": len(newest_first) > limit,
                "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}
        return _json_response(200, body, headers)

    async def _handle_batch_cancel(self, request: web.Request) -> web.Response:
        job, failure = self._batch_or_error(request)
        if failure is not None:
            return failure
        if job.status in ("validating", "in_progress", "finalizing"):
            job.set_status("cancelling")
            job.cancel.set()
        return _json_response(200, job.as_object(), {"x-request-id": _new_id("req_")})

    # -- Files and Batches: helpers --------------------------------------------------------------

    def _store_file(self, filename: str, purpose: str, data: bytes) -> _StoredFile:
        stored = _StoredFile(_new_id("file-"), filename, purpose, int(time.time()), data)
        with self._lock:
            self._files[stored.id] = stored
        return stored

    def _file_or_error(self, request: web.Request) -> tuple[_StoredFile | None, web.Response | None]:
        return self._lookup(request, self._files, "file_id", "id", "No such File object: {}")

    def _batch_or_error(self, request: web.Request) -> tuple[_BatchJob | None, web.Response | None]:
        return self._lookup(request, self._batches, "batch_id", "batch_id", "No batch found with id '{}'.")

    def _lookup(self, request: web.Request, table: dict[str, Any], key: str, param: str,
                missing: str) -> tuple[Any, web.Response | None]:
        """The object the URL names, or the 401/404 answer OpenAI gives instead."""
        headers = {"x-request-id": _new_id("req_")}
        if not self._authorized(request):
            return None, _json_response(401, _auth_error(request), headers)
        wanted = request.match_info[key]
        with self._lock:
            found = table.get(wanted)
        if found is None:
            error = _error_body(missing.format(wanted), "invalid_request_error", param=param)
            return None, _json_response(404, error, headers)
        return found, None

    def _new_batch(self, body: Any) -> _BatchJob:
        """Check a create-batch body and register the batch; raises _RequestError."""
        if not isinstance(body, dict):
            raise _invalid("Expected a JSON object body.", None)
        endpoint, window = body.get("endpoint"), body.get("completion_window")
        if endpoint not in _BATCH_ENDPOINTS:
            raise _invalid(f"Invalid endpoint {endpoint!r}: this server batches /v1/chat/completions.", "endpoint")
        if window != "24h":
            raise _invalid(f"Invalid completion_window {window!r}: only '24h' is supported.", "completion_window")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise _invalid("metadata must be an object of string values.", "metadata")
        with self._lock:
            stored = self._files.get(body.get("input_file_id"))
            if stored is None:
                raise _RequestError(404, f"No such File object: {body.get('input_file_id')}",
                                    param="input_file_id")
            outcome, run_lines = self._batch_outcomes.popleft() if self._batch_outcomes else (None, None)
            count = sum(1 for raw in stored.data.splitlines() if raw.strip())
            job = _BatchJob(_new_id("batch_"), stored.id, endpoint, window, dict(metadata), int(time.time()),
                            count, outcome, run_lines)
            self._batches[job.id] = job
        return job

    async def _run_batch(self, job: _BatchJob) -> None:
        """Validate, wait the batch delay (or a cancel), run the lines, write the result files."""
        with self._lock:
            delay_s, data = self._batch_delay_s, self._files[job.input_file_id].data
        lines, errors = _batch_input_lines(data, job.endpoint)
        if errors or job.outcome in ("failed", "queue_full"):
            injected = {"code": "injected_failure", "message": "The batch failed (injected)."}
            if job.outcome == "queue_full":  # OpenAI's enqueued-token limit, as its batch errors name it
                injected = {"code": "token_limit_exceeded",
                            "message": "Enqueued token limit reached for local-caption in organization org-local."}
            job.errors = errors or [{**injected, "param": None, "line": None}]
            job.set_status("failed")
            return
        job.set_status("in_progress")
        try:
            await asyncio.wait_for(job.cancel.wait(), delay_s)
        except asyncio.TimeoutError:
            pass
        limit = len(lines) if job.outcome is None else (job.run_lines if job.run_lines is not None
                                                        else len(lines) // 2)
        outputs, failures = [], []
        for line in lines[:limit]:
            if job.cancel.is_set():
                break
            ok, text = await self._answer_batch_line(line)
            (outputs if ok else failures).append(text)
            job.completed, job.failed = job.completed + ok, job.failed + (not ok)
        ran = job.completed + job.failed
        if job.outcome == "expired":
            failures += [_expired_line(line["custom_id"]) for line in lines[ran:]]
        self._finish_batch(job, outputs, failures, ran == len(lines) and not job.cancel.is_set())

    def _finish_batch(self, job: _BatchJob, outputs: list[bytes], failures: list[bytes], whole: bool) -> None:
        with self._lock:
            if self._shuffle_output:
                self._rng.shuffle(outputs)
                self._rng.shuffle(failures)
        job.set_status("finalizing")
        if outputs:
            job.output_file_id = self._store_file(f"{job.id}_output.jsonl", "batch_output", b"".join(outputs)).id
        if failures:
            job.error_file_id = self._store_file(f"{job.id}_error.jsonl", "batch_output", b"".join(failures)).id
        if job.outcome == "expired" and not whole:
            job.set_status("expired")
        elif job.cancel.is_set() or (job.outcome == "cancelled" and not whole):
            job.set_status("cancelled")
        else:
            job.set_status("completed")

    async def _answer_batch_line(self, line: dict[str, Any]) -> tuple[bool, bytes]:
        """Run one request line through the chat checks and captioning; return (ok, output line)."""
        request_id, body = _new_id("req_"), line["body"]
        with self._lock:
            fault = self._line_faults.popleft() if self._line_faults else None
        if fault == "batch_expired":
            return False, _expired_line(line["custom_id"])
        try:
            if fault is not None:
                status, message, type_, code = _FAULT_ERRORS[fault]
                raise _RequestError(status, message, code=code)
            if body.get("stream"):
                raise _invalid("Streaming is not supported in the Batch API.", "stream")
            parts, text_chars = _check_request(body)
            pictures = await asyncio.get_running_loop().run_in_executor(self._pool, _decode_pictures, parts)
        except _RequestError as err:
            response = {"status_code": err.status, "request_id": request_id, "body": err.body()}
            return False, _batch_line(line["custom_id"], response, None)
        prompt_tokens = sum(p.tokens for p in pictures) + _text_tokens(text_chars)
        fields = _read_fields(body)
        caption = _answer_text(fields, pictures[0].size, pictures[0].thumb)
        completion = _compose(fields, caption, prompt_tokens, None)
        response = {"status_code": 200, "request_id": request_id, "body": completion.as_object()}
        return True, _batch_line(line["custom_id"], response, None)

    # -- helpers of the handlers -----------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        if self._api_key is None:
            return True
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self._api_key}".encode())

    def _enter(self) -> bool:
        """Count a request in flight unless the concurrency limit is reached (which trips the penalty)."""
        with self._lock:
            limits = self._limits
            if limits is not None and limits.concurrency is not None and self._in_flight >= limits.concurrency:
                limits.trip(time.monotonic())
                return False
            self._in_flight += 1
            return True

    def _admit(self, fields: _Fields, prompt_tokens: int) -> _Verdict:
        """Ask the limits about a request.

        Its TPM cost is its prompt plus its output budget, as OpenAI counts it (rate-limits guide);
        a request without max_tokens or max_completion_tokens is charged its prompt only.
        """
        cost = prompt_tokens + (_output_cap(fields) or 0)
        with self._lock:
            if self._limits is None:
                return _Verdict({})
            return self._limits.admit(cost, fields.model or MODEL_ID, time.monotonic())

    def _pop_fault(self) -> tuple[str | None, float | None]:
        with self._lock:
            return self._faults.popleft() if self._faults else (None, None)

    def _draw_latency(self) -> float:
        with self._lock:
            seconds, sigma = self._latency
            if seconds <= 0:
                return 0.0
            return self._rng.lognormvariate(math.log(seconds), sigma) if sigma > 0 else seconds

    def _reply_now(self, exchange: _Exchange, response: web.Response, fault: str | None = None) -> web.Response:
        self._observe(exchange, response.status, fault)
        return response

    def _observe(self, exchange: _Exchange, status: int, fault: str | None) -> None:
        """Append one observation; drop the thumbnail of the one that leaves the thumbnail window."""
        fields, picture = exchange.fields, exchange.picture
        record = Observed(
            t=exchange.arrival,
            status=status,
            fault=fault,
            model=fields.model,
            stream=fields.stream,
            body_keys=fields.body_keys,
            max_tokens=fields.max_tokens,
            max_completion_tokens=fields.max_completion_tokens,
            temperature=fields.temperature,
            detail=fields.detail,
            image_mime=fields.image_mime,
            image_size=picture.size if picture else None,
            thumb=picture.thumb if picture else None,
            authorized=exchange.authorized,
        )
        with self._lock:
            self._observed.append(record)
            if len(self._observed) > THUMBS_KEPT:
                old = self._observed[-THUMBS_KEPT - 1]
                if old.thumb is not None:
                    self._observed[-THUMBS_KEPT - 1] = dataclasses.replace(old, thumb=None)
        if fault is not None:
            log.debug("answered %s to %s (fault %s)", status, exchange.request_id, fault)


def _check_latency(seconds: float, sigma: float) -> None:
    if seconds < 0 or sigma < 0:
        raise ValueError(f"latency and sigma must be >= 0, not {seconds} and {sigma}")


def _auth_error(request: web.Request) -> dict[str, Any]:
    if "Authorization" not in request.headers:
        message = ("You didn't provide an API key. You need to provide your API key in an Authorization "
                   "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
    else:
        message = ("Incorrect API key provided. "
                   "You can find your API key at https://platform.openai.com/account/api-keys.")
    return _error_body(message, "invalid_request_error", code="invalid_api_key")


def _concurrency_rejection(request_id: str) -> web.Response:
    """A relay's answer to one request too many: 429, no rate-limit or retry-after headers."""
    body = {"error": {"message": "concurrency limit exceeded, please retry later", "type": "rate_limit_error",
                      "code": None}}
    return _json_response(429, body, {"x-request-id": request_id})


def _fault_response(fault: str | None, fields: _Fields, retry_after_s: float | None,
                    headers: dict[str, str]) -> web.Response | None:
    """Return the ready answer of a fault that does not depend on the caption, else None."""
    if fault in _FAULT_ERRORS:
        status, message, type_, code = _FAULT_ERRORS[fault]
        return _json_response(status, _error_body(message, type_, code=code), headers)
    if fault == "html502":
        return web.Response(status=502, text=_NGINX_502, content_type="text/html", headers=headers)
    if fault == "404_model":
        message = f"The model `{fields.model}` does not exist or you do not have access to it."
        return _json_response(404, _error_body(message, "invalid_request_error", code="model_not_found"), headers)
    if fault == "429":
        wait = f"Please try again in {_go_duration(retry_after_s)}." if retry_after_s is not None else ""
        message = f"Rate limit reached for {fields.model or MODEL_ID} on requests per min (RPM). {wait}".strip()
        extra = _retry_after_headers(retry_after_s) if retry_after_s is not None else {}
        body = _error_body(message, "requests", code="rate_limit_exceeded")
        return _json_response(429, body, {**headers, **extra})
    if fault == "429_bare":
        return web.Response(status=429)
    if fault == "error200" or (fault == "stream_error" and not fields.stream):
        return _json_response(200, _GATEWAY_ERROR, headers)
    if fault == "malformed" and not fields.stream:
        return web.Response(status=200, text='{"id": "chatcmpl-', content_type="application/json", headers=headers)
    return None


async def _go_silent(request: web.Request, drop: bool) -> web.StreamResponse:
    """Send nothing more: "drop" cuts the connection now, "hang" waits for the client to give up.

    Either way the handler ends by cancellation: aiohttp cancels it when the connection is lost
    (handler_cancellation=True), and stop() cancels whatever is still in flight.
    """
    if drop and request.transport is not None:
        request.transport.abort()
    await asyncio.sleep(HANG_S)
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=504)  # the connection is gone; aiohttp discards this


async def _send_truncated(request: web.Request, completion: _Completion,
                          headers: dict[str, str]) -> web.StreamResponse:
    """The "no_done" fault without streaming: promise the whole body, send half of it, close."""
    body = json.dumps(completion.as_object(), ensure_ascii=False, separators=(",", ":")).encode()
    response = web.StreamResponse(status=200, headers=headers)
    response.content_type = "application/json"
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    return await _go_silent(request, drop=True)


def serve_forever(host: str = "127.0.0.1", port: int = 8000, *, latency_s: float = 0.0,
                  latency_sigma: float = 0.0, rpm: int | None = None, tpm: int | None = None,
                  concurrency: int | None = None, api_key: str | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM (for `caption serve`); print the base URL line once listening.

    Raises OSError when the address cannot be bound.
    """
    server = LocalServer(host, port, latency_s=latency_s, latency_sigma=latency_sigma, api_key=api_key)
    if rpm or tpm or concurrency:
        server.rate_limit(rpm=rpm, tpm=tpm, concurrency=concurrency)
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
    try:
        with server:
            print(f"caption serve: listening on {server.base_url}", flush=True)
            while not stop.wait(0.5):
                pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
