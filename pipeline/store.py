"""store.py: the durable record of a run: job file, write-ahead journal, Parquet parts, resume index.

Owns the out folder and nothing else (no network, no images). Layout:

    _job.json                 the job as run and its fingerprint (no secrets)
    _journal-00007.jsonl      the open journal segment: one JSON line per ended attempt, flushed at once
    part-00001.parquet ...    closed segments, converted atomically (tmp file, fsync, rename, fsync dir)

A segment and the part made from it share a number, which is the whole recovery rule: on open, a
journal whose part exists was already converted (the crash came before the delete), so it is
deleted; any other journal is converted now, its torn last line (if any) dropped. A crash at any
line therefore loses at most the line being written, and never writes a row twice.
Names starting with `_` are skipped by pyarrow, pandas, DuckDB and polars, so `out/` reads as
one dataset.
"""

from __future__ import annotations

import array
import bisect
import dataclasses
import datetime as dt
import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import JobError
from .records import Result

__all__ = ["SCHEMA", "Store", "HashSet", "OutFolderLock", "key_hash", "iter_rows", "write_atomic", "BATCH_DIR",
           "OPEN_CHUNK_STATES", "open_batch_chunks"]

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        ("image_path", pa.string()),
        ("image_sha256", pa.string()),
        ("file_bytes", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sent_width", pa.int32()),
        ("sent_height", pa.int32()),
        ("sent_bytes", pa.int32()),
        ("model", pa.string()),
        ("caption", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("total_tokens", pa.int32()),
        ("cached_tokens", pa.int32()),
        ("reasoning_tokens", pa.int32()),
        ("mode", pa.string()),
        ("usage_source", pa.string()),
        ("status", pa.string()),
        ("error_kind", pa.string()),
        ("error", pa.string()),
        ("attempts", pa.int16()),
        ("latency_ms", pa.int32()),
        ("request_id", pa.string()),
        ("dedup_of", pa.string()),
        ("fields", pa.string()),
        ("flags", pa.list_(pa.string())),
        ("job_fingerprint", pa.string()),
        ("created_at", pa.timestamp("ms", tz="UTC")),
    ]
)
"""One row per image attempt that ended. Change it here and in tests/test_store.py, deliberately."""

JOB_FILE = "_job.json"
BATCH_DIR = "_batch"  # the batch driver's durable record: chunk files and their states
OPEN_CHUNK_STATES = ("written", "uploaded", "submitted", "collecting")  # a chunk not yet collected
LOCK_FILE = "_lock"
CONVERT_BATCH = 4096  # journal rows per Parquet row group
INDEX_BATCH = 8192  # rows per batch when the resume index is read: a small, fixed transient
_JOURNAL = re.compile(r"^_journal-(\d{5,})\.jsonl$")
_PART = re.compile(r"^part-(\d{5,})\.parquet$")
_FIELDS = tuple(f.name for f in dataclasses.fields(Result))
_COPIED = ("image_path", "model", "caption", "finish_reason", "fields")  # what a duplicate takes from its original


def key_hash(key: str) -> int:
    """64-bit hash of a resume key: the index holds these, not the paths, to stay small.

    Two keys colliding in 64 bits has odds of about n²/2⁶⁵ (3e-8 for a million images).
    """
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")


