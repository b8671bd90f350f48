"""providers/gemini/errors.py: what a Gemini API answer's status and error body mean.

Owns Gemini's failure table: `classify_response` maps a status code, or the `error` of a
`{"error": {"code", "message", "status", "details"}}` body (also a chunk of a stream), to one typed
error of `errors.py`. Gemini sends no rate-limit headers: the wait is in the body
(`google.rpc.RetryInfo.retryDelay`), and the limit that was hit is named by a
`google.rpc.QuotaFailure` violation's `quotaId` ("GenerateRequestsPerMinutePerProjectPerModel",
"...PerDay..."). A per-day quota is fatal (`QuotaError`) with the time it resets. Pure: no I/O.

References:
- Troubleshooting (400 INVALID_ARGUMENT / FAILED_PRECONDITION, 403 PERMISSION_DENIED, 404 NOT_FOUND,
  429 RESOURCE_EXHAUSTED, 500 INTERNAL, 503 UNAVAILABLE, 504 DEADLINE_EXCEEDED):
  https://ai.google.dev/gemini-api/docs/troubleshooting
- Rate limits (per minute and per day; "Requests per day (RPD) quotas reset at midnight Pacific
  time"): https://ai.google.dev/gemini-api/docs/rate-limits
- The error details (`RetryInfo.retryDelay` as a protobuf Duration "13s", `QuotaFailure.violations`,
  `ErrorInfo.reason` such as API_KEY_INVALID): https://cloud.google.com/apis/design/errors#error_details
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
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
from ...redaction import redact
from ..http import loads_or_none

__all__ = ["STATUS_CODES", "classify_response", "loads_or_none", "parse_duration", "per_day_reset",
           "request_id_of"]

STATUS_CODES = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "UNAUTHENTICATED": 401,
                "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499,
                "INTERNAL": 500, "UNKNOWN": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
"""google.rpc.Code names → HTTP status, for an error met inside a stream (on a 200)."""

RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
AUTH_REASONS = ("API_KEY_INVALID", "API_KEY_SERVICE_BLOCKED", "API_KEY_HTTP_REFERRER_BLOCKED")
PACIFIC = "America/Los_Angeles"  # per-day quotas reset at midnight Pacific time (rate-limits docs)
MAX_WAIT_S = 86_400.0  # a retryDelay longer than a day is not believed
MAX_NAMED_LIMIT = 10**10
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")  # protobuf Duration JSON: "13s", "0.5s", "1.000340s"
# FAILED_PRECONDITION "User location is not supported", "free tier is not available in your country.
# Please enable billing": no image will fare better (troubleshooting docs, 400 FAILED_PRECONDITION)
_FATAL_400 = re.compile(r"location is not supported|enable billing|billing (?:is )?not enabled", re.IGNORECASE)


def request_id_of(headers: Mapping[str, str]) -> str | None:
    """Google front ends send no request id to clients; a relay's `x-request-id` is kept if present."""
    return headers.get("x-request-id") or headers.get("request-id") or None


def parse_duration(text: Any) -> float | None:
    """Seconds in a protobuf Duration's JSON form ("13s", "0.013s"); None for anything else or over a day."""
    if not isinstance(text, str) or not (found := _DURATION.match(text)):
        return None
    seconds = float(found.group(1))
    return seconds if seconds <= MAX_WAIT_S else None


def per_day_reset(now: dt.datetime | None = None) -> dt.datetime:
    """The next midnight Pacific time (as an aware datetime in that zone), when per-day quotas reset."""
    zone = zoneinfo.ZoneInfo(PACIFIC)
    local = (now or dt.datetime.now(dt.UTC)).astimezone(zone)
    return dt.datetime.combine(local.date() + dt.timedelta(days=1), dt.time(), zone)


