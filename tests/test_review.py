"""`caption review`: the static page, loaded in a real headless Chromium, against out folders `caption run` wrote.

Chromium runs the page's JS and dumps the DOM it built (`--dump-dom`), which html.parser reads back:
no Python browser driver is needed, because the page's view (filter, search, sort, page) is set by
the URL fragment rather than by clicks. Debian's `chromium` package provides the browser. Without
it the browser tests skip with a one-line reason, so the README's test command passes on a fresh
machine; `.ci/run` installs it and sets CAPTION_REQUIRE_BROWSER=1, which turns that skip into a
failure, so CI can never pass without running them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from conftest import append_rows, copy_samples, latest_rows, result_for
from pipeline.readers.review import write_review

IMAGES = ["coffee_cup.jpg", "chelsea_the_cat.jpg", "horse_silhouette_1bit.png", "hubble_deep_field.jpg", "corrupt.jpg"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
HOSTILE_NAME = "<img src=x onerror=\"document.title='pwned'\">.png"  # a legal file name on Linux
HOSTILE_CAPTION = "<img src=x onerror=\"document.title='pwned'\">"
HOSTILE_SCRIPT = "</script><script>document.title='pwned'</script><!-- & \u2028"
HOSTILE_ERROR = "<b>bold</b><svg onload=\"document.title='pwned'\"></svg>"


# --- the browser -----------------------------------------------------------------------------


REQUIRE_BROWSER = "CAPTION_REQUIRE_BROWSER"
"""Set to 1 (as `.ci/run` does) and a missing Chromium fails these tests instead of skipping them."""


@pytest.fixture(scope="session")
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    reason = "no headless Chromium on PATH (apt-get install chromium; .ci/run installs it)"
    if os.environ.get(REQUIRE_BROWSER) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_BROWSER}=1 makes the browser tests mandatory")
    pytest.skip(reason)


def _chromium(chromium: str, tmp_path: Path, *args: str) -> str:
    profile = tmp_path / "chromium-profile"
    done = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class _Page(HTMLParser):
    """The parts of a dumped DOM the tests look at: title, every element's attributes, and the cards."""

    def __init__(self, dom: str):
        super().__init__(convert_charrefs=True)
        self.title = ""
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.cards: list[dict[str, str]] = []
        self.texts: dict[str, str] = {}  # text of elements with an id
        self._open: list[tuple[str, str | None, str | None]] = []  # (tag, data-field, id)
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        attributes = {k: v or "" for k, v in attrs}
        self.elements.append((tag, attributes))
        if tag == "article":
            self.cards.append({"@path": attributes.get("data-path", ""), "@class": attributes.get("class", "")})
        if tag == "img" and self._open and self.cards:
            self.cards[-1]["thumb"] = attributes.get("src", "")
        if tag not in ("img", "input", "meta", "br"):
            self._open.append((tag, attributes.get("data-field"), attributes.get("id")))

    def handle_endtag(self, tag):
        while self._open and self._open.pop()[0] != tag:
            pass

    def handle_data(self, data):
        for tag, field, element_id in self._open:
            if tag == "title":
                self.title += data
            if field and self.cards:
                self.cards[-1][field] = self.cards[-1].get(field, "") + data
            if element_id:
                self.texts[element_id] = self.texts.get(element_id, "") + data


def _render(chromium: str, page: Path, tmp_path: Path, fragment: str = "") -> _Page:
    url = page.resolve().as_uri() + ("#" + fragment if fragment else "")
    return _Page(_chromium(chromium, tmp_path, "--dump-dom", url))


# --- out folders -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reviewed(local_server, tmp_path_factory, caption_run) -> tuple[Path, Path, Path]:
    """One real run over five images (one corrupt) and its review page with thumbnails: (in, out, page)."""
    local_server.reset()
    root = tmp_path_factory.mktemp("reviewed")
    folder = copy_samples(root / "in", IMAGES)
    assert caption_run(local_server, folder, root / "out") == 1
    summary = write_review(root / "out", input_dir=folder)
    assert (summary.images, summary.ok, summary.errors, summary.thumbnails) == (5, 4, 1, 4)
    return folder, root / "out", summary.html


# --- the page --------------------------------------------------------------------------------


