"""engine/ray_budget.py: one rate budget for a whole Ray cluster, and how a request actor uses it.

`ClusterBudget` is the body of one async Ray actor per run. It hosts the very `Limiter` the online
driver uses (limits.py: the RPM/TPM/RPS/TPS buckets, the learned limits, the token calibration, the
shared 429 pause, the strikes and the adaptive in-flight limit), so N machines together stay under
the account's limit whatever N is, and the in-flight limit is cluster-wide. Its clock is its own
process's `time.monotonic()`: every permit is granted, settled and expired there, so no two clocks
are ever compared.

`PermitBroker` is the request actor's side: the actor's requests ask it for permits, and it asks the
budget for all of them in one remote call (`ClusterBudget.acquire` waits for the first and adds every
further one that may go at once), so one round trip does not cost a request. What happened to each
request (its release with the tokens really used, the rate-limit headers, a success, a 429) goes back
in batches over a second channel, in order; a 429 waits for its answer (the refused request's own
wait), with everything reported before it. Each broker also says it is alive every HEARTBEAT_S; the
permits of one not heard of for SENDER_SILENCE_S (its process or node killed) are freed, so the
in-flight limit is whole again within seconds, and any permit out longer than any attempt may last
(`timeout_s` + PERMIT_TTL_MARGIN_S) is freed too, whoever holds it.

No HTTP, no rows: the request actor (ray_stages.py) sends, the driver (ray.py) writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..errors import RateLimitError
from ..job import Limits
from ..records import RateInfo
from .limits import Limiter, Permit

__all__ = ["ClusterBudget", "PermitBroker", "RateLimitFacts", "MAX_PERMITS_PER_CALL", "REPORT_EVERY_S"]

log = logging.getLogger(__name__)

MAX_PERMITS_PER_CALL = 64
"""The most permits one request actor asks the budget for in one call."""
REPORT_EVERY_S = 0.01
"""How long a request actor gathers releases and headers before it sends them (one call for many)."""
HEARTBEAT_S = 1.0
"""How often a request actor tells the budget it is alive."""
SENDER_SILENCE_S = 5.0
"""A request actor not heard of for this long died: the budget frees its permits."""
RETRY_BUDGET_S = 1.0
"""How long a request actor waits before it asks a budget that did not answer again."""
PERMIT_TTL_MARGIN_S = 30.0
"""A permit out longer than the job's `timeout_s` plus this belongs to a sender that died."""


@dataclass(frozen=True, slots=True)
class RateLimitFacts:
    """What the limiter reads of a `RateLimitError`, as a plain value that crosses processes
    (the error itself carries a server's message, which need not travel)."""

    retry_after_s: float | None
    window: str | None
    bucket: str | None
    limit: int | None
    exhausted: bool

    @classmethod
    def of(cls, err: RateLimitError) -> RateLimitFacts:
        return cls(err.retry_after_s, err.window, err.bucket, err.limit, err.exhausted)

    @property
    def explained(self) -> bool:
        """As `RateLimitError.explained`: a named window, or a bucket with nothing left."""
        return self.window is not None or self.exhausted


