"""anthropic_messages.py: the Anthropic Messages protocol of the bundled endpoint.

Owns `POST /v1/messages` (streamed and not): the checks Anthropic makes (`x-api-key` when the server
has a key, `anthropic-version`, a model, a whole-number `max_tokens`, user/assistant messages, base64
image sources that decode to the declared type within 5 MB and 8000 px a side), the `message`
object and its usage, the documented event sequence, Anthropic's error bodies, and its rate-limit
headers. `check_params` and `compose` also answer the lines of a Message Batch (`anthropic_batch`).

The existing controls drive it as they drive chat completions: latency, `rate_limit` (the core's
one token bucket is reported as `anthropic-ratelimit-tokens-*`, the request bucket as
`-requests-*`, resets as RFC 3339 times, and `retry-after` in whole seconds), and `fail_next`,
whose faults take Anthropic's shapes (FAULT_TYPES: "503" is a 529 overloaded_error, "403_quota" a
credit-balance 400, "stream_error" an `event: error` mid-stream). A model named `local-refusal...`
answers with `stop_reason: "refusal"`.

Prompt caching: a text block (of `system` or of a message) with `cache_control` marks the end of a
cacheable prefix. The first request whose prefix reaches the model's minimum reports it as
`cache_creation_input_tokens`, a later one with the same prefix (same model, same blocks) within its TTL
(5 minutes, or "1h"; each read refreshes it) as `cache_read_input_tokens`, and `input_tokens` is what
is left (`PromptCache`). Only the last breakpoint is looked up, and the decision is made when a request
arrives, so requests in flight together after the first one read what it wrote (Anthropic would make
each of them write until the first answer begins).

It must not share protocol code with the client side (`pipeline.providers`). It imports only
aiohttp, Pillow, the standard library and modules of this package.

Protocol sources:
- Messages: https://docs.anthropic.com/en/api/messages
- Vision (base64 source, media types, 5 MB, 8000 px, tokens = width × height / 750 after the long
  edge fits 1568 px): https://docs.anthropic.com/en/docs/build-with-claude/vision
- Streaming (message_start, content_block_start, ping, content_block_delta, content_block_stop,
  message_delta, message_stop; `event: error`): https://docs.anthropic.com/en/docs/build-with-claude/streaming
- Errors (`{"type": "error", "error": {"type", "message"}}`, 529 overloaded_error):
  https://docs.anthropic.com/en/api/errors
- Rate-limit headers: https://docs.anthropic.com/en/api/rate-limits
- Prompt caching (`cache_control` {"type": "ephemeral", "ttl"?}, at most 4 breakpoints, per-model minimum
  prefix lengths, the usage fields): https://platform.claude.com/docs/en/build-with-claude/prompt-caching
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import datetime as dt
import hashlib
import hmac
import io
import json
import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from PIL import Image

from . import remote_image
from .core import Core, Observed
from .limits import CONTENT_FAULTS, NGINX_502, go_silent
from .pixels import image_facts, make_thumb, value_for
from .wire import json_response, new_id, parse_json

MEDIA_TYPES = {"image/jpeg": ("JPEG", "MPO"), "image/png": ("PNG",), "image/gif": ("GIF",), "image/webp": ("WEBP",)}
MAX_IMAGE_BASE64 = 5 * 2**20  # "image exceeds 5 MB maximum: N bytes > 5242880 bytes", on the base64 text
MAX_SIDE_PX = 8000
TOKEN_SIDE_PX = 1568  # images are scaled to this long edge before they are counted (Vision docs)
PX_PER_TOKEN = 750
REFUSAL_PREFIX = "local-refusal"
WORDS_PER_DELTA = 3
MAX_CACHE_BREAKPOINTS = 4  # "A maximum of 4 blocks with cache_control may be provided" (Prompt caching docs)
CACHE_TTL_S = {"5m": 300.0, "1h": 3600.0}
MIN_CACHE_TOKENS = {"claude-opus-4-6": 4096, "claude-opus-4-5": 4096, "claude-haiku-4-5": 4096,
                    "claude-3-5-haiku": 2048, "claude-3-haiku": 2048}
"""The shortest prefix each model caches (Prompt caching docs, "Cache limitations"); any other model: 1,024."""
DEFAULT_MIN_CACHE_TOKENS = 1024
MAX_CACHE_ENTRIES = 10_000  # prefixes remembered; the oldest go first
# fail_next's faults in Anthropic's shapes: status, error type, message
FAULT_TYPES: dict[str, tuple[int, str, str]] = {
    "500": (500, "api_error", "Internal server error"),
    "502": (502, "api_error", "Bad gateway"),
    "503": (529, "overloaded_error", "Overloaded"),
    "504": (504, "timeout_error", "Request timed out"),
    "408": (504, "timeout_error", "Request timed out"),
    "400": (400, "invalid_request_error", "messages.0.content.0.image.source.base64: Could not process image"),
    "413": (413, "request_too_large", "Request exceeds the maximum allowed number of bytes."),
    "422": (400, "invalid_request_error", "messages: Unprocessable request"),
    "401": (401, "authentication_error", "invalid x-api-key"),
    "403_quota": (400, "invalid_request_error", "Your credit balance is too low to access the Anthropic API. "
                  "Please go to Plans & Billing to upgrade or purchase credits."),
    "429_quota": (402, "billing_error", "Your credit balance is too low."),
    "429": (429, "rate_limit_error", "Number of requests has exceeded your per-minute rate limit"),
}


def error_object(type_: str, message: str) -> dict[str, Any]:
    """Anthropic's error body (errors docs)."""
    return {"type": "error", "error": {"type": type_, "message": message}}


