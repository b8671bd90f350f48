"""providers/anthropic/messages.py: the Anthropic Messages protocol, as a `Provider`.

Owns the request body (system prompt, the image block before the text, `max_tokens`, structured
output), the per-image limits (`image_settings`), and the parsing of answers, whole or streamed,
into `ChatResult`/`Usage`. JSON stays a dict only inside this package. Pure: the engine's
transport does the HTTP; nothing here retries, sleeps or counts.

References:
- Messages API (`x-api-key`, `anthropic-version`, required `max_tokens`, content blocks, `stop_reason`,
  `usage`): https://docs.anthropic.com/en/api/messages
- Vision (base64 image source, 5 MB a image, 8000 px a side, 2000 px past 20 images a request,
  tokens ≈ width × height / 750): https://docs.anthropic.com/en/docs/build-with-claude/vision
- Streaming (message_start, content_block_*, message_delta with stop_reason and output usage,
  message_stop, ping, error events): https://docs.anthropic.com/en/docs/build-with-claude/streaming
- Structured outputs (`output_config.format` json_schema):
  https://platform.claude.com/docs/en/build-with-claude/structured-outputs
- Prompt caching (`system` as text blocks, `cache_control: {"type": "ephemeral"}` on the last block
  caches the prefix up to it; usage `cache_creation_input_tokens` and `cache_read_input_tokens`,
  both outside `input_tokens`): https://platform.claude.com/docs/en/build-with-claude/prompt-caching
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ... import cost
from ...errors import BadOutputError, CaptionError, TransientError
from ...job import ImageSettings, Job
from ...records import ChatResult, Encoded, RateInfo, Usage
from ...redaction import keep_secret
from ..base import HttpRequest
from ..http import loads_or_none
from ..sse import SSEDecoder, SSEEvent
from .errors import classify_response, parse_rate_info, request_id_of

__all__ = ["AnthropicProvider", "MAX_IMAGE_BASE64_BYTES", "MAX_IMAGE_SIDE_PX", "build_body", "messages_root",
           "parse_message", "parse_usage"]

log = logging.getLogger(__name__)

MAX_IMAGE_BASE64_BYTES = 5 * 2**20
"""5 MB a image, counted on the base64 text ("image exceeds 5 MB maximum: 5272940 bytes > 5242880
bytes" is what the API answers; Vision docs, "Image size")."""
MAX_IMAGE_SIDE_PX = 8000  # a side, for up to 20 images a request (we send one); 2000 px past 20 (Vision docs)
MIN_SHRINK_SIDE_PX = 256  # shrinking for the byte limit stops here (the server's 400 then says why)
SHRINK_MARGIN = 0.95  # aim a little under the byte limit: JPEG size is not exactly proportional to area
STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                "model_context_window_exceeded": "length"}
"""Anthropic's stop_reason → the finish_reason column's words (which the length flag reads);
any other reason is kept as Anthropic says it; `refusal` is an error row (see `_checked_result`)."""


def messages_root(base_url: str) -> str:
    """`base_url` without a trailing `/v1`: Anthropic's is "https://api.anthropic.com" and routes
    start at /v1, while the bundled endpoint and relays are given as ".../v1"."""
    root = base_url.rstrip("/")
    return root[:-3] if root.endswith("/v1") else root


