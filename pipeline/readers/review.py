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

import base64
import datetime as dt
import hashlib
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
from ..sources import ImageSource, Item, open_source
from ..store import check_out_folder, iter_latest_rows, open_atomic
from .export import run_input_settings

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

GENERATOR = '<meta name="generator" content="caption review">'
"""Marks a page this module wrote: an existing file without it is never overwritten."""

_ROW_COLUMNS = ["status", "caption", "error_kind", "error", "model", "finish_reason", "prompt_tokens",
                "completion_tokens", "total_tokens", "cached_tokens", "mode", "width", "height"]
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


def write_review(out: Path, *, input_dir: Path | None = None, html_path: Path | None = None,
                 errors_first: bool = False, page_size: int = PAGE_SIZE,
                 prices: cost.PriceTable | None = None) -> ReviewSummary:
    """Write the review page of `out` (by default `out/_review.html`); return what it holds.

    With `input_dir` (the folder `caption run` captioned) each card gets a thumbnail; without it the
    page still works, with no pictures. Raises JobError when `out` is not an out folder, when
    `input_dir` is not a folder, or when `html_path` exists and is not a page this module wrote.
    """
    check_out_folder(out)
    if input_dir is not None and not input_dir.is_dir():
        raise JobError(f"--input {input_dir}: folder not found")
    target = html_path or out / DEFAULT_HTML
    _refuse_foreign_file(target)
    meta = {"title": _title(out), "generated_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "page_size": page_size, "errors_first": errors_first, "thumbnails": input_dir is not None}
    counts = {"images": 0, "ok": 0, "thumbnails": 0}
    rows = iter_latest_rows(out, _ROW_COLUMNS)
    with open_atomic(target, overwrite=True) as handle:
        handle.write(_HEAD.replace("{title}", html.escape(meta["title"])))
        handle.write('<script type="application/json" id="review-data">{"meta":' + _script_json(meta) + ',"rows":[')
        prices = prices if prices is not None else load_prices()
        source = open_source(input_dir, run_input_settings(out)) if input_dir is not None else None
        for number, page_row in enumerate(_page_rows(rows, source, counts, prices)):
            handle.write(("," if number else "") + "\n" + _script_json(page_row))
        handle.write("\n]}</script>\n" + _TAIL)
    log.debug("review page of %d images in %s", counts["images"], target)
    return ReviewSummary(html=target, images=counts["images"], ok=counts["ok"],
                         errors=counts["images"] - counts["ok"], thumbnails=counts["thumbnails"])


def write_comparison(variants: Sequence[Variant], *, input_dir: Path | None = None, html_path: Path | None = None,
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
    if input_dir is not None and not input_dir.is_dir():
        raise JobError(f"--input {input_dir}: folder not found")
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
        handle.write(_HEAD.replace("{title}", html.escape(meta["title"])))
        handle.write('<script type="application/json" id="review-data">{"meta":' + _script_json(meta) + ',"rows":[')
        for number, (path, thumb) in enumerate(_thumbnailed(iter(cells), source, lambda path: path)):
            row = _compared_row(path, cells[path], thumb)
            counts["images"] += 1
            counts["ok"] += row["status"] == "ok"
            counts["thumbnails"] += thumb is not None
            handle.write(("," if number else "") + "\n" + _script_json(row))
        handle.write("\n]}</script>\n" + _TAIL)
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
    """What the row's tokens cost at its model's price in its mode; None when unknown."""
    price = prices.find(row["model"] or "")
    if price is None or row["prompt_tokens"] is None:
        return None
    return cost.cost_usd(price, row["mode"] or "online", row["prompt_tokens"], row["completion_tokens"] or 0,
                         row["cached_tokens"] or 0)


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


def _csp_hash(source: str) -> str:
    """The CSP source expression allowing exactly this inline element's text (CSP Level 3 hash-source)."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii") + "'"


_STYLE = """
:root { --ink: #1d232b; --muted: #5d6875; --line: #d9dee4; --ok: #1e7b45; --err: #b3261e; --bg: #f5f6f8; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       background: var(--bg); }
header { position: sticky; top: 0; z-index: 1; background: #fff; border-bottom: 1px solid var(--line);
         padding: 10px 20px; }
h1 { font-size: 17px; margin: 0 0 2px; }
#summary { color: var(--muted); margin: 0 0 8px; }
.controls { display: flex; flex-wrap: wrap; gap: 8px 14px; align-items: center; }
.controls input[type=search] { width: 260px; padding: 5px 8px; border: 1px solid var(--line); border-radius: 4px; }
.controls select, .controls button { padding: 4px 8px; border: 1px solid var(--line); border-radius: 4px;
                                     background: #fff; }
.controls button:disabled { color: #aaa; }
#count { color: var(--muted); }
main { padding: 16px 20px; }
#grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(380px, 1fr)); gap: 12px; }
.card { display: flex; gap: 12px; background: #fff; border: 1px solid var(--line); border-left: 4px solid var(--ok);
        border-radius: 6px; padding: 10px; min-width: 0; }
.card.error { border-left-color: var(--err); }
.thumb { flex: none; width: 160px; height: 160px; object-fit: contain; background: #eceff2; border-radius: 4px; }
.thumb.none { display: flex; align-items: center; justify-content: center; color: var(--muted); font-size: 12px; }
.body { min-width: 0; flex: 1; }
.body p { margin: 0 0 6px; overflow-wrap: anywhere; white-space: pre-wrap; }
.path { font: 12px/1.3 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; color: var(--muted); }
.meta { display: flex; flex-wrap: wrap; gap: 4px 10px; color: var(--muted); font-size: 12px; }
.badge { font-weight: 600; color: var(--ok); text-transform: uppercase; letter-spacing: .03em; }
.card.error .badge { color: var(--err); }
.flag { color: #8a5a00; }
.err { color: var(--err); }
#grid.compare { grid-template-columns: 1fr; }
.cells { display: grid; grid-template-columns: repeat(auto-fit, minmax(240px, 1fr)); gap: 10px; }
.cell { border-left: 3px solid var(--ok); padding-left: 8px; min-width: 0; }
.cell.error { border-left-color: var(--err); }
.cell h2 { font-size: 13px; margin: 0 0 4px; }
.none { color: var(--muted); }
table.variants { border-collapse: collapse; margin: 0 0 8px; font-size: 12px; }
table.variants th, table.variants td { border: 1px solid var(--line); padding: 2px 6px; text-align: right; }
table.variants td:first-child, table.variants td:nth-child(2) { text-align: left; }
"""

_SCRIPT = r"""
(function () {
  "use strict";
  var blob = JSON.parse(document.getElementById("review-data").textContent);
  var meta = blob.meta, rows = blob.rows;
  function byPath(a, b) { return a.path < b.path ? -1 : a.path > b.path ? 1 : 0; }
  var SORTS = {
    "path": byPath,
    "tokens-desc": function (a, b) { return (b.tokens || 0) - (a.tokens || 0) || byPath(a, b); },
    "tokens-asc": function (a, b) { return (a.tokens || 0) - (b.tokens || 0) || byPath(a, b); },
    "cost-desc": function (a, b) { return (b.usd || 0) - (a.usd || 0) || byPath(a, b); },
    "cost-asc": function (a, b) { return (a.usd || 0) - (b.usd || 0) || byPath(a, b); }
  };
  var STATUSES = ["all", "ok", "error"];
  var state = readState();

  function $(id) { return document.getElementById(id); }
  function num(n) { return n === null || n === undefined ? "?" : Number(n).toLocaleString("en-US"); }
  function usd(n) { return n === null || n === undefined ? "price unknown" : "$" + Number(n).toFixed(n < 0.01 ? 5 : 4); }

  // The view lives in the URL fragment: #status=error&q=cat&sort=tokens-desc&errors=first&page=2&per=50
  function readState() {
    var p = new URLSearchParams(location.hash.replace(/^#/, ""));
    var per = parseInt(p.get("per") || "", 10), errors = p.get("errors");
    return {
      status: STATUSES.indexOf(p.get("status")) >= 0 ? p.get("status") : "all",
      q: p.get("q") || "",
      sort: Object.prototype.hasOwnProperty.call(SORTS, p.get("sort")) ? p.get("sort") : "path",
      errorsFirst: errors === null ? meta.errors_first : errors === "first",
      page: Math.max(1, parseInt(p.get("page") || "1", 10) || 1),
      per: per >= 1 && per <= 1000 ? per : meta.page_size
    };
  }

  function writeState() {
    var p = new URLSearchParams();
    if (state.status !== "all") p.set("status", state.status);
    if (state.q) p.set("q", state.q);
    if (state.sort !== "path") p.set("sort", state.sort);
    if (state.errorsFirst !== meta.errors_first) p.set("errors", state.errorsFirst ? "first" : "mixed");
    if (state.page > 1) p.set("page", String(state.page));
    if (state.per !== meta.page_size) p.set("per", String(state.per));
    try { history.replaceState(null, "", "#" + p.toString()); } catch (e) { /* some file:// setups refuse */ }
  }

  function matches(row, q) {
    if (state.status !== "all" && row.status !== state.status) return false;
    if (!q) return true;
    var texts = [row.path, row.caption, row.kind, row.error];
    (row.cells || []).forEach(function (cell) { if (cell) texts.push(cell.caption, cell.kind, cell.error); });
    return texts.some(function (text) {
      return typeof text === "string" && text.toLowerCase().indexOf(q) !== -1;
    });
  }

  function selected() {
    var q = state.q.toLowerCase();
    var list = rows.filter(function (row) { return matches(row, q); });
    var by = SORTS[state.sort];
    function errorsFirst(a, b) { return (a.status === "ok") - (b.status === "ok") || by(a, b); }
    list.sort(state.errorsFirst ? errorsFirst : by);
    return list;
  }

  // Untrusted text only ever goes through textContent: it is shown, never parsed as markup.
  function el(tag, className, text, field) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (field) node.setAttribute("data-field", field);
    return node;
  }

  function thumb(row) {
    if (typeof row.thumb === "string" && row.thumb.indexOf("data:image/jpeg;base64,") === 0) {
      var img = el("img", "thumb");
      img.alt = "";  // the caption beside it says what the picture shows
      img.decoding = "async";
      img.src = row.thumb;
      return img;
    }
    return el("div", "thumb none", meta.thumbnails ? "no preview" : "");
  }

  function metaLine(row) {
    var line = el("p", "meta");
    line.appendChild(el("span", "badge", row.status, "status"));
    if (row.tokens !== null && row.tokens !== undefined) {
      line.appendChild(el("span", "tokens", num(row.tokens) + " tokens (" + num(row.prompt) + " in, " +
                                            num(row.completion) + " out)", "tokens"));
      line.appendChild(el("span", "cost", usd(row.usd), "cost"));
    }
    return line;
  }

  function seconds(ms) { return ms === null || ms === undefined ? "?" : (ms / 1000).toFixed(2) + " s"; }

  // A comparison: one column per variant, each with its caption, tokens, cost and latency.
  function compareCard(row) {
    var node = el("article", "card compare " + (row.status === "ok" ? "ok" : "error"));
    node.setAttribute("data-path", row.path);
    var body = el("div", "body");
    body.appendChild(el("p", "path", row.path, "path"));
    var columns = el("div", "cells");
    row.cells.forEach(function (cell, i) {
      var column = el("section", "cell" + (cell && cell.status !== "ok" ? " error" : ""));
      column.setAttribute("data-variant", meta.variants[i].name);
      column.appendChild(el("h2", "variant", meta.variants[i].name));
      if (!cell) {
        column.appendChild(el("p", "none", "no row in this out folder", "missing"));
      } else {
        if (cell.caption) column.appendChild(el("p", "caption", cell.caption, "caption"));
        if (cell.status !== "ok") column.appendChild(el("p", "err", (cell.kind ? cell.kind + ": " : "") + (cell.error || ""), "error"));
        var line = metaLine(cell);
        line.appendChild(el("span", "latency", seconds(cell.ms), "latency"));
        if (cell.model) line.appendChild(el("span", "model", cell.model, "model"));
        column.appendChild(line);
      }
      columns.appendChild(column);
    });
    body.appendChild(columns);
    node.appendChild(thumb(row));
    node.appendChild(body);
    return node;
  }

  function variantTable() {
    var table = el("table", "variants");
    var head = el("tr");
    ["variant", "model", "images", "ok", "tokens", "cost", "latency p50", "latency sum",
     "whole INPUT: images", "cost", "time"].forEach(function (h) { head.appendChild(el("th", null, h)); });
    table.appendChild(head);
    meta.variants.forEach(function (v) {
      var tr = el("tr");
      tr.setAttribute("data-variant", v.name);
      var p = v.projection;
      [[v.name, "name"], [v.models.join(", "), "model"], [num(v.images), "images"], [num(v.ok), "ok"],
       [num(v.tokens), "tokens"], [usd(v.usd), "cost"], [seconds(v.ms_median), "latency"],
       [seconds(v.ms_total), "latency-sum"], [p ? num(p.images) : "", "projected-images"],
       [p ? usd(p.usd) : "", "projected-cost"], [p ? duration(p.s) : "", "projected-time"]
      ].forEach(function (pair) { tr.appendChild(el("td", null, pair[0], pair[1])); });
      table.appendChild(tr);
    });
    return table;
  }

  function duration(s) {
    if (s < 90) return Math.round(s) + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    return (s / 3600).toFixed(1) + " h";
  }

  function card(row) {
    if (row.cells) return compareCard(row);
    var ok = row.status === "ok";
    var node = el("article", "card " + (ok ? "ok" : "error"));
    node.setAttribute("data-path", row.path);
    var body = el("div", "body");
    body.appendChild(el("p", "path", row.path, "path"));
    if (row.caption) body.appendChild(el("p", "caption", row.caption, "caption"));
    if (!ok) body.appendChild(el("p", "err", (row.kind ? row.kind + ": " : "") + (row.error || ""), "error"));
    var line = el("p", "meta");
    line.appendChild(el("span", "badge", row.status, "status"));
    if (row.tokens !== null && row.tokens !== undefined) {
      line.appendChild(el("span", "tokens", num(row.tokens) + " tokens (" + num(row.prompt) + " in, " +
                                            num(row.completion) + " out)", "tokens"));
      line.appendChild(el("span", "cost", usd(row.usd), "cost"));
    }
    if (row.w && row.h) line.appendChild(el("span", "size", row.w + "×" + row.h));
    if (row.model) line.appendChild(el("span", "model", row.model, "model"));
    if (row.finish && row.finish !== "stop") line.appendChild(el("span", "flag", "finish: " + row.finish, "finish"));
    body.appendChild(line);
    node.appendChild(thumb(row));
    node.appendChild(body);
    return node;
  }

  function summary() {
    if (meta.variants) {
      var same = rows.filter(function (row) { return row.status === "ok"; }).length;
      return num(rows.length) + " images · " + meta.variants.length + " variants · " + num(same) +
             " ok in every variant · made " + meta.generated_at;
    }
    var ok = 0, tokens = 0, dollars = 0, models = {};
    rows.forEach(function (row) {
      if (row.status === "ok") ok += 1;
      tokens += row.tokens || 0;
      dollars += row.usd || 0;
      if (row.model) models[row.model] = true;
    });
    var names = Object.keys(models).sort();
    function count(n, noun) { return num(n) + " " + noun + (n === 1 ? "" : "s"); }
    return count(rows.length, "image") + " · " + num(ok) + " ok · " + count(rows.length - ok, "error") + " · " +
           count(tokens, "token") + " · " + usd(dollars) + (names.length ? " · " + names.join(", ") : "") + " · made " + meta.generated_at;
  }

  function syncControls() {
    $("status").value = state.status;
    if ($("q").value !== state.q) $("q").value = state.q;
    $("sort").value = state.sort;
    $("errors-first").checked = state.errorsFirst;
  }

  function render() {
    var list = selected();
    var pages = Math.max(1, Math.ceil(list.length / state.per));
    state.page = Math.min(state.page, pages);
    var start = (state.page - 1) * state.per;
    var cards = list.slice(start, start + state.per).map(card);
    var grid = $("grid");
    grid.replaceChildren.apply(grid, cards);
    $("count").textContent = list.length
      ? "Showing " + num(start + 1) + "–" + num(start + cards.length) + " of " + num(list.length) +
        (list.length !== rows.length ? " matching" : "")
      : "No image matches";
    $("page").textContent = "page " + state.page + " of " + pages;
    $("prev").disabled = state.page <= 1;
    $("next").disabled = state.page >= pages;
    syncControls();
    writeState();
  }

  function on(id, event, change) {
    $(id).addEventListener(event, function (e) { change(e.target); render(); window.scrollTo(0, 0); });
  }
  on("status", "change", function (t) { state.status = t.value; state.page = 1; });
  on("q", "input", function (t) { state.q = t.value; state.page = 1; });
  on("sort", "change", function (t) { state.sort = t.value; state.page = 1; });
  on("errors-first", "change", function (t) { state.errorsFirst = t.checked; state.page = 1; });
  on("prev", "click", function () { state.page -= 1; });
  on("next", "click", function () { state.page += 1; });
  window.addEventListener("hashchange", function () { state = readState(); render(); });

  $("summary").textContent = summary();
  if (meta.variants) { $("variants").appendChild(variantTable()); $("grid").className = "compare"; }
  render();
})();
"""

_HEAD = (
    "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
    + GENERATOR + "\n"
    + '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; style-src '
    + _csp_hash(_STYLE) + "; script-src " + _csp_hash(_SCRIPT) + "; base-uri 'none'; form-action 'none'\">\n"
    + '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
    + "<title>{title}</title>\n<style>" + _STYLE + "</style>\n</head>\n<body>\n"
    + "<header>\n<h1>{title}</h1>\n<p id=\"summary\"></p>\n<div id=\"variants\"></div>\n<div class=\"controls\">\n"
    + '<label>Status <select id="status"><option value="all">all</option><option value="ok">ok</option>'
    + '<option value="error">error</option></select></label>\n'
    + '<input id="q" type="search" placeholder="Search path, caption, error" aria-label="Search">\n'
    + '<label>Sort <select id="sort"><option value="path">path</option>'
    + '<option value="tokens-desc">tokens, most first</option>'
    + '<option value="tokens-asc">tokens, fewest first</option>'
    + '<option value="cost-desc">cost, most first</option>'
    + '<option value="cost-asc">cost, least first</option></select></label>\n'
    + '<label><input id="errors-first" type="checkbox"> errors first</label>\n'
    + '<button id="prev" type="button">‹ prev</button><span id="page"></span>'
    + '<button id="next" type="button">next ›</button>\n<span id="count"></span>\n'
    + "</div>\n</header>\n<main>\n<noscript>This page lists the captions with JavaScript; it is off.</noscript>\n"
    + "<div id=\"grid\"></div>\n</main>\n"
)

_TAIL = "<script>" + _SCRIPT + "</script>\n</body>\n</html>\n"
