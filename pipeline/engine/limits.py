"""limits.py: how many requests may go now, and when.

Owns three gates that every request passes, in one FIFO line, before it is sent, in two pieces:

- `AdaptiveConcurrency`, local to the process that sends: 1. the in-flight limit, adaptive: it
  starts low and doubles per round trip (slow start), up to the job's `concurrency`; a bare 429
  (no rate-limit headers: a relay capping requests in flight) lowers it to the number of older
  requests the server was holding at the time, and a long run of successes raises it by one
  (additive increase) to probe again.
- `RateBudget`, which may be shared by many senders (the in-process `LocalRateBudget`, or a remote
  one, e.g. the same object in a Ray actor): 2. requests per minute and 3. tokens per minute, as
  token buckets refilled continuously, each from the job (`limits.rpm`/`tpm`) or learned from
  `x-ratelimit-limit-*`, and kept in step with the server's own bucket by
  `x-ratelimit-remaining-*` (corrected downwards only: the server counts at arrival, after us).
  A request reserves its estimated tokens before it goes and settles with the real count after.
  And one shared pause: the first 429 that names a wait sets it, every worker waits on the same
  clock (plus a little jitter), so a burst of 429s costs one pause, not N retries.

`Limiter` composes the two for the online driver: the FIFO line (asyncio), the 429 strikes and
their backoff. Knows nothing of HTTP: the runner passes parsed `RateInfo`s and what happened.
Time is `time.monotonic()` seconds throughout; the budget and the concurrency take it as an
argument (`now`) so they can be tested as arithmetic and called remotely. See
https://platform.openai.com/docs/guides/rate-limits for how OpenAI counts.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import math
import random
import time
from dataclasses import dataclass

from ..records import RateInfo

__all__ = ["AdaptiveConcurrency", "Limiter", "LocalRateBudget", "Permit", "RateBudget", "TokenBucket"]

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
        """Refill rate, units per second."""
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


class RateBudget(abc.ABC):
    """The provider's rate limits as one budget: RPM, TPM and the shared 429 pause.

    Plain synchronous methods that take the clock (`now`, `time.monotonic()` seconds) as an
    argument, so that one object can serve many senders, in process or behind a remote call.
    """

    @abc.abstractmethod
    def pause_s(self, now: float) -> float:
        """Seconds left of the shared pause, without jitter; 0.0 when there is none."""

    @abc.abstractmethod
    def wait_s(self, tokens: int, now: float) -> float:
        """Seconds until one request reserving `tokens` may go (pause with jitter, buckets); 0.0: now."""

    @abc.abstractmethod
    def take(self, tokens: int, now: float) -> None:
        """Charge one request and its `tokens` (a reservation), whether or not there was room."""

    def try_take(self, tokens: int, now: float) -> float:
        """Take one request of `tokens` if it may go now and return 0.0, else take nothing and
        return the seconds to wait, as `wait_s`. A remote budget does this in one call."""
        wait = self.wait_s(tokens, now)
        if wait <= 0:
            self.take(tokens, now)
        return wait

    @abc.abstractmethod
    def settle(self, reserved: int, used: int, now: float) -> None:
        """A request that reserved `reserved` tokens really used `used`: charge or refund the difference."""

    @abc.abstractmethod
    def observe(self, info: RateInfo, now: float) -> None:
        """Learn limits from a response's headers and follow the server's remaining counts."""

    @abc.abstractmethod
    def pause(self, wait_s: float, why: str, now: float) -> None:
        """Pause every sender for `wait_s` seconds from `now` (capped), unless a longer pause is on."""


class LocalRateBudget(RateBudget):
    """The in-process `RateBudget`: two optional token buckets and the pause clock.

    `rpm`/`tpm` fixed by the job are kept whatever the headers say; unset ones are learned from
    `x-ratelimit-limit-*`. `rng` draws the pause jitter (a seeded one makes runs repeatable).
    """

    def __init__(self, rpm: int | None = None, tpm: int | None = None, *, max_pause_s: float = 60.0,
                 rng: random.Random | None = None, now: float | None = None):
        now = time.monotonic() if now is None else now
        self._fixed_rpm, self._fixed_tpm = rpm is not None, tpm is not None
        self.requests = TokenBucket(rpm, now) if rpm else None
        self.tokens = TokenBucket(tpm, now) if tpm else None
        self._max_pause_s = max_pause_s
        self._random = rng if rng is not None else random.Random()
        self._pause_until = 0.0
        self._pause_len = 0.0

    def pause_s(self, now: float) -> float:
        return max(0.0, self._pause_until - now)

    def wait_s(self, tokens: int, now: float) -> float:
        return max(self._pause_wait(now), self._bucket_wait(tokens, now))

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

    def take(self, tokens: int, now: float) -> None:
        if self.requests is not None:
            self.requests.take(1, now)
        if self.tokens is not None:
            self.tokens.take(tokens, now)

    def settle(self, reserved: int, used: int, now: float) -> None:
        if self.tokens is not None:
            self.tokens.take(used - reserved, now)

    def observe(self, info: RateInfo, now: float) -> None:
        self.requests = _follow(self.requests, self._fixed_rpm, info.limit_requests, info.remaining_requests, now)
        self.tokens = _follow(self.tokens, self._fixed_tpm, info.limit_tokens, info.remaining_tokens, now)

    def pause(self, wait_s: float, why: str, now: float) -> None:
        wait_s = min(wait_s, self._max_pause_s)
        if now + wait_s > self._pause_until:
            self._pause_until, self._pause_len = now + wait_s, wait_s
            log.info("rate limited: all workers pause %.2f s (%s)", wait_s, why)


def _follow(bucket: TokenBucket | None, fixed: bool, limit: int | None, remaining: int | None,
            now: float) -> TokenBucket | None:
    """The bucket after a response's headers: created or resized to a learned limit, corrected down."""
    if limit and not fixed:
        if bucket is None:
            log.info("learned a limit of %d per minute from the server's headers", limit)
            bucket = TokenBucket(limit, now)
        elif bucket.capacity != limit:
            bucket.resize(limit, now)
    if bucket is not None and remaining is not None:
        bucket.correct(remaining, now)
    return bucket


