"""`caption estimate` against what a real run recorded, `caption report` against direct pyarrow sums, CLI codes."""

from __future__ import annotations

import datetime as dt
import io
import json
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import DEMO_JOB, SAMPLE_IMAGES, SAMPLES, copy_samples
from pipeline import cost, images
from pipeline.errors import BadImageError
from pipeline.cost import load_prices
from pipeline.job import load_job
from pipeline.records import Result
from pipeline.readers.report import report
from pipeline.store import Store

T0 = dt.datetime(2026, 1, 31, 12, 0, tzinfo=dt.timezone.utc)


@pytest.fixture
def folder(sample_folder) -> Path:
    """Every sample image but corrupt.jpg (which a run would turn into an error row)."""
    return sample_folder([name for name in SAMPLE_IMAGES if name != "corrupt.jpg"])


# --- estimate against a recorded run ---------------------------------------------------------------

CASES = [
    ("demo", []),
    ("high-1024", ["--detail", "high", "--max-side", "1024"]),
    ("high-2048-system", ["--detail", "high", "--max-side", "2048", "--system", "You write alt-text, tersely."]),
]


@pytest.mark.parametrize("flags", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_estimate_matches_the_prompt_tokens_a_run_recorded(server, cli, folder, tmp_path, flags):
    out = tmp_path / "out"
    code, _, err = cli("run", folder, "--job", DEMO_JOB, "--out", out, "--base-url", server.base_url,
                       "--no-progress", *flags)
    assert code == 0, err
    recorded = pq.read_table(out).filter(pc.equal(pq.read_table(out)["status"], "ok"))
    code, stdout, _ = cli("estimate", folder, "--job", DEMO_JOB, *flags, "--json")
    assert code == 0
    est = json.loads(stdout)
    assert est["images"] == recorded.num_rows == 12
    assert est["prompt_tokens"] == pytest.approx(pc.sum(recorded["prompt_tokens"]).as_py(), rel=0.01)


def test_estimate_of_sample_data_matches_the_demo_run_per_image(server, cli, tmp_path):
    # The whole folder, corrupt.jpg included: its header is intact, so the estimate counts 13 images
    # while the run sends 12; per image, estimate and record agree.
    code, _, err = cli("run", SAMPLES, "--job", DEMO_JOB, "--out", tmp_path / "out", "--base-url",
                       server.base_url, "--no-progress")
    assert code == 1, err  # corrupt.jpg ends as a bad_image row
    table = pq.read_table(tmp_path / "out")
    ok = table.filter(pc.equal(table["status"], "ok"))
    est = json.loads(cli("estimate", SAMPLES, "--job", DEMO_JOB, "--json")[1])
    assert est["prompt_tokens"] / est["images"] == pytest.approx(pc.mean(ok["prompt_tokens"]).as_py(), rel=0.01)


def test_estimate_counts_a_truncated_file_with_an_intact_header_as_an_image(cli):
    # corrupt.jpg has a valid header: only the run's decoding finds it (README: estimate reads headers).
    code, stdout, _ = cli("estimate", SAMPLES, "--job", DEMO_JOB, "--json")
    est = json.loads(stdout)
    assert (code, est["images"], est["errors"]) == (0, 13, 0)
    assert est["prompt_tokens"] == 13 * (85 + 12)  # detail low: 85, plus 47 characters of prompt / 4


def test_estimate_names_unreadable_files_and_sends_nothing(server, cli, tmp_path):
    folder = copy_samples(tmp_path / "in", {"a.jpg": "rotated_exif.jpg"})
    (folder / "b.jpg").write_text("not a picture")
    (folder / "c.png").write_bytes(b"")
    code, stdout, _ = cli("estimate", folder, "--job", DEMO_JOB, "--base-url", server.base_url, "--json")
    est = json.loads(stdout)
    assert (code, est["images"], est["errors"]) == (0, 1, 2)
    assert [e.split(":")[0] for e in est["error_examples"]] == ["b.jpg", "c.png"]
    assert server.observed() == []  # --base-url points at the server: estimate still sends nothing


def test_estimate_json_has_the_run_figures_at_the_top_level(cli, folder, tmp_path):
    prices = tmp_path / "p.toml"
    prices.write_text('[models."my-vlm"]\ninput = 2\noutput = 10\nbatch_input = 1\nbatch_output = 5\n'
                      'source = "test"\nas_of = "2026-01-31"\n')
    base = ["estimate", folder, "--job", DEMO_JOB, "--model", "my-vlm", "--prices", prices,
            "--expected-output-tokens", "40", "--json"]
    online = json.loads(cli(*base)[1])
    batch = json.loads(cli(*base, "--mode", "batch")[1])
    assert online["completion_tokens"] == 12 * 40
    assert online["cost_usd"] == pytest.approx((online["prompt_tokens"] * 2 + 12 * 40 * 10) / 1e6)
    assert batch["cost_usd"] == pytest.approx((batch["prompt_tokens"] * 1 + 12 * 40 * 5) / 1e6)
    for key in ("images", "errors", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd",
                "prompt_tokens_per_image", "time_s", "comparison"):
        assert key in online


def test_a_job_can_name_its_price_file_without_changing_its_fingerprint(cli, tmp_path):
    prices = tmp_path / "p.toml"
    prices.write_text('[models."local-caption"]\ninput = 1000\noutput = 0\nsource = "t"\nas_of = "2026-01-31"\n')
    job = tmp_path / "job.toml"
    job.write_text(DEMO_JOB.read_text() + f'\n[cost]\nprices = "{prices}"\n')
    est = json.loads(cli("estimate", SAMPLES, "--job", job, "--json")[1])
    assert est["cost_usd"] == pytest.approx(est["prompt_tokens"] * 1000 / 1e6)
    assert load_job(job).fingerprint == load_job(DEMO_JOB).fingerprint


def test_estimate_of_an_unknown_model_still_counts_tokens_and_says_how_to_add_a_price(cli):
    code, stdout, _ = cli("estimate", SAMPLES, "--job", DEMO_JOB, "--model", "my-vlm", "--detail", "high")
    assert code == 0
    assert "cost: unknown, no price for 'my-vlm'" in stdout and "--prices FILE" in stdout
    assert '[models."my-vlm"]' in stdout and "OpenAI tile rule (85/170) was assumed" in stdout
    est = json.loads(cli("estimate", SAMPLES, "--job", DEMO_JOB, "--model", "my-vlm", "--json")[1])
    assert (est["cost_usd"], est["price_known"], est["formula_known"]) == (None, False, False)
    assert est["prompt_tokens"] > 0


def test_estimate_compares_detail_and_max_side_for_each_model(cli):
    est = json.loads(cli("estimate", SAMPLES, "--job", DEMO_JOB, "--models", "gpt-4.1-mini,claude-haiku-4-5",
                         "--json")[1])
    grid = {(r["model"], r["detail"], r["max_side"]) for r in est["comparison"]}
    for model in ("local-caption", "gpt-4.1-mini", "claude-haiku-4-5"):
        assert {(model, d, s) for d in ("low", "high") for s in (512, 1024, 2048)} <= grid
    assert [r["is_job"] for r in est["comparison"]].count(True) == 1
    by_key = {(r["model"], r["detail"], r["max_side"]): r for r in est["comparison"]}
    assert by_key[("local-caption", "low", 512)]["prompt_tokens"] == est["prompt_tokens"]
    assert by_key[("gpt-4.1-mini", "high", 2048)]["cost_usd"] > by_key[("gpt-4.1-mini", "high", 512)]["cost_usd"]


def test_estimate_time_is_bound_by_the_tightest_limit(cli):
    flags = ["estimate", SAMPLES, "--job", DEMO_JOB, "--latency-s", "1", "--json"]
    by_concurrency = json.loads(cli(*flags)[1])
    assert by_concurrency["time_limited_by"] == "concurrency"
    assert by_concurrency["time_s"] == pytest.approx(13 / 8, abs=0.1)
    by_rpm = json.loads(cli(*flags, "--rpm", "6")[1])
    assert (by_rpm["time_limited_by"], by_rpm["time_s"]) == ("rpm", pytest.approx(130, abs=0.1))
    by_tpm = json.loads(cli(*flags, "--tpm", "100")[1])
    assert by_tpm["time_limited_by"] == "tpm"
    assert by_tpm["time_s"] == pytest.approx((13 * 97 + 13 * 120) / 100 * 60, abs=0.1)


def test_probe_size_reads_the_header_and_applies_exif_orientation():
    data = (SAMPLES / "rotated_exif.jpg").read_bytes()
    assert images.probe_size(data) == (600, 400)
    assert images.probe_size(io.BytesIO(data)) == (600, 400)
    with pytest.raises(BadImageError):
        images.probe_size(b"GIF89a but not really")


# --- report against direct pyarrow sums ---------------------------------------------------------------

PRICES = """
[models."gpt-4.1-mini"]
input = 0.40
cached_input = 0.10
output = 1.60
batch_input = 0.20
batch_output = 0.80
source = "test"
as_of = "2026-01-31"

[models."claude-haiku-4-5"]
input = 1.0
output = 5.0
source = "test"
as_of = "2026-01-31"
"""
PRICE_ROWS = {"gpt-4.1-mini": (0.40, 0.10, 1.60, 0.20, 0.80), "claude-haiku-4-5": (1.0, 1.0, 5.0, None, None)}


def _row(path: str, minute: int, *, status="ok", model="gpt-4.1-mini", mode="online", prompt=None,
         completion=None, cached=None, reasoning=None, source="reported", kind=None) -> Result:
    tokens = prompt is not None
    return Result(image_path=path, status=status, job_fingerprint="f", created_at=T0 + dt.timedelta(minutes=minute),
                  model=model, mode=mode, prompt_tokens=prompt, completion_tokens=completion,
                  total_tokens=(prompt + completion) if tokens else None, cached_tokens=cached,
                  reasoning_tokens=reasoning, usage_source=source if tokens else None, error_kind=kind,
                  error="boom" if kind else None, caption="a caption" if status == "ok" else None)


ROWS = [
    _row("a.jpg", 0, status="error", prompt=900, completion=0, kind="transient"),  # billed, then retried
    _row("a.jpg", 0, prompt=900, completion=40, cached=300, reasoning=10),
    _row("b.jpg", 0, prompt=1200, completion=55),
    _row("c.jpg", 1, mode="batch", prompt=800, completion=30),
    _row("d.jpg", 1, status="error", kind="bad_image", model=None),  # no request, no tokens
    _row("e.jpg", 1, model="claude-haiku-4-5", prompt=1300, completion=60, source="estimated"),
    _row("f.jpg", 3, model="my-vlm", prompt=100, completion=10),  # no price known
    _row("g.jpg", 3, status="error", kind="bad_request", prompt=700, completion=0),
    _row("g.jpg", 3, status="error", kind="rate_limited"),
]


@pytest.fixture
def out(tmp_path) -> Path:
    """An out folder holding ROWS in two parts, as `caption run` would have written them."""
    folder = tmp_path / "out"
    store = Store.open(folder, {"fingerprint": "f"}, part_rows=1000, part_seconds=60)
    for row in ROWS[:4]:
        store.append(row)
    store.close()
    for row in ROWS[4:]:
        store.append(row)
    store.close()
    store.release()
    return folder


@pytest.fixture
def prices_file(tmp_path) -> Path:
    path = tmp_path / "prices.toml"
    path.write_text(PRICES)
    return path


def _direct_cost(table, column_mode: str | None) -> float:
    """Cost straight from the Parquet with pyarrow: group by (model, mode), price each group."""
    grouped = table.group_by(["model", "mode"]).aggregate(
        [("prompt_tokens", "sum"), ("completion_tokens", "sum"), ("cached_tokens", "sum")]).to_pylist()
    dollars = 0.0
    for g in grouped:
        if g["model"] not in PRICE_ROWS:
            continue
        inp, cached_price, out_price, b_in, b_out = PRICE_ROWS[g["model"]]
        prompt, completion, cached = (g["prompt_tokens_sum"] or 0, g["completion_tokens_sum"] or 0,
                                      g["cached_tokens_sum"] or 0)
        mode = column_mode or g["mode"]
        if mode == "batch":
            dollars += (prompt * b_in + completion * b_out) / 1e6 if b_in is not None else 0.0
        else:
            dollars += ((prompt - cached) * inp + cached * cached_price + completion * out_price) / 1e6
    return dollars


def test_report_totals_equal_direct_pyarrow_sums(out, prices_file):
    table = pq.read_table(out)
    rep = report(out, prices_file=prices_file)
    for column in ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens"):
        assert getattr(rep, column) == pc.sum(table[column]).as_py(), column
    assert rep.rows == table.num_rows
    assert rep.status_rows == {v["values"]: v["counts"] for v in pc.value_counts(table["status"]).to_pylist()}
    errors = table.filter(pc.equal(table["status"], "error"))
    assert rep.error_kind_rows == {v["values"]: v["counts"] for v in pc.value_counts(errors["error_kind"]).to_pylist()}
    assert rep.cost_usd == pytest.approx(_direct_cost(table, None), rel=1e-12)
    assert rep.list_usd == pytest.approx(_direct_cost(table, "online"), rel=1e-12)
    estimated = table.filter(pc.equal(table["usage_source"], "estimated"))
    assert rep.estimated_share == pytest.approx(pc.sum(estimated["total_tokens"]).as_py() / rep.total_tokens)
    assert rep.failed_tokens == pc.sum(errors["total_tokens"]).as_py() == 1600
    assert rep.failed_usd == pytest.approx(1600 * 0.40 / 1e6)
    assert rep.unpriced_models == ["my-vlm"]


def test_report_answers_per_image_questions_from_the_latest_row(out, prices_file):
    rep = report(out, prices_file=prices_file)
    assert rep.images == 7
    assert rep.image_outcomes == {"ok": 5, "bad_image": 1, "rate_limited": 1}  # a.jpg: error then ok -> ok
    ok_totals = sorted([940, 1255, 830, 1360, 110])
    assert rep.per_image["total"]["max"] == max(ok_totals)
    assert rep.per_image["total"]["p50"] == ok_totals[2]
    assert rep.per_image["total"]["mean"] == pytest.approx(sum(ok_totals) / 5, abs=0.05)


def test_report_splits_spend_by_model_and_mode(out, prices_file):
    rep = report(out, prices_file=prices_file)
    spend = {(s.model, s.mode): s for s in rep.spend}
    batch = spend[("gpt-4.1-mini", "batch")]
    assert batch.cost_usd == pytest.approx((800 * 0.20 + 30 * 0.80) / 1e6)
    assert batch.list_usd == pytest.approx((800 * 0.40 + 30 * 1.60) / 1e6)
    assert spend[("claude-haiku-4-5", "online")].batch_usd is None  # that row has no batch price
    assert rep.no_batch_price_models == ["claude-haiku-4-5"]
    assert rep.batch_usd == pytest.approx(sum(s.batch_usd for s in rep.spend if s.batch_usd is not None))
    assert spend[("my-vlm", "online")].priced_as is None


def test_report_projects_the_cost_of_images_left_under_the_input(out, prices_file, tmp_path):
    folder = copy_samples(tmp_path / "in", {name: "coffee_cup.jpg" for name in ("a.jpg", "b.jpg", "d.jpg", "g.jpg",
                                                                             "h.jpg")})
    rep = report(out, input_dir=folder, prices_file=prices_file)
    left = rep.leftover
    assert (left.images, left.left) == (5, 3)  # d, g ended as errors; h was never tried
    assert left.cost_per_image_usd is None  # my-vlm's ok row is unpriced, so the observed mean is unknown
    free_vlm = cost.parse_price_table('[models."my-vlm"]\ninput = 0\noutput = 0\nsource = "t"\nas_of = "2026-01-31"\n',
                                      "t")
    priced = report(out, input_dir=folder, prices=load_prices(prices_file).updated(free_vlm))
    table = pq.read_table(out)
    ok = table.filter(pc.equal(table["status"], "ok"))
    assert priced.leftover.cost_per_image_usd == pytest.approx(_direct_cost(ok, None) / ok.num_rows)
    assert priced.leftover.projected_usd == pytest.approx(3 * priced.leftover.cost_per_image_usd)


def test_report_counts_rows_per_minute(out, prices_file):
    throughput = report(out, prices_file=prices_file).throughput
    assert [(m.minute, n) for m, n in throughput.per_minute] == [(0, 3), (1, 3), (3, 3)]
    assert (throughput.rate("peak"), throughput.rate("median")) == (3, 3)


def test_report_json_and_text_through_the_cli(out, prices_file, cli):
    code, stdout, _ = cli("report", out, "--prices", prices_file, "--json")
    data = json.loads(stdout)
    assert code == 0 and data["total_tokens"] == pc.sum(pq.read_table(out)["total_tokens"]).as_py()
    assert {s["mode"] for s in data["spend"]} == {"online", "batch"}
    code, stdout, _ = cli("report", out, "--prices", prices_file)
    assert code == 0 and "rows by status: error 4, ok 5" in stdout and "no price for my-vlm" in stdout


# --- exit codes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,message", [
    (["estimate", SAMPLES, "--job", "missing.toml"], "job file not found"),
    (["estimate", "no/such/folder", "--job", DEMO_JOB], "input folder not found"),
    (["estimate", SAMPLES, "--job", DEMO_JOB, "--prices", "missing.toml"], "price file not found"),
    (["estimate", SAMPLES, "--job", DEMO_JOB, "--max-side", "3"], "max_side = 3 is out of range"),
    (["estimate", SAMPLES, "--job", DEMO_JOB, "--latency-s", "0"], "--latency-s must be > 0"),
    (["report", "no/such/out"], "no Parquet parts"),
    (["report", SAMPLES], "no Parquet parts"),
], ids=["no-job", "no-input", "no-price-file", "bad-override", "bad-latency", "no-out", "not-an-out"])
def test_bad_usage_is_one_line_and_exit_2(cli, argv, message):
    code, stdout, stderr = cli(*argv)
    assert code == 2 and stdout == ""
    assert message in stderr and stderr.count("\n") == 1