class Store:
    """An out folder opened for one job; `append` results, `close` at the end.

    Not thread-safe: call `append`, `rotate` and `sync` from one thread (the event loop);
    `convert` of a rotated segment may run in a worker thread.
    """

    def __init__(self, out: str | Path, fingerprint: str, *, part_rows: int, part_seconds: float):
        self.out = Path(out)
        self.fingerprint = fingerprint
        self._part_rows = part_rows
        self._part_seconds = part_seconds
        self._file = None
        self._segment = 0
        self._rows_in_segment = 0
        self._opened_at = time.monotonic()
        self._lock: OutFolderLock | None = None
        self._secrets: tuple[str, ...] = ()

    @classmethod
    def open(cls, out: str | Path, job_summary: dict[str, Any], *, part_rows: int, part_seconds: float,
             allow_other_job: bool = False) -> "Store":
        """Open (or create) `out` for the job; recover what a crash left; refuse another job's folder.

        Raises JobError when `out` belongs to another job fingerprint and `allow_other_job` is false.
        """
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise JobError(f"{out}: --out names a file; give a folder (new or from an earlier run)")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise JobError(f"{out}: cannot create the out folder: {err.strerror or err}") from None
        lock = OutFolderLock(out)
        try:
            fingerprint = job_summary["fingerprint"]
            _check_job_file(out, job_summary, allow_other_job)
            store = cls(out, fingerprint, part_rows=part_rows, part_seconds=part_seconds)
            store._lock = lock
            store.recover()
        except BaseException:
            lock.release()
            raise
        return store

    def release(self) -> None:
        """Let other processes open the folder (call after `close`, when the run is over)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def recover(self) -> None:
        """Turn every journal segment left by an earlier run into its part; remove temp files;
        bring parts written by an older version up to the current SCHEMA."""
        for stale in self.out.glob("_part-*.tmp"):
            stale.unlink()
        parts = {int(m.group(1)) for p in self.out.iterdir() if (m := _PART.match(p.name))}
        for number in sorted(parts):
            _upgrade_part(self.out, number)
        for number, path in sorted(self._journals()):
            if number in parts:
                path.unlink()  # converted before the crash, not yet deleted
            else:
                self.convert(path)
            parts.add(number)
        self._segment = max(parts, default=0)

    def _journals(self) -> Iterator[tuple[int, Path]]:
        for path in self.out.iterdir():
            if m := _JOURNAL.match(path.name):
                yield int(m.group(1)), path

    def keep_out(self, *secrets: str | None) -> None:
        """Never write these strings (an API key, header values): `scrub` blanks them."""
        self._secrets = tuple(s for s in (*self._secrets, *secrets) if s and len(s) >= 4)

    def scrub(self, text: str) -> str:
        """`text` with every secret given to `keep_out` replaced by [redacted]."""
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text

    def append(self, result: Result) -> None:
        """Write one result to the journal and flush it to the OS (fsync happens in `sync`).

        A server that echoes a key back in an error message does not get it into the Parquet.
        """
        if self._secrets and result.error:
            result = dataclasses.replace(result, error=self.scrub(result.error))
        if self._file is None:
            self._segment += 1
            self._rows_in_segment = 0
            self._opened_at = time.monotonic()
            self._file = open(self._journal_path(self._segment), "a", encoding="utf-8")
        self._file.write(_result_line(result))
        self._file.flush()
        self._rows_in_segment += 1

    def should_rotate(self) -> bool:
        """True when the open segment is due to become a part (by rows or by age)."""
        if self._file is None:
            return False
        aged = time.monotonic() - self._opened_at >= self._part_seconds
        return self._rows_in_segment >= self._part_rows or aged

    def rotate(self) -> Path | None:
        """Close the open segment (fsynced) and return its path for `convert`; None if none open."""
        if self._file is None:
            return None
        self.sync()
        self._file.close()
        self._file = None
        return self._journal_path(self._segment)

    def sync(self) -> None:
        """fsync the open journal segment: what was appended survives a power cut too."""
        if self._file is not None:
            os.fsync(self._file.fileno())

    def convert(self, journal: Path) -> Path | None:
        """Write a journal segment's rows as its Parquet part, atomically, then delete the segment."""
        number = int(_JOURNAL.match(journal.name).group(1))
        part = self.out / f"part-{number:05d}.parquet"
        tmp = self.out / f"_part-{number:05d}.tmp"
        rows = _read_journal(journal)
        writer = None
        try:
            # A row group per CONVERT_BATCH rows: memory stays flat whatever part_rows is.
            while batch := list(itertools.islice(rows, CONVERT_BATCH)):
                writer = writer or pq.ParquetWriter(tmp, SCHEMA, compression="zstd")
                writer.write_table(pa.Table.from_pylist(batch, schema=SCHEMA))
        finally:
            if writer is not None:
                writer.close()
        if writer is not None:
            _fsync_path(tmp)
            os.replace(tmp, part)
            _fsync_path(self.out)
        journal.unlink()
        _fsync_path(self.out)
        pa.default_memory_pool().release_unused()  # hand the conversion's buffers back: RSS stays flat
        return part if writer is not None else None

    def close(self) -> None:
        """Rotate and convert the open segment: after this every row is in a part."""
        segment = self.rotate()
        if segment is not None:
            self.convert(segment)

    def _journal_path(self, number: int) -> Path:
        return self.out / f"_journal-{number:05d}.jsonl"

    def done_keys(self) -> HashSet:
        """Key hashes of images whose latest row is `ok`: what a resumed run skips."""
        return self.resume_index()[0]

    def resume_index(self) -> tuple[HashSet, HashSet]:
        """(key hashes of images whose latest row is ok, hashes of the sha256s of this job's ok rows).

        Hashes in sorted arrays, 8 bytes an image, rather than Python sets (~70 bytes an entry): a
        million done images cost 16 MB, not 140.
        """
        keys, oks, shas = array.array("Q"), array.array("b"), array.array("Q")
        columns = ["image_path", "status", "image_sha256", "job_fingerprint"]
        for batch in iter_rows(self.out, columns=columns, batch_size=INDEX_BATCH):
            for path, status, sha, fingerprint in zip(*(batch[c] for c in columns)):
                keys.append(key_hash(path))
                oks.append(status == "ok")
                if status == "ok" and sha and fingerprint == self.fingerprint:  # not another job's answer
                    shas.append(key_hash(sha))
        return HashSet.of_latest(keys, oks), HashSet.of(shas)

    def find_ok_by_sha(self, sha256: str) -> dict[str, Any] | None:
        """The latest ok row (caption, model, ...) of an image with this sha256, or None.

        Scans the parts' sha column and the open journal segment: for the rare duplicate whose
        original is not in the runner's small cache. Safe to call from a worker thread.
        """
        found = None
        columns = ["image_sha256", "status", "dedup_of", "job_fingerprint", *_COPIED]
        for batch in iter_rows(self.out, columns=columns):
            for i, sha in enumerate(batch["image_sha256"]):
                if sha == sha256 and self._is_original(batch["status"][i], batch["dedup_of"][i],
                                                       batch["job_fingerprint"][i]):
                    found = {name: batch[name][i] for name in _COPIED}
        try:
            for row in _read_journal(self._journal_path(self._segment)):
                if row.get("image_sha256") == sha256 and self._is_original(row["status"], row.get("dedup_of"),
                                                                          row.get("job_fingerprint")):
                    found = {name: row[name] for name in _COPIED}
        except FileNotFoundError:
            pass  # rotated and converted meanwhile: its rows were in the parts read above, or none yet
        return found

    def _is_original(self, status: str, dedup_of: str | None, fingerprint: str | None) -> bool:
        return status == "ok" and not dedup_of and fingerprint == self.fingerprint