@dataclass(slots=True)
class Permit:
    """One request's place: its order, when it went, and the tokens it reserved."""

    seq: int
    sent_at: float
    tokens: int


class AdaptiveConcurrency:
    """The in-flight limit of one sender and the permits it has out. Plain arithmetic, no waiting."""

    def __init__(self, max_concurrency: int):
        self.max_concurrency = max_concurrency
        self.limit = float(min(max_concurrency, INITIAL_CONCURRENCY))  # requests; int(limit) may be out
        self._slow_start = True
        self._successes = 0  # since the last change of the in-flight limit
        self._last_decrease = 0.0
        self._seq = 0
        self._permits: dict[int, Permit] = {}

    @property
    def count(self) -> int:
        """Requests in flight now."""
        return len(self._permits)

    @property
    def full(self) -> bool:
        """True when no further request may go until one ends."""
        return len(self._permits) >= int(self.limit)

    def admit(self, tokens: int, now: float) -> Permit:
        """Count one more request in flight, sent at `now` with `tokens` reserved; return its permit."""
        self._seq += 1
        permit = Permit(self._seq, now, tokens)
        self._permits[permit.seq] = permit
        return permit

    def release(self, permit: Permit) -> None:
        """The request ended: it is no longer in flight (releasing twice is harmless)."""
        self._permits.pop(permit.seq, None)

    def on_success(self) -> None:
        """A request succeeded: grow the limit by one while in slow start or after a long run of them."""
        self._successes += 1
        if self.limit >= self.max_concurrency:
            return
        if self._slow_start or self._successes >= self.limit * PROBE_ROUNDS:
            self.limit = min(self.max_concurrency, self.limit + 1)
            self._successes = 0 if not self._slow_start else self._successes

    def on_bare_429(self, permit: Permit, now: float) -> None:
        """A bare 429 for `permit` (still in flight), seen at `now`: lower the limit, end slow start.

        The server was holding the requests sent before this one and still in flight, and
        refused one more: that count is its cap. A 429 for a request sent before the last
        decrease belongs to the same event and cannot push the limit further than that count.
        """
        older = sum(1 for seq in self._permits if seq < permit.seq)
        target = float(older) if older else self.limit * DECREASE_FACTOR
        if permit.sent_at >= self._last_decrease:
            target = min(target, self.limit * DECREASE_FACTOR)
            self._last_decrease = now
        new = max(1.0, min(self.limit, math.floor(target)))
        if new < self.limit:
            log.info("bare 429: in-flight limit %d -> %d", int(self.limit), int(new))
        self.limit, self._slow_start, self._successes = new, False, 0


