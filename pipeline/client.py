"""client.py: one OpenAI-compatible chat completion request, and nothing more.

Owns the wire: the payload, the HTTP call (aiohttp), the server-sent-events decoder, the parsing
of answers into `ChatResult`/`Usage`, and the mapping of every failure to one typed error of
`errors.py` (`classify_response`). It never retries, sleeps or counts: that is the runner's and
the limiter's job. JSON stays a dict only inside this module. Error messages carry the server's
words, never our headers (the API key lives there) or the payload (the image lives there).

References:
- Chat completions, streaming chunks, `stream_options.include_usage`:
  https://platform.openai.com/docs/api-reference/chat
- Error codes: https://platform.openai.com/docs/guides/error-codes
- Rate-limit headers: https://platform.openai.com/docs/guides/rate-limits
- Event stream format: https://html.spec.whatwg.org/multipage/server-sent-events.html
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .errors import (
    AuthError,
    BadOutputError,
    BadRequestError,
    CaptionError,
    FatalError,
    ModelNotFoundError,
    QuotaError,
    RateLimitError,
    TransientError,
)
from .job import Job
from .records import ChatResult, RateInfo, Usage

__all__ = [
    "SSEDecoder",
    "ChatClient",
    "build_payload",
    "classify_response",
    "parse_completion",
    "parse_batch_response",
    "parse_retry_after",
    "parse_duration",
    "parse_usage",
    "parse_rate_info",
    "wants_max_completion_tokens",
    "proxy_for",
]

log = logging.getLogger(__name__)

QUOTA_CODES = frozenset(
    {
        "insufficient_quota",  # OpenAI: out of credit (a 429 that no wait cures)
        "credit_balance_exhausted",
        "organization_usage_limit_exceeded",
        "billing_hard_limit_reached",
        "insufficient_user_quota",  # one-api/new-api gateways
        "budget_exceeded",  # LiteLLM proxy budgets
        "insufficient_credits",  # OpenRouter (HTTP 402)
    }
)
_QUOTA_MESSAGES = re.compile(
    r"credit balance is too low|exceeded your current quota|budget has been exceeded|insufficient credits"
    r"|quota exhausted|quota is not enough",
    re.IGNORECASE,
)
_QUOTA_SUFFIX = "_spend_limit_exceeded"
_TRY_AGAIN = re.compile(r"try again in (\d+(?:\.\d+)?)\s*(ms|s)\b", re.IGNORECASE)
_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)")


# --- server-sent events --------------------------------------------------------------------


@dataclass(slots=True)
class SSEEvent:
    """One dispatched event: its type (default "message") and its data lines joined by \\n."""

    event: str
    data: str


@dataclass(slots=True)
class SSEDecoder:
    """Incremental event-stream decoder: feed it bytes as they arrive, get whole events back.

    Follows https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation:
    lines end in CRLF, LF or CR; `:` starts a comment; a blank line dispatches the event; several
    `data:` lines join with newlines. One leniency: `finish()` dispatches a last event that lacks
    its blank line, since some servers end with `data: [DONE]\\n` and close.
    """

    _buffer: bytes = b""
    _data: list[str] = field(default_factory=list)
    _event: str = ""

    def feed(self, chunk: bytes) -> Iterator[SSEEvent]:
        """Yield every event completed by `chunk`."""
        self._buffer += chunk
        while True:
            cut = _line_end(self._buffer)
            if cut is None:
                return
            end, size = cut
            line, self._buffer = self._buffer[:end], self._buffer[end + size :]
            event = self._take_line(line.decode("utf-8", errors="replace"))
            if event is not None:
                yield event

    def finish(self) -> Iterator[SSEEvent]:
        """Yield what is left when the stream ends (a trailing line, an undispatched event)."""
        if self._buffer:
            line, self._buffer = self._buffer, b""
            event = self._take_line(line.decode("utf-8", errors="replace"))
            if event is not None:
                yield event
        event = self._take_line("")
        if event is not None:
            yield event

    def _take_line(self, line: str) -> SSEEvent | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = SSEEvent(self._event or "message", "\n".join(self._data))
            self._data, self._event = [], ""
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None  # id and retry fields do not matter for chat completions


def _line_end(buffer: bytes) -> tuple[int, int] | None:
    """Return (index, length) of the first line terminator, or None if no whole line yet.

    A CR at the very end is not taken yet: the LF of a CRLF may be in the next chunk.
    """
    lf, cr = buffer.find(b"\n"), buffer.find(b"\r")
    if cr == -1 or (lf != -1 and lf < cr):
        return None if lf == -1 else (lf, 1)
    if cr + 1 == len(buffer):
        return None
    return cr, 2 if buffer[cr + 1] == 10 else 1


# --- headers -------------------------------------------------------------------------------


def parse_duration(text: str | None) -> float | None:
    """Seconds in a Go-style duration as in `x-ratelimit-reset-*` ("1s", "6m0s", "547ms", "2m52.8s").

    A bare number is taken as seconds. Returns None for anything else, and for negative values.
    """
    if text is None:
        return None
    text = text.strip().lower()
    try:
        value = float(text)
        return value if value >= 0 and value == value and value != float("inf") else None
    except ValueError:
        pass
    parts = _GO_DURATION.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    return sum(float(number) * scale[unit] for number, unit in parts)


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the server asks us to wait, from its headers; None when it says nothing usable.

    Order, most precise first: `retry-after-ms`; `retry-after` as seconds or an HTTP date
    (RFC 9110 §10.2.3); then `x-ratelimit-reset-requests`/`-tokens` for a bucket whose
    `x-ratelimit-remaining-*` is 0. Negative, NaN and unparsable values are ignored.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    ms = _non_negative(lower.get("retry-after-ms"))
    if ms is not None:
        return ms / 1000
    retry_after = lower.get("retry-after")
    if retry_after is not None:
        seconds = _non_negative(retry_after)
        if seconds is not None:
            return seconds
        try:
            when = email.utils.parsedate_to_datetime(retry_after.strip())
        except (TypeError, ValueError, IndexError):
            when = None
        if when is not None and when.tzinfo is not None:
            return max(0.0, when.timestamp() - (time.time() if now is None else now))
    waits = []
    for bucket in ("requests", "tokens"):
        if lower.get(f"x-ratelimit-remaining-{bucket}", "").strip() == "0":
            wait = parse_duration(lower.get(f"x-ratelimit-reset-{bucket}"))
            if wait is not None:
                waits.append(wait)
    return max(waits) if waits else None


def parse_rate_info(headers: Mapping[str, str]) -> RateInfo | None:
    """The `x-ratelimit-limit-*` / `-remaining-*` counts of a response; None when it has none.

    Header names per https://platform.openai.com/docs/guides/rate-limits#rate-limits-in-headers.
    """
    lower = {k.lower(): v for k, v in headers.items() if k.lower().startswith("x-ratelimit-")}
    if not lower:
        return None

    def count(name: str) -> int | None:
        value = _non_negative(lower.get(name))
        return None if value is None else int(value)

    info = RateInfo(
        limit_requests=count("x-ratelimit-limit-requests"),
        remaining_requests=count("x-ratelimit-remaining-requests"),
        limit_tokens=count("x-ratelimit-limit-tokens"),
        remaining_tokens=count("x-ratelimit-remaining-tokens"),
    )
    return info if info != RateInfo() else None


def _non_negative(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    if value is None or value != value or value < 0 or value == float("inf"):
        return None
    return value


# --- classification ------------------------------------------------------------------------


def classify_response(status: int, headers: Mapping[str, str], body: bytes | dict | None) -> CaptionError | None:
    """Map an HTTP answer to the error it means, or None when it is a success to parse.

    `body` is the raw bytes or the parsed JSON. A 200 whose JSON carries `error` is an error
    (gateways relay upstream failures that way).
    """
    payload = _json_or_none(body) if not isinstance(body, dict) else body
    error = payload.get("error") if isinstance(payload, dict) else None
    if status == 200 and not error:
        return None
    message, code = _error_text(error, body, status)
    request_id = headers.get("x-request-id") or headers.get("request-id")
    kw = {"status": status, "request_id": request_id}
    if status == 402 or code in QUOTA_CODES or code.endswith(_QUOTA_SUFFIX) or _QUOTA_MESSAGES.search(message):
        return QuotaError(message, **kw)
    if status == 200 and code.isdigit() and 400 <= int(code) < 500 and int(code) not in (408, 409, 429):
        status = int(code)  # an error event carrying an HTTP code (vLLM): classify it as that status
    if status == 429 or (status == 200 and "rate_limit" in code):
        hinted = any(k.lower().startswith(("x-ratelimit-", "retry-after")) for k in headers)
        return RateLimitError(message, retry_after_s=_retry_after(headers, message), hinted=hinted, **kw)
    if status in (401, 403):
        return AuthError(message, **kw)
    if status == 404:
        if code == "model_not_found" or "model" in message.lower():
            return ModelNotFoundError(message, **kw)
        return FatalError(f"{message} (is base_url right? it should end in /v1 or the like)", **kw)
    if status in (408, 409) or status >= 500 or status == 200:
        return TransientError(message, **kw)
    return BadRequestError(message, **kw)


def _json_or_none(body: bytes | None) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


def _error_text(error: Any, body: bytes | dict | None, status: int) -> tuple[str, str]:
    """Return (message, code-or-type in lower case) from an OpenAI- or Anthropic-shaped error."""
    if isinstance(error, dict):
        message = str(error.get("message") or error.get("type") or "error")
        code = str(error.get("code") or "") + " " + str(error.get("type") or "")
        codes = code.lower().split()
        known = [c for c in codes if c in QUOTA_CODES or c.endswith(_QUOTA_SUFFIX)]
        return message, (known or codes or [""])[0]
    if isinstance(error, str):
        return error, ""
    if isinstance(body, bytes) and body:
        text = body.decode("utf-8", errors="replace")
        if "<html" in text.lower():
            title = re.search(r"<title>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
            text = f"HTML error page: {title.group(1).strip() if title else text[:80]}"
        return text, ""
    return f"empty answer with status {status}", ""


def _retry_after(headers: Mapping[str, str], message: str) -> float | None:
    wait = parse_retry_after(headers)
    if wait is None:  # OpenAI's message says "Please try again in 20ms" / "in 1.5s"
        found = _TRY_AGAIN.search(message)
        if found:
            wait = float(found.group(1)) / (1000 if found.group(2).lower() == "ms" else 1)
    return wait


# --- payload and answers -------------------------------------------------------------------


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
    if stream:
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
    payload.update(job.extra)
    return payload


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
    """Return a `Usage` from a response's `usage` object, or None when there is none."""
    if not isinstance(raw, dict) or "prompt_tokens" not in raw:
        return None
    prompt = _int(raw.get("prompt_tokens"))
    completion = _int(raw.get("completion_tokens"))
    total = _int(raw.get("total_tokens")) if raw.get("total_tokens") is not None else prompt + completion
    prompt_details = raw.get("prompt_tokens_details") or {}
    completion_details = raw.get("completion_tokens_details") or {}
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total,
        cached_tokens=_int_or_none(prompt_details.get("cached_tokens") if isinstance(prompt_details, dict) else None),
        reasoning_tokens=_int_or_none(
            completion_details.get("reasoning_tokens") if isinstance(completion_details, dict) else None
        ),
    )


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def _int_or_none(value: Any) -> int | None:
    return None if value is None else _int(value)


