"""Shared set-up for the benchmarks: a bundled server in its own process, trees of image files.

The server runs as `python -m pipeline serve` in a separate process so that its work (decoding
every image it receives) does not share a GIL with the pipeline being measured.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "_work"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def server_process(*flags: str):
    """Start `caption serve` on a free loopback port with `flags`; yield its base URL."""
    port = free_port()
    argv = [sys.executable, "-m", "pipeline", "serve", "--port", str(port), *flags]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = process.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"caption serve did not start: {line!r}")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(timeout=10)


def small_image(path: Path, size=(64, 48), colour=(200, 120, 40)) -> Path:
    """A small real JPEG: the pipeline's own cost per image, not Pillow's, is what we measure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        image = Image.new("RGB", size, colour)
        image.paste((30, 60, 200), (0, 0, size[0] // 2, size[1] // 2))
        image.save(path, quality=85)
    return path


def image_tree(root: Path, count: int, per_folder: int = 1000) -> Path:
    """`count` small real JPEGs, `per_folder` to a folder, reused if present.

    Each is one of a few real images plus a unique trailer after its end marker: decoders ignore
    it, but the bytes differ, so caption's dedupe (same sha256 → sent once) does not kick in.
    """
    marker = root / f".unique-{count}"
    if marker.exists():
        return root
    originals = [small_image(WORK / f"seed-{i}.jpg", colour=(40 * i, 200 - 30 * i, 90)).read_bytes()
                 for i in range(4)]
    for i in range(count):
        target = root / f"d{i // per_folder:04d}" / f"img{i:07d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(originals[i % len(originals)] + f"#{i}".encode())
    marker.touch()
    return root


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (peak resident set) of a running process, in MB; None once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_caption(argv: list[str], *, first_row_in: Path | None = None) -> dict:
    """Run `caption ...` in a subprocess; return wall time, peak RSS and time to the first row."""
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "pipeline", *argv], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, first = 0.0, None
    while process.poll() is None:
        peak = max(peak, peak_rss_mb(process.pid) or 0.0)
        if first is None and first_row_in is not None and _has_row(first_row_in):
            first = time.monotonic() - started
        time.sleep(0.01)
    stdout, stderr = process.communicate()
    if process.returncode not in (0, 1):
        raise RuntimeError(f"caption {' '.join(argv)} exited {process.returncode}: {stderr[-2000:]}")
    return {"wall_s": time.monotonic() - started, "peak_rss_mb": peak, "first_row_s": first, "stdout": stdout}


def _has_row(out: Path) -> bool:
    if not out.exists():
        return False
    return any(p.stat().st_size > 0 for p in out.glob("_journal-*.jsonl")) or any(out.glob("part-*.parquet"))
