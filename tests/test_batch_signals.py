"""Batch mode at human speed: Ctrl-C while waiting says how to resume, and exit codes tell the truth.

Issue 10, item 17 (the parts that are not the poll schedule).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from conftest import DEMO_JOB, ROOT, copy_samples, read_rows


def _argv(folder, out, server, *flags: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", str(folder), "--job", str(DEMO_JOB), "--out", str(out),
            "--base-url", server.base_url, "--mode", "batch", "--batch-poll-s", "0.05", "--no-progress", *flags]


def _wait_for_submitted(out, process, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        records = [json.loads(p.read_text()) for p in (out / "_batch").glob("chunk-*.json")]
        if records and all(r["state"] == "submitted" for r in records):
            return
        time.sleep(0.05)
    raise AssertionError("the batch was never submitted")


def test_ctrl_c_while_waiting_exits_130_with_the_summary_and_the_resume_command(server, tmp_path, cli):
    folder = copy_samples(tmp_path / "in", ["coffee_cup.jpg", "chelsea_the_cat.jpg"])
    out = tmp_path / "out"
    server.set_batch_delay(3600)  # the batch stays with the provider until the test lets it go
    process = subprocess.Popen(_argv(folder, out, server), cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    _wait_for_submitted(out, process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert "caption: 0 ok" in stdout and "interrupted; resume with: caption run" in stderr
    assert "Traceback" not in stderr
    assert [b.status for b in server.batches()] == ["in_progress"]  # still with the provider, recorded
    server.set_batch_delay(0)
    assert cli("batch", "cancel", out).code == 0  # the resume below collects it and sends its lines again
    again = cli(*_argv(folder, out, server)[3:])
    assert again.code == 0, again.err
    assert sorted(r["image_path"] for r in read_rows(out)) == ["chelsea_the_cat.jpg", "coffee_cup.jpg"]
    assert [b.lines for b in server.batches()] == [2, 2]  # the cancelled one, then its lines once more


def test_batch_collect_exits_1_when_it_wrote_error_rows(server, tmp_path, cli):
    folder = copy_samples(tmp_path / "in", ["coffee_cup.jpg", "chelsea_the_cat.jpg"])
    out = tmp_path / "out"
    server.set_batch_delay(0.2)
    server.fail_batch_lines("400", times=1)
    serve = subprocess.run(_argv(folder, out, server, "--detach"), cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
    assert serve.returncode == 0, serve.stderr  # submitted and recorded: nothing has failed yet
    deadline = time.monotonic() + 30
    while server.batches()[0].status != "completed" and time.monotonic() < deadline:
        time.sleep(0.05)
    ran = cli("batch", "collect", out)
    assert ran.code == 1, ran.err
    assert [r["status"] for r in read_rows(out)].count("error") == 1