def test_rendered_cards_match_the_parquet(chromium, reviewed, tmp_path):
    _, out, page = reviewed
    rendered = _render(chromium, page, tmp_path)
    latest = latest_rows(out)
    assert [c["@path"] for c in rendered.cards] == sorted(latest)
    for card in rendered.cards:
        row = latest[card["@path"]]
        assert card["status"] == row["status"]
        if row["status"] == "ok":
            assert card["caption"] == row["caption"]
            assert int(card["tokens"].split()[0].replace(",", "")) == row["total_tokens"]
            assert card["thumb"].startswith("data:image/jpeg;base64,")
        else:
            assert "caption" not in card and "thumb" not in card and "error" in card["@class"]
            assert card["error"] == f"{row['error_kind']}: {row['error']}"
    assert rendered.texts["count"] == "Showing 1–5 of 5"
    assert rendered.texts["summary"].startswith("5 images · 4 ok · 1 error · ")


def test_page_fetches_nothing(reviewed):
    _, _, page = reviewed
    raw = _Page(page.read_text(encoding="utf-8"))  # the file as written, before any script ran
    csp = next(a["content"] for t, a in raw.elements if a.get("http-equiv") == "Content-Security-Policy")
    assert csp.startswith("default-src 'none'; img-src data:;")
    links = [(t, k, v) for t, a in raw.elements for k, v in a.items() if k in ("src", "href", "action", "srcset")]
    assert links == []  # no external script, stylesheet, font or image: the thumbnails are made by the JS
    assert [t for t, _ in raw.elements if t in ("link", "iframe", "object", "embed", "base")] == []


@pytest.mark.parametrize(
    "fragment, expect",
    [
        ("", lambda rows: sorted(rows)),
        ("status=error", lambda rows: ["corrupt.jpg"]),
        ("status=ok&sort=tokens-desc",
         lambda rows: sorted((p for p, r in rows.items() if r["status"] == "ok"),
                             key=lambda p: (-rows[p]["total_tokens"], p))),
        ("sort=tokens-asc&errors=first",
         lambda rows: ["corrupt.jpg"] + sorted((p for p, r in rows.items() if r["status"] == "ok"),
                                               key=lambda p: (rows[p]["total_tokens"], p))),
        ("q=BRIGHT", lambda rows: sorted(p for p, r in rows.items() if "bright" in (r["caption"] or "").lower())),
        ("q=truncated", lambda rows: ["corrupt.jpg"]),
        ("q=no-such-thing", lambda rows: []),
        ("per=2&page=2", lambda rows: sorted(rows)[2:4]),
        ("per=2&page=99", lambda rows: sorted(rows)[4:]),
    ],
    ids=["default", "status", "ok-by-tokens", "errors-first", "search-caption", "search-error", "no-match",
         "page-2", "page-past-end"],
)
def test_fragment_filters_searches_sorts_and_pages(chromium, reviewed, tmp_path, fragment, expect):
    _, out, page = reviewed
    rendered = _render(chromium, page, tmp_path, fragment)
    expected = expect(latest_rows(out))
    assert [c["@path"] for c in rendered.cards] == expected
    if not expected:
        assert rendered.texts["count"] == "No image matches"


def test_errors_first_flag_sets_the_default_order(chromium, reviewed, tmp_path, cli):
    folder, out, _ = reviewed
    page = tmp_path / "review.html"
    code, stdout, _ = cli("review", out, "--input", folder, "--html", page, "--errors-first")
    assert code == 0
    assert f"review page of 5 images (4 ok, 1 error, 4 thumbnails) in {page}" in stdout
    paths = [c["@path"] for c in _render(chromium, page, tmp_path).cards]
    assert paths[0] == "corrupt.jpg" and paths[1:] == sorted(paths[1:])
    mixed = [c["@path"] for c in _render(chromium, page, tmp_path, "errors=mixed").cards]
    assert mixed == sorted(paths)


