"""readers/report.py: what a run did and spent, read back from its out folder.

A reader: it streams the Parquet parts with `store.iter_rows` (a record batch at a time), prices
the tokens with `cost`, and, given the input folder, walks its source (`sources.open_source`) to
project the cost of what is left. It writes nothing and sends nothing. Memory holds 8 bytes per
image whose latest row is ok (the store's 64-bit key hash), histograms of distinct token counts,
and a counter per minute of the run, never the rows themselves.

Two kinds of question, answered two ways: "what was spent" counts every row (every ended attempt,
failed ones included, since a failed attempt with tokens was billed); "how did the images end"
and per-image token percentiles take the latest row of each image, as the resume rule does.
"""

from __future__ import annotations

import array
import datetime as dt
import json
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import cost
from ..cost import load_prices
from ..errors import JobError
from ..sources import input_problem, open_source
from .inputs import run_input_settings
from ..store import JOB_FILE, HashSet, LatestRows, iter_rows, key_hash

__all__ = ["Spend", "Throughput", "Leftover", "Report", "report", "format_report"]

COLUMNS = ["image_path", "status", "error_kind", "model", "mode", "prompt_tokens", "completion_tokens",
           "total_tokens", "cached_tokens", "reasoning_tokens", "usage_source", "created_at", "dedup_of",
           "sent_width", "sent_height", "cache_write_tokens", "service_tier"]
"""The store columns a report reads (Parquet reads only these)."""

NO_MODEL = "(no model)"  # rows that never reached a server (bad_image) have no model
COUNTED_ALIKE = (0.8, 1.25)
"""A server whose prompt-token counts stay within these multiples of the formula's counts as the formula does."""


@dataclass(frozen=True, slots=True)
class Spend:
    """Tokens and cost of the rows of one model in one mode (online, batch, or flex: online rows the
    server says it served at OpenAI's flex tier, priced as such)."""

    model: str  # as the server named it
    mode: str
    priced_as: str | None  # the price-table row used; None: no price known
    rows: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int  # reasoning tokens included
    reasoning_tokens: int
    cost_usd: float | None  # at this mode's prices (what was billed)
    list_usd: float | None  # the same tokens at online list prices, cached tokens at the cached price
    batch_usd: float | None  # the same tokens at Batch API prices
    cache_write_tokens: int = 0  # prompt tokens written to the cache (inside prompt_tokens), at the write price


@dataclass(frozen=True, slots=True)
class Throughput:
    """Rows ended per minute of the run, from created_at (UTC)."""

    first: dt.datetime | None
    last: dt.datetime | None
    per_minute: tuple[tuple[dt.datetime, int], ...]  # minutes with at least one row, in order

    @property
    def active_minutes(self) -> int:
        """Minutes in which at least one row ended."""
        return len(self.per_minute)

    def rate(self, how: str) -> float:
        """Rows per active minute: "median", "mean" or "peak"."""
        counts = [n for _, n in self.per_minute] or [0]
        return {"median": statistics.median, "mean": statistics.fmean, "peak": max}[how](counts)


@dataclass(frozen=True, slots=True)
class Leftover:
    """Images under the input folder without an ok row, and what they would cost at the observed mean."""

    input: str
    images: int  # image files under the input folder
    left: int  # of them, without an ok latest row
    tokens_per_image: float  # observed mean total tokens of an ok image
    cost_per_image_usd: float | None  # observed mean cost of an ok image

    @property
    def projected_tokens(self) -> int:
        """Tokens the images left would take at the observed mean."""
        return round(self.left * self.tokens_per_image)

    @property
    def projected_usd(self) -> float | None:
        """What the images left would cost at the observed mean; None if that mean is unknown."""
        return None if self.cost_per_image_usd is None else self.left * self.cost_per_image_usd


