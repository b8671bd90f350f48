"""providers/openai/chat.py: the OpenAI chat-completions protocol, as a `Provider`.

Owns the request body (system prompt, user text, image part, generation settings, structured
output), and the parsing of answers, whole or streamed, into `ChatResult`/`Usage`. JSON stays a dict
only inside this package. Pure: the engine's transport does the HTTP; nothing here retries,
sleeps or counts. Error messages carry the server's words, never our headers (the API key lives
there) or the payload (the image lives there).

References:
- Chat completions, streaming chunks, `stream_options.include_usage`:
  https://platform.openai.com/docs/api-reference/chat
- Structured outputs (`response_format`, refusals): https://platform.openai.com/docs/guides/structured-outputs
- Reasoning models (`max_completion_tokens`): https://platform.openai.com/docs/guides/reasoning
- `service_tier` (request: "auto", "default", "flex"; the answer says the tier it was served at) and
  flex processing: https://platform.openai.com/docs/api-reference/chat and
  https://platform.openai.com/docs/guides/flex-processing
- Prompt caching (automatic for prompts of 1,024 tokens or more, reads in `cached_tokens`;
  `prompt_cache_key` routes requests sharing a prefix together): https://platform.openai.com/docs/guides/prompt-caching
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ... import cost
from ...errors import BadOutputError, BadRequestError, CaptionError, TransientError
from ...job import ImageSettings, Job
from ...records import ChatResult, Encoded, RateInfo, Usage
from ...redaction import keep_secret
from ..base import HttpRequest
from ..sse import SSEDecoder, SSEEvent
from .errors import (
    FlexUnavailableError,
    classify_response,
    describe_body,
    loads_or_none,
    parse_rate_info,
    request_id_of,
    unsupported_parameter,
    wants_max_completion_tokens,
)

__all__ = ["OpenAIProvider", "build_payload", "parse_completion", "parse_usage"]

log = logging.getLogger(__name__)

TOKEN_PARAM = "token_param"  # learned: which name max_tokens goes by
DROPPED = "dropped"  # learned: the sampling parameters the server refuses
DROPPABLE = frozenset({"temperature", "top_p", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
                       "top_logprobs", "reasoning_effort", "prompt_cache_key"})
"""Parameters the job may set that change how an answer is sampled, not what is asked: when the server
names one as unsupported (reasoning models refuse a non-default temperature: "Unsupported value:
'temperature' does not support 0.2 with this model", https://platform.openai.com/docs/guides/reasoning),
captioning without it beats failing every image. `prompt_cache_key` ([prompt] cache) only helps the
cache, so a server that does not know it (a relay, vLLM) is not sent it again."""


class OpenAIProvider:
    """OpenAI chat completions for one run: `{base_url}/chat/completions`, Bearer auth.

    Learns two things for the whole run from the server's own 400s, instead of failing every image:
    which token parameter it wants (reasoning models refuse `max_tokens` and ask for
    `max_completion_tokens`), and which sampling parameters it refuses ("Unsupported parameter:
    'temperature' ...", "Unsupported value: 'temperature' does not support 0.2 ..."): those are
    dropped. Each is switched once and logged, and the refused request is sent again at once.

    With `flex_fallback = "auto"`, a flex request refused for want of capacity (429 "Resource
    Unavailable") is sent again at once at the default tier: `learn` says so and the very next
    `build_request`, which the Captioner makes without an await in between, leaves `service_tier` out.
    """

    name = "openai"

    def __init__(self, job: Job, base_url: str, *, api_key: str | None, headers: Mapping[str, str]):
        self.job = job
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Content-Type": "application/json", **headers}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._secrets = (api_key, *headers.values())  # redacted from whatever a server sends back
        keep_secret(*self._secrets)
        self.token_param = "max_tokens"
        self.streams_usage = False  # this run's server has sent a usage chunk at the end of a stream
        self.dropped: tuple[str, ...] = ()  # sampling parameters the server refused, never sent again
        self._default_tier_next = False  # learn() owes the refused flex request a resend at the default tier
        self._image_formula = cost.image_formula(job.endpoint.model)  # for the TPM count before sending

    def build_request(self, image: Encoded, *, stream: bool) -> HttpRequest:
        body = self.body(image, stream=stream)
        if self._default_tier_next:  # the resend of a flex request flex had no room for
            self._default_tier_next = False
            body.pop("service_tier", None)
        return HttpRequest(self.url, self._headers, body, stream)

    def body(self, image: Encoded, *, stream: bool) -> dict[str, Any]:
        """The request body as the server wants it now (what `learn` learned applied)."""
        body = build_payload(self.job, image.url or image.data_url(), stream=stream, token_param=self.token_param)
        for name in self.dropped:
            body.pop(name, None)
        return body

    def parse_body(self, body: bytes, headers: Mapping[str, str]) -> ChatResult:
        return parse_completion(body, _request_id(headers))

    def stream_parser(self, headers: Mapping[str, str]) -> _StreamParser:
        return _StreamParser(headers, self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled in another process: that process must redact this run's secrets too."""
        self.__dict__.update(state)
        keep_secret(*self._secrets)

    def classify(self, status: int, headers: Mapping[str, str], body: bytes) -> CaptionError | None:
        return classify_response(status, headers, body)

    def rate_info(self, headers: Mapping[str, str]) -> RateInfo | None:
        return parse_rate_info(headers)

    def request_tokens(self, image: Encoded) -> int:
        """Prompt estimate + max_tokens: what OpenAI counts against TPM before it answers
        (https://platform.openai.com/docs/guides/rate-limits)."""
        prompt = self.job.prompt
        tokens = cost.image_tokens(self._image_formula, image.sent_width, image.sent_height, self.job.image.detail)
        return tokens + cost.text_tokens((prompt.system or "") + prompt.user) + prompt.max_tokens

    def image_settings(self, settings: ImageSettings, encoded: Encoded | None = None) -> ImageSettings:
        """The job's settings as they are: OpenAI shrinks what it is sent itself."""
        return settings

    def learn(self, err: CaptionError, sent: HttpRequest | None = None) -> bool:
        if isinstance(err, FlexUnavailableError):
            return self._fall_back(sent)
        if not isinstance(err, BadRequestError):
            return False
        if wants_max_completion_tokens(err):
            if self.token_param == "max_tokens":
                self.token_param = "max_completion_tokens"
                log.warning("server rejects max_tokens for %s; sending max_completion_tokens from now on",
                            self.job.endpoint.model)
            return sent is None or "max_tokens" in sent.body  # the refused request used the old name
        name = unsupported_parameter(err)
        if name is None or name not in DROPPABLE:
            return False
        if name not in self.dropped:
            self.dropped += (name,)
            log.warning("server rejects %s for %s; not sending it from now on", name, self.job.endpoint.model)
        return sent is None or name in sent.body

    def _fall_back(self, sent: HttpRequest | None) -> bool:
        """True when the flex request `sent` is to go again at once at the default tier (flex_fallback)."""
        if self.job.endpoint.flex_fallback != "auto" or sent is None or sent.body.get("service_tier") != "flex":
            return False
        log.debug("flex has no capacity for this request (429 Resource Unavailable); resending at the default tier")
        self._default_tier_next = True
        return True

    def learned(self) -> dict[str, str]:
        found = {TOKEN_PARAM: self.token_param} if self.token_param != "max_tokens" else {}
        if self.dropped:
            found[DROPPED] = ",".join(self.dropped)
        return found

    def adopt(self, learned: Mapping[str, str]) -> None:
        if learned.get(TOKEN_PARAM) in ("max_tokens", "max_completion_tokens"):
            self.token_param = learned[TOKEN_PARAM]
        names = (learned.get(DROPPED) or "").split(",")
        self.dropped = tuple(name for name in names if name in DROPPABLE)


def _request_id(headers: Mapping[str, str]) -> str | None:
    return request_id_of(headers)


def build_payload(job: Job, data_url: str, *, stream: bool, token_param: str = "max_tokens") -> dict[str, Any]:
    """Return the chat completions body for one image: system prompt, user text, image part.

    `temperature` and `reasoning_effort` go only when the job sets them (reasoning models reject
    a non-default temperature). `[request.extra]` is merged last.
    """
    prompt = job.prompt
    messages: list[dict[str, Any]] = []
    if prompt.system:
        messages.append({"role": "system", "content": prompt.system})
    image = {"url": data_url, "detail": job.image.detail}
    text = prompt.user if prompt.language is None else f"{prompt.user}\nAnswer in {prompt.language}."
    content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": image}]
    messages.append({"role": "user", "content": content})
    payload: dict[str, Any] = {"model": job.endpoint.model, "messages": messages, token_param: prompt.max_tokens}
    if prompt.temperature is not None:
        payload["temperature"] = prompt.temperature
    if prompt.reasoning_effort is not None:
        payload["reasoning_effort"] = prompt.reasoning_effort
    if (response_format := _response_format(job)) is not None:
        payload["response_format"] = response_format
    if job.endpoint.service_tier is not None:
        payload["service_tier"] = job.endpoint.service_tier
    if prompt.cache:
        payload["prompt_cache_key"] = prompt_cache_key(job)
    if stream:
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
    payload.update(job.extra)
    return payload


def prompt_cache_key(job: Job) -> str:
    """The `prompt_cache_key` of a job with `[prompt] cache`: one per model and prompt, so every request
    of the job (and of a resumed run) shares it. OpenAI caches prefixes of 1,024 tokens or more by
    itself; the key only helps requests with the same prefix reach the same cache (prompt caching guide)."""
    prompt = job.prompt
    text = json.dumps([job.endpoint.model, prompt.system, prompt.user, prompt.language], ensure_ascii=False)
    return "caption-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _response_format(job: Job) -> dict[str, Any] | None:
    """`response_format` for structured jobs, per https://platform.openai.com/docs/guides/structured-outputs."""
    structured = job.structured
    if structured.format == "json_schema":
        return {"type": "json_schema",
                "json_schema": {"name": structured.name, "schema": structured.schema, "strict": structured.strict}}
    if structured.format == "json_object":
        return {"type": "json_object"}
    return None


def parse_usage(raw: Any) -> Usage | None:
    """Return a `Usage` from a response's `usage` object, or None when there is none or it is not believable.

    Every count must be a whole number from 0 to MAX_TOKEN_COUNT (what the out folder's int32 columns
    hold): a negative, fractional, boolean, NaN or absurd count (10**15) means the server's figures
    cannot be trusted, so the whole usage counts as not reported (the row estimates it and says so).
    """
    if not isinstance(raw, dict) or "prompt_tokens" not in raw:
        return None
    prompt_details = raw.get("prompt_tokens_details") or {}
    completion_details = raw.get("completion_tokens_details") or {}
    counts = {
        "prompt_tokens": _count(raw.get("prompt_tokens")),
        "completion_tokens": _count(raw.get("completion_tokens", 0)),
        "cached_tokens": _count(prompt_details.get("cached_tokens") if isinstance(prompt_details, dict) else None,
                                optional=True),
        "reasoning_tokens": _count(
            completion_details.get("reasoning_tokens") if isinstance(completion_details, dict) else None,
            optional=True),
    }
    total = raw.get("total_tokens")
    counts["total_tokens"] = _count(total) if total is not None else \
        _sum_or_bad(counts["prompt_tokens"], counts["completion_tokens"])
    if any(value is _BAD for value in counts.values()):
        log.debug("usage not believable, estimated instead: %.200r", raw)
        return None
    return Usage(**counts)


MAX_TOKEN_COUNT = 2**31 - 1  # the out folder's token columns are int32
_BAD = object()  # a count that is not a count


def _count(value: Any, *, optional: bool = False) -> Any:
    """`value` as a token count, None when `optional` and absent, else _BAD (see `parse_usage`)."""
    if value is None and optional:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKEN_COUNT:
        return _BAD
    return value


def _sum_or_bad(*values: Any) -> Any:
    if any(v is _BAD or v is None for v in values) or sum(values) > MAX_TOKEN_COUNT:
        return _BAD
    return sum(values)


def _rejected(raw: Any) -> bool:
    """True when `raw` is a usage object whose counts `parse_usage` does not believe."""
    return isinstance(raw, dict) and "prompt_tokens" in raw and parse_usage(raw) is None


def _text(value: Any) -> str | None:
    """A string the server sent where a string belongs (an id, a model name); None for anything else."""
    return value if isinstance(value, str) else None


def _message_text(content: Any) -> str:
    """Text of a message's content: a string, or a list of parts of which the text ones count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _checked_result(text: str, model: str, finish: str | None, usage: Usage | None, request_id: str | None,
                    refusal: str = "", usage_rejected: bool = False, service_tier: str | None = None) -> ChatResult:
    """The answer as a ChatResult, if it is one: no finish_reason or no text is a failure.

    Gateways such as one-api/new-api drop an upstream error and still end cleanly, so a clean end
    without a finish_reason is not proof of success: it is retried as transient.
    """
    if finish is None:
        raise TransientError("answer ended without a finish_reason (a gateway may have dropped an upstream error)",
                             status=200, request_id=request_id)
    if refusal.strip() and not text.strip():  # structured outputs: https://platform.openai.com/docs/guides/structured-outputs#refusals
        raise BadOutputError(f"the model refused: {refusal.strip()}", retryable=False, usage=usage,
                             finish_reason=finish, status=200, request_id=request_id)
    if not text.strip() and finish == "length":
        raise BadOutputError("empty caption, finish_reason=length (max_tokens too small for a reasoning model?)",
                             retryable=False, usage=usage, finish_reason=finish, status=200, request_id=request_id)
    if not text.strip():  # a gateway whose upstream dropped before the first token still says "stop"
        raise TransientError(f"empty caption, finish_reason={finish} (an upstream may have dropped the answer)",
                             status=200, request_id=request_id)
    return ChatResult(text=text.strip(), model=model, finish_reason=finish, usage=usage, request_id=request_id,
                      usage_rejected=usage_rejected and usage is None, service_tier=service_tier)


_TIER = re.compile(r"[a-z0-9_-]{1,32}")


def _tier(value: Any) -> str | None:
    """The answer's `service_tier` ("default", "flex", ...) when it looks like one; None otherwise."""
    return value if isinstance(value, str) and _TIER.fullmatch(value) else None


def parse_completion(body: bytes, request_id: str | None) -> ChatResult:
    """Parse a non-streaming `chat.completion` body; raises TransientError/BadOutputError."""
    data = loads_or_none(body)
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        what = "JSON without choices" if data is not None else describe_body(body)
        raise TransientError(f"answer is not a chat completion ({what})", status=200, request_id=request_id)
    choice = choices[0]
    message = choice.get("message") or {}
    message = message if isinstance(message, dict) else {}
    return _checked_result(
        _message_text(message.get("content")),
        _text(data.get("model")) or "",
        _text(choice.get("finish_reason")),
        parse_usage(data.get("usage")),
        request_id or _text(data.get("id")),
        refusal=message.get("refusal") if isinstance(message.get("refusal"), str) else "",
        usage_rejected=_rejected(data.get("usage")),
        service_tier=_tier(data.get("service_tier")),
    )


@dataclass(slots=True)
class _StreamState:
    """What a chat.completion.chunk stream has told us so far."""

    parts: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    model: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    done: bool = False
    chunk_id: str | None = None
    usage_chunk: bool = False  # a chunk carried `usage` (believable or not)
    usage_rejected: bool = False  # one carried counts not worth believing
    service_tier: str | None = None  # the tier the chunks say the answer is served at

    def take(self, event: SSEEvent, headers: Mapping[str, str]) -> None:
        """Fold one event in; raise the typed error an error event means."""
        if event.data.strip() == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(event.data)
        except ValueError:
            raise TransientError("malformed JSON in the event stream", status=200) from None
        if not isinstance(chunk, dict):
            raise TransientError("malformed chunk in the event stream", status=200)
        if chunk.get("error") or event.event == "error":
            error = classify_response(200, headers, chunk if chunk.get("error") else {"error": chunk})
            raise error or TransientError("error event in the stream", status=200)
        self.model = _text(chunk.get("model")) or self.model
        self.chunk_id = self.chunk_id or _text(chunk.get("id"))
        self.service_tier = _tier(chunk.get("service_tier")) or self.service_tier
        if chunk.get("usage") is not None:
            self.usage_chunk = True
            self.usage = parse_usage(chunk.get("usage")) or self.usage
            self.usage_rejected = self.usage_rejected or _rejected(chunk.get("usage"))
        for choice in chunk.get("choices") or []:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                delta = choice.get("delta") or {}
                delta = delta if isinstance(delta, dict) else {}
                self.parts.append(_message_text(delta.get("content")))
                if isinstance(delta.get("refusal"), str):
                    self.refusal.append(delta["refusal"])
                self.finish_reason = _text(choice.get("finish_reason")) or self.finish_reason

    def result(self, request_id: str | None, *, usage_expected: bool = False) -> ChatResult:
        """The finished answer; a stream that did not end properly is a transient failure.

        `usage_expected`: this server ended every earlier stream of the run with a usage chunk, so
        a stream without one was most likely cut upstream and ended "cleanly" by a gateway (LiteLLM
        says `finish_reason: "stop"`, then `[DONE]`).
        """
        if not self.done:
            raise TransientError("stream ended without [DONE]", status=200, request_id=request_id)
        if usage_expected and not self.usage_chunk:
            raise TransientError("stream ended without the usage chunk this server sent on earlier streams "
                                 "(a gateway may have ended a dropped upstream cleanly)", status=200,
                                 request_id=request_id or self.chunk_id)
        return _checked_result("".join(self.parts), self.model, self.finish_reason, self.usage,
                               request_id or self.chunk_id, refusal="".join(self.refusal),
                               usage_rejected=self.usage_rejected, service_tier=self.service_tier)


class _StreamParser:
    """`StreamParser` for chat.completion.chunk events (SSE), ending in `data: [DONE]`."""

    def __init__(self, headers: Mapping[str, str], provider: OpenAIProvider | None = None):
        self._headers = headers
        self._decoder = SSEDecoder()
        self._state = _StreamState()
        self._provider = provider  # remembers, for the run, whether this server sends usage chunks

    def feed(self, chunk: bytes) -> None:
        for event in self._decoder.feed(chunk):
            self._state.take(event, self._headers)

    def result(self) -> ChatResult:
        for event in self._decoder.finish():
            self._state.take(event, self._headers)
        provider = self._provider
        expected = provider is not None and provider.streams_usage
        result = self._state.result(_request_id(self._headers), usage_expected=expected)
        if provider is not None and self._state.usage_chunk and not provider.streams_usage:
            provider.streams_usage = True
            log.debug("this server ends its streams with a usage chunk; a stream without one is retried")
        return result
