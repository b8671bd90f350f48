"""readers/review.py: one self-contained HTML page to check an out folder's captions by eye.

A reader beside `export`: it reads the out folder's latest row per image (through the store's
readers), makes small JPEG thumbnails with `images.encode_image` when it is given the image folder,
and writes one static file. No server, no CDN, no request leaves the page: the CSS and JS are inline,
thumbnails are data URLs, and a Content-Security-Policy forbids anything else (`default-src 'none'`).

Every caption, path and error message is untrusted text (a model can answer with markup). The rows
travel as one JSON blob in `<script type="application/json">`, with `<`, `>` and `&` escaped as
`\\u003c` etc. so that no text can close the script element, and the page's JS builds every node with
`textContent`, never `innerHTML`. The CSP allows only the page's own script (by hash), so an inline
event handler could not run even if markup slipped through.

Scale: the JS renders one page of cards (100 by default) at a time; filtering, searching and sorting
10,000 rows is array work in the browser. Python streams the rows into the file in batches, so
memory holds one batch of thumbnails, not the folder's.

The page state lives in the URL fragment, so a view can be bookmarked and tests can drive it without
clicks: `_review.html#status=error&q=cat&sort=tokens-desc&errors=first&page=2&per=50`.

Several out folders (`write_comparison`: `caption review A B`, `caption compare`) make the same page
with one card per image and a column per folder (a variant: caption, tokens, cost, latency), a table
of each variant's totals and, when given, its projected cost and time for the whole INPUT. Their rows
are joined by key in memory (a comparison is of samples: memory grows with images x variants).
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
import os
import stat
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from .. import cost
from ..cost import load_prices
from ..errors import BadImageError, JobError
from ..images import encode_image
from ..job import ImageSettings
from ..sources import ImageSource, Item, input_problem, open_source
from ..store import check_out_folder, iter_latest_rows, open_atomic
from .inputs import run_input_settings
from .review_page import GENERATOR, HEAD, TAIL

__all__ = ["ReviewSummary", "Projection", "Variant", "write_review", "write_comparison", "DEFAULT_HTML",
           "COMPARE_HTML", "PAGE_SIZE"]

log = logging.getLogger(__name__)

DEFAULT_HTML = "_review.html"
"""Written into the out folder by default; the leading underscore keeps pyarrow, pandas, DuckDB and
polars from taking it for a data file when they read the folder."""

COMPARE_HTML = "_compare.html"
"""A comparison page's default name, in the first out folder (beside its `_review.html`)."""

PAGE_SIZE = 100
"""Cards rendered at once. 100 cards with their thumbnails render in a few milliseconds."""

THUMB_SIDE_PX = 160
THUMB_QUALITY = 70
"""Thumbnail size. Measured with 10,000 copies of the sample photos on 2 cores: 5.5 kB a card with its
base64 thumbnail, a 55 MB page written in 14 s; headless Chromium opens it at any page in about 2 s
(only the shown page's images are decoded)."""

THUMB_BATCH = 64
"""Images thumbnailed (in a thread pool; Pillow releases the GIL) before their rows are written."""

_ROW_COLUMNS = ["status", "caption", "error_kind", "error", "model", "finish_reason", "prompt_tokens",
                "completion_tokens", "total_tokens", "cached_tokens", "mode", "width", "height",
                "cache_write_tokens", "service_tier"]
_CELL_COLUMNS = [*_ROW_COLUMNS, "latency_ms"]
_THUMB_SETTINGS = ImageSettings(max_side=THUMB_SIDE_PX, format="jpeg", quality=THUMB_QUALITY)


@dataclass(frozen=True, slots=True)
class ReviewSummary:
    """What a review page holds."""

    html: Path  # the page written
    images: int  # one card each
    ok: int
    errors: int
    thumbnails: int  # images shown with a thumbnail


@dataclass(frozen=True, slots=True)
class Projection:
    """What a variant would cost and take for the whole INPUT (from `readers.estimate`)."""

    images: int  # images under INPUT
    cost_usd: float | None  # None: the model has no price
    time_s: float  # at the job's limits and the estimate's latency


@dataclass(frozen=True, slots=True)
class Variant:
    """One out folder of a comparison page."""

    name: str  # the column's heading
    out: Path
    projection: Projection | None = None