@dataclass(frozen=True, slots=True)
class Report:
    """Everything `caption report` prints about one out folder."""

    out: str
    rows: int
    status_rows: dict[str, int]  # every row by status
    error_kind_rows: dict[str, int]  # error rows by error_kind
    images: int  # distinct images with a row
    image_outcomes: dict[str, int]  # latest row per image: "ok" or the error_kind
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    per_image: dict[str, dict[str, float]]  # "prompt"/"completion"/"total" → p50, p90, max, mean over latest ok rows
    estimated_rows: int  # rows whose usage caption estimated (the server sent none)
    estimated_tokens: int
    spend: tuple[Spend, ...]
    failed_rows: int  # error rows
    failed_rows_with_tokens: int  # of them, those a server billed tokens for
    failed_tokens: int
    failed_usd: float | None
    throughput: Throughput
    leftover: Leftover | None
    pending_journals: int  # journal segments not yet in a part (a run in progress, or crashed)
    server_count_ratio: dict[str, float] = field(default_factory=dict)  # model → reported / formula prompt tokens
    cache_write_tokens: int = 0  # prompt tokens written to a provider's cache (inside prompt_tokens)

    @property
    def cost_usd(self) -> float:
        """What was spent: every priced row at its own mode's prices."""
        return sum(s.cost_usd or 0.0 for s in self.spend)

    @property
    def list_usd(self) -> float:
        """All priced tokens at online list prices."""
        return sum(s.list_usd or 0.0 for s in self.spend)

    @property
    def batch_usd(self) -> float:
        """All priced tokens at Batch API prices (models without batch prices left out)."""
        return sum(s.batch_usd or 0.0 for s in self.spend)

    @property
    def unpriced_models(self) -> list[str]:
        """Models with tokens but no price: their tokens are in no cost total."""
        return sorted({s.model for s in self.spend if s.priced_as is None and (s.prompt_tokens or s.completion_tokens)})

    @property
    def no_batch_price_models(self) -> list[str]:
        """Priced models whose row has no Batch API prices: left out of `batch_usd`."""
        return sorted({s.model for s in self.spend if s.priced_as is not None and s.batch_usd is None})

    @property
    def estimated_share(self) -> float:
        """Share of all tokens that caption estimated rather than the server reported."""
        return self.estimated_tokens / self.total_tokens if self.total_tokens else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data, the run's totals at the top level."""
        return {
            "out": self.out, "rows": self.rows, "status_rows": self.status_rows,
            "error_kind_rows": self.error_kind_rows, "images": self.images, "image_outcomes": self.image_outcomes,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens, "cached_tokens": self.cached_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "reasoning_tokens": self.reasoning_tokens, "per_image": self.per_image,
            "estimated_rows": self.estimated_rows, "estimated_tokens": self.estimated_tokens,
            "estimated_share": round(self.estimated_share, 4),
            "cost_usd": self.cost_usd, "cost_at_list_usd": self.list_usd, "cost_at_batch_usd": self.batch_usd,
            "unpriced_models": self.unpriced_models, "no_batch_price_models": self.no_batch_price_models,
            "spend": [_spend_dict(s) for s in self.spend],
            "failed": {"rows": self.failed_rows, "rows_with_tokens": self.failed_rows_with_tokens,
                       "tokens": self.failed_tokens, "cost_usd": self.failed_usd},
            "throughput": _throughput_dict(self.throughput),
            "left": None if self.leftover is None else _leftover_dict(self.leftover),
            "pending_journals": self.pending_journals,
            "server_count_ratio": self.server_count_ratio,
        }


@dataclass(slots=True)
class _Sums:
    """Token sums of the rows of one (model, mode, status)."""

    rows: int = 0
    rows_with_tokens: int = 0
    prompt: int = 0
    cached: int = 0
    cache_write: int = 0
    completion: int = 0
    reasoning: int = 0
    total: int = 0
    estimated_rows: int = 0
    estimated_tokens: int = 0


