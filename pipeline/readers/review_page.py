"""readers/review_page.py: the static text of the review page: its CSS, its JavaScript, its frame.

No data and no I/O: `review.py` writes the rows between `HEAD` and `TAIL` as one JSON script
element, which the JavaScript reads and renders with `textContent` only (every caption is untrusted
text). The Content-Security-Policy allows exactly these inline style and script texts (CSP Level 3
hash sources: https://www.w3.org/TR/CSP3/#grammardef-hash-source) and nothing else.
"""

from __future__ import annotations

import base64
import hashlib

__all__ = ["GENERATOR", "HEAD", "TAIL"]

GENERATOR = '<meta name="generator" content="caption review">'
"""Marks a page this module wrote, so an existing file by that name is replaced only if it is one."""


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

HEAD = (
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

TAIL = "<script>" + _SCRIPT + "</script>\n</body>\n</html>\n"