def classify_response(status: int, headers: Mapping[str, str], body: bytes | dict | list | None,
                      *, now: dt.datetime | None = None) -> CaptionError | None:
    """Map an HTTP answer (or an error chunk of a stream, on status 200) to the error it means; None for a success.

    The table: 500/503/504 and other 5xx are transient; 429 RESOURCE_EXHAUSTED is a rate limit, unless a
    QuotaFailure names a per-day limit (fatal, with its reset); 400 INVALID_ARGUMENT is this image's,
    except a bad key (ErrorInfo API_KEY_INVALID: auth) and an unsupported location or billing
    (FAILED_PRECONDITION: fatal); 401/403 are auth; 404 is a model not found or a wrong base URL.
    """
    payload = loads_or_none(body) if isinstance(body, bytes) else body
    if isinstance(payload, list) and len(payload) == 1:  # a stream's error can come as a one-element array
        payload = payload[0]
    error = payload.get("error") if isinstance(payload, dict) else None
    if status == 200 and not error:
        return None
    message, code_name, details = _error_parts(error, body, status)
    if status == 200:
        code = error.get("code") if isinstance(error, dict) else None
        status = code if isinstance(code, int) and 400 <= code < 600 else STATUS_CODES.get(code_name, 500)
    kw = {"status": status, "request_id": request_id_of(headers)}
    reasons = {d.get("reason") for d in details if d.get("@type") == ERROR_INFO}
    if status == 429:
        return _rate_limit_error(message, details, kw, now)
    if status in (401, 403) or reasons & set(AUTH_REASONS):
        return AuthError(message, **kw)
    if status == 404:
        if "model" in message.lower():
            return ModelNotFoundError(message, **kw)
        return FatalError(f"{message} (is base_url right? Gemini's is https://generativelanguage.googleapis.com)",
                          **kw)
    if status == 400 and _FATAL_400.search(message):
        return QuotaError(message, **kw)
    if status in (408, 409, 499) or status >= 500:
        return TransientError(message, **kw)
    return BadRequestError(message, **kw)


def _error_parts(error: Any, body: Any, status: int) -> tuple[str, str, list[dict[str, Any]]]:
    """(message, google.rpc status name, details) of a Gemini error, or of whatever else the body is."""
    if isinstance(error, dict):
        details = [d for d in error.get("details") or [] if isinstance(d, dict)] \
            if isinstance(error.get("details"), list) else []
        name = error.get("status") if isinstance(error.get("status"), str) else ""
        return str(error.get("message") or name or "error"), name, details
    if isinstance(error, str):
        return error, "", []
    if isinstance(body, bytes) and body:
        text = redact(body.decode("utf-8", errors="replace"))
        if "<html" in text.lower():
            title = re.search(r"<title>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
            text = f"HTML error page: {title.group(1).strip() if title else text[:80]}"
        return text, "", []
    return f"empty answer with status {status}", "", []


def _rate_limit_error(message: str, details: list[dict[str, Any]], kw: dict[str, Any],
                      now: dt.datetime | None) -> CaptionError:
    """A 429 with what its details say: the wait (RetryInfo) and the quota hit (QuotaFailure).

    A violation whose quotaId names a day ("GenerateRequestsPerDayPerProjectPerModel-FreeTier") is
    a QuotaError: waiting seconds cannot help, and it says when the quota resets. One naming a
    minute is a rate limit explained by that window's bucket (its quotaValue is the limit).
    """
    wait = next((parse_duration(d.get("retryDelay")) for d in details if d.get("@type") == RETRY_INFO), None)
    violations = [v for d in details if d.get("@type") == QUOTA_FAILURE
                  for v in (d.get("violations") or []) if isinstance(v, dict)]
    quota_ids = [str(v.get("quotaId") or v.get("quotaMetric") or "") for v in violations]
    if daily := [q for q in quota_ids if "perday" in q.lower().replace("_", "")]:
        reset = per_day_reset(now)
        return QuotaError(f"{message} (per-day quota {daily[0]} is used up; it resets at midnight Pacific time, "
                          f"{reset.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC)", **kw)
    window = bucket = limit = None
    for violation, quota_id in zip(violations, quota_ids):
        lower = quota_id.lower()
        window = "minute" if "perminute" in lower else "second" if "persecond" in lower else None
        if window is not None:
            bucket = "tokens" if "token" in lower else "requests"
            value = str(violation.get("quotaValue") or "")
            limit = int(value) if value.isdigit() and 0 < int(value) <= MAX_NAMED_LIMIT else None
            break
    return RateLimitError(message, retry_after_s=wait, window=window, bucket=bucket, limit=limit,
                          exhausted=window is not None, **kw)
