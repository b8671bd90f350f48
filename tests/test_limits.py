"""The limiter: bucket arithmetic, learned limits, the shared pause, adaptive concurrency.

The rate budget and the in-flight limit are tested as arithmetic, with explicit clock values;
the Limiter that composes them, with the real clock and an event loop."""

from __future__ import annotations

import asyncio
import math
import random
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.engine.limits import (
    DECREASE_FACTOR,
    INITIAL_CONCURRENCY,
    JITTER_FRACTION,
    MAX_JITTER_S,
    PROBE_ROUNDS,
    AdaptiveConcurrency,
    Limiter,
    LocalRateBudget,
    Permit,
    RateBudget,
    TokenBucket,
)
from pipeline.providers.openai.errors import parse_rate_info
from pipeline.records import RateInfo


def test_bucket_refills_continuously_up_to_capacity():
    bucket = TokenBucket(600, now=0.0)  # 10 per second
    bucket.take(600, now=0.0)
    assert bucket.wait_s(1, now=0.0) == pytest.approx(0.1)
    assert bucket.wait_s(5, now=0.2) == pytest.approx(0.3)
    bucket.refill(now=1000.0)
    assert bucket.level == 600


def test_bucket_debt_and_oversized_requests():
    bucket = TokenBucket(60, now=0.0)  # 1 per second
    bucket.take(70, now=0.0)  # settled above what was reserved: a debt of 10
    assert bucket.level == -10 and bucket.wait_s(1, now=0.0) == pytest.approx(11)
    assert bucket.wait_s(500, now=70.0) == 0.0  # bigger than capacity: goes when the bucket is full


def test_bucket_follows_the_server_downwards_only():
    bucket = TokenBucket(100, now=0.0)
    bucket.correct(40, now=0.0)
    assert bucket.level == 40
    bucket.correct(90, now=0.0)
    assert bucket.level == 40
    bucket.resize(20, now=0.0)
    assert (bucket.capacity, bucket.level) == (20, 20)


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "599",
          "x-ratelimit-reset-requests": "100ms"}, RateInfo(600, 599, None, None)),
        ({"X-RateLimit-Limit-Tokens": "30000", "X-RateLimit-Remaining-Tokens": "0"}, RateInfo(None, None, 30000, 0)),
        ({"x-ratelimit-limit-requests": "lots"}, None),
        ({"content-type": "application/json"}, None),
    ],
    ids=["requests", "tokens-any-case", "garbage", "none"],
)
def test_parse_rate_info(headers, expected):
    assert parse_rate_info(headers) == expected


def test_limits_are_learned_from_headers_unless_the_job_sets_them():
    async def scenario():
        learned = Limiter(8)
        learned.observe(RateInfo(limit_requests=600, remaining_requests=10, limit_tokens=90_000, remaining_tokens=500))
        assert learned.requests.capacity == 600 and learned.requests.level <= 10
        assert learned.tokens.capacity == 90_000 and learned.tokens.level <= 500
        fixed = Limiter(8, rpm=100)
        fixed.observe(RateInfo(limit_requests=600, remaining_requests=50))
        assert fixed.requests.capacity == 100 and fixed.requests.level <= 50

    asyncio.run(scenario())


def test_tokens_are_reserved_then_settled():
    async def scenario():
        limiter = Limiter(8, tpm=6000)
        permit = await limiter.acquire(1000)
        assert limiter.tokens.level == pytest.approx(5000, abs=5)
        limiter.release(permit, used_tokens=400)
        assert limiter.tokens.level == pytest.approx(5600, abs=5)

    asyncio.run(scenario())


def test_one_429_pauses_every_waiter_until_the_named_time():
    async def scenario():
        limiter = Limiter(8, seed=1)
        first = await limiter.acquire(1)
        limiter.on_rate_limited(first, 0.3, hinted=True)
        limiter.release(first)
        started = time.monotonic()
        permits = await asyncio.gather(*(limiter.acquire(1) for _ in range(4)))
        waited = time.monotonic() - started
        assert waited >= 0.3 - 0.01  # nobody went before the pause ended
        assert limiter.rate_limited == 1 and limiter.in_flight == 4
        for permit in permits:
            limiter.release(permit)

    asyncio.run(scenario())