class AnthropicProvider:
    """Anthropic Messages for one run: `{base_url}/v1/messages`, `x-api-key` auth. Learns nothing."""

    name = "anthropic"

    def __init__(self, job: Job, base_url: str, *, api_key: str | None, headers: Mapping[str, str]):
        self.job = job
        self.root = messages_root(base_url)
        self.url = self.root + "/v1/messages"
        self.headers = {"Content-Type": "application/json", "anthropic-version": job.endpoint.anthropic_version,
                        **headers}
        if api_key:
            self.headers["x-api-key"] = api_key
        self._secrets = (api_key, *headers.values())  # redacted from whatever a server sends back
        keep_secret(*self._secrets)
        self._image_formula = cost.image_formula(job.endpoint.model)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled in another process: that process must redact this run's secrets too."""
        self.__dict__.update(state)
        keep_secret(*self._secrets)

    def build_request(self, image: Encoded, *, stream: bool) -> HttpRequest:
        return HttpRequest(self.url, self.headers, build_body(self.job, image, stream=stream), stream)

    def body(self, image: Encoded, *, stream: bool) -> dict[str, Any]:
        """The Messages body for `image` (a batch request's `params` too)."""
        return build_body(self.job, image, stream=stream)

    def parse_body(self, body: bytes, headers: Mapping[str, str]) -> ChatResult:
        return parse_message(body, request_id_of(headers))

    def stream_parser(self, headers: Mapping[str, str]) -> _StreamParser:
        return _StreamParser(headers)

    def classify(self, status: int, headers: Mapping[str, str], body: bytes) -> CaptionError | None:
        return classify_response(status, headers, body)

    def rate_info(self, headers: Mapping[str, str]) -> RateInfo | None:
        return parse_rate_info(headers)

    def request_tokens(self, image: Encoded) -> int:
        """Prompt estimate + max_tokens: the input tokens Anthropic estimates at the start and the
        output it reserves from max_tokens (https://docs.anthropic.com/en/api/rate-limits)."""
        prompt = self.job.prompt
        tokens = cost.image_tokens(self._image_formula, image.sent_width, image.sent_height, self.job.image.detail)
        return tokens + cost.text_tokens((prompt.system or "") + prompt.user) + prompt.max_tokens

    def image_settings(self, settings: ImageSettings, encoded: Encoded | None = None) -> ImageSettings:
        """Within Anthropic's per-image limits: max_side at most 8000 px, and, for an encoding whose
        base64 is over 5 MB, a max_side shrunk by the square root of the overshoot (area ∝ bytes)."""
        if encoded is None:
            return dataclasses.replace(settings, max_side=min(settings.max_side, MAX_IMAGE_SIDE_PX))
        size = base64_size(encoded.sent_bytes)
        long_side = max(encoded.sent_width, encoded.sent_height)
        if size <= MAX_IMAGE_BASE64_BYTES or long_side <= MIN_SHRINK_SIDE_PX:
            return settings
        side = int(long_side * math.sqrt(MAX_IMAGE_BASE64_BYTES / size) * SHRINK_MARGIN)
        side = max(MIN_SHRINK_SIDE_PX, min(side, long_side - 1))
        log.debug("image is %d bytes as base64 (over 5 MB): encoding again at max_side %d", size, side)
        return dataclasses.replace(settings, max_side=side)

    def learn(self, err: CaptionError, sent: HttpRequest | None = None) -> bool:
        return False  # nothing Anthropic refuses is a setting to switch (max_tokens is always required)

    def learned(self) -> dict[str, str]:
        return {}

    def adopt(self, learned: Mapping[str, str]) -> None:
        return None


def base64_size(raw_bytes: int) -> int:
    """Length of the base64 text of `raw_bytes` bytes (padded, RFC 4648)."""
    return 4 * math.ceil(raw_bytes / 3)


def build_body(job: Job, image: Encoded, *, stream: bool) -> dict[str, Any]:
    """The Messages body for one image: the image block before the text (Vision docs advise
    image-then-text), `max_tokens` always (it is required), optional settings only when set."""
    prompt = job.prompt
    text = prompt.user if prompt.language is None else f"{prompt.user}\nAnswer in {prompt.language}."
    if job.structured.format == "json_object":
        text += "\nAnswer with one JSON object and nothing else."
    source = ({"type": "url", "url": image.url} if image.url is not None  # [input] send = "url" (Vision docs)
              else {"type": "base64", "media_type": image.mime, "data": image.data_url().split(",", 1)[1]})
    content = [{"type": "image", "source": source}, {"type": "text", "text": text}]
    body: dict[str, Any] = {"model": job.endpoint.model, "max_tokens": prompt.max_tokens,
                            "messages": [{"role": "user", "content": content}]}
    if prompt.system:
        body["system"] = _system(prompt.system, cache=prompt.cache)
    if prompt.temperature is not None:
        body["temperature"] = prompt.temperature
    if job.structured.format == "json_schema":
        body["output_config"] = {"format": {"type": "json_schema", "schema": job.structured.schema}}
    if stream:
        body["stream"] = True
    body.update(job.extra)
    return body


def _system(text: str, *, cache: bool) -> str | list[dict[str, Any]]:
    """The `system` field: the text as it is, or with `cache` one text block marked for the 5-minute
    cache (Prompt caching docs: a breakpoint caches everything before it and the block itself: tools, then
    system; the image and the user text come after it and vary)."""
    if not cache:
        return text
    return [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]


MAX_TOKEN_COUNT = 2**31 - 1  # the out folder's token columns are int32


def parse_usage(raw: Any, output_tokens: Any = None) -> Usage | None:
    """A `Usage` from Anthropic's `usage`; None when absent or not believable.

    prompt_tokens = input_tokens + cache_read_input_tokens + cache_creation_input_tokens (Anthropic's
    input_tokens leaves both out; OpenAI's and Gemini's prompt counts include cached tokens, so the
    column means the same for every protocol), cached_tokens = cache_read_input_tokens,
    cache_write_tokens = cache_creation_input_tokens, completion_tokens = output_tokens (`output_tokens`
    overrides it: a stream's message_delta carries the final count).
    """
    if not isinstance(raw, dict) or "input_tokens" not in raw:
        return None
    counts = [raw.get("input_tokens"), raw.get("cache_read_input_tokens") or 0,
              raw.get("cache_creation_input_tokens") or 0,
              output_tokens if output_tokens is not None else raw.get("output_tokens", 0)]
    if any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= MAX_TOKEN_COUNT for c in counts):
        log.debug("usage not believable, estimated instead: %.200r", raw)
        return None
    fresh, read, written, output = counts
    prompt = fresh + read + written
    if prompt + output > MAX_TOKEN_COUNT:
        return None
    return Usage(prompt_tokens=prompt, completion_tokens=output, total_tokens=prompt + output,
                 cached_tokens=read if "cache_read_input_tokens" in raw else None,
                 cache_write_tokens=written if "cache_creation_input_tokens" in raw else None)


