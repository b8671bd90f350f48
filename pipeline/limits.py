"""limits.py: how many requests may go now, and when.

Owns three gates that every request passes, in one FIFO line, before it is sent:
1. in-flight concurrency, adaptive: it starts low and doubles per round trip (slow start), up to
   the job's `concurrency`; a bare 429 (no rate-limit headers: a relay capping requests in flight)
   lowers it to the number of older requests the server was holding at the time, and a long run
   of successes raises it by one (additive increase) to probe again;
2. requests per minute and 3. tokens per minute, as token buckets refilled continuously, each
   from the job (`limits.rpm`/`tpm`) or learned from `x-ratelimit-limit-*`, and kept in step with
   the server's own bucket by `x-ratelimit-remaining-*` (corrected downwards only: the server
   counts at arrival, after us). A request reserves its estimated tokens before it goes and
   settles with the real count after.
And one shared pause: the first 429 that names a wait sets it, every worker waits on the same
clock (plus a little jitter), so a burst of 429s costs one pause, not N retries.

Knows nothing of HTTP: the runner passes parsed `RateInfo`s and what happened. Time is
`time.monotonic()` throughout; the buckets take it as an argument so they can be tested as
arithmetic. See https://platform.openai.com/docs/guides/rate-limits for how OpenAI counts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from dataclasses import dataclass

from .records import RateInfo

__all__ = ["TokenBucket", "Limiter", "Permit"]

log = logging.getLogger(__name__)

INITIAL_CONCURRENCY = 8
"""Slow start begins here (or at the job's concurrency, if lower) and doubles each round trip."""
DECREASE_FACTOR = 0.9
"""A new bare-429 event cuts the in-flight limit to at most this fraction of what it was."""
PROBE_ROUNDS = 8
"""After limit × PROBE_ROUNDS successes without a 429, try one more request in flight."""
BARE_STRIKES_BEFORE_PAUSE = 3
"""Bare 429s in a row (no success between) before they also pause everyone with backoff."""
JITTER_FRACTION = 0.1
MAX_JITTER_S = 1.0


class TokenBucket:
    """A per-minute limit as a bucket of `capacity` that refills at capacity/60 per second.

    The level may go negative when a settled request cost more than it reserved (a debt).
    """

    def __init__(self, per_minute: float, now: float):
        self.capacity = float(per_minute)
        self.level = float(per_minute)
        self._updated = now

    @property
    def rate(self) -> float:
        return self.capacity / 60.0

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self._updated) * self.rate)
        self._updated = now

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until `amount` fits (an amount over capacity fits when the bucket is full)."""
        self.refill(now)
        need = min(amount, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, amount: float, now: float) -> None:
        self.refill(now)
        self.level -= amount

    def correct(self, remaining: float, now: float) -> None:
        """The server says it has `remaining` left: never believe we have more than that."""
        self.refill(now)
        self.level = min(self.level, remaining)

    def resize(self, per_minute: float, now: float) -> None:
        """A new limit (learned or changed): keep the level, bounded by the new capacity."""
        self.refill(now)
        self.capacity = float(per_minute)
        self.level = min(self.level, self.capacity)


@dataclass(slots=True)
class Permit:
    """One request's place: its order, when it went, and the tokens it reserved."""

    seq: int
    sent_at: float
    tokens: int


