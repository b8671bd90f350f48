"""Samples and limits (issue 13, item 1): `--sample N [--sample-seed S]` and `--limit N` on run, estimate and
batch prepare; deterministic, one streaming pass in O(N) memory, and outside the fingerprint, so a full run
into the sampled out folder sends only the rest."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from conftest import read_rows
from pipeline.job import InputSettings, load_job
from pipeline.sources import open_source
from pipeline.sources.sample import NOT_SAMPLED, LimitedSource, SampledSource

IMAGES = 12


@dataclass(frozen=True)
class _Synthetic:
    key: str


class _Counted:
    """A source of `size` synthetic items, generated one at a time (never listed whole)."""

    skipped: dict[str, int] = {}

    def __init__(self, size: int):
        self.size = size

    def items(self):
        return (_Synthetic(f"dir{i % 7}/img{i:05d}.jpg") for i in range(self.size))

    def why_empty(self):
        return None if self.size else "holds no files"

    def open_by_key(self, key):
        return _Synthetic(key)


def _keys(source) -> list[str]:
    return [item.key for item in source.items()]


@pytest.fixture
def sized_folder(tmp_path: Path) -> Path:
    """IMAGES small JPEGs, each of its own width, so the server's observed image size names the image."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(IMAGES):
        Image.new("RGB", (40 + i, 30), (20 * i % 256, 90, 160)).save(folder / f"img{i:02d}.jpg")
    return folder


def _width_key(folder: Path) -> dict[int, str]:
    return {Image.open(path).size[0]: path.name for path in folder.iterdir()}


# --- the wrapper --------------------------------------------------------------------------------


def test_the_same_seed_picks_the_same_keys_and_another_seed_others():
    first = _keys(SampledSource(_Counted(10_000), 50, seed=3))
    assert first == _keys(SampledSource(_Counted(10_000), 50, seed=3))
    assert len(first) == len(set(first)) == 50
    assert set(first) != set(_keys(SampledSource(_Counted(10_000), 50, seed=4)))


def test_a_sample_holds_at_most_n_items_and_yields_them_in_walk_order():
    source = SampledSource(_Counted(10_000), 100, seed=0)
    keys = _keys(source)
    assert source.largest_heap == 100  # memory O(N): the heap never held more than N of the 10,000 items
    walk_order = [item.key for item in _Counted(10_000).items()]
    assert keys == [key for key in walk_order if key in set(keys)]
    assert source.skipped == {NOT_SAMPLED: 9_900}


def test_a_sample_is_spread_over_the_whole_walk_and_grows_by_adding():
    keys = _keys(SampledSource(_Counted(10_000), 1_000, seed=1))
    late = sum(int(key[-9:-4]) >= 5_000 for key in keys)
    assert 400 < late < 600  # not the first N: uniform over the walk
    assert set(_keys(SampledSource(_Counted(10_000), 100, seed=1))) <= set(keys)  # bottom-k nests


def test_a_sample_as_large_as_the_source_takes_it_all_in_walk_order():
    assert _keys(SampledSource(_Counted(30), 30)) == _keys(_Counted(30))
    assert _keys(SampledSource(_Counted(30), 1_000)) == _keys(_Counted(30))


def test_a_limit_takes_the_first_n_in_walk_order():
    assert _keys(LimitedSource(_Counted(10_000), 5)) == _keys(_Counted(10_000))[:5]


def test_open_source_picks_the_wrapper_from_the_input_settings(sized_folder):
    everything = _keys(open_source(sized_folder))
    sampled = _keys(open_source(sized_folder, InputSettings(sample=5, sample_seed=9)))
    assert len(sampled) == 5 and set(sampled) < set(everything)
    assert sampled == [key for key in everything if key in sampled]
    assert _keys(open_source(sized_folder, InputSettings(limit=4))) == everything[:4]
    assert open_source(sized_folder, InputSettings(sample=5)).open_by_key(everything[0]) is not None


