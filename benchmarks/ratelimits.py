"""benchmarks/ratelimits.py: does caption keep the provider exactly as busy as its limits allow?

    python benchmarks/ratelimits.py                 # all ten scenarios, ~12 minutes on 2 cores
    python benchmarks/ratelimits.py --only 3        # one scenario

The bundled endpoint runs in this process (a thread) with the scenario's limits, so we can read
what it observed; `caption run` runs in a subprocess, as a user would run it, and is never told
the limits: it learns them from headers, from the 429s' messages, from bare 429s, and from the
prompt tokens the server reports. Each scenario prints the ratio of achieved images/s to the
ceiling the limits allow over the whole run (first request to last row) and in the steady state
(the second half of the completions, after the buckets' initial burst), the share of requests
that got a 429, and the longest gap between two requests the server received (idling).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, WORK, image_tree, run_caption  # noqa: E402

sys.path.insert(0, str(ROOT))
from pipeline.localserver import LocalServer  # noqa: E402

MAX_TOKENS = 100
USER_PROMPT = "Describe this image."  # jobs/demo.toml's prompt differs; we pass ours as a flag


def mixed_tree(count: int) -> Path:
    """Images of four sizes, so that requests cost different numbers of tokens (detail=high)."""
    root = WORK / f"mixed-{count}"
    if (root / ".unique").exists():
        return root
    sizes = [(300, 200), (700, 500), (1000, 1000), (1400, 700)]
    seeds = []
    for i, size in enumerate(sizes):
        path = WORK / f"mixed-seed-{i}.jpg"
        Image.new("RGB", size, (60 * i, 120, 200 - 40 * i)).save(path, quality=80)
        seeds.append(path)
    root.mkdir(parents=True, exist_ok=True)
    data = [seed.read_bytes() for seed in seeds]
    for i in range(count):  # a unique trailer per file: distinct bytes, so no dedupe
        (root / f"img{i:06d}.jpg").write_bytes(data[i % len(data)] + f"#{i}".encode())
    (root / ".unique").touch()
    return root


def run_scenario(server: LocalServer, tree: Path, *flags: str) -> tuple[list[dict], dict]:
    out = WORK / "ratelimits-out"
    shutil.rmtree(out, ignore_errors=True)
    argv = ["run", str(tree), "--job", str(ROOT / "jobs" / "demo.toml"), "--out", str(out),
            "--base-url", server.base_url, "--no-progress", "--user", USER_PROMPT, "--max-tokens", str(MAX_TOKENS),
            "--max-attempts", "50", *flags]
    result = run_caption(argv)
    rows = pq.read_table(out).to_pylist()
    return rows, result


def steady_rate(rows: list[dict]) -> float:
    """Completions per second over the second half of the run (by completion time)."""
    times = sorted(r["created_at"].timestamp() for r in rows if r["status"] == "ok")
    half = times[len(times) // 2:]
    return (len(half) - 1) / (half[-1] - half[0])


def whole_rate(rows: list[dict], server: LocalServer) -> float:
    """ok rows per second from the first request the server received to the last row written."""
    wall_of_monotonic = time.time() - time.monotonic()  # same machine: maps server times to row times
    first = server.observed()[0].t + wall_of_monotonic
    last = max(r["created_at"].timestamp() for r in rows)
    return sum(r["status"] == "ok" for r in rows) / (last - first)


def longest_gap_s(server: LocalServer) -> float:
    """The longest time between two requests the server received: how long caption sent nothing."""
    times = [o.t for o in server.observed()]
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)


def report(name: str, rows: list[dict], server: LocalServer, ceiling: float, target: float, max_429: float) -> None:
    seen = server.observed()
    share_429 = sum(o.status == 429 for o in seen) / len(seen)
    rate, whole = steady_rate(rows), whole_rate(rows, server)
    ok = sum(r["status"] == "ok" for r in rows)
    verdict = "ok" if rate / ceiling >= target and share_429 <= max_429 else "MISSED"
    print(f"| {name} | {ok}/{len(rows)} | {rate:.2f} | {ceiling:.2f} | {whole / ceiling:.3f} | "
          f"{rate / ceiling:.3f} (≥ {target}) | {share_429:.1%} (≤ {max_429:.0%}) | {longest_gap_s(server):.2f} s | "
          f"{verdict} |", flush=True)


def scenario_rpm(server: LocalServer) -> None:
    server.reset()
    server.set_latency(1.0, sigma=0.3)
    server.rate_limit(rpm=600)
    rows, _ = run_scenario(server, image_tree(WORK / "tree-1500", 1500), "--concurrency", "64")
    report("1. RPM 600, L≈1 s lognormal, C=64, 1,500 images", rows, server, 600 / 60, 0.95, 0.02)


def scenario_tpm(server: LocalServer) -> None:
    server.reset()
    server.set_latency(0.3, sigma=0.3)
    tpm = 400_000
    server.rate_limit(rpm=100_000, tpm=tpm)
    rows, _ = run_scenario(server, mixed_tree(1600), "--concurrency", "64", "--detail", "high", "--max-side", "1400")
    report(f"2. TPM {tpm:,} (≈{tokens_per_request(rows):.0f} tokens/request, mixed sizes), C=64", rows, server,
           tpm / 60 / tokens_per_request(rows), 0.90, 0.02)


def tokens_per_request(rows: list[dict]) -> float:
    """What the server counted against TPM per request: its reported prompt tokens + max_tokens."""
    return statistics.fmean(r["prompt_tokens"] + MAX_TOKENS for r in rows if r["status"] == "ok")


def scenario_relay(server: LocalServer) -> None:
    server.reset()
    latency = 0.5
    server.set_latency(latency)
    server.rate_limit(concurrency=8, headers=False)
    rows, _ = run_scenario(server, image_tree(WORK / "tree-1500", 1500), "--concurrency", "64")
    report("3. relay: bare 429 above 8 in flight, L=0.5 s, C=64", rows, server, 8 / latency, 0.90, 0.05)


def scenario_unlimited(server: LocalServer) -> None:
    server.reset()
    latency = 2.0
    server.set_latency(latency)
    rows, _ = run_scenario(server, image_tree(WORK / "tree-1500", 1500), "--concurrency", "64")
    report("4. no limits, L=2 s, C=64", rows, server, 64 / latency, 0.95, 0.0)


def scenario_retry_after(server: LocalServer) -> None:
    server.reset()
    server.set_latency(0.1)
    server.rate_limit(rpm=120, penalty_s=3.0)
    rows, _ = run_scenario(server, image_tree(WORK / "tree-300", 300), "--concurrency", "16")
    seen = server.observed()
    trips = [o for o in seen if o.status == 429 and o.fault != "penalty"]
    during = [o for o in seen for trip in trips if trip.t + 0.05 < o.t < trip.t + 3.0]
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"| 5. retry-after: 3 for 3 s after the RPM 120 limit trips, C=16 | {ok}/{len(rows)} | "
          f"{len(trips)} trips | requests during a pause: {len(during)} (target 0) | | "
          f"{sum(o.status == 429 for o in seen)} 429s of {len(seen)} | | {longest_gap_s(server):.2f} s | "
          f"{'ok' if not during else 'MISSED'} |", flush=True)


def relay_with_retry_after(server: LocalServer, cap: int, count: int, number: int) -> None:
    """A relay refusing more than `cap` in flight: 429 "Too many concurrent requests" with
    retry-after: 1 and retry-after-ms: 250, no x-ratelimit-* headers; L = 1 s."""
    server.reset()
    server.set_latency(1.0)
    server.rate_limit(concurrency=cap, headers=False, concurrency_retry_after_s=0.25)
    rows, _ = run_scenario(server, image_tree(WORK / f"tree-{count}", count), "--concurrency", "64")
    report(f"{number}. relay: 429 + retry-after above {cap} in flight, L=1 s, C=64, {count} images", rows, server,
           cap / 1.0, 0.95, 0.03)


def scenario_relay_8(server: LocalServer) -> None:
    relay_with_retry_after(server, 8, 500, 6)


def scenario_relay_32(server: LocalServer) -> None:
    relay_with_retry_after(server, 32, 1500, 7)


def tpm_counted_differently(server: LocalServer, model: str, scale: float, count: int, number: int,
                            what: str) -> None:
    """TPM-bound, learned from headers, the server counting image tokens differently from `model`'s
    formula; the bucket starts drained (no initial burst), so the whole run is paced by the limit."""
    server.reset()
    server.set_latency(0.3, sigma=0.3)
    server.set_image_token_scale(scale)
    tpm = 400_000
    server.rate_limit(rpm=100_000, tpm=tpm, start_empty=True)
    rows, _ = run_scenario(server, mixed_tree(count), "--concurrency", "64", "--detail", "high", "--max-side", "1400",
                           "--model", model)
    report(f"{number}. TPM {tpm:,} drained at the start, {model}, server counts images {what} "
           f"(≈{tokens_per_request(rows):.0f} tokens/request), C=64", rows, server, tpm / 60 / tokens_per_request(rows), 0.95, 0.02)


def scenario_tpm_less(server: LocalServer) -> None:
    tpm_counted_differently(server, "gpt-4o-mini", 1.0, 600, 8, "by the gpt-4o tile rule (33× less)")


def scenario_tpm_more(server: LocalServer) -> None:
    tpm_counted_differently(server, "gpt-4o", 2.0, 400, 9, "at 2× the tile rule")


def scenario_empty_rpm(server: LocalServer) -> None:
    server.reset()
    server.set_latency(1.0, sigma=0.3)
    server.rate_limit(rpm=600, start_empty=True)
    rows, _ = run_scenario(server, image_tree(WORK / "tree-500", 500), "--concurrency", "64")
    seen = server.observed()
    first = next((i for i, o in enumerate(seen) if o.status == 429), len(seen))
    report(f"10. RPM 600 whose bucket starts empty, C=64 (first 429 after {first} requests)", rows, server,
           600 / 60, 0.95, 0.03)


SCENARIOS = [scenario_rpm, scenario_tpm, scenario_relay, scenario_unlimited, scenario_retry_after, scenario_relay_8,
             scenario_relay_32, scenario_tpm_less, scenario_tpm_more, scenario_empty_rpm]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=int, choices=range(1, len(SCENARIOS) + 1))
    args = parser.parse_args()
    print("| scenario | ok rows | steady img/s | ceiling | ratio | steady ratio | 429s | longest gap | |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with LocalServer() as server:
        for number, scenario in enumerate(SCENARIOS, 1):
            if args.only in (None, number):
                scenario(server)


if __name__ == "__main__":
    main()