def test_untrusted_text_is_shown_as_text_never_markup(chromium, server, tmp_path, caption_run):
    folder = copy_samples(tmp_path / "in", {HOSTILE_NAME: "chelsea_the_cat.jpg", "cup.jpg": "coffee_cup.jpg",
                                            "wall.jpg": "brick_wall_grey.jpg"})
    out = tmp_path / "out"
    assert caption_run(server, folder, out) == 0
    append_rows(out, result_for(out, "cup.jpg", caption=HOSTILE_CAPTION, total_tokens=3),
                 result_for(out, "wall.jpg", caption=HOSTILE_SCRIPT, total_tokens=2),
                 result_for(out, "gone.jpg", status="error", error_kind="bad_request", error=HOSTILE_ERROR))
    page = write_review(out, input_dir=folder).html
    rendered = _render(chromium, page, tmp_path)
    assert rendered.title == "caption review: out"  # no handler ran
    cards = {c["@path"]: c for c in rendered.cards}
    assert sorted(cards) == sorted([HOSTILE_NAME, "cup.jpg", "wall.jpg", "gone.jpg"])
    assert cards["cup.jpg"]["caption"] == HOSTILE_CAPTION
    assert cards["wall.jpg"]["caption"] == HOSTILE_SCRIPT
    assert cards["gone.jpg"]["error"] == "bad_request: " + HOSTILE_ERROR
    assert cards[HOSTILE_NAME]["path"] == HOSTILE_NAME
    assert [t for t, _ in rendered.elements if t in ("b", "svg", "script")] == ["script", "script"]
    assert not [a for _, a in rendered.elements if {"onerror", "onload"} & set(a)]
    assert all(a["src"].startswith("data:image/jpeg;base64,") for t, a in rendered.elements if t == "img")
    assert len([t for t, _ in rendered.elements if t == "img"]) == 3  # the three thumbnails, nothing more


def test_page_without_input_has_no_thumbnails_but_works(chromium, reviewed, tmp_path):
    _, out, _ = reviewed
    page = write_review(out, html_path=tmp_path / "plain.html").html
    rendered = _render(chromium, page, tmp_path, "status=ok")
    assert len(rendered.cards) == 4 and not any("thumb" in c for c in rendered.cards)
    assert all(c["caption"] for c in rendered.cards)


def test_ten_thousand_images_render_one_page_at_a_time(chromium, reviewed, tmp_path):
    _, out, _ = reviewed
    big = tmp_path / "big"
    shutil.copytree(out, big)
    rows = [result_for(big, f"photos/{i:05d}.jpg", caption=f"photo number {i}", total_tokens=100 + i % 997,
                    prompt_tokens=90, completion_tokens=10 + i % 997) for i in range(10_000)]
    append_rows(big, *rows)
    page = write_review(big).html
    rendered = _render(chromium, page, tmp_path)
    assert len(rendered.cards) == 100
    assert rendered.texts["count"] == "Showing 1–100 of 10,005"
    assert rendered.texts["page"] == "page 1 of 101"
    found = _render(chromium, page, tmp_path, "q=photo number 999&sort=tokens-desc")
    matching = [r for r in rows if "photo number 999" in r.caption]  # 999 and 9990-9999
    expected = [r.image_path for r in sorted(matching, key=lambda r: (-r.total_tokens, r.image_path))]
    assert len(expected) == 11 and [c["@path"] for c in found.cards] == expected


def test_screenshot_shows_the_thumbnails(chromium, reviewed, tmp_path):
    _, _, page = reviewed
    png = tmp_path / "review.png"
    _chromium(chromium, tmp_path, f"--screenshot={png}", "--window-size=1280,900", page.resolve().as_uri())
    with Image.open(png) as shot:
        assert shot.size == (1280, 900)
        saturation = shot.convert("RGB").convert("HSV").getchannel("S").histogram()
    colourful = sum(saturation[100:])
    assert colourful > 10_000  # photos, not only text on white: the data-URL images were allowed and drawn


def test_review_never_overwrites_a_file_it_did_not_write(reviewed, tmp_path, cli):
    _, out, _ = reviewed
    mine = tmp_path / "notes.html"
    mine.write_text("<p>my notes</p>")
    code, _, err = cli("review", out, "--html", mine)
    assert code == 2
    assert "not a page `caption review` wrote" in err
    assert mine.read_text() == "<p>my notes</p>"
    page = tmp_path / "page.html"
    assert cli("review", out, "--html", page).code == 0
    assert cli("review", out, "--html", page).code == 0  # its own page is regenerated


