"""cost.py: image-token formulas against the providers' own worked examples, the price table, the histogram."""

from __future__ import annotations

import random
import re

import pytest

from pipeline import cost
from pipeline.cost import tokens as cost_tokens
from pipeline.errors import JobError
from pipeline.cost import load_prices

# (model, width, height, detail, tokens): the providers' documented examples.
VECTORS = [
    ("gpt-4o", 1024, 1024, "high", 765),  # OpenAI: 4 tiles x 170 + 85
    ("gpt-4o", 2048, 4096, "high", 1105),  # OpenAI: 1024x2048 -> 768x1536, 6 tiles
    ("gpt-4o", 4096, 8192, "low", 85),  # OpenAI: low is a flat cost
    ("gpt-4o", 1024, 1024, "auto", 765),  # auto counted as high (an upper bound)
    ("gpt-4.1-mini", 4000, 1474, "high", 2488),  # OpenAI: 1536 patches x 1.62
    ("claude-sonnet-4-5", 1000, 1000, "auto", 1296),  # Anthropic: 36 x 36 patches of 28 px
    ("claude-haiku-4-5", 200, 200, "auto", 64),  # Anthropic: 8 x 8
    ("gemini-2.5-flash", 384, 384, "auto", 258),  # Gemini: small image, one charge
    ("gemini-2.5-pro", 1000, 500, "auto", 516),  # Gemini: 2 x 1 tiles of 768 px
    ("gpt-4o-mini", 512, 512, "high", 2833 + 5667),  # 4o-mini's own constants, one tile
    ("gpt-5", 512, 512, "low", 70),
    ("o3", 512, 512, "high", 75 + 150),
    ("local-caption", 1024, 1024, "high", 765),  # the bundled endpoint reports usage like gpt-4o
]


@pytest.mark.parametrize("model,width,height,detail,tokens", VECTORS,
                         ids=[f"{m}-{w}x{h}-{d}" for m, w, h, d, _ in VECTORS])
def test_image_tokens_match_documented_examples(model, width, height, detail, tokens):
    assert cost.image_tokens(cost.image_formula(model), width, height, detail) == tokens


@pytest.mark.parametrize("width,height,patches", [(1024, 1024, 1024), (1800, 2400, 1452), (4000, 1474, 1536)],
                         ids=["1024x1024", "1800x2400", "4000x1474"])
def test_patch_count_matches_openai_examples(width, height, patches):
    assert cost.openai_patch_count(width, height) == patches


@pytest.mark.parametrize("width,height", [(1024, 1024), (1800, 2400), (4000, 1474), (20000, 300), (33, 9000)],
                         ids=["square", "portrait", "wide", "panorama", "sliver"])
def test_patch_count_never_exceeds_the_budget(width, height):
    assert cost.openai_patch_count(width, height) <= cost_tokens.PATCH_BUDGET


def test_tile_count_is_exact_on_a_tile_edge():
    # 1500x2000 shrinks to exactly 768x1024: 2x2 tiles, not 2x3 from float noise.
    assert cost.openai_tile_tokens(1500, 2000, "high") == 85 + 4 * 170


def test_anthropic_large_image_fits_the_budget():
    assert cost.anthropic_image_tokens(3000, 2000) <= cost_tokens.ANTHROPIC_BUDGET
    assert cost.anthropic_image_tokens(8000, 100) <= cost_tokens.ANTHROPIC_BUDGET


@pytest.mark.parametrize("model,family", [
    ("gpt-4.1-mini-2025-04-14", "OpenAI 32 px patches x 1.62"),  # longest prefix beats gpt-4.1
    ("gpt-4.1", "OpenAI tile 85/170"),
    ("openai/gpt-4o-mini", "OpenAI tile 2833/5667"),  # routing prefix dropped
    ("GPT-5-NANO", "OpenAI 32 px patches x 2.46"),
    ("o4-mini", "OpenAI 32 px patches x 1.72"),
    ("claude-sonnet-4-5-20250929", "Anthropic 28 px patches"),
    ("models/gemini-2.5-flash", "Gemini 768 px tiles"),
    ("qwen-vl-max", "Qwen-VL 28 px patches"),
], ids=lambda v: v if "/" not in v else v.replace("/", "_"))
def test_formula_is_chosen_by_longest_prefix(model, family):
    assert cost.image_formula(model).family == family


def test_unknown_model_falls_back_to_the_openai_tile_rule():
    formula = cost.image_formula("my-own-vlm")
    assert not formula.known
    assert cost.image_tokens(formula, 1024, 1024, "high") == 765


def test_estimate_usage_keeps_its_default_of_the_tile_rule():
    usage = cost.estimate_usage(1024, 1024, "high", "abcd" * 3, "x" * 9)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.source) == (765 + 3, 3, "estimated")
    assert cost.estimate_usage(1000, 1000, "high", "", "", model="claude-haiku-4-5").prompt_tokens == 1296


# --- prices ------------------------------------------------------------------------------------

