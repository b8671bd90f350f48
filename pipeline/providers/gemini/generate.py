"""providers/gemini/generate.py: the Gemini API's generateContent protocol, as a `Provider`.

Owns the request body (`contents[].parts[]` with the image as `inline_data` before the text,
`systemInstruction`, `generationConfig`), the per-image limit (`image_settings`), and the parsing of
answers, whole or streamed (`:streamGenerateContent?alt=sse`), into `ChatResult`/`Usage`. JSON stays a
dict only inside this package. Pure: the engine's transport does the HTTP; nothing here retries,
sleeps or counts.

References:
- generateContent / streamGenerateContent, GenerateContentResponse, `finishReason`, `usageMetadata`,
  `promptFeedback.blockReason`: https://ai.google.dev/api/generate-content
- Image understanding (inline_data {mime_type, data}; inline data only while the whole request is
  under 20 MB): https://ai.google.dev/gemini-api/docs/image-understanding
- Structured output (`responseMimeType` + `responseJsonSchema`):
  https://ai.google.dev/gemini-api/docs/structured-output
- Media resolution (`generationConfig.mediaResolution`): https://ai.google.dev/gemini-api/docs/media-resolution
- Token counting (usageMetadata fields; images 258 tokens a 768 px tile):
  https://ai.google.dev/gemini-api/docs/tokens
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
from .errors import classify_response, request_id_of

__all__ = ["GeminiProvider", "BLOCKED_REASONS", "MAX_INLINE_BASE64_BYTES", "api_root", "build_body",
           "parse_response", "parse_usage"]

log = logging.getLogger(__name__)

MAX_INLINE_BASE64_BYTES = 19 * 2**20
"""The image's base64 at most this: inline data needs the whole request under 20 MB (Image
understanding docs), and the prompt and JSON around it need a little room."""
MIN_SHRINK_SIDE_PX = 256
SHRINK_MARGIN = 0.95
FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length"}
"""Gemini's finishReason → the finish_reason column's words; others are kept in lower case."""
BLOCKED_REASONS = frozenset({"SAFETY", "PROHIBITED_CONTENT", "RECITATION", "BLOCKLIST", "SPII", "IMAGE_SAFETY"})
"""finishReasons (and promptFeedback.blockReasons) that mean the answer was withheld: an error row,
not asked again (the same image and prompt are blocked the same way)."""
MEDIA_RESOLUTION = {"low": "MEDIA_RESOLUTION_LOW", "high": "MEDIA_RESOLUTION_HIGH"}  # "auto": not sent
MAX_TOKEN_COUNT = 2**31 - 1  # the out folder's token columns are int32


def api_root(base_url: str) -> str:
    """`base_url` without a trailing `/v1beta` or `/v1`: Gemini's is
    "https://generativelanguage.googleapis.com", while the bundled endpoint is given as ".../v1"."""
    root = base_url.rstrip("/")
    for suffix in ("/v1beta", "/v1"):
        if root.endswith(suffix):
            return root[: -len(suffix)]
    return root


class GeminiProvider:
    """The Gemini API for one run: `{root}/v1beta/models/{model}:generateContent`, `x-goog-api-key`."""

    name = "gemini"

    def __init__(self, job: Job, base_url: str, *, api_key: str | None, headers: Mapping[str, str]):
        self.job = job
        self.root = api_root(base_url)
        self.model_url = f"{self.root}/v1beta/models/{job.endpoint.model}"
        self.headers = {"Content-Type": "application/json", **headers}
        if api_key:
            self.headers["x-goog-api-key"] = api_key
        self._secrets = (api_key, *headers.values())
        keep_secret(*self._secrets)
        self._image_formula = cost.image_formula(job.endpoint.model)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled in another process: that process must redact this run's secrets too."""
        self.__dict__.update(state)
        keep_secret(*self._secrets)

    def build_request(self, image: Encoded, *, stream: bool) -> HttpRequest:
        url = self.model_url + (":streamGenerateContent?alt=sse" if stream else ":generateContent")
        return HttpRequest(url, self.headers, build_body(self.job, image), stream)

    def body(self, image: Encoded, *, stream: bool = False) -> dict[str, Any]:
        """The GenerateContentRequest for `image` (a batch line's `request` too); `stream` is in the URL."""
        return build_body(self.job, image)

    def parse_body(self, body: bytes, headers: Mapping[str, str]) -> ChatResult:
        return parse_response(body, request_id_of(headers))

    def stream_parser(self, headers: Mapping[str, str]) -> _StreamParser:
        return _StreamParser(headers)

    def classify(self, status: int, headers: Mapping[str, str], body: bytes) -> CaptionError | None:
        return classify_response(status, headers, body)

    def rate_info(self, headers: Mapping[str, str]) -> RateInfo | None:
        return None  # Gemini sends no rate-limit headers; its 429 bodies say what was hit (errors.py)

    def request_tokens(self, image: Encoded) -> int:
        """Image tokens (258 a 768 px tile) + the prompt's text + maxOutputTokens."""
        prompt = self.job.prompt
        tokens = cost.image_tokens(self._image_formula, image.sent_width, image.sent_height, self.job.image.detail)
        return tokens + cost.text_tokens((prompt.system or "") + prompt.user) + prompt.max_tokens

    def image_settings(self, settings: ImageSettings, encoded: Encoded | None = None) -> ImageSettings:
        """Within the inline-data limit: an encoding whose base64 is over MAX_INLINE_BASE64_BYTES is
        made again at a max_side shrunk by the square root of the overshoot (area ∝ bytes)."""
        if encoded is None:
            return settings
        size = 4 * math.ceil(encoded.sent_bytes / 3)
        long_side = max(encoded.sent_width, encoded.sent_height)
        if size <= MAX_INLINE_BASE64_BYTES or long_side <= MIN_SHRINK_SIDE_PX:
            return settings
        side = int(long_side * math.sqrt(MAX_INLINE_BASE64_BYTES / size) * SHRINK_MARGIN)
        side = max(MIN_SHRINK_SIDE_PX, min(side, long_side - 1))
        log.debug("image is %d bytes as base64 (over the inline limit): encoding again at max_side %d", size, side)
        return dataclasses.replace(settings, max_side=side)

    def learn(self, err: CaptionError, sent: HttpRequest | None = None) -> bool:
        return False

    def learned(self) -> dict[str, str]:
        return {}

    def adopt(self, learned: Mapping[str, str]) -> None:
        return None