def _message_text(content: Any) -> str:
    """Text of a message's content: a string, or a list of parts of which the text ones count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _checked_result(text: str, model: str, finish: str | None, usage: Usage | None, request_id: str | None,
                    refusal: str = "") -> ChatResult:
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
    if not text.strip():
        hint = " (max_tokens too small for a reasoning model?)" if finish == "length" else ""
        raise BadOutputError(f"empty caption, finish_reason={finish}{hint}", retryable=finish != "length",
                             usage=usage, finish_reason=finish, status=200, request_id=request_id)
    return ChatResult(text=text.strip(), model=model, finish_reason=finish, usage=usage, request_id=request_id)


def parse_completion(body: bytes, request_id: str | None) -> ChatResult:
    """Parse a non-streaming `chat.completion` body; raises TransientError/BadOutputError."""
    data = _json_or_none(body)
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise TransientError("answer is not a chat completion (malformed JSON or no choices)", status=200,
                             request_id=request_id)
    choice = choices[0]
    message = choice.get("message") or {}
    message = message if isinstance(message, dict) else {}
    return _checked_result(
        _message_text(message.get("content")),
        str(data.get("model") or ""),
        choice.get("finish_reason"),
        parse_usage(data.get("usage")),
        request_id or data.get("id"),
        refusal=message.get("refusal") if isinstance(message.get("refusal"), str) else "",
    )


def parse_batch_response(response: Any) -> ChatResult:
    """Turn the `response` of one Batch API output line into a ChatResult, or raise its typed error.

    `response` is `{"status_code", "request_id", "body"}` as in
    https://platform.openai.com/docs/guides/batch ("the output file"); the body is what the chat
    endpoint would have answered, so the same failure table applies (`classify_response`), and a
    200 body is parsed as `parse_completion` parses one.
    """
    if not isinstance(response, dict) or not isinstance(response.get("status_code"), int):
        raise TransientError("batch output line without a response status", status=None)
    request_id = response.get("request_id") if isinstance(response.get("request_id"), str) else None
    headers = {"x-request-id": request_id} if request_id else {}
    body = response.get("body")
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode() if body is not None else b""
    error = classify_response(response["status_code"], headers, raw)
    if error is not None:
        raise error
    return parse_completion(raw, request_id)


@dataclass(slots=True)
class _StreamState:
    """What a stream has told us so far."""

    parts: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    model: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    done: bool = False
    chunk_id: str | None = None

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
        self.model = chunk.get("model") or self.model
        self.chunk_id = self.chunk_id or chunk.get("id")
        self.usage = parse_usage(chunk.get("usage")) or self.usage
        for choice in chunk.get("choices") or []:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                delta = choice.get("delta") or {}
                delta = delta if isinstance(delta, dict) else {}
                self.parts.append(_message_text(delta.get("content")))
                if isinstance(delta.get("refusal"), str):
                    self.refusal.append(delta["refusal"])
                self.finish_reason = choice.get("finish_reason") or self.finish_reason

    def result(self, request_id: str | None) -> ChatResult:
        """The finished answer; a stream that did not end properly is a transient failure."""
        if not self.done:
            raise TransientError("stream ended without [DONE]", status=200, request_id=request_id)
        return _checked_result("".join(self.parts), self.model, self.finish_reason, self.usage,
                               request_id or self.chunk_id, refusal="".join(self.refusal))


# --- the request ---------------------------------------------------------------------------


class ChatClient:
    """Sends one image's chat completion over a shared aiohttp session.

    Remembers one thing for the whole run: which token parameter the server wants. Reasoning
    models answer 400 to `max_tokens` and ask for `max_completion_tokens`; on that exact answer
    we switch once, log it, and resend, instead of failing every image.
    """

    def __init__(self, session: aiohttp.ClientSession, job: Job, base_url: str, *,
                 api_key: str | None, headers: Mapping[str, str],
                 on_rate_info: Callable[[RateInfo], None] | None = None):
        self._session = session
        self._on_rate_info = on_rate_info  # told the x-ratelimit-* counts of every response
        self._job = job
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._proxy = proxy_for(self._url)
        self._headers = {"Content-Type": "application/json", **headers}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self.token_param = "max_tokens"
        limits = job.limits
        stream_read = limits.idle_timeout_s if job.endpoint.stream else None
        self._timeout = aiohttp.ClientTimeout(total=limits.timeout_s, sock_read=stream_read)

    async def complete(self, data_url: str) -> ChatResult:
        """Caption one image; raises a `CaptionError` subclass for every failure."""
        while True:
            token_param = self.token_param
            payload = build_payload(self._job, data_url, stream=self._job.endpoint.stream, token_param=token_param)
            try:
                return await self._send(payload)
            except BadRequestError as err:
                if token_param != "max_tokens" or not wants_max_completion_tokens(err):
                    raise
                if self.token_param == "max_tokens":
                    self.token_param = "max_completion_tokens"
                    log.warning("server rejects max_tokens for %s; sending max_completion_tokens from now on",
                                self._job.endpoint.model)

    async def _send(self, payload: dict[str, Any]) -> ChatResult:
        try:
            async with self._session.post(self._url, json=payload, headers=self._headers, proxy=self._proxy,
                                          timeout=self._timeout) as response:
                request_id = response.headers.get("x-request-id") or response.headers.get("request-id")
                if self._on_rate_info is not None and (info := parse_rate_info(response.headers)):
                    self._on_rate_info(info)
                is_stream = response.content_type == "text/event-stream"
                if response.status != 200 or not is_stream:
                    body = await response.read()
                    error = classify_response(response.status, response.headers, body)
                    if error is not None:
                        raise error
                    return parse_completion(body, request_id)
                return await self._read_stream(response, request_id)
        except CaptionError:
            raise
        except asyncio.TimeoutError:
            raise TransientError(f"no answer within the time limit (timeout_s={self._job.limits.timeout_s}, "
                                 f"idle_timeout_s={self._job.limits.idle_timeout_s})") from None
        except aiohttp.ClientError as err:
            raise TransientError(f"connection failed: {type(err).__name__}: {err}") from err

    async def _read_stream(self, response: aiohttp.ClientResponse, request_id: str | None) -> ChatResult:
        decoder, state = SSEDecoder(), _StreamState()
        async for chunk in response.content.iter_any():
            for event in decoder.feed(chunk):
                state.take(event, response.headers)
        for event in decoder.finish():
            state.take(event, response.headers)
        return state.result(request_id)


def proxy_for(url: str) -> str | None:
    """The proxy that HTTPS_PROXY / HTTP_PROXY name for `url`, unless NO_PROXY covers its host.

    Read once per run: aiohttp's trust_env looks the environment (and ~/.netrc) up again on every
    request, which cost almost a millisecond each here.
    """
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy


def wants_max_completion_tokens(err: CaptionError) -> bool:
    """True for the 400 reasoning models give to `max_tokens` ("Use 'max_completion_tokens' instead")."""
    text = err.message.lower()
    return "max_tokens" in text and "max_completion_tokens" in text
