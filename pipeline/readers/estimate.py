"""readers/estimate.py: what captioning a folder would cost and take, before anything is sent.

A reader of INPUT: it walks the source (`sources.open_source`), reads each file's header only
(`images.probe_size`: Pillow opens lazily, so no pixel is decoded), applies the job's resize rule
(`cost.sent_side`: `max_side` capped at what the model keeps and at the token budget, then
`images.fit_within`) to know the size that would be sent, and sums tokens and prices with `cost`.
It sends no request and writes nothing. Memory stays flat however many images there are:
per-image figures go into histograms of distinct values, never into lists.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .. import cost, images
from ..cost import load_prices
from ..errors import BadImageError, JobError
from ..job import Job, Limits
from ..sources import input_problem, open_source

__all__ = ["Scenario", "ScenarioFigures", "Estimate", "estimate", "format_estimate"]

log = logging.getLogger(__name__)

"""The price table shipped inside the package (package data, see pyproject.toml)."""

COMPARE_DETAILS = ("low", "high")
COMPARE_MAX_SIDES = (512, 1024, 2048)
"""The settings grid of the comparison table, for the job's model and each of --models."""

COMPARE_BUDGETS = (85, 256, 512, 1024, 2048)
"""Token budgets ([image] token_budget) the comparison table also tries, at the job's detail and
max_side, for the job's model and each of --models (a budget below the model's smallest image is left out)."""

DEFAULT_LATENCY_S = 3.0
"""Assumed seconds per request for the time estimate: a short caption from a hosted vision model.
Measure yours (`caption report` shows throughput) and pass --latency-s."""

ERROR_EXAMPLES = 5  # unreadable files named in the output; the rest are only counted

Mode = Literal["online", "batch"]


@dataclass(frozen=True, slots=True)
class Scenario:
    """One way of sending the folder: a model with image settings."""

    model: str
    detail: str
    max_side: int
    token_budget: int | None = None  # image tokens per image; None: no budget


@dataclass(frozen=True, slots=True)
class ScenarioFigures:
    """The whole folder's prompt tokens and cost under one Scenario."""

    scenario: Scenario
    formula: str  # the image formula's family name
    prompt_tokens: int  # summed over the readable images
    per_image: dict[str, float]  # prompt tokens per image: p50, p90, max, mean
    cost_usd: float | None  # input + output at the run's mode; None when the price is unknown
    is_job: bool  # the job's own settings (the figures at the top)