def test_slow_start_doubles_then_a_bare_429_sets_the_limit_to_what_the_server_held():
    async def scenario():
        limiter = Limiter(64)
        assert limiter.limit == INITIAL_CONCURRENCY
        first = [await limiter.acquire(1) for _ in range(8)]
        for permit in first:
            limiter.release(permit)
            limiter.on_success()
        assert limiter.limit == 16
        held = [await limiter.acquire(1) for _ in range(8)]  # the server holds these...
        refused = [await limiter.acquire(1) for _ in range(8)]  # ...and refuses these with a bare 429
        for permit in refused:
            limiter.on_rate_limited(permit, None, hinted=False)
            limiter.release(permit)
        assert limiter.limit == 8  # not 16 * 0.9 ** 8: one event, one decrease
        for permit in held:
            limiter.release(permit)
            limiter.on_success()
        assert limiter.limit == 8  # additive increase waits for limit × PROBE_ROUNDS successes

    asyncio.run(scenario())


def test_a_slot_is_not_held_while_waiting_for_a_free_one():
    async def scenario():
        limiter = Limiter(1)
        permit = await limiter.acquire(1)
        waiter = asyncio.create_task(limiter.acquire(1))
        await asyncio.sleep(0)
        assert not waiter.done() and limiter.in_flight == 1
        limiter.release(permit)
        second = await asyncio.wait_for(waiter, 1)
        assert limiter.in_flight == 1
        limiter.release(second)

    asyncio.run(scenario())


