"""limits.py: rate limits and injected faults of the bundled endpoint.

Owns the RPM/TPM token buckets, the concurrency cap and the penalty window (`Limits`), what they
say about one request (`Verdict`), the `x-ratelimit-*` and `retry-after*` headers with their Go
duration format, and the catalogue of faults `LocalServer.fail_next` accepts together with the
ready answers of the faults that do not depend on the caption (`fault_response`, `go_silent`).

It must not hold server state or decide when a request is charged: the core owns the lock these
objects live under and the queue of faults; the protocols decide what a request costs. It imports
only aiohttp, the standard library and `wire`.

Protocol sources:
- `x-ratelimit-*` headers, reset values as Go durations ("6m0s", "1s"), TPM counting `max_tokens`,
  rejected requests counting against RPM: https://platform.openai.com/docs/guides/rate-limits
- error body and status meanings: https://platform.openai.com/docs/guides/error-codes
- flex processing's "429 Resource Unavailable" (not billed, not a rate limit):
  https://platform.openai.com/docs/guides/flex-processing (the body's exact words are not documented; the
  fault's are ours, with the documented status and name)
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .wire import MODEL_ID, error_body, json_response

HANG_S = 3600.0  # how long the "hang" fault stays silent (cancelled on disconnect or stop)

# Injected faults whose answer is a fixed JSON error: status, message, type, code.
FAULT_ERRORS: dict[str, tuple[int, str, str, str | None]] = {
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
    # a flex request flex has no capacity for (OpenAI chat route; queue it before flex requests)
    "429_flex": (
        429,
        "Resource Unavailable: flex processing has no capacity for this request right now. Retry later, "
        "or send it at the default service tier.",
        "resource_unavailable",
        "resource_unavailable",
    ),
}
CONTENT_FAULTS = {"empty": "", "bad_json": "Sure! Here is the JSON you asked for: {caption: "}
STREAM_FAULTS = ("stream_error", "no_done", "no_finish", "no_usage", "malformed", "drop", "hang", "empty",
                 "bad_json")
FAULTS: tuple[str, ...] = (
    *FAULT_ERRORS,
    "html502",
    "404_model",
    "429",
    "429_bare",
    "error200",
    *STREAM_FAULTS,
)
"""Every fault name `LocalServer.fail_next` accepts."""

NGINX_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
GATEWAY_ERROR = {"error": {"message": "upstream error: overloaded", "type": "upstream_error", "code": 500}}
STREAM_ERROR = {"error": {"message": "upstream stream interrupted", "type": "server_error"}}


def go_duration(seconds: float) -> str:
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


def retry_after_headers(wait_s: float) -> dict[str, str]:
    """retry-after in whole seconds (rounded up, RFC 9110 10.2.3) and retry-after-ms, as OpenAI sends."""
    return {"retry-after": str(max(0, math.ceil(wait_s))), "retry-after-ms": str(max(0, math.ceil(wait_s * 1000)))}


# ---------------------------------------------------------------------------------------------
# Rate limits.


class _Bucket:
    """A token bucket holding up to `limit` units that refills continuously at `limit` per `window_s`."""

    def __init__(self, limit: int, now: float, window_s: float = 60.0, *, empty: bool = False):
        self.limit = limit
        self.window_s = window_s
        self.level = 0.0 if empty else float(limit)
        self.stamp = now

    def refill(self, now: float) -> None:
        self.level = min(float(self.limit), self.level + (now - self.stamp) * self.limit / self.window_s)
        self.stamp = now

    def wait_s(self, cost: float) -> float:
        """Seconds until the bucket holds `cost` units."""
        return max(0.0, (cost - self.level) * self.window_s / self.limit)

    def used(self) -> int:
        return self.limit - math.floor(self.level)

    def name(self, kind: str) -> str:
        """How OpenAI-style messages name it: "requests per min (RPM)", "tokens per second (TPS)"."""
        per, short = ("min", "M") if self.window_s == 60.0 else ("second", "S")
        return f"{kind} per {per} ({kind[0].upper()}P{short})"

    def headers(self, kind: str) -> dict[str, str]:
        """x-ratelimit-{limit,remaining,reset}-{kind}; reset is the time until the bucket is full."""
        return {
            f"x-ratelimit-limit-{kind}": str(self.limit),
            f"x-ratelimit-remaining-{kind}": str(max(0, math.floor(self.level))),
            f"x-ratelimit-reset-{kind}": go_duration(self.wait_s(self.limit)),
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the limits say about one request."""

    headers: dict[str, str]  # x-ratelimit-* to send (and retry-after* on a rejection)
    limit: str | None = None  # "rpm" | "tpm" | "rps" | "tps" | "penalty" when rejected
    body: dict[str, Any] | None = None  # the 429 body when rejected


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """What `LocalServer.rate_limit` asked for; None means no such limit."""

    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    headers: bool = True  # send x-ratelimit-* (and retry-after on a bucket's 429)
    penalty_s: float = 0.0  # after a limit's 429, refuse everything for this long
    rps: int | None = None  # requests per second (Together-style, relays)
    tps: int | None = None  # tokens per second
    start_empty: bool = False  # every bucket starts empty: another client just used it
    concurrency_retry_after_s: float | None = None  # the concurrency 429 says retry-after this (a relay's)


