"""Ordinary OS errors and usage slips are one line with the documented exit code, never a traceback.

Issue 10, items 4, 11 (unset a field), 15 (--detach) and 18 (did-you-mean, serve's help).
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from conftest import ROOT, copy_samples

CAPTION = [sys.executable, "-m", "pipeline"]


def _caption(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*CAPTION, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_serve_on_a_port_in_use_says_so_in_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = _caption("serve", "--port", str(taken.getsockname()[1]))
    assert done.returncode == 4
    assert done.stderr.count("\n") == 1 and "in use; choose another with --port" in done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_serve_refuses_a_port_that_is_not_one(port):
    done = _caption("serve", "--port", port)
    assert done.returncode == 2 and "--port" in done.stderr and "Traceback" not in done.stderr


def test_a_report_piped_into_a_reader_that_leaves_ends_quietly(server, tmp_path, caption_run):
    out = tmp_path / "out"
    assert caption_run(server, copy_samples(tmp_path / "in", ["coffee_cup.jpg"]), out) == 0
    process = subprocess.Popen([*CAPTION, "report", str(out), "--json"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # the reader is gone before the report is written, as `| head` may be
    _, err = process.communicate(timeout=30)
    assert process.returncode == 141 and err == ""


def test_detach_without_batch_mode_is_a_usage_error(tmp_path, cli, job_file):
    ran = cli("run", copy_samples(tmp_path / "in", ["coffee_cup.jpg"]), "--job", job_file(), "--out",
              tmp_path / "out", "--detach")
    assert ran.code == 2 and "--detach goes with batch mode" in ran.err
    assert not (tmp_path / "out").exists()  # stopped before the out folder was touched


def test_a_misspelt_key_suggests_the_key_it_transposes(tmp_path, cli):
    job = tmp_path / "job.toml"
    job.write_text('[endpoint]\nmodle = "gpt-4.1-mini"\n')
    ran = cli("run", tmp_path, "--job", job, "--out", tmp_path / "out")
    assert ran.code == 2 and "unknown key 'modle' (did you mean 'model'?)" in ran.err


def test_unset_drops_a_field_the_job_file_sets(server, tmp_path, cli, job_file):
    folder = copy_samples(tmp_path / "in", ["coffee_cup.jpg"])
    job = job_file(prompt_temperature=0.2)
    ran = cli("run", folder, "--job", job, "--out", tmp_path / "a", "--base-url", server.base_url, "--no-progress")
    assert ran.code == 0 and server.observed()[-1].temperature == 0.2
    ran = cli("run", folder, "--job", job, "--out", tmp_path / "b", "--base-url", server.base_url, "--no-progress",
              "--unset", "temperature")
    assert ran.code == 0, ran.err
    assert server.observed()[-1].temperature is None


def test_serve_help_says_the_default_latency_is_none():
    done = _caption("serve", "--help")
    assert "default 0: answer at once" in " ".join(done.stdout.split())


def test_progress_shows_done_of_total_with_percent_on_a_terminal_and_in_log_lines(server, tmp_path, cli, job_file,
                                                                                  monkeypatch):
    from conftest import distinct_copies

    folder = distinct_copies(tmp_path / "in", "coffee_cup.jpg", [f"{i}.jpg" for i in range(5)])
    server.set_latency(0.3)
    job = job_file(limits_concurrency=1)
    ran = cli("run", folder, "--job", job, "--out", tmp_path / "bar", "--base-url", server.base_url, "--progress")
    assert ran.code == 0 and "5/5" in ran.err and "100%" in ran.err
    monkeypatch.setattr("pipeline.engine.progress.LOG_EVERY_S", 0.0)  # a log line at every tick, not every 30 s
    ran = cli("run", folder, "--job", job, "--out", tmp_path / "log", "--base-url", server.base_url, "--no-progress")
    lines = [line for line in ran.err.splitlines() if "progress:" in line]
    assert ran.code == 0 and lines and all("/5 (" in line and "img/s eta" in line for line in lines)


def test_the_summary_names_the_copies_and_the_files_that_failed(server, tmp_path, cli, job_file):
    folder = copy_samples(tmp_path / "in", {"a.jpg": "coffee_cup.jpg", "b.jpg": "coffee_cup.jpg",
                                            "broken.jpg": "corrupt.jpg"})
    ran = cli("run", folder, "--job", job_file(limits_concurrency=1), "--out", tmp_path / "out", "--base-url",
              server.base_url, "--no-progress")
    assert ran.code == 1
    assert "1 copy of identical files took the caption" in ran.out
    assert "caption: failed: broken.jpg" in ran.err