def test_relay_concurrency_cap_is_found_over_loopback(server, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    source = Path(__file__).parent.parent / "sample_data" / "coffee_cup.jpg"
    for i in range(40):
        (folder / f"{i:02d}.jpg").write_bytes(source.read_bytes() + f"copy {i}".encode())  # distinct: no dedupe
    server.set_latency(0.05)
    server.rate_limit(concurrency=3, headers=False)
    code = main(["run", str(folder), "--job", str(Path(__file__).parent.parent / "jobs" / "demo.toml"),
                 "--out", str(tmp_path / "out"), "--base-url", server.base_url, "--concurrency", "16",
                 "--no-progress", "--retry-base-s", "0.01", "--max-attempts", "20"])
    assert code == 0, capsys.readouterr().err
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert len(rows) == 40 and all(r["status"] == "ok" for r in rows)
    seen = server.observed()
    limited = [o for o in seen if o.status == 429]
    assert limited, "the server never refused a request: the scenario did not test finding a cap"
    assert all(o.fault == "concurrency" for o in limited)
    assert len(seen) == 40 + len(limited)  # every refused request was sent again, once per 429
    assert len(limited) <= 12  # the first over-the-cap burst, then rare probes: not one 429 per request


# -- LocalRateBudget through the RateBudget interface: explicit clock values, no sleeping -----------


class _MaxJitter:
    """A random source whose every draw is the top of its range: the jitter is exactly its bound."""

    def uniform(self, low: float, high: float) -> float:
        return high


@pytest.mark.parametrize(
    "rpm, tpm, taken, tokens, now, expected",
    [
        (None, None, [(10**6, 0.0)], 10**9, 0.0, 0.0),  # no limits: always now
        (60, None, [(1, 0.0)] * 60, 1, 0.0, 1.0),  # RPM empty: one request refills in 1 s
        (60, None, [(1, 0.0)] * 60, 1, 0.25, 0.75),  # ...and the clock counts towards it
        (60, None, [(1, 0.0)] * 60, 1, 1.0, 0.0),
        (None, 600, [(600, 0.0)], 100, 0.0, 10.0),  # TPM at 10 tokens/s
        (None, 600, [(600, 0.0)], 100, 4.0, 6.0),
        (None, 600, [(300, 0.0), (300, 10.0)], 600, 10.0, 50.0),  # 100 refilled in between: 100 left
        (600, 600, [(600, 0.0)], 50, 0.0, 5.0),  # the slower of the two buckets decides
        (None, 600, [], 5000, 0.0, 0.0),  # bigger than capacity: goes when the bucket is full...
        (None, 600, [(1, 0.0)], 5000, 0.0, 0.1),  # ...and only then
    ],
    ids=["unlimited", "rpm-empty", "rpm-partly-refilled", "rpm-refilled", "tpm-empty", "tpm-partly-refilled",
         "tpm-two-takes", "slower-bucket", "oversized-full", "oversized-not-full"],
)
def test_budget_wait_is_bucket_arithmetic(rpm, tpm, taken, tokens, now, expected):
    budget: RateBudget = LocalRateBudget(rpm, tpm, now=0.0)
    for amount, at in taken:
        budget.take(amount, at)
    assert budget.wait_s(tokens, now) == pytest.approx(expected)


@pytest.mark.parametrize(
    "tpm, reserve, tokens, now, expected_wait, expected_level",
    [
        (600, 600, 100, 0.0, 10.0, 0.0),  # no room: nothing taken
        (600, 500, 100, 0.0, 0.0, 0.0),  # room: taken
        (600, 600, 100, 10.0, 0.0, 0.0),  # room again after 10 s: taken
    ],
)
def test_budget_try_take_takes_only_when_the_request_may_go(tpm, reserve, tokens, now, expected_wait, expected_level):
    budget = LocalRateBudget(rpm=60, tpm=tpm, now=0.0)
    budget.take(reserve, 0.0)
    requests_before = budget.requests.level
    assert budget.try_take(tokens, now) == pytest.approx(expected_wait)
    assert budget.tokens.level == pytest.approx(expected_level)
    taken = 1 if expected_wait == 0 else 0
    assert budget.requests.level == pytest.approx(min(60, requests_before + now) - taken)


@pytest.mark.parametrize(
    "reserved, used, tokens, expected_wait",
    [
        (1000, 1000, 6000, 10.0),  # as estimated: 5000 left of 6000 at 100 tokens/s
        (1000, 400, 6000, 4.0),  # used less: the difference comes back
        (1000, 1500, 6000, 15.0),  # used more: charged
        (1000, 7000, 1, 10.01),  # far more: a debt of 1000 to refill before even 1 token
        (1000, None, 6000, 10.0),  # never settled: the reservation stands
    ],
    ids=["exact", "refund", "charge", "debt", "unsettled"],
)
def test_budget_settles_reserved_against_used_tokens(reserved, used, tokens, expected_wait):
    budget = LocalRateBudget(tpm=6000, now=0.0)
    budget.take(reserved, 0.0)
    if used is not None:
        budget.settle(reserved, used, 0.0)
    assert budget.wait_s(tokens, 0.0) == pytest.approx(expected_wait)


def test_budget_settle_without_a_token_limit_is_a_no_op():
    budget = LocalRateBudget(rpm=60, now=0.0)
    budget.settle(10, 10**6, 0.0)
    assert budget.tokens is None and budget.wait_s(10**6, 0.0) == 0.0


@pytest.mark.parametrize(
    "rpm, tpm, info, requests, tokens",
    [
        (None, None, RateInfo(600, 10, 90_000, 500), (600, 10), (90_000, 500)),  # learned, corrected down
        (None, None, RateInfo(600, None, None, None), (600, 600), None),  # learned full; no TPM said
        (100, None, RateInfo(600, 50, None, None), (100, 50), None),  # fixed by the job: only corrected
        (100, None, RateInfo(600, 500, None, None), (100, 100), None),  # never corrected upwards
        (None, 6000, RateInfo(None, None, None, 7000), None, (6000, 6000)),
        (None, None, RateInfo(None, 5, None, 5), None, None),  # remaining without a limit: nothing to follow
    ],
    ids=["learned", "learned-full", "fixed-corrected", "fixed-not-raised", "tpm-not-raised", "no-limits"],
)
def test_budget_learns_and_follows_the_servers_headers(rpm, tpm, info, requests, tokens):
    budget = LocalRateBudget(rpm, tpm, now=0.0)
    budget.observe(info, 0.0)
    assert _capacity_and_level(budget.requests) == requests and _capacity_and_level(budget.tokens) == tokens


def _capacity_and_level(bucket: TokenBucket | None) -> tuple[float, float] | None:
    return None if bucket is None else (bucket.capacity, bucket.level)


def test_budget_resizes_to_a_changed_learned_limit():
    budget = LocalRateBudget(now=0.0)
    budget.observe(RateInfo(limit_requests=600), 0.0)
    budget.observe(RateInfo(limit_requests=60), 0.0)
    assert (budget.requests.capacity, budget.requests.level) == (60, 60)
    assert budget.wait_s(1, 0.0) == 0.0


@pytest.mark.parametrize(
    "pauses, max_pause_s, now, expected",
    [
        ([(2.0, 0.0)], 60.0, 0.5, 1.5),
        ([(2.0, 0.0)], 60.0, 2.0, 0.0),  # over
        ([(5.0, 0.0), (1.0, 1.0)], 60.0, 1.0, 4.0),  # a shorter pause does not cut a longer one
        ([(1.0, 0.0), (5.0, 0.5)], 60.0, 0.5, 5.0),  # a longer one extends it
        ([(10.0, 0.0)], 3.0, 0.0, 3.0),  # capped at max_pause_s
        ([], 60.0, 0.0, 0.0),
    ],
    ids=["on", "over", "shorter-ignored", "longer-extends", "capped", "none"],
)
def test_budget_shared_pause(pauses, max_pause_s, now, expected):
    budget = LocalRateBudget(max_pause_s=max_pause_s, rng=_MaxJitter(), now=0.0)
    for wait, at in pauses:
        budget.pause(wait, "test", at)
    assert budget.pause_s(now) == pytest.approx(expected)


@pytest.mark.parametrize(
    "pause_s, now, tpm_taken, expected",
    [
        (2.0, 0.5, 0, 1.5 + JITTER_FRACTION * 2.0),  # the rest of the pause, plus jitter
        (30.0, 10.0, 0, 20.0 + MAX_JITTER_S),  # jitter is capped
        (2.0, 2.0, 0, 0.0),  # over: no jitter either
        (2.0, 0.0, 600, 60.0),  # a bucket that waits longer than the pause decides
    ],
    ids=["jitter", "jitter-capped", "over", "bucket-longer"],
)
def test_budget_wait_covers_the_pause_with_jitter(pause_s, now, tpm_taken, expected):
    budget = LocalRateBudget(tpm=600, rng=_MaxJitter(), now=0.0)
    budget.take(tpm_taken, 0.0)
    budget.pause(pause_s, "test", 0.0)
    assert budget.wait_s(600, now) == pytest.approx(expected)
    level = budget.tokens.level
    assert budget.try_take(600, now) == pytest.approx(expected)  # must wait: try_take charges nothing
    assert budget.tokens.level == (level if expected else level - 600)


def test_budget_jitter_stays_within_its_bound():
    budget = LocalRateBudget(rng=random.Random(7), now=0.0)
    budget.pause(4.0, "test", 0.0)
    waits = [budget.wait_s(1, 1.0) for _ in range(200)]
    assert all(3.0 <= w <= 3.0 + JITTER_FRACTION * 4.0 for w in waits) and len(set(waits)) > 1


# -- AdaptiveConcurrency: slow start, the bare-429 decrease, probing ------------------------------


def _round_trip(concurrency: AdaptiveConcurrency, now: float) -> None:
    """Send as many requests as the limit allows; all succeed."""
    permits = [concurrency.admit(1, now) for _ in range(int(concurrency.limit))]
    assert concurrency.full
    for permit in permits:
        concurrency.release(permit)
        concurrency.on_success()


@pytest.mark.parametrize(
    "max_concurrency, limits",
    [
        (64, [8, 16, 32, 64, 64]),
        (20, [8, 16, 20, 20]),
        (8, [8, 8]),
        (3, [3, 3]),
        (1, [1, 1]),
    ],
)
def test_slow_start_doubles_each_round_trip_up_to_the_jobs_concurrency(max_concurrency, limits):
    concurrency = AdaptiveConcurrency(max_concurrency)
    seen = [concurrency.limit]
    for round_ in range(len(limits) - 1):
        _round_trip(concurrency, now=float(round_ + 1))
        seen.append(concurrency.limit)
    assert seen == limits and concurrency.count == 0


def _bare_429_setup(held: int) -> tuple[AdaptiveConcurrency, list[Permit], list[Permit]]:
    """Limit 16 after one round trip; `held` requests sent at t=10 (the server holds them), then 8
    at t=11 that it refuses. Returns the concurrency, the held permits and the refused ones."""
    concurrency = AdaptiveConcurrency(64)
    _round_trip(concurrency, now=1.0)
    holding = [concurrency.admit(1, 10.0) for _ in range(held)]
    refused = [concurrency.admit(1, 11.0) for _ in range(8)]
    return concurrency, holding, refused


@pytest.mark.parametrize(
    "held, expected",
    [
        (8, 8),  # the server held 8 and refused the 9th: its cap is 8
        (3, 3),
        (1, 1),
        (15, 14),  # more held than 0.9 × limit: a new event still cuts by DECREASE_FACTOR
        (0, 14),  # nothing older in flight: 0.9 × 16, rounded down
    ],
)
def test_a_bare_429_lowers_the_limit_to_what_the_server_held(held, expected):
    concurrency, _, refused = _bare_429_setup(held)
    assert concurrency.limit == 16
    concurrency.on_bare_429(refused[0], now=12.0)
    assert concurrency.limit == expected == max(1, min(held or 99, math.floor(16 * DECREASE_FACTOR)))


def test_a_burst_of_bare_429s_is_one_decrease():
    concurrency, _, refused = _bare_429_setup(held=8)
    for i, permit in enumerate(refused):  # all sent before the first 429 was seen: one event
        concurrency.on_bare_429(permit, now=12.0 + i)
        concurrency.release(permit)
    assert concurrency.limit == 8  # not 16 × 0.9 ** 8
    later = concurrency.admit(1, 30.0)  # sent after the decrease: a new event, cut again
    concurrency.on_bare_429(later, now=31.0)
    assert concurrency.limit == math.floor(8 * DECREASE_FACTOR)


def test_a_bare_429_never_lowers_the_limit_below_one():
    concurrency = AdaptiveConcurrency(1)
    permit = concurrency.admit(1, 1.0)
    concurrency.on_bare_429(permit, now=2.0)
    assert concurrency.limit == 1


@pytest.mark.parametrize("held", [1, 3, 8])
def test_after_a_decrease_the_limit_grows_by_one_per_probe_rounds_round_trips(held):
    concurrency, holding, refused = _bare_429_setup(held)
    concurrency.on_bare_429(refused[0], now=12.0)
    for permit in refused + holding:
        concurrency.release(permit)
    assert concurrency.limit == held and concurrency.count == 0
    for _ in range(held * PROBE_ROUNDS - 1):
        concurrency.on_success()
    assert concurrency.limit == held  # additive increase waits for limit × PROBE_ROUNDS successes
    concurrency.on_success()
    assert concurrency.limit == held + 1


def test_concurrency_counts_permits_in_flight():
    concurrency = AdaptiveConcurrency(2)
    first, second = concurrency.admit(5, 1.0), concurrency.admit(7, 2.0)
    assert (first.seq, first.sent_at, first.tokens) == (1, 1.0, 5) and second.seq == 2
    assert concurrency.count == 2 and concurrency.full
    concurrency.release(first)
    concurrency.release(first)  # twice is harmless
    assert concurrency.count == 1 and not concurrency.full


# -- Limiter: the composition, with an injected budget ---------------------------------------------


class _RecordingBudget(RateBudget):
    """A budget that always lets requests go and records what the Limiter asked of it."""

    def __init__(self):
        self.calls: list[tuple] = []

    def pause_s(self, now):
        return 0.0

    def wait_s(self, tokens, now):
        return 0.0

    def take(self, tokens, now):
        self.calls.append(("take", tokens))

    def settle(self, reserved, used, now):
        self.calls.append(("settle", reserved, used))

    def observe(self, info, now):
        self.calls.append(("observe", info))

    def pause(self, wait_s, why, now):
        self.calls.append(("pause", wait_s))


def test_the_limiter_uses_an_injected_budget():
    async def scenario():
        budget = _RecordingBudget()
        limiter = Limiter(4, rpm=1, tpm=1, budget=budget)  # rpm/tpm are the default budget's: ignored
        assert limiter.budget is budget and limiter.requests is None and limiter.tokens is None
        permit = await limiter.acquire(1000)
        info = RateInfo(limit_requests=600)
        limiter.observe(info)
        limiter.on_rate_limited(permit, 2.5, hinted=True)
        limiter.release(permit, used_tokens=400)
        other = await limiter.acquire(10)
        limiter.release(other)
        assert budget.calls == [("take", 1000), ("observe", info), ("pause", 2.5), ("settle", 1000, 400),
                                ("take", 10)]
        assert limiter.rate_limited == 1 and limiter.in_flight == 0 and limiter.max_concurrency == 4

    asyncio.run(scenario())


def test_limiter_backoff_pauses_after_bare_strikes_and_a_success_resets_them():
    async def scenario():
        budget = _RecordingBudget()
        limiter = Limiter(8, backoff_base_s=1.0, seed=3, budget=budget)
        permits = [await limiter.acquire(1) for _ in range(4)]
        for permit in permits[1:]:
            limiter.on_rate_limited(permit, None, hinted=False)
        pauses = [call[1] for call in budget.calls if call[0] == "pause"]
        assert len(pauses) == 1 and 2.0 <= pauses[0] <= 4.0  # the 3rd strike: base × 2 ** 2 × [0.5, 1]
        limiter.on_success()
        limiter.on_rate_limited(permits[0], None, hinted=True)  # a hinted 429 backs off from strike 1
        pauses = [call[1] for call in budget.calls if call[0] == "pause"]
        assert len(pauses) == 2 and 0.5 <= pauses[1] <= 1.0
        assert limiter.limit == 1  # the first bare 429 had one older request in flight

    asyncio.run(scenario())