class Limiter:
    """The gates and the shared pause. One per run, used from one event loop."""

    def __init__(self, concurrency: int, *, rpm: int | None = None, tpm: int | None = None,
                 backoff_base_s: float = 1.0, max_pause_s: float = 60.0, seed: int | None = None):
        now = time.monotonic()
        self.max_concurrency = concurrency
        self.limit = float(min(concurrency, INITIAL_CONCURRENCY))  # current in-flight limit
        self._slow_start = True
        self._fixed_rpm, self._fixed_tpm = rpm is not None, tpm is not None
        self.requests = TokenBucket(rpm, now) if rpm else None
        self.tokens = TokenBucket(tpm, now) if tpm else None
        self._backoff_base_s = backoff_base_s
        self._max_pause_s = max_pause_s
        self._pause_until = 0.0
        self._pause_len = 0.0
        self._strikes = 0  # 429s since the last success
        self._successes = 0  # since the last change of the in-flight limit
        self._last_decrease = 0.0
        self._seq = 0
        self._in_flight: dict[int, Permit] = {}
        self._gate = asyncio.Lock()  # FIFO: one waiter at a time checks the gates
        self._freed = asyncio.Event()
        self._random = random.Random(seed)
        self.rate_limited = 0  # 429s seen, for progress

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def acquire(self, tokens: int) -> Permit:
        """Wait until the pause is over, a slot is free and both buckets have room; take them."""
        async with self._gate:
            while True:
                now = time.monotonic()
                wait = self._pause_wait(now)
                if wait <= 0 and len(self._in_flight) >= int(self.limit):
                    self._freed.clear()
                    await self._freed.wait()
                    continue
                wait = max(wait, self._bucket_wait(tokens, now))
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
                return self._take(tokens, now)

    def _pause_wait(self, now: float) -> float:
        left = self._pause_until - now
        if left <= 0:
            return 0.0
        return left + self._random.uniform(0, min(MAX_JITTER_S, JITTER_FRACTION * self._pause_len))

    def _bucket_wait(self, tokens: int, now: float) -> float:
        waits = [0.0]
        if self.requests is not None:
            waits.append(self.requests.wait_s(1, now))
        if self.tokens is not None:
            waits.append(self.tokens.wait_s(tokens, now))
        return max(waits)

    def _take(self, tokens: int, now: float) -> Permit:
        if self.requests is not None:
            self.requests.take(1, now)
        if self.tokens is not None:
            self.tokens.take(tokens, now)
        self._seq += 1
        permit = Permit(self._seq, now, tokens)
        self._in_flight[permit.seq] = permit
        return permit

    def release(self, permit: Permit, *, used_tokens: int | None = None) -> None:
        """The request ended: free its slot; settle its tokens when the real count is known."""
        self._in_flight.pop(permit.seq, None)
        if used_tokens is not None and self.tokens is not None:
            self.tokens.take(used_tokens - permit.tokens, time.monotonic())
        self._freed.set()

    def observe(self, info: RateInfo) -> None:
        """Learn limits from a response's headers and follow the server's remaining counts."""
        now = time.monotonic()
        self.requests = self._follow(self.requests, self._fixed_rpm, info.limit_requests, info.remaining_requests, now)
        self.tokens = self._follow(self.tokens, self._fixed_tpm, info.limit_tokens, info.remaining_tokens, now)

    def _follow(self, bucket: TokenBucket | None, fixed: bool, limit: int | None, remaining: int | None,
                now: float) -> TokenBucket | None:
        if limit and not fixed:
            if bucket is None:
                log.info("learned a limit of %d per minute from the server's headers", limit)
                bucket = TokenBucket(limit, now)
            elif bucket.capacity != limit:
                bucket.resize(limit, now)
        if bucket is not None and remaining is not None:
            bucket.correct(remaining, now)
        return bucket

    def on_success(self) -> None:
        """A request succeeded: reset the 429 strikes; grow the in-flight limit if it is time."""
        self._strikes = 0
        self._successes += 1
        if self.limit >= self.max_concurrency:
            return
        if self._slow_start or self._successes >= self.limit * PROBE_ROUNDS:
            self.limit = min(self.max_concurrency, self.limit + 1)
            self._successes = 0 if not self._slow_start else self._successes

    def on_rate_limited(self, permit: Permit, retry_after_s: float | None, *, hinted: bool) -> None:
        """A 429 for `permit`: pause everyone for the server's wait, or lower concurrency.

        `hinted` says whether the 429 carried rate-limit headers. Without a wait and without
        headers it is taken as a concurrency cap; several in a row also pause, with backoff.
        """
        self.rate_limited += 1
        self._strikes += 1
        if retry_after_s is not None:
            self._pause(retry_after_s, "the server's retry-after")
        elif hinted or self._strikes >= BARE_STRIKES_BEFORE_PAUSE:
            wait = self._backoff_base_s * 2 ** min(self._strikes - 1, 16) * self._random.uniform(0.5, 1.0)
            self._pause(wait, "backoff, no wait named by the server")
        if not hinted:
            self._lower_concurrency(permit)

    def _lower_concurrency(self, permit: Permit) -> None:
        # The server was holding the requests sent before this one and still in flight, and
        # refused one more: that count is its cap. A 429 for a request sent before the last
        # decrease belongs to the same event and cannot push the limit further than that count.
        older = sum(1 for seq in self._in_flight if seq < permit.seq)
        target = float(older) if older else self.limit * DECREASE_FACTOR
        if permit.sent_at >= self._last_decrease:
            target = min(target, self.limit * DECREASE_FACTOR)
            self._last_decrease = time.monotonic()
        new = max(1.0, min(self.limit, math.floor(target)))
        if new < self.limit:
            log.info("bare 429: in-flight limit %d -> %d", int(self.limit), int(new))
        self.limit, self._slow_start, self._successes = new, False, 0

    def _pause(self, wait: float, why: str) -> None:
        wait = min(wait, self._max_pause_s)
        now = time.monotonic()
        if now + wait > self._pause_until:
            self._pause_until, self._pause_len = now + wait, wait
            log.info("rate limited: all workers pause %.2f s (%s)", wait, why)
