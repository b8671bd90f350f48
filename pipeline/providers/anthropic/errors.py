"""providers/anthropic/errors.py: what an Anthropic answer's status, headers and error body mean.

Owns Anthropic's failure table: `classify_response` maps a status code, or the `error.type` of an
`{"type": "error", "error": {...}}` body (also the data of an `event: error` inside a stream), to
one typed error of `errors.py`; `parse_rate_info` and `retry_after_s` read the
`anthropic-ratelimit-*` and `retry-after` headers. Pure: no I/O, no retries.

References:
- Errors (types and statuses, 529 overloaded_error, errors inside a stream):
  https://docs.anthropic.com/en/api/errors
- Rate limits (the `anthropic-ratelimit-*` headers, reset as RFC 3339, `retry-after` in seconds,
  separate input and output token limits): https://docs.anthropic.com/en/api/rate-limits
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Mapping
from typing import Any

from ...errors import (
    AuthError,
    BadRequestError,
    CaptionError,
    FatalError,
    ModelNotFoundError,
    QuotaError,
    RateLimitError,
    TransientError,
)
from ...records import RateInfo
from ...redaction import redact
from ..http import loads_or_none

__all__ = ["TYPE_STATUS", "BUCKETS", "classify_response", "loads_or_none", "parse_rate_info", "parse_reset",
           "request_id_of", "retry_after_s"]

TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
"""Anthropic's error types and the status each comes with (https://docs.anthropic.com/en/api/errors).
An error event inside a stream arrives on a 200, so its type is what says which it is."""

BUCKETS = ("requests", "tokens", "input-tokens", "output-tokens")
"""The `anthropic-ratelimit-{bucket}-{limit,remaining,reset}` families (rate-limits docs, "Response headers")."""

_CREDIT = re.compile(r"credit balance is too low|purchase credits|billing", re.IGNORECASE)
# "... would exceed the rate limit for your organization of 50,000 input tokens per minute"
_NAMED_LIMIT = re.compile(r"\b(\d[\d,]*)\s+(?:input |output )?(?:requests?|tokens?)\s+per\s+", re.IGNORECASE)
_NAMED_WINDOW = re.compile(r"\b(requests?|(?:input |output )?tokens?)\s+per\s+(second|minute|day)\b", re.IGNORECASE)
MAX_WAIT_S = 86_400.0  # a reset further away than a day is not believed


def request_id_of(headers: Mapping[str, str]) -> str | None:
    """Anthropic's `request-id` header (errors docs, "Request id"); None when absent."""
    return headers.get("request-id") or headers.get("x-request-id") or None


def classify_response(status: int, headers: Mapping[str, str], body: bytes | dict | None) -> CaptionError | None:
    """Map an HTTP answer (or an error event's data, on status 200) to the error it means; None for a success.

    The table: 529 overloaded_error, 500 api_error, 504 and other 5xx are transient; 429 is a rate
    limit; 413 request_too_large and 400 invalid_request_error are this image's; 401/403 and a
    credit problem (402 billing_error, or a 400 saying the credit balance is too low) stop the run.
    """
    payload = loads_or_none(body) if not isinstance(body, dict) else body
    error = payload.get("error") if isinstance(payload, dict) else None
    if status == 200 and not error:
        return None
    message, type_ = _error_text(error, body, status)
    if status == 200:  # an error event in a stream, or a gateway's 200 with an error: its type says which
        status = TYPE_STATUS.get(type_, 500)
    request_id = request_id_of(headers) or (payload.get("request_id") if isinstance(payload, dict) else None)
    kw = {"status": status, "request_id": request_id if isinstance(request_id, str) else None}
    if status == 402 or type_ == "billing_error" or (status == 400 and _CREDIT.search(message)):
        return QuotaError(message, **kw)
    if status == 429:
        return _rate_limit_error(message, headers, kw)
    if status in (401, 403):
        return AuthError(message, **kw)
    if status == 404:
        if "model" in message.lower():
            return ModelNotFoundError(message, **kw)
        return FatalError(f"{message} (is base_url right? Anthropic's is https://api.anthropic.com)", **kw)
    if status in (408, 409) or status >= 500:
        return TransientError(message, **kw)
    return BadRequestError(message, **kw)