class HashSet:
    """A set of 64-bit hashes: a sorted array (8 bytes each) built once, plus the few added later."""

    def __init__(self, ordered: array.array):
        self._sorted = ordered  # array('Q'), ascending, no repeats
        self._added: set[int] = set()

    @classmethod
    def of(cls, hashes: Iterable[int]) -> HashSet:
        """The set of `hashes` (any order, repeats allowed)."""
        ordered = array.array("Q")
        for value in sorted(hashes):  # a transient list; what stays is 8 bytes a hash
            if not ordered or ordered[-1] != value:
                ordered.append(value)
        return cls(ordered)

    @classmethod
    def of_latest(cls, hashes: array.array, flags: array.array) -> HashSet:
        """The hashes whose last occurrence (in the given order) has a true flag: latest row wins.

        Only the false ones (error rows: few) go in a dict, with where they were last seen.
        """
        last_false = {h: i for i, (h, flag) in enumerate(zip(hashes, flags)) if not flag}
        if not last_false:
            return cls.of(hashes)
        return cls.of(h for i, (h, flag) in enumerate(zip(hashes, flags)) if flag and last_false.get(h, -1) < i)

    def __contains__(self, value: int) -> bool:
        index = bisect.bisect_left(self._sorted, value)
        return (index < len(self._sorted) and self._sorted[index] == value) or value in self._added

    def add(self, value: int) -> None:
        if value not in self:
            self._added.add(value)

    def __len__(self) -> int:
        return len(self._sorted) + len(self._added)