def build_body(job: Job, image: Encoded) -> dict[str, Any]:
    """The GenerateContentRequest for one image: the image part before the text (Image understanding
    docs), `systemInstruction` and the optional generation settings only when set."""
    prompt = job.prompt
    text = prompt.user if prompt.language is None else f"{prompt.user}\nAnswer in {prompt.language}."
    parts = [{"inline_data": {"mime_type": image.mime, "data": image.data_url().split(",", 1)[1]}}, {"text": text}]
    config: dict[str, Any] = {"maxOutputTokens": prompt.max_tokens}
    if prompt.temperature is not None:
        config["temperature"] = prompt.temperature
    if job.structured.format in ("json_schema", "json_object"):
        config["responseMimeType"] = "application/json"
    if job.structured.format == "json_schema":
        config["responseJsonSchema"] = job.structured.schema
    if job.image.detail in MEDIA_RESOLUTION:
        config["mediaResolution"] = MEDIA_RESOLUTION[job.image.detail]
    body: dict[str, Any] = {"contents": [{"role": "user", "parts": parts}], "generationConfig": config}
    if prompt.system:
        body["systemInstruction"] = {"parts": [{"text": prompt.system}]}
    body.update(job.extra)
    return body


def parse_usage(raw: Any) -> Usage | None:
    """A `Usage` from `usageMetadata`; None when absent or not believable.

    prompt_tokens = promptTokenCount (it includes cachedContentTokenCount), cached_tokens =
    cachedContentTokenCount, reasoning_tokens = thoughtsTokenCount, completion_tokens =
    candidatesTokenCount + thoughtsTokenCount (thinking is billed as output).
    """
    if not isinstance(raw, dict) or "promptTokenCount" not in raw:
        return None
    counts = [raw.get("promptTokenCount"), raw.get("candidatesTokenCount", 0), raw.get("thoughtsTokenCount", 0),
              raw.get("cachedContentTokenCount", 0)]
    if any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= MAX_TOKEN_COUNT for c in counts):
        log.debug("usage not believable, estimated instead: %.200r", raw)
        return None
    prompt, candidates, thoughts, cached = counts
    completion = candidates + thoughts
    if prompt + completion > MAX_TOKEN_COUNT or cached > prompt:
        return None
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 cached_tokens=cached if "cachedContentTokenCount" in raw else None,
                 reasoning_tokens=thoughts if "thoughtsTokenCount" in raw else None)