@pytest.mark.parametrize("argv", [
    ["estimate", SAMPLES],  # --job is required
    ["estimate", SAMPLES, "--job", DEMO_JOB, "--mode", "cheap"],
    ["estimate", SAMPLES, "--job", DEMO_JOB, "--detail", "medium"],
], ids=["no-job-flag", "bad-mode", "bad-detail"])
def test_argparse_usage_errors_exit_2(cli, argv):
    with pytest.raises(SystemExit) as caught:
        cli(*argv)
    assert caught.value.code == 2


def test_bad_price_file_for_report_is_exit_2(out, cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[models."x"]\ninput = "free"\n')
    code, _, stderr = cli("report", out, "--prices", bad)
    assert code == 2 and "bad.toml" in stderr


@pytest.mark.parametrize("scale, said", [(1.0, False), (0.05, True), (2.0, True)], ids=["alike", "less", "more"])
def test_report_says_when_the_server_counted_image_tokens_differently(server, cli, folder, tmp_path, scale, said):
    # The bundled endpoint counts image tokens by the gpt-4o tile rule; local-caption's formula is the
    # same rule, so a scale of 1 agrees and any other scale is a server counting its own way (issue 14).
    server.set_image_token_scale(scale)
    out = tmp_path / "out"
    flags = ["--detail", "high", "--max-side", "1024"]  # images of several tiles: the image part dominates
    assert cli("run", folder, "--job", DEMO_JOB, "--out", out, "--base-url", server.base_url, "--no-progress",
               *flags).code == 0
    rep = report(out)
    (ratio,) = rep.server_count_ratio.values()
    assert (ratio < 0.8 or ratio > 1.25) is said and (scale < 1) == (ratio < 0.9) and (scale > 1) == (ratio > 1.1)
    text = cli("report", out).out
    assert ("the server counted local-caption's prompt tokens at" in text) is said


def test_copies_of_identical_files_do_not_pull_down_the_per_image_figures(server, cli, tmp_path):
    # Issue 10, item 18: a copy costs 0 tokens; counting it as an image made the mean and the
    # projection of what is left look cheaper than any image that was sent.
    folder = copy_samples(tmp_path / "in", {"a.jpg": "coffee_cup.jpg", "b.jpg": "coffee_cup.jpg",
                                            "c.jpg": "chelsea_the_cat.jpg"})
    out = tmp_path / "out"
    assert cli("run", folder, "--job", DEMO_JOB, "--out", out, "--base-url", server.base_url,
               "--no-progress").code == 0
    rows = pq.read_table(out).to_pylist()
    sent = [r["total_tokens"] for r in rows if not r["dedup_of"]]
    assert len(sent) == 2 and len(rows) == 3
    copy_samples(tmp_path / "in", {"d.jpg": "brick_wall_grey.jpg"})  # one image still to do
    rep = report(out, input_dir=folder)
    assert rep.per_image["total"]["mean"] == pytest.approx(sum(sent) / 2, abs=0.05)
    assert rep.image_outcomes == {"ok": 3} and rep.leftover.left == 1
    assert rep.leftover.tokens_per_image == pytest.approx(sum(sent) / 2, abs=0.05)