class ParamsError(Exception):
    """A request Anthropic refuses: status, error type, message."""

    def __init__(self, status: int, type_: str, message: str):
        super().__init__(message)
        self.status, self.type, self.message = status, type_, message

    def body(self) -> dict[str, Any]:
        return error_object(self.type, self.message)


def _invalid(message: str) -> ParamsError:
    return ParamsError(400, "invalid_request_error", message)


# ---------------------------------------------------------------------------------------------
# Checking a body. Pure (decoding runs in the core's threads).


@dataclass(frozen=True, slots=True)
class Checked:
    """A body that passed the checks: what answering it needs."""

    model: str
    max_tokens: int
    stream: bool
    schema: Any  # output_config.format.schema when a json_schema format was asked for, else None
    image_mime: str | None
    size: tuple[int, int] | None  # the first image, pixels
    thumb: Any
    input_tokens: int
    cache_prefix: CachePrefix | None = None  # the prefix up to the last cache_control breakpoint


@dataclass(frozen=True, slots=True)
class CachePrefix:
    """The part of a request up to its last `cache_control` breakpoint: what identifies it, what it costs."""

    key: str  # sha256 of the model and the blocks up to the breakpoint
    tokens: int  # their input tokens, counted as the request's are
    ttl_s: float


def min_cache_tokens(model: str) -> int:
    """The shortest prefix `model` caches (MIN_CACHE_TOKENS by name prefix, else the default)."""
    for prefix, tokens in MIN_CACHE_TOKENS.items():
        if model.startswith(prefix):
            return tokens
    return DEFAULT_MIN_CACHE_TOKENS


class PromptCache:
    """Prefixes cached so far, with when they expire. Call under the core's lock."""

    def __init__(self) -> None:
        self._expiry: OrderedDict[str, float] = OrderedDict()

    def clear(self) -> None:
        self._expiry.clear()

    def use(self, model: str, prefix: CachePrefix | None, now: float) -> tuple[int, int]:
        """(tokens read, tokens written) for a request with `prefix`: read when cached and alive,
        written when long enough for `model`, else (0, 0). A read or a write (re)starts the TTL."""
        if prefix is None or prefix.tokens < min_cache_tokens(model):
            return 0, 0
        alive = self._expiry.get(prefix.key, 0.0) > now
        self._expiry[prefix.key] = now + prefix.ttl_s
        self._expiry.move_to_end(prefix.key)
        while len(self._expiry) > MAX_CACHE_ENTRIES:
            self._expiry.popitem(last=False)
        return (prefix.tokens, 0) if alive else (0, prefix.tokens)


