"""The limiter: bucket arithmetic, learned limits, the shared pause, adaptive concurrency.

The rate budget and the in-flight limit are tested as arithmetic, with explicit clock values;
the Limiter that composes them, with the real clock and an event loop."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.engine.calibration import CALIBRATION_MIN_SAMPLES, MAX_USED_TOKENS, MIN_RATIO, TokenCalibration
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
from pipeline.errors import RateLimitError
from pipeline.providers.openai.errors import classify_response, parse_rate_info, parse_rate_window, request_id_of
from pipeline.records import RateInfo


def _tpm_429(retry_after_s: float | None) -> RateLimitError:
    """A 429 a tokens-per-minute bucket explains, with the server's wait."""
    return RateLimitError("Rate limit reached on tokens per min (TPM)", retry_after_s=retry_after_s,
                          window="minute", bucket="tokens", status=429)


def _cap_429(retry_after_s: float | None = None) -> RateLimitError:
    """A 429 nothing explains: a relay's cap on requests in flight."""
    return RateLimitError("Too many concurrent requests", retry_after_s=retry_after_s, status=429)


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
        limiter.on_rate_limited(first, _tpm_429(0.3))
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
            limiter.on_rate_limited(permit, _cap_429())
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
        (15, 15),  # more held than 0.9 × limit: still exactly what the server held, not 0.9 × 16
        (0, 14),  # nothing older in flight: 0.9 × 16, rounded down
    ],
)
def test_a_bare_429_lowers_the_limit_to_what_the_server_held(held, expected):
    concurrency, _, refused = _bare_429_setup(held)
    assert concurrency.limit == 16
    concurrency.on_concurrency_429(refused[0], now=12.0)
    assert concurrency.limit == expected == (held or math.floor(16 * DECREASE_FACTOR))


def test_a_burst_of_bare_429s_is_one_decrease():
    concurrency, _, refused = _bare_429_setup(held=8)
    for i, permit in enumerate(refused):  # all sent before the first 429 was seen: one event
        concurrency.on_concurrency_429(permit, now=12.0 + i)
        concurrency.release(permit)
    assert concurrency.limit == 8  # not 16 × 0.9 ** 8
    later = concurrency.admit(1, 30.0)  # sent after the decrease: a new event, cut again
    concurrency.on_concurrency_429(later, now=31.0)
    assert concurrency.limit == math.floor(8 * DECREASE_FACTOR)


def test_a_bare_429_never_lowers_the_limit_below_one():
    concurrency = AdaptiveConcurrency(1)
    permit = concurrency.admit(1, 1.0)
    concurrency.on_concurrency_429(permit, now=2.0)
    assert concurrency.limit == 1


@pytest.mark.parametrize("held", [1, 3, 8])
def test_after_a_decrease_the_limit_grows_by_one_per_probe_rounds_round_trips(held):
    concurrency, holding, refused = _bare_429_setup(held)
    concurrency.on_concurrency_429(refused[0], now=12.0)
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

    def has_room(self, now):
        return True

    def learn_limit(self, bucket, window_s, limit, now):
        self.calls.append(("learn", bucket, window_s, limit))


def test_the_limiter_uses_an_injected_budget():
    async def scenario():
        budget = _RecordingBudget()
        limiter = Limiter(4, rpm=1, tpm=1, budget=budget)  # rpm/tpm are the default budget's: ignored
        assert limiter.budget is budget and limiter.requests is None and limiter.tokens is None
        permit = await limiter.acquire(1000)
        info = RateInfo(limit_requests=600)
        limiter.observe(info)
        limiter.on_rate_limited(permit, _tpm_429(2.5))
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
        for _ in range(3):  # three events: each refused request was sent after the last decrease
            permit = await limiter.acquire(1)
            limiter.on_rate_limited(permit, _cap_429())
            limiter.release(permit)
        pauses = [call[1] for call in budget.calls if call[0] == "pause"]
        assert len(pauses) == 1 and 2.0 <= pauses[0] <= 4.0  # the 3rd strike: base × 2 ** 2 × [0.5, 1]
        assert limiter.limit == 5  # nothing older in flight each time: 8 × 0.9 → 7 → 6 → 5
        limiter.on_success()
        permit = await limiter.acquire(1)
        limiter.on_rate_limited(permit, _tpm_429(None))  # an explained 429 backs off from strike 1
        pauses = [call[1] for call in budget.calls if call[0] == "pause"]
        assert len(pauses) == 2 and 0.5 <= pauses[1] <= 1.0

    asyncio.run(scenario())


