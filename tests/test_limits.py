"""The limiter: bucket arithmetic, learned limits, the shared pause, adaptive concurrency."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.client import parse_rate_info
from pipeline.limits import INITIAL_CONCURRENCY, Limiter, TokenBucket
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
    assert all(o.fault == "concurrency" for o in limited)
    assert len(limited) <= 12  # the first over-the-cap burst, then rare probes: not one 429 per request
