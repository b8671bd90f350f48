"""benchmarks/ray.py: `--engine ray` on a two-node Ray cluster of this machine (issue 15).

    python benchmarks/ray.py                  # both parts, ~6 minutes on 2 cores
    python benchmarks/ray.py --only limits    # or: --only prepare

1. limits: two Ray nodes (one CPU each), four request actors, the bundled endpoint (a thread of
   this process) limiting to RPM 600 with latency ≈ 1 s, its bucket empty at the start (so the
   whole run is at the limit, no free first burst: benchmarks/ratelimits.py scenario 10), and
   `caption run --engine ray` in a subprocess, never told the limit: it learns it from the headers
   in the one budget actor.
   Printed as benchmarks/ratelimits.py prints its rows (the same figures as online mode on one
   machine: ≥ 0.95 of the limit in the steady state, ≤ 1 % of requests answered 429).
2. prepare: the read and prepare stages alone (ray_stages.KeyShards, prepare_batch) over full-size
   12 MP camera JPEGs, on one worker process (a one-CPU node) and on two (two such nodes).

The cluster stays on loopback, as in the tests (tests/ray_cluster.py has the why of each setting).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))
from _common import ROOT, WORK, image_tree  # noqa: E402
from preprocess import make_camera_jpegs  # noqa: E402
from ratelimits import longest_gap_s, steady_rate, whole_rate  # noqa: E402

# This file is named ray.py: with its folder on the path, `import ray` would import it, not Ray.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCHMARKS]

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from pipeline.localserver import LocalServer  # noqa: E402
from ray_cluster import LoopbackCluster  # noqa: E402

RPM = 600
IMAGES = 900
PREPARE_IMAGES = 48


def bench_limits() -> None:
    with LoopbackCluster() as cluster, LocalServer("127.0.0.1", 0) as server:
        cluster.add_node()
        server.set_latency(1.0, sigma=0.3)
        server.rate_limit(rpm=RPM, start_empty=True)  # another client just used it: no free first burst
        out = WORK / "ray-limits-out"
        shutil.rmtree(out, ignore_errors=True)
        argv = [sys.executable, "-m", "pipeline", "run", str(image_tree(WORK / f"tree-{IMAGES}", IMAGES)),
                "--job", str(ROOT / "jobs" / "demo.toml"), "--out", str(out), "--base-url", server.base_url,
                "--no-progress", "--max-attempts", "50", "--concurrency", "64",
                "--engine", "ray", "--ray-address", cluster.address, "--ray-actors", "4"]
        started = time.monotonic()
        done = subprocess.run(argv, cwd=ROOT, env=cluster.env, capture_output=True, text=True)
        wall = time.monotonic() - started
        if done.returncode not in (0, 1):
            raise RuntimeError(f"caption exited {done.returncode}: {done.stderr[-3000:]}")
        rows = pq.read_table(out).to_pylist()
        seen = server.observed()
        share_429 = sum(o.status == 429 for o in seen) / len(seen)
        ceiling = RPM / 60
        rate = steady_rate(rows)
        ok = sum(r["status"] == "ok" for r in rows)
        verdict = "ok" if rate / ceiling >= 0.95 and share_429 <= 0.01 else "MISSED"
        print("| scenario | ok rows | steady images/s | ceiling | ratio | steady ratio | 429s | longest gap | |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        print(f"| RPM {RPM} (not told, bucket empty at the start), L≈1 s lognormal, C=64, 2 nodes, "
              f"4 request actors, {IMAGES:,} images | "
              f"{ok}/{len(rows)} | {rate:.2f} | {ceiling:.2f} | {whole_rate(rows, server) / ceiling:.3f} | "
              f"{rate / ceiling:.3f} (≥ 0.95) | {share_429:.1%} (≤ 1%) | {longest_gap_s(server):.2f} s | {verdict} |")
        print(f"whole command {wall:.1f} s (Ray start-up included); {done.stdout.strip().splitlines()[0]}",
              flush=True)


def _camera_folder() -> Path:
    """PREPARE_IMAGES distinct full-size JPEGs (the camera-like ones of preprocess.py, each with a trailer)."""
    folder = WORK / f"ray-camera-{PREPARE_IMAGES}"
    if (folder / ".made").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    sources = [path.read_bytes() for path in make_camera_jpegs(8)]
    for i in range(PREPARE_IMAGES):
        (folder / f"camera_{i:03d}.jpg").write_bytes(sources[i % len(sources)] + f"#{i}".encode())
    (folder / ".made").touch()
    return folder


def _prepare_rate(nodes: int, folder: Path) -> float:
    """Images/s of read + prepare on `nodes` one-CPU nodes, from the first prepared batch to the last."""
    import ray

    from pipeline.engine.caption import Captioner
    from pipeline.engine.ray_stages import KeyShards, prepare_batch
    from pipeline.job import load_job
    from pipeline.providers import make_provider
    from pipeline.store import HashSet

    job = load_job(ROOT / "jobs" / "demo.toml", {"image.max_side": 1024})
    with LoopbackCluster() as cluster:
        for _ in range(nodes - 1):
            cluster.add_node()
        saved = {name: os.environ.get(name) for name in ("HOME", "RAY_USAGE_STATS_ENABLED", "RAY_USAGE_STATS_REPORT_URL")}
        os.environ.update({name: cluster.env[name] for name in saved})
        try:
            ray.init(address=cluster.address, logging_level="warning", log_to_driver=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            preparer = Captioner(job, make_provider(job, "http://127.0.0.1:9/v1", api_key=None, headers={}))
            shards = nodes * 4  # several blocks per worker, so neither waits for the other's last one
            dataset = (ray.data.read_datasource(KeyShards(str(folder), job.input, ray.put(HashSet.of([])), shards),
                                                override_num_blocks=shards)
                       .map_batches(prepare_batch, fn_kwargs={"captioner": preparer}, batch_size=2,
                                    batch_format="pyarrow", num_cpus=1))
            times, count = [], 0
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                count += batch.num_rows
                times.append((time.monotonic(), count))
            (t0, n0), (t1, n1) = times[0], times[-1]
            return (n1 - n0) / (t1 - t0)
        finally:
            ray.shutdown()
            for name, value in saved.items():
                os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


def _prepare_one(path: str) -> int:
    from pipeline.engine.caption import Captioner
    from pipeline.job import load_job
    from pipeline.providers import make_provider
    from pipeline.sources.folder import FileItem

    job = load_job(ROOT / "jobs" / "demo.toml", {"image.max_side": 1024})
    preparer = Captioner(job, make_provider(job, "http://127.0.0.1:9/v1", api_key=None, headers={}))
    return preparer.prepare(FileItem(Path(path), Path(path).name)).sent_bytes


def _pool_rate(workers: int, folder: Path) -> float:
    """The same work in a plain process pool of `workers`: what this machine allows right now."""
    from concurrent.futures import ProcessPoolExecutor

    paths = sorted(str(p) for p in folder.glob("*.jpg"))
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_prepare_one, paths[:workers]))  # warm: imports done
        started = time.monotonic()
        list(pool.map(_prepare_one, paths))
        return len(paths) / (time.monotonic() - started)


def bench_prepare() -> None:
    folder = _camera_folder()
    one, two = _prepare_rate(1, folder), _prepare_rate(2, folder)
    pool_one, pool_two = _pool_rate(1, folder), _pool_rate(2, folder)
    print("| worker processes | Ray Data read + prepare, images/s (12 MP JPEG → 1024 px) | | "
          "a plain process pool, same files, same minute | |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| 1 (one one-CPU node) | {one:.2f} | | {pool_one:.2f} | |")
    print(f"| 2 (two one-CPU nodes) | {two:.2f} | **{two / one:.2f}×** (≥ 1.7×) | {pool_two:.2f} | "
          f"{pool_two / pool_one:.2f}× |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["limits", "prepare"])
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "limits"):
        bench_limits()
    if args.only in (None, "prepare"):
        bench_prepare()


if __name__ == "__main__":
    main()
