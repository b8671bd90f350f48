"""readers/card.py: the Hugging Face dataset card (README.md) that `caption export --to hf` writes beside metadata.jsonl.

A reader: it turns what an out folder holds (its `_job.json` and `caption report`'s figures, taken
from `readers.report.report` so that the two agree by construction) into Markdown text, and says
whether a README.md already there is a card it wrote untouched. It writes nothing itself; the
export does, atomically, through the store's `open_atomic`.

The card follows https://huggingface.co/docs/hub/datasets-cards: a YAML metadata block between
`---` lines (`license`, `task_categories`, `size_categories`; the field names and values as in
https://github.com/huggingface/hub-docs/blob/main/datasetcard.md), then Markdown. Its last line is
a marker holding the SHA-256 of everything above it, so a card the user edited (or a README.md
that was never ours) is told apart from one this tool wrote and may refresh.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from .. import __version__, cost
from ..store import JOB_FILE
from .report import Report

__all__ = ["CARD_FILE", "render_card", "is_own_card", "size_category"]

CARD_FILE = "README.md"
"""The dataset card's file name: the Hub renders a repository's README.md as its card."""

LICENSE_PLACEHOLDER = "unknown"
"""The Hub's identifier for "not specified" (https://huggingface.co/docs/hub/repositories-licenses);
the card tells the user to replace it with the license of the images and captions."""

SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))
"""(upper bound, the Hub's size_categories value), from the Hub's dataset-card metadata spec."""

_MARKER = "<!-- written by caption {version}; sha256 of the text above: {digest}. Edit freely: an edited card " \
          "is never overwritten without --overwrite. -->"
_MARKER_RE = re.compile(r"(?m)^<!-- written by caption [^;]*; sha256 of the text above: ([0-9a-f]{64})\.[^\n]*-->\n?\Z")


def size_category(examples: int) -> str:
    """The Hub's `size_categories` bucket for a dataset of `examples` rows."""
    for bound, name in SIZE_CATEGORIES:
        if examples < bound:
            return name
    return "n>1B"


def is_own_card(text: str) -> bool:
    """True when `text` is a card this tool wrote and nobody changed since (its marker's hash matches)."""
    found = _MARKER_RE.search(text)
    return found is not None and _digest(text[:found.start()]) == found.group(1)


def render_card(out: Path, rep: Report, exported: int, models: dict[str, int]) -> str:
    """The card's full text for the export of `out`: `rep` is `report(out)`, `exported` the images in
    metadata.jsonl, `models` the latest ok rows per `model` value (as the server named it)."""
    job = _job(out)
    body = "\n".join([
        "---",
        f"license: {LICENSE_PLACEHOLDER}  # FILL IN: the license of these images and captions, e.g. cc-by-4.0",
        "task_categories:",
        "- image-to-text",
        "size_categories:",
        f"- {size_category(exported)}",
        "tags:",
        "- image-captioning",
        "---",
        "",
        f"# {Path(out).resolve().name}",
        "",
        f"{exported:,} images with captions written by a vision-language model through "
        f"caption {__version__}, in the Hugging Face ImageFolder layout: "
        "`metadata.jsonl` holds each image's `file_name` and its caption as `text`.",
        "",
        'Load it with `datasets.load_dataset("imagefolder", data_dir=...)`. **Before sharing it, replace the '
        "`license` above** with the license of the images and of the captions (the model provider's terms may apply).",
        "",
        *_provenance(job, models, rep),
        "",
        *_figures(rep),
    ])
    body += "\n"
    return body + _MARKER.format(version=__version__, digest=_digest(body)) + "\n"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _job(out: Path) -> dict[str, Any]:
    try:
        job = json.loads((Path(out) / JOB_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return job if isinstance(job, dict) else {}


def _provenance(job: dict[str, Any], models: dict[str, int], rep: Report) -> list[str]:
    prompt = job.get("prompt") or {}
    generation = {k: prompt.get(k) for k in ("max_tokens", "temperature", "reasoning_effort", "language")}
    generation = {k: v for k, v in generation.items() if v is not None}
    generation.update((job.get("request") or {}).get("extra") or {})
    structured = (job.get("structured") or {}).get("format", "text")
    first, last = rep.throughput.first, rep.throughput.last
    fingerprints = job.get("fingerprints") or [job.get("fingerprint")]
    lines = [
        "## How the captions were made",
        "",
        "- Caption model(s), as the server named them: "
        + (", ".join(f"`{m}` ({n:,} captions)" for m, n in models.items()) or "none"),
        f"- Model asked for: `{(job.get('endpoint') or {}).get('model')}` "
        f"(mode {(job.get('endpoint') or {}).get('mode', 'online')})",
        f"- System prompt:{_quoted(prompt.get('system'))}",
        f"- User prompt:{_quoted(prompt.get('user'))}",
        f"- Generation parameters: `{json.dumps(generation, sort_keys=True)}`"
        + (f"; answers as `{structured}`" if structured != "text" else ""),
        f"- Image settings: `{json.dumps(job.get('image') or {}, sort_keys=True)}`",
        f"- Job fingerprint: {', '.join(f'`{f}`' for f in fingerprints if f)}",
        f"- Run dates (UTC, to the minute): {_date(first)} to {_date(last)}",
        f"- Tool: caption {__version__}",
    ]
    return lines


def _quoted(text: str | None) -> str:
    if not text:
        return " none"
    return "\n" + "\n".join(f"  > {line}" for line in str(text).splitlines())


def _date(value: dt.datetime | None) -> str:
    return "unknown" if value is None else value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


def _figures(rep: Report) -> list[str]:
    """The figures of `caption report OUT`, one per table row (the same numbers it prints)."""
    rows = [("rows (ended attempts)", f"{rep.rows:,}"), ("images", f"{rep.images:,}")]
    rows += [(f"images whose latest row is {name}", f"{n:,}") for name, n in rep.image_outcomes.items()]
    rows += [(f"rows with status {name}", f"{n:,}") for name, n in rep.status_rows.items()]
    rows += [(f"error rows of kind {name}", f"{n:,}") for name, n in rep.error_kind_rows.items()]
    rows += [("prompt tokens", f"{rep.prompt_tokens:,}"), ("cached prompt tokens", f"{rep.cached_tokens:,}"),
             ("completion tokens", f"{rep.completion_tokens:,}"), ("reasoning tokens", f"{rep.reasoning_tokens:,}"),
             ("total tokens", f"{rep.total_tokens:,}"),
             ("cost (USD, each row at its own mode's prices)", cost.format_usd(rep.cost_usd))]
    if rep.unpriced_models:
        rows.append(("models without a price (not in the cost)", ", ".join(rep.unpriced_models)))
    return [
        "## Figures",
        "",
        "As `caption report` gives them for the out folder (every ended attempt counts; bundled list prices).",
        "",
        "| figure | value |",
        "| --- | --- |",
        *(f"| {name} | {value} |" for name, value in rows),
    ]
