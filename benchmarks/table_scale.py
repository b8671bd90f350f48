"""benchmarks/table_scale.py: does a huge table of image URLs start at once and stay small?

    python benchmarks/table_scale.py                 # 1,000,000 rows, send = "bytes" then "url" (~2 min)
    python benchmarks/table_scale.py --rows 100000 --seconds 10

A Parquet table of `--rows` http URLs (row groups of 100,000, written once and reused) on an image host
on loopback (a threaded HTTP server in this process serving a few small real JPEGs under every path),
captioned against the bundled endpoint, run in this process so that the arrival time of the first
request is known (time.monotonic() is one clock for every process of the machine). For each `send`
mode, `caption run` runs in its own process for `--seconds` and is then stopped with SIGTERM (it
finishes what is in flight and exits). Printed: the time from the command's start to its first
request (target < 2 s: "start sending") and to its first row, images per second while it ran, and its
peak RSS (target < 300 MB): the table is read a row group at a time, never whole.
"""

from __future__ import annotations

import argparse
import io
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, WORK, _has_row, peak_rss_mb  # noqa: E402

from pipeline.localserver import LocalServer  # noqa: E402

ROW_GROUP = 100_000
EXTRA: list[str] = []


def _images() -> list[bytes]:
    out = []
    for i in range(4):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (40 * i, 200 - 30 * i, 90)).save(buffer, "JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


def image_host() -> tuple[ThreadingHTTPServer, str]:
    images = _images()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            # each URL's bytes differ (a trailer after the JPEG end marker), so dedupe does not kick in
            number = int(self.path.rsplit("/", 1)[-1].split(".")[0] or 0)
            body = images[number % len(images)] + f"#{number}".encode()
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def url_table(rows: int, host: str) -> Path:
    """`rows` URLs on `host` in one Parquet file (rewritten when the host's port changed)."""
    path = WORK / f"urls-{rows}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("url", pa.string()), ("id", pa.int64())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, ROW_GROUP):
            ids = range(start, min(rows, start + ROW_GROUP))
            writer.write_table(pa.table({"url": [f"{host}/img/{i}.jpg" for i in ids], "id": list(ids)}, schema=schema))
    return path


def measure(table: Path, server: LocalServer, send: str, seconds: float) -> dict:
    base_url = server.base_url
    out = WORK / f"table-out-{send}"
    shutil.rmtree(out, ignore_errors=True)
    job = WORK / f"table-{send}.toml"
    job.write_text((ROOT / "jobs" / "demo.toml").read_text() +
                   f'\n[input]\npath_column = "url"\nkeep_columns = ["id"]\nsend = "{send}"\n')
    argv = [sys.executable, "-m", "pipeline", "run", str(table), "--job", str(job), "--out", str(out),
            "--base-url", base_url, "--concurrency", "64", "--no-progress", *EXTRA]
    server.reset()
    started = time.monotonic()
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, first, stopped = 0.0, None, None
    while process.poll() is None:
        peak = max(peak, peak_rss_mb(process.pid) or 0.0)
        now = time.monotonic() - started
        if first is None and _has_row(out):
            first = now
        if stopped is None and now >= seconds:
            process.send_signal(signal.SIGTERM)
            stopped = now
        time.sleep(0.01)
    stdout, stderr = process.communicate()
    if process.returncode not in (0, 1, 130):
        raise RuntimeError(f"caption run exited {process.returncode}: {stderr[-2000:]}")
    done = sum(pq.ParquetFile(p).metadata.num_rows for p in out.glob("part-*.parquet"))
    arrivals = [o.t for o in server.observed()]
    return {"first_request_s": min(arrivals) - started if arrivals else None, "first_row_s": first, "peak_rss_mb": peak, "rows": done, "ran_s": stopped or time.monotonic() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    server, host = image_host()
    table = url_table(args.rows, host)
    print(f"{'rows':>9} {'send':>6} {'first request':>14} {'first row':>10} {'img/s':>7} {'peak RSS':>9}")
    with LocalServer("127.0.0.1", 0) as local:
        for send in ("bytes", "url"):
            result = measure(table, local, send, args.seconds)
            print(f"{args.rows:>9} {send:>6} {result['first_request_s'] or float('nan'):>13.2f}s "
                  f"{result['first_row_s'] or float('nan'):>9.2f}s "
                  f"{result['rows'] / result['ran_s']:>7.0f} {result['peak_rss_mb']:>7.0f}MB", flush=True)
    server.shutdown()


if __name__ == "__main__":
    main()