@dataclass(slots=True)
class _Answer:
    """What a GenerateContentResponse (or the chunks of a stream so far) says."""

    parts: list[str] = field(default_factory=list)
    model: str = ""
    response_id: str | None = None
    finish: str | None = None
    usage: Any = None
    block_reason: str | None = None

    def take(self, data: Any) -> None:
        """Fold one GenerateContentResponse in (a stream sends several; usage is cumulative)."""
        if not isinstance(data, dict):
            raise TransientError("answer is not a GenerateContentResponse", status=200)
        self.model = _text(data.get("modelVersion")) or self.model
        self.response_id = _text(data.get("responseId")) or self.response_id
        if isinstance(data.get("usageMetadata"), dict):
            self.usage = data["usageMetadata"]
        feedback = data.get("promptFeedback")
        if isinstance(feedback, dict) and _text(feedback.get("blockReason")):
            self.block_reason = feedback["blockReason"]
        candidates = data.get("candidates")
        first = candidates[0] if isinstance(candidates, list) and candidates and isinstance(candidates[0], dict) else {}
        content = first.get("content") if isinstance(first.get("content"), dict) else {}
        for part in content.get("parts") or []:
            if isinstance(part, dict) and isinstance(part.get("text"), str) and not part.get("thought"):
                self.parts.append(part["text"])
        self.finish = _text(first.get("finishReason")) or self.finish

    def result(self, request_id: str | None) -> ChatResult:
        """The answer as a ChatResult, if it is one; blocked answers are error rows, not retried."""
        usage = parse_usage(self.usage)
        rid = request_id or self.response_id
        rejected = isinstance(self.usage, dict) and usage is None
        text = "".join(self.parts)
        if self.block_reason is not None:
            raise BadOutputError(f"the prompt was blocked (promptFeedback.blockReason {self.block_reason})",
                                 retryable=False, usage=usage, finish_reason=self.block_reason.lower(),
                                 status=200, request_id=rid)
        if self.finish is None:
            raise TransientError("answer ended without a finishReason", status=200, request_id=rid)
        if self.finish in BLOCKED_REASONS:
            raise BadOutputError(f"the answer was withheld (finishReason {self.finish})", retryable=False,
                                 usage=usage, finish_reason=self.finish.lower(), status=200, request_id=rid)
        finish = FINISH_REASONS.get(self.finish, self.finish.lower())
        if not text.strip() and finish == "length":
            raise BadOutputError("empty caption, finishReason=MAX_TOKENS", retryable=False, usage=usage,
                                 finish_reason=finish, status=200, request_id=rid)
        if not text.strip():
            raise TransientError(f"empty caption, finishReason={self.finish}", status=200, request_id=rid)
        return ChatResult(text=text.strip(), model=self.model, finish_reason=finish, usage=usage, request_id=rid,
                          usage_rejected=rejected)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def parse_response(body: bytes | dict, request_id: str | None) -> ChatResult:
    """Parse a whole GenerateContentResponse (bytes or decoded); raises TransientError/BadOutputError."""
    data = loads_or_none(body) if not isinstance(body, dict) else body
    if not isinstance(data, dict) or not ("candidates" in data or "promptFeedback" in data):
        raise TransientError("answer is not a GenerateContentResponse (malformed JSON or no candidates)",
                             status=200, request_id=request_id)
    answer = _Answer()
    answer.take(data)
    return answer.result(request_id)


class _StreamParser:
    """`StreamParser` for `:streamGenerateContent?alt=sse`: each event's data is one
    GenerateContentResponse chunk; the last carries finishReason and the final usageMetadata."""

    def __init__(self, headers: Mapping[str, str]):
        self._headers = headers
        self._decoder = SSEDecoder()
        self._answer = _Answer()
        self._chunks = 0

    def feed(self, chunk: bytes) -> None:
        for event in self._decoder.feed(chunk):
            self._take(event)

    def _take(self, event: SSEEvent) -> None:
        try:
            data = json.loads(event.data)
        except ValueError:
            raise TransientError("malformed JSON in the event stream", status=200) from None
        error = classify_response(200, self._headers, data if isinstance(data, (dict, list)) else {})
        if error is not None:
            raise error
        self._chunks += 1
        self._answer.take(data)

    def result(self) -> ChatResult:
        for event in self._decoder.finish():
            self._take(event)
        if not self._chunks:
            raise TransientError("stream ended without a GenerateContentResponse", status=200,
                                 request_id=request_id_of(self._headers))
        return self._answer.result(request_id_of(self._headers))
