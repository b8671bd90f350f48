"""engine/retry.py: the one retry policy: which failures are tried again, how often, after how long.

Every retry loop of the engine goes through `RetryPolicy`: image requests (`image_retrying`, the
only place tenacity is configured), Files/Batches control calls (`call`) and status polls
(`backoff_s`). Retryability is decided by type, never by message text. The wait comes from the
server first (`retry_after_s` on the error, capped), otherwise exponential backoff with full jitter
(https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/). No I/O, no counting.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from ..errors import BadOutputError, CaptionError, RateLimitError, TransientError
from ..job import Limits
from ..records import Result

__all__ = ["RetryPolicy", "FailureStreak", "BAD_OUTPUT_ATTEMPTS", "RATE_LIMIT_PATIENCE", "SAME_FAILURE_STOP"]

log = logging.getLogger(__name__)

BAD_OUTPUT_ATTEMPTS = 2  # an unusable answer (empty, not the JSON asked for) is asked for once more
RATE_LIMIT_PATIENCE = 10  # an image ends as rate_limited only after this × max_attempts 429s
SAME_FAILURE_STOP = 10  # images in a row whose requests all ended in the same error stop the run
_PASSING = (RateLimitError, TransientError)  # failures that say "later", not "no"
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and after how long a failed call is tried again (attempts count the first try)."""

    max_attempts: int
    base_s: float  # first backoff window, seconds; doubles per attempt
    max_s: float  # cap for backoffs and for waits a server asks for, seconds

    @classmethod
    def of(cls, limits: Limits) -> RetryPolicy:
        """The job's policy: `limits.max_attempts`, `retry_base_s`, `retry_max_s`."""
        return cls(limits.max_attempts, limits.retry_base_s, limits.retry_max_s)

    def attempts_for(self, err: BaseException | None) -> int:
        """How many attempts an image may use when its last one failed with `err`.

        A 429 says "later", not "no": an overnight run should not turn a busy provider into error
        rows, but should not loop for ever on a server that only says 429 either, so it gets
        RATE_LIMIT_PATIENCE times more. An unusable answer is asked for once more at most, and not
        at all when asking the same way again cannot help (a refusal, an answer cut by max_tokens).
        """
        if isinstance(err, RateLimitError):
            return self.max_attempts * RATE_LIMIT_PATIENCE
        if isinstance(err, BadOutputError) and err.answer is not None:
            return self.max_attempts  # a suspect answer (too short): maybe cut upstream, as transient as a drop
        if isinstance(err, BadOutputError):
            return min(self.max_attempts, BAD_OUTPUT_ATTEMPTS if err.retryable else 1)
        return self.max_attempts

    def backoff_s(self, attempt: int) -> float:
        """A random wait in [0, min(max_s, base_s · 2^(attempt-1))]: full jitter, `attempt` from 1."""
        high = self.base_s * 2 ** min(max(attempt - 1, 0), 62)
        return random.uniform(0.0, min(self.max_s, high))

    def wait_s(self, err: BaseException, attempt: int) -> float:
        """The wait before the next attempt: the server's own (capped at max_s), else a backoff."""
        asked = getattr(err, "retry_after_s", None)
        return min(asked, self.max_s) if asked is not None else self.backoff_s(attempt)

    def image_retrying(self, *, sleep: Callable[[float], Awaitable[None]],
                       before_sleep: Callable[[RetryCallState], None]) -> AsyncRetrying:
        """Tenacity, configured for one image's requests.

        Rate limits, transient failures and unusable answers are retried within `attempts_for`.
        A 429 waits no time here: its wait is the limiter's shared pause, which every request
        waits on before it goes. `sleep` is how a backoff is slept (the driver cuts it short when
        the run stops).
        """
        return AsyncRetrying(
            stop=lambda state: state.attempt_number >= self.attempts_for(state.outcome.exception()),
            retry=retry_if_exception_type((*_PASSING, BadOutputError)),
            wait=self._image_wait,
            sleep=sleep,
            before_sleep=before_sleep,
            reraise=True,
        )

    def _image_wait(self, state: RetryCallState) -> float:
        err = state.outcome.exception()
        return 0.0 if isinstance(err, RateLimitError) else self.backoff_s(state.attempt_number)

    async def call(self, what: str, fn: Callable[..., Awaitable[T]], *args: Any,
                   after_wait: Callable[[], Awaitable[T | None]] | None = None) -> T:
        """Run an idempotent provider call; 429s and transient failures are tried again.

        `after_wait`, awaited after each wait, may return a result that ends the loop: a create
        whose answer was lost is looked for before it is sent again. Raises the last failure once
        the attempts are spent, and any other failure at once.
        """
        attempt = 1
        while True:
            try:
                return await fn(*args)
            except _PASSING as err:
                if attempt >= self.max_attempts:
                    raise
                wait = self.wait_s(err, attempt)
                log.info("%s: %s; again in %.1f s", what, _describe(err), wait)
                await asyncio.sleep(wait)
            attempt += 1
            if after_wait is not None and (found := await after_wait()) is not None:
                return found


def _describe(err: CaptionError) -> str:
    return f"{err.kind}: {err}"


class FailureStreak:
    """When every request fails the same way, stop and spend nothing more.

    An unreachable base URL, or a parameter the model refuses for every image, would otherwise turn
    a whole folder into error rows (and, for a 400 that is billed, into spend). Counts the images in
    a row whose requests ended in the very same error (kind and message); an ok row resets it, and
    rows no request was made for (a bad image, a copy of a duplicate) change nothing.
    """

    def __init__(self, limit: int = SAME_FAILURE_STOP):
        self.limit = limit
        self._last: tuple[str | None, str | None] | None = None
        self._count = 0

    def note(self, row: Result) -> str | None:
        """Take one written row; return why the run must stop, once the streak reaches the limit."""
        if row.status == "ok":
            self._last, self._count = None, 0
            return None
        if not row.attempts:
            return None
        failure = (row.error_kind, row.error)
        self._count = self._count + 1 if failure == self._last else 1
        self._last = failure
        if self._count < self.limit:
            return None
        return (f"the last {self._count} images all failed the same way ({row.error_kind}: {row.error}); "
                "nothing more is sent. Fix the cause, then run again")
