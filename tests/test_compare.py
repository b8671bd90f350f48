"""`caption compare` and `caption review A B` (issue 13, item 2): variants run on the same sample into
ordinary out folders, and one page shows them side by side, checked in headless Chromium against the Parquet."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLES, append_rows, latest_rows, result_for, run_main
from pipeline.errors import JobError
from pipeline.job import InputSettings
from pipeline.readers.compare import CompareSettings, plan_variants
from pipeline.sources import open_source
from test_review import HOSTILE_CAPTION, _chromium, chromium  # noqa: F401  (chromium: the fixture)

JOBS = f"{ROOT / 'jobs' / 'demo.toml'},{ROOT / 'jobs' / 'demo_short.toml'}"
VARIANTS = ["demo", "demo_short"]
SAMPLE = ("--sample", "5", "--sample-seed", "4")


class _Compared(HTMLParser):
    """A dumped comparison page: cards[path][variant][field], the totals table, and every element's attributes."""

    def __init__(self, dom: str):
        super().__init__(convert_charrefs=True)
        self.title = ""
        self.cards: dict[str, dict[str, dict[str, str]]] = {}
        self.totals: dict[str, dict[str, str]] = {}
        self.elements: list[tuple[str, dict[str, str]]] = []
        self._open: list[tuple[str, dict[str, str]]] = []
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        attributes = {k: v or "" for k, v in attrs}
        self.elements.append((tag, attributes))
        if tag == "article":
            self.cards[attributes["data-path"]] = {}
        if tag not in ("img", "input", "meta", "br"):
            self._open.append((tag, attributes))

    def handle_endtag(self, tag):
        while self._open and self._open.pop()[0] != tag:
            pass

    def handle_data(self, data):
        tags = [tag for tag, _ in self._open]
        variant = next((a["data-variant"] for _, a in reversed(self._open) if "data-variant" in a), None)
        field = next((a["data-field"] for _, a in reversed(self._open) if "data-field" in a), None)
        if "title" in tags:
            self.title += data
        if variant is None or field is None:
            return
        if "article" in tags:
            path = next(a["data-path"] for tag, a in self._open if tag == "article")
            cell = self.cards[path].setdefault(variant, {})
        else:
            cell = self.totals.setdefault(variant, {})
        cell[field] = cell.get(field, "") + data


def _render(chromium: str, page: Path, tmp_path: Path) -> _Compared:
    return _Compared(_chromium(chromium, tmp_path, "--dump-dom", page.resolve().as_uri()))


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> Path:
    """`caption compare` on sample_data with the two demo jobs, a sample of 5: DIR."""
    out = tmp_path_factory.mktemp("compared") / "cmp"
    assert run_main("compare", SAMPLES, "--jobs", JOBS, *SAMPLE, "--out", out, "--no-progress") in (0, 1)
    return out


def test_each_variant_is_an_out_folder_of_the_same_sample(compared):
    sample = [item.key for item in open_source(SAMPLES, InputSettings(sample=5, sample_seed=4)).items()]
    assert len(sample) == 5
    for name in VARIANTS:
        assert (compared / name / "_job.json").is_file()
        assert sorted(latest_rows(compared / name)) == sorted(sample)
    assert (compared / "_compare.html").is_file()


def test_compare_again_resumes_every_variant(compared, cli):
    rows_before = {name: len(latest_rows(compared / name)) for name in VARIANTS}
    ran = cli("compare", SAMPLES, "--jobs", JOBS, *SAMPLE, "--out", compared, "--no-progress")
    assert ran.code in (0, 1)
    ok = {name: sum(r["status"] == "ok" for r in latest_rows(compared / name).values()) for name in VARIANTS}
    for name in VARIANTS:
        assert f"caption: {name}: " in ran.out and f"{ok[name]} already done" in ran.out
        assert len(latest_rows(compared / name)) == rows_before[name]


def test_the_page_shows_every_variant_of_every_image_as_the_parquet_says(chromium, compared, tmp_path):
    page = _render(chromium, compared / "_compare.html", tmp_path)
    rows = {name: latest_rows(compared / name) for name in VARIANTS}
    assert sorted(page.cards) == sorted(rows["demo"])
    for path, cells in page.cards.items():
        assert sorted(cells) == VARIANTS
        for name in VARIANTS:
            row = rows[name][path]
            assert cells[name]["status"] == row["status"]
            assert cells[name].get("caption") == row["caption"]
            if row["status"] == "ok":
                assert cells[name]["tokens"].startswith(f"{row['total_tokens']:,} tokens")
                assert cells[name]["latency"] == f"{row['latency_ms'] / 1000:.2f} s"
                assert cells[name]["cost"].startswith("$")
    for name in VARIANTS:
        totals = page.totals[name]
        assert totals["images"] == "5"
        assert totals["tokens"] == f"{sum(r['total_tokens'] or 0 for r in rows[name].values()):,}"
        assert totals["projected-images"] == "13"  # the whole of sample_data, from the estimate
        assert totals["projected-cost"].startswith("$") and totals["projected-time"].endswith(("s", "min", "h"))


def test_review_of_several_out_folders_keeps_hostile_captions_text(chromium, compared, tmp_path, cli):
    victim = sorted(latest_rows(compared / "demo_short"))[0]
    append_rows(compared / "demo_short", result_for(compared / "demo_short", victim, caption=HOSTILE_CAPTION,
                                                    model="local-caption", total_tokens=7, prompt_tokens=5,
                                                    completion_tokens=2, latency_ms=1234))
    html = tmp_path / "side.html"
    ran = cli("review", compared / "demo", compared / "demo_short", "--input", SAMPLES, "--html", html)
    assert ran.code == 0 and "review page of 5 images" in ran.out
    page = _render(chromium, html, tmp_path)
    assert "pwned" not in page.title
    assert page.cards[victim]["demo_short"]["caption"] == HOSTILE_CAPTION
    assert page.cards[victim]["demo_short"]["latency"] == "1.23 s"
    assert not [attrs for tag, attrs in page.elements if "onerror" in attrs or (tag == "img" and attrs.get("src") == "x")]
    assert "projected-images" not in page.totals["demo"] or page.totals["demo"]["projected-images"] == ""


def test_variants_are_named_for_the_job_and_the_model(tmp_path):
    demo = ROOT / "jobs" / "demo.toml"
    planned = plan_variants(CompareSettings(input=SAMPLES, jobs=(demo,), out=tmp_path,
                                            models=("org/vlm:7b", "local-caption")))
    assert [(name, job.endpoint.model) for name, job in planned] == [("demo+org_vlm_7b", "org/vlm:7b"),
                                                                      ("demo+local-caption", "local-caption")]
    assert all(job.input.sample == 20 for _, job in planned)  # the default sample: a comparison is a try
    with pytest.raises(JobError, match="two variants at least"):
        plan_variants(CompareSettings(input=SAMPLES, jobs=(demo,), out=tmp_path))
    with pytest.raises(JobError, match="share a folder name"):
        plan_variants(CompareSettings(input=SAMPLES, jobs=(demo, demo), out=tmp_path))