@dataclass(frozen=True, slots=True)
class Estimate:
    """Everything `caption estimate` prints, for one folder and one job."""

    input: str
    model: str
    mode: Mode
    detail: str
    max_side: int
    token_budget: int | None  # the job's [image] token_budget
    images: int  # files whose header was read
    errors: int  # image files that could not be read (not an image, unreadable, too large)
    error_examples: tuple[str, ...]  # "key: reason", the first ERROR_EXAMPLES of them
    formula: str  # family name of the job model's image formula
    formula_known: bool  # False: the OpenAI tile rule was assumed for an unknown model
    text_tokens: int  # prompt text tokens per request (system + user)
    prompt_tokens: int  # total over all images
    per_image: dict[str, float]  # prompt tokens per image: p50, p90, max, mean
    completion_tokens_per_image: int
    completion_from: str  # "--expected-output-tokens" or "max_tokens" (an upper bound)
    price: cost.Price | None
    input_cost_usd: float | None
    output_cost_usd: float | None
    time_s: float  # wall time at the job's limits
    time_limited_by: str  # "concurrency" | "rpm" | "tpm"
    latency_s: float  # the assumed seconds per request
    limits: Limits
    comparison: tuple[ScenarioFigures, ...]
    elapsed_s: float  # how long this estimate took
    prices_mode: str = "online"  # the prices used: the mode's, or "flex" for service_tier = "flex" online
    cache: cost.CacheSplit | None = None  # [prompt] cache = true: the prompt tokens a cache writes and reads
    api: str = "openai"  # the job's protocol (what caching means depends on it)

    @property
    def completion_tokens(self) -> int:
        """Completion tokens of the whole folder."""
        return self.images * self.completion_tokens_per_image

    @property
    def cost_usd(self) -> float | None:
        """Input plus output cost; None when the model (or its batch price) is unknown."""
        if self.input_cost_usd is None or self.output_cost_usd is None:
            return None
        return self.input_cost_usd + self.output_cost_usd

    def as_dict(self) -> dict[str, Any]:
        """The estimate as JSON-ready data, the whole run's figures at the top level."""
        return {
            "input": self.input, "model": self.model, "mode": self.mode, "detail": self.detail,
            "max_side": self.max_side, "token_budget": self.token_budget, "images": self.images, "errors": self.errors,
            "error_examples": list(self.error_examples),
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "cost_usd": self.cost_usd, "input_cost_usd": self.input_cost_usd,
            "output_cost_usd": self.output_cost_usd, "price_known": self.price is not None,
            "price": _price_dict(self.price), "formula": self.formula, "formula_known": self.formula_known,
            "text_tokens_per_image": self.text_tokens, "prompt_tokens_per_image": self.per_image,
            "completion_tokens_per_image": self.completion_tokens_per_image,
            "completion_from": self.completion_from,
            "time_s": round(self.time_s, 1), "time_limited_by": self.time_limited_by,
            "latency_s": self.latency_s, "concurrency": self.limits.concurrency, "rpm": self.limits.rpm,
            "tpm": self.limits.tpm,
            "comparison": [_scenario_dict(f) for f in self.comparison],
            "prices_mode": self.prices_mode,
            "cache": None if self.cache is None else {
                "prefix_tokens": self.cache.prefix_tokens, "min_tokens": self.cache.minimum,
                "cached": self.cache.cached, "cache_write_tokens": self.cache.write_tokens,
                "cached_tokens": self.cache.read_tokens},
            "elapsed_s": round(self.elapsed_s, 3),
            "images_per_s": round((self.images + self.errors) / self.elapsed_s) if self.elapsed_s > 0 else None,
        }


@dataclass(slots=True)
class _Tally:
    """Running prompt-token counts for one Scenario."""

    scenario: Scenario
    formula: cost.ImageFormula
    text_tokens: int
    tokens: cost.TokenHistogram = field(default_factory=cost.TokenHistogram)

    def add(self, width: int, height: int) -> None:
        """Count one image of `width` × `height` px, sent as the scenario would send it."""
        s = self.scenario
        side = cost.sent_side(self.formula, s.detail, width, height, s.max_side, s.token_budget)
        image = cost.image_tokens(self.formula, *images.fit_within(width, height, side), s.detail)
        self.tokens.add(image + self.text_tokens)


