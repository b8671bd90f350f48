"""End to end over loopback: `caption run` against the bundled server, asserting what the server saw."""

from __future__ import annotations

import io
import math
import os
import socket
import urllib.request
from pathlib import Path

import aiohttp.helpers

import pytest
from PIL import Image

from conftest import DEMO_JOB, SAMPLE_IMAGES, SAMPLES, copy_samples, distinct_copies, read_rows
from pipeline import cost

BAD_SAMPLES = {"corrupt.jpg"}


@pytest.fixture
def caption(server, cli):
    """Run `caption run` in-process against the test server; return (exit code, stdout, stderr)."""

    def run(input_dir, out, job, *flags: str):
        return cli("run", input_dir, "--job", job, "--out", out, "--base-url", server.base_url, "--no-progress", *flags)

    return run


def _images(tmp_path: Path, name: str = "coffee_cup.jpg", copies: int = 1) -> Path:
    """tmp_path/in with the sample, or with `copies` distinct copies of it (000_name, 001_name, ...)."""
    if copies == 1:
        return copy_samples(tmp_path / "in", [name])
    return distinct_copies(tmp_path / "in", name, [f"{i:03d}_{name}" for i in range(copies)])


def _chat_requests(server) -> list:
    return [o for o in server.observed()]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no-stream"])
def test_sample_folder_gives_one_row_per_image(server, caption, job_file, tmp_path, stream):
    out = tmp_path / "out"
    code, stdout, _ = caption(SAMPLES, out, job_file(endpoint_stream=stream))
    rows = {r["image_path"]: r for r in read_rows(out)}
    assert sorted(rows) == SAMPLE_IMAGES
    assert code == 1  # corrupt.jpg is an error row
    for name, row in rows.items():
        if name in BAD_SAMPLES:
            assert (row["status"], row["error_kind"], row["attempts"]) == ("error", "bad_image", 0)
            continue
        assert row["status"] == "ok", row
        assert row["caption"] and row["finish_reason"] == "stop" and row["usage_source"] == "reported"
        assert row["prompt_tokens"] > 85 and row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]
        assert max(row["sent_width"], row["sent_height"]) <= 256 and row["request_id"]
        assert row["mode"] == "online" and row["attempts"] == 1 and len(row["image_sha256"]) == 64
    seen = _chat_requests(server)
    assert len(seen) == len(SAMPLE_IMAGES) - len(BAD_SAMPLES)  # no request for the corrupt file
    assert all(o.stream is stream and o.status == 200 for o in seen)
    assert f"Parquet in {out}" in stdout


