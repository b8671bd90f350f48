"""readers/compare.py: run several variants of a job on the same sample, then one page side by side.

A reader that calls the driver: each variant (a job file, or a job file with another model) runs
through the one entry point `engine.run` into `DIR/<variant>/`, an ordinary out folder (resumable;
a later full run into it skips the sample), all with the same `[input] sample` and seed, so every
variant sees the same images. Each variant's projection for the whole INPUT comes from
`readers.estimate` on the unsampled INPUT (headers only), with the completion tokens and latency the
sample actually had. The page is `review.write_comparison`'s. Prints nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import JobError
from ..job import Job, load_job
from ..records import RunSummary
from ..sources import input_problem
from ..store import iter_latest_rows
from .estimate import estimate
from .review import Projection, ReviewSummary, Variant, write_comparison

__all__ = ["CompareSettings", "CompareSummary", "DEFAULT_SAMPLE", "PAGE", "plan_variants", "compare"]

log = logging.getLogger(__name__)

DEFAULT_SAMPLE = 20
"""Images per variant when neither `--sample` nor `--limit` is given: a comparison is a try."""

PAGE = "_compare.html"
"""The page, in DIR beside the variants' out folders."""

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")  # a model name may hold "/" or ":"; a folder name may not


@dataclass(frozen=True, slots=True)
class CompareSettings:
    """What `caption compare` runs."""

    input: Path | str  # INPUT, as for `caption run` (a local path, or a URL such as s3://bucket/prefix/)
    jobs: tuple[Path, ...]  # job files, one variant each (times each of `models`)
    out: Path  # DIR: holds DIR/<variant>/ and DIR/_compare.html
    models: tuple[str, ...] = ()  # each job runs once per model; empty: with its own model
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # {"section.field": value}, for every job
    progress: bool | None = None  # the run's progress bar (None: when stderr is a terminal)


@dataclass(frozen=True, slots=True)
class CompareSummary:
    """What a comparison ran and wrote."""

    runs: tuple[tuple[str, RunSummary], ...]  # (variant, its run's summary), in run order
    page: ReviewSummary | None  # None when a run was interrupted (no page)

    @property
    def exit_code(self) -> int:
        """The worst of the runs' exit codes (130 first: an interrupted comparison stops)."""
        codes = [summary.exit_code for _, summary in self.runs]
        return 130 if 130 in codes else max(codes, default=0)


def plan_variants(settings: CompareSettings) -> list[tuple[str, Job]]:
    """(name, job) per variant: each job file's stem, or `stem+model` for each of `models`.

    Every job gets the same overrides (sample and seed among them; DEFAULT_SAMPLE when neither a
    sample nor a limit is given). Raises JobError for a bad job file or two variants of one name.
    """
    overrides = dict(settings.overrides)
    if "input.sample" not in overrides and "input.limit" not in overrides:
        overrides["input.sample"] = DEFAULT_SAMPLE
    variants: list[tuple[str, Job]] = []
    for path in settings.jobs:
        if not settings.models:
            variants.append((_UNSAFE.sub("_", path.stem), load_job(path, overrides)))
        for model in settings.models:
            variants.append((_UNSAFE.sub("_", f"{path.stem}+{model}"),
                             load_job(path, {**overrides, "endpoint.model": model})))
    names = [name for name, _ in variants]
    if len(variants) < 2:
        raise JobError("--jobs: a comparison needs two variants at least (two job files, or --models A,B)")
    if len(set(names)) != len(names):
        raise JobError(f"--jobs: two variants would share a folder name ({', '.join(names)}); rename a job file")
    return variants


def compare(settings: CompareSettings, secrets: Callable[[Job], tuple[str | None, dict[str, str]]]
            ) -> CompareSummary:
    """Run every variant into `settings.out/<name>/`, then write `settings.out/_compare.html`.

    `secrets(job)` gives a job's API key and headers (the CLI's look-up, which registers them for
    redaction). A variant that stops on a fatal error does not stop the others; an interrupt does,
    and leaves no page. Raises JobError before anything is sent for bad jobs or a bad INPUT.
    """
    from ..engine import run  # the driver; imported late, as the CLI does

    variants = plan_variants(settings)
    if (problem := input_problem(settings.input, variants[0][1].input)) is not None:
        raise JobError(f"{settings.input}: {problem}")
    keys = {name: secrets(job) for name, job in variants}  # a missing key fails before anything is sent
    settings.out.mkdir(parents=True, exist_ok=True)
    runs: list[tuple[str, RunSummary]] = []
    for name, job in variants:
        log.info("compare: variant %s (model %s) into %s", name, job.endpoint.model, settings.out / name)
        api_key, headers = keys[name]
        summary = run(job, settings.input, settings.out / name, api_key=api_key, headers=headers,
                      progress=settings.progress)
        runs.append((name, summary))
        if summary.interrupted:
            return CompareSummary(runs=tuple(runs), page=None)
    shown = [Variant(name, settings.out / name, _projection(job, settings.input, settings.out / name))
             for name, job in variants if (settings.out / name).is_dir()]
    page = write_comparison(shown, input_dir=settings.input,  # a folder, one image, a table or shards: thumbnails for each
                            html_path=settings.out / PAGE)
    return CompareSummary(runs=tuple(runs), page=page)


def _projection(job: Job, input_path: Path | str, out: Path) -> Projection:
    """The variant's cost and time for the whole INPUT: the estimate of the unsampled job, with the
    sample's mean completion tokens and median latency where the sample had ok rows."""
    whole = dataclasses.replace(job, input=dataclasses.replace(job.input, sample=None, limit=None))
    completions, latencies = [], []
    for row in iter_latest_rows(out, ["status", "completion_tokens", "latency_ms"]):
        if row["status"] == "ok" and row["completion_tokens"] is not None:
            completions.append(row["completion_tokens"])
        if row["status"] == "ok" and row["latency_ms"]:
            latencies.append(row["latency_ms"] / 1000)
    figures = estimate(whole, input_path, mode=job.endpoint.mode,
                       expected_output_tokens=round(statistics.fmean(completions)) if completions else None,
                       **({"latency_s": statistics.median(latencies)} if latencies else {}))
    return Projection(images=figures.images, cost_usd=figures.cost_usd, time_s=figures.time_s)