def _error_text(error: Any, body: bytes | dict | None, status: int) -> tuple[str, str]:
    """(message, error type) of an Anthropic error object, or of whatever else the body is."""
    if isinstance(error, dict):
        type_ = error.get("type") if isinstance(error.get("type"), str) else ""
        return str(error.get("message") or type_ or "error"), type_
    if isinstance(error, str):
        return error, ""
    if isinstance(body, bytes) and body:
        text = redact(body.decode("utf-8", errors="replace"))
        if "<html" in text.lower():
            title = re.search(r"<title>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
            text = f"HTML error page: {title.group(1).strip() if title else text[:80]}"
        return text, ""
    return f"empty answer with status {status}", ""


def _rate_limit_error(message: str, headers: Mapping[str, str], kw: dict[str, Any]) -> RateLimitError:
    """A 429 with what it says: the bucket a header says is empty, the window its message names."""
    lower = {k.lower(): v for k, v in headers.items()}
    exhausted = [bucket for bucket in BUCKETS if _count(lower.get(f"anthropic-ratelimit-{bucket}-remaining")) == 0]
    window = bucket = None
    if found := _NAMED_WINDOW.search(message):
        window = found.group(2).lower()
        bucket = "requests" if found.group(1).lower().startswith("request") else "tokens"
    if bucket is None and exhausted:
        bucket = "requests" if exhausted[0] == "requests" else "tokens"
    if window is None and exhausted:
        window = "minute"  # every anthropic-ratelimit-* bucket is per minute (rate-limits docs)
    limit = int(found.group(1).replace(",", "")) if (found := _NAMED_LIMIT.search(message)) else None
    return RateLimitError(message, retry_after_s=retry_after_s(headers), window=window, bucket=bucket,
                          limit=limit if limit and limit <= 10**10 else None, exhausted=bool(exhausted), **kw)


def retry_after_s(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait: `retry-after` (whole seconds, as Anthropic sends it), else the latest reset
    of a bucket whose remaining is 0; None when the headers say neither."""
    lower = {k.lower(): v for k, v in headers.items()}
    seconds = _number(lower.get("retry-after"))
    if seconds is not None:
        return seconds
    waits = [parse_reset(lower.get(f"anthropic-ratelimit-{bucket}-reset"), now=now) for bucket in BUCKETS
             if _count(lower.get(f"anthropic-ratelimit-{bucket}-remaining")) == 0]
    waits = [wait for wait in waits if wait is not None]
    return max(waits) if waits else None


def parse_reset(text: str | None, *, now: float | None = None) -> float | None:
    """Seconds from `now` until an RFC 3339 time ("2026-03-01T12:00:05Z"); 0 for a time past, None
    for anything unparsable, naive, or more than MAX_WAIT_S away."""
    if not text:
        return None
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    wait = max(0.0, when.timestamp() - (time.time() if now is None else now))
    return wait if wait <= MAX_WAIT_S else None


def parse_rate_info(headers: Mapping[str, str]) -> RateInfo | None:
    """The requests bucket and the binding token bucket of `anthropic-ratelimit-*`; None without them.

    Anthropic limits input and output tokens apart (and may send a combined `tokens` family too);
    the engine has one token budget, charged per request with prompt estimate + max_tokens. So
    the token family reported is the binding one, the one with the smallest share remaining (ties:
    the smaller limit): a budget that never lets more through than the tightest bucket would.
    """
    lower = {k.lower(): v for k, v in headers.items() if k.lower().startswith("anthropic-ratelimit-")}
    if not lower:
        return None
    families = {}
    for bucket in BUCKETS:
        limit = _count(lower.get(f"anthropic-ratelimit-{bucket}-limit"))
        remaining = _count(lower.get(f"anthropic-ratelimit-{bucket}-remaining"))
        families[bucket] = (limit, remaining)
    tokens = [families[b] for b in BUCKETS[1:] if families[b][0] and families[b][1] is not None]
    limit_tokens, remaining_tokens = min(tokens, key=lambda f: (f[1] / f[0], f[0])) if tokens else (None, None)
    info = RateInfo(limit_requests=families["requests"][0], remaining_requests=families["requests"][1],
                    limit_tokens=limit_tokens, remaining_tokens=remaining_tokens)
    return info if info != RateInfo() else None


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    if value is None or value != value or value < 0 or value > MAX_WAIT_S:
        return None
    return value


def _count(text: str | None) -> int | None:
    """A header's whole count; None for anything else (negative, fractional, absurd)."""
    if text is None or not text.strip().isdigit() or len(text.strip()) > 12:
        return None
    return int(text.strip())