def estimate(job: Job, input_path: str | Path, *, models: tuple[str, ...] = (),
             expected_output_tokens: int | None = None, mode: Mode = "online", latency_s: float = DEFAULT_LATENCY_S,
             prices: cost.PriceTable | None = None) -> Estimate:
    """Walk `input_path`, read every image header, and return what `job` would send and cost.

    `models` adds models to the comparison table; `expected_output_tokens` replaces the job's
    max_tokens as the completion per image; `mode` picks list ("online") or Batch API prices.
    Sends nothing. Raises JobError for a missing input folder or a bad price file.
    """
    if (problem := input_problem(input_path, job.input)) is not None:
        raise JobError(f"{input_path}: {problem}")
    if expected_output_tokens is not None and expected_output_tokens < 0:
        raise JobError(f"--expected-output-tokens must be >= 0, not {expected_output_tokens}")
    if latency_s <= 0:
        raise JobError(f"--latency-s must be > 0, not {latency_s}")
    prices = load_prices(job.cost.prices) if prices is None else prices
    text = cost.text_tokens((job.prompt.system or "") + job.prompt.user)
    main = Scenario(job.endpoint.model, job.image.detail, job.image.max_side, job.image.token_budget)
    tallies = {s: _Tally(s, cost.image_formula(s.model), text) for s in _scenarios(main, models)}
    started = time.perf_counter()
    count, errors, examples = _walk(input_path, job, tallies.values())
    elapsed = time.perf_counter() - started
    per_output = job.prompt.max_tokens if expected_output_tokens is None else expected_output_tokens
    main_tokens = tallies[main].tokens
    price = prices.find(job.endpoint.model)
    time_s, limited_by = _time_at_limits(job.limits, count, main_tokens.total, job.prompt.max_tokens, latency_s)
    pricing = cost.price_mode(mode, job.endpoint.service_tier)
    split = _cache_split(job, job.endpoint.model, count)
    return Estimate(
        input=str(input_path), model=main.model, mode=mode, detail=main.detail, max_side=main.max_side,
        token_budget=main.token_budget,
        images=count, errors=errors, error_examples=tuple(examples),
        formula=tallies[main].formula.family, formula_known=tallies[main].formula.known, text_tokens=text,
        prompt_tokens=main_tokens.total, per_image=main_tokens.summary(),
        completion_tokens_per_image=per_output,
        completion_from="max_tokens" if expected_output_tokens is None else "--expected-output-tokens",
        price=price,
        input_cost_usd=_price_tokens(price, pricing, main_tokens.total, 0, split),
        output_cost_usd=_price_tokens(price, pricing, 0, count * per_output),
        time_s=time_s, time_limited_by=limited_by, latency_s=latency_s, limits=job.limits,
        comparison=tuple(_figures(t, t.scenario == main, prices, pricing, count * per_output,
                                  _cache_split(job, t.scenario.model, count)) for t in tallies.values()),
        elapsed_s=elapsed, prices_mode=pricing, cache=split, api=job.endpoint.api,
    )


def _cache_split(job: Job, model: str, count: int) -> cost.CacheSplit | None:
    """With `[prompt] cache = true`: the first request writes the cacheable prefix and the rest read it,
    when it is long enough for `model` (`cost.cache_split`); None without it."""
    if not job.prompt.cache:
        return None
    return cost.cache_split(job.endpoint.api, model, job.prompt.system, job.prompt.user, count)


def _scenarios(main: Scenario, models: tuple[str, ...]) -> list[Scenario]:
    """For the job's model and then each of `models`: the comparison grid, with the job's own
    settings first when the grid lacks them."""
    ordered: dict[Scenario, None] = {}
    for model in dict.fromkeys([main.model, *models]):
        grid = [Scenario(model, detail, side) for detail in COMPARE_DETAILS for side in COMPARE_MAX_SIDES]
        own = Scenario(model, main.detail, main.max_side, main.token_budget)
        floor = cost.min_image_tokens(cost.image_formula(model), main.detail)
        grid += [Scenario(model, main.detail, main.max_side, budget) for budget in COMPARE_BUDGETS if budget >= floor]
        for scenario in ([] if own in grid else [own]) + grid:
            ordered.setdefault(scenario, None)
    return list(ordered)


def _walk(input_path: str | Path, job: Job, tallies) -> tuple[int, int, list[str]]:
    """Probe every image under `input_path` into the tallies; return (images, errors, examples).

    A file the run would refuse unread (not a regular file, over `[input] max_file_mb`) counts as
    unreadable, as does one whose header Pillow cannot read.
    """
    tallies = list(tallies)
    count = errors = 0
    examples: list[str] = []
    for source in open_source(input_path, job.input).items():
        try:
            with source.open() as handle:
                width, height = images.probe_size(handle)
        except (BadImageError, OSError) as err:
            log.debug("unreadable: %s: %s", source.key, err)
            errors += 1
            if len(examples) < ERROR_EXAMPLES:
                examples.append(f"{source.key}: {getattr(err, 'strerror', None) or err}")
            continue
        count += 1
        for tally in tallies:
            tally.add(width, height)
    return count, errors, examples