def image_tokens(width: int, height: int) -> int:
    """Anthropic's count: scale the long edge to at most 1568 px, then ⌈w × h / 750⌉ (Vision docs)."""
    scale = min(1.0, TOKEN_SIDE_PX / max(width, height))
    return math.ceil(width * scale * height * scale / PX_PER_TOKEN)


def _text_tokens(chars: int) -> int:
    return math.ceil(chars / 4)


def _image(block: dict[str, Any], where: str) -> tuple[str, tuple[int, int], Any]:
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "url":
        return _url_image(source.get("url"), where)
    if not isinstance(source, dict) or source.get("type") != "base64":
        raise _invalid(f"{where}.source: only base64 and url sources are accepted here")
    mime, data = source.get("media_type"), source.get("data")
    if mime not in MEDIA_TYPES:
        raise _invalid(f"{where}.source.media_type: Input should be {', '.join(MEDIA_TYPES)}")
    if not isinstance(data, str) or not data:
        raise _invalid(f"{where}.source.data: Field required")
    if len(data) > MAX_IMAGE_BASE64:
        raise _invalid(f"{where}.source.base64: image exceeds 5 MB maximum: {len(data)} bytes > "
                       f"{MAX_IMAGE_BASE64} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(f"{where}.source.base64: invalid base64 data") from None
    return _picture(raw, f"{where}.source.base64", mime)


def _url_image(url: Any, where: str) -> tuple[str, tuple[int, int], Any]:
    """A `{"type": "url", "url": ...}` source (Vision docs, "URL-based image source"), fetched here."""
    if not isinstance(url, str) or not remote_image.is_remote(url):
        raise _invalid(f"{where}.source.url: Input should be a valid http(s) URL")
    try:
        raw = remote_image.fetch_image(url)
    except remote_image.FetchRefused as err:
        raise _invalid(f"{where}.source.url: Unable to download the file ({err})") from None
    return _picture(raw, f"{where}.source.url", None)


def _picture(raw: bytes, where: str, declared: str | None) -> tuple[str, tuple[int, int], Any]:
    """(media type, size, thumbnail) of an image's bytes, checked as Anthropic checks them: a supported
    format (the `declared` media type, for a base64 source), at most MAX_SIDE_PX a side."""
    try:
        with Image.open(io.BytesIO(raw)) as img:
            mime = next((m for m, formats in MEDIA_TYPES.items() if img.format in formats), None)
            if declared is not None and mime != declared:
                raise _invalid(f"{where}: Image does not match the provided media type {declared}")
            if mime is None:
                raise _invalid(f"{where}: Unsupported image format {img.format}")
            if max(img.size) > MAX_SIDE_PX:
                raise _invalid(f"{where}{'.data' if declared else ''}: At least one of the image dimensions "
                               f"exceed max allowed size: {MAX_SIDE_PX} pixels")
            return mime, img.size, make_thumb(img)
    except ParamsError:
        raise
    except Exception as err:  # Pillow raises many types for a broken image; all mean "not an image"
        raise _invalid(f"{where}: Could not process image ({type(err).__name__})") from None


def _check_options(params: dict[str, Any]) -> None:
    if not isinstance(params.get("model"), str) or not params["model"]:
        raise _invalid("model: Field required")
    tokens = params.get("max_tokens")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise _invalid("max_tokens: Field required" if tokens is None else "max_tokens: must be an integer >= 1")
    temperature = params.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0 <= temperature <= 1):
        raise _invalid("temperature: Input should be less than or equal to 1")
    if "stream" in params and not isinstance(params["stream"], bool):
        raise _invalid("stream: Input should be a valid boolean")
    system = params.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise _invalid("system: Input should be a valid string or list of text blocks")
    for j, block in enumerate(system if isinstance(system, list) else ()):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise _invalid(f"system.{j}: Input should be a text block")
    if not isinstance(params.get("messages"), list) or not params["messages"]:
        raise _invalid("messages: Field required")