class Limiter:
    """The gates and the shared pause. One per run, used from one event loop.

    Composes a `RateBudget` (`budget`; by default a `LocalRateBudget` built from `rpm`, `tpm` and
    `max_pause_s`, which are ignored when a budget is given) and an `AdaptiveConcurrency`
    (`concurrency`), and owns the FIFO line and the 429 strikes with their backoff.
    """

    def __init__(self, concurrency: int, *, rpm: int | None = None, tpm: int | None = None,
                 backoff_base_s: float = 1.0, max_pause_s: float = 60.0, seed: int | None = None,
                 budget: RateBudget | None = None):
        self._random = random.Random(seed)  # backoff factors; also the default budget's jitter
        if budget is None:
            budget = LocalRateBudget(rpm, tpm, max_pause_s=max_pause_s, rng=self._random, now=time.monotonic())
        self.budget = budget
        self.concurrency = AdaptiveConcurrency(concurrency)
        self._backoff_base_s = backoff_base_s
        self._strikes = 0  # 429s since the last success
        self._gate = asyncio.Lock()  # FIFO: one waiter at a time checks the gates
        self._freed = asyncio.Event()
        self.rate_limited = 0  # 429s seen, for progress

    @property
    def in_flight(self) -> int:
        """Requests in flight now."""
        return self.concurrency.count

    @property
    def limit(self) -> float:
        """The current in-flight limit, requests (a float; `int(limit)` may be in flight)."""
        return self.concurrency.limit

    @property
    def max_concurrency(self) -> int:
        """The job's concurrency: the in-flight limit never grows above it."""
        return self.concurrency.max_concurrency

    @property
    def requests(self) -> TokenBucket | None:
        """The RPM bucket of a local budget; None when there is none (no limit, or a remote budget)."""
        return getattr(self.budget, "requests", None)

    @property
    def tokens(self) -> TokenBucket | None:
        """The TPM bucket of a local budget; None when there is none (no limit, or a remote budget)."""
        return getattr(self.budget, "tokens", None)

    async def acquire(self, tokens: int) -> Permit:
        """Wait until the pause is over, a slot is free and both buckets have room; take them."""
        async with self._gate:
            while True:
                now = time.monotonic()
                if self.budget.pause_s(now) <= 0 and self.concurrency.full:
                    self._freed.clear()
                    await self._freed.wait()
                    continue
                wait = self.budget.try_take(tokens, now)
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
                return self.concurrency.admit(tokens, now)

    def release(self, permit: Permit, *, used_tokens: int | None = None) -> None:
        """The request ended: free its slot; settle its tokens when the real count is known."""
        self.concurrency.release(permit)
        if used_tokens is not None:
            self.budget.settle(permit.tokens, used_tokens, time.monotonic())
        self._freed.set()

    def observe(self, info: RateInfo) -> None:
        """Learn limits from a response's headers and follow the server's remaining counts."""
        self.budget.observe(info, time.monotonic())

    def on_success(self) -> None:
        """A request succeeded: reset the 429 strikes; grow the in-flight limit if it is time."""
        self._strikes = 0
        self.concurrency.on_success()

    def on_rate_limited(self, permit: Permit, retry_after_s: float | None, *, hinted: bool) -> None:
        """A 429 for `permit`: pause everyone for the server's wait, or lower concurrency.

        `hinted` says whether the 429 carried rate-limit headers. Without a wait and without
        headers it is taken as a concurrency cap; several in a row also pause, with backoff.
        """
        self.rate_limited += 1
        self._strikes += 1
        if retry_after_s is not None:
            self.budget.pause(retry_after_s, "the server's retry-after", time.monotonic())
        elif hinted or self._strikes >= BARE_STRIKES_BEFORE_PAUSE:
            wait = self._backoff_base_s * 2 ** min(self._strikes - 1, 16) * self._random.uniform(0.5, 1.0)
            self.budget.pause(wait, "backoff, no wait named by the server", time.monotonic())
        if not hinted:
            self.concurrency.on_bare_429(permit, time.monotonic())