def test_a_burst_refused_together_is_one_strike_not_a_long_pause():
    # Slow start can have several requests beyond a relay's cap in flight when the first 429 comes
    # back: all of them are refused, and that is one event. Counted one strike each, eight of them
    # once paused every worker for 2 ** 7 s (capped at retry_max_s: the benchmark's 60 s gap).
    async def scenario():
        budget = _RecordingBudget()
        limiter = Limiter(64, backoff_base_s=1.0, seed=3, budget=budget)
        for _ in range(8):  # slow start: eight answers raise the in-flight limit from 8 to 16
            limiter.on_success()
        held = [await limiter.acquire(1) for _ in range(8)]
        refused = [await limiter.acquire(1) for _ in range(8)]
        for permit in refused:
            limiter.on_rate_limited(permit, _cap_429())
            limiter.release(permit)
        assert [call for call in budget.calls if call[0] == "pause"] == []
        assert limiter.limit == len(held)

    asyncio.run(scenario())


# -- Which 429s are a concurrency cap: the answer as classified, then what the limiter did -----------

OPENAI_TPM = ("Rate limit reached for gpt-4o-mini in organization org-x on tokens per min (TPM): Limit 30000, "
              "Used 29000, Requested 1500. Please try again in 20ms.")


def _answer_429(message: str | None, headers: dict[str, str]) -> RateLimitError:
    body = json.dumps({"error": {"message": message, "type": "requests", "code": "rate_limit_exceeded"}}).encode()
    err = classify_response(429, headers, body if message is not None else b"")
    assert isinstance(err, RateLimitError)
    return err


