"""benchmarks/throughput.py: images/s against the bundled endpoint, as a ratio of the ceiling C/L.

    python benchmarks/throughput.py                      # L = 1 s, C = 64, 1,280 images; then L = 0
    python benchmarks/throughput.py --latency 0.5 --concurrency 32 --images 640

With C requests in flight and a latency of L seconds no client can beat C/L images/s; the ratio
says how much of that the pipeline keeps (target >= 0.95 at L = 1 s, C = 64). The server runs in
its own process. "steady" is the rate of the second half of the answers (rows' created_at), after
the limiter's slow start (8 in flight, doubling each round trip up to C); "wall" is images over the
whole command's wall time, start-up and ramp included. The zero-latency run prints
the pipeline's own cost per image (walk, encode, request, record), server included.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, WORK, image_tree, run_caption, server_process  # noqa: E402


def measure(images: int, latency_s: float, concurrency: int) -> dict:
    tree = image_tree(WORK / f"tree-{images}", images)
    out = WORK / "throughput-out"
    shutil.rmtree(out, ignore_errors=True)
    with server_process("--latency-s", str(latency_s)) as base_url:
        result = run_caption(["run", str(tree), "--job", str(ROOT / "jobs" / "demo.toml"), "--out", str(out),
                              "--base-url", base_url, "--concurrency", str(concurrency), "--no-progress"])
    times = sorted(t.timestamp() for t in pq.read_table(out, columns=["created_at"]).column(0).to_pylist())
    half = times[len(times) // 2:]  # the second half of the answers: after the slow-start ramp
    span = half[-1] - half[0]
    steady = (len(half) - 1) / span if span > 0 else float("nan")
    return {"rows": len(times), "wall_s": result["wall_s"], "steady": steady, "wall": len(times) / result["wall_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1280)
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    ceiling = args.concurrency / args.latency
    m = measure(args.images, args.latency, args.concurrency)
    print(f"L={args.latency:g} s C={args.concurrency} N={m['rows']}: ceiling C/L = {ceiling:.1f} img/s")
    print(f"  steady {m['steady']:.1f} img/s  ratio {m['steady'] / ceiling:.3f}")
    print(f"  wall   {m['wall']:.1f} img/s  ratio {m['wall'] / ceiling:.3f}  ({m['wall_s']:.1f} s incl. start-up)")
    z = measure(args.images, 0.0, args.concurrency)
    print(f"L=0 C={args.concurrency} N={z['rows']}: {z['wall']:.0f} img/s over the whole command, "
          f"{1000 / z['steady']:.2f} ms/img steady (pipeline + server on 2 cores)")


if __name__ == "__main__":
    main()