def _time_at_limits(limits: Limits, count: int, prompt_tokens: int, max_tokens: int, latency_s: float
                    ) -> tuple[float, str]:
    """Seconds to send `count` requests, and the limit that binds: concurrency, rpm or tpm.

    Concurrency C at L seconds a request allows C/L requests a second. A TPM limit counts each
    request's prompt plus its max_tokens, as OpenAI does before the answer is known
    (https://platform.openai.com/docs/guides/rate-limits).
    """
    bounds = {"concurrency": count * latency_s / limits.concurrency}
    if limits.rpm:
        bounds["rpm"] = count / limits.rpm * 60
    if limits.tpm:
        bounds["tpm"] = (prompt_tokens + count * max_tokens) / limits.tpm * 60
    limited_by = max(bounds, key=bounds.get)
    return bounds[limited_by], limited_by


def _price_tokens(price: cost.Price | None, mode: str, prompt: int, completion: int,
                  split: cost.CacheSplit | None = None) -> float | None:
    if price is None:
        return None
    read, written = (split.read_tokens, split.write_tokens) if split is not None else (0, 0)
    return cost.cost_usd(price, mode, prompt, completion, read, written)


def _figures(tally: _Tally, is_job: bool, prices: cost.PriceTable, mode: str, completion: int,
             split: cost.CacheSplit | None) -> ScenarioFigures:
    price = prices.find(tally.scenario.model)
    return ScenarioFigures(scenario=tally.scenario, formula=tally.formula.family, prompt_tokens=tally.tokens.total,
                           per_image=tally.tokens.summary(),
                           cost_usd=_price_tokens(price, mode, tally.tokens.total, completion, split), is_job=is_job)


def _price_dict(price: cost.Price | None) -> dict[str, Any] | None:
    if price is None:
        return None
    return {"model": price.model, "input": price.input, "cached_input": price.cached_input, "output": price.output,
            "batch_input": price.batch_input, "batch_output": price.batch_output, "source": price.source,
            "as_of": price.as_of, "note": price.note}


def _scenario_dict(figures: ScenarioFigures) -> dict[str, Any]:
    return {"model": figures.scenario.model, "detail": figures.scenario.detail,
            "max_side": figures.scenario.max_side, "token_budget": figures.scenario.token_budget,
            "formula": figures.formula,
            "prompt_tokens": figures.prompt_tokens, "prompt_tokens_per_image": figures.per_image,
            "cost_usd": figures.cost_usd, "is_job": figures.is_job}


# --- text output (the CLI prints it) ------------------------------------------------------------


def format_estimate(est: Estimate, *, as_json: bool = False) -> str:
    """Return the estimate as the text `caption estimate` prints (or as JSON)."""
    if as_json:
        return json.dumps(est.as_dict(), indent=2)
    rate = (est.images + est.errors) / est.elapsed_s if est.elapsed_s > 0 else 0.0
    p = est.per_image
    lines = [
        f"caption estimate: {est.images:,} images under {est.input}"
        + (f" ({est.errors:,} unreadable)" if est.errors else "")
        + f"; headers read at {rate:,.0f} images/s; nothing was sent",
        f"model {est.model} (image tokens: {est.formula}), detail {est.detail}, max_side {est.max_side}"
        + (f", token_budget {est.token_budget:,}" if est.token_budget is not None else "") + f", {est.prices_mode} prices",
        f"prompt tokens: {est.prompt_tokens:,}; per image p50 {p['p50']:,}, p90 {p['p90']:,}, max {p['max']:,} "
        f"(text {est.text_tokens:,} of each)",
        f"completion tokens: {est.completion_tokens:,} ({est.completion_tokens_per_image:,} per image from "
        + ("--expected-output-tokens)" if est.completion_from != "max_tokens"
           else "max_tokens, an upper bound; --expected-output-tokens N gives a closer figure)"),
        *_cache_lines(est),
        _cost_line(est),
        _time_line(est),
    ]
    if not est.formula_known:
        lines.append(f"note: no image-token rule for {est.model!r}; the OpenAI tile rule (85/170) was assumed")
    lines += [f"unreadable: {example}" for example in est.error_examples]
    if est.errors > len(est.error_examples):
        lines.append(f"unreadable: ... and {est.errors - len(est.error_examples):,} more")
    lines += ["", f"the same folder with other settings (cost = input + output at {est.prices_mode} prices):"]
    lines += _comparison_table(est.comparison)
    return "\n".join(lines)