def test_cards_show_their_cost_and_sort_by_it(chromium, reviewed, tmp_path):
    from pipeline import cost

    folder, out, _ = reviewed
    prices = cost.parse_price_table('[models."local-caption"]\ninput = 1000.0\noutput = 4000.0\n'
                                    'source = "test"\nas_of = "2026-11-26"\n', "test prices")
    page = write_review(out, input_dir=folder, html_path=tmp_path / "priced.html", prices=prices).html
    rendered = _render(chromium, page, tmp_path, "status=ok&sort=cost-desc")
    latest = latest_rows(out)
    usd = {p: (r["prompt_tokens"] * 1000 + r["completion_tokens"] * 4000) / 1e6 for p, r in latest.items()
           if r["status"] == "ok"}
    assert [c["@path"] for c in rendered.cards] == sorted(usd, key=lambda p: (-usd[p], p))
    for card in rendered.cards:
        assert card["cost"] == f"${usd[card['@path']]:.4f}"


# --- a fresh machine, odd keys, odd files ---------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("required, expect_code, expect_text", [
    ("", 0, "SKIPPED"),
    ("1", 1, "CAPTION_REQUIRE_BROWSER=1 makes the browser tests mandatory"),
], ids=["skips-on-a-fresh-machine", "fails-where-ci-requires-it"])
def test_without_chromium_browser_tests_skip_unless_ci_requires_them(tmp_path, required, expect_code, expect_text):
    bare = tmp_path / "bin"  # a PATH on which no Chromium can be found
    bare.mkdir()
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_BROWSER}
    env.update(PATH=str(bare), **({REQUIRE_BROWSER: required} if required else {}))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", __file__,
                           "-k", "test_page_without_input_has_no_thumbnails_but_works"],
                          cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True, timeout=110)
    assert done.returncode == expect_code, done.stdout[-3000:]
    assert expect_text in done.stdout and "no headless Chromium on PATH" in done.stdout


def test_odd_keys_get_a_card_and_never_crash_the_page(reviewed, tmp_path):
    """Keys a person may write into a part: a NUL byte, a stray backslash, a climb out, none at all."""
    folder, out, _ = reviewed
    odd = ["nul\x00byte.jpg", "stray\\q.jpg", "../outside.jpg", "a//b.jpg", "."]
    append_rows(out, *(result_for(out, key, caption="odd") for key in odd))
    try:
        summary = write_review(out, input_dir=folder, html_path=tmp_path / "odd.html")
        assert summary.images == 5 + len(odd) and summary.thumbnails == 4
        assert "nul\\u0000byte.jpg" in (tmp_path / "odd.html").read_text()
    finally:
        for part in sorted(out.glob("part-*.parquet"))[1:]:
            part.unlink()  # the module's other tests read the run's own part only


def test_escaped_names_get_their_thumbnails(server, tmp_path, caption_run):
    folder = tmp_path / "in"
    folder.mkdir()
    photo = (Path(__file__).parent.parent / "sample_data" / "coffee_cup.jpg").read_bytes()
    (folder / os.fsdecode(b"caf\xe9.jpg")).write_bytes(photo)  # Latin-1, as an old archive unpacks
    (folder / "caf\\xe9.jpg").write_bytes(photo + b"2")  # a real backslash in the name
    assert caption_run(server, folder, tmp_path / "out") == 0
    assert sorted(latest_rows(tmp_path / "out")) == ["caf\\\\xe9.jpg", "caf\\xe9.jpg"]
    summary = write_review(tmp_path / "out", input_dir=folder)
    assert (summary.images, summary.thumbnails) == (2, 2)


@pytest.mark.timeout(20)
def test_a_fifo_or_link_where_the_page_goes_is_refused_unopened(reviewed, tmp_path, cli):
    _, out, _ = reviewed
    fifo = tmp_path / "page.html"
    os.mkfifo(fifo)  # opening it to look for the generator mark would wait for a writer forever
    code, _, err = cli("review", out, "--html", fifo)
    assert code == 2 and "not a regular file" in err
    link = tmp_path / "link.html"
    link.symlink_to(tmp_path / "elsewhere.html")
    code, _, err = cli("review", out, "--html", link)
    assert code == 2 and "is a link" in err and not (tmp_path / "elsewhere.html").exists()
