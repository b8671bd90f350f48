"""Kill a real `caption run` process (SIGKILL, SIGINT) mid-run, resume it, and count the rows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DEMO_JOB, ROOT, distinct_copies, durable_rows, read_rows

IMAGES = 40


@pytest.fixture
def folder(tmp_path) -> Path:
    return distinct_copies(tmp_path / "in", "coffee_cup.jpg", [f"{i:03d}.jpg" for i in range(IMAGES)])  # no dedupe


def _start(folder: Path, out: Path, server) -> subprocess.Popen:
    argv = [sys.executable, "-m", "pipeline", "run", str(folder), "--job", str(DEMO_JOB),
            "--out", str(out), "--base-url", server.base_url, "--concurrency", "4", "--part-rows", "5",
            "--no-progress"]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_rows(out: Path, count: int, process: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while len(durable_rows(out)) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)


@pytest.mark.parametrize("kill_after", [1, 12, 27])
def test_sigkill_then_rerun_loses_nothing_and_duplicates_nothing(server, folder, tmp_path, kill_after, cli):
    server.set_latency(0.05)
    out = tmp_path / "out"
    process = _start(folder, out, server)
    _wait_for_rows(out, kill_after, process)
    process.kill()
    process.wait()
    before = durable_rows(out)
    sent_before = len(server.observed())
    assert cli("run", folder, "--job", DEMO_JOB, "--out", out, "--base-url", server.base_url, "--no-progress").code == 0
    rows = read_rows(out)
    ok = [r["image_path"] for r in rows if r["status"] == "ok"]
    assert sorted(ok) == sorted(f"{i:03d}.jpg" for i in range(IMAGES))  # one ok row each, no duplicate
    assert {r["request_id"] for r in before} <= {r["request_id"] for r in rows}  # nothing written was lost
    assert not list(out.glob("_journal-*")) and not list(out.glob("_part-*"))
    # The rerun asked once for each image without a durable row, and for no other.
    new_rows = [r for r in rows if r["request_id"] not in {b["request_id"] for b in before}]
    assert len(new_rows) == IMAGES - len(before) and all(r["attempts"] == 1 for r in new_rows)
    # Only what was in flight at the kill is paid for twice (concurrency 4; a request the dying
    # client had written may reach the server just after we counted).
    assert sent_before - len(before) <= 4


def test_sigint_finishes_in_flight_flushes_and_exits_130(server, folder, tmp_path, cli):
    server.set_latency(0.2)
    out = tmp_path / "out"
    process = _start(folder, out, server)
    _wait_for_rows(out, 5, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert "resume with: caption run" in stderr
    assert not list(out.glob("_journal-*"))  # flushed into parts
    rows = read_rows(out)
    answered = [o for o in server.observed() if o.status == 200]
    assert len(rows) == len(answered)  # in-flight requests were allowed to finish and were recorded
    assert cli("run", folder, "--job", DEMO_JOB, "--out", out, "--base-url", server.base_url, "--no-progress").code == 0
    assert len(read_rows(out)) == IMAGES


def test_sigterm_is_handled_like_ctrl_c(server, folder, tmp_path):
    server.set_latency(0.2)
    out = tmp_path / "out"
    process = _start(folder, out, server)
    _wait_for_rows(out, 3, process)
    os.kill(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert not list(out.glob("_journal-*"))


def test_a_second_process_on_the_same_out_folder_is_refused(server, folder, tmp_path):
    from pipeline.store import OutFolderLock

    out = tmp_path / "out"
    out.mkdir()
    lock = OutFolderLock(out)  # this test process is "the run in progress"
    try:
        process = _start(folder, out, server)
        _, stderr = process.communicate(timeout=60)
    finally:
        lock.release()
    assert process.returncode == 2 and f"in use by another caption process (pid {os.getpid()})" in stderr
    assert server.observed() == []
