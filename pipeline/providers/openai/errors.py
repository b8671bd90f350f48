"""providers/openai/errors.py: what an OpenAI-style answer's status, headers and error body mean.

Owns the failure table for OpenAI-compatible servers and the gateways in front of them (one-api,
new-api, LiteLLM, OpenRouter): `classify_response` maps a status code *and* a 200 carrying
`{"error": ...}` to one typed error of `errors.py`; `parse_retry_after` and `parse_rate_info` read
the wait and the `x-ratelimit-*` counts. Pure: no I/O, no retries.

References:
- Error codes: https://platform.openai.com/docs/guides/error-codes
- Rate-limit headers: https://platform.openai.com/docs/guides/rate-limits
- Flex processing ("429 Resource Unavailable": flex lacks capacity; not billed; retry with backoff or
  at the standard tier): https://platform.openai.com/docs/guides/flex-processing
"""

from __future__ import annotations

import email.utils
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

__all__ = ["QUOTA_CODES", "FlexUnavailableError", "classify_response", "describe_body", "loads_or_none", "parse_duration", "parse_rate_info", "parse_retry_after",
           "parse_rate_window", "request_id_of", "unsupported_parameter", "wants_max_completion_tokens"]

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
_RESOURCE_UNAVAILABLE = re.compile(r"resource[ _]unavailable|resources? (?:are|is) (?:currently |temporarily )?"
                                   r"unavailable", re.IGNORECASE)
_TRY_AGAIN = re.compile(r"try again in (\d+(?:\.\d+)?)\s*(ms|s)\b", re.IGNORECASE)
_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)")


# A 429's message naming its bucket: OpenAI's "on tokens per min (TPM): Limit 30000, Used ...",
# Anthropic's "rate limit of 50 requests per minute", relays' "requests per second (RPS)".
_NAMED_WINDOW = re.compile(r"\b(requests?|tokens?)\s+per\s+(sec(?:ond)?|min(?:ute)?|day)\b", re.IGNORECASE)
_SHORT_WINDOW = re.compile(r"\b([RT])P([SMD])\b")  # RPM, TPM, RPS, TPS, RPD, TPD: upper case only
_NAMED_LIMIT = re.compile(r"\blimit(?:\s+of)?\s*:?\s*(\d[\d,]*)\b", re.IGNORECASE)
_WINDOWS = {"s": "second", "m": "minute", "d": "day"}
MAX_NAMED_LIMIT = 10**10  # a limit above this in a message is not believed
REQUEST_ID_HEADERS = ("x-request-id", "request-id", "llm_provider-x-request-id")
"""Where the server's request id is: OpenAI's `x-request-id`, Anthropic-style `request-id`, and
LiteLLM's copy of the upstream's, renamed with its `llm_provider-` prefix
(https://docs.litellm.ai/docs/proxy/response_headers)."""


class FlexUnavailableError(TransientError):
    """A flex request's 429 "Resource Unavailable": flex has no capacity for it right now (not billed).

    Not a rate limit: nothing we send too fast caused it, so it is retried with backoff like any
    transient failure and never pauses the run nor lowers its limits; with `flex_fallback = "auto"`
    the provider resends it at once at the default tier (`OpenAIProvider.learn`).
    """


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


def classify_response(status: int, headers: Mapping[str, str], body: bytes | dict | None) -> CaptionError | None:
    """Map an HTTP answer to the error it means, or None when it is a success to parse.

    `body` is the raw bytes or the parsed JSON. A 200 whose JSON carries `error` is an error
    (gateways relay upstream failures that way).
    """
    payload = loads_or_none(body) if not isinstance(body, dict) else body
    error = payload.get("error") if isinstance(payload, dict) else None
    if status == 200 and not error:
        return None
    message, code = _error_text(error, body, status)
    kw = {"status": status, "request_id": request_id_of(headers)}
    if status == 402 or code in QUOTA_CODES or code.endswith(_QUOTA_SUFFIX) or _QUOTA_MESSAGES.search(message):
        return QuotaError(message, **kw)
    if status == 200 and code.isdigit() and 400 <= int(code) < 500 and int(code) not in (408, 409, 429):
        status = int(code)  # an error event carrying an HTTP code (vLLM): classify it as that status
    if status == 429 and (code in ("resource_unavailable", "resource_unavailable_error")
                          or _RESOURCE_UNAVAILABLE.search(message)):
        return FlexUnavailableError(message, **kw)
    if status == 429 or (status == 200 and "rate_limit" in code):
        return _rate_limit_error(message, headers, kw)
    if status in (401, 403):
        return AuthError(message, **kw)
    if status == 404:
        if code == "model_not_found" or "model" in message.lower():
            return ModelNotFoundError(message, **kw)
        return FatalError(f"{message} (is base_url right? it should end in /v1 or the like)", **kw)
    if status in (408, 409) or status >= 500 or status == 200:
        return TransientError(message, **kw)
    return BadRequestError(message, **kw)


