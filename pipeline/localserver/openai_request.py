"""openai_request.py: reading and checking an OpenAI chat-completions request body.

Owns what the server accepts in `POST /v1/chat/completions` (and in a batch line's body): the
lenient read of the fields observations and answers need (`Fields`), the checks OpenAI makes (a JSON
object, a model, messages, `data:image/...;base64,` URLs, option types and ranges, what reasoning
models reject), decoding the images with Pillow into `Picture`s, and OpenAI's token counting for
images, text and the output budget.

It must not answer, charge limits or record observations: it raises `RequestError` (400) naming
the offending parameter and leaves the rest to the handlers. It imports only Pillow, the standard
library and the package's `wire` and `pixels`.

Protocol sources:
- image tokens (85 for low detail; otherwise fit 2048x2048, shortest side 768, 170 per 512 px tile
  plus 85): https://platform.openai.com/docs/guides/images-vision
- reasoning models reject `max_tokens` and non-default `temperature`:
  https://platform.openai.com/docs/guides/reasoning
- `service_tier` ("auto", "default", "flex", "priority"): https://platform.openai.com/docs/api-reference/chat
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image

from . import remote_image
from .pixels import make_thumb
from .wire import RequestError, invalid

REASONING_PREFIX = "local-reasoning"  # models named so emulate OpenAI's reasoning models
SERVICE_TIERS = ("auto", "default", "flex", "priority")  # chat API reference, `service_tier`

_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+);base64,", re.IGNORECASE)
_MIME_BY_FORMAT = {  # Pillow format → the MIME type a data URL must declare for it
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",  # a JPEG with extra pictures (many cameras)
    "WEBP": "image/webp",
    "GIF": "image/gif",
}
_DETAILS = ("low", "high", "auto")


@dataclass(frozen=True, slots=True)
class Fields:
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
    service_tier: Any = None  # as sent: "auto", "default", "flex", "priority", or None when absent


@dataclass(frozen=True, slots=True)
class _ImagePart:
    """One image_url part that passed the structural checks; its bytes are not decoded yet."""

    mime: str  # as the data URL declared it ("" for an http(s) URL: whatever it serves)
    base64_text: str
    detail: str  # "low" | "high" | "auto"
    param: str  # where it sits, for error messages: messages[0].content[1]
    url: str | None = None  # an http(s) URL to fetch (remote_image.py) instead of a data URL


@dataclass(frozen=True, slots=True)
class Picture:
    """A decoded image: its size, its thumbnail and what it costs in prompt tokens."""

    size: tuple[int, int]
    thumb: Image.Image
    tokens: int


# ---------------------------------------------------------------------------------------------
# Token counting. Pure.


def image_tokens(width: int, height: int, detail: str | None) -> int:
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


def text_tokens(chars: int) -> int:
    """Return the tokens we charge for `chars` characters of text: one per four, rounded up."""
    return math.ceil(chars / 4)


def output_cap(fields: Fields) -> int | None:
    """The output token budget: the smaller of max_tokens and max_completion_tokens, None if neither."""
    given = [v for v in (fields.max_tokens, fields.max_completion_tokens) if isinstance(v, int)]
    return min(given) if given else None


# ---------------------------------------------------------------------------------------------
# Reading and checking a body.


def _first_image_url(messages: Any) -> dict[str, Any] | None:
    """Return the image_url object of the first image part in the user messages, if any."""
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") == "image_url" and isinstance(part.get("image_url"), dict):
                return part["image_url"]
    return None


def read_fields(payload: Any) -> Fields:
    """Pick the observed fields out of a body that may be anything."""
    if not isinstance(payload, dict):
        return Fields()
    image = _first_image_url(payload.get("messages")) or {}
    url = image.get("url")
    match = _DATA_URL.match(url) if isinstance(url, str) else None
    options = payload.get("stream_options")
    return Fields(
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
        service_tier=payload.get("service_tier"),
    )


def check_request(payload: Any) -> tuple[list[_ImagePart], int]:
    """Validate a chat request body the way OpenAI does; return its image parts and text length.

    Raises RequestError (400) naming the offending parameter.
    """
    if not isinstance(payload, dict):
        raise invalid("We could not parse the JSON body of your request: expected a JSON object.", None)
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("you must provide a model parameter", "model")
    if model.startswith(REASONING_PREFIX):
        _check_reasoning_options(payload)
    _check_options(payload)
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("Invalid 'messages': expected a non-empty array of messages.", "messages")
    parts: list[_ImagePart] = []
    chars = 0
    for index, message in enumerate(messages):
        found, length = _check_message(message, f"messages[{index}]")
        parts.extend(found)
        chars += length
    if not parts:
        raise invalid("This server captions images: a user message must carry an image_url part.", "messages")
    return parts, chars


def _check_options(payload: dict[str, Any]) -> None:
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid("Invalid type for 'stream': expected a boolean.", "stream", "invalid_type")
    if payload.get("stream_options") is not None:
        if stream is not True:
            raise invalid("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options")
        if not isinstance(payload["stream_options"], dict):
            raise invalid("Invalid type for 'stream_options': expected an object.", "stream_options", "invalid_type")
    for name in ("max_tokens", "max_completion_tokens"):
        _check_token_budget(name, payload.get(name))
    tier = payload.get("service_tier")
    if tier is not None and tier not in SERVICE_TIERS:
        raise invalid(f"Invalid value: {json.dumps(tier)}. Supported values are: 'auto', 'default', 'flex' and "
                      "'priority'.", "service_tier", "invalid_value")
    temperature = payload.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))):
        raise invalid("Invalid type for 'temperature': expected a number.", "temperature", "invalid_type")
    if temperature is not None and not 0 <= temperature <= 2:
        raise invalid(f"Invalid 'temperature': expected a value from 0 to 2, but got {temperature}.", "temperature")


def _check_token_budget(name: str, value: Any) -> None:
    """max_tokens and max_completion_tokens: absent, or an integer >= 1."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"Invalid type for '{name}': expected an integer.", name, "invalid_type")
    if value < 1:
        raise invalid(
            f"Invalid '{name}': integer below minimum value. Expected a value >= 1, but got {value} instead.",
            name,
            "integer_below_min_value",
        )


