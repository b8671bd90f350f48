"""errors.py: the exception hierarchy that mirrors DESIGN.md's failure table.

A seam module: sources, images, providers, the engine and `job` all raise or catch these, and none of them
imports another stage to do so. Each class's `kind` is exactly the value written to the
`error_kind` Parquet column. An error carries the HTTP status, the request id and the server's
message; never the payload, image bytes or request headers (an API key lives in those).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from .redaction import redact

__all__ = [
    "CaptionError",
    "RateLimitError",
    "TransientError",
    "BadRequestError",
    "BadOutputError",
    "FatalError",
    "AuthError",
    "QuotaError",
    "ModelNotFoundError",
    "BadImageError",
    "FetchError",
    "InternalError",
    "JobError",
]

MAX_MESSAGE_CHARS = 500
"""Server messages are cut to this length: an HTML error page must not fill a Parquet cell. The
run's secrets are redacted before the cut (`redaction.redact`), so a cut never leaves a key's prefix."""


class CaptionError(Exception):
    """Base of every failure that ends an image attempt or the run."""

    kind: ClassVar[str] = "error"

    def __init__(self, message: str, *, status: int | None = None, request_id: str | None = None):
        message = redact(" ".join(str(message).split()))  # first redact, then cut: a cut key is still a key
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 1] + "…"
        super().__init__(message)
        self.message = message
        self.status = status  # HTTP status, None when no response arrived
        self.request_id = redact(request_id) if request_id else request_id  # the server's x-request-id

    def __str__(self) -> str:
        return f"HTTP {self.status}: {self.message}" if self.status else self.message


class RateLimitError(CaptionError):
    """429 that will pass: wait (all workers together) and try again.

    Carries what the 429 said about its cause, so the limiter can tell a rate bucket from a cap
    on requests in flight: the window a message names ("tokens per min (TPM)", "requests per
    second"), the bucket it names and its limit, and whether a header said a bucket is empty. A
    429 that says none of these (a relay's "Too many concurrent requests") is `explained=False`.
    """

    kind = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float | None = None,
                 window: Literal["second", "minute", "day"] | None = None,
                 bucket: Literal["requests", "tokens"] | None = None, limit: int | None = None,
                 exhausted: bool = False, **kw):
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s  # what the server asked for, None when it did not say
        self.window = window  # the rate window the message names, None when it names none
        self.bucket = bucket  # what that window counts, None when not said
        self.limit = limit  # the limit the message names (per window), None when not said
        self.exhausted = exhausted  # an x-ratelimit-remaining-* header said 0

    @property
    def explained(self) -> bool:
        """True when a rate bucket explains this 429 (a named window, or a bucket with nothing left)."""
        return self.window is not None or self.exhausted


class TransientError(CaptionError):
    """5xx, 408, timeouts, dropped connections, broken streams: retry with backoff."""

    kind = "transient"


class BadRequestError(CaptionError):
    """400/413/422 for this image: an error row, no retry."""

    kind = "bad_request"


class BadOutputError(CaptionError):
    """The server answered, but not with a usable caption (empty, refused, not the JSON asked for)."""

    kind = "bad_output"

    def __init__(self, message: str, *, retryable: bool = True, usage=None, finish_reason: str | None = None,
                 answer=None, **kw):
        super().__init__(message, **kw)
        self.retryable = retryable  # False when asking again the same way cannot help (a refusal, a cut answer)
        self.usage = usage  # the records.Usage the answer was billed at, when known
        self.finish_reason = finish_reason
        # A usable but suspect answer (shorter than output.min_chars: maybe cut upstream), the
        # records.ChatResult: asked for again up to max_attempts, then kept as an ok row, flagged.
        self.answer = answer


class FatalError(CaptionError):
    """Retrying never helps and no other image will fare better: stop the run."""

    kind = "fatal"


class AuthError(FatalError):
    """401/403: the key is wrong, revoked, or out of the gateway's quota."""

    kind = "auth"


class QuotaError(FatalError):
    """429 insufficient_quota and friends: out of credit, not out of rate."""

    kind = "quota"


class ModelNotFoundError(FatalError):
    """404 for the model: a typo in the job, or no access to that model."""

    kind = "model_not_found"


class BadImageError(CaptionError):
    """The file cannot become an image we can send; no request is made."""

    kind = "bad_image"


class FetchError(BadImageError):
    """A remote image (an http(s) URL in a table) could not be downloaded within the job's limits.

    A kind of bad image (no request is made, every stage that handles one handles this), with its own
    `error_kind` so a user can tell a dead link from a broken file; the next run tries it again."""

    kind = "fetch"


class InternalError(CaptionError):
    """A bug or an answer nobody foresaw, met on one image: its row says so, and the run goes on."""

    kind = "internal"


class JobError(Exception):
    """A job file, flag or environment problem found before anything is sent (exit code 2)."""