class ClusterBudget:
    """The run's one `Limiter`, served to every request actor (the body of an async Ray actor)."""

    def __init__(self, limits: Limits):
        self._limiter = Limiter(limits.concurrency, rpm=limits.rpm, tpm=limits.tpm, rps=limits.rps,
                                tps=limits.tps, backoff_base_s=limits.retry_base_s, max_pause_s=limits.retry_max_s)
        self._permit_ttl_s = limits.timeout_s + PERMIT_TTL_MARGIN_S
        self._halted: str | None = None
        self._reaper: asyncio.Task | None = None
        self._held: dict[str, dict[int, Permit]] = {}  # sender → its permits out, by seq
        self._seen: dict[str, float] = {}  # sender → when it was last heard of (monotonic s)
        self._reaped: dict[str, int] = {}  # sender → how often its permits were freed for its silence

    async def acquire(self, sender: str, wants: list[tuple[int, int, str]]) -> list[Permit] | None:
        """Permits for the first of `wants` ((tokens, fixed tokens, model) each) once it may go, and
        for as many of the next as may go at once, in order; None once the run is halted.

        [] (ask again) when `sender` went silent while it waited: a call outlives the process that
        made it, and the permits of a dead sender would never be released.
        """
        self._start_reaper()
        self._seen[sender] = time.monotonic()
        reaped = self._reaped.get(sender, 0)
        if self._halted is not None:
            return None
        tokens, fixed, model = wants[0]
        permits = [await self._limiter.acquire(tokens, fixed_tokens=fixed, model=model)]
        if self._halted is not None or self._reaped.get(sender, 0) != reaped:
            self._limiter.release(permits[0])
            return None if self._halted is not None else []
        for tokens, fixed, model in wants[1:]:
            permit = self._limiter.try_acquire(tokens, fixed_tokens=fixed, model=model)
            if permit is None:
                break
            permits.append(permit)
        held = self._held.setdefault(sender, {})
        held.update((permit.seq, permit) for permit in permits)
        return permits

    async def heartbeat(self, sender: str) -> None:
        """`sender` is alive (its permits are not to be freed)."""
        self._seen[sender] = time.monotonic()

    async def report(self, sender: str, events: list[tuple[Any, ...]]) -> list[float]:
        """Apply a request actor's events in order; the own waits of its 429s, in order.

        ("release", permit, used tokens or None), ("observe", RateInfo), ("success",),
        ("rate_limited", permit, RateLimitFacts).
        """
        self._seen[sender] = time.monotonic()
        waits = []
        for event in events:
            kind = event[0]
            if kind == "release":
                self._held.get(sender, {}).pop(event[1].seq, None)
                self._limiter.release(event[1], used_tokens=event[2])
            elif kind == "observe":
                self._limiter.observe(event[1])
            elif kind == "success":
                self._limiter.on_success()
            elif kind == "rate_limited":
                waits.append(self._limiter.on_rate_limited(event[1], event[2]))
        return waits

    async def halt(self, reason: str) -> None:
        """Grant no more permits (a fatal error, the same failure again and again, Ctrl-C)."""
        if self._halted is None:
            self._halted = reason
            log.info("budget halted: %s", reason)

    async def stats(self) -> dict[str, Any]:
        """For progress: 429s seen, requests in flight, the in-flight limit, the learned RPM and TPM."""
        limiter = self._limiter
        return {"rate_limited": limiter.rate_limited, "in_flight": limiter.in_flight, "limit": limiter.limit,
                "rpm": limiter.requests.capacity if limiter.requests else None,
                "tpm": limiter.tokens.capacity if limiter.tokens else None}

    def _start_reaper(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        """Every HEARTBEAT_S: free the permits of senders gone silent, and any permit out too long."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            now = time.monotonic()
            for sender, seen in list(self._seen.items()):
                if now - seen > SENDER_SILENCE_S:
                    del self._seen[sender]
                    self._reaped[sender] = self._reaped.get(sender, 0) + 1
                    lost = self._held.pop(sender, {})
                    for permit in lost.values():
                        self._limiter.release(permit)
                    if lost:
                        log.warning("a request actor went silent (killed?): its %d request(s) in flight are "
                                    "free again", len(lost))
            self._limiter.release_expired(self._permit_ttl_s)


@dataclass(slots=True)
class _Want:
    tokens: int
    fixed: int
    model: str
    granted: asyncio.Future


class BudgetHalted(Exception):
    """The budget grants no more permits: the run is stopping, and this request is not sent."""


class PermitBroker:
    """A request actor's way to the `ClusterBudget` (see the module docstring). One per event loop."""

    def __init__(self, budget: Any):
        self._budget = budget  # the actor handle
        self._wants: list[_Want] = []
        self._wanted = asyncio.Event()
        self._events: list[tuple[Any, ...]] = []
        self._reported = asyncio.Event()
        self._waiters: list[asyncio.Future] = []  # one per queued 429 event, answered in order
        self._id = uuid.uuid4().hex  # this sender, to the budget
        self._tasks = [asyncio.ensure_future(self._acquire_loop()), asyncio.ensure_future(self._report_loop()),
                       asyncio.ensure_future(self._heartbeat_loop())]
        self.halted = False

    async def permit(self, tokens: int, fixed: int, model: str) -> Permit:
        """Wait for a permit for one request; raises BudgetHalted once the run is stopping."""
        if self.halted:
            raise BudgetHalted
        want = _Want(tokens, fixed, model, asyncio.get_running_loop().create_future())
        self._wants.append(want)
        self._wanted.set()
        return await want.granted

    def release(self, permit: Permit, used_tokens: int | None) -> None:
        self._queue(("release", permit, used_tokens))

    def observe(self, info: RateInfo) -> None:
        self._queue(("observe", info))

    def success(self) -> None:
        self._queue(("success",))

    async def rate_limited(self, permit: Permit, err: RateLimitError) -> float:
        """Report a 429 for `permit` (still in flight); the seconds this request alone should wait."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._queue(("rate_limited", permit, RateLimitFacts.of(err)))
        return await waiter

    async def close(self) -> None:
        """Send what is queued, then stop."""
        if self._events:
            await self._send(self._take_events())
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _queue(self, event: tuple[Any, ...]) -> None:
        self._events.append(event)
        self._reported.set()

    def _take_events(self) -> tuple[list[tuple[Any, ...]], list[asyncio.Future]]:
        events, self._events = self._events, []
        count = sum(1 for event in events if event[0] == "rate_limited")
        waiters, self._waiters = self._waiters[:count], self._waiters[count:]
        return events, waiters

    async def _send(self, batch: tuple[list[tuple[Any, ...]], list[asyncio.Future]]) -> None:
        events, waiters = batch
        try:
            waits = await self._budget.report.remote(self._id, events)
        except Exception as err:  # the budget actor restarting: its fresh state does not need these
            log.warning("could not report to the rate budget (%s); carrying on", type(err).__name__)
            waits = [0.0] * len(waiters)
        for waiter, wait in zip(waiters, waits):
            if not waiter.done():
                waiter.set_result(wait)

    async def _report_loop(self) -> None:
        while True:
            await self._reported.wait()
            await asyncio.sleep(REPORT_EVERY_S)  # gather what else ends meanwhile into the same call
            self._reported.clear()
            await self._send(self._take_events())

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            self._budget.heartbeat.remote(self._id)  # not awaited: a slow budget must not stall this loop

    async def _acquire_loop(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            wants = [want for want in self._wants if not want.granted.done()][:MAX_PERMITS_PER_CALL]
            if not wants:
                self._wants = []
                continue
            try:
                permits = await self._budget.acquire.remote(self._id, [(w.tokens, w.fixed, w.model) for w in wants])
            except Exception as err:  # the budget actor lost and not back yet: ask again in a moment
                log.warning("the rate budget did not answer (%s); asking again", type(err).__name__)
                await asyncio.sleep(RETRY_BUDGET_S)
                self._wanted.set()
                continue
            if permits is None:
                self._halt()
                return
            for want, permit in zip(wants, permits):
                if want.granted.done():  # its request was cancelled meanwhile: give the slot back
                    self.release(permit, None)
                else:
                    want.granted.set_result(permit)
            self._wants = [want for want in self._wants if not want.granted.done()]
            if self._wants:
                self._wanted.set()

    def _halt(self) -> None:
        self.halted = True
        for want in self._wants:
            if not want.granted.done():
                want.granted.set_exception(BudgetHalted())
        self._wants = []