@pytest.mark.parametrize(
    "message, headers, tpm_left, lowered, pause_s",  # pause_s: the shared pause, or a cap's own wait
    [
        ("Too many concurrent requests", {"retry-after": "1", "retry-after-ms": "250"}, None, True, 0.25),
        (None, {}, None, True, 0.0),  # bare: no body, no headers
        ("concurrency limit exceeded, please retry later", {"x-ratelimit-limit-requests": "500"}, None, True, 0.0),
        ("Too many concurrent requests", {"retry-after": "2"}, 30_000, True, 2.0),  # the budget has room
        ("Too many requests", {"retry-after": "2"}, 0, False, 2.0),  # our own TPM bucket is empty: a rate
        (OPENAI_TPM, {}, None, False, 0.02),  # the wait is only in the message, the window names TPM
        (OPENAI_TPM, {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1s"}, None, False, 1.0),
        ("Slow down", {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "500ms"}, None, False, 0.5),
        ("This request would exceed the rate limit for your organization of 50 requests per minute", {}, None,
         False, None),
        ("Rate limit reached for m on requests per second (RPS): Limit 5, Used 5, Requested 1.", {}, None, False,
         None),
    ],
    ids=["relay-retry-after", "bare", "headers-but-no-cause", "relay-with-room", "own-bucket-empty",
         "tpm-message-20ms", "tokens-remaining-0", "requests-remaining-0", "anthropic-per-minute", "per-second"],
)
def test_which_429s_lower_the_in_flight_limit(message, headers, tpm_left, lowered, pause_s):
    async def scenario():
        limiter = Limiter(64, tpm=30_000 if tpm_left is not None else None, seed=0)
        held = [await limiter.acquire(100) for _ in range(4)]
        refused = await limiter.acquire(100)
        if tpm_left is not None:
            limiter.tokens.level = tpm_left
        before = limiter.limit
        own = limiter.on_rate_limited(refused, _answer_429(message, headers))
        assert (limiter.limit == len(held)) is lowered and (limiter.limit == before) is not lowered
        pause = limiter.budget.pause_s(time.monotonic())
        if lowered:  # a cap refused one request: its wait is that request's own, nobody else is paused
            assert pause == 0.0
        else:
            assert own == 0.0
        if pause_s is not None:  # None: a backoff of random length
            assert (own if lowered else pause) == pytest.approx(pause_s, abs=0.05)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "message, expected",
    [
        (OPENAI_TPM, ("minute", "tokens", 30000)),
        ("Rate limit reached for gpt-4o on requests per min (RPM): Limit 500, Used 500, Requested 1.",
         ("minute", "requests", 500)),
        ("rate limit of 1,000,000 tokens per minute exceeded; limit of 1,000,000", ("minute", "tokens", 1_000_000)),
        ("You have exceeded 600 RPM", ("minute", "requests", None)),
        ("Too many requests: 10 TPS allowed. Limit: 10", ("second", "tokens", 10)),
        ("requests per second (RPS): Limit 0", ("second", "requests", None)),  # a 0 limit is not believed
        ("Limit 99999999999999 requests per day", ("day", "requests", None)),  # neither is a huge one
        ("Too many concurrent requests", (None, None, None)),
        ("Please try again in 20ms", (None, None, None)),
        ("rpm exceeded", (None, None, None)),  # lower case is a word, not the abbreviation
    ],
    ids=["openai-tpm", "openai-rpm", "commas", "short-rpm", "tps", "zero", "huge", "concurrent", "wait-only",
         "lower-case"],
)
def test_parse_rate_window(message, expected):
    assert parse_rate_window(message) == expected


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({"x-request-id": "req_1", "llm_provider-x-request-id": "req_up"}, "req_1"),
        ({"llm_provider-x-request-id": "req_up"}, "req_up"),  # LiteLLM renames the upstream's
        ({"request-id": "req_a"}, "req_a"),
        ({}, None),
    ],
    ids=["own", "litellm", "anthropic-style", "none"],
)
def test_request_id_is_read_from_gateway_headers(headers, expected):
    assert request_id_of(headers) == expected
    err = classify_response(500, headers, b'{"error": {"message": "boom"}}')
    assert err.request_id == expected


def test_a_429_naming_a_per_second_limit_teaches_it():
    async def scenario():
        limiter = Limiter(16, seed=0)
        permit = await limiter.acquire(100)
        limiter.on_rate_limited(permit, _answer_429("on tokens per second (TPS): Limit 900, Used 900", {}))
        assert limiter.budget.tokens_per_s.capacity == 900 and limiter.limit == INITIAL_CONCURRENCY
        sent = [await limiter.acquire(100) for _ in range(3)]  # the bucket started empty: these waited
        unnamed = await limiter.acquire(1)
        limiter.on_rate_limited(unnamed, _answer_429("Too many requests per second", {}))
        assert limiter.budget.requests_per_s.capacity == len(sent) + 1  # what went in the second before it

    asyncio.run(scenario())


# -- Per-second buckets and waking: arithmetic, and a waiter that a release lets go at once -----------


def test_per_second_buckets_refill_per_second():
    budget = LocalRateBudget(rps=2, tps=1000, now=0.0)
    assert budget.try_take(400, 0.0) == 0.0 and budget.try_take(400, 0.0) == 0.0
    assert budget.wait_s(400, 0.0) == pytest.approx(0.5)  # the third request: RPS 2 refills one in 0.5 s
    assert budget.wait_s(400, 0.5) == pytest.approx(0.0) and not budget.has_room(0.0)
    assert budget.tokens_per_s.wait_s(1000, 0.5) == pytest.approx(0.3)  # 200 left + 500 refilled of 1000


