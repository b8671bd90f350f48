"""benchmarks/bucket_scale.py: does an object-store INPUT start at once and stay small at 100,000 objects?

    python benchmarks/bucket_scale.py                      # 100,000 objects, 60 s of the run (~2 minutes)
    python benchmarks/bucket_scale.py --objects 20000 --run-s 20
    python benchmarks/bucket_scale.py --run-s 0            # caption the whole bucket (takes long on moto)

A moto S3 server (in server mode, on loopback, in this process) holds a bucket of `--objects` tiny
real JPEGs (each with a unique trailer, so dedupe sends every one); `caption run s3://.../` runs in
its own process against the bundled endpoint (`caption serve`, a third process, zero latency),
reaching moto through AWS_ENDPOINT_URL. Prints the time from the command's start to its first row
in the journal (target < 2 s; the first request is sent before that row, so this bounds it: the
listing is streamed and the run starts on its first page), the peak RSS of the caption process
(target < 300 MB: one page of keys is held, not the listing), and how many images it captioned in
`--run-s` seconds before it was interrupted (SIGINT: it flushes and exits 130).

Setup only, for speed: the objects are put into moto's backend directly, and moto's
`list_objects_v2` is served from a sorted index of the bucket's keys. Moto itself sorts the whole
bucket for every page (about 3 s a page at 100,000 keys on this machine, where S3 answers in tens of
milliseconds), which would measure moto, not caption. Every request still goes over HTTP to moto.
"""

from __future__ import annotations

import argparse
import bisect
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, WORK, _has_row, peak_rss_mb, server_process, small_image  # noqa: E402

BUCKET, PREFIX = "caption-bench", "in/"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def fill_bucket(count: int) -> None:
    """`count` small real JPEGs under PREFIX, 1,000 a folder, put into moto's backend in-process."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    backend.create_bucket(BUCKET, "us-east-1")
    seeds = [small_image(WORK / f"seed-{i}.jpg", colour=(40 * i, 200 - 30 * i, 90)).read_bytes() for i in range(4)]
    for i in range(count):
        backend.put_object(BUCKET, f"{PREFIX}d{i // 1000:04d}/img{i:07d}.jpg", seeds[i % 4] + f"#{i}".encode())
    _index_listing(backend)


def _index_listing(backend) -> None:
    """Serve `list_objects_v2` of the (now fixed) bench bucket from a sorted list of its key names."""
    original = backend.list_objects_v2
    names = sorted(backend.get_bucket(BUCKET).keys.keys())

    def list_objects_v2(bucket, prefix, delimiter, continuation_token, start_after, max_keys):  # moto's names
        if bucket.name != BUCKET or delimiter:
            return original(bucket=bucket, prefix=prefix, delimiter=delimiter, continuation_token=continuation_token,
                            start_after=start_after, max_keys=max_keys)
        after = backend._pagination_tokens.get(continuation_token) if continuation_token else start_after
        start = bisect.bisect_right(names, after) if after else bisect.bisect_left(names, prefix or "")
        chosen = [n for n in names[start:start + max_keys + 1] if n.startswith(prefix or "")]
        truncated = len(chosen) > max_keys
        chosen = chosen[:max_keys]
        token = None
        if truncated:
            token = f"bench-{chosen[-1]}"
            backend._pagination_tokens[token] = chosen[-1]
        return [bucket.keys[n] for n in chosen], truncated, token

    backend.list_objects_v2 = list_objects_v2


def _warm_up(endpoint_url: str) -> None:
    """One listing over HTTP from here: moto builds its S3 app on the first request it gets (seconds),
    which is the server's start-up, not caption's."""
    import s3fs

    s3fs.S3FileSystem(endpoint_url=endpoint_url, skip_instance_cache=True).call_s3(
        "list_objects_v2", Bucket=BUCKET, Prefix=PREFIX, MaxKeys=1)


def measure(endpoint_url: str, base_url: str, run_s: float, flags: list[str]) -> dict:
    """Run `caption run` on the bucket; its first row's time, peak RSS, images done."""
    out = WORK / "bucket-scale-out"
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "pipeline", "run", f"s3://{BUCKET}/{PREFIX}", "--job", str(ROOT / "jobs" / "demo.toml"),
            "--out", str(out), "--base-url", base_url, "--concurrency", "64", "--no-progress", *flags]
    env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": endpoint_url, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak, first, stopped = 0.0, None, False
    while process.poll() is None:
        peak = max(peak, peak_rss_mb(process.pid) or 0.0)
        if first is None and _has_row(out):
            first = time.monotonic() - started
        if run_s and first is not None and not stopped and time.monotonic() - started > first + run_s:
            process.send_signal(signal.SIGINT)
            stopped = True
        time.sleep(0.005 if first is None else 0.05)
    stdout, stderr = process.communicate()
    if process.returncode not in (0, 1, 130):
        raise RuntimeError(f"caption run exited {process.returncode}: {stderr[-2000:]}")
    summary = next((line for line in stdout.splitlines() if " ok, " in line), "")
    return {"first_row_s": first, "peak_rss_mb": peak, "wall_s": time.monotonic() - started,
            "summary": summary, "exit": process.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--run-s", type=float, default=60.0, help="interrupt the run this long after its first "
                                                                   "request (0: let it finish)")
    parser.add_argument("--preprocess-workers", type=int, help="passed to caption run (default: one per core)")
    args = parser.parse_args()
    flags = [] if args.preprocess_workers is None else ["--preprocess-workers", str(args.preprocess_workers)]
    os.environ.update(CREDENTIALS)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        began = time.monotonic()
        fill_bucket(args.objects)
        _warm_up(f"http://{host}:{port}")
        print(f"bucket of {args.objects:,} objects put in {time.monotonic() - began:.1f} s", flush=True)
        with server_process() as base_url:
            figures = measure(f"http://{host}:{port}", base_url, args.run_s, flags)
    finally:
        moto.stop()
    print(f"{'objects':>8} {'first row':>10} {'peak RSS':>9} {'wall':>7}  run")
    print(f"{args.objects:>8} {figures['first_row_s']:>9.2f}s {figures['peak_rss_mb']:>7.0f}MB "
          f"{figures['wall_s']:>6.1f}s  exit {figures['exit']}: {figures['summary']}")


if __name__ == "__main__":
    main()