class Limits:
    """RPM/TPM/RPS/TPS buckets, the concurrency cap and the penalty window. Guarded by the core's lock.

    Per-minute buckets are reported in `x-ratelimit-*` headers, per-second ones only in their 429's
    message (OpenAI documents per-minute headers only; per-second limiters send none).
    """

    def __init__(self, settings: LimitSettings, now: float):
        empty = settings.start_empty
        self.requests = _Bucket(settings.rpm, now, empty=empty) if settings.rpm else None
        self.tokens = _Bucket(settings.tpm, now, empty=empty) if settings.tpm else None
        self.requests_per_s = _Bucket(settings.rps, now, 1.0, empty=empty) if settings.rps else None
        self.tokens_per_s = _Bucket(settings.tps, now, 1.0, empty=empty) if settings.tps else None
        self.concurrency = settings.concurrency
        self.concurrency_retry_after_s = settings.concurrency_retry_after_s
        self.send_headers = settings.headers
        self.penalty_s = settings.penalty_s
        self.penalty_until = 0.0

    def _request_buckets(self) -> list[tuple[str, _Bucket]]:
        return [(n, b) for n, b in (("rpm", self.requests), ("rps", self.requests_per_s)) if b is not None]

    def _token_buckets(self) -> list[tuple[str, _Bucket]]:
        return [(n, b) for n, b in (("tpm", self.tokens), ("tps", self.tokens_per_s)) if b is not None]

    def admit(self, cost: int, model: str, now: float) -> Verdict:
        """Charge one request of `cost` tokens; say whether it passes.

        A rejected request still uses a request unit, as OpenAI counts it (rate-limits guide).
        """
        for _, bucket in self._request_buckets() + self._token_buckets():
            bucket.refill(now)
        if now < self.penalty_until:
            self._charge_request()
            wait = self.penalty_until - now
            return self._reject("penalty", f"Rate limit reached for {model}: too many requests after a limit "
                                f"was hit. Please try again in {go_duration(wait)}.", "requests", wait)
        for name, bucket in self._request_buckets():
            if bucket.level < 1:
                self._charge_request()
                self.trip(now)
                wait = max(bucket.wait_s(1), self.penalty_until - now)  # the penalty, when set, is the wait
                return self._reject(name, f"Rate limit reached for {model} on {bucket.name('requests')}: Limit "
                                    f"{bucket.limit}, Used {bucket.used()}, Requested 1. Please try again in "
                                    f"{go_duration(wait)}.", "requests", wait)
        self._charge_request()
        return self._admit_tokens(cost, model, now)

    def _admit_tokens(self, cost: int, model: str, now: float) -> Verdict:
        for name, bucket in self._token_buckets():
            if cost > bucket.limit:
                return self._reject(name, f"Request too large for {model} on {bucket.name('tokens')}: Limit "
                                    f"{bucket.limit}, Requested {cost}. The input or output tokens must be "
                                    "reduced in order to run successfully.", "tokens", None)
            if bucket.level < cost:
                self.trip(now)
                wait = max(bucket.wait_s(cost), self.penalty_until - now)
                return self._reject(name, f"Rate limit reached for {model} on {bucket.name('tokens')}: Limit "
                                    f"{bucket.limit}, Used {bucket.used()}, Requested {cost}. Please try again "
                                    f"in {go_duration(wait)}.", "tokens", wait)
        for _, bucket in self._token_buckets():
            bucket.level -= cost
        return Verdict(self.headers())

    def _charge_request(self) -> None:
        for _, bucket in self._request_buckets():
            bucket.level = max(0.0, bucket.level - 1)

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

    def _reject(self, limit: str, message: str, kind: str, wait_s: float | None) -> Verdict:
        headers = self.headers()
        if self.send_headers and wait_s is not None:
            headers.update(retry_after_headers(wait_s))
        body = error_body(message, kind, code="rate_limit_exceeded")
        return Verdict(headers, limit, body)