def test_a_waiter_wakes_when_a_settled_request_hands_back_its_tokens():
    async def scenario():
        limiter = Limiter(8, tpm=6000)  # 100 tokens/s
        first = await limiter.acquire(6000)
        waiter = asyncio.create_task(limiter.acquire(1000))  # 10 s of refill away
        await asyncio.sleep(0.05)
        assert not waiter.done()
        limiter.release(first, used_tokens=500)  # 5,500 back: it fits now
        second = await asyncio.wait_for(waiter, 5)  # not after the 10 s it computed
        limiter.release(second)

    asyncio.run(scenario())


# -- Calibration: the server's own count --------------------------------------------------------------


def test_calibration_converges_to_the_servers_count():
    calibration = TokenCalibration()
    estimate, fixed = 2833 + 5667 * 4 + 110, 110  # gpt-4o-mini's formula, 4 tiles; text 10 + max_tokens 100
    server = 85 + 170 * 4 + 110  # the same image by the gpt-4o tile rule
    assert calibration.reserve("m", estimate, fixed) == estimate  # nothing known: the formula
    calibration.observe("m", estimate, fixed, server)
    assert calibration.reserve("m", estimate, fixed) == estimate  # one answer may not lower it
    for _ in range(CALIBRATION_MIN_SAMPLES):
        calibration.observe("m", estimate, fixed, server)
    assert calibration.reserve("m", estimate, fixed) == pytest.approx(server, abs=1)
    assert calibration.reserve("m", 2833 + 5667 + 110, fixed) == pytest.approx(85 + 170 + 110, abs=1)
    assert calibration.reserve("other", estimate, fixed) == estimate  # per model


def test_calibration_follows_a_server_that_counts_more_at_once():
    calibration = TokenCalibration()
    calibration.observe("m", 1000, 200, 1800)  # the image part counted twice
    assert calibration.ratio("m") == pytest.approx(2.0) and calibration.reserve("m", 1000, 200) == 1800


@pytest.mark.parametrize(
    "samples, expected_ratio",
    [
        ([0.5] * 10 + [50.0] * 3, 0.5),  # a few odd answers do not move it
        ([0.5] * 10 + [0.0] * 3, 0.5),
        ([2.0] * 5 + [1.0] * 6, 1.0),  # a changed count wins once it is the majority
    ],
    ids=["high-outliers", "zero-outliers", "majority"],
)
def test_calibration_ignores_outliers(samples, expected_ratio):
    calibration = TokenCalibration()
    for ratio in samples:
        calibration.observe("m", 1100, 100, 100 + round(1000 * ratio))
    assert calibration.ratio("m") == pytest.approx(expected_ratio)


@pytest.mark.parametrize(
    "used",
    [-5, MAX_USED_TOKENS + 1, True, 3.5, None],
    ids=["negative", "huge", "bool", "float", "none"],
)
def test_calibration_ignores_counts_it_cannot_believe(used):
    calibration = TokenCalibration()
    calibration.observe("m", 1100, 100, used)
    assert calibration.ratio("m") == 1.0


def test_a_reservation_is_never_below_text_and_max_tokens():
    calibration = TokenCalibration()
    for _ in range(10):
        calibration.observe("m", 5000, 300, 0)  # a server that counts nothing
    assert calibration.ratio("m") == MIN_RATIO
    assert calibration.reserve("m", 5000, 300) >= 300
    assert calibration.reserve("m", 200, 300) == 200  # an estimate below its own fixed part stays as it is


# -- Over loopback: one per scenario; the share of 429s and that nothing idles -----------------------


def _copies(tmp_path: Path, count: int) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    source = Path(__file__).parent.parent / "sample_data" / "coffee_cup.jpg"
    for i in range(count):
        (folder / f"{i:02d}.jpg").write_bytes(source.read_bytes() + f"copy {i}".encode())  # distinct: no dedupe
    return folder