REQUIRED_MODELS = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "gpt-5", "gpt-5-mini",
                   "gpt-5-nano", "o4-mini", "claude-sonnet-4-5", "claude-haiku-4-5", "gemini-2.5-flash",
                   "gemini-2.5-pro", "qwen-vl-max"]


@pytest.mark.parametrize("model", REQUIRED_MODELS)
def test_bundled_table_prices_every_listed_model_in_full(model):
    price = load_prices().find(model)
    assert price is not None and price.model == model
    assert None not in (price.cached_input, price.batch_input, price.batch_output)
    assert price.source.startswith("https://") and re.fullmatch(r"\d{4}-\d{2}(-\d{2})?|unverified", price.as_of)
    assert price.batch_input <= price.input and price.cached_input <= price.input


@pytest.mark.parametrize("model,row", [
    ("gpt-4o-2024-08-06", "gpt-4o"),
    ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
    ("claude-sonnet-4-5@20250929", "claude-sonnet-4-5"),
    ("gpt-5.1", None),  # no silent gpt-5 price for another model
    ("gpt-4o-audio", "gpt-4o"),
    ("nobody-vlm", None),
], ids=["dated", "mini-dated", "vertex-at", "dot-version", "variant", "unknown"])
def test_price_lookup_takes_longest_prefix_at_a_name_boundary(model, row):
    found = load_prices().find(model)
    assert (found.model if found else None) == row


def test_user_price_rows_replace_bundled_rows(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[models."gpt-4o"]\ninput = 1\noutput = 2\nsource = "mine"\nas_of = "2026-01-01"\n'
                    '[models."my-vlm"]\ninput = 3\noutput = 4\nsource = "mine"\nas_of = "2026-01-01"\n')
    table = load_prices(path)
    assert (table.find("gpt-4o").input, table.find("gpt-4o").batch_input) == (1.0, None)
    assert table.find("my-vlm").output == 4.0
    assert table.find("gpt-4.1").input == 2.0  # other rows stay


@pytest.mark.parametrize("text,message", [
    ("[models.x]\ninput = 1\n", "needs 'output'"),
    ('[models.x]\ninput = "cheap"\noutput = 1\nsource = "s"\nas_of = "2026-01-01"\n', "must be a price"),
    ('[models.x]\ninput = 1\noutput = 1\nsource = "s"\nas_of = "yesterday"\n', "as_of must be a date"),
    ('[models.x]\ninput = 1\noutput = 1\nsource = "s"\nas_of = "2026-01-01"\ncolour = 1\n', "unknown key 'colour'"),
    ("[gpt]\ninput = 1\n", r"only \[models"),
    ("[models.x\n", "not valid TOML"),
], ids=["missing-field", "not-a-number", "bad-date", "unknown-key", "no-models-table", "bad-toml"])
def test_bad_price_file_is_one_job_error_naming_the_file(text, message):
    with pytest.raises(JobError, match=message) as caught:
        cost.parse_price_table(text, "prices.toml")
    assert str(caught.value).startswith("prices.toml")


def test_cost_bills_cached_tokens_at_the_cached_price_and_batch_at_batch_prices():
    price = cost.Price(model="m", input=2.0, output=8.0, source="s", as_of="2026-01-01", cached_input=0.5,
                       batch_input=1.0, batch_output=4.0)
    assert cost.cost_usd(price, "online", 1_000_000, 1_000_000, 400_000) == pytest.approx(0.6 * 2 + 0.4 * 0.5 + 8)
    # the cache discount stacks with the batch one: cached at 1.0 x 0.5 / 2.0
    assert cost.cost_usd(price, "batch", 1_000_000, 1_000_000, 400_000) == pytest.approx(0.6 * 1 + 0.4 * 0.25 + 4)
    no_batch = cost.Price(model="m", input=2.0, output=8.0, source="s", as_of="2026-01-01")
    assert cost.cost_usd(no_batch, "batch", 10, 10) is None
    assert cost.cost_usd(no_batch, "online", 1_000_000, 0, 500_000) == pytest.approx(2.0)  # no cache price: input


# --- the histogram -------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [1, 25, 50, 90, 99, 100])
def test_histogram_percentiles_equal_nearest_rank_on_the_sorted_values(q):
    rng = random.Random(q)
    values = [rng.choice([85, 255, 425, 765, 1105]) + rng.randrange(12) for _ in range(5001)]
    hist = cost.TokenHistogram()
    for value in values:
        hist.add(value)
    ordered = sorted(values)
    assert hist.percentile(q) == ordered[max(1, -(-q * len(values) // 100)) - 1]
    assert (hist.count, hist.total, hist.max) == (len(values), sum(values), max(values))


def test_histogram_memory_grows_with_distinct_values_not_with_images():
    hist = cost.TokenHistogram()
    for i in range(200_000):
        hist.add(85 + i % 7)
    assert len(hist._counts) == 7 and hist.count == 200_000
    assert cost.TokenHistogram().summary() == {"p50": 0, "p90": 0, "max": 0, "mean": 0.0}