def write_review(out: Path, *, input_dir: Path | str | None = None, html_path: Path | None = None,
                 errors_first: bool = False, page_size: int = PAGE_SIZE,
                 prices: cost.PriceTable | None = None) -> ReviewSummary:
    """Write the review page of `out` (by default `out/_review.html`); return what it holds.

    With `input_dir` (the folder `caption run` captioned) each card gets a thumbnail; without it the
    page still works, with no pictures. Raises JobError when `out` is not an out folder, when
    `input_dir` is not a folder, or when `html_path` exists and is not a page this module wrote.
    """
    check_out_folder(out)
    if input_dir is not None and (problem := input_problem(input_dir, run_input_settings(out), folder=True)):
        raise JobError(f"--input {input_dir}: {problem}")
    target = html_path or out / DEFAULT_HTML
    _refuse_foreign_file(target)
    meta = {"title": _title(out), "generated_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "page_size": page_size, "errors_first": errors_first, "thumbnails": input_dir is not None}
    counts = {"images": 0, "ok": 0, "thumbnails": 0}
    rows = iter_latest_rows(out, _ROW_COLUMNS)
    with open_atomic(target, overwrite=True) as handle:
        handle.write(HEAD.replace("{title}", html.escape(meta["title"])))
        handle.write('<script type="application/json" id="review-data">{"meta":' + _script_json(meta) + ',"rows":[')
        prices = prices if prices is not None else load_prices()
        source = open_source(input_dir, run_input_settings(out)) if input_dir is not None else None
        for number, page_row in enumerate(_page_rows(rows, source, counts, prices)):
            handle.write(("," if number else "") + "\n" + _script_json(page_row))
        handle.write("\n]}</script>\n" + TAIL)
    log.debug("review page of %d images in %s", counts["images"], target)
    return ReviewSummary(html=target, images=counts["images"], ok=counts["ok"],
                         errors=counts["images"] - counts["ok"], thumbnails=counts["thumbnails"])


def write_comparison(variants: Sequence[Variant], *, input_dir: Path | str | None = None, html_path: Path | None = None,
                     errors_first: bool = False, page_size: int = PAGE_SIZE,
                     prices: cost.PriceTable | None = None) -> ReviewSummary:
    """Write one page showing several out folders side by side (by default `<first>/_compare.html`).

    Each image gets one card with a column per variant (its latest row there, or nothing when that
    folder has none); the header has each variant's totals and projection. Raises JobError as
    `write_review` does, and when two variants share a name.
    """
    names = [variant.name for variant in variants]
    if len(set(names)) != len(names):
        raise JobError(f"two out folders of the comparison have the same name: {', '.join(names)}")
    for variant in variants:
        check_out_folder(variant.out)
    if input_dir is not None and (problem := input_problem(input_dir, run_input_settings(variants[0].out),
                                                            folder=True)):
        raise JobError(f"--input {input_dir}: {problem}")
    target = html_path or variants[0].out / COMPARE_HTML
    _refuse_foreign_file(target)
    prices = prices if prices is not None else load_prices()
    cells = _joined_cells(variants, prices)
    meta = {"title": "caption compare: " + ", ".join(names),
            "generated_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "page_size": page_size, "errors_first": errors_first, "thumbnails": input_dir is not None,
            "variants": [_variant_totals(variant, i, cells) for i, variant in enumerate(variants)]}
    source = open_source(input_dir, run_input_settings(variants[0].out)) if input_dir is not None else None
    counts = {"images": 0, "ok": 0, "thumbnails": 0}
    with open_atomic(target, overwrite=True) as handle:
        handle.write(HEAD.replace("{title}", html.escape(meta["title"])))
        handle.write('<script type="application/json" id="review-data">{"meta":' + _script_json(meta) + ',"rows":[')
        for number, (path, thumb) in enumerate(_thumbnailed(iter(cells), source, lambda path: path)):
            row = _compared_row(path, cells[path], thumb)
            counts["images"] += 1
            counts["ok"] += row["status"] == "ok"
            counts["thumbnails"] += thumb is not None
            handle.write(("," if number else "") + "\n" + _script_json(row))
        handle.write("\n]}</script>\n" + TAIL)
    return ReviewSummary(html=target, images=counts["images"], ok=counts["ok"],
                         errors=counts["images"] - counts["ok"], thumbnails=counts["thumbnails"])


def _joined_cells(variants: Sequence[Variant], prices: cost.PriceTable) -> dict[str, list[dict | None]]:
    """Key → one cell per variant (None where that out folder has no row for it), in first-seen order."""
    cells: dict[str, list[dict | None]] = {}
    for i, variant in enumerate(variants):
        for row in iter_latest_rows(variant.out, _CELL_COLUMNS):
            cell = _page_row(row, None, _row_cost(row, prices))
            del cell["path"], cell["thumb"]
            cell["ms"] = row["latency_ms"]
            cells.setdefault(row["image_path"], [None] * len(variants))[i] = cell
    return cells


def _compared_row(path: str, cells: list[dict | None], thumb: str | None) -> dict[str, Any]:
    """The page's object for one image of a comparison: ok only when every variant's row is ok."""
    present = [cell for cell in cells if cell is not None]
    return {"path": path, "thumb": thumb, "cells": cells,
            "status": "ok" if None not in cells and all(cell["status"] == "ok" for cell in present) else "error",
            "tokens": sum(cell["tokens"] or 0 for cell in present),
            "usd": sum(cell["usd"] or 0 for cell in present)}


def _variant_totals(variant: Variant, index: int, cells: dict[str, list[dict | None]]) -> dict[str, Any]:
    """One variant's heading and totals for the page: images, ok, tokens, cost, latency, projection."""
    mine = [row[index] for row in cells.values() if row[index] is not None]
    latencies = sorted(cell["ms"] for cell in mine if cell["ms"] is not None)
    priced = [cell["usd"] for cell in mine if cell["tokens"] is not None]
    projection = variant.projection
    return {"name": variant.name, "out": str(variant.out), "images": len(mine),
            "ok": sum(cell["status"] == "ok" for cell in mine),
            "models": sorted({cell["model"] for cell in mine if cell["model"]}),
            "tokens": sum(cell["tokens"] or 0 for cell in mine),
            "prompt": sum(cell["prompt"] or 0 for cell in mine),
            "completion": sum(cell["completion"] or 0 for cell in mine),
            "usd": None if any(usd is None for usd in priced) else sum(priced),
            "ms_median": latencies[len(latencies) // 2] if latencies else None,
            "ms_total": sum(latencies),
            "projection": None if projection is None else {"images": projection.images,
                                                           "usd": projection.cost_usd, "s": projection.time_s}}


def _page_rows(rows: Iterator[dict[str, Any]], source: ImageSource | None, counts: dict[str, int],
               prices: cost.PriceTable) -> Iterator[dict]:
    """Yield the page's row objects, thumbnailing THUMB_BATCH images at a time in a thread pool."""
    for row, thumb in _thumbnailed(rows, source, lambda row: row["image_path"]):
        counts["images"] += 1
        counts["ok"] += row["status"] == "ok"
        counts["thumbnails"] += thumb is not None
        yield _page_row(row, thumb, _row_cost(row, prices))


def _thumbnailed(rows: Iterator[Any], source: ImageSource | None, key) -> Iterator[tuple[Any, str | None]]:
    """Each row with its image's thumbnail (or None), THUMB_BATCH images at a time in a thread pool."""
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="thumb") as pool:
        while batch := list(islice(rows, THUMB_BATCH)):
            items = [source.open_by_key(key(row)) if source else None for row in batch]
            yield from zip(batch, pool.map(_thumbnail, items), strict=True)


def _page_row(row: dict[str, Any], thumb: str | None, usd: float | None) -> dict[str, Any]:
    """The object the page's JS reads for one image (short keys: 10,000 of them go in the file)."""
    return {"path": row["image_path"], "status": row["status"], "caption": row["caption"],
            "kind": row["error_kind"], "error": row["error"], "model": row["model"],
            "finish": row["finish_reason"], "tokens": row["total_tokens"], "prompt": row["prompt_tokens"],
            "completion": row["completion_tokens"], "usd": usd, "w": row["width"], "h": row["height"],
            "thumb": thumb}


def _row_cost(row: dict[str, Any], prices: cost.PriceTable) -> float | None:
    """What the row's tokens cost at its model's price in its mode (flex for a flex answer, as report
    prices it); None when unknown."""
    price = prices.find(row["model"] or "")
    if price is None or row["prompt_tokens"] is None:
        return None
    return cost.cost_usd(price, cost.price_mode(row["mode"], row["service_tier"]), row["prompt_tokens"],
                         row["completion_tokens"] or 0, row["cached_tokens"] or 0, row["cache_write_tokens"] or 0)


def _thumbnail(item: Item | None) -> str | None:
    """A small upright JPEG of the image as a data URL, or None when it cannot be read (or its key
    cannot name an image of the input: no picture rather than a read elsewhere)."""
    if item is None:
        return None
    try:
        return encode_image(item.read(), _THUMB_SETTINGS).data_url()
    except (OSError, ValueError, BadImageError) as err:  # ValueError: a path Python refuses to pass on
        log.debug("no thumbnail for %s: %s", item.key, err)
        return None


def _script_json(value: Any) -> str:
    """JSON that is safe inside a <script> element: `<`, `>` and `&` written as \\u escapes.

    The HTML tokenizer ends a script element at the first `</script` and treats `<!--` specially
    (https://html.spec.whatwg.org/multipage/scripting.html#restrictions-for-contents-of-script-elements);
    with no `<` left in the text neither can occur, and JSON.parse turns the escapes back.
    """
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _title(out: Path) -> str:
    return f"caption review: {out.resolve().name}"


def _refuse_foreign_file(target: Path) -> None:
    """JobError unless `target` is absent or a page this module wrote. A link, FIFO or device is
    refused from its `lstat` alone: it is never opened, and never written through."""
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        kind = "a link" if stat.S_ISLNK(mode) else "not a regular file"
        raise JobError(f"{target}: exists and is {kind}; choose another --html")
    with open(target, "rb") as handle:
        head = handle.read(4096)
    if GENERATOR.encode("utf-8") not in head:
        raise JobError(f"{target}: exists and is not a page `caption review` wrote; choose another --html")
