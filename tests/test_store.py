"""The store: pinned schema, atomic parts, crash recovery at every step, the resume index."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import EXPECTED_SCHEMA, read_rows
from pipeline.errors import JobError
from pipeline.records import Result
from pipeline.store import SCHEMA, Store, key_hash

SUMMARY = {"fingerprint": "f" * 16, "endpoint": {"model": "m"}}


def _row(path: str, status: str = "ok", caption: str = "a caption") -> Result:
    return Result(image_path=path, status=status, job_fingerprint="f" * 16,
                  created_at=dt.datetime(2026, 11, 26, 1, 2, 3, 456000, tzinfo=dt.timezone.utc),
                  caption=caption if status == "ok" else None, prompt_tokens=10, completion_tokens=5,
                  total_tokens=15, attempts=1, error_kind=None if status == "ok" else "transient")


def _open(out, **kw) -> Store:
    store = Store.open(out, SUMMARY, part_rows=kw.pop("part_rows", 1000), part_seconds=60, **kw)
    store.release()  # these tests open one folder many times over; the lock has tests of its own
    return store


def test_schema_is_pinned_and_result_maps_onto_it(tmp_path):
    assert SCHEMA.equals(EXPECTED_SCHEMA)
    assert set(f.name for f in dataclasses.fields(Result)) - {"kept"} == set(EXPECTED_SCHEMA.names)  # kept: extra columns
    store = _open(tmp_path)
    store.append(_row("a.jpg"))
    store.close()
    (part,) = tmp_path.glob("part-*.parquet")
    assert pq.read_schema(part).equals(EXPECTED_SCHEMA)
    (row,) = pq.read_table(part).to_pylist()
    assert row["created_at"] == dt.datetime(2026, 11, 26, 1, 2, 3, 456000, tzinfo=dt.timezone.utc)
    assert row["caption"] == "a caption" and row["cached_tokens"] is None


def test_rotation_makes_numbered_parts_and_no_journal_is_left(tmp_path):
    store = _open(tmp_path, part_rows=2)
    for i in range(5):
        store.append(_row(f"{i}.jpg"))
        if store.should_rotate():
            store.convert(store.rotate())
    store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_job.json", "_lock", "part-00001.parquet", "part-00002.parquet",
                                                          "part-00003.parquet"]
    assert [r["image_path"] for r in read_rows(tmp_path)] == [f"{i}.jpg" for i in range(5)]


def test_crash_before_conversion_recovers_journal_into_a_part(tmp_path):
    store = _open(tmp_path)
    store.append(_row("a.jpg"))
    store.append(_row("b.jpg"))
    # no close(): the process dies here; the journal was flushed line by line
    _open(tmp_path)
    assert [r["image_path"] for r in read_rows(tmp_path)] == ["a.jpg", "b.jpg"]
    assert not list(tmp_path.glob("_journal-*"))


def test_crash_after_part_rename_before_journal_delete_writes_no_duplicate(tmp_path):
    store = _open(tmp_path)
    store.append(_row("a.jpg"))
    segment = store.rotate()
    kept = segment.read_bytes()
    store.convert(segment)
    segment.write_bytes(kept)  # as if the delete never happened
    _open(tmp_path)
    assert [r["image_path"] for r in read_rows(tmp_path)] == ["a.jpg"]


def test_torn_last_line_and_stale_tmp_are_dropped(tmp_path):
    store = _open(tmp_path)
    store.append(_row("a.jpg"))
    segment = store.rotate()
    with open(segment, "a") as handle:
        handle.write('{"image_path": "b.jpg", "sta')
    (tmp_path / "_part-00009.tmp").write_bytes(b"half a parquet file")
    reopened = _open(tmp_path)
    assert [r["image_path"] for r in read_rows(tmp_path)] == ["a.jpg"]
    assert not list(tmp_path.glob("_part-*"))
    reopened.append(_row("c.jpg"))
    reopened.close()
    assert sorted(p.name for p in tmp_path.glob("part-*")) == ["part-00001.parquet", "part-00002.parquet"]


def test_done_keys_follow_the_latest_row(tmp_path):
    store = _open(tmp_path)
    store.append(_row("a.jpg", "error"))
    store.append(_row("b.jpg", "ok"))
    store.append(_row("c.jpg", "ok"))
    store.convert(store.rotate())
    store.append(_row("a.jpg", "ok"))
    store.append(_row("c.jpg", "error"))
    store.close()
    done = _open(tmp_path).done_keys()
    assert [name for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg") if key_hash(name) in done] == ["a.jpg", "b.jpg"]
    assert len(done) == 2


def test_another_job_is_refused_unless_allowed(tmp_path):
    _open(tmp_path).close()
    other = {"fingerprint": "0" * 16, "endpoint": {"model": "other"}}
    with pytest.raises(JobError, match="another job.*--allow-job-change"):
        Store.open(tmp_path, other, part_rows=10, part_seconds=60)
    Store.open(tmp_path, other, part_rows=10, part_seconds=60, allow_other_job=True)
    recorded = json.loads((tmp_path / "_job.json").read_text())
    assert recorded["fingerprints"] == ["f" * 16, "0" * 16]


def test_out_folder_reads_as_one_dataset_with_pandas_and_duckdb(tmp_path):
    import duckdb
    import pandas as pd

    store = _open(tmp_path, part_rows=1)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        store.append(_row(name))
        store.convert(store.rotate())
    store.append(_row("d.jpg"))  # still in the open journal: readers must skip `_` files
    assert sorted(pd.read_parquet(tmp_path)["image_path"]) == ["a.jpg", "b.jpg", "c.jpg"]
    count = duckdb.sql(f"select count(*) from read_parquet('{tmp_path}/*.parquet')").fetchall()[0][0]
    assert count == 3


def test_parts_from_an_older_schema_are_upgraded_so_readers_see_every_column(tmp_path):
    import pandas as pd

    old_schema = pa.schema([f for f in EXPECTED_SCHEMA if f.name not in ("dedup_of", "fields", "flags")])
    old = pa.Table.from_pylist([{"image_path": "old.jpg", "status": "ok", "caption": "c", "attempts": 1,
                                 "job_fingerprint": "f" * 16}], schema=old_schema)
    pq.write_table(old, tmp_path / "part-00001.parquet")
    store = _open(tmp_path)
    store.append(_row("new.jpg"))
    store.close()
    assert all(pq.read_schema(p).equals(EXPECTED_SCHEMA) for p in tmp_path.glob("part-*.parquet"))
    frame = pd.read_parquet(tmp_path)
    assert {"dedup_of", "fields", "flags"} <= set(frame.columns) and len(frame) == 2


def test_latest_rows_replace_earlier_rows_of_the_same_image_and_hash_sets_take_additions():
    import array

    from pipeline.store import HashSet, LatestRows

    hashes = array.array("Q", [5, 3, 5, 9, 3, 1, 2**64 - 1])
    oks = [1, 1, 0, 1, 1, 0, 1]
    latest = LatestRows.of_hashes(hashes)
    assert [latest.is_latest(i) for i in range(len(hashes))] == [False, False, True, True, True, True, True]
    done = HashSet.of(h for i, (h, ok) in enumerate(zip(hashes, oks)) if ok and latest.is_latest(i))
    assert [h for h in (1, 3, 5, 9, 2**64 - 1) if h in done] == [3, 9, 2**64 - 1]
    plain = HashSet.of(array.array("Q", [7, 2, 7]))
    plain.add(4)
    plain.add(7)
    assert (2 in plain, 4 in plain, 7 in plain, 8 in plain, len(plain)) == (True, True, True, False, 3)
    assert 1 not in HashSet.of(array.array("Q")) and LatestRows.of_hashes(array.array("Q")).is_latest(0)


def test_the_resume_index_follows_the_latest_row_of_each_image(tmp_path):
    from pipeline.store import key_hash, resume_index

    store = Store.open(tmp_path, SUMMARY, part_rows=10, part_seconds=60)
    for path, status, sha in [("a.jpg", "error", None), ("b.jpg", "ok", "bb"), ("a.jpg", "ok", "aa"),
                              ("b.jpg", "error", None)]:
        store.append(dataclasses.replace(_row(path, status), image_sha256=sha))
    store.close()
    store.release()
    done, shas = resume_index(tmp_path, SUMMARY["fingerprint"])
    assert key_hash("a.jpg") in done and key_hash("b.jpg") not in done  # b's latest row is an error
    assert key_hash("aa") in shas and key_hash("bb") in shas  # both were sent and answered once


def test_an_out_folder_has_one_writer_in_a_process_too(tmp_path):
    from pipeline.store import OutFolderLock

    held = OutFolderLock(tmp_path)
    with pytest.raises(JobError, match="in use by another run in this process"):
        Store.open(tmp_path, SUMMARY, part_rows=10, part_seconds=60)
    held.release()
    Store.open(tmp_path, SUMMARY, part_rows=10, part_seconds=60).release()  # free again


# --- hostile values: a row that cannot be converted never wedges the folder -------------------


def test_a_journal_line_no_column_can_hold_is_quarantined_and_the_rest_converts(tmp_path, caplog):
    store = _open(tmp_path)
    store.append(_row("a.jpg"))
    store.rotate()
    journal = next(tmp_path.glob("_journal-*.jsonl"))
    good = journal.read_text().splitlines()
    wedge = json.loads(good[0]) | {"image_path": "b.jpg", "completion_tokens": 10**15}  # as an older version wrote
    lines = [good[0], json.dumps(wedge), "this is not JSON", json.dumps({**wedge, "image_path": "c.jpg",
                                                                          "completion_tokens": 7})]
    journal.write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING"):
        _open(tmp_path).close()  # recovery on open
    assert [r["image_path"] for r in read_rows(tmp_path)] == ["a.jpg", "c.jpg"]
    quarantine = (tmp_path / f"_quarantine-{journal.name[9:14]}.jsonl").read_text().splitlines()
    assert sorted(quarantine) == sorted(lines[1:3]) and not journal.exists()
    assert "2 line(s) could not become Parquet rows" in caplog.text and "_quarantine-" in caplog.text
    _open(tmp_path).close()  # and every later open works too
    assert len(read_rows(tmp_path)) == 2


def test_append_keeps_out_numbers_no_column_holds(tmp_path):
    store = _open(tmp_path)
    store.append(dataclasses.replace(_row("a.jpg"), completion_tokens=10**15, prompt_tokens=-3, latency_ms=2**40,
                                     attempts=70_000, total_tokens=True))
    store.close()
    (row,) = read_rows(tmp_path)
    assert [row[c] for c in ("completion_tokens", "prompt_tokens", "latency_ms", "attempts", "total_tokens")] \
        == [None] * 5


def test_append_redacts_every_prefix_of_a_secret_in_every_server_text(tmp_path):
    secret = "sk-live-0123456789abcdef0123456789"
    store = _open(tmp_path)
    store.keep_out(secret)
    store.append(dataclasses.replace(_row("a.jpg"), caption=f"key {secret[:10]}!", model=secret, request_id=secret[:30],
                                     fields=json.dumps({"k": secret})))
    store.append(dataclasses.replace(_row(f"{secret[:3]}.jpg", status="error"), error=f"echo {secret[:-1]}"))
    store.close()
    first, second = read_rows(tmp_path)
    assert first["caption"] == "key [redacted]!" and first["model"] == first["request_id"] == "[redacted]"
    assert json.loads(first["fields"]) == {"k": "[redacted]"}
    assert second["error"] == "echo [redacted]" and second["image_path"] == "sk-.jpg"  # keys are ours: untouched


def test_a_corrupt_part_is_named_in_one_line(tmp_path):
    store = _open(tmp_path)
    store.append(_row("a.jpg"))
    store.close()
    part = next(tmp_path.glob("part-*.parquet"))
    part.write_bytes(part.read_bytes()[:40])
    with pytest.raises(JobError, match=f"{part.name}: not a readable Parquet part"):
        _open(tmp_path)
