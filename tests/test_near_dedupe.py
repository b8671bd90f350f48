"""Near-duplicate dedupe (issue 13, item 4): the difference hash, the band index, and runs that copy
a near copy's caption from the picture that was sent, in one run and across resumed ones."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import EXPECTED_SCHEMA, SAMPLES, copy_samples, read_rows
from pipeline import images
from pipeline.engine.dedupe import FRESH_HASHES, NearIndex, hamming_distance
from pipeline.job import Dedupe, ImageSettings, Job
from pipeline.store import Store

SETTINGS = ImageSettings(max_side=256)  # what the test job sends


def _dhash(data: bytes) -> int:
    return images.encode_image(data, SETTINGS, dhash=True).dhash


def _jpeg(sample: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.open(SAMPLES / sample).convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _brighter(sample: str) -> bytes:
    """The sample one grey level brighter everywhere (saved losslessly)."""
    buffer = io.BytesIO()
    Image.open(SAMPLES / sample).convert("RGB").point(lambda v: min(v + 1, 255)).save(buffer, "PNG")
    return buffer.getvalue()


# --- the difference hash -------------------------------------------------------------------------


def test_the_hash_is_only_computed_when_asked_and_is_the_same_for_the_same_picture():
    data = (SAMPLES / "coffee_cup.jpg").read_bytes()
    assert images.encode_image(data, SETTINGS).dhash is None
    assert hamming_distance(_dhash(data), _dhash(data)) == 0
    assert -(2**63) <= _dhash(data) < 2**63  # fits the int64 column


@pytest.mark.parametrize(("variant", "original", "near"), [
    (lambda: _jpeg("coffee_cup.jpg", 30), "coffee_cup.jpg", True),
    (lambda: _jpeg("brick_wall_grey.jpg", 30), "brick_wall_grey.jpg", True),
    (lambda: _brighter("cameraman_with_tripod_grey.jpg"), "cameraman_with_tripod_grey.jpg", True),
    (lambda: _brighter("hubble_deep_field.jpg"), "hubble_deep_field.jpg", True),
    (lambda: (SAMPLES / "rotated_exif.jpg").read_bytes(), "coffee_cup.jpg", True),  # stored turned, EXIF upright
    (lambda: (SAMPLES / "chelsea_the_cat.jpg").read_bytes(), "coffee_cup.jpg", False),
    (lambda: (SAMPLES / "astronaut_eileen_collins.jpg").read_bytes(), "brick_wall_grey.jpg", False),
    (lambda: (SAMPLES / "retina_fundus.webp").read_bytes(), "hubble_deep_field.jpg", False),
], ids=["coffee-q30", "brick-q30", "cameraman-brighter", "hubble-brighter", "exif-turned", "cat-vs-coffee",
        "astronaut-vs-brick", "retina-vs-hubble"])
def test_reencodes_and_small_shifts_are_near_and_other_pictures_far(variant, original, near):
    distance = hamming_distance(_dhash(variant()), _dhash((SAMPLES / original).read_bytes()))
    if near:
        assert distance <= Dedupe().max_distance
    else:
        assert distance > 10  # "more than 10 bits: probably a different picture" (Krawetz)


# --- the band index ------------------------------------------------------------------------------


def _flip(value: int, bits: int, rng: random.Random) -> int:
    for bit in rng.sample(range(64), bits):
        value ^= 1 << bit
    return value


@pytest.mark.parametrize("max_distance", [0, 1, 4, 8], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("added", [False, True], ids=["built", "added"])
def test_band_index_finds_every_hash_within_the_distance_and_none_beyond(max_distance, added):
    rng = random.Random(max_distance)
    hashes = [rng.getrandbits(64) for _ in range(3 * FRESH_HASHES)]
    # plant neighbours of a few hashes at every distance up to two past the limit
    hashes += [_flip(hashes[i], bits, rng) for i in range(20) for bits in range(max_distance + 3)]
    if added:
        index = NearIndex(max_distance, hashes[:100])
        for value in hashes[100:]:
            index.add(value - (1 << 64) if value >= 1 << 63 else value)  # signed, as the column holds them
    else:
        index = NearIndex(max_distance, hashes)
    assert len(index) == len(hashes)
    for query in hashes[:20] + [_flip(hashes[5], 1, rng), rng.getrandbits(64)]:
        expected = sorted({(h, hamming_distance(h, query)) for h in hashes
                           if hamming_distance(h, query) <= max_distance}, key=lambda p: (p[1], p[0]))
        assert index.matches(query) == expected
        assert index.nearest(query) == (expected[0] if expected else None)


# --- runs against the bundled endpoint -----------------------------------------------------------


def _near_folder(folder: Path) -> Path:
    """original.jpg (the brick wall), reencoded.jpg (it re-encoded at quality 30), other.jpg (the cat)."""
    copy_samples(folder, {"original.jpg": "brick_wall_grey.jpg", "other.jpg": "chelsea_the_cat.jpg"})
    (folder / "reencoded.jpg").write_bytes(_jpeg("brick_wall_grey.jpg", 30))
    return folder


def _run(cli, server, folder: Path, out: Path, job: Path, *flags: str):
    """`caption run`; the job should have one image worker, so that the first file walked is the
    first the dedupe sees (with two, either of a pair may become the original)."""
    return cli("run", folder, "--job", job, "--out", out, "--base-url", server.base_url, "--no-progress", *flags)


def test_a_near_copy_takes_the_captioned_pictures_answer_and_is_not_sent(server, cli, job_file, tmp_path):
    folder, out = _near_folder(tmp_path / "in"), tmp_path / "out"
    job = job_file(limits_concurrency=1, limits_preprocess_workers=1)
    ran = _run(cli, server, folder, out, job, "--dedupe-near")
    assert ran.code == 0 and "caption: 1 near copy took the caption" in ran.out
    rows = {r["image_path"]: r for r in read_rows(out)}
    near, original = rows["reencoded.jpg"], rows["original.jpg"]
    assert len(server.observed()) == 2  # the brick wall once, the cat once
    assert near["dedup_of"] == "original.jpg" and near["caption"] == original["caption"]
    assert near["total_tokens"] == 0 and original["total_tokens"] > 0
    expected = hamming_distance(_dhash((folder / "reencoded.jpg").read_bytes()),
                                _dhash((folder / "original.jpg").read_bytes()))
    assert near["dedup_distance"] == expected <= 4 and near["dhash"] is not None
    assert original["dedup_distance"] is None and rows["other.jpg"]["dedup_of"] is None


def test_near_copies_in_flight_together_are_sent_once(server, cli, job_file, tmp_path):
    folder = copy_samples(tmp_path / "in", {"a.jpg": "coffee_cup.jpg", "b.jpg": "rotated_exif.jpg"})
    server.set_latency(0.3)
    job = job_file(limits_concurrency=4, limits_preprocess_workers=1)
    assert _run(cli, server, folder, tmp_path / "out", job, "--dedupe-near").code == 0
    rows = {r["image_path"]: r for r in read_rows(tmp_path / "out")}
    assert len(server.observed()) == 1 and rows["b.jpg"]["dedup_of"] == "a.jpg"
    assert rows["b.jpg"]["dedup_distance"] == 0  # the same pixels once the EXIF turn is applied


def test_without_near_dedupe_a_near_copy_is_sent(server, cli, job_file, tmp_path):
    folder, out = _near_folder(tmp_path / "in"), tmp_path / "out"
    assert _run(cli, server, folder, out, job_file()).code == 0
    rows = read_rows(out)
    assert len(server.observed()) == 3
    assert all(r["dedup_of"] is None and r["dedup_distance"] is None and r["dhash"] is None for r in rows)


def test_a_resumed_run_matches_a_near_copy_to_an_original_of_the_first(server, cli, job_file, tmp_path):
    folder, out = copy_samples(tmp_path / "in", {"original.jpg": "brick_wall_grey.jpg"}), tmp_path / "out"
    job = job_file()
    assert _run(cli, server, folder, out, job, "--dedupe-near").code == 0
    (folder / "reencoded.jpg").write_bytes(_jpeg("brick_wall_grey.jpg", 30))
    server.reset()
    assert _run(cli, server, folder, out, job, "--dedupe-near").code == 0
    rows = {r["image_path"]: r for r in read_rows(out)}
    assert server.observed() == [] and rows["reencoded.jpg"]["dedup_of"] == "original.jpg"
    assert rows["reencoded.jpg"]["caption"] == rows["original.jpg"]["caption"]


def test_exact_copies_still_dedupe_with_near_on_and_have_no_distance(server, cli, job_file, tmp_path):
    folder = copy_samples(tmp_path / "in", {"a.jpg": "coffee_cup.jpg", "b.jpg": "coffee_cup.jpg"})
    assert _run(cli, server, folder, tmp_path / "out", job_file(limits_preprocess_workers=1), "--dedupe-near").code == 0
    rows = {r["image_path"]: r for r in read_rows(tmp_path / "out")}
    assert len(server.observed()) == 1
    assert rows["b.jpg"]["dedup_of"] == "a.jpg" and rows["b.jpg"]["dedup_distance"] is None


def test_batch_mode_refuses_near_dedupe_before_anything_is_sent(server, cli, job_file, tmp_path):
    folder = _near_folder(tmp_path / "in")
    ran = _run(cli, server, folder, tmp_path / "out", job_file(), "--mode", "batch", "--dedupe-near")
    assert ran.code == 2 and "[dedupe] near = true works in online mode only" in ran.err
    assert len(ran.err.strip().splitlines()) == 1 and server.observed() == []


# --- job and schema ------------------------------------------------------------------------------


def test_dedupe_settings_leave_the_fingerprint_as_it_was():
    assert Job(dedupe=Dedupe(near=True, max_distance=2)).fingerprint == Job().fingerprint


def test_max_distance_past_the_band_limit_is_refused(cli, job_file, tmp_path):
    ran = cli("run", SAMPLES, "--job", job_file(), "--out", tmp_path / "out", "--dedupe-max-distance", "9")
    assert ran.code == 2 and "[dedupe] max_distance = 9 is out of range" in ran.err


def test_an_older_part_gets_the_near_dedupe_columns_as_nulls(tmp_path):
    older = pa.schema([f for f in EXPECTED_SCHEMA if f.name not in ("dhash", "dedup_distance")])
    fingerprint = Job().fingerprint
    pq.write_table(pa.Table.from_pylist([{"image_path": "old.jpg", "status": "ok", "attempts": 1,
                                          "job_fingerprint": fingerprint}], schema=older),
                   tmp_path / "part-00001.parquet")
    summary = {"fingerprint": fingerprint, "source": "test"}
    (tmp_path / "_job.json").write_text(json.dumps(summary))
    store = Store.open(tmp_path, summary, part_rows=10, part_seconds=60)
    store.release()
    part = tmp_path / "part-00001.parquet"
    assert pq.read_schema(part).equals(EXPECTED_SCHEMA)
    (row,) = pq.read_table(part).to_pylist()
    assert row["image_path"] == "old.jpg" and row["dhash"] is None and row["dedup_distance"] is None
