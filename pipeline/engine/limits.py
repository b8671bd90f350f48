"""limits.py: how many requests may go now, and when.

Owns the gates that every request passes, in one FIFO line, before it is sent, in three pieces:

- `AdaptiveConcurrency`, local to the process that sends: 1. the in-flight limit, adaptive: it
  starts low and doubles per round trip (slow start), up to the job's `concurrency`; a 429 that no
  rate bucket explains while the budget has room (a relay, gateway or self-hosted server capping
  requests in flight, with or without a retry-after) lowers it to the number of older requests
  the server was holding at the time, and a long run of successes raises it by one (additive
  increase) to probe again.
- `RateBudget`, which may be shared by many senders (the in-process `LocalRateBudget`, or a remote
  one, e.g. the same object in a Ray actor): 2. requests and 3. tokens, per minute and per second,
  as token buckets refilled continuously, each from the job (`limits.rpm`/`tpm`/`rps`/`tps`) or
  learned (per minute from `x-ratelimit-limit-*`, per second from a 429 naming that window), and
  kept in step with the server's own bucket by `x-ratelimit-remaining-*` (corrected downwards only:
  the server counts at arrival, after us). A request reserves its tokens before it goes and settles
  with the real count after. And one shared pause: the first 429 that names a wait sets it, every
  worker waits on the same clock (plus a little jitter), so a burst of 429s costs one pause.
- `TokenCalibration` (calibration.py): how the server counts a request's tokens against the
  published formula, per model, learnt from the prompt tokens each answer reports; reservations
  follow it.

`Limiter` composes them for the online driver: the FIFO line (asyncio), where the first waiter
sleeps until it may go or until the budget changes (a settled request, corrected headers, a new
pause or limit), whichever is first; and the 429 strikes with their backoff. Knows nothing of
HTTP: the runner passes parsed `RateInfo`s, `RateLimitError`s and what happened. Time is
`time.monotonic()` seconds throughout; the budget and the concurrency take it as an argument
(`now`) so they can be tested as arithmetic and called remotely. See
https://platform.openai.com/docs/guides/rate-limits for how OpenAI counts.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import math
import random
import time
from collections import deque
from dataclasses import dataclass

from ..errors import RateLimitError
from ..records import RateInfo
from .calibration import MAX_USED_TOKENS, TokenCalibration

__all__ = ["AdaptiveConcurrency", "Limiter", "LocalRateBudget", "Permit", "RateBudget", "TokenBucket"]

log = logging.getLogger(__name__)

INITIAL_CONCURRENCY = 8
"""Slow start begins here (or at the job's concurrency, if lower) and doubles each round trip."""
DECREASE_FACTOR = 0.9
"""A new concurrency-cap event cuts the in-flight limit to at most this fraction of what it was."""
PROBE_ROUNDS = 8
"""After limit × PROBE_ROUNDS successes without a 429, try one more request in flight."""
MAX_PROBE_ROUNDS = 64
"""Each probe that finds the same cap again doubles the rounds before the next one, up to this."""
BARE_STRIKES_BEFORE_PAUSE = 3
"""Concurrency 429s without a wait in a row (no success between) before they also pause everyone."""
JITTER_FRACTION = 0.1
MAX_JITTER_S = 1.0
ROOM_FRACTION = 0.1
"""A budget has room when every bucket holds at least this share of its capacity."""
MINUTE_S, SECOND_S = 60.0, 1.0  # the windows a limit counts over


class TokenBucket:
    """A limit per window as a bucket of `capacity` that refills at capacity/window_s per second.

    The level may go negative when a settled request cost more than it reserved (a debt).
    """

    def __init__(self, limit: float, now: float, window_s: float = MINUTE_S):
        self.capacity = float(limit)
        self.level = float(limit)
        self.window_s = window_s
        self._updated = now

    @property
    def rate(self) -> float:
        """Refill rate, units per second."""
        return self.capacity / self.window_s

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

    def resize(self, limit: float, now: float) -> None:
        """A new limit (learned or changed): keep the level, bounded by the new capacity."""
        self.refill(now)
        self.capacity = float(limit)
        self.level = min(self.level, self.capacity)

    def has_room(self, now: float) -> bool:
        """True when at least ROOM_FRACTION of the capacity is left."""
        self.refill(now)
        return self.level >= ROOM_FRACTION * self.capacity


class RateBudget(abc.ABC):
    """The provider's rate limits as one budget: request and token buckets and the shared 429 pause.

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

    @abc.abstractmethod
    def has_room(self, now: float) -> bool:
        """True when no bucket is (nearly) empty: a 429 now is not one of ours to explain."""

    @abc.abstractmethod
    def learn_limit(self, bucket: str, window_s: float, limit: int, now: float) -> None:
        """A 429 named a limit of `limit` `bucket` ("requests" | "tokens") per `window_s` seconds."""


class LocalRateBudget(RateBudget):
    """The in-process `RateBudget`: up to four token buckets and the pause clock.

    `rpm`/`tpm`/`rps`/`tps` fixed by the job are kept whatever the server says; unset ones are
    learned. `rng` draws the pause jitter (a seeded one makes runs repeatable).
    """

    def __init__(self, rpm: int | None = None, tpm: int | None = None, *, rps: int | None = None,
                 tps: int | None = None, max_pause_s: float = 60.0, rng: random.Random | None = None,
                 now: float | None = None):
        now = time.monotonic() if now is None else now
        self._fixed = {"requests": rpm is not None, "tokens": tpm is not None,
                       "requests_per_s": rps is not None, "tokens_per_s": tps is not None}
        self.requests = TokenBucket(rpm, now) if rpm else None
        self.tokens = TokenBucket(tpm, now) if tpm else None
        self.requests_per_s = TokenBucket(rps, now, SECOND_S) if rps else None
        self.tokens_per_s = TokenBucket(tps, now, SECOND_S) if tps else None
        self._max_pause_s = max_pause_s
        self._random = rng if rng is not None else random.Random()
        self._pause_until = 0.0
        self._pause_len = 0.0

    def _buckets(self) -> list[tuple[TokenBucket, bool]]:
        """(bucket, counts tokens) for every bucket there is."""
        pairs = [(self.requests, False), (self.tokens, True), (self.requests_per_s, False), (self.tokens_per_s, True)]
        return [(bucket, tokens) for bucket, tokens in pairs if bucket is not None]

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
        return max([0.0, *(bucket.wait_s(tokens if counts_tokens else 1, now)
                           for bucket, counts_tokens in self._buckets())])

    def take(self, tokens: int, now: float) -> None:
        for bucket, counts_tokens in self._buckets():
            bucket.take(tokens if counts_tokens else 1, now)

    def settle(self, reserved: int, used: int, now: float) -> None:
        for bucket, counts_tokens in self._buckets():
            if counts_tokens:
                bucket.take(used - reserved, now)

    def observe(self, info: RateInfo, now: float) -> None:
        self.requests = _follow(self.requests, self._fixed["requests"], info.limit_requests,
                                info.remaining_requests, now)
        self.tokens = _follow(self.tokens, self._fixed["tokens"], info.limit_tokens, info.remaining_tokens, now)

    def pause(self, wait_s: float, why: str, now: float) -> None:
        wait_s = min(wait_s, self._max_pause_s)
        if now + wait_s > self._pause_until:
            self._pause_until, self._pause_len = now + wait_s, wait_s
            log.info("rate limited: all workers pause %.2f s (%s)", wait_s, why)

    def has_room(self, now: float) -> bool:
        return all(bucket.has_room(now) for bucket, _ in self._buckets())

    def learn_limit(self, bucket: str, window_s: float, limit: int, now: float) -> None:
        """Only per-second limits are learned here (per-minute ones come with headers); a learned
        limit only ever falls, and starts empty: the server just said its window is full."""
        name = {("requests", SECOND_S): "requests_per_s", ("tokens", SECOND_S): "tokens_per_s"}.get((bucket, window_s))
        if name is None or self._fixed[name] or limit < 1:
            return
        current: TokenBucket | None = getattr(self, name)
        if current is None:
            log.info("learned a limit of %d %s per second from a 429", limit, bucket)
            current = TokenBucket(limit, now, window_s)
            current.level = 0.0
            setattr(self, name, current)
        elif limit < current.capacity:
            log.info("%s per second: limit %d -> %d (a 429 said so)", bucket, int(current.capacity), limit)
            current.resize(limit, now)


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
    """One request's place: its order, when it went, the tokens it reserved and how they were estimated."""

    seq: int
    sent_at: float
    tokens: int  # reserved (calibrated)
    estimate: int = 0  # the formula's count, the calibration's input; 0: none
    fixed: int = 0  # of which text + max_tokens
    model: str = ""


class AdaptiveConcurrency:
    """The in-flight limit of one sender and the permits it has out. Plain arithmetic, no waiting."""

    def __init__(self, max_concurrency: int):
        self.max_concurrency = max_concurrency
        self.limit = float(min(max_concurrency, INITIAL_CONCURRENCY))  # requests; int(limit) may be out
        self._slow_start = True
        self._successes = 0  # since the last change of the in-flight limit
        self._last_decrease = 0.0
        self._probe_rounds = PROBE_ROUNDS  # doubles while probes keep finding the same cap
        self._cap: float | None = None  # the limit the last cap event set
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

    def admit(self, tokens: int, now: float, *, estimate: int = 0, fixed: int = 0, model: str = "") -> Permit:
        """Count one more request in flight, sent at `now` with `tokens` reserved; return its permit."""
        self._seq += 1
        permit = Permit(self._seq, now, tokens, estimate, fixed, model)
        self._permits[permit.seq] = permit
        return permit

    def release(self, permit: Permit) -> None:
        """The request ended: it is no longer in flight (releasing twice is harmless)."""
        self._permits.pop(permit.seq, None)

    def expired(self, older_than_s: float, now: float) -> list[Permit]:
        """Release and return the permits sent more than `older_than_s` before `now`.

        For a budget shared by senders in other processes: a sender that died (its process or
        node killed) never releases its permits, and without this they would hold the in-flight
        limit down for the rest of the run.
        """
        stale = [permit for permit in self._permits.values() if permit.sent_at < now - older_than_s]
        for permit in stale:
            self.release(permit)
        return stale

    def on_success(self) -> None:
        """A request succeeded: grow the limit by one while in slow start or after a long run of them."""
        self._successes += 1
        if self.limit >= self.max_concurrency:
            return
        if self._slow_start or self._successes >= self.limit * self._probe_rounds:
            self.limit = min(self.max_concurrency, self.limit + 1)
            self._successes = 0 if not self._slow_start else self._successes

    def on_concurrency_429(self, permit: Permit, now: float) -> bool:
        """A concurrency cap's 429 for `permit` (still in flight), seen at `now`: lower the limit, end slow start.

        Returns True when it is a new event (the request was sent after the last decrease).

        The server was holding the requests sent before this one and still in flight, and
        refused one more: that count is its cap, and the limit goes to it (issue 14: "lower the
        in-flight limit to what the server was holding"). Only when that count explains nothing
        (none older in flight, or no fewer than the limit already allows) is the limit cut by
        DECREASE_FACTOR. A 429 for a request sent before the last decrease belongs to the same
        event and cannot push the limit further than that count. A probe that finds the same cap
        as the last event waits twice as long before the next.
        """
        older = sum(1 for seq in self._permits if seq < permit.seq)
        explained = 0 < older < self.limit
        target = float(older) if older else self.limit * DECREASE_FACTOR
        new_event = permit.sent_at >= self._last_decrease
        if new_event:
            if not explained:
                target = min(target, self.limit * DECREASE_FACTOR)
            self._last_decrease = now
        new = max(1.0, min(self.limit, math.floor(target)))
        if new_event:
            same = self._cap == new
            self._probe_rounds = min(MAX_PROBE_ROUNDS, self._probe_rounds * 2) if same else PROBE_ROUNDS
            self._cap = new
        if new < self.limit:
            log.info("429 from a concurrency cap: in-flight limit %d -> %d", int(self.limit), int(new))
        self.limit, self._slow_start, self._successes = new, False, 0
        return new_event


class Limiter:
    """The gates and the shared pause. One per run, used from one event loop.

    Composes a `RateBudget` (`budget`; by default a `LocalRateBudget` built from `rpm`, `tpm`,
    `rps`, `tps` and `max_pause_s`, which are ignored when a budget is given), an
    `AdaptiveConcurrency` (`concurrency`) and a `TokenCalibration`, and owns the FIFO line and the
    429 strikes with their backoff.
    """

    def __init__(self, concurrency: int, *, rpm: int | None = None, tpm: int | None = None, rps: int | None = None,
                 tps: int | None = None, backoff_base_s: float = 1.0, max_pause_s: float = 60.0,
                 seed: int | None = None, budget: RateBudget | None = None):
        self._random = random.Random(seed)  # backoff factors; also the default budget's jitter
        if budget is None:
            budget = LocalRateBudget(rpm, tpm, rps=rps, tps=tps, max_pause_s=max_pause_s, rng=self._random,
                                     now=time.monotonic())
        self.budget = budget
        self.concurrency = AdaptiveConcurrency(concurrency)
        self.calibration = TokenCalibration()
        self._backoff_base_s = backoff_base_s
        self._max_own_wait_s = max_pause_s  # a refused request's own wait is capped like a pause
        self._strikes = 0  # 429s since the last success
        self._gate = asyncio.Lock()  # FIFO: one waiter at a time checks the gates
        self._changed = asyncio.Event()  # set whenever the waiter at the gate may go sooner
        self._sent: deque[tuple[float, int]] = deque()  # (sent_at, tokens) of the last SECOND_S or so
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

    async def acquire(self, tokens: int, *, fixed_tokens: int = 0, model: str = "") -> Permit:
        """Wait until the pause is over, a slot is free and the buckets have room; take them.

        `tokens` is the formula's estimate, `fixed_tokens` its text + max_tokens part; what is
        reserved is that estimate as calibrated for `model` at the moment the request goes. The
        waiter recomputes its wait whenever the budget changes, so it never sleeps past its turn.
        """
        async with self._gate:
            while True:
                self._changed.clear()
                now = time.monotonic()
                if self.budget.pause_s(now) <= 0 and self.concurrency.full:
                    await self._changed.wait()
                    continue
                reserve = self.calibration.reserve(model, tokens, fixed_tokens)
                wait = self.budget.try_take(reserve, now)
                if wait > 0 and self.concurrency.count == 0 and 0 < fixed_tokens and not self.calibration.known(model):
                    reserve = fixed_tokens  # nothing in flight to learn from: one probe tells how the server counts
                    wait = self.budget.try_take(reserve, now)
                if wait <= 0:
                    self._note_sent(now, reserve)
                    return self.concurrency.admit(reserve, now, estimate=tokens, fixed=fixed_tokens, model=model)
                try:
                    await asyncio.wait_for(self._changed.wait(), wait)
                except asyncio.TimeoutError:
                    pass

    def try_acquire(self, tokens: int, *, fixed_tokens: int = 0, model: str = "") -> Permit | None:
        """A permit at once, as `acquire` would give it, or None: nobody is waiting in the line, a slot
        is free and the budget has room now. Never waits; lets one remote call fetch several permits."""
        now = time.monotonic()
        if self._gate.locked() or self.concurrency.full or self.budget.pause_s(now) > 0:
            return None
        reserve = self.calibration.reserve(model, tokens, fixed_tokens)
        if self.budget.try_take(reserve, now) > 0:
            return None
        self._note_sent(now, reserve)
        return self.concurrency.admit(reserve, now, estimate=tokens, fixed=fixed_tokens, model=model)

    def release_expired(self, older_than_s: float) -> int:
        """Free the slots of permits out longer than `older_than_s` (their sender died); how many."""
        stale = self.concurrency.expired(older_than_s, time.monotonic())
        if stale:
            log.warning("%d request(s) not heard of for %.0f s (their sender died?): their slots are free again",
                        len(stale), older_than_s)
            self._changed.set()
        return len(stale)

    def _note_sent(self, now: float, tokens: int) -> None:
        self._sent.append((now, tokens))
        while self._sent and self._sent[0][0] < now - 2 * SECOND_S:
            self._sent.popleft()

    def release(self, permit: Permit, *, used_tokens: int | None = None) -> None:
        """The request ended: free its slot; settle its tokens and calibrate when the real count is known."""
        self.concurrency.release(permit)
        if used_tokens is not None and not isinstance(used_tokens, bool) and 0 <= used_tokens <= MAX_USED_TOKENS:
            self.budget.settle(permit.tokens, used_tokens, time.monotonic())
            self.calibration.observe(permit.model, permit.estimate, permit.fixed, used_tokens)
        self._changed.set()

    def observe(self, info: RateInfo) -> None:
        """Learn limits from a response's headers and follow the server's remaining counts."""
        self.budget.observe(info, time.monotonic())
        self._changed.set()

    def on_success(self) -> None:
        """A request succeeded: reset the 429 strikes; grow the in-flight limit if it is time."""
        self._strikes = 0
        self.concurrency.on_success()
        self._changed.set()

    def on_rate_limited(self, permit: Permit, err: RateLimitError) -> float:
        """A 429 for `permit`: pause everyone for the server's wait, or lower concurrency if it is a cap.

        A 429 that a rate bucket explains (`err.explained`: its message names a window, or a header
        says a bucket is empty) pauses every sender, with backoff when it names no wait, and teaches
        a per-second limit it names. One that nothing explains while the budget has room (or there is
        none) is a cap on requests in flight, whatever its headers: the in-flight limit falls to what
        the server was holding, and its wait, if it names one, is honoured by the refused request
        alone; the requests the server is holding were not refused, and the ones after them are kept
        out by the lowered limit. Several such 429s in a row without a wait also pause, with backoff.

        Returns the seconds the refused request should wait before it is sent again (0.0 when the
        wait, if any, is the shared pause every request already waits for).
        """
        now = time.monotonic()
        self.rate_limited += 1
        capped = not err.explained and self.budget.has_room(now)
        # A strike is one event: the 429s of requests that were already in flight when the cap was
        # first met belong to that one event (a burst of 8 refused at once is one strike, not 8,
        # which would have meant a backoff of 2^7 s for everyone).
        new_event = self.concurrency.on_concurrency_429(permit, now) if capped else True
        self._strikes += new_event
        own_wait = 0.0
        if err.window == "second" and err.bucket is not None:
            self._learn_per_second(permit, err.bucket, err.limit, now)
        if err.retry_after_s is not None and capped:
            own_wait = min(err.retry_after_s, self._max_own_wait_s)
        elif err.retry_after_s is not None:
            self.budget.pause(err.retry_after_s, "the server's retry-after", now)
        elif not capped or (new_event and self._strikes >= BARE_STRIKES_BEFORE_PAUSE):
            wait = self._backoff_base_s * 2 ** min(max(self._strikes, 1) - 1, 16) * self._random.uniform(0.5, 1.0)
            self.budget.pause(wait, "backoff, no wait named by the server", now)
        self._changed.set()
        return own_wait

    def _learn_per_second(self, permit: Permit, bucket: str, limit: int | None, now: float) -> None:
        """A 429 named a per-second window: its limit, else what went in the second before this request."""
        if limit is None:
            before = [tokens for sent_at, tokens in self._sent if permit.sent_at - SECOND_S <= sent_at < permit.sent_at]
            limit = max(1, len(before) if bucket == "requests" else sum(before))
        self.budget.learn_limit(bucket, SECOND_S, limit, now)