class OutFolderLock:
    """An exclusive lock on an out folder for one process: two runs on one folder would each
    recover (and so delete) the other's open journal, and pay twice for the same images.

    flock(2) on `OUT/_lock`: the kernel drops it when the process dies, so a kill -9 leaves no
    stale lock. flock does not exclude a second descriptor of the same process reliably, so
    holders within this process are also kept in a table: a second one is refused the same way.
    """

    _held: dict[Path, list] = {}  # resolved folder → [fd, count]

    def __init__(self, out: Path):
        self._key = Path(out).resolve()
        if self._key in self._held:
            raise JobError(f"{out}: in use by another run in this process (pid {os.getpid()}); let it finish first")
        fd = os.open(self._key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise JobError(f"{out}: in use by another caption process (pid {pid}); let it finish or stop it, "
                           "then run again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._held[self._key] = [fd, 1]

    def release(self) -> None:
        held = self._held.get(self._key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del self._held[self._key]
            os.close(held[0])  # closing the descriptor drops the flock


def iter_rows(out: str | Path, columns: list[str], *, batch_size: int = 65_536) -> Iterator[dict[str, list]]:
    """Yield the out folder's rows, parts in order, a record batch at a time, as column lists.

    A column that a part lacks (written by an older version) comes back as nulls.
    """
    out = Path(out)
    parts = sorted((int(m.group(1)), p) for p in out.iterdir() if (m := _PART.match(p.name)))
    for _, part in parts:
        handle = pq.ParquetFile(part)
        present = [c for c in columns if c in handle.schema_arrow.names]
        for batch in handle.iter_batches(columns=present, batch_size=batch_size):
            rows = batch.to_pydict()
            yield {c: rows[c] if c in rows else [None] * batch.num_rows for c in columns}


def _upgrade_part(out: Path, number: int) -> None:
    """Rewrite a part whose schema is not SCHEMA (columns added since), atomically.

    Dataset readers take the schema of one part for all, so a folder mixing old and new parts
    would silently lose the new columns in `pd.read_parquet("out/")`.
    """
    part = out / f"part-{number:05d}.parquet"
    if pq.read_schema(part).equals(SCHEMA):
        return
    table = pq.read_table(part)
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names
               else pa.nulls(table.num_rows, f.type) for f in SCHEMA]
    tmp = out / f"_part-{number:05d}.tmp"
    pq.write_table(pa.Table.from_arrays(columns, schema=SCHEMA), tmp, compression="zstd")
    _fsync_path(tmp)
    os.replace(tmp, part)
    _fsync_path(out)
    log.info("%s: brought up to the current schema", part.name)


def _check_job_file(out: Path, summary: dict[str, Any], allow_other_job: bool) -> None:
    path = out / JOB_FILE
    if path.exists():
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            earlier = {}
        fingerprints = earlier.get("fingerprints") or [earlier.get("fingerprint")]
        if summary["fingerprint"] == fingerprints[-1]:
            return
        if not allow_other_job:
            raise JobError(
                f"{out}: holds results of another job (fingerprint {fingerprints[-1]}, model "
                f"{earlier.get('endpoint', {}).get('model')!r}); this job is {summary['fingerprint']}. "
                f"Use a new --out folder, or pass --allow-job-change to add to this one"
            )
        summary = {**summary, "fingerprints": [*fingerprints, summary["fingerprint"]]}
    else:
        summary = {**summary, "fingerprints": [summary["fingerprint"]]}
    write_atomic(path, json.dumps(summary, indent=2, ensure_ascii=False).encode("utf-8"))


def _result_line(result: Result) -> str:
    row = {name: getattr(result, name) for name in _FIELDS}
    row["created_at"] = int(result.created_at.timestamp() * 1000)
    return json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n"


def _read_journal(path: Path) -> Iterator[dict[str, Any]]:
    """Yield a journal's rows; a torn last line (a crash mid-write) is dropped with a log line."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            try:
                row = json.loads(line)
            except ValueError:
                log.warning("%s: line %d is torn (a crash mid-write); dropped", path.name, number)
                continue
            row["created_at"] = dt.datetime.fromtimestamp(row["created_at"] / 1000, dt.timezone.utc)
            yield row


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically: a temp file beside it, fsync, rename, fsync the folder."""
    tmp = path.with_name(f"_{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_batch_chunks(out: Path) -> int:
    """How many batch chunks of `out` are not collected yet (written, uploaded, with the provider).

    The online driver refuses to send such images too: that would pay twice.
    """
    count = 0
    for path in (Path(out) / BATCH_DIR).glob("chunk-*.json"):
        try:
            state = json.loads(path.read_text("utf-8")).get("state")
        except (OSError, ValueError):
            continue
        count += state in OPEN_CHUNK_STATES
    return count