@dataclass(slots=True)
class _FormulaCheck:
    """Reported prompt tokens against the published formula's count for the same sent images, per model:
    relays and self-hosted servers count image tokens their own way (issue 14). Costs here use the
    server's counts; `caption estimate` uses the formula, and this ratio says how far apart they are."""

    prompt_text: str  # what the job's prompt counts as text (system + user), as the rows' estimates count it
    detail: str
    sums: dict[str, list[int]] = field(default_factory=dict)  # model → [reported, formula]

    @classmethod
    def of_out(cls, out: Path) -> _FormulaCheck | None:
        try:
            job = json.loads((out / JOB_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        prompt, image = job.get("prompt") or {}, job.get("image") or {}
        return cls((prompt.get("system") or "") + (prompt.get("user") or ""), image.get("detail") or "auto")

    def add(self, row: dict[str, Any]) -> None:
        width, height, model = row["sent_width"], row["sent_height"], row["model"]
        if row["status"] != "ok" or row["usage_source"] != "reported" or row["dedup_of"] or not width or not height:
            return
        formula = cost.estimate_usage(width, height, self.detail, self.prompt_text, "", model=model or "")
        pair = self.sums.setdefault(model or NO_MODEL, [0, 0])
        pair[0] += row["prompt_tokens"] or 0
        pair[1] += formula.prompt_tokens

    def ratios(self) -> dict[str, float]:
        return {model: round(reported / formula, 4) for model, (reported, formula) in sorted(self.sums.items())
                if formula}


@dataclass(slots=True)
class _Tally:
    """Everything a report accumulates while it streams the rows (memory: a few counters per model
    and mode, histograms of distinct values, 8 bytes per image whose latest row is ok)."""

    latest: LatestRows  # the store's rule: which rows are their image's latest
    groups: dict[tuple[str, str, str], _Sums] = field(default_factory=dict)
    error_kinds: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)  # "ok" or error kind of each image's latest row
    hists: dict[str, cost.TokenHistogram] = field(
        default_factory=lambda: {name: cost.TokenHistogram() for name in ("prompt", "completion", "total")})
    ok_keys: array.array = field(default_factory=lambda: array.array("Q"))  # key hashes of latest-ok images
    minutes: Counter = field(default_factory=Counter)  # Unix minute → rows
    position: int = 0  # of the next row, across the parts
    check: _FormulaCheck | None = None  # reported prompt tokens against the formula's, when the job is known

    def add_batch(self, batch: dict[str, list]) -> None:
        for row in zip(*(batch[c] for c in COLUMNS)):
            self.add_row(dict(zip(COLUMNS, row)))

    def add_row(self, row: dict[str, Any]) -> None:
        status = row["status"] or "error"
        mode = cost.price_mode(row["mode"], row["service_tier"])  # a flex answer is billed at flex prices
        sums = self.groups.setdefault((row["model"] or NO_MODEL, mode, status), _Sums())
        prompt, completion = row["prompt_tokens"] or 0, row["completion_tokens"] or 0
        total = row["total_tokens"] or 0
        sums.rows += 1
        sums.rows_with_tokens += 1 if total or prompt or completion else 0
        sums.prompt += prompt
        sums.cached += row["cached_tokens"] or 0
        sums.cache_write += row["cache_write_tokens"] or 0
        sums.completion += completion
        sums.reasoning += row["reasoning_tokens"] or 0
        sums.total += total
        if row["usage_source"] == "estimated":
            sums.estimated_rows += 1
            sums.estimated_tokens += total
        outcome = "ok" if status == "ok" else (row["error_kind"] or "error")
        if status != "ok":
            self.error_kinds[outcome] += 1
        if self.latest.is_latest(self.position):
            self._add_latest(row, outcome, prompt, completion)
        if self.check is not None:
            self.check.add(row)
        self.position += 1
        if row["created_at"] is not None:
            self.minutes[int(row["created_at"].timestamp()) // 60] += 1

    def _add_latest(self, row: dict[str, Any], outcome: str, prompt: int, completion: int) -> None:
        self.outcomes[outcome] += 1
        if outcome == "ok" and not row["dedup_of"]:  # a copy's zero tokens say nothing of what an image costs

            self.hists["prompt"].add(prompt)
            self.hists["completion"].add(completion)
            self.hists["total"].add(prompt + completion)
        if outcome == "ok":
            self.ok_keys.append(key_hash(row["image_path"]))


def report(out: str | Path, *, input_dir: str | Path | None = None, prices_file: str | Path | None = None,
           prices: cost.PriceTable | None = None) -> Report:
    """Read every Parquet part of `out` and return its Report.

    `input_dir` adds the projected cost of the images under it without an ok row; `prices_file`
    (or a ready `prices` table) replaces rows of the bundled price table. Raises JobError when
    `out` holds no parts, or for a bad price file or input folder.
    """
    out = Path(out)
    parts = sorted(out.glob("part-*.parquet")) if out.is_dir() else []
    journals = len(list(out.glob("_journal-*.jsonl"))) if out.is_dir() else 0
    if not parts:
        hint = (" (a run is in progress or crashed; the next `caption run` turns its journal into a part)"
                if journals else "")
        raise JobError(f"{out}: no Parquet parts to report on; is it an out folder written by `caption run`?{hint}")
    if input_dir is not None and (problem := input_problem(input_dir, run_input_settings(out))) is not None:
        raise JobError(f"{input_dir}: {problem}")
    prices = load_prices(prices_file) if prices is None else prices
    tally = _Tally(LatestRows.read(out), check=_FormulaCheck.of_out(out))
    for batch in iter_rows(out, columns=COLUMNS):
        tally.add_batch(batch)
    spend = tuple(_spend(model, mode, sums, prices) for (model, mode), sums in _by_model_mode(tally).items())
    per_image, ok_images, outcomes = _latest_figures(tally)
    failed = [(key, s) for key, s in tally.groups.items() if key[2] != "ok"]
    return Report(
        out=str(out), rows=sum(s.rows for s in tally.groups.values()),
        status_rows=dict(sorted(_count_status(tally).items())),
        error_kind_rows=dict(tally.error_kinds.most_common()), images=sum(outcomes.values()),
        image_outcomes=outcomes,
        **_token_totals(tally.groups.values()), per_image=per_image,
        estimated_rows=sum(s.estimated_rows for s in tally.groups.values()),
        estimated_tokens=sum(s.estimated_tokens for s in tally.groups.values()),
        spend=spend, failed_rows=sum(s.rows for _, s in failed),
        failed_rows_with_tokens=sum(s.rows_with_tokens for _, s in failed),
        failed_tokens=sum(s.total for _, s in failed), failed_usd=_priced_sum(failed, prices),
        throughput=_throughput(tally.minutes),
        leftover=None if input_dir is None else _leftover(input_dir, Path(out), tally, ok_images, per_image,
                                                                prices),
        pending_journals=journals,
        server_count_ratio=tally.check.ratios() if tally.check is not None else {},
    )


def _count_status(tally: _Tally) -> Counter:
    counts: Counter = Counter()
    for (_, _, status), sums in tally.groups.items():
        counts[status] += sums.rows
    return counts


def _by_model_mode(tally: _Tally) -> dict[tuple[str, str], _Sums]:
    """The (model, mode, status) sums merged over status."""
    merged: dict[tuple[str, str], _Sums] = {}
    for (model, mode, _), sums in sorted(tally.groups.items()):
        into = merged.setdefault((model, mode), _Sums())
        for name in _Sums.__slots__:
            setattr(into, name, getattr(into, name) + getattr(sums, name))
    return merged


def _token_totals(groups) -> dict[str, int]:
    groups = list(groups)
    return {"prompt_tokens": sum(s.prompt for s in groups), "completion_tokens": sum(s.completion for s in groups),
            "total_tokens": sum(s.total for s in groups), "cached_tokens": sum(s.cached for s in groups),
            "cache_write_tokens": sum(s.cache_write for s in groups),
            "reasoning_tokens": sum(s.reasoning for s in groups)}


def _spend(model: str, mode: str, sums: _Sums, prices: cost.PriceTable) -> Spend:
    price = prices.find(model)

    def at(prices_mode: str) -> float | None:
        if price is None:
            return None
        return cost.cost_usd(price, prices_mode, sums.prompt, sums.completion, sums.cached, sums.cache_write)

    return Spend(model=model, mode=mode, priced_as=None if price is None else price.model, rows=sums.rows,
                 prompt_tokens=sums.prompt, cached_tokens=sums.cached, completion_tokens=sums.completion,
                 reasoning_tokens=sums.reasoning, cost_usd=at(mode), list_usd=at("online"), batch_usd=at("batch"),
                 cache_write_tokens=sums.cache_write)


def _priced_sum(groups: list[tuple[tuple[str, str, str], _Sums]], prices: cost.PriceTable) -> float | None:
    """What these rows cost at their own mode's prices; None if any of them with tokens is unpriced."""
    total = 0.0
    for (model, mode, _), sums in groups:
        if not (sums.prompt or sums.completion):
            continue
        price = prices.find(model)
        dollars = None if price is None else cost.cost_usd(price, mode, sums.prompt, sums.completion, sums.cached,
                                                           sums.cache_write)
        if dollars is None:
            return None
        total += dollars
    return total


def _latest_figures(tally: _Tally) -> tuple[dict[str, dict[str, float]], int, dict[str, int]]:
    """Per-image token percentiles over latest ok rows, how many images are ok, outcomes by image."""
    per_image = {name: h.summary() for name, h in tally.hists.items()}
    return per_image, tally.outcomes["ok"], dict(tally.outcomes.most_common())


def _throughput(minutes: Counter) -> Throughput:
    series = tuple((dt.datetime.fromtimestamp(m * 60, dt.timezone.utc), n) for m, n in sorted(minutes.items()))
    return Throughput(first=series[0][0] if series else None, last=series[-1][0] if series else None,
                      per_minute=series)


def _leftover(input_dir: str | Path, out: Path, tally: _Tally, ok_images: int, per_image: dict,
              prices: cost.PriceTable) -> Leftover:
    """Walk the input (read as the run that wrote `out` read it); count images whose latest row is
    not ok; price them at the observed mean."""
    done = HashSet.of(tally.ok_keys)
    images = left = 0
    for item in open_source(input_dir, run_input_settings(out)).items():
        images += 1
        left += key_hash(item.key) not in done
    ok_groups = [(key, s) for key, s in tally.groups.items() if key[2] == "ok"]
    ok_rows = sum(s.rows_with_tokens for _, s in ok_groups)  # copies of identical files cost nothing
    ok_cost = _priced_sum(ok_groups, prices)
    return Leftover(input=str(input_dir), images=images, left=left, tokens_per_image=per_image["total"]["mean"],
                    cost_per_image_usd=None if ok_cost is None or not ok_rows else ok_cost / ok_rows)


def _spend_dict(s: Spend) -> dict[str, Any]:
    return {"model": s.model, "mode": s.mode, "priced_as": s.priced_as, "rows": s.rows,
            "prompt_tokens": s.prompt_tokens, "cached_tokens": s.cached_tokens,
            "cache_write_tokens": s.cache_write_tokens, "completion_tokens": s.completion_tokens, "reasoning_tokens": s.reasoning_tokens,
            "cost_usd": s.cost_usd, "cost_at_list_usd": s.list_usd, "cost_at_batch_usd": s.batch_usd}


def _throughput_dict(t: Throughput) -> dict[str, Any]:
    return {"first": t.first.isoformat() if t.first else None, "last": t.last.isoformat() if t.last else None,
            "active_minutes": t.active_minutes, "rows_per_minute": {h: t.rate(h) for h in ("median", "mean", "peak")},
            "per_minute": [[m.isoformat(), n] for m, n in t.per_minute]}


def _leftover_dict(left: Leftover) -> dict[str, Any]:
    return {"input": left.input, "images": left.images, "left": left.left,
            "tokens_per_image": left.tokens_per_image, "cost_per_image_usd": left.cost_per_image_usd,
            "projected_tokens": left.projected_tokens, "projected_usd": left.projected_usd}


# --- text output (the CLI prints it) ------------------------------------------------------------


def format_report(rep: Report, *, as_json: bool = False) -> str:
    """Return the report as the text `caption report` prints (or as JSON)."""
    if as_json:
        return json.dumps(rep.as_dict(), indent=2)
    total = rep.per_image["total"]
    lines = [
        f"caption report: {rep.out}: {rep.rows:,} rows (ended attempts) for {rep.images:,} images",
        f"images, by their latest row: {_counts(rep.image_outcomes)}",
        f"rows by status: {_counts(rep.status_rows)}"
        + (f"; errors by kind: {_counts(rep.error_kind_rows)}" if rep.error_kind_rows else ""),
        f"tokens: {rep.total_tokens:,} = prompt {rep.prompt_tokens:,} (cached {rep.cached_tokens:,}"
        + (f", cache writes {rep.cache_write_tokens:,}" if rep.cache_write_tokens else "") + ") + completion "
        f"{rep.completion_tokens:,} (reasoning {rep.reasoning_tokens:,})",
        f"tokens per ok image: p50 {total['p50']:,}, p90 {total['p90']:,}, max {total['max']:,}, "
        f"mean {total['mean']:,.1f}",
        f"usage estimated by caption (the server sent none): {rep.estimated_share:.1%} of tokens "
        f"({rep.estimated_rows:,} rows)",
        *_spend_lines(rep),
        _failed_line(rep),
        _throughput_line(rep.throughput),
    ]
    if rep.leftover is not None:
        lines.append(_leftover_line(rep.leftover))
    lines += [f"note: the server counted {model}'s prompt tokens at {ratio:.3g}× the published formula "
              "(costs here use its counts; `caption estimate` uses the formula)"
              for model, ratio in rep.server_count_ratio.items()
              if not COUNTED_ALIKE[0] <= ratio <= COUNTED_ALIKE[1]]
    if rep.pending_journals:
        lines.append(f"note: {rep.pending_journals} journal segment(s) not yet in a part are not counted "
                     "(a run is in progress, or crashed; the next run converts them)")
    return "\n".join(lines)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n:,}" for name, n in counts.items()) or "none"


def _spend_lines(rep: Report) -> list[str]:
    usd = cost.format_usd
    lines = [f"spent: {usd(rep.cost_usd)} (each row at its own mode's prices); "
             f"all of it at list prices {usd(rep.list_usd)}, at batch prices {usd(rep.batch_usd)}"]
    for s in rep.spend:
        priced = "no price" if s.priced_as is None else f"priced as {s.priced_as}"
        writes = f", cache writes {s.cache_write_tokens:,}" if s.cache_write_tokens else ""
        lines.append(f"  {s.model} {s.mode}: {s.rows:,} rows, prompt {s.prompt_tokens:,} (cached {s.cached_tokens:,}"
                     f"{writes}), completion {s.completion_tokens:,}: {cost.format_usd(s.cost_usd)} ({priced})")
    if rep.no_batch_price_models:
        lines.append(f"  left out of the batch figure (no batch price): {', '.join(rep.no_batch_price_models)}")
    if rep.unpriced_models:
        lines.append(f"  not in the totals: no price for {', '.join(rep.unpriced_models)}; add rows to a price "
                     "file and pass --prices FILE (README: Cost: estimate and report)")
    return lines


def _failed_line(rep: Report) -> str:
    return (f"failed attempts: {rep.failed_rows:,} error rows, {rep.failed_rows_with_tokens:,} of them billed "
            f"{rep.failed_tokens:,} tokens: {cost.format_usd(rep.failed_usd)}")


def _throughput_line(t: Throughput) -> str:
    if not t.per_minute:
        return "throughput: no timestamps"
    peak_minute = max(t.per_minute, key=lambda item: item[1])[0]
    return (f"throughput: {t.active_minutes:,} active minutes from {t.first:%Y-%m-%d %H:%M} to {t.last:%H:%M} UTC; "
            f"rows per minute median {t.rate('median'):,.0f}, peak {t.rate('peak'):,} at {peak_minute:%H:%M}")


def _leftover_line(left: Leftover) -> str:
    return (f"left under {left.input}: {left.left:,} of {left.images:,} images without an ok row; projected "
            f"{left.projected_tokens:,} tokens, {cost.format_usd(left.projected_usd)} at the observed mean of "
            f"{cost.format_usd(left.cost_per_image_usd)} per image")