def test_exif_rotated_image_arrives_upright(server, caption, job_file, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    # Stored pixels: a landscape image, red on the left; Orientation 6 says "rotate 90° clockwise to view",
    # so upright it is a portrait image with red on top.
    stored = Image.new("RGB", (200, 100), "blue")
    stored.paste((255, 0, 0), (0, 0, 100, 100))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(folder / "rotated.jpg", exif=exif)
    code, _, _ = caption(folder, tmp_path / "out", job_file())
    assert code == 0
    (seen,) = _chat_requests(server)
    width, height = seen.image_size
    assert height > width
    thumb = seen.thumb.convert("RGB")
    top = thumb.getpixel((thumb.width // 2, thumb.height // 4))
    bottom = thumb.getpixel((thumb.width // 2, 3 * thumb.height // 4))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_429_pause_is_shared_and_honoured_on_the_server_clock(server, caption, job_file, tmp_path):
    folder = _images(tmp_path, copies=8)
    server.fail_next("429", times=4, retry_after_s=0.6)
    code, _, _ = caption(folder, tmp_path / "out", job_file(limits_concurrency=4))
    assert code == 0
    seen = _chat_requests(server)
    limited = [o for o in seen if o.status == 429]
    assert len(limited) == 4 and len(seen) == 8 + 4  # one retry per 429: no stampede
    last_429 = max(o.t for o in limited)
    first_429 = min(o.t for o in limited)
    after = [o.t for o in seen if o.t > last_429]
    assert after and min(after) - first_429 >= 0.6
    assert all(r["status"] == "ok" for r in read_rows(tmp_path / "out"))


def test_5xx_is_retried_then_succeeds(server, caption, job_file, tmp_path):
    server.fail_next("503", times=2)
    code, _, _ = caption(_images(tmp_path), tmp_path / "out", job_file(limits_concurrency=1))
    (row,) = read_rows(tmp_path / "out")
    assert code == 0 and row["status"] == "ok" and row["attempts"] == 3
    assert [o.status for o in _chat_requests(server)] == [503, 503, 200]


def test_400_is_not_retried(server, caption, job_file, tmp_path):
    server.fail_next("400")
    code, _, _ = caption(_images(tmp_path), tmp_path / "out", job_file())
    (row,) = read_rows(tmp_path / "out")
    assert code == 1 and (row["status"], row["error_kind"], row["attempts"]) == ("error", "bad_request", 1)
    assert "HTTP 400" in row["error"] and len(_chat_requests(server)) == 1


def test_retries_stop_at_max_attempts_with_an_error_row(server, caption, job_file, tmp_path):
    server.fail_next("500", times=10)
    code, _, _ = caption(_images(tmp_path), tmp_path / "out", job_file(limits_max_attempts=3))
    (row,) = read_rows(tmp_path / "out")
    assert code == 1 and (row["error_kind"], row["attempts"]) == ("transient", 3)
    assert len(_chat_requests(server)) == 3


RETRIED_FAULTS = ["500", "502", "504", "408", "html502", "drop", "hang", "error200", "stream_error", "no_done",
                  "no_finish", "malformed"]


@pytest.mark.parametrize("fault", RETRIED_FAULTS)
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no-stream"])
def test_transient_faults_are_retried(server, caption, job_file, tmp_path, fault, stream):
    server.fail_next(fault)
    job = job_file(endpoint_stream=stream, limits_concurrency=1, limits_timeout_s=1.0, limits_idle_timeout_s=0.5)
    code, _, _ = caption(_images(tmp_path), tmp_path / "out", job)
    (row,) = read_rows(tmp_path / "out")
    assert code == 0 and row["status"] == "ok" and row["attempts"] == 2, row
    assert len(_chat_requests(server)) == 2


@pytest.mark.parametrize("detail, max_side", [("low", 256), ("high", 256), ("high", 768)])
def test_missing_usage_is_estimated_and_marked(server, caption, job_file, tmp_path, detail, max_side):
    server.fail_next("no_usage")
    prompt = "Describe this image."
    job = job_file(prompt_user=prompt, image_detail=detail, image_max_side=max_side)
    code, _, _ = caption(_images(tmp_path), tmp_path / "out", job)
    (row,) = read_rows(tmp_path / "out")
    assert code == 0 and row["status"] == "ok" and row["usage_source"] == "estimated"
    width, height = row["sent_width"], row["sent_height"]
    assert max(width, height) <= 768  # so OpenAI's tile rule below scales nothing before counting tiles
    # The documented estimate for local-caption (OpenAI's tile rule; see pipeline/cost/tokens.py): 85 for
    # detail low, 85 + 170 per 512 px tile for high; text at four characters a token, rounded up.
    image = 85 if detail == "low" else 85 + 170 * math.ceil(width / 512) * math.ceil(height / 512)
    expected = (image + math.ceil(len(prompt) / 4), math.ceil(len(row["caption"]) / 4))
    assert (row["prompt_tokens"], row["completion_tokens"]) == expected
    assert row["total_tokens"] == sum(expected) and (row["cached_tokens"], row["reasoning_tokens"]) == (None, None)
    # ... which is the product's own estimate for what was sent, as the answer path calls it.
    usage = cost.estimate_usage(width, height, detail, prompt, row["caption"], model="local-caption")
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (*expected, sum(expected))


@pytest.mark.parametrize(
    "fault, kind, attempts",
    [("413", "bad_request", 1), ("422", "bad_request", 1), ("empty", "transient", 3)],  # empty + stop: a drop
)
def test_per_image_failures_become_errorread_rows(server, caption, job_file, tmp_path, fault, kind, attempts):
    server.fail_next(fault, times=5)
    code, _, _ = caption(_images(tmp_path), tmp_path / "out", job_file())
    (row,) = read_rows(tmp_path / "out")
    assert code == 1 and (row["status"], row["error_kind"], row["attempts"]) == ("error", kind, attempts)
    assert len(_chat_requests(server)) == attempts  # a 4xx is not asked again; an empty answer (a drop) to max_attempts


@pytest.mark.parametrize("fault", ["401", "403_quota", "404_model", "429_quota"])
def test_fatal_errors_stop_the_run_and_a_rerun_finishes(server, caption, job_file, tmp_path, fault):
    folder = _images(tmp_path, copies=6)
    server.fail_next(fault, times=100)
    job = job_file(limits_concurrency=1)
    code, _, err = caption(folder, tmp_path / "out", job)
    assert code == 3 and "stopped by the provider" in err
    assert len(_chat_requests(server)) == 1  # stopped sending at once
    assert not list((tmp_path / "out").glob("part-*"))  # a fatal error is not the image's fault: no row
    server.reset()
    code, _, _ = caption(folder, tmp_path / "out", job)
    assert code == 0 and len(read_rows(tmp_path / "out")) == 6


def test_reasoning_model_switches_to_max_completion_tokens_once(server, caption, job_file, tmp_path):
    folder = _images(tmp_path, copies=5)
    code, _, err = caption(folder, tmp_path / "out", job_file(endpoint_model="local-reasoning-mini",
                                                              limits_concurrency=1))
    assert code == 0, err
    seen = _chat_requests(server)
    assert [o.status for o in seen] == [400, 200, 200, 200, 200, 200]
    assert seen[0].max_tokens == 100 and all(o.max_completion_tokens == 100 and o.max_tokens is None
                                             for o in seen[1:])
    rows = read_rows(tmp_path / "out")
    assert all(r["reasoning_tokens"] and r["reasoning_tokens"] > 0 for r in rows)
    assert "max_completion_tokens" in err  # logged once


def test_bad_images_become_error_rows_without_requests(server, caption, job_file, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "text.jpg").write_text("this is not an image")
    (folder / "empty.png").write_bytes(b"")
    whole = (SAMPLES / "coffee_cup.jpg").read_bytes()
    (folder / "half.jpg").write_bytes(whole[: len(whole) // 2])
    bomb = io.BytesIO()
    Image.new("1", (20_000, 10_000)).save(bomb, "PNG")
    (folder / "bomb.png").write_bytes(bomb.getvalue())
    code, _, _ = caption(folder, tmp_path / "out", job_file())
    rows = {r["image_path"]: r for r in read_rows(tmp_path / "out")}
    assert code == 1 and set(rows) == {"text.jpg", "empty.png", "half.jpg", "bomb.png"}
    assert all(r["error_kind"] == "bad_image" and r["error"] for r in rows.values())
    assert _chat_requests(server) == []


def test_rerun_skips_ok_images_and_retries_errors(server, caption, job_file, tmp_path):
    folder = _images(tmp_path, copies=4)
    job = job_file(limits_concurrency=1, limits_max_attempts=1)
    server.fail_next("500")
    code, _, _ = caption(folder, tmp_path / "out", job)
    assert code == 1
    code, stdout, _ = caption(folder, tmp_path / "out", job)
    assert code == 0 and "3 already done" in stdout
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 5 and sum(r["status"] == "ok" for r in rows) == 4
    assert len(_chat_requests(server)) == 5


def test_another_job_on_the_same_out_folder_is_refused(server, caption, job_file, tmp_path):
    folder = _images(tmp_path)
    assert caption(folder, tmp_path / "out", job_file())[0] == 0
    code, _, err = caption(folder, tmp_path / "out", job_file(), "--max-side", "128")
    assert code == 2 and "another job" in err and err.count("\n") == 1
    assert len(_chat_requests(server)) == 1


def test_bad_job_and_missing_key_exit_2_before_any_request(server, caption, job_file, tmp_path, monkeypatch):
    folder = _images(tmp_path)
    code, _, err = caption(folder, tmp_path / "out", job_file(image_max_sid=3))
    assert code == 2 and "max_sid" in err and err.count("\n") == 1
    monkeypatch.delenv("CAPTION_NO_SUCH_KEY", raising=False)
    code, _, err = caption(folder, tmp_path / "out", job_file(endpoint_api_key_env="CAPTION_NO_SUCH_KEY"))
    assert code == 2 and "CAPTION_NO_SUCH_KEY" in err
    assert _chat_requests(server) == []


PROXY_ENV = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY",
             "all_proxy")


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # free once closed: a proxy address that refuses connections


@pytest.mark.parametrize("no_proxy, proxied", [(None, True), ("127.0.0.1", False), ("", None)],
                         ids=["http-proxy", "no-proxy-covers-the-host", "no-proxy-set"])
def test_proxy_is_read_once_from_the_environment(server, caption, job_file, tmp_path, monkeypatch, no_proxy,
                                                 proxied):
    for name in PROXY_ENV:
        monkeypatch.delenv(name, raising=False)
    port = _closed_port()
    if proxied is not None:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    if no_proxy:
        monkeypatch.setenv("NO_PROXY", no_proxy)
    reads = []
    real_getproxies = urllib.request.getproxies

    def getproxies():
        reads.append(1)
        return real_getproxies()

    # Both the product's look-up and aiohttp's own per-request one (trust_env) end here.
    monkeypatch.setattr(urllib.request, "getproxies", getproxies)
    monkeypatch.setattr(aiohttp.helpers, "getproxies", getproxies)
    folder = _images(tmp_path, copies=4)
    code, _, _ = caption(folder, tmp_path / "out", job_file(limits_max_attempts=2))
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 4
    if proxied:  # every request went to the proxy (which refuses), none to the server
        assert code == 1 and _chat_requests(server) == []
        assert all(r["error_kind"] == "transient" and r["attempts"] == 2 for r in rows)
        assert all("connection failed" in r["error"] and f":{port}" in r["error"] for r in rows)
    else:  # straight to the server
        assert code == 0 and all(r["status"] == "ok" for r in rows) and len(_chat_requests(server)) == 4
    assert len(reads) == 1  # once for the run, not once per request (8 requests were sent when proxied)


def test_api_key_never_reaches_output_or_logs(server, caption, job_file, tmp_path, monkeypatch):
    secret = "sk-test-0123456789abcdefSECRET"
    monkeypatch.setenv("CAPTION_TEST_KEY", secret)
    folder = _images(tmp_path, copies=3)
    server.fail_next("401")
    job = job_file(endpoint_api_key_env="CAPTION_TEST_KEY", limits_concurrency=1)
    code, out1, err1 = caption(folder, tmp_path / "out", job, "--debug")
    server.fail_next("503")
    code2, out2, err2 = caption(folder, tmp_path / "out", job, "--debug")
    assert (code, code2) == (3, 0)
    for text in (out1, err1, out2, err2):
        assert secret not in text
    for path in (tmp_path / "out").iterdir():
        assert secret.encode() not in path.read_bytes()
    assert all(o.authorized for o in server.observed())


def test_demo_command_runs_with_the_in_process_endpoint(tmp_path, cli):
    code, stdout, _ = cli("run", SAMPLES, "--job", DEMO_JOB, "--out", tmp_path / "out", "--no-progress")
    assert code == 1 and f"Parquet in {tmp_path / 'out'}" in stdout
    rows = read_rows(tmp_path / "out")
    assert sum(r["status"] == "ok" for r in rows) == len(SAMPLE_IMAGES) - len(BAD_SAMPLES)


def _copies(tmp_path: Path, count: int, start: int = 0) -> Path:
    """tmp_path/in with identical copies of one sample: copy_{start}.jpg, ..."""
    return copy_samples(tmp_path / "in", {f"copy_{i}.jpg": "coffee_cup.jpg" for i in range(start, start + count)})


def test_identical_files_are_sent_once(server, caption, job_file, tmp_path):
    code, _, _ = caption(_copies(tmp_path, 3), tmp_path / "out", job_file())
    assert code == 0 and len(_chat_requests(server)) == 1
    rows = read_rows(tmp_path / "out")
    (sent,) = [r for r in rows if r["dedup_of"] is None]
    copies = [r for r in rows if r["dedup_of"] is not None]
    assert len(copies) == 2 and all(r["dedup_of"] == sent["image_path"] for r in copies)
    assert all(r["caption"] == sent["caption"] and r["total_tokens"] == 0 and r["status"] == "ok" for r in copies)
    assert sent["total_tokens"] > 0


def test_copies_found_in_a_later_run_reuse_the_earlier_answer(server, caption, job_file, tmp_path):
    job = job_file()
    assert caption(_copies(tmp_path, 1), tmp_path / "out", job)[0] == 0
    _copies(tmp_path, 2, start=1)
    code, _, _ = caption(tmp_path / "in", tmp_path / "out", job)
    assert code == 0 and len(_chat_requests(server)) == 1  # nothing new was sent
    copies = [r for r in read_rows(tmp_path / "out") if r["dedup_of"]]
    assert sorted(r["image_path"] for r in copies) == ["copy_1.jpg", "copy_2.jpg"]
    assert {r["dedup_of"] for r in copies} == {"copy_0.jpg"}


def test_when_the_sent_copy_fails_another_copy_is_sent(server, caption, job_file, tmp_path):
    server.fail_next("400")
    code, _, _ = caption(_copies(tmp_path, 3), tmp_path / "out", job_file())
    rows = read_rows(tmp_path / "out")
    assert code == 1 and [o.status for o in _chat_requests(server)] == [400, 200]
    assert sorted((r["status"], r["dedup_of"] is not None) for r in rows) == [
        ("error", False), ("ok", False), ("ok", True)]


def test_a_file_name_that_is_not_utf8_is_captioned_under_an_escaped_key(server, caption, job_file, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    latin1 = folder / os.fsdecode(b"caf\xe9.jpg")  # as an old Latin-1 archive unpacks on Linux
    latin1.write_bytes((SAMPLES / "coffee_cup.jpg").read_bytes())
    code, _, _ = caption(folder, tmp_path / "out", job_file())
    (row,) = read_rows(tmp_path / "out")
    assert code == 0 and row["status"] == "ok" and row["image_path"] == "caf\\xe9.jpg"
    assert caption(folder, tmp_path / "out", job_file())[0] == 0  # and a rerun skips it
    assert len(_chat_requests(server)) == 1


def test_header_values_with_line_breaks_stop_before_sending(server, caption, tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTION_TEST_ORG", "org-1\r\nX-Evil: 1")
    job = tmp_path / "job.toml"
    job.write_text('[endpoint.headers]\nX-Org = "${CAPTION_TEST_ORG}"\n')
    code, _, err = caption(_images(tmp_path), tmp_path / "out", job)
    assert code == 2 and "line break" in err and _chat_requests(server) == []


def test_a_copy_is_not_given_another_jobs_answer(server, caption, job_file, tmp_path):
    assert caption(_copies(tmp_path, 1), tmp_path / "out", job_file())[0] == 0
    _copies(tmp_path, 1, start=1)
    code, _, _ = caption(tmp_path / "in", tmp_path / "out", job_file(), "--max-side", "128", "--allow-job-change")
    assert code == 0 and len(_chat_requests(server)) == 2  # the new job asked for its own answer
    assert all(r["dedup_of"] is None for r in read_rows(tmp_path / "out"))
