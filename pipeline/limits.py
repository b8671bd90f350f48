"""limits.py: how many requests may go now.

Owns the in-flight cap and the one pause that every worker shares after a 429: the first 429
sets a pause until the time the server named (or an exponential backoff when it named none), and
every worker waits on that same clock, so a burst of 429s becomes one pause, not N retries. Each
waiter adds a little jitter so the queue does not fire at one instant when the pause ends.
Knows nothing of HTTP: the runner tells it what happened.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

__all__ = ["Limiter"]

log = logging.getLogger(__name__)

JITTER_FRACTION = 0.1
"""Each waiter wakes up to this fraction of the pause (at most MAX_JITTER_S) after it ends."""
MAX_JITTER_S = 1.0


class Limiter:
    """Concurrency slots plus a shared 429 pause. One per run, used from one event loop."""

    def __init__(self, concurrency: int, *, backoff_base_s: float, max_pause_s: float, seed: int | None = None):
        self._slots = asyncio.Semaphore(concurrency)
        self._backoff_base_s = backoff_base_s
        self._max_pause_s = max_pause_s
        self._pause_until = 0.0  # time.monotonic() before which no request starts
        self._pause_len = 0.0
        self._strikes = 0  # 429s since the last success, for the backoff when no wait is named
        self._random = random.Random(seed)
        self.in_flight = 0
        self.rate_limited = 0  # 429s seen, for progress

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for any shared pause and a free slot; hold the slot for one request."""
        await self._wait_pause()
        async with self._slots:
            await self._wait_pause()  # a 429 may have arrived while we queued for the slot
            self.in_flight += 1
            try:
                yield
            finally:
                self.in_flight -= 1

    async def _wait_pause(self) -> None:
        while (left := self._pause_until - time.monotonic()) > 0:
            jitter = self._random.uniform(0, min(MAX_JITTER_S, JITTER_FRACTION * self._pause_len))
            await asyncio.sleep(left + jitter)

    def on_rate_limited(self, retry_after_s: float | None) -> float:
        """Record a 429; extend the shared pause. Returns the pause now in force, in seconds."""
        self.rate_limited += 1
        self._strikes += 1
        if retry_after_s is None:
            wait = self._backoff_base_s * 2 ** min(self._strikes - 1, 16)
            wait *= self._random.uniform(0.5, 1.0)
        else:
            wait = retry_after_s
        wait = min(wait, self._max_pause_s)
        now = time.monotonic()
        if now + wait > self._pause_until:
            self._pause_until, self._pause_len = now + wait, wait
            log.info("rate limited: all workers pause %.2f s (%s)", wait,
                     "server's retry-after" if retry_after_s is not None else "backoff, no hint from server")
        return max(0.0, self._pause_until - now)

    def on_success(self) -> None:
        """Record a success: the next 429 without a hint starts its backoff afresh."""
        self._strikes = 0
