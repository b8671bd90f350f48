"""WebDataset shards as INPUT: shards written by the `webdataset` package, read back by the source, run,
resumed after kill -9, deduped, estimated, reported, exported and reviewed like a folder of the same images."""

from __future__ import annotations

import gzip
import json
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import braceexpand
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from conftest import DEMO_JOB, ROOT, SAMPLES, durable_rows, read_rows, run_main
from pipeline.errors import JobError
from pipeline.job import InputSettings
from pipeline.sources import open_source
from pipeline.sources.webdataset import (BAD_SHARD, DUPLICATE, NO_IMAGE, WebDatasetSource, _HashIndex,
                                         expand_braces, looks_like_shards, split_member)

PICTURES = ["coffee_cup.jpg", "chelsea_the_cat.jpg", "transparent_logo.png", "brick_wall_grey.jpg",
            "retina_fundus.webp", "horse_silhouette_1bit.png", "rocket_launch_falcon9.jpg"]


def _sample(i: int, picture: str, **members) -> dict:
    extension = picture.rsplit(".", 1)[1]
    return {"__key__": f"{i:06d}", extension: (SAMPLES / picture).read_bytes(), "txt": f"caption {i}",
            "json": {"index": i, "name": picture}, **members}


def write_shards(folder: Path, samples: list[dict], per_shard: int = 3, name: str = "shard") -> str:
    """`samples` written by webdataset.ShardWriter, `per_shard` a shard; the brace pattern naming them all."""
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / f"{name}-%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
    count = len(list(folder.glob(f"{name}-*.tar")))
    return str(folder / f"{name}-{{00000..{count - 1:05d}}}.tar")


@pytest.fixture
def shards(tmp_path) -> str:
    """Seven samples (jpg, png, webp pictures, each with txt and json) in three shards, and one without an image."""
    samples = [_sample(i, picture) for i, picture in enumerate(PICTURES)]
    samples.insert(4, {"__key__": "no_picture", "txt": "a sample with no image member"})
    return write_shards(tmp_path / "shards", samples)


# --- names and patterns ------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [
    "shards/{00000..00003}.tar", "s-{0..3}.tar", "s-{07..10}.tar", "{a,b,c}/x.tar", "s{1..9..3}.tar",
    "p{2.{5..7},3.{2,3}}.tar", "{4..1}.tar", "no-braces.tar", "s3://bucket/{000..002}.tar", "{a..c}{0,1}.tar",
], ids=["zero-padded", "plain", "padded-by-the-first", "list", "step", "nested", "downwards", "none", "url",
        "letters"])
def test_brace_patterns_expand_as_braceexpand_does(pattern):
    assert list(expand_braces(pattern)) == list(braceexpand.braceexpand(pattern))


def test_unbalanced_braces_are_a_one_line_job_error(tmp_path):
    with pytest.raises(JobError, match=r"unbalanced braces"):
        WebDatasetSource(str(tmp_path / "{000..002.tar"), InputSettings(format="webdataset"))


@pytest.mark.parametrize("name", ["000001.jpg", "a/b/000001.JPG", "000001.seg.png", "dir.x/000001.txt",
                                  "noext", ".hidden", "a/.hidden.jpg", "x.", "k.tar.gz"])
def test_member_names_split_as_webdatasets_base_plus_ext(name):
    expected = base_plus_ext(name)
    found = split_member(name)
    if expected == (None, None) or not expected[0].rpartition("/")[2]:
        assert found is None
    else:
        assert found == (expected[0], expected[1].lower())


@pytest.mark.parametrize("location, is_shards", [
    ("shards/000.tar", True), ("shards/{000..009}.tar", True), ("s3://b/{a,b}.tar::s3://c/x.tar", True),
    ("shards/x.tar.gz", True), ("shards/", False), ("photo.jpg", False), ("list.txt", False),
    ("a.tar::b.jpg", False),
])
def test_auto_picks_webdataset_when_every_name_ends_in_tar(location, is_shards):
    assert looks_like_shards(location) is is_shards


# --- the source --------------------------------------------------------------------------------


