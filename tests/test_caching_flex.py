"""Prompt caching (Anthropic cache_control, cache reads and writes in their columns and priced) and OpenAI's
flex tier (service_tier sent and recorded, its 429 "Resource Unavailable" retried or resent at the default
tier, priced at flex prices): the tables, the official SDKs against the bundled endpoint, and loopback runs
read back from Parquet and through `caption estimate` / `caption report`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import anthropic
import openai
import pytest

from conftest import copy_samples, read_rows
from pipeline import cost
from pipeline.errors import BadRequestError, JobError, RateLimitError, TransientError
from pipeline.job import load_job
from pipeline.localserver import LocalServer
from pipeline.providers.anthropic.messages import build_body, parse_usage
from pipeline.providers.openai import OpenAIProvider
from pipeline.providers.openai.errors import FlexUnavailableError, classify_response
from pipeline.readers.review import _row_cost as review_row_cost
from pipeline.records import Encoded

IMAGES = ["brick_wall_grey.jpg", "chelsea_the_cat.jpg", "coffee_cup.jpg"]
LONG_SYSTEM = "You write precise, factual alt-text for photographs in a museum archive. " * 60  # 4,380 chars
PREFIX = -(-len(LONG_SYSTEM) // 4)  # 1,095 tokens, counted four characters a token by both sides
SONNET = "claude-sonnet-4-5"  # 1,024 tokens at least to cache; bundled prices with cache_write
FLEX_MODEL = "gpt-5-mini"  # bundled flex prices


def _encoded() -> Encoded:
    return Encoded("0" * 64, 4, 40, 30, 40, 30, "image/jpeg", b"\xff\xd8ab")


def _job_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    return copy_samples(tmp_path / "in", IMAGES)


def _run(cli, folder: Path, out: Path, server: LocalServer, job: Path, *flags: str):
    ran = cli("run", folder, "--job", job, "--out", out, "--base-url", server.base_url, "--no-progress", *flags)
    assert ran.code == 0, ran.err
    return ran


def _by_time(out: Path) -> list[dict]:
    return sorted(read_rows(out), key=lambda r: r["created_at"])


# --- the tables --------------------------------------------------------------------------------------

USAGE = [
    ("write", {"input_tokens": 300, "cache_creation_input_tokens": 1095, "cache_read_input_tokens": 0,
               "output_tokens": 20}, (1395, 0, 1095, 1415)),
    ("read", {"input_tokens": 300, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 1095,
              "output_tokens": 20}, (1395, 1095, 0, 1415)),
    ("no-cache-fields", {"input_tokens": 300, "output_tokens": 20}, (300, None, None, 320)),
]


@pytest.mark.parametrize(("raw", "want"), [c[1:] for c in USAGE], ids=[c[0] for c in USAGE])
def test_anthropic_usage_counts_cache_reads_and_writes_inside_prompt_tokens(raw, want):
    usage = parse_usage(raw)
    assert (usage.prompt_tokens, usage.cached_tokens, usage.cache_write_tokens, usage.total_tokens) == want


def test_cache_marks_the_system_prompt_as_one_ephemeral_block(tmp_path):
    base = f'[endpoint]\napi = "anthropic"\nmodel = "{SONNET}"\n[prompt]\nsystem = "Be brief."\n'
    cached = load_job(_job_toml(tmp_path, base + "cache = true\n"))
    assert build_body(cached, _encoded(), stream=False)["system"] == [
        {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    plain = load_job(_job_toml(tmp_path, base))
    assert build_body(plain, _encoded(), stream=False)["system"] == "Be brief."
    assert cached.fingerprint == plain.fingerprint  # caching changes the bill, not the caption


JOB_ERRORS = [
    ("tier-not-openai", '[endpoint]\napi = "anthropic"\nservice_tier = "flex"\n', "service_tier is OpenAI's"),
    ("tier-in-batch", '[endpoint]\nmode = "batch"\nservice_tier = "flex"\n', "service_tier is for online"),
    ("fallback-without-flex", '[endpoint]\nflex_fallback = "auto"\n', "flex_fallback applies only"),
    ("bad-tier", '[endpoint]\nservice_tier = "cheap"\n', "service_tier must be one of"),
    ("cache-without-system", '[endpoint]\napi = "anthropic"\n[prompt]\ncache = true\n', "set [prompt] system"),
]


@pytest.mark.parametrize(("text", "message"), [c[1:] for c in JOB_ERRORS], ids=[c[0] for c in JOB_ERRORS])
def test_settings_that_cannot_work_are_a_job_error(tmp_path, text, message):
    with pytest.raises(JobError, match=re.escape(message)):
        load_job(_job_toml(tmp_path, text))


def test_a_tier_for_another_protocol_is_one_line_and_exit_2_before_anything_is_sent(server, cli, folder, tmp_path,
                                                                                     job_file):
    ran = cli("run", folder, "--job", job_file(), "--out", tmp_path / "out", "--base-url", server.base_url,
              "--api", "anthropic", "--service-tier", "flex")
    assert ran.code == 2 and len(ran.err.strip().splitlines()) == 1 and "service_tier" in ran.err
    assert server.observed() == []


def test_flex_waits_longer_unless_the_job_says_how_long(tmp_path):
    flex = load_job(_job_toml(tmp_path, '[endpoint]\nservice_tier = "flex"\n'))
    assert (flex.limits.timeout_s, flex.limits.idle_timeout_s) == (900.0, 900.0)
    told = load_job(_job_toml(tmp_path, '[endpoint]\nservice_tier = "flex"\n[limits]\ntimeout_s = 30\n'))
    assert (told.limits.timeout_s, told.limits.idle_timeout_s) == (30.0, 900.0)
    assert load_job(None).limits.timeout_s == 120.0


CLASSIFIED = [
    ("flex-code", {"error": {"message": "Resource Unavailable", "type": "resource_unavailable",
                             "code": "resource_unavailable"}}, FlexUnavailableError),
    ("flex-words", {"error": {"message": "Resource unavailable, please retry", "type": "server_error"}},
     FlexUnavailableError),
    ("rate-limit", {"error": {"message": "Rate limit reached for gpt-5-mini on requests per min (RPM)",
                              "type": "requests", "code": "rate_limit_exceeded"}}, RateLimitError),
]


@pytest.mark.parametrize(("body", "kind"), [c[1:] for c in CLASSIFIED], ids=[c[0] for c in CLASSIFIED])
def test_a_flex_429_is_transient_not_a_rate_limit(body, kind):
    err = classify_response(429, {}, json.dumps(body).encode())
    assert type(err) is kind
    assert isinstance(err, TransientError) == (kind is FlexUnavailableError)


def test_prompt_cache_key_is_dropped_when_a_server_refuses_it(tmp_path):
    job = load_job(_job_toml(tmp_path, '[prompt]\ncache = true\nsystem = "Be brief."\n'))
    provider = OpenAIProvider(job, "http://127.0.0.1:9/v1", api_key=None, headers={})
    sent = provider.build_request(_encoded(), stream=False)
    assert sent.body["prompt_cache_key"].startswith("caption-")
    refused = BadRequestError("Unrecognized request argument supplied: Unsupported parameter: 'prompt_cache_key'",
                              status=400)
    assert provider.learn(refused, sent) is True
    assert "prompt_cache_key" not in provider.build_request(_encoded(), stream=False).body


SPLITS = [
    ("anthropic-long", ("anthropic", SONNET, LONG_SYSTEM, "Describe.", 3), (True, PREFIX, PREFIX * 2)),
    ("anthropic-short", ("anthropic", SONNET, "Be brief.", "Describe.", 3), (False, 0, 0)),
    ("haiku-needs-4096", ("anthropic", "claude-haiku-4-5", LONG_SYSTEM, "Describe.", 3), (False, 0, 0)),
    ("openai-in-128-steps", ("openai", "gpt-4.1-mini", LONG_SYSTEM, "Describe.", 3), (True, 1098, 1024 * 2)),
    ("gemini-not-modelled", ("gemini", "gemini-2.5-flash", LONG_SYSTEM, "Describe.", 3), (False, 0, 0)),
]


@pytest.mark.parametrize(("args", "want"), [c[1:] for c in SPLITS], ids=[c[0] for c in SPLITS])
def test_the_first_request_writes_the_prefix_and_the_rest_read_it(args, want):
    split = cost.cache_split(*args)
    assert (split.cached, split.write_tokens, split.read_tokens) == want


def test_cache_writes_reads_and_flex_have_their_own_prices():
    table = cost.load_prices()
    sonnet, mini = table.find(SONNET), table.find(FLEX_MODEL)
    # 1M prompt tokens: 0.2M written (3.75), 0.3M read (0.30), 0.5M plain (3.00); 1M out (15.00)
    assert cost.cost_usd(sonnet, "online", 1_000_000, 1_000_000, 300_000, 200_000) == \
        pytest.approx(0.5 * 3 + 0.3 * 0.3 + 0.2 * 3.75 + 15)
    assert cost.cost_usd(sonnet, "batch", 1_000_000, 0, 0, 1_000_000) == pytest.approx(1.875)  # multipliers stack
    assert cost.cost_usd(mini, "flex", 1_000_000, 1_000_000, 500_000) == pytest.approx(0.5 * 0.125 + 0.5 * 0.0125 + 1)
    assert table.find("gpt-4.1").rates("flex") == table.find("gpt-4.1").rates("batch")  # no flex row: batch prices
    assert [cost.price_mode(m, t) for m, t in [("online", "flex"), ("online", "default"), ("batch", "flex"),
                                               (None, None)]] == ["flex", "online", "batch", "online"]
    row = {"model": FLEX_MODEL, "mode": "online", "service_tier": "flex", "prompt_tokens": 1_000_000,
           "completion_tokens": 0, "cached_tokens": None, "cache_write_tokens": None}
    assert review_row_cost(row, table) == pytest.approx(0.125)  # the review page prices rows as report does


# --- the official SDKs against the bundled endpoint ---------------------------------------------------


def test_anthropic_sdk_reads_cache_creation_then_cache_read_from_the_bundled_endpoint(server):
    client = anthropic.Anthropic(base_url=server.base_url.removesuffix("/v1"), api_key="unused", max_retries=0)
    system = [{"type": "text", "text": LONG_SYSTEM, "cache_control": {"type": "ephemeral"}}]
    ask = {"model": SONNET, "max_tokens": 50, "system": system, "messages": [{"role": "user", "content": "Hi."}]}
    first = client.messages.create(**ask).usage
    assert (first.cache_creation_input_tokens, first.cache_read_input_tokens, first.input_tokens) == (PREFIX, 0, 1)
    with client.messages.stream(**ask) as stream:
        second = stream.get_final_message().usage
    assert (second.cache_creation_input_tokens, second.cache_read_input_tokens, second.input_tokens) == (0, PREFIX, 1)
    short = client.messages.create(**{**ask, "system": [{**system[0], "text": "Be brief."}]}).usage
    assert (short.cache_creation_input_tokens, short.cache_read_input_tokens) == (0, 0)  # under 1,024: not cached
    with pytest.raises(anthropic.BadRequestError, match="maximum of 4 blocks"):
        client.messages.create(**{**ask, "system": system * 5})


def test_openai_sdk_reads_the_tier_and_the_flex_429(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    image = {"type": "image_url", "image_url": {"url": _encoded_sample()}}
    ask = {"model": FLEX_MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi."}, image]}]}
    assert client.chat.completions.create(**ask, service_tier="flex").service_tier == "flex"
    assert client.chat.completions.create(**ask).service_tier == "default"
    chunks = list(client.chat.completions.create(**ask, service_tier="flex", stream=True))
    assert {c.service_tier for c in chunks} == {"flex"}
    server.fail_next("429_flex")
    with pytest.raises(openai.RateLimitError, match="Resource Unavailable"):
        client.chat.completions.create(**ask, service_tier="flex")
    with pytest.raises(openai.BadRequestError, match="Supported values are: .auto., .default., .flex."):
        client.chat.completions.create(**ask, service_tier="cheapest")


def _encoded_sample() -> str:
    import base64

    data = (Path(__file__).resolve().parent.parent / "sample_data" / IMAGES[0]).read_bytes()
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


# --- runs read back ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no-stream"])
def test_a_cached_anthropic_run_records_writes_and_reads_and_report_prices_them(server, cli, folder, tmp_path,
                                                                              job_file, stream):
    job = job_file(endpoint_api="anthropic", endpoint_model=SONNET, endpoint_stream=stream, prompt_cache=True,
                   prompt_system=LONG_SYSTEM, limits_concurrency=1)
    out = tmp_path / "out"
    _run(cli, folder, out, server, job)
    rows = _by_time(out)
    assert [(r["cache_write_tokens"], r["cached_tokens"]) for r in rows] == [(PREFIX, 0), (0, PREFIX), (0, PREFIX)]
    assert all(r["prompt_tokens"] > PREFIX and r["total_tokens"] == r["prompt_tokens"] + r["completion_tokens"]
               for r in rows)
    rep = json.loads(cli("report", out, "--json").out)
    assert (rep["cache_write_tokens"], rep["cached_tokens"]) == (PREFIX, 2 * PREFIX)
    billed = sum((r["prompt_tokens"] - r["cached_tokens"] - r["cache_write_tokens"]) * 3.00
                 + r["cached_tokens"] * 0.30 + r["cache_write_tokens"] * 3.75 + r["completion_tokens"] * 15.00
                 for r in rows) / 1e6
    assert rep["cost_usd"] == pytest.approx(billed)
    est = json.loads(cli("estimate", folder, "--job", job, "--json").out)
    assert est["cache"] == {"prefix_tokens": PREFIX, "min_tokens": 1024, "cached": True,
                            "cache_write_tokens": PREFIX, "cached_tokens": 2 * PREFIX}
    assert est["prompt_tokens"] == pytest.approx(sum(r["prompt_tokens"] for r in rows), rel=0.01)
    want_input = (est["prompt_tokens"] - 3 * PREFIX) * 3.00 + PREFIX * 3.75 + 2 * PREFIX * 0.30
    assert est["input_cost_usd"] == pytest.approx(want_input / 1e6)


def test_a_prefix_too_short_to_cache_is_said_and_priced_as_input(server, cli, folder, tmp_path, job_file):
    job = job_file(endpoint_api="anthropic", endpoint_model=SONNET, prompt_cache=True, prompt_system="Be brief.")
    out = tmp_path / "out"
    _run(cli, folder, out, server, job)
    assert {(r["cache_write_tokens"], r["cached_tokens"]) for r in read_rows(out)} == {(0, 0)}
    text = cli("estimate", folder, "--job", job).out
    assert "under the 1,024 claude-sonnet-4-5 caches at least: nothing is cached" in text


def test_openai_cache_sends_a_prompt_cache_key(server, cli, folder, tmp_path, job_file):
    job = job_file(prompt_cache=True)
    _run(cli, folder, tmp_path / "out", server, job)
    assert all("prompt_cache_key" in o.body_keys for o in server.observed())


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no-stream"])
def test_a_flex_run_records_its_tier_and_is_priced_at_flex(server, cli, folder, tmp_path, job_file, stream):
    job = job_file(endpoint_model=FLEX_MODEL, endpoint_service_tier="flex", endpoint_stream=stream)
    out = tmp_path / "out"
    _run(cli, folder, out, server, job)
    rows = read_rows(out)
    assert {r["service_tier"] for r in rows} == {"flex"} and len(rows) == len(IMAGES)
    assert all("service_tier" in o.body_keys for o in server.observed())
    rep = json.loads(cli("report", out, "--json").out)
    (spend,) = rep["spend"]
    flex = sum(r["prompt_tokens"] * 0.125 + r["completion_tokens"] * 1.00 for r in rows) / 1e6
    assert spend["mode"] == "flex" and spend["cost_usd"] == pytest.approx(flex)
    assert spend["cost_at_list_usd"] == pytest.approx(2 * flex)
    est = json.loads(cli("estimate", folder, "--job", job, "--json", "--expected-output-tokens", "10").out)
    assert est["prices_mode"] == "flex"
    assert est["cost_usd"] == pytest.approx((est["prompt_tokens"] * 0.125 + 30 * 1.00) / 1e6)


def test_flex_429s_are_retried_with_backoff_and_are_no_rate_limit_strikes(server, cli, folder, tmp_path, job_file):
    job = job_file(endpoint_model=FLEX_MODEL, endpoint_service_tier="flex", limits_concurrency=1,
                   limits_max_attempts=4)
    server.fail_next("429_flex", 2)
    out = tmp_path / "out"
    ran = _run(cli, folder, out, server, job)
    rows = read_rows(out)
    assert sum(r["attempts"] for r in rows) == len(IMAGES) + 2  # a backoff frees its slot: any image may take one
    assert {(r["status"], r["service_tier"]) for r in rows} == {("ok", "flex")}
    seen = server.observed()
    assert [o.fault for o in seen[:2]] == ["429_flex", "429_flex"] and all(o.status == 200 for o in seen[2:])
    assert "2 retries, 0 rate-limited" in ran.out + ran.err  # no shared pause, no lowered limit


def test_flex_fallback_resends_at_the_default_tier_and_report_prices_each_row_by_its_tier(
        server, cli, folder, tmp_path, job_file):
    job = job_file(endpoint_model=FLEX_MODEL, endpoint_service_tier="flex", endpoint_flex_fallback="auto",
                   limits_concurrency=1)
    server.fail_next("429_flex")
    out = tmp_path / "out"
    _run(cli, folder, out, server, job)
    rows = read_rows(out)
    assert sorted((r["service_tier"], r["attempts"]) for r in rows) == [("default", 1), ("flex", 1), ("flex", 1)]
    seen = server.observed()  # the refused request went again at once (same attempt), without service_tier
    assert sorted((o.status, "service_tier" in o.body_keys) for o in seen) == [(200, False), (200, True),
                                                                               (200, True), (429, True)]
    spend = {s["mode"]: s for s in json.loads(cli("report", out, "--json").out)["spend"]}
    assert set(spend) == {"online", "flex"} and (spend["online"]["rows"], spend["flex"]["rows"]) == (1, 2)
    (default,) = [r for r in rows if r["service_tier"] == "default"]
    online = default["prompt_tokens"] * 0.25 + default["completion_tokens"] * 2.00
    assert spend["online"]["cost_usd"] == pytest.approx(online / 1e6)
