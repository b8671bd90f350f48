"""Gemini generateContent: the provider's tables (body, stream, classification incl. RetryInfo and per-day
QuotaFailure, finish reasons, usage), loopback runs against the bundled endpoint (online streamed and not,
with faults and limits), which the official google-genai SDK parses."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path

import pytest
from google.genai import errors as genai_errors
from google.genai import types

from conftest import GEMINI_TEST_KEY, ROOT, SAMPLES, copy_samples, gemini_client, read_rows
from pipeline.errors import AuthError, BadOutputError, BadRequestError, ModelNotFoundError, QuotaError, \
    RateLimitError, TransientError
from pipeline.job import Job, load_job
from pipeline.localserver import LocalServer
from pipeline.providers import make_provider
from pipeline.providers.gemini import GeminiProvider
from pipeline.providers.gemini.errors import classify_response, parse_duration, per_day_reset
from pipeline.providers.gemini.generate import parse_response, parse_usage
from pipeline.records import Encoded

GOOD = ["astronaut_eileen_collins.jpg", "brick_wall_grey.jpg", "chelsea_the_cat.jpg", "coffee_cup.jpg",
        "hubble_deep_field.jpg"]
MODEL = "gemini-2.5-flash"
ROOT_URL = "https://generativelanguage.googleapis.com"


def _job(tmp_path: Path, extra: str = "", **endpoint) -> Job:
    text = "\n".join(f'{k} = {json.dumps(v)}' for k, v in {"api": "gemini", "model": MODEL, **endpoint}.items())
    path = tmp_path / "gemini.toml"
    path.write_text(f'[endpoint]\n{text}\n[prompt]\nuser = "Describe."\nsystem = "Be brief."\nmax_tokens = 90\n{extra}')
    return load_job(path)


def _encoded(data: bytes = b"\xff\xd8fake", width: int = 40, height: int = 30) -> Encoded:
    return Encoded("0" * 64, len(data), width, height, width, height, "image/jpeg", data)


# --- the request ---------------------------------------------------------------------------------


def test_the_job_picks_the_protocol_and_the_shipped_jobs_load(tmp_path):
    job = _job(tmp_path, base_url=ROOT_URL)
    assert isinstance(make_provider(job, job.endpoint.base_url, api_key="k", headers={}), GeminiProvider)
    for name, key in (("gemini.toml", "GEMINI_API_KEY"), ("gemini_relay.toml", "RELAY_API_KEY")):
        shipped = load_job(ROOT / "jobs" / name)
        assert (shipped.endpoint.api, shipped.endpoint.api_key_env) == ("gemini", key)


def test_request_has_the_key_header_the_image_before_the_text_and_generation_config(tmp_path):
    job = _job(tmp_path, extra='temperature = 0.2\n[image]\ndetail = "low"\n')
    provider = GeminiProvider(job, ROOT_URL, api_key="AIza-1", headers={"X-Org": "o"})
    request = provider.build_request(_encoded(), stream=True)
    assert request.url == f"{ROOT_URL}/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"
    assert provider.build_request(_encoded(), stream=False).url == f"{ROOT_URL}/v1beta/models/{MODEL}:generateContent"
    assert request.headers["x-goog-api-key"] == "AIza-1" and "Authorization" not in request.headers
    body = request.body
    image, text = body["contents"][0]["parts"]
    assert image == {"inline_data": {"mime_type": "image/jpeg", "data": base64.b64encode(b"\xff\xd8fake").decode()}}
    assert text == {"text": "Describe."} and body["contents"][0]["role"] == "user"
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert body["generationConfig"] == {"maxOutputTokens": 90, "temperature": 0.2,
                                        "mediaResolution": "MEDIA_RESOLUTION_LOW"}
    assert GeminiProvider(job, "http://127.0.0.1:9/v1", api_key=None, headers={}).model_url == \
        f"http://127.0.0.1:9/v1beta/models/{MODEL}"  # the bundled endpoint's and relays' .../v1 base URLs


def test_structured_captions_ask_for_json_with_the_schema(tmp_path):
    schema = '[structured]\nformat = "json_schema"\n[structured.schema]\ntype = "object"\n'
    config = GeminiProvider(_job(tmp_path, extra=schema), ROOT_URL, api_key=None, headers={}).body(_encoded())
    assert config["generationConfig"]["responseMimeType"] == "application/json"
    assert config["generationConfig"]["responseJsonSchema"] == {"type": "object"}


# --- answers ---------------------------------------------------------------------------------------


def _response(text: str | None = "A cat.", finish: str | None = "STOP", usage: dict | None = None, **extra) -> dict:
    candidate: dict = {"content": {"role": "model", "parts": [{"text": text}] if text is not None else []}}
    if finish:
        candidate["finishReason"] = finish
    body = {"candidates": [candidate], "modelVersion": MODEL, "responseId": "r1", **extra}
    if usage is not None:
        body["usageMetadata"] = usage
    return body


def test_usage_maps_thoughts_to_reasoning_and_cached_content():
    usage = parse_usage({"promptTokenCount": 300, "candidatesTokenCount": 20, "thoughtsTokenCount": 50,
                         "cachedContentTokenCount": 100, "totalTokenCount": 370})
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (300, 70, 370)
    assert (usage.reasoning_tokens, usage.cached_tokens) == (50, 100)
    plain = parse_usage({"promptTokenCount": 10, "candidatesTokenCount": 2})
    assert (plain.reasoning_tokens, plain.cached_tokens, plain.completion_tokens) == (None, None, 2)
    assert parse_usage({"promptTokenCount": -1}) is None and parse_usage(None) is None


def test_whole_response_skips_thought_parts_and_maps_max_tokens_to_length():
    body = _response("A cat", "MAX_TOKENS", {"promptTokenCount": 5, "candidatesTokenCount": 2})
    body["candidates"][0]["content"]["parts"].insert(0, {"text": "thinking...", "thought": True})
    result = parse_response(json.dumps(body).encode(), None)
    assert (result.text, result.finish_reason, result.request_id, result.model) == ("A cat", "length", "r1", MODEL)


@pytest.mark.parametrize(
    "body, error, retryable",
    [(_response("", "SAFETY"), BadOutputError, False),
     (_response(None, "PROHIBITED_CONTENT"), BadOutputError, False),
     (_response("It was the best of", "RECITATION"), BadOutputError, False),
     ({"promptFeedback": {"blockReason": "SAFETY"}}, BadOutputError, False),
     (_response("", "MAX_TOKENS"), BadOutputError, False),
     (_response("", "STOP"), TransientError, True),
     (_response("A cat", None), TransientError, True),
     ({"unexpected": 1}, TransientError, True)],
    ids=["safety", "prohibited", "recitation", "prompt-blocked", "empty-length", "empty-stop", "no-finish", "not-a-response"])
def test_blocked_and_broken_answers_are_typed(body, error, retryable):
    with pytest.raises(error) as caught:
        parse_response(json.dumps(body).encode(), None)
    assert getattr(caught.value, "retryable", True) is retryable


def _sse(*chunks: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\r\n\r\n" for c in chunks)


def _parse_stream(raw: bytes, split: int = 5):
    parser = GeminiProvider(Job(), ROOT_URL, api_key=None, headers={}).stream_parser({})
    for i in range(0, len(raw), split):
        parser.feed(raw[i: i + split])
    return parser.result()


def test_stream_of_chunks_gives_text_finish_and_the_last_usage():
    raw = _sse(_response("A grey ", None, {"promptTokenCount": 270, "candidatesTokenCount": 1}),
               _response("cat.", "STOP", {"promptTokenCount": 270, "candidatesTokenCount": 4, "thoughtsTokenCount": 3}))
    result = _parse_stream(raw)
    assert (result.text, result.finish_reason) == ("A grey cat.", "stop")
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.reasoning_tokens) == (270, 7, 3)


@pytest.mark.parametrize(
    "raw, error",
    [(_sse(_response("A grey", None)), TransientError),  # cut before the chunk with finishReason
     (b"", TransientError),
     (_sse(_response("A", None)) + b"data: {not json\r\n\r\n", TransientError),
     (_sse(_response("A", None), {"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}}),
      TransientError),
     (_sse({"error": {"code": 429, "message": "slow down", "status": "RESOURCE_EXHAUSTED"}}), RateLimitError),
     (_sse(_response("", "SAFETY")), BadOutputError)],
    ids=["no-finish", "empty", "malformed", "error-chunk", "rate-limit-chunk", "safety"])
def test_stream_failures_are_typed(raw, error):
    with pytest.raises(error):
        _parse_stream(raw)


# --- errors ----------------------------------------------------------------------------------------


def _error(code: int, status: str, message: str = "x", *details: dict) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "status": status, "details": list(details)}}).encode()


def _quota(quota_id: str, value: str = "10") -> dict:
    return {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
        {"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests", "quotaId": quota_id,
         "quotaDimensions": {"location": "global", "model": MODEL}, "quotaValue": value}]}


RETRY = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "13s"}
KEY_INVALID = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}


@pytest.mark.parametrize(
    "status, body, expected",
    [(500, _error(500, "INTERNAL"), TransientError),
     (503, _error(503, "UNAVAILABLE", "The model is overloaded."), TransientError),
     (504, _error(504, "DEADLINE_EXCEEDED"), TransientError),
     (502, b"<html><title>502 Bad Gateway</title></html>", TransientError),
     (400, _error(400, "INVALID_ARGUMENT", "Unable to process input image."), BadRequestError),
     (400, _error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.", KEY_INVALID), AuthError),
     (403, _error(403, "PERMISSION_DENIED", "caller does not have permission"), AuthError),
     (400, _error(400, "FAILED_PRECONDITION", "User location is not supported for the API use."), QuotaError),
     (404, _error(404, "NOT_FOUND", "models/gemini-9 is not found for API version v1beta"), ModelNotFoundError),
     (429, _error(429, "RESOURCE_EXHAUSTED", "quota", _quota("GenerateRequestsPerMinutePerProjectPerModel"), RETRY),
      RateLimitError),
     (429, b"", RateLimitError),
     (200, _error(503, "UNAVAILABLE"), TransientError),
     (200, json.dumps([json.loads(_error(429, "RESOURCE_EXHAUSTED"))]).encode(), RateLimitError)],
    ids=["500", "503", "504", "html502", "400", "bad-key", "403", "location", "404-model", "429-minute", "429-bare",
         "error200", "error-array"])
def test_classification(status, body, expected):
    assert type(classify_response(status, {}, body)) is expected


def test_a_429_carries_retry_info_and_the_quota_it_names():
    err = classify_response(429, {}, _error(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota",
                                            _quota("GenerateContentInputTokensPerModelPerMinute-FreeTier", "250000"),
                                            RETRY))
    assert (err.retry_after_s, err.window, err.bucket, err.limit, err.explained) == (13.0, "minute", "tokens",
                                                                                    250000, True)
    bare = classify_response(429, {}, _error(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted"))
    assert (bare.retry_after_s, bare.window, bare.explained) == (None, None, False)


def test_a_per_day_quota_is_fatal_and_says_when_it_resets():
    now = dt.datetime(2026, 3, 10, 20, 0, tzinfo=dt.UTC)  # 13:00 in Los Angeles (PDT since 8 March)
    body = _error(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota",
                  _quota("GenerateRequestsPerDayPerProjectPerModel-FreeTier", "250"), RETRY)
    err = classify_response(429, {}, body, now=now)
    assert type(err) is QuotaError and "per-day" in err.message and "2026-03-11 07:00 UTC" in err.message
    assert per_day_reset(now).isoformat() == "2026-03-11T00:00:00-07:00"


@pytest.mark.parametrize("text, expected", [("13s", 13.0), ("0.5s", 0.5), ("1.000340s", 1.00034), ("13", None),
                                            ("-1s", None), ("999999s", None), (None, None), (13, None)])
def test_retry_delay_is_a_protobuf_duration(text, expected):
    assert parse_duration(text) == expected


# --- loopback: the CLI against the bundled endpoint ------------------------------------------------------


@pytest.fixture
def folder(tmp_path) -> Path:
    return copy_samples(tmp_path / "in", GOOD)


def _argv(folder: Path, out: Path, server: LocalServer, job: Path, *flags: str) -> list[str]:
    return ["run", str(folder), "--job", str(job), "--out", str(out), "--base-url", server.base_url,
            "--no-progress", *flags]


def _one_ok_row_each(out: Path) -> list[dict]:
    rows = read_rows(out)
    assert sorted(r["image_path"] for r in rows) == sorted(GOOD)  # one row each: nothing lost or twice
    assert {r["status"] for r in rows} == {"ok"}
    assert all(r["usage_source"] == "reported" and r["prompt_tokens"] and r["completion_tokens"] for r in rows)
    return rows


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_online_run_with_faults_and_limits_gives_one_ok_row_each(server, folder, tmp_path, job_file, cli, stream):
    job = job_file(endpoint_api="gemini", endpoint_model=MODEL, limits_max_attempts=4)
    server.rate_limit(rpm=600, tpm=200_000)
    for fault in ("503", "500", "stream_error", "429", "drop"):
        server.fail_next(fault, retry_after_s=0.05)
    out = tmp_path / "out"
    assert cli(*_argv(folder, out, server, job, stream)).code == 0
    rows = _one_ok_row_each(out)
    assert sum(r["attempts"] for r in rows) == len(GOOD) + 5  # each fault cost one attempt
    seen = server.observed()
    assert {o.status for o in seen} >= {200, 503, 500, 429} and all(o.model == MODEL for o in seen)
    assert all(o.stream == (stream == "--stream") for o in seen)
    assert {r["model"] for r in rows} == {MODEL}
    for row, size in ((r, next(o.image_size for o in seen if o.status == 200 and o.image_size == (r["sent_width"],
                                                                                                r["sent_height"])))
                      for r in rows):
        tiles = -(-size[0] // 768) * -(-size[1] // 768)  # the server counted 258 a tile, as Gemini does
        assert row["prompt_tokens"] >= 258 * tiles


def test_safety_is_an_error_row_that_is_not_retried(server, folder, tmp_path, job_file, cli):
    job = job_file(endpoint_api="gemini", endpoint_model="local-finish-safety")
    out = tmp_path / "out"
    assert cli(*_argv(folder, out, server, job)).code == 1
    rows = read_rows(out)
    assert len(rows) == len(GOOD) and len(server.observed()) == len(GOOD)
    assert {(r["error_kind"], r["attempts"], r["finish_reason"]) for r in rows} == {("bad_output", 1, "safety")}


def test_a_per_day_quota_stops_the_run_saying_when_it_resets(server, folder, tmp_path, job_file, cli):
    job = job_file(endpoint_api="gemini", endpoint_model=MODEL, limits_concurrency=1)
    server.fail_next("429_quota")
    ran = cli(*_argv(folder, tmp_path / "out", server, job))
    assert ran.code == 3 and "resets at midnight Pacific time" in ran.err
    assert len([o for o in server.observed() if o.status == 429]) == 1  # no retry loop


# --- the official SDK parses what the bundled endpoint sends ------------------------------------------


@pytest.fixture(scope="module")
def keyed_server():
    with LocalServer(api_key=GEMINI_TEST_KEY) as server:
        yield server


def test_the_sdk_parses_responses_streams_and_errors(keyed_server):
    client = gemini_client(keyed_server)
    contents = [types.Part.from_bytes(data=(SAMPLES / "coffee_cup.jpg").read_bytes(), mime_type="image/jpeg"),
                "Describe this image."]
    config = types.GenerateContentConfig(max_output_tokens=100, system_instruction="Be brief.")
    response = client.models.generate_content(model=MODEL, contents=contents, config=config)
    assert response.candidates[0].finish_reason == types.FinishReason.STOP and "600×400" in response.text
    assert response.usage_metadata.prompt_token_count == 258 + 8  # one 768 px tile + ⌈29 characters / 4⌉
    chunks = list(client.models.generate_content_stream(model=MODEL, contents=contents, config=config))
    assert len(chunks) > 1 and "".join(c.text or "" for c in chunks) == response.text
    assert chunks[-1].usage_metadata.candidates_token_count == response.usage_metadata.candidates_token_count
    wrong = gemini_client(keyed_server, "wrong")  # held: a client the SDK sees dropped closes its connections
    with pytest.raises(genai_errors.ClientError, match="API key not valid"):
        wrong.models.generate_content(model=MODEL, contents=contents)
    keyed_server.fail_next("429", retry_after_s=3)
    with pytest.raises(genai_errors.ClientError) as limited:
        client.models.generate_content(model=MODEL, contents=contents)
    assert limited.value.code == 429 and limited.value.status == "RESOURCE_EXHAUSTED"
    assert {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "3s"} in \
        limited.value.details["error"]["details"]
    keyed_server.fail_next("stream_error")
    with pytest.raises(genai_errors.ServerError, match="UNAVAILABLE"):
        list(client.models.generate_content_stream(model=MODEL, contents=contents))
    with pytest.raises(genai_errors.ClientError, match="INVALID_ARGUMENT"):
        client.models.generate_content(model=MODEL, contents=[types.Part.from_bytes(data=b"not", mime_type="image/png")])

