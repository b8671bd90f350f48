"""Gemini Batch Mode: the backend's tables (result lines, batch objects, displayName metadata), loopback batch
runs against the bundled endpoint (line faults, a failing create, kill -9 in each window, cancel, expiry, a
failed batch), batch prices in estimate and report, and the official google-genai SDK parsing the endpoint's
Files and Batch Mode answers."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from google import genai
from google.genai import types

from conftest import GEMINI_TEST_KEY, ROOT, SAMPLES, copy_samples, gemini_client, read_rows
from pipeline.engine.batch import CRASH_ENV
from pipeline.errors import BadOutputError, BadRequestError, QuotaError, RateLimitError, TransientError
from pipeline.job import Job
from pipeline.localserver import LocalServer
from pipeline.providers.gemini import GeminiBatchBackend, GeminiProvider
from pipeline.providers.gemini.batch import _on_origin, batch_info, display_name, metadata_of, \
    parse_result_line, resource_name
from pipeline.records import Encoded

GOOD = ["astronaut_eileen_collins.jpg", "brick_wall_grey.jpg", "chelsea_the_cat.jpg", "coffee_cup.jpg",
        "hubble_deep_field.jpg"]
MODEL = "gemini-2.5-flash"


# --- lines and batch objects -----------------------------------------------------------------------


def _line(**fields) -> bytes:
    return json.dumps({"key": "a/b.jpg", **fields}).encode()


def _answer(text: str = "A cup.", finish: str = "STOP") -> dict:
    return {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": finish}],
            "modelVersion": MODEL, "responseId": "resp_1",
            "usageMetadata": {"promptTokenCount": 266, "candidatesTokenCount": 7, "thoughtsTokenCount": 3}}


def test_request_lines_carry_the_key_and_the_online_request():
    provider = GeminiProvider(Job(), "https://generativelanguage.googleapis.com", api_key="AIza-1", headers={})
    backend = GeminiBatchBackend(None, provider, timeout_s=1)
    image = Encoded("0" * 64, 4, 40, 30, 40, 30, "image/jpeg", b"\xff\xd8ab")
    line = json.loads(backend.request_line(backend.custom_id("dir/a b.jpg"), image))
    assert line["key"] == "dir/a b.jpg" and line["request"] == provider.body(image)
    assert "AIza-1" not in json.dumps(line)


@pytest.mark.parametrize(
    ("raw", "error", "text"),
    [(_line(response=_answer()), None, "A cup."),
     (_line(response=_answer("", "SAFETY")), BadOutputError, None),
     (_line(error={"code": 3, "message": "Unable to process input image."}), BadRequestError, None),
     (_line(error={"code": 14, "message": "The model is overloaded."}), TransientError, None),
     (_line(error={"code": 8, "message": "quota", "status": "RESOURCE_EXHAUSTED"}), RateLimitError, None),
     (_line(error={"code": 429, "message": "quota"}), RateLimitError, None),
     (_line(error={"code": 400, "message": "User location is not supported"}), QuotaError, None),
     (_line(), TransientError, None)],
    ids=["response", "safety", "grpc-invalid", "grpc-unavailable", "grpc-exhausted", "http-429", "location",
         "neither"],
)
def test_result_lines_parse_into_answers_and_typed_errors(raw, error, text):
    result = parse_result_line(raw)
    assert result.custom_id == "a/b.jpg" and result.ran
    if error is None:
        assert result.chat.text == text and result.request_id == "resp_1"
        assert (result.chat.usage.prompt_tokens, result.chat.usage.completion_tokens) == (266, 10)
    else:
        assert type(result.error) is error
    assert parse_result_line(b'{"custom_id": "x"}') is None and parse_result_line(b"not json") is None


@pytest.mark.parametrize(
    ("value", "kind", "ok"),
    [("batches/123abc", "batches", True), ("files/batch-123abc", "files", True), ("files/abc", "batches", False),
     ("batches/../../v1beta/files", "batches", False), ("batches/a?alt=media", "batches", False),
     ("batches/", "batches", False), (None, "files", False), ("batches/" + "a" * 200, "batches", False)],
    ids=["batch", "results-file", "wrong-kind", "dot-dot", "query", "empty", "none", "too-long"],
)
def test_only_well_formed_names_go_into_urls(value, kind, ok):
    assert resource_name(value, kind) == (value if ok else None)


def test_the_upload_session_url_stays_on_the_servers_host():
    root = "http://127.0.0.1:9"
    assert _on_origin("https://evil.example/upload/v1beta/files?upload_id=u1", root) == \
        "http://127.0.0.1:9/upload/v1beta/files?upload_id=u1"
    assert _on_origin("/upload/v1beta/files?upload_id=u2", root) == "http://127.0.0.1:9/upload/v1beta/files?upload_id=u2"


def test_batch_objects_map_states_counts_results_and_the_display_name():
    metadata = {"caption_job": "cf86812ea3344eeb", "caption_chunk": "0a1b2c3d4e5f/chunk-00002"}
    assert metadata_of(display_name(metadata)) == metadata and metadata_of("someone else's") == {}
    operation = {"name": "batches/b1", "done": True, "metadata": {
        "displayName": display_name(metadata), "state": "BATCH_STATE_SUCCEEDED",
        "createTime": "2030-01-01T00:00:00.123456789Z", "output": {"responsesFile": "files/batch-b1"},
        "batchStats": {"requestCount": "3", "successfulRequestCount": "2", "failedRequestCount": "1"}}}
    info = batch_info(operation)
    assert (info.id, info.status, info.ended, info.result_files) == ("batches/b1", "succeeded", True, ("files/batch-b1",))
    assert info.counts == {"total": 3, "completed": 2, "failed": 1, "pending": 0} and info.metadata == metadata
    assert info.created_at == pytest.approx(1893456000.123456)
    running = batch_info({"name": "batches/b2", "metadata": {"state": "BATCH_STATE_RUNNING",
                                                            "batchStats": {"requestCount": "-1"}}})
    assert not running.ended and running.counts["total"] == 0 and running.result_files == ()
    failed = batch_info({"name": "batches/b3", "done": True, "error": {"code": 3, "message": "bad JSONL"},
                         "metadata": {"state": "BATCH_STATE_FAILED"}})
    assert failed.ran_nothing and "bad JSONL" in str(failed.failure)


# --- loopback: the CLI against the bundled endpoint ------------------------------------------------------


@pytest.fixture
def folder(tmp_path) -> Path:
    return copy_samples(tmp_path / "in", GOOD)


@pytest.fixture
def gemini_job(job_file) -> Path:
    return job_file(endpoint_api="gemini", endpoint_model=MODEL, limits_max_attempts=4)


def _argv(folder: Path, out: Path, server: LocalServer, job: Path, *flags: str) -> list[str]:
    return ["run", str(folder), "--job", str(job), "--out", str(out), "--base-url", server.base_url,
            "--no-progress", "--mode", "batch", "--batch-poll-s", "0.02", "--batch-max-requests", "2", *flags]


def _one_ok_row_each(out: Path) -> list[dict]:
    rows = read_rows(out)
    assert sorted(r["image_path"] for r in rows) == sorted(GOOD)  # one row each: nothing lost or twice
    assert {(r["status"], r["mode"], r["model"]) for r in rows} == {("ok", "batch", MODEL)}
    assert all(r["usage_source"] == "reported" and r["prompt_tokens"] > 258 and r["completion_tokens"] for r in rows)
    assert all(r["request_id"].startswith("resp_") for r in rows)
    return rows


def _chunks(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "_batch").glob("chunk-*[0-9].json"))]


def _one_batch_per_chunk(out: Path, server: LocalServer) -> None:
    chunks, seen = _chunks(out), server.gemini_batches()
    assert len(seen) == len(chunks)  # no chunk was created twice
    assert {c["batch_id"] for c in chunks} == {b.name for b in seen}
    run_id = json.loads((out / "_batch" / "_run.json").read_text())["run_id"]
    assert sorted(b.display_name.split(" ")[2] for b in seen) == sorted(f"{run_id}/{c['name']}" for c in chunks)
    assert {b.source for b in seen} == {"file"}


def _each_image_in_one_batch(server: LocalServer) -> None:
    keys = [key for batch in server.gemini_batches() for key in batch.keys]
    assert sorted(keys) == sorted(GOOD)  # every image sent, none in two batches


def test_batch_run_with_line_faults_and_a_failing_create_gives_one_ok_row_each(server, folder, tmp_path,
                                                                               gemini_job, cli):
    server.fail_next("503")  # the first request that runs is an UNAVAILABLE line: sent again in a later chunk
    server.fail_next_gemini_create()  # the first create is refused: asked again
    server.fail_next_gemini_create(created=True)  # the next is made but its answer lost: found, not made twice
    out = tmp_path / "out"
    ran = cli(*_argv(folder, out, server, gemini_job))
    assert ran.code == 0, ran.err
    rows = _one_ok_row_each(out)
    assert sorted(r["attempts"] for r in rows) == [1, 1, 1, 1, 2]
    assert [b.lines for b in server.gemini_batches()] == [2, 2, 1, 1]  # three chunks, one resent request
    _one_batch_per_chunk(out, server)
    assert all(name.startswith("files/batch-") for name in server.gemini_files())  # input files deleted
    seen = {r["image_path"]: r for r in rows}
    online = tmp_path / "online"
    assert cli("run", folder, "--job", gemini_job, "--out", online, "--base-url", server.base_url,
               "--no-progress").code == 0
    for row in read_rows(online):  # the same answers and usage as generateContent gives
        assert (seen[row["image_path"]]["caption"], seen[row["image_path"]]["prompt_tokens"]) == \
            (row["caption"], row["prompt_tokens"])


def test_a_cap_on_live_batches_makes_chunks_wait_for_a_live_one_to_end(server, folder, tmp_path, gemini_job, cli):
    server.set_latency(0.2)
    server.limit_gemini_batches(live=1)  # a create while one batch is live is answered 429
    out = tmp_path / "out"
    ran = cli(*_argv(folder, out, server, gemini_job))
    assert ran.code == 0, ran.err
    assert server.gemini_refused_creates() > 0
    _one_batch_per_chunk(out, server)
    assert [b.lines for b in server.gemini_batches()] == [2, 2, 1]
    _each_image_in_one_batch(server)
    _one_ok_row_each(out)


def _start(folder: Path, out: Path, server: LocalServer, job: Path, crash_at: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "pipeline", *_argv(folder, out, server, job)]
    return subprocess.run(argv, check=False, cwd=ROOT, env={**os.environ, CRASH_ENV: crash_at}, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("step", ["uploaded", "created", "polling", "collecting"])
def test_kill9_in_each_window_then_rerun_creates_each_batch_once(server, folder, tmp_path, gemini_job, cli, step):
    server.set_latency(0.1)
    out = tmp_path / "out"
    crashed = _start(folder, out, server, gemini_job, step)
    assert crashed.returncode == 137, crashed.stderr
    assert cli(*_argv(folder, out, server, gemini_job)).code == 0
    _one_batch_per_chunk(out, server)
    assert len(server.gemini_batches()) == 3
    _each_image_in_one_batch(server)
    _one_ok_row_each(out)


def test_cancel_then_collect_sends_again_what_did_not_run(server, folder, tmp_path, gemini_job, cli):
    server.set_latency(30)  # the batch is still pending when the cancel comes
    out = tmp_path / "out"
    assert cli(*_argv(folder, out, server, gemini_job, "--batch-max-requests", "10", "--detach")).code == 0
    ran = cli("batch", "cancel", out)
    assert ran.code == 0 and "asked to cancel 1 batches" in ran.out
    assert [b.state for b in server.gemini_batches()] == ["BATCH_STATE_CANCELLED"]
    server.set_latency(0)
    assert cli("batch", "collect", str(out)).code == 0  # collects the cancelled one (nothing ran), sends all again
    deadline = time.monotonic() + 5
    while len(list(out.glob("part-*.parquet"))) == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
        assert cli("batch", "collect", str(out)).code == 0
    assert [b.lines for b in server.gemini_batches()] == [5, 5]
    _one_ok_row_each(out)


@pytest.mark.parametrize(("outcome", "run_lines"), [("expired", 1), ("cancelled", 0)])
def test_a_batch_that_ended_early_keeps_its_answers_and_sends_the_rest_again(server, folder, tmp_path, gemini_job,
                                                                             cli, outcome, run_lines):
    server.end_next_gemini_batch(outcome, run_lines=run_lines)
    out = tmp_path / "out"
    assert cli(*_argv(folder, out, server, gemini_job)).code == 0
    rows = _one_ok_row_each(out)
    assert sorted(r["attempts"] for r in rows) == [1] * (3 + run_lines) + [2] * (2 - run_lines)
    assert [b.lines for b in server.gemini_batches()] == [2, 2, 1, 2 - run_lines]
    assert server.gemini_batches()[0].state == f"BATCH_STATE_{outcome.upper()}"


def test_a_failed_batch_stops_the_run_and_its_images_go_again_next_time(server, folder, tmp_path, gemini_job, cli):
    server.end_next_gemini_batch("failed")
    out = tmp_path / "out"
    ran = cli(*_argv(folder, out, server, gemini_job))
    assert ran.code == 3 and "failed" in ran.err
    assert cli(*_argv(folder, out, server, gemini_job)).code == 0
    _one_ok_row_each(out)


def test_batch_runs_are_priced_at_batch_rates_in_estimate_and_report(server, folder, tmp_path, gemini_job, cli):
    out = tmp_path / "out"
    assert cli(*_argv(folder, out, server, gemini_job)).code == 0
    rows = read_rows(out)
    prompt, completion = sum(r["prompt_tokens"] for r in rows), sum(r["completion_tokens"] for r in rows)
    report = json.loads(cli("report", out, "--json").out)
    assert report["cost_usd"] == pytest.approx((prompt * 0.15 + completion * 1.25) / 1e6)  # gemini-2.5-flash batch
    assert report["cost_at_list_usd"] == pytest.approx((prompt * 0.30 + completion * 2.50) / 1e6)
    base = ["estimate", folder, "--job", gemini_job, "--json", "--expected-output-tokens", "20"]
    online, batch = (json.loads(cli(*base, *mode).out) for mode in ([], ["--mode", "batch"]))
    assert batch["prompt_tokens"] == online["prompt_tokens"] > 0
    assert batch["cost_usd"] == pytest.approx(online["cost_usd"] / 2)


def test_prepared_requests_run_by_hand_through_the_sdk_are_ingested_into_rows(server, folder, tmp_path,
                                                                              gemini_job, cli):
    dest, out = tmp_path / "requests", tmp_path / "out"
    assert cli("batch", "prepare", folder, "--job", gemini_job, "--dest", dest).code == 0
    (requests,) = sorted(dest.glob("requests-*[0-9].jsonl"))
    assert sorted(json.loads(line)["key"] for line in requests.read_text().splitlines()) == sorted(GOOD)
    client = gemini_client(server)  # the way a user would run them by hand
    uploaded = client.files.upload(file=requests, config={"mime_type": "application/jsonl"})
    job = _ended(client, client.batches.create(model=MODEL, src=uploaded.name, config={"display_name": "by hand"}).name)
    results = tmp_path / "results.jsonl"
    client.files.download(file=job.dest.file_name, destination=results)
    assert cli("batch", "ingest", out, results, "--job", gemini_job, "--prepared", dest).code == 0
    _one_ok_row_each(out)
    again = cli("batch", "ingest", out, results, "--job", gemini_job, "--prepared", dest)
    assert again.code == 0 and len(read_rows(out)) == len(GOOD)  # ingesting twice adds nothing


# --- the official SDK parses what the bundled endpoint sends ------------------------------------------


@pytest.fixture(scope="module")
def keyed_server():
    with LocalServer(api_key=GEMINI_TEST_KEY) as server:
        yield server


def _request(mime: str = "image/jpeg", data: bytes | None = None) -> dict:
    data = (SAMPLES / "coffee_cup.jpg").read_bytes() if data is None else data
    return {"contents": [{"role": "user", "parts": [{"inline_data": {"mime_type": mime,
                                                                      "data": base64.b64encode(data).decode()}},
                                                     {"text": "Describe this image."}]}]}


def _ended(client: genai.Client, name: str) -> types.BatchJob:
    deadline = time.monotonic() + 5
    while not (job := client.batches.get(name=name)).done:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return job


def test_the_sdk_uploads_creates_gets_lists_cancels_and_downloads(keyed_server):
    client = gemini_client(keyed_server)
    lines = (json.dumps({"key": "one", "request": _request()}) + "\n"
             + json.dumps({"key": "two", "request": _request("image/png", b"not")}) + "\n").encode()
    uploaded = client.files.upload(file=io.BytesIO(lines), config={"mime_type": "application/jsonl",
                                                                   "display_name": "requests"})
    assert uploaded.name.startswith("files/") and uploaded.size_bytes == len(lines)
    assert client.files.get(name=uploaded.name).state == types.FileState.ACTIVE
    job = client.batches.create(model=MODEL, src=uploaded.name, config={"display_name": "caption test"})
    assert job.name.startswith("batches/") and job.display_name == "caption test"
    assert job.state == types.JobState.JOB_STATE_PENDING and job.model == f"models/{MODEL}"
    job = _ended(client, job.name)
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED and job.dest.file_name.startswith("files/")
    results = {}
    for raw in client.files.download(file=job.dest.file_name).splitlines():
        line = json.loads(raw)
        results[line["key"]] = line
    answer = types.GenerateContentResponse.model_validate(results["one"]["response"])
    assert "600×400" in answer.text and answer.usage_metadata.prompt_token_count == 258 + 5
    assert results["two"]["error"]["code"] == 3  # INVALID_ARGUMENT, as a google.rpc.Status
    inline = _ended(client, client.batches.create(model=MODEL, src=[_request()], config={"display_name": "i"}).name)
    assert inline.dest.inlined_responses[0].response.text == answer.text
    assert {job.name, inline.name} <= {b.name for b in client.batches.list(config={"page_size": 1})}
    keyed_server.set_latency(5)
    live = client.batches.create(model=MODEL, src=uploaded.name, config={"display_name": "to cancel"})
    client.batches.cancel(name=live.name)
    assert client.batches.get(name=live.name).state == types.JobState.JOB_STATE_CANCELLED
    keyed_server.set_latency(0)