def _cost_line(est: Estimate) -> str:
    if est.price is None:
        example = cost.PRICE_FILE_EXAMPLE.replace('"my-model"', json.dumps(est.model))
        return (f"cost: unknown, no price for {est.model!r}. Add a row to a TOML price file and pass "
                f"--prices FILE (or set [cost] prices = \"FILE\" in the job):\n" + _indent(example, 6))
    if est.cost_usd is None:
        return (f"cost: unknown, the price row for {est.price.model!r} has no {est.prices_mode} prices "
                "(add batch_input and batch_output)")
    usd = cost.format_usd
    return (f"cost: {usd(est.cost_usd)} (input {usd(est.input_cost_usd)} + output {usd(est.output_cost_usd)}) "
            f"at {est.price.model} {est.prices_mode} prices ({est.price.source}, as of {est.price.as_of})")


def _cache_lines(est: Estimate) -> list[str]:
    """What `[prompt] cache = true` does to the prompt tokens (nothing printed without it)."""
    split = est.cache
    if split is None:
        return []
    if split.minimum is None and est.api == "gemini":
        return ["prompt cache: Gemini caches repeated prefixes by itself (implicit caching); cache = true sends "
                "nothing more, and no hits are assumed here (a run records them in cached_tokens)"]
    if split.minimum is None:
        return [f"prompt cache: no known minimum prefix for {est.model!r}, so no hits are assumed; priced as "
                "plain input"]
    if not split.cached:
        return [f"prompt cache: the prefix before the image is {split.prefix_tokens:,} tokens, under the "
                f"{split.minimum:,} {est.model} caches at least: nothing is cached, all of it is plain input"]
    return [f"prompt cache: a {split.prefix_tokens:,}-token prefix (at least {split.minimum:,} for {est.model}): "
            f"the first request writes {split.write_tokens:,} tokens, the other {max(est.images - 1, 0):,} read "
            f"{split.read_tokens:,} in all (cached input price)"]


def _time_line(est: Estimate) -> str:
    limits = est.limits
    given = [f"concurrency {limits.concurrency} at {est.latency_s:g} s a request (--latency-s)"]
    given += [f"rpm {limits.rpm:,}"] if limits.rpm else []
    given += [f"tpm {limits.tpm:,}"] if limits.tpm else []
    return f"time: about {_duration(est.time_s)} at {', '.join(given)}; limited by {est.time_limited_by}"


def _comparison_table(rows: tuple[ScenarioFigures, ...]) -> list[str]:
    header = ("", "model", "detail", "max_side", "budget", "tokens/image", "p90", "prompt tokens", "cost")
    body = [("*" if f.is_job else "", f.scenario.model, f.scenario.detail, str(f.scenario.max_side),
             "-" if f.scenario.token_budget is None else f"{f.scenario.token_budget:,}",
             f"{f.per_image['mean']:,.0f}", f"{f.per_image['p90']:,}", f"{f.prompt_tokens:,}",
             "unknown" if f.cost_usd is None else cost.format_usd(f.cost_usd)) for f in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    numeric = {3, 4, 5, 6, 7, 8}
    out = []
    for row in [header, *body]:
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        out.append(" " + "  ".join(cells).rstrip())
    families = {f.scenario.model: f.formula for f in rows}
    out.append("  * the job's own settings. Image tokens: "
               + "; ".join(f"{model} by {family}" for model, family in families.items())
               + " (only OpenAI's tile rule reads detail)")
    return out


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _indent(text: str, spaces: int) -> str:
    return "\n".join(" " * spaces + line for line in text.splitlines())