def _cache_ttl(block: dict[str, Any], where: str) -> float | None:
    """The TTL a block's `cache_control` asks for, seconds; None when it has none. Raises ParamsError."""
    control = block.get("cache_control")
    if control is None:
        return None
    if not isinstance(control, dict) or control.get("type") != "ephemeral":
        raise _invalid(f"{where}.cache_control.type: Input should be 'ephemeral'")
    ttl = control.get("ttl", "5m")
    if ttl not in CACHE_TTL_S:
        raise _invalid(f"{where}.cache_control.ttl: Input should be '5m' or '1h'")
    return CACHE_TTL_S[ttl]


@dataclass(slots=True)
class _Walk:
    """What reading a body's blocks in order has found: text, images, and the last cache breakpoint."""

    chars: int = 0
    image_tokens: int = 0
    seen: list[Any] = dataclasses.field(default_factory=list)  # the blocks so far, cache_control left out
    breakpoints: int = 0
    prefix: tuple[int, float] | None = None  # (blocks up to the last breakpoint, its TTL)
    prefix_tokens: int = 0

    def take(self, block: dict[str, Any], where: str, tokens: int = 0) -> None:
        self.chars += len(block["text"]) if block.get("type") == "text" else 0
        self.image_tokens += tokens
        self.seen.append({k: v for k, v in block.items() if k != "cache_control"})
        ttl = _cache_ttl(block, where)
        if ttl is None:
            return
        self.breakpoints += 1
        if self.breakpoints > MAX_CACHE_BREAKPOINTS:
            raise _invalid(f"A maximum of {MAX_CACHE_BREAKPOINTS} blocks with cache_control may be provided. "
                           f"Found {self.breakpoints}.")
        self.prefix = (len(self.seen), ttl)
        self.prefix_tokens = self.image_tokens + _text_tokens(self.chars)

    def cache_prefix(self, model: str) -> CachePrefix | None:
        if self.prefix is None:
            return None
        count, ttl = self.prefix
        blob = json.dumps([model, self.seen[:count]], sort_keys=True, separators=(",", ":"))
        return CachePrefix(hashlib.sha256(blob.encode()).hexdigest(), self.prefix_tokens, ttl)


def check_params(params: Any) -> tuple[Checked, list[tuple[str, tuple[int, int], Any]]]:
    """Check a Messages body and decode its images; raises ParamsError. Runs in a decode thread."""
    if not isinstance(params, dict):
        raise _invalid("The request body is not valid JSON")
    _check_options(params)
    images, walk = [], _Walk()
    system = params.get("system")
    if isinstance(system, str):
        walk.take({"type": "text", "text": system}, "system")
    for j, block in enumerate(system if isinstance(system, list) else ()):
        walk.take(block, f"system.{j}")
    for i, message in enumerate(params["messages"]):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise _invalid(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        content = message.get("content")
        if isinstance(content, str):
            walk.take({"type": "text", "text": content}, f"messages.{i}.content")
            continue
        if not isinstance(content, list):
            raise _invalid(f"messages.{i}.content: Input should be a valid list")
        for j, block in enumerate(content):
            where = f"messages.{i}.content.{j}"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                walk.take(block, where)
            elif kind == "image":
                images.append(_image(block, where))
                walk.take(block, where, image_tokens(*images[-1][1]))
            else:
                raise _invalid(f"{where}: Input tag {kind!r} does not match any of the expected tags")
    fmt = (params.get("output_config") or {}).get("format") if isinstance(params.get("output_config"), dict) else None
    schema = fmt.get("schema") if isinstance(fmt, dict) and fmt.get("type") == "json_schema" else None
    first = images[0] if images else (None, None, None)
    tokens = walk.image_tokens + _text_tokens(walk.chars)
    checked = Checked(params["model"], params["max_tokens"], bool(params.get("stream")), schema, first[0],
                      first[1], first[2], tokens, walk.cache_prefix(params["model"]))
    return checked, images


# ---------------------------------------------------------------------------------------------
# Answers. Pure.


@dataclass(frozen=True, slots=True)
class Message:
    """One answer before it is written as JSON or as events."""

    id: str
    model: str
    text: str
    stop_reason: str | None
    input_tokens: int  # the prompt's tokens that were neither read from nor written to the cache
    output_tokens: int
    usage: bool = True  # False: the "no_usage" fault leaves usage out
    cache_read: int = 0  # cache_read_input_tokens
    cache_write: int = 0  # cache_creation_input_tokens

    def usage_object(self, output_tokens: int) -> dict[str, Any]:
        """The `usage` object (Messages docs; the cache counts are outside input_tokens)."""
        return {"input_tokens": self.input_tokens, "output_tokens": output_tokens,
                "cache_creation_input_tokens": self.cache_write, "cache_read_input_tokens": self.cache_read}

    def as_object(self) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                                "content": [{"type": "text", "text": self.text}], "stop_reason": self.stop_reason,
                                "stop_sequence": None}
        if self.usage:
            body["usage"] = self.usage_object(self.output_tokens)
        return body