def test_items_are_the_samples_webdataset_reads(shards):
    """Keys, image bytes and kept members agree with the webdataset package's own reader."""
    source = open_source(shards, InputSettings(keep_columns=("txt", "json", "cls", "__url__")))
    items = list(source.items())
    reference = [s for s in wds.WebDataset(shards, shardshuffle=False, empty_check=False)
                 if any(e in s for e in ("jpg", "png", "webp"))]
    assert [item.key for item in items] == [s["__key__"] for s in reference] == [f"{i:06d}" for i in range(7)]
    for item, sample in zip(items, reference, strict=True):
        extension = item.member.rsplit(".", 1)[1]
        assert item.data is None  # a local tar: read again when asked, not carried
        assert item.read() == sample[extension] and item.open().read(4) == sample[extension][:4]
        assert item.kept == {"txt": sample["txt"].decode(), "json": sample["json"].decode(), "cls": None,
                             "__url__": sample["__url__"]}
        assert json.loads(item.kept["json"])["index"] == int(item.key)
        assert pickle.loads(pickle.dumps(item)) == item  # a Ray task gets it whole
    assert source.skipped == {NO_IMAGE: 1}
    assert source.kept_schema() == pa.schema([("txt", pa.string()), ("json", pa.string()), ("cls", pa.string()),
                                              ("__url__", pa.string())])


@pytest.mark.parametrize("members, expected", [("jpg;png;webp", "jpg"), ("png;jpg", "png"), ("webp", None)])
def test_the_image_member_is_the_first_of_image_members_the_sample_has(tmp_path, members, expected):
    sample = {"__key__": "both", "png": (SAMPLES / "transparent_logo.png").read_bytes(),
              "jpg": (SAMPLES / "coffee_cup.jpg").read_bytes()}
    pattern = write_shards(tmp_path / "s", [sample])
    source = open_source(pattern, InputSettings(image_members=members))
    items = list(source.items())
    assert [item.member.rsplit(".", 1)[1] for item in items] == ([expected] if expected else [])
    if expected:
        assert items[0].read() == sample[expected]
    else:
        assert source.skipped == {NO_IMAGE: 1}
        assert "no sample with an image member" in source.why_empty()


def test_a_member_over_max_file_mb_is_never_read_and_refused_when_asked(tmp_path):
    big = (SAMPLES / "coffee_cup.jpg").read_bytes()
    pattern = write_shards(tmp_path / "s", [_sample(0, "chelsea_the_cat.jpg", txt="t" * len(big)),
                                            {"__key__": "big", "jpg": big, "txt": "small"}])
    limit_mb = (len(big) - 1) / 1e6
    small, large = open_source(pattern, InputSettings(max_file_mb=limit_mb, keep_columns=("txt",))).items()
    assert small.read() == (SAMPLES / "chelsea_the_cat.jpg").read_bytes()
    assert small.kept == {"txt": None} and large.kept == {"txt": "small"}  # a kept member over the limit is null
    assert large.data is None and large.size == len(big)  # not read by the walk
    with pytest.raises(OSError, match=r"over the .* MB limit \(\[input\] max_file_mb"):
        large.read()


def _truncate(path: Path, at: int) -> None:
    path.write_bytes(path.read_bytes()[:at])


def _member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


