"""When every request fails the same way the run stops, and a refused sampling parameter is learned.

Issue 10, item 11: an unreachable base URL wrote 290 error rows; a reasoning model with a job that
sets `temperature` wrote an error row for every image. Both now stop (or heal) after a few images.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import socket

import pytest

from conftest import distinct_copies, read_rows
from pipeline.engine.retry import SAME_FAILURE_STOP, FailureStreak
from pipeline.records import Result

IMAGES = 30


@pytest.fixture
def folder(tmp_path):
    return distinct_copies(tmp_path / "in", "coffee_cup.jpg", [f"{i:03d}.jpg" for i in range(IMAGES)])


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once the socket is closed


def test_an_unreachable_endpoint_stops_the_run_after_a_few_images(folder, tmp_path, cli, job_file):
    out = tmp_path / "out"
    job = job_file(limits_concurrency=2, limits_max_attempts=2)
    ran = cli("run", folder, "--job", job, "--out", out, "--base-url", f"http://127.0.0.1:{_closed_port()}/v1",
              "--no-progress")
    assert ran.code == 3, ran.err
    assert "all failed the same way (transient: connection failed" in ran.err
    rows = read_rows(out)
    assert SAME_FAILURE_STOP <= len(rows) < IMAGES  # it stopped; what was in flight still ended
    assert {r["error_kind"] for r in rows} == {"transient"}


def test_the_same_400_for_every_image_stops_the_run_and_a_rerun_resumes(server, folder, tmp_path, cli, job_file):
    out, job = tmp_path / "out", job_file(limits_concurrency=1)
    server.fail_next("400", times=IMAGES)
    ran = cli("run", folder, "--job", job, "--out", out, "--base-url", server.base_url, "--no-progress")
    assert ran.code == 3 and "Invalid image" in ran.err
    assert len(server.observed()) == SAME_FAILURE_STOP  # nothing more was sent (and paid for)
    server.reset()
    again = cli("run", folder, "--job", job, "--out", out, "--base-url", server.base_url, "--no-progress")
    assert again.code == 0, again.err
    latest = {r["image_path"]: r["status"] for r in read_rows(out)}
    assert len(latest) == IMAGES and set(latest.values()) == {"ok"}


def test_a_sampling_parameter_the_model_refuses_is_dropped_once_for_the_run(server, folder, tmp_path, cli, job_file):
    out = tmp_path / "out"
    job = job_file(endpoint_model="local-reasoning-mini", prompt_temperature=0.2, limits_concurrency=1)
    ran = cli("run", folder, "--job", job, "--out", out, "--base-url", server.base_url, "--no-progress")
    assert ran.code == 0, ran.err
    seen = server.observed()
    # max_tokens refused, then temperature refused, then every image answered without either.
    assert [o.status for o in seen] == [400, 400] + [200] * IMAGES
    assert seen[1].temperature == 0.2 and all(o.temperature is None for o in seen[2:])
    assert "rejects temperature" in ran.err  # logged once
    assert {r["status"] for r in read_rows(out)} == {"ok"}


def test_batch_mode_keeps_the_dropped_parameter_for_later_runs(server, folder, tmp_path, cli, job_file):
    out = tmp_path / "out"
    job = job_file(endpoint_model="local-reasoning-mini", prompt_temperature=0.2, endpoint_mode="batch")
    ran = cli("run", folder, "--job", job, "--out", out, "--base-url", server.base_url, "--no-progress",
              "--batch-poll-s", "0.05")
    assert ran.code == 0, ran.err
    assert (out / "_batch" / "_dropped").read_text() == "temperature"
    assert {r["status"] for r in read_rows(out)} == {"ok"} and len(read_rows(out)) == IMAGES


def _row(status: str, kind: str | None = None, error: str | None = None, attempts: int = 1) -> Result:
    return Result(image_path="x", status=status, job_fingerprint="f", created_at=dt.datetime.now(dt.UTC),
                  error_kind=kind, error=error, attempts=attempts)


FAIL = _row("error", "transient", "connection failed")
OTHER = dataclasses.replace(FAIL, error="connection reset")
BAD_IMAGE = _row("error", "bad_image", "not an image", attempts=0)
OK = _row("ok")


@pytest.mark.parametrize("rows,stops_at", [
    ([FAIL] * 3, 3),
    ([FAIL, FAIL, OK, FAIL, FAIL, FAIL], 6),
    ([FAIL, OTHER, FAIL, FAIL, FAIL], 5),
    ([FAIL, BAD_IMAGE, FAIL, BAD_IMAGE, FAIL], 5),
    ([FAIL, FAIL, OK, FAIL, FAIL], None),
    ([FAIL, OTHER, FAIL, OTHER], None),
], ids=["three-alike", "ok-resets", "another-error-resets", "bad-images-are-neutral", "never-three", "alternating"])
def test_failure_streak_counts_images_in_a_row_that_failed_alike(rows, stops_at):
    streak = FailureStreak(limit=3)
    said = [streak.note(row) for row in rows]
    stopped = [i + 1 for i, why in enumerate(said) if why is not None]
    assert (stopped[0] if stopped else None) == stops_at
    if stops_at:
        assert "the last 3 images all failed the same way" in said[stops_at - 1]