def test_sampling_is_outside_the_fingerprint():
    plain = load_job("jobs/demo.toml")
    sampled = load_job("jobs/demo.toml", {"input.sample": 5, "input.sample_seed": 2})
    limited = load_job("jobs/demo.toml", {"input.limit": 3})
    assert plain.fingerprint == sampled.fingerprint == limited.fingerprint


@pytest.mark.parametrize("flags, says", [
    (("--sample", "0"), "sample = 0 is out of range"),
    (("--limit", "0"), "limit = 0 is out of range"),
    (("--sample", "3", "--limit", "2"), "give one of them"),
], ids=["zero-sample", "zero-limit", "both"])
def test_bad_sample_flags_exit_2_before_anything_is_sent(flags, says, sized_folder, tmp_path, job_file, server, cli):
    ran = cli("run", sized_folder, "--job", job_file(), "--out", tmp_path / "out", "--base-url", server.base_url,
              "--no-progress", *flags)
    assert ran.code == 2 and says in ran.err
    assert server.observed() == []


# --- through the commands -----------------------------------------------------------------------


def _run(cli, server, folder, out, job, *flags):
    return cli("run", folder, "--job", job, "--out", out, "--base-url", server.base_url, "--no-progress", *flags)


def test_two_sampled_runs_caption_the_same_images(sized_folder, tmp_path, job_file, server, cli):
    job = job_file()
    for out in ("a", "b"):
        assert _run(cli, server, sized_folder, tmp_path / out, job, "--sample", "4", "--sample-seed", "11").code == 0
    picked = sorted(row["image_path"] for row in read_rows(tmp_path / "a"))
    assert picked == sorted(row["image_path"] for row in read_rows(tmp_path / "b"))
    assert len(picked) == 4
    other = _run(cli, server, sized_folder, tmp_path / "c", job, "--sample", "4", "--sample-seed", "12")
    assert other.code == 0 and sorted(row["image_path"] for row in read_rows(tmp_path / "c")) != picked


def test_a_full_run_after_a_sample_sends_only_the_rest(sized_folder, tmp_path, job_file, server, cli):
    job, out, names = job_file(), tmp_path / "out", _width_key(sized_folder)
    sample = _run(cli, server, sized_folder, out, job, "--sample", "5", "--sample-seed", "1")
    assert sample.code == 0 and "7 not in the sample" in sample.out
    sampled = {names[seen.image_size[0]] for seen in server.observed()}
    assert sampled == {row["image_path"] for row in read_rows(out)} and len(sampled) == 5
    server.reset()
    full = _run(cli, server, sized_folder, out, job)
    assert full.code == 0 and "5 already done" in full.out
    sent = [names[seen.image_size[0]] for seen in server.observed()]
    assert sorted(sent) == sorted(set(names.values()) - sampled)  # each of the rest once, none of the sample


def test_limit_captions_the_first_images_in_walk_order(sized_folder, tmp_path, job_file, server, cli):
    assert _run(cli, server, sized_folder, tmp_path / "out", job_file(), "--limit", "3").code == 0
    assert sorted(row["image_path"] for row in read_rows(tmp_path / "out")) == ["img00.jpg", "img01.jpg", "img02.jpg"]
    assert len(server.observed()) == 3


def test_estimate_counts_only_the_sample(sized_folder, job_file, cli):
    ran = cli("estimate", sized_folder, "--job", job_file(), "--sample", "4", "--json")
    assert ran.code == 0 and json.loads(ran.out)["images"] == 4
    ran = cli("estimate", sized_folder, "--job", job_file(), "--limit", "2", "--json")
    assert ran.code == 0 and json.loads(ran.out)["images"] == 2


def test_batch_prepare_writes_requests_for_the_sample_only(sized_folder, tmp_path, job_file, cli):
    flags = ("--sample", "4", "--sample-seed", "5")
    assert cli("batch", "prepare", sized_folder, "--job", job_file(), "--dest", tmp_path / "req", *flags).code == 0
    lines = (tmp_path / "req" / "requests-00001.jsonl").read_text().splitlines()
    expected = _keys(open_source(sized_folder, InputSettings(sample=4, sample_seed=5)))
    assert len(expected) == 4
    assert [json.loads(line)["custom_id"] for line in lines] == expected