def _check_reasoning_options(payload: dict[str, Any]) -> None:
    """Reject what OpenAI's reasoning models reject (reasoning guide, "unsupported parameters")."""
    if payload.get("max_tokens") is not None:
        raise invalid(
            "Unsupported parameter: 'max_tokens' is not supported with this model. "
            "Use 'max_completion_tokens' instead.",
            "max_tokens",
            "unsupported_parameter",
        )
    temperature = payload.get("temperature")
    if temperature is not None and temperature != 1:
        raise invalid(
            f"Unsupported value: 'temperature' does not support {json.dumps(temperature)} with this model. "
            "Only the default (1) value is supported.",
            "temperature",
            "unsupported_value",
        )


def _check_message(message: Any, where: str) -> tuple[list[_ImagePart], int]:
    """Validate one message; return its image parts (user messages only) and its text length."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise invalid(f"Invalid '{where}': expected an object with a string 'role'.", where)
    content = message.get("content")
    if isinstance(content, str):
        return [], len(content)
    if not isinstance(content, list):
        raise invalid(f"Invalid '{where}.content': expected a string or an array of parts.", f"{where}.content")
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
            raise invalid(f"Invalid '{here}': expected a text part, or an image_url part in a user message.", here)
    return parts, chars


def _check_image_part(part: dict[str, Any], where: str) -> _ImagePart:
    """Check an image_url part's shape and data URL header (the bytes are decoded later)."""
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else None
    if not isinstance(url, str):
        raise invalid(f"Missing required parameter: '{where}.image_url.url'.", f"{where}.image_url.url",
                      "missing_required_parameter")
    detail = image.get("detail", "auto")
    if detail not in _DETAILS:
        raise invalid(f"Invalid value: {detail!r}. Supported values are: 'low', 'high', and 'auto'.",
                      f"{where}.image_url.detail", "invalid_value")
    if remote_image.is_remote(url):
        return _ImagePart(mime="", base64_text="", detail=detail, param=f"{where}.image_url.url", url=url)
    match = _DATA_URL.match(url)
    if match is None:
        raise invalid("Invalid image URL: this local server accepts only data:image/<type>;base64,... URLs.",
                      f"{where}.image_url.url", "invalid_image_url")
    mime = match.group(1).lower()
    if mime not in _MIME_BY_FORMAT.values():
        raise invalid(f"Invalid MIME type {mime}: supported are image/png, image/jpeg, image/webp and image/gif.",
                      f"{where}.image_url.url", "invalid_image_format")
    return _ImagePart(mime=mime, base64_text=url[match.end():], detail=detail, param=f"{where}.image_url.url")


# ---------------------------------------------------------------------------------------------
# Decoding the images.


def _decode_picture(part: _ImagePart) -> Picture:
    """Decode an image part's bytes with Pillow; runs in the decode threads.

    Raises RequestError (400) for bad base64, an undecodable image, or one that is not the type
    its data URL declared.
    """
    try:
        data = (remote_image.fetch_image(part.url) if part.url is not None
                else base64.b64decode(part.base64_text, validate=True))
    except remote_image.FetchRefused as err:  # OpenAI: "Error while downloading <url>." (invalid_image_url)
        raise invalid(f"Error while downloading {part.url}: {err}.", part.param, "invalid_image_url") from None
    except (binascii.Error, ValueError):
        raise invalid("Invalid base64 image data.", part.param, "invalid_image_url") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            actual = _MIME_BY_FORMAT.get(img.format or "")
            if part.url is not None and actual is None:
                raise invalid(f"You uploaded an unsupported image ({img.format}).", part.param, "invalid_image_format")
            if part.url is None and actual != part.mime:
                raise invalid(f"The image data is {img.format}, not the declared {part.mime}.", part.param,
                              "invalid_image_format")
            size = img.size
            thumb = make_thumb(img)
    except RequestError:
        raise
    except Exception as err:  # Pillow's decoders raise many types for broken input; all mean "not an image"
        raise invalid(f"You uploaded an unsupported image ({type(err).__name__}).", part.param,
                      "invalid_image_format") from None
    return Picture(size=size, thumb=thumb, tokens=image_tokens(size[0], size[1], part.detail))


def _decode_pictures(parts: list[_ImagePart]) -> list[Picture]:
    return [_decode_picture(part) for part in parts]


async def checked_pictures(payload: Any, pool: ThreadPoolExecutor | None) -> tuple[list[Picture], int]:
    """Check a body, decode its images in `pool`; return the pictures and the prompt's tokens.

    Raises RequestError (400) for whatever the checks or the decoding refuse.
    """
    parts, text_chars = check_request(payload)
    pictures = await asyncio.get_running_loop().run_in_executor(pool, _decode_pictures, parts)
    return pictures, sum(p.tokens for p in pictures) + text_tokens(text_chars)
