"""store/sink.py: where rows go: the `Sink` interface, and `Store`, the out folder's journal and parts.

Owns writing the out folder (layout.py names its files). A segment and the part made from it
share a number, which is the whole recovery rule: on open, a journal whose part exists was
already converted (the crash came before the delete), so it is deleted; any other journal is
converted now, its torn last line (if any) dropped. A crash at any line therefore loses at most
the line being written, and never writes a row twice. No network, no images.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import JobError
from ..records import Result
from .files import fsync_path, write_atomic
from .index import HashSet, iter_rows, resume_index
from .layout import JOB_FILE, journal_number, journal_path, journals, part_path, parts
from .lock import OutFolderLock
from .schema import SCHEMA, read_journal, result_line

__all__ = ["Sink", "Store"]

log = logging.getLogger(__name__)

CONVERT_BATCH = 4096  # journal rows per Parquet row group
_COPIED = ("image_path", "model", "caption", "finish_reason", "fields")  # what a duplicate takes from its original


class Sink(Protocol):
    """Where a driver's rows go. `append` is cheap and safe to call from the event loop; the rest
    may block (call them from a thread). Today's implementation is `Store`; another engine may
    bring one whose parts are named per writer."""

    out: Path

    def append(self, result: Result) -> None:
        """Record one ended attempt (durable against a crash of this process at once)."""

    def sync(self) -> None:
        """Make what was appended durable against a power cut too."""

    def roll_if_due(self) -> None:
        """Turn the rows appended so far into a Parquet part if one is due."""

    def close(self) -> None:
        """Turn every row appended into parts."""

    def scrub(self, text: str) -> str:
        """`text` without any secret the sink was told to keep out."""


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
        numbers = {number for number, _ in parts(self.out)}
        for number in sorted(numbers):
            _upgrade_part(self.out, number)
        for number, path in sorted(journals(self.out)):
            if number in numbers:
                path.unlink()  # converted before the crash, not yet deleted
            else:
                self.convert(path)
            numbers.add(number)
        self._segment = max(numbers, default=0)

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
            self._file = open(journal_path(self.out, self._segment), "a", encoding="utf-8")
        self._file.write(result_line(result))
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
        return journal_path(self.out, self._segment)

    def sync(self) -> None:
        """fsync the open journal segment: what was appended survives a power cut too."""
        if self._file is not None:
            os.fsync(self._file.fileno())

    def convert(self, journal: Path) -> Path | None:
        """Write a journal segment's rows as its Parquet part, atomically, then delete the segment."""
        number = journal_number(journal)
        part = part_path(self.out, number)
        tmp = self.out / f"_part-{number:05d}.tmp"
        rows = read_journal(journal)
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
            fsync_path(tmp)
            os.replace(tmp, part)
            fsync_path(self.out)
        journal.unlink()
        fsync_path(self.out)
        pa.default_memory_pool().release_unused()  # hand the conversion's buffers back: RSS stays flat
        return part if writer is not None else None

    def roll_if_due(self) -> None:
        """Rotate and convert the open segment if it is due, in this thread."""
        if self.should_rotate() and (segment := self.rotate()) is not None:
            self.convert(segment)

    def close(self) -> None:
        """Rotate and convert the open segment: after this every row is in a part."""
        segment = self.rotate()
        if segment is not None:
            self.convert(segment)

    def done_keys(self) -> HashSet:
        """Key hashes of images whose latest row is `ok`: what a resumed run skips."""
        return self.resume_index()[0]

    def resume_index(self) -> tuple[HashSet, HashSet]:
        """`index.resume_index` of this folder for this job: (done key hashes, sent sha hashes)."""
        return resume_index(self.out, self.fingerprint)

    def find_ok_by_sha(self, sha256: str) -> dict[str, Any] | None:
        """The latest ok row (caption, model, ...) of an image with this sha256, or None.

        Scans the parts' sha column and the open journal segment: for the rare duplicate whose
        original is not in the online driver's small cache. Safe to call from a worker thread.
        """
        found = None
        columns = ["image_sha256", "status", "dedup_of", "job_fingerprint", *_COPIED]
        for batch in iter_rows(self.out, columns=columns):
            for i, sha in enumerate(batch["image_sha256"]):
                if sha == sha256 and self._is_original(batch["status"][i], batch["dedup_of"][i],
                                                       batch["job_fingerprint"][i]):
                    found = {name: batch[name][i] for name in _COPIED}
        try:
            for row in read_journal(journal_path(self.out, self._segment)):
                if row.get("image_sha256") == sha256 and self._is_original(row["status"], row.get("dedup_of"),
                                                                          row.get("job_fingerprint")):
                    found = {name: row[name] for name in _COPIED}
        except FileNotFoundError:
            pass  # rotated and converted meanwhile: its rows were in the parts read above, or none yet
        return found

    def _is_original(self, status: str, dedup_of: str | None, fingerprint: str | None) -> bool:
        return status == "ok" and not dedup_of and fingerprint == self.fingerprint


def _upgrade_part(out: Path, number: int) -> None:
    """Rewrite a part whose schema is not SCHEMA (columns added since), atomically.

    Dataset readers take the schema of one part for all, so a folder mixing old and new parts
    would silently lose the new columns in `pd.read_parquet("out/")`.
    """
    part = part_path(out, number)
    if pq.read_schema(part).equals(SCHEMA):
        return
    table = pq.read_table(part)
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names
               else pa.nulls(table.num_rows, f.type) for f in SCHEMA]
    tmp = out / f"_part-{number:05d}.tmp"
    pq.write_table(pa.Table.from_arrays(columns, schema=SCHEMA), tmp, compression="zstd")
    fsync_path(tmp)
    os.replace(tmp, part)
    fsync_path(out)
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
