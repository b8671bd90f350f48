"""benchmarks/scale.py: does start-up and memory stay flat as the folder grows?

    python benchmarks/scale.py                  # 10,000 then 100,000 files (~6 minutes on 2 cores)
    python benchmarks/scale.py --sizes 1000,10000

For each size: a tree of hard links to a few real small JPEGs (1,000 per folder) against the
bundled endpoint at zero latency, in its own process. Prints the time from the command's start to
its first row (target <= 1 s), its peak RSS (target <= 250 MB and flat), and then the same command
again over the finished out folder, which must skip everything: its start-up (reading the resume
index and walking) and peak RSS.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, WORK, image_tree, run_caption, server_process  # noqa: E402


def measure(size: int, base_url: str) -> tuple[dict, dict]:
    tree = image_tree(WORK / f"tree-{size}", size)
    out = WORK / f"scale-out-{size}"
    shutil.rmtree(out, ignore_errors=True)
    argv = ["run", str(tree), "--job", str(ROOT / "jobs" / "demo.toml"), "--out", str(out), "--base-url", base_url,
            "--concurrency", "64", "--no-progress"]
    first = run_caption(argv, first_row_in=out)
    again = run_caption(argv)
    assert f"{size} already done" in again["stdout"], again["stdout"]
    return first, again


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000")
    args = parser.parse_args()
    print(f"{'files':>8} {'first row':>10} {'run':>8} {'img/s':>7} {'peak RSS':>9} | {'resume':>7} {'peak RSS':>9}")
    with server_process() as base_url:
        for size in map(int, args.sizes.split(",")):
            first, again = measure(size, base_url)
            print(f"{size:>8} {first['first_row_s']:>9.2f}s {first['wall_s']:>7.1f}s {size / first['wall_s']:>7.0f} "
                  f"{first['peak_rss_mb']:>7.0f}MB | {again['wall_s']:>6.2f}s {again['peak_rss_mb']:>7.0f}MB", flush=True)


if __name__ == "__main__":
    main()