def _checked_result(text: str, model: str, stop_reason: str | None, usage: Usage | None,
                    request_id: str | None, usage_rejected: bool = False) -> ChatResult:
    """The answer as a ChatResult, if it is one; no stop_reason or no text is a failure."""
    if stop_reason is None:
        raise TransientError("answer ended without a stop_reason", status=200, request_id=request_id)
    if stop_reason == "refusal":  # https://docs.anthropic.com/en/docs/test-and-evaluate/strengthen-guardrails/handle-streaming-refusals
        raise BadOutputError("the model refused (stop_reason refusal)", retryable=False, usage=usage,
                             finish_reason=stop_reason, status=200, request_id=request_id)
    finish = STOP_REASONS.get(stop_reason, stop_reason)
    if not text.strip() and finish == "length":
        raise BadOutputError("empty caption, stop_reason=max_tokens", retryable=False, usage=usage,
                             finish_reason=finish, status=200, request_id=request_id)
    if not text.strip():
        raise TransientError(f"empty caption, stop_reason={stop_reason}", status=200, request_id=request_id)
    return ChatResult(text=text.strip(), model=model, finish_reason=finish, usage=usage, request_id=request_id,
                      usage_rejected=usage_rejected and usage is None)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def parse_message(body: bytes | dict, request_id: str | None) -> ChatResult:
    """Parse a whole `message` object (bytes or already decoded); raises TransientError/BadOutputError."""
    data = loads_or_none(body) if not isinstance(body, dict) else body
    if not isinstance(data, dict) or data.get("type") != "message" or not isinstance(data.get("content"), list):
        raise TransientError("answer is not a Messages message (malformed JSON or no content)", status=200,
                             request_id=request_id)
    text = "".join(b.get("text", "") for b in data["content"]
                   if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str))
    usage = parse_usage(data.get("usage"))
    return _checked_result(text, _text(data.get("model")) or "", _text(data.get("stop_reason")), usage,
                           request_id or _text(data.get("id")),
                           usage_rejected=isinstance(data.get("usage"), dict) and usage is None)


@dataclass(slots=True)
class _StreamState:
    """What a Messages event stream has told us so far."""

    parts: list[str] = field(default_factory=list)
    model: str = ""
    message_id: str | None = None
    start_usage: Any = None  # message_start's usage: input tokens (and a first output count)
    output_tokens: Any = None  # message_delta's cumulative output count
    stop_reason: str | None = None
    started: bool = False
    stopped: bool = False

    def take(self, event: SSEEvent, headers: Mapping[str, str]) -> None:
        """Fold one event in; raise the typed error an `error` event means."""
        try:
            data = json.loads(event.data)
        except ValueError:
            raise TransientError("malformed JSON in the event stream", status=200) from None
        kind = data.get("type") if isinstance(data, dict) else None
        if event.event == "error" or kind == "error":
            raise classify_response(200, headers, data if isinstance(data, dict) else {})
        if kind == "message_start" and isinstance(data.get("message"), dict):
            message = data["message"]
            self.started = True
            self.model = _text(message.get("model")) or self.model
            self.message_id = _text(message.get("id"))
            self.start_usage = message.get("usage")
        elif kind == "content_block_delta" and isinstance(data.get("delta"), dict):
            delta = data["delta"]
            if delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
                self.parts.append(delta["text"])
        elif kind == "message_delta":
            delta = data.get("delta") if isinstance(data.get("delta"), dict) else {}
            self.stop_reason = _text(delta.get("stop_reason")) or self.stop_reason
            usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
            self.output_tokens = usage.get("output_tokens", self.output_tokens)
        elif kind == "message_stop":
            self.stopped = True
        # ping, content_block_start/stop and event types added later carry nothing we need

    def result(self, request_id: str | None) -> ChatResult:
        if not self.started or not self.stopped:
            raise TransientError("stream ended without message_start … message_stop", status=200,
                                 request_id=request_id or self.message_id)
        usage = parse_usage(self.start_usage, self.output_tokens)
        return _checked_result("".join(self.parts), self.model, self.stop_reason, usage,
                               request_id or self.message_id,
                               usage_rejected=isinstance(self.start_usage, dict) and usage is None)


class _StreamParser:
    """`StreamParser` for Messages events (SSE with `event:` names), ending in message_stop."""

    def __init__(self, headers: Mapping[str, str]):
        self._headers = headers
        self._decoder = SSEDecoder()
        self._state = _StreamState()

    def feed(self, chunk: bytes) -> None:
        for event in self._decoder.feed(chunk):
            self._state.take(event, self._headers)

    def result(self) -> ChatResult:
        for event in self._decoder.finish():
            self._state.take(event, self._headers)
        return self._state.result(request_id_of(self._headers))