@pytest.mark.parametrize("cut", ["inside-a-member", "at-a-header", "garbage-header", "gzip-cut"])
def test_a_cut_or_corrupt_shard_keeps_what_was_read_and_the_next_shard_is_read(tmp_path, cut, caplog):
    samples = [_sample(i, picture) for i, picture in enumerate(PICTURES[:6])]
    pattern = write_shards(tmp_path / "s", samples, per_shard=3)
    first = tmp_path / "s" / "shard-00000.tar"
    offsets = _member_offsets(first)
    header, data = offsets["000001.jpg"]
    if cut == "inside-a-member":
        _truncate(first, data + 1000)  # the second sample's jpg is cut: its txt/json come before, it has no image
    elif cut == "at-a-header":
        _truncate(first, header)  # no end-of-archive block: tarfile alone would end quietly here
    elif cut == "garbage-header":
        raw = bytearray(first.read_bytes())
        raw[header:header + 512] = b"\x07" * 512
        first.write_bytes(bytes(raw))
    else:
        whole = gzip.compress(first.read_bytes())
        first.unlink()
        (tmp_path / "s" / "shard-00000.tar.gz").write_bytes(whole[: len(whole) // 2])
        pattern = f"{tmp_path / 's' / 'shard-00000.tar.gz'}::{tmp_path / 's' / 'shard-00001.tar'}"
    caplog.set_level(logging.WARNING, logger="pipeline.sources.webdataset")
    source = open_source(pattern)
    keys = [item.key for item in source.items()]
    assert keys[0] == "000000" and keys[-3:] == ["000003", "000004", "000005"]
    assert "000001" not in keys or cut == "gzip-cut"
    assert source.skipped.get(BAD_SHARD) == 1
    lines = [r.getMessage() for r in caplog.records if "shard-00000" in r.getMessage()]
    assert len(lines) == 1 and "the rest of it is skipped" in lines[0]


def test_missing_shards_are_logged_and_the_rest_read(tmp_path, caplog):
    pattern = write_shards(tmp_path / "s", [_sample(i, "coffee_cup.jpg") for i in range(4)], per_shard=2)
    (tmp_path / "s" / "shard-00000.tar").unlink()
    source = open_source(pattern)
    assert [item.key for item in source.items()] == ["000002", "000003"]
    assert source.skipped == {BAD_SHARD: 1}
    os.mkfifo(tmp_path / "s" / "shard-00000.tar")  # never opened for a blocking read: no hang
    fifo = open_source(pattern)
    assert [item.key for item in fifo.items()] == ["000002", "000003"] and fifo.skipped == {BAD_SHARD: 1}
    assert any("not a regular file" in r.getMessage() for r in caplog.records)
    assert open_source(str(tmp_path / "s" / "shard-{00007..00008}.tar")).why_empty().startswith(
        "names 2 shard(s), none of which could be read")


def test_a_repeated_key_is_passed_over_unless_keys_carry_the_shard_name(tmp_path, caplog):
    first = write_shards(tmp_path / "a", [_sample(i, "coffee_cup.jpg") for i in range(2)], name="part")
    second = write_shards(tmp_path / "b", [_sample(i, "brick_wall_grey.jpg") for i in range(3)], name="other")
    caplog.set_level(logging.WARNING, logger="pipeline.sources.webdataset")
    source = open_source(f"{first}::{second}")
    assert [item.key for item in source.items()] == ["000000", "000001", "000002"]
    assert source.skipped == {DUPLICATE: 2}
    assert any("part-00000.tar" in r.getMessage() and "other-00000.tar" in r.getMessage() for r in caplog.records)
    prefixed = open_source(f"{first}::{second}", InputSettings(shard_keys=True))
    assert [item.key for item in prefixed.items()] == [
        "part-00000/000000", "part-00000/000001", "other-00000/000000", "other-00000/000001", "other-00000/000002"]


def test_a_text_file_lists_shards_one_a_line(tmp_path):
    pattern = write_shards(tmp_path / "s", [_sample(i, "coffee_cup.jpg") for i in range(4)], per_shard=2)
    listing = tmp_path / "s" / "shards.txt"
    listing.write_text("# the training split\nshard-00001.tar\n\n" + str(tmp_path / "s" / "shard-00000.tar") + "\n")
    keys = [item.key for item in open_source(listing, InputSettings(format="webdataset")).items()]
    assert keys == ["000002", "000003", "000000", "000001"]
    assert [item.key for item in open_source(pattern).items()] == ["000000", "000001", "000002", "000003"]
    with pytest.raises(JobError, match="cannot read the list of shards"):
        open_source(tmp_path / "nothing.txt", InputSettings(format="webdataset"))


def test_open_by_key_reads_from_an_index_built_in_one_pass(shards, tmp_path):
    source = open_source(shards)
    cat = source.open_by_key("000001")
    assert cat.data is None and cat.read() == (SAMPLES / "chelsea_the_cat.jpg").read_bytes()
    # The index is built: the last shard turning to garbage changes nothing for keys already indexed,
    # so later look-ups do not scan the shards again.
    last = sorted((tmp_path / "shards").glob("*.tar"))[-1]
    rocket = source.open_by_key("000006")
    last.write_bytes(b"\0" * 512)
    assert source.open_by_key("000006") == rocket
    assert source.open_by_key("000004").read() == (SAMPLES / "retina_fundus.webp").read_bytes()
    assert source.open_by_key("nope") is None and source.open_by_key("no_picture") is None


def test_the_hash_index_keeps_every_key_across_merges():
    index = _HashIndex(pending_max=4)
    assert all(index.add(h * 7919, h) is None for h in range(1000))
    assert len(index) == 1000 and all(index.get(h * 7919) == h for h in range(1000))
    assert index.add(5 * 7919, 99) == 5 and index.get(3) is None


# --- runs, resume and the readers ---------------------------------------------------------------


def _folder_of(tmp_path: Path) -> Path:
    """The same pictures as the `shards` fixture, as files named for their keys."""
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, picture in enumerate(PICTURES):
        (folder / f"{i:06d}.{picture.rsplit('.', 1)[1]}").write_bytes((SAMPLES / picture).read_bytes())
    return folder


def test_shards_caption_like_a_folder_of_the_same_images(shards, tmp_path, cli):
    folder_out, shards_out = tmp_path / "folder_out", tmp_path / "shards_out"
    assert cli("run", _folder_of(tmp_path), "--job", DEMO_JOB, "--out", folder_out, "--no-progress").code == 0
    ran = cli("run", shards, "--job", DEMO_JOB, "--out", shards_out, "--no-progress")
    assert ran.code == 0 and "passed over: 1 no image member" in ran.out
    by_folder = {Path(r["image_path"]).stem: r for r in read_rows(folder_out)}
    by_shards = {r["image_path"]: r for r in read_rows(shards_out)}
    assert sorted(by_shards) == sorted(by_folder) == [f"{i:06d}" for i in range(7)]
    for key, row in by_shards.items():
        assert row["status"] == "ok" and row["caption"] == by_folder[key]["caption"]
        assert (row["image_sha256"], row["width"], row["height"]) == (
            by_folder[key]["image_sha256"], by_folder[key]["width"], by_folder[key]["height"])
    again = cli("run", shards, "--job", DEMO_JOB, "--out", shards_out, "--no-progress")
    assert again.code == 0 and "0 ok, 0 error, 7 already done" in again.out


def test_identical_pictures_in_two_samples_are_sent_once(server, tmp_path, caption_run):
    pattern = write_shards(tmp_path / "s", [_sample(i, "coffee_cup.jpg") for i in range(3)])
    out = tmp_path / "out"
    assert caption_run(server, pattern, out) == 0
    rows = {r["image_path"]: r for r in read_rows(out)}
    assert len(server.observed()) == 1
    sent = [key for key, row in rows.items() if row["dedup_of"] is None]
    assert len(sent) == 1 and sorted(r["dedup_of"] for r in rows.values() if r["dedup_of"]) == sent * 2
    assert all(row["status"] == "ok" for row in rows.values())


def test_an_oversized_member_is_a_bad_image_row(server, tmp_path, caption_run):
    pattern = write_shards(tmp_path / "s", [_sample(0, "chelsea_the_cat.jpg"), _sample(1, "coffee_cup.jpg")])
    out = tmp_path / "out"
    limit_mb = str((SAMPLES / "coffee_cup.jpg").stat().st_size / 1e6 - 0.001)
    assert caption_run(server, pattern, out, "--max-file-mb", limit_mb) == 1
    rows = {r["image_path"]: r for r in read_rows(out)}
    assert rows["000000"]["status"] == "ok" and rows["000001"]["error_kind"] == "bad_image"
    assert "max_file_mb" in rows["000001"]["error"]


def _start(pattern: str, out: Path, server) -> subprocess.Popen:
    argv = [sys.executable, "-m", "pipeline", "run", pattern, "--job", str(DEMO_JOB), "--out", str(out),
            "--base-url", server.base_url, "--concurrency", "4", "--part-rows", "5", "--no-progress"]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_then_rerun_gives_one_ok_row_per_sample(server, tmp_path, cli):
    data = (SAMPLES / "coffee_cup.jpg").read_bytes()
    samples = [{"__key__": f"{i:06d}", "jpg": data + f"copy {i}".encode(), "txt": str(i)} for i in range(30)]
    pattern = write_shards(tmp_path / "s", samples, per_shard=7)
    out = tmp_path / "out"
    server.set_latency(0.05)
    process = _start(pattern, out, server)
    deadline = time.monotonic() + 60
    while len(durable_rows(out)) < 10:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)
    process.kill()
    process.wait()
    before = durable_rows(out)
    assert cli("run", pattern, "--job", DEMO_JOB, "--out", out, "--base-url", server.base_url,
               "--no-progress").code == 0
    rows = read_rows(out)
    assert sorted(r["image_path"] for r in rows if r["status"] == "ok") == [f"{i:06d}" for i in range(30)]
    assert {r["request_id"] for r in before} <= {r["request_id"] for r in rows}
    assert len(rows) == 30


@pytest.fixture
def captioned(server, shards, tmp_path, caption_run) -> tuple[str, Path]:
    out = tmp_path / "out"
    assert caption_run(server, shards, out) == 0
    return shards, out


def test_estimate_counts_the_samples_with_an_image(captioned, cli, job_file):
    shards, _ = captioned
    ran = cli("estimate", shards, "--job", job_file(), "--json")
    assert ran.code == 0, ran.err
    assert json.loads(ran.out)["images"] == 7


def test_report_projects_the_samples_still_without_an_ok_row(captioned, cli, tmp_path):
    shards, out = captioned
    more = write_shards(tmp_path / "more", [_sample(100 + i, "brick_wall_grey.jpg") for i in range(2)])
    ran = cli("report", out, "--input", f"{shards}::{more}", "--json")
    assert ran.code == 0, ran.err
    left = json.loads(ran.out)["left"]
    assert (left["images"], left["left"]) == (9, 2)


def test_export_writes_captions_by_key_and_refuses_to_write_into_shards(captioned, cli, tmp_path):
    shards, out = captioned
    captions = {r["image_path"]: r["caption"] for r in read_rows(out)}
    assert cli("export", out, "--to", "jsonl", "--input", shards).code == 0
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert {line["image_path"]: line["caption"] for line in lines} == captions
    assert cli("export", out, "--to", "txt", "--input", shards, "--dest", tmp_path / "txt").code == 0
    assert {p.stem: p.read_text().strip() for p in (tmp_path / "txt").glob("*.txt")} == captions
    refused = cli("export", out, "--to", "txt", "--input", shards)
    assert refused.code == 2 and "inside WebDataset shards" in refused.err
    assert cli("export", out, "--to", "hf", "--input", shards, "--dest", tmp_path / "hf", "--copy-images").code == 2


def test_review_shows_a_thumbnail_for_every_sample(captioned, cli):
    shards, out = captioned
    ran = cli("review", out, "--input", shards)
    assert ran.code == 0, ran.err
    assert "7 thumbnails" in ran.out
    page = (out / "_review.html").read_text()
    assert page.count('"thumb":"data:image/jpeg;base64,') == 7


def test_local_shards_need_neither_webdataset_nor_fsspec(shards):
    """The base install reads them: the standard library's tarfile, no extra."""
    code = ("import sys; sys.modules.update(webdataset=None, braceexpand=None, fsspec=None)\n"
            "from pipeline.sources import open_source\n"
            f"print([item.key for item in open_source({shards!r}).items()])")
    ran = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == str([f"{i:06d}" for i in range(7)])


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A bucket on a real S3-compatible server on loopback (moto in server mode); its storage_options."""
    import s3fs

    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("shards-bucket")
    yield fs, options
    s3fs.S3FileSystem.clear_instance_cache()


def test_shards_on_s3_read_as_local_ones_do(s3_bucket, shards, tmp_path):
    fs, options = s3_bucket
    for shard in sorted((tmp_path / "shards").glob("*.tar")):
        fs.put_file(str(shard), f"shards-bucket/train/{shard.name}")
    settings = InputSettings(storage_options=options, keep_columns=("txt",))
    remote = open_source("s3://shards-bucket/train/shard-{00000..00002}.tar", settings)
    local = open_source(shards, InputSettings(keep_columns=("txt",)))
    remote_items = list(remote.items())
    assert [(i.key, i.read(), dict(i.kept)) for i in remote_items] == [
        (i.key, i.read(), dict(i.kept)) for i in local.items()]
    assert all(i.data is not None and not i.storage_options for i in remote_items)  # carried: no second download
    assert remote.open_by_key("000002").read() == (SAMPLES / "transparent_logo.png").read_bytes()
    assert remote.why_empty() is None and remote.skipped == {NO_IMAGE: 1}


def test_compare_samples_the_shards_and_shows_their_thumbnails(shards, tmp_path, cli):
    jobs = f"{DEMO_JOB},{DEMO_JOB.with_name('demo_short.toml')}"
    ran = cli("compare", shards, "--jobs", jobs, "--sample", "3", "--out", tmp_path / "cmp", "--no-progress")
    assert ran.code == 0, ran.err
    assert len(read_rows(tmp_path / "cmp" / "demo")) == len(read_rows(tmp_path / "cmp" / "demo_short")) == 3
    page = (tmp_path / "cmp" / "_compare.html").read_text()
    assert page.count('"thumb":"data:image/jpeg;base64,') == 3


def test_a_run_over_a_cut_shard_and_a_repeated_key_captions_the_rest_once(server, tmp_path, caption_run, capsys):
    pattern = write_shards(tmp_path / "s", [_sample(i, picture) for i, picture in enumerate(PICTURES[:6])])
    again = write_shards(tmp_path / "again", [_sample(5, "coffee_cup.jpg")], name="again")
    first = tmp_path / "s" / "shard-00000.tar"
    _truncate(first, _member_offsets(first)["000001.jpg"][1] + 100)
    out = tmp_path / "out"
    assert caption_run(server, f"{pattern}::{again}", out) == 0
    printed = capsys.readouterr().out
    assert "passed over: 1 duplicate key, 1 unreadable shard" in printed  # the cut sample goes with its shard
    rows = read_rows(out)
    assert sorted(r["image_path"] for r in rows) == ["000000", "000003", "000004", "000005"]
    assert all(r["status"] == "ok" for r in rows)
    assert caption_run(server, f"{pattern}::{again}", out) == 0 and len(read_rows(out)) == 4


def test_kept_members_land_in_every_row_as_string_columns(server, tmp_path, write_job):
    """keep_columns on shards: `txt` and `json` members and `__key__` in the Parquet rows (ok and bad
    image alike), typed as kept_schema says, and in a jsonl export."""
    samples = [_sample(0, "coffee_cup.jpg"), _sample(1, "chelsea_the_cat.jpg"),
               {"__key__": "broken", "jpg": b"not a jpeg", "txt": "a broken one"}]
    pattern = write_shards(tmp_path / "s", samples)
    job = write_job(tmp_path / "job.toml", limits_max_attempts=2)
    job.write_text(job.read_text() + '\n[input]\nkeep_columns = ["txt", "json", "__key__"]\n')
    out = tmp_path / "out"
    assert run_main("run", pattern, "--job", job, "--out", out, "--base-url", server.base_url, "--no-progress") == 1
    (part,) = out.glob("part-*.parquet")
    schema = pq.read_schema(part)
    assert [schema.field(n).type for n in ("txt", "json", "__key__")] == [pa.string()] * 3
    rows = {r["image_path"]: r for r in read_rows(out)}
    assert rows["000000"]["txt"] == "caption 0" and json.loads(rows["000001"]["json"])["index"] == 1
    assert rows["broken"]["status"] == "error" and rows["broken"]["txt"] == "a broken one"
    assert {r["__key__"] for r in rows.values()} == set(rows)
    assert run_main("export", out, "--to", "jsonl", "--dest", tmp_path / "e") in (0, 1)
    (written,) = (tmp_path / "e").glob("*.jsonl")
    exported = [json.loads(line) for line in written.read_text().splitlines()]
    assert {(e["image_path"], e["txt"]) for e in exported} == {("000000", "caption 0"), ("000001", "caption 1")}