def compose(checked: Checked, fault: str | None = None, cached: tuple[int, int] = (0, 0)) -> Message:
    """The answer to a checked request: the pixel caption (or a schema's object), cut at max_tokens.

    `cached` is (tokens read from the cache, tokens written to it), both taken out of input_tokens."""
    if checked.size is None:
        text = "I see no image in this message."
    else:
        facts = image_facts(checked.size, checked.thumb)
        text = json.dumps(value_for(checked.schema, facts), ensure_ascii=False) if checked.schema else facts["caption"]
    text = CONTENT_FAULTS.get(fault, text)
    stop: str | None = "end_turn"
    if checked.model.startswith(REFUSAL_PREFIX):
        text, stop = "", "refusal"
    if _text_tokens(len(text)) > checked.max_tokens:
        text, stop = text[: 4 * checked.max_tokens], "max_tokens"
    if fault == "no_finish":
        stop = None
    read, written = cached
    return Message(new_id("msg_"), checked.model, text, stop, checked.input_tokens - read - written,
                   _text_tokens(len(text)), usage=fault != "no_usage", cache_read=read, cache_write=written)


def _event(name: str, data: Any) -> bytes:
    """One event-stream event with its name (Anthropic names every event)."""
    return f"event: {name}\ndata: ".encode() + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def stream_events(message: Message, fault: str | None) -> list[bytes]:
    """The documented sequence: message_start, content_block_start, ping, deltas, content_block_stop,
    message_delta (stop_reason, output usage), message_stop; shaped by the stream faults."""
    start = message.as_object() | {"content": [], "stop_reason": None}
    start["usage"] = message.usage_object(1) if message.usage else None
    if not message.usage:
        del start["usage"]
    words = [w for w in re.split(r"(?<=\s)(?=\S)", message.text) if w]
    pieces = ["".join(words[i: i + WORDS_PER_DELTA]) for i in range(0, len(words), WORDS_PER_DELTA)]
    events = [_event("message_start", {"type": "message_start", "message": start}),
              _event("content_block_start", {"type": "content_block_start", "index": 0,
                                             "content_block": {"type": "text", "text": ""}}),
              _event("ping", {"type": "ping"})]
    if fault == "malformed":
        return [*events, b"event: content_block_delta\ndata: {not json\n\n"]
    if fault == "stream_error":
        pieces = pieces[: max(1, len(pieces) // 2)]
    events += [_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                              "delta": {"type": "text_delta", "text": p}}) for p in pieces]
    if fault == "stream_error":
        return [*events, _event("error", error_object("overloaded_error", "Overloaded"))]
    events.append(_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    delta = {"type": "message_delta", "delta": {"stop_reason": message.stop_reason, "stop_sequence": None}}
    if message.usage:
        delta["usage"] = {"output_tokens": message.output_tokens}
    events.append(_event("message_delta", delta))
    if fault != "no_done":
        events.append(_event("message_stop", {"type": "message_stop"}))
    return events


def rate_headers(openai_style: dict[str, str], now: float | None = None) -> dict[str, str]:
    """The core's limit headers (x-ratelimit-*, Go durations) as Anthropic's (RFC 3339 resets)."""
    now = time.time() if now is None else now
    headers = {}
    for ours, theirs in (("requests", "requests"), ("tokens", "tokens")):
        for field in ("limit", "remaining"):
            if (value := openai_style.get(f"x-ratelimit-{field}-{ours}")) is not None:
                headers[f"anthropic-ratelimit-{theirs}-{field}"] = value
        if (reset := openai_style.get(f"x-ratelimit-reset-{ours}")) is not None:
            when = dt.datetime.fromtimestamp(now + _go_seconds(reset), dt.UTC)
            headers[f"anthropic-ratelimit-{theirs}-reset"] = when.isoformat(timespec="seconds").replace("+00:00", "Z")
    if "retry-after" in openai_style:
        headers["retry-after"] = openai_style["retry-after"]
    return headers


def _go_seconds(text: str) -> float:
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text))