def _run(server, tmp_path, capsys, count: int, *flags: str) -> list:
    code = main(["run", str(_copies(tmp_path, count)), "--job", str(Path(__file__).parent.parent / "jobs" / "demo.toml"),
                 "--out", str(tmp_path / "out"), "--base-url", server.base_url, "--no-progress",
                 "--max-attempts", "20", *flags])
    assert code == 0, capsys.readouterr().err
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert len(rows) == count and all(r["status"] == "ok" for r in rows)
    return server.observed()


def _share_429(seen) -> float:
    return sum(o.status == 429 for o in seen) / len(seen)


def _longest_gap_s(seen) -> float:
    return max(b.t - a.t for a, b in zip(seen, seen[1:]))


def test_a_relay_cap_answered_with_retry_after_is_found_over_loopback(server, tmp_path, capsys):
    server.set_latency(0.1)
    server.rate_limit(concurrency=4, headers=False, concurrency_retry_after_s=0.05)
    seen = _run(server, tmp_path, capsys, 60, "--concurrency", "32")
    assert any(o.fault == "concurrency" for o in seen), "the server never refused: the cap was not tested"
    assert _share_429(seen) <= 0.2  # the first burst over the cap and a probe; not every other request


def test_tpm_reservations_follow_a_server_that_counts_less_over_loopback(server, tmp_path, capsys):
    tpm, max_tokens = 70_000, 20
    # drained at the start; the server counts gpt-4o-mini's images as 85 (the tile rule), not 2,833
    server.rate_limit(tpm=tpm, start_empty=True)
    seen = _run(server, tmp_path, capsys, 30, "--model", "gpt-4o-mini", "--max-tokens", str(max_tokens),
                "--concurrency", "16")
    formula_refill_s = (2833 + max_tokens) / (tpm / 60)  # what one uncalibrated reservation waits for
    assert _share_429(seen) <= 0.25  # at most the first slow-start burst into the drained bucket
    assert _longest_gap_s(seen) < 0.5 * formula_refill_s  # nobody slept out a formula-sized reservation


def test_tpm_reservations_follow_a_server_that_counts_more_over_loopback(server, tmp_path, capsys):
    server.set_latency(0.05)
    server.set_image_token_scale(4.0)  # 340 tokens a low-detail image where the formula says 85
    server.rate_limit(tpm=240_000, start_empty=True)
    seen = _run(server, tmp_path, capsys, 60, "--max-tokens", "20", "--concurrency", "32")
    assert _share_429(seen) <= 0.15  # the first burst into the drained bucket, then paced


def test_a_per_second_limit_named_by_a_429_is_learned_over_loopback(server, tmp_path, capsys):
    server.rate_limit(rps=10)
    seen = _run(server, tmp_path, capsys, 40, "--concurrency", "16")
    assert any(o.fault == "rps" for o in seen), "the server never refused: the limit was not tested"
    # Without learning, about 0.9 of all requests are refused; with it, 0.05 to 0.31 over 18 runs here
    # (how many the first second's burst sends before the limit is learned varies with scheduling).
    assert _share_429(seen) <= 0.5


def test_an_empty_rpm_bucket_is_met_by_the_slow_start_not_a_burst(server, tmp_path, capsys):
    server.set_latency(0.05)
    server.rate_limit(rpm=600, start_empty=True)  # another client just used it: 10 a second from now on
    seen = _run(server, tmp_path, capsys, 30, "--concurrency", "64")
    # the bucket holds about what refilled while caption started (~1 s: 10 requests), far below 64
    # not a burst of 64 into it (that would be ~50 429s); at most the first round of the slow start,
    # which a loaded machine may send a little later, into a bucket that refilled a little less
    assert sum(o.status == 429 for o in seen) < INITIAL_CONCURRENCY
