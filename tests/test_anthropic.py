"""Anthropic Messages and Message Batches: the provider's tables, and loopback runs against the bundled
endpoint (online streamed and not, faults and limits, batch with kill -9), which the official SDK parses."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import anthropic
import pytest

from conftest import ROOT, SAMPLES, copy_samples, latest_rows, read_rows
from pipeline.engine.batch import CRASH_ENV
from pipeline.errors import AuthError, BadOutputError, BadRequestError, ModelNotFoundError, QuotaError, \
    RateLimitError, TransientError
from pipeline.job import ImageSettings, Job, load_job
from pipeline.localserver import LocalServer
from pipeline.providers import make_provider
from pipeline.providers.anthropic import AnthropicBatchBackend, AnthropicProvider
from pipeline.providers.anthropic.batch import JOURNAL, batch_info, parse_result_line
from pipeline.providers.anthropic.errors import classify_response, parse_rate_info, parse_reset, retry_after_s
from pipeline.providers.anthropic.messages import MAX_IMAGE_BASE64_BYTES, parse_message
from pipeline.records import Encoded, RateInfo

GOOD = ["astronaut_eileen_collins.jpg", "brick_wall_grey.jpg", "chelsea_the_cat.jpg", "coffee_cup.jpg",
        "hubble_deep_field.jpg"]
MODEL = "claude-haiku-4-5"
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def _job(tmp_path: Path, **endpoint) -> Job:
    text = "\n".join(f'{k} = {json.dumps(v)}' for k, v in {"api": "anthropic", "model": MODEL, **endpoint}.items())
    path = tmp_path / "anthropic.toml"
    path.write_text(f'[endpoint]\n{text}\n[prompt]\nuser = "Describe."\nsystem = "Be brief."\nmax_tokens = 90\n')
    return load_job(path)


def _encoded(data: bytes = b"\xff\xd8fake", width: int = 40, height: int = 30) -> Encoded:
    return Encoded("0" * 64, len(data), width, height, width, height, "image/jpeg", data)


# --- the request ---------------------------------------------------------------------------------


def test_the_job_picks_the_protocol_and_the_fingerprint_ignores_it(tmp_path):
    job = _job(tmp_path, base_url="https://api.anthropic.com")
    assert isinstance(make_provider(job, job.endpoint.base_url, api_key="k", headers={}), AnthropicProvider)
    openai = load_job(ROOT / "jobs" / "demo.toml")
    assert openai.endpoint.api == "openai"
    same = Job(endpoint=type(job.endpoint)(model=MODEL), prompt=job.prompt)
    assert same.fingerprint == job.fingerprint  # [endpoint] api is not decisive


def test_request_has_key_version_max_tokens_and_the_image_before_the_text(tmp_path):
    job = _job(tmp_path)
    provider = AnthropicProvider(job, "https://api.anthropic.com", api_key="sk-ant-1", headers={"X-Org": "o"})
    request = provider.build_request(_encoded(), stream=True)
    assert request.url == "https://api.anthropic.com/v1/messages"
    assert request.headers["x-api-key"] == "sk-ant-1" and request.headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in request.headers and request.headers["X-Org"] == "o"
    body = request.body
    assert body["max_tokens"] == 90 and body["model"] == MODEL and body["system"] == "Be brief."
    assert body["stream"] is True and "temperature" not in body
    image, text = body["messages"][0]["content"]
    assert image == {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                                 "data": base64.b64encode(b"\xff\xd8fake").decode()}}
    assert text == {"type": "text", "text": "Describe."}
    assert "stream" not in provider.body(_encoded(), stream=False)
    assert AnthropicProvider(job, "http://127.0.0.1:9/v1", api_key=None, headers={}).url == \
        "http://127.0.0.1:9/v1/messages"  # a base URL given as .../v1, as relays and the bundled endpoint are


@pytest.mark.parametrize(
    ("max_side", "data_bytes", "sent_side", "expected_side"),
    [(10_000, None, None, 8000), (1024, None, None, 1024),
     (8000, 1_000_000, 4000, 8000), (8000, MAX_IMAGE_BASE64_BYTES, 6000, 4936), (8000, 10_000_000, 300, 256)],
    ids=["caps-8000", "leaves-smaller", "fits-5mb", "over-5mb-as-base64-shrinks", "stops-at-the-floor"],
)
def test_image_settings_keep_an_image_within_8000_px_and_5_mb_of_base64(tmp_path, max_side, data_bytes, sent_side,
                                                                         expected_side):
    provider = AnthropicProvider(_job(tmp_path), "https://x", api_key=None, headers={})
    settings = ImageSettings(max_side=max_side)
    if data_bytes is None:
        assert provider.image_settings(settings).max_side == expected_side
        return
    encoded = _encoded(b"x" * data_bytes, sent_side, sent_side // 2)  # 5 MB raw is 4/3 of that as base64: ⌊6000 · √(3/4) · 0.95⌋
    assert provider.image_settings(settings, encoded).max_side == expected_side


# --- answers and the stream ------------------------------------------------------------------------


def _events(*events: tuple[str, dict]) -> bytes:
    return b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events)


START = ("message_start", {"type": "message_start", "message": {
    "id": "msg_1", "type": "message", "role": "assistant", "model": MODEL, "content": [], "stop_reason": None,
    "usage": {"input_tokens": 120, "output_tokens": 1, "cache_read_input_tokens": 20}}})
BLOCK = ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
PING = ("ping", {"type": "ping"})


def _delta(text: str) -> tuple[str, dict]:
    return ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                    "delta": {"type": "text_delta", "text": text}})


def _end(stop: str | None, output: int = 7) -> list[tuple[str, dict]]:
    return [("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop}, "usage": {"output_tokens": output}}),
            ("message_stop", {"type": "message_stop"})]


def _parse_stream(raw: bytes, split: int = 7):
    provider = AnthropicProvider(Job(), "http://x", api_key=None, headers={})
    parser = provider.stream_parser({"request-id": "req_9"})
    for i in range(0, len(raw), split):  # fed in awkward pieces, as a socket would
        parser.feed(raw[i: i + split])
    return parser.result()


def test_stream_of_the_documented_sequence_gives_text_stop_and_usage():
    chat = _parse_stream(_events(START, BLOCK, PING, _delta("A red "), PING, _delta("brick wall."), *_end("end_turn")))
    assert chat.text == "A red brick wall." and chat.finish_reason == "stop" and chat.request_id == "req_9"
    usage = chat.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens, usage.cached_tokens) == (140, 7, 147, 20)


@pytest.mark.parametrize(
    ("events", "error", "retryable"),
    [([START, BLOCK, _delta("half"), ("error", {"type": "error", "error": {"type": "overloaded_error",
                                                                          "message": "Overloaded"}})],
      TransientError, True),
     ([START, BLOCK, ("error", {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}})],
      BadRequestError, False),
     ([START, BLOCK, *_end("refusal", 0)], BadOutputError, False),
     ([START, BLOCK, _delta("cut"), *_end("end_turn")[:2]], TransientError, True),
     ([START, BLOCK, *_end("max_tokens", 90)], BadOutputError, False)],
    ids=["error-event-overloaded", "error-event-invalid", "refusal", "no-message-stop", "empty-at-max-tokens"],
)
def test_stream_failures_are_typed(events, error, retryable):
    with pytest.raises(error) as caught:
        _parse_stream(_events(*events))
    assert getattr(caught.value, "retryable", retryable) is retryable


def test_whole_message_maps_usage_and_max_tokens_is_length():
    body = {"id": "msg_2", "type": "message", "model": MODEL, "content": [{"type": "text", "text": "A cat"}],
            "stop_reason": "max_tokens", "usage": {"input_tokens": 50, "output_tokens": 90}}
    chat = parse_message(json.dumps(body).encode(), None)
    assert chat.finish_reason == "length" and chat.request_id == "msg_2"
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.cached_tokens) == (50, 90, None)


# --- errors and limits -------------------------------------------------------------------------------


def _error(type_: str, message: str = "x") -> bytes:
    return json.dumps({"type": "error", "error": {"type": type_, "message": message}}).encode()


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [(529, _error("overloaded_error", "Overloaded"), TransientError),
     (500, _error("api_error"), TransientError),
     (413, _error("request_too_large"), BadRequestError),
     (400, _error("invalid_request_error", "messages.0.content.0: Could not process image"), BadRequestError),
     (401, _error("authentication_error"), AuthError),
     (403, _error("permission_error"), AuthError),
     (400, _error("invalid_request_error", "Your credit balance is too low to access the Anthropic API."), QuotaError),
     (402, _error("billing_error"), QuotaError),
     (404, _error("not_found_error", "model: claude-nope"), ModelNotFoundError),
     (429, _error("rate_limit_error", "exceeds 50,000 input tokens per minute"), RateLimitError),
     (200, _error("overloaded_error"), TransientError),
     (502, b"<html><title>502 Bad Gateway</title></html>", TransientError)],
    ids=["529", "500", "413", "400", "401", "403", "credit", "402", "404-model", "429", "200-error", "html-502"],
)
def test_classification(status, body, expected):
    error = classify_response(status, {"request-id": "req_1"}, body)
    assert type(error) is expected and error.request_id == "req_1"


def test_429_carries_the_wait_and_the_empty_bucket():
    reset = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=20)).isoformat().replace("+00:00", "Z")
    headers = {"anthropic-ratelimit-output-tokens-remaining": "0", "anthropic-ratelimit-output-tokens-reset": reset}
    error = classify_response(429, headers, _error("rate_limit_error", "slow down"))
    assert error.bucket == "tokens" and error.window == "minute" and error.exhausted
    assert 18 < error.retry_after_s <= 20
    assert classify_response(429, {"retry-after": "7"}, _error("rate_limit_error")).retry_after_s == 7
    named = classify_response(429, {}, _error("rate_limit_error", "would exceed 50,000 input tokens per minute"))
    assert (named.window, named.bucket, named.limit, named.explained) == ("minute", "tokens", 50000, True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2030-01-01T00:00:10Z", 10.0), ("2030-01-01T00:00:10+00:00", 10.0), ("2029-12-31T23:59:00Z", 0.0),
     ("2030-01-01T00:00:10", None), ("soon", None), ("", None), ("2031-01-01T00:00:00Z", None)],
    ids=["zulu", "offset", "past", "naive", "junk", "empty", "absurd"],
)
def test_reset_is_an_rfc3339_time(text, expected):
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC).timestamp()
    assert parse_reset(text, now=now) == expected


def test_rate_info_reports_requests_and_the_binding_token_bucket():
    headers = {"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "49",
               "anthropic-ratelimit-input-tokens-limit": "50000", "anthropic-ratelimit-input-tokens-remaining": "40000",
               "anthropic-ratelimit-output-tokens-limit": "10000",
               "anthropic-ratelimit-output-tokens-remaining": "2000"}
    assert parse_rate_info(headers) == RateInfo(50, 49, 10000, 2000)  # output: 20 % left, the tighter
    assert parse_rate_info({"x-ratelimit-limit-requests": "5"}) is None
    assert retry_after_s({"anthropic-ratelimit-requests-remaining": "3"}) is None


# --- batch lines ---------------------------------------------------------------------------------------


def test_custom_ids_fit_anthropic_and_result_lines_parse():
    backend = AnthropicBatchBackend(None, AnthropicProvider(Job(), "http://x", api_key=None, headers={}), timeout_s=1)
    ids = {backend.custom_id(key) for key in ("a/b c.jpg", "../../etc/passwd", "ü" * 300, "x")}
    assert len(ids) == 4 and all(CUSTOM_ID.match(i) for i in ids)
    ok = {"custom_id": "c1", "result": {"type": "succeeded", "message": {
        "id": "msg_1", "type": "message", "model": MODEL, "content": [{"type": "text", "text": "A cup"}],
        "stop_reason": "end_turn", "usage": {"input_tokens": 5, "output_tokens": 2}}}}
    assert parse_result_line(json.dumps(ok).encode()).chat.text == "A cup"
    errored = {"custom_id": "c2", "result": {"type": "errored", "error": {"type": "error", "error": {
        "type": "invalid_request_error", "message": "bad image"}}}}
    assert isinstance(parse_result_line(json.dumps(errored).encode()).error, BadRequestError)
    for kind in ("canceled", "expired"):
        assert parse_result_line(json.dumps({"custom_id": "c3", "result": {"type": kind}}).encode()).ran is False
    info = batch_info({"id": "b", "processing_status": "ended", "created_at": "2030-01-01T00:00:00Z",
                       "results_url": "u", "request_counts": {"succeeded": 3, "errored": 1, "processing": 0}})
    assert info.ended and info.result_files == ("u",) and info.counts["total"] == 4


# --- loopback: the CLI against the bundled endpoint ------------------------------------------------------


@pytest.fixture
def folder(tmp_path) -> Path:
    return copy_samples(tmp_path / "in", GOOD)


def _argv(folder: Path, out: Path, server: LocalServer, job: Path, *flags: str) -> list[str]:
    return ["run", str(folder), "--job", str(job), "--out", str(out), "--base-url", server.base_url,
            "--no-progress", "--batch-poll-s", "0.02", *flags]


@pytest.fixture
def anthropic_job(job_file) -> Path:
    return job_file(endpoint_api="anthropic", endpoint_model=MODEL, limits_max_attempts=4)


def _one_ok_row_each(out: Path) -> list[dict]:
    rows = read_rows(out)
    assert sorted(r["image_path"] for r in rows) == sorted(GOOD)  # one row each: nothing lost or twice
    assert {r["status"] for r in rows} == {"ok"}
    assert all(r["usage_source"] == "reported" and r["prompt_tokens"] and r["completion_tokens"] for r in rows)
    return rows


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_online_run_with_faults_and_limits_gives_one_ok_row_each(server, folder, tmp_path, anthropic_job, cli, stream):
    server.rate_limit(rpm=600, tpm=200_000)
    for fault in ("503", "500", "stream_error", "429", "drop"):
        server.fail_next(fault, retry_after_s=0.05)
    out = tmp_path / "out"
    assert cli(*_argv(folder, out, server, anthropic_job, stream)).code == 0
    rows = _one_ok_row_each(out)
    assert sum(r["attempts"] for r in rows) == len(GOOD) + 5  # each fault cost one attempt
    seen = server.observed()
    assert {o.status for o in seen} >= {200, 529, 500} and all(o.model == MODEL for o in seen)
    assert all(o.stream == (stream == "--stream") for o in seen if o.status == 200)
    assert {r["model"] for r in rows} == {MODEL}


def test_refusal_is_an_error_row_that_is_not_retried(server, folder, tmp_path, job_file, cli):
    job = job_file(endpoint_api="anthropic", endpoint_model="local-refusal-1")
    out = tmp_path / "out"
    assert cli(*_argv(folder, out, server, job)).code == 1
    rows = read_rows(out)
    assert len(rows) == len(GOOD)
    assert {(r["error_kind"], r["attempts"]) for r in rows} == {("bad_output", 1)}
    assert all("refused" in r["error"] for r in rows)


def test_an_image_over_8000_px_is_shrunk_not_refused(server, tmp_path, job_file, cli):
    from PIL import Image

    (tmp_path / "in").mkdir()
    Image.new("RGB", (8150, 40), "red").save(tmp_path / "in" / "wide.png")
    job = job_file(endpoint_api="anthropic", image_max_side=8192, image_format="png")
    out = tmp_path / "out"
    assert cli(*_argv(tmp_path / "in", out, server, job)).code == 0
    (row,) = read_rows(out)
    assert row["status"] == "ok" and row["sent_width"] == 8000
    assert server.observed()[0].image_size[0] == 8000


def _server_batches(server: LocalServer) -> list:
    client = anthropic.Anthropic(base_url=server.base_url.removesuffix("/v1"), api_key="unused")
    return list(client.messages.batches.list(limit=100))


def _start(folder: Path, out: Path, server: LocalServer, job: Path, crash_at: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "pipeline", *_argv(folder, out, server, job, "--mode", "batch",
                                                     "--batch-max-requests", "2")]
    return subprocess.run(argv, check=False, cwd=ROOT, env={**os.environ, CRASH_ENV: crash_at}, capture_output=True,
                          text=True, timeout=60)


def test_batch_run_with_line_faults_gives_one_ok_row_each(server, folder, tmp_path, anthropic_job, cli):
    server.fail_next("503")  # the first request that runs is errored with overloaded_error: sent again
    out = tmp_path / "out"
    assert cli(*_argv(folder, out, server, anthropic_job, "--mode", "batch", "--batch-max-requests", "2")).code == 0
    rows = _one_ok_row_each(out)
    assert {r["mode"] for r in rows} == {"batch"} and all(r["request_id"].startswith("msg_") for r in rows)
    assert sorted(r["attempts"] for r in rows) == [1, 1, 1, 1, 2]
    assert len(_server_batches(server)) == 4  # three chunks, and one for the resent request


@pytest.mark.parametrize("forget", [False, True], ids=["journal-names-it", "found-by-listing"])
def test_kill9_after_create_then_rerun_creates_each_batch_once(server, folder, tmp_path, anthropic_job, cli, forget):
    server.set_latency(0.3)  # the lost batch is still running when the rerun looks for it
    out = tmp_path / "out"
    crashed = _start(folder, out, server, anthropic_job, "created")
    assert crashed.returncode == 137, crashed.stderr
    journal = out / "_batch" / JOURNAL
    if forget:  # as if the kill came between the create's answer and its journal line
        lines = [line for line in journal.read_text().splitlines() if "batch_id" not in line]
        journal.write_text("".join(line + "\n" for line in lines))
    assert len(_server_batches(server)) == 1
    assert cli(*_argv(folder, out, server, anthropic_job, "--mode", "batch", "--batch-max-requests", "2")).code == 0
    chunks = [json.loads(p.read_text()) for p in sorted((out / "_batch").glob("chunk-*[0-9].json"))]
    batches = _server_batches(server)
    assert len(batches) == len(chunks) == 3  # exactly one batch per chunk
    assert {c["batch_id"] for c in chunks} == {b.id for b in batches}
    _one_ok_row_each(out)
    assert set(latest_rows(out)) == set(GOOD)


# --- the official SDK parses what the bundled endpoint sends ------------------------------------------


@pytest.fixture(scope="module")
def keyed_server():
    with LocalServer(api_key="sk-ant-test") as server:
        yield server


def _content() -> list[dict]:
    data = base64.b64encode((SAMPLES / "coffee_cup.jpg").read_bytes()).decode()
    return [{"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": data}},
            {"type": "text", "text": "Describe this image."}]


def test_the_sdk_parses_messages_streams_errors_and_batches(keyed_server):
    root = keyed_server.base_url.removesuffix("/v1")
    client = anthropic.Anthropic(base_url=root, api_key="sk-ant-test", max_retries=0)
    messages = [{"role": "user", "content": _content()}]
    message = client.messages.create(model=MODEL, max_tokens=100, messages=messages)
    assert message.stop_reason == "end_turn" and "600×400" in message.content[0].text
    assert message.usage.input_tokens == 320 + 5  # ⌈600 × 400 / 750⌉ + the text's
    with client.messages.stream(model=MODEL, max_tokens=100, messages=messages) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == message.content[0].text and final.usage.output_tokens == message.usage.output_tokens
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=root, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=5, messages=messages)
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        client.messages.create(model=MODEL, max_tokens=0, messages=messages)
    keyed_server.fail_next("503")
    with pytest.raises(anthropic.APIStatusError) as overloaded:
        client.messages.create(model=MODEL, max_tokens=5, messages=messages)
    assert overloaded.value.status_code == 529
    keyed_server.fail_next("stream_error")
    with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
        with client.messages.stream(model=MODEL, max_tokens=100, messages=messages) as stream:
            stream.get_final_message()
    batch = client.messages.batches.create(requests=[
        {"custom_id": "one", "params": {"model": MODEL, "max_tokens": 50, "messages": messages}},
        {"custom_id": "two", "params": {"model": MODEL, "max_tokens": 50, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "bm90"}}]}]}}])
    assert batch.processing_status == "in_progress"
    deadline = time.monotonic() + 5
    while (batch := client.messages.batches.retrieve(batch.id)).processing_status != "ended":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert (batch.request_counts.succeeded, batch.request_counts.errored) == (1, 1)
    results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    assert results["one"].type == "succeeded" and results["one"].message.content[0].text == message.content[0].text
    assert results["two"].type == "errored"
    assert batch.id in [b.id for b in client.messages.batches.list()]
    keyed_server.set_latency(5)
    live = client.messages.batches.create(requests=[{"custom_id": "three", "params": {
        "model": MODEL, "max_tokens": 50, "messages": messages}}])
    assert client.messages.batches.cancel(live.id).processing_status == "canceling"
    keyed_server.set_latency(0)