def concurrency_rejection(request_id: str, retry_after_s: float | None = None) -> web.Response:
    """A relay's answer to one request too many: 429 without rate-limit headers.

    Bare by default (no retry-after either); with `retry_after_s`, as relays that cap requests in
    flight answer: "Too many concurrent requests" with retry-after and retry-after-ms.
    """
    if retry_after_s is None:
        body = {"error": {"message": "concurrency limit exceeded, please retry later", "type": "rate_limit_error",
                          "code": None}}
        return json_response(429, body, {"x-request-id": request_id})
    body = error_body("Too many concurrent requests", "rate_limit_error", code="concurrency_limit_exceeded")
    return json_response(429, body, {"x-request-id": request_id, **retry_after_headers(retry_after_s)})


# ---------------------------------------------------------------------------------------------
# Fault answers that do not depend on the caption.


def fault_response(fault: str | None, model: str | None, stream: bool, retry_after_s: float | None,
                   headers: dict[str, str]) -> web.Response | None:
    """Return the ready answer of a fault that does not depend on the caption, else None."""
    if fault in FAULT_ERRORS:
        status, message, type_, code = FAULT_ERRORS[fault]
        return json_response(status, error_body(message, type_, code=code), headers)
    if fault == "html502":
        return web.Response(status=502, text=NGINX_502, content_type="text/html", headers=headers)
    if fault == "404_model":
        message = f"The model `{model}` does not exist or you do not have access to it."
        return json_response(404, error_body(message, "invalid_request_error", code="model_not_found"), headers)
    if fault == "429":
        wait = f"Please try again in {go_duration(retry_after_s)}." if retry_after_s is not None else ""
        message = f"Rate limit reached for {model or MODEL_ID} on requests per min (RPM). {wait}".strip()
        extra = retry_after_headers(retry_after_s) if retry_after_s is not None else {}
        body = error_body(message, "requests", code="rate_limit_exceeded")
        return json_response(429, body, {**headers, **extra})
    if fault == "429_bare":
        return web.Response(status=429)
    if fault == "error200" or (fault == "stream_error" and not stream):
        return json_response(200, GATEWAY_ERROR, headers)
    if fault == "malformed" and not stream:
        return web.Response(status=200, text='{"id": "chatcmpl-', content_type="application/json", headers=headers)
    return None


async def go_silent(request: web.Request, drop: bool) -> web.StreamResponse:
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