# ---------------------------------------------------------------------------------------------
# The handler.


class AnthropicMessages:
    """The Messages route, answering through the shared core."""

    def __init__(self, core: Core):
        self._core = core
        self._cache = PromptCache()  # under the core's lock
        core.on_reset(self._cache.clear)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self._handle)

    def refuse(self, request: web.Request, headers: dict[str, str]) -> web.Response | None:
        """The 401 for a wrong or missing key, or the 400 for a missing anthropic-version.

        The key goes in `x-api-key` (Messages docs); the official SDK 2.x sends it as
        `Authorization: Bearer`, which is taken too.
        """
        key = self._core.api_key
        given = request.headers.get("x-api-key") or request.headers.get("Authorization", "").removeprefix("Bearer ")
        if key is not None and not hmac.compare_digest(given.encode(), key.encode()):
            return json_response(401, error_object("authentication_error", "invalid x-api-key"), headers)
        if not request.headers.get("anthropic-version"):
            return json_response(400, error_object("invalid_request_error", "anthropic-version: header is required"), headers)
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        core, arrival, request_id = self._core, time.monotonic(), new_id("req_")
        headers = {"request-id": request_id}
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return json_response(413, error_object("request_too_large", "Request exceeds the maximum size"), headers)
        refusal = self.refuse(request, headers)
        if refusal is not None:
            self._observe(arrival, refusal.status, None, None, request.headers.get("x-api-key") is not None)
            return refusal
        if not core.enter():
            self._observe(arrival, 429, "concurrency", None)
            return self._concurrency_refusal(request_id, headers)
        task = asyncio.current_task()
        if task is not None:
            core.tasks.add(task)
        try:
            return await self._serve(request, arrival, parse_json(raw), headers)
        finally:
            core.in_flight -= 1
            core.tasks.discard(task)

    def _concurrency_refusal(self, request_id: str, headers: dict[str, str]) -> web.Response:
        given = self._core.concurrency_refusal(request_id)
        extra = {"retry-after": given.headers["retry-after"]} if "retry-after" in given.headers else {}
        return json_response(429, error_object("rate_limit_error", "Too many concurrent requests"), {**headers, **extra})

    async def _serve(self, request: web.Request, arrival: float, params: Any, headers: dict[str, str]
                     ) -> web.StreamResponse:
        try:
            checked, _ = await asyncio.get_running_loop().run_in_executor(self._core.pool, check_params, params)
        except ParamsError as err:
            self._observe(arrival, err.status, None, None)
            return json_response(err.status, err.body(), headers)
        verdict = self._core.admit(checked.input_tokens + checked.max_tokens, checked.model)
        headers.update(rate_headers(verdict.headers))
        if verdict.limit is not None:
            self._observe(arrival, 429, verdict.limit, checked)
            message = (verdict.body or {}).get("error", {}).get("message", "rate limited")
            return json_response(429, error_object("rate_limit_error", message), headers)
        fault, retry_after_s = self._core.pop_fault()
        message = compose(checked, fault, self._use_cache(checked, fault))
        return await self._answer(request, arrival, checked, message, fault, retry_after_s, headers)

    def _use_cache(self, checked: Checked, fault: str | None) -> tuple[int, int]:
        """(read, written) cache tokens of a request the server answers (an error answer caches nothing)."""
        if _fault_response(fault, checked.stream, None, {}) is not None:
            return 0, 0
        with self._core.lock:
            return self._cache.use(checked.model, checked.cache_prefix, time.monotonic())

    async def _answer(self, request: web.Request, arrival: float, checked: Checked, message: Message,
                      fault: str | None, retry_after_s: float | None, headers: dict[str, str]) -> web.StreamResponse:
        response = _fault_response(fault, checked.stream, retry_after_s, headers)
        silent = fault in ("drop", "hang") and not checked.stream
        self._observe(arrival, 0 if silent else response.status if response is not None else 200, fault, checked)
        await asyncio.sleep(self._core.draw_latency())
        if silent:
            return await go_silent(request, fault == "drop")
        if response is not None:
            return response
        if not checked.stream:
            return await self._send_body(request, message, fault, headers)
        stream = web.StreamResponse(status=200, headers={**headers, "Cache-Control": "no-cache"})
        stream.content_type = "text/event-stream"
        await stream.prepare(request)
        events = stream_events(message, fault)
        for number, event in enumerate(events):
            await stream.write(event)
            if number == 0 and fault in ("drop", "hang"):
                return await go_silent(request, fault == "drop")
        await stream.write_eof()
        return stream

    async def _send_body(self, request: web.Request, message: Message, fault: str | None,
                         headers: dict[str, str]) -> web.StreamResponse:
        body = json.dumps(message.as_object(), ensure_ascii=False, separators=(",", ":")).encode()
        if fault == "malformed":
            body = b'{"id": "msg_'
        if fault != "no_done":
            return web.Response(status=200, body=body, content_type="application/json", headers=headers)
        response = web.StreamResponse(status=200, headers=headers)  # promise the whole body, send half
        response.content_type = "application/json"
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        return await go_silent(request, drop=True)

    def _observe(self, arrival: float, status: int, fault: str | None, checked: Checked | None,
                 authorized: bool = True) -> None:
        self._core.observe(Observed(
            t=arrival, status=status, fault=fault, model=checked.model if checked else None,
            stream=checked.stream if checked else False, body_keys=(), max_tokens=checked.max_tokens if checked else None,
            max_completion_tokens=None, temperature=None, detail=None,
            image_mime=checked.image_mime if checked else None, image_size=checked.size if checked else None,
            thumb=checked.thumb if checked else None, authorized=authorized))


def _fault_response(fault: str | None, stream: bool, retry_after_s: float | None,
                    headers: dict[str, str]) -> web.Response | None:
    """The ready answer of a fault that does not depend on the caption, in Anthropic's shapes."""
    if fault in FAULT_TYPES:
        status, type_, message = FAULT_TYPES[fault]
        extra = {"retry-after": str(math.ceil(retry_after_s))} if fault == "429" and retry_after_s is not None else {}
        return json_response(status, error_object(type_, message), {**headers, **extra})
    if fault == "html502":
        return web.Response(status=502, text=NGINX_502, content_type="text/html", headers=headers)
    if fault == "404_model":
        return json_response(404, error_object("not_found_error", "model: not found"), headers)
    if fault == "429_bare":
        return web.Response(status=429)
    if fault == "error200" or (fault == "stream_error" and not stream):
        return json_response(529 if fault == "stream_error" else 200, error_object("overloaded_error", "Overloaded"), headers)
    return None
