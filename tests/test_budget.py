"""Token budgets and the sizes a model keeps: the sizing rule per family, and a budget run against the bundled endpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import DEMO_JOB, read_rows
from pipeline import cost, images
from pipeline.cost.sizing import budget_side, fit_side, kept_side, sent_side
from pipeline.job import load_job

FORMULA = cost.image_formula


def _tokens(model: str, detail: str, w: int, h: int, side: int) -> int:
    return cost.image_tokens(FORMULA(model), *images.fit_within(w, h, side), detail)


@pytest.mark.parametrize(
    "model, detail, size, budget, side",
    [
        ("gpt-4o", "high", (4000, 3000), 255, 512),  # one 512 px tile
        ("gpt-4o", "high", (4000, 3000), 595, 683),  # 683 x 512: 2 x 1 tiles; one px more is 2 x 2
        ("gpt-4o", "high", (1000, 1000), 765, 768),  # 2 x 2 tiles fit, but the model keeps only 768 x 768
        ("gpt-4o", "low", (4000, 3000), 85, 512),  # low costs 85 at any size: only the 512 px cap binds
        ("gpt-4.1-mini", "auto", (2048, 2048), 500, 544),  # 17 x 17 patches x 1.62 = 468
        ("claude-sonnet-4-5", "auto", (1000, 1000), 64, 224),  # 8 x 8 patches of 28 px
        ("claude-sonnet-4-5", "auto", (3000, 1000), 1000, 1513),  # 55 x 18 patches
        ("gemini-2.5-flash", "auto", (2000, 1500), 258, 768),  # one 768 px tile
        ("gemini-2.5-flash", "auto", (2000, 1500), 1032, 1536),  # 2 x 2 tiles
        ("qwen2.5-vl-72b", "auto", (1400, 1400), 402, 574),  # rounded to 20 x 20 patches + 2
    ],
    ids=["tile-1", "tile-3", "tile-whole", "tile-low", "patch", "anthropic-small", "anthropic-long", "gemini-1",
         "gemini-4", "qwen"],
)
def test_the_budget_side_is_the_largest_whose_tokens_fit(model, detail, size, budget, side):
    w, h = size
    got = sent_side(FORMULA(model), detail, w, h, 8192, budget)
    assert _tokens(model, detail, w, h, got) <= budget
    larger = [s for s in range(got + 1, min(got + 64, max(w, h)) + 1)
              if s <= kept_side(FORMULA(model), detail, w, h)]
    assert all(_tokens(model, detail, w, h, s) > budget for s in larger)  # nothing larger fits
    assert got == side


@pytest.mark.parametrize(
    "model, detail, size, kept",
    [
        ("gpt-4o", "high", (4000, 3000), 1024),  # fit 2048, then the short side to 768
        ("gpt-4o", "high", (6000, 1000), 2048),  # a long strip: the 2048 fit binds
        ("gpt-4o", "low", (4000, 3000), 512),  # low: a 512 x 512 version
        ("gpt-4.1-mini", "auto", (4000, 4000), 1248),  # 1,536 patches of 32 px: 39 x 39
        ("claude-sonnet-4-5", "auto", (4000, 1000), 1568),  # the long edge
        ("claude-sonnet-4-5", "auto", (3000, 3000), 1092),  # 1,568 tokens: 39 x 39 patches of 28 px
        ("gemini-2.5-flash", "auto", (4000, 3000), 4000),  # every tile is counted, none dropped: no cap
        ("local-caption", "high", (4000, 3000), 4000),  # the bundled endpoint reads every pixel
        ("some-unknown-vlm", "high", (4000, 3000), 4000),  # no known rule: no cap
    ],
    ids=["tile-high", "tile-strip", "tile-low", "patch", "anthropic-edge", "anthropic-budget", "gemini", "local",
         "unknown"],
)
def test_max_side_is_capped_at_what_the_model_keeps(model, detail, size, kept):
    assert kept_side(FORMULA(model), detail, *size) == kept
    assert sent_side(FORMULA(model), detail, *size, 8192) == kept
    assert sent_side(FORMULA(model), detail, *size, 300) == 300  # a smaller max_side still wins
    if kept < max(size):  # below the cap the model counts the image as sent: same tokens, fewer bytes
        assert _tokens(model, detail, *size, kept) == _tokens(model, detail, *size, max(size))


def test_fit_side_rounds_exactly_as_the_image_stage():
    for w, h in [(4000, 3000), (3000, 4000), (1, 5000), (640, 427), (777, 333)]:
        for side in (1, 2, 100, 511, 512, 1567, 2048, 9000):
            assert fit_side(w, h, side) == images.fit_within(w, h, side)


def test_a_budget_no_image_fits_is_refused():
    with pytest.raises(ValueError, match="below the 258 tokens"):
        budget_side(FORMULA("gemini-2.5-flash"), "auto", 1000, 1000, 100)


def test_fingerprints_without_a_budget_are_unchanged():
    job = load_job(DEMO_JOB)
    assert job.fingerprint == "cf86812ea3344eeb"  # as out folders before token_budget recorded it
    assert load_job(DEMO_JOB, {"image.token_budget": 255}).fingerprint != job.fingerprint


def _sized_folder(folder: Path) -> Path:
    folder.mkdir()
    for w, h in [(3000, 2000), (1000, 1000), (300, 200), (1600, 900), (700, 2100), (2048, 512)]:
        Image.new("RGB", (w, h), (w % 255, h % 255, 90)).save(folder / f"{w}x{h}.jpg", quality=70)
    return folder


@pytest.mark.parametrize("budget", [255, 600, 1105], ids=["1-tile", "3-tiles", "6-tiles"])
def test_a_budget_run_never_sends_more_image_tokens_than_the_budget(server, cli, job_file, tmp_path, budget):
    job = job_file(image_max_side=4096, image_detail="high")
    folder = _sized_folder(tmp_path / "in")
    code, _, err = cli("run", folder, "--job", job, "--out", tmp_path / "out", "--base-url", server.base_url,
                       "--no-progress", "--token-budget", budget)
    assert code == 0, err
    text = cost.text_tokens("Describe this image.")
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 6
    for row in rows:
        assert row["prompt_tokens"] - text <= budget, row  # what the server counted for the image
        w, h, side = row["width"], row["height"], max(row["sent_width"], row["sent_height"])
        if side < max(w, h):  # shrunk: one pixel more on the long side would not fit
            assert _tokens("local-caption", "high", w, h, side + 1) > budget
    assert sorted(max(r["sent_width"], r["sent_height"]) for r in rows) != sorted(
        max(r["width"], r["height"]) for r in rows)  # the budget did shrink some


def test_a_budget_below_the_smallest_image_exits_2_before_sending(server, cli, job_file, tmp_path):
    job = job_file(image_detail="high")
    folder = _sized_folder(tmp_path / "in")
    code, out, err = cli("run", folder, "--job", job, "--out", tmp_path / "out", "--base-url", server.base_url,
                         "--no-progress", "--token-budget", 100)
    assert code == 2 and "token_budget = 100 is below the 255 tokens" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("part-*"))


def test_estimate_prints_the_budget_rows_and_the_current_rule(cli, tmp_path):
    folder = _sized_folder(tmp_path / "in")
    code, out, _ = cli("estimate", folder, "--job", DEMO_JOB, "--detail", "high", "--max-side", "4096",
                       "--token-budget", "600", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["token_budget"] == 600 and data["prompt_tokens_per_image"]["max"] - data["text_tokens_per_image"] <= 600
    budgets = {row["token_budget"]: row for row in data["comparison"] if row["max_side"] == 4096}
    assert set(budgets) == {256, 512, 1024, 2048, 600}  # 85 is below local-caption's 255 at high
    assert next(r for r in data["comparison"] if r["is_job"])["token_budget"] == 600
    for budget, row in budgets.items():
        if budget is not None:
            assert row["prompt_tokens_per_image"]["max"] - data["text_tokens_per_image"] <= budget
    code, text, _ = cli("estimate", folder, "--job", DEMO_JOB, "--detail", "high", "--max-side", "4096",
                        "--token-budget", "600")
    assert "token_budget 600" in text and " budget " in text