def request_id_of(headers: Mapping[str, str]) -> str | None:
    """The server's id for this request, from the first of REQUEST_ID_HEADERS it sent; None if none."""
    for name in REQUEST_ID_HEADERS:
        if value := headers.get(name):
            return value
    return None


def parse_rate_window(message: str) -> tuple[str | None, str | None, int | None]:
    """(window, bucket, limit) that a 429's message names, each None when it does not say.

    window is "second", "minute" or "day"; bucket "requests" or "tokens"; limit the number after
    "Limit" / "limit of" (OpenAI: "Rate limit reached for gpt-4o on tokens per min (TPM): Limit
    30000, Used 29000, Requested 1500", https://platform.openai.com/docs/guides/rate-limits).
    A limit of 0, or one beyond MAX_NAMED_LIMIT, is ignored.
    """
    window = bucket = None
    if found := _NAMED_WINDOW.search(message):
        bucket = "tokens" if found.group(1).lower().startswith("token") else "requests"
        window = _WINDOWS[found.group(2)[0].lower()]
    elif found := _SHORT_WINDOW.search(message):
        bucket = "tokens" if found.group(1) == "T" else "requests"
        window = _WINDOWS[found.group(2).lower()]
    limit = None
    if window is not None and (named := _NAMED_LIMIT.search(message)):
        value = int(named.group(1).replace(",", ""))
        limit = value if 0 < value <= MAX_NAMED_LIMIT else None
    return window, bucket, limit


def _rate_limit_error(message: str, headers: Mapping[str, str], kw: dict[str, Any]) -> RateLimitError:
    """The 429 with what it says about its cause: a named window, a bucket headers say is empty."""
    window, bucket, limit = parse_rate_window(message)
    lower = {k.lower(): v for k, v in headers.items()}
    exhausted = [kind for kind in ("requests", "tokens")
                 if _non_negative(lower.get(f"x-ratelimit-remaining-{kind}")) == 0]
    if bucket is None and exhausted:
        bucket = exhausted[0]
    return RateLimitError(message, retry_after_s=_retry_after(headers, message), window=window, bucket=bucket,
                          limit=limit, exhausted=bool(exhausted), **kw)


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
        text = redact(body.decode("utf-8", errors="replace"))  # before the cut below: a cut key is still a key
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


def wants_max_completion_tokens(err: CaptionError) -> bool:
    """True for the 400 reasoning models give to `max_tokens` ("Use 'max_completion_tokens' instead")."""
    text = err.message.lower()
    return "max_tokens" in text and "max_completion_tokens" in text


_UNSUPPORTED = re.compile(r"unsupported (?:parameter|value): '([a-z_]+)'", re.IGNORECASE)


def unsupported_parameter(err: CaptionError) -> str | None:
    """The parameter a 400 names as unsupported ("Unsupported parameter: 'top_p' is not supported with
    this model", "Unsupported value: 'temperature' does not support 0.2 ..."), or None."""
    found = _UNSUPPORTED.search(err.message)
    return found.group(1).lower() if found else None


def describe_body(body: bytes) -> str:
    """A short, redacted description of an answer that is not what was asked for: an HTML page's
    title, or the text itself (errors cut it to their length limit)."""
    return _error_text(None, body[:65_536], 200)[0] if body else "an empty body"
