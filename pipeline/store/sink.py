"""store/sink.py: where rows go: the `Sink` interface, and `Store`, the out folder's journal and parts.

Owns writing the out folder (layout.py names its files). A segment and the part made from it
share a number, which is the whole recovery rule: on open, a journal whose part exists was
already converted (the crash came before the delete), so it is deleted; any other journal is
converted now, its torn last line (if any) dropped. A crash at any line therefore loses at most
the line being written, and never writes a row twice. A line that cannot become a Parquet row (a
value no column holds) never stops the others: it is moved to `_quarantine-NNNNN.jsonl` and logged,
so a folder is never wedged. Every row is checked before it is journalled: the run's secrets are
redacted from its text, and an integer its column cannot hold becomes null. No network, no images.

A job's `[input] keep_columns` become columns after SCHEMA's, with the input's types. Every part of
a folder has the same schema: `_job.json` records the kept columns, and a job that keeps other
columns (or the same with other types) is refused on open, never mixed in.
"""

from __future__ import annotations

import array
import base64
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
from ..redaction import keep_secret, redact
from .files import fsync_path, write_atomic
from .index import HashSet, iter_rows, original_dhashes, resume_index
from .layout import JOB_FILE, journal_number, journal_path, journals, part_path, parts, quarantine_path, unreadable_part
from .lock import OutFolderLock
from .schema import (INT_BOUNDS, KEPT, SCHEMA, TEXT_COLUMNS, JournalLine, journal_lines, kept_values, read_journal,
                     result_line, with_kept)

__all__ = ["Sink", "Store", "checked_row", "recorded_kept_schema"]

log = logging.getLogger(__name__)

CONVERT_BATCH = 4096  # journal rows per Parquet row group
_COPIED = ("image_path", "model", "caption", "finish_reason", "fields")  # what a duplicate takes from its original
_KEYS = ("image_path", "image_sha256", "dedup_of", "job_fingerprint")  # ours, never a server's: not redacted
_REDACTED = tuple(name for name in TEXT_COLUMNS if name not in _KEYS)
_COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "cache_write_tokens",
           "reasoning_tokens")


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

    def __init__(self, out: str | Path, fingerprint: str, *, part_rows: int, part_seconds: float,
                 kept_schema: pa.Schema | None = None):
        self.out = Path(out)
        self.fingerprint = fingerprint
        self.kept_schema = kept_schema if kept_schema is not None else pa.schema([])
        self.schema = with_kept(self.kept_schema)  # SCHEMA, then the job's kept columns
        self._part_rows = part_rows
        self._part_seconds = part_seconds
        self._file = None
        self._segment = 0
        self._rows_in_segment = 0
        self._opened_at = time.monotonic()
        self._lock: OutFolderLock | None = None

    @classmethod
    def open(cls, out: str | Path, job_summary: dict[str, Any], *, part_rows: int, part_seconds: float,
             allow_other_job: bool = False, kept_schema: pa.Schema | None = None) -> "Store":
        """Open (or create) `out` for the job; recover what a crash left; refuse another job's folder.

        `kept_schema`: the source's kept columns (`ImageSource.kept_schema`); None when no source is
        at hand (`caption batch collect`): the ones `out` records. Raises JobError when `out` belongs
        to another job fingerprint and `allow_other_job` is false, when it records other kept
        columns, or when a kept column is named like one of SCHEMA's.
        """
        if kept_schema is not None:
            _refuse_clashes(kept_schema)
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
            kept_schema = _check_job_file(out, job_summary, allow_other_job, kept_schema)
            store = cls(out, fingerprint, part_rows=part_rows, part_seconds=part_seconds, kept_schema=kept_schema)
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
            _upgrade_part(self.out, number, self.schema)
        for number, path in sorted(journals(self.out)):
            if number in numbers:
                path.unlink()  # converted before the crash, not yet deleted
            else:
                self.convert(path)
            numbers.add(number)
        self._segment = max(numbers, default=0)

    def keep_out(self, *secrets: str | None) -> None:
        """Never write these strings (an API key, header values), nor any prefix of 8 characters or
        more of one: `scrub` and `append` blank them (`redaction.keep_secret`)."""
        keep_secret(*secrets)

    def scrub(self, text: str) -> str:
        """`text` with every secret of the run (see `keep_out`) replaced by [redacted]."""
        return redact(text)

    def append(self, result: Result) -> None:
        """Write one result to the journal and flush it to the OS (fsync happens in `sync`).

        The row is `checked_row` first: a server that echoes the key back (in an error, a caption,
        a model name or an id) does not get it into the Parquet, and no number can wedge a part.
        """
        result = checked_row(result)
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
        """Write a journal segment's rows as its Parquet part, atomically, then delete the segment.

        A line that is not a row, or whose values no column can hold, goes to the segment's
        quarantine file (logged), never stopping the others; a torn last line is dropped.
        """
        number = journal_number(journal)
        part = part_path(self.out, number)
        tmp = self.out / f"_part-{number:05d}.tmp"
        quarantine = _Quarantine(quarantine_path(self.out, number))
        lines = journal_lines(journal)
        writer = None
        try:
            # A row group per CONVERT_BATCH rows: memory stays flat whatever part_rows is.
            while batch := list(itertools.islice(lines, CONVERT_BATCH)):
                table = _table(batch, quarantine, journal.name, self.schema, self.kept_schema)
                if table.num_rows:
                    writer = writer or pq.ParquetWriter(tmp, self.schema, compression="zstd")
                    writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()
        quarantine.close(journal.name)
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

    def original_dhashes(self) -> array.array:
        """`index.original_dhashes` of this folder for this job: what near dedupe matches against."""
        return original_dhashes(self.out, self.fingerprint)

    def find_ok_by_sha(self, sha256: str) -> dict[str, Any] | None:
        """The latest ok row (caption, model, ...) of an original with this sha256, or None.

        Scans the parts' sha column and the open journal segment: for the rare duplicate whose
        original is not in the online driver's small cache. Safe to call from a worker thread.
        """
        return self._find_original("image_sha256", sha256)

    def find_ok_by_dhash(self, dhash: int) -> dict[str, Any] | None:
        """The latest ok row of an original whose difference hash is `dhash`, or None (as `find_ok_by_sha`)."""
        return self._find_original("dhash", dhash)

    def _find_original(self, column: str, value: str | int) -> dict[str, Any] | None:
        found = None
        columns = list(dict.fromkeys([column, "status", "dedup_of", "job_fingerprint", *_COPIED]))
        for batch in iter_rows(self.out, columns=columns):
            for i, seen in enumerate(batch[column]):
                if seen == value and self._is_original(batch["status"][i], batch["dedup_of"][i],
                                                       batch["job_fingerprint"][i]):
                    found = {name: batch[name][i] for name in _COPIED}
        try:
            for row in read_journal(journal_path(self.out, self._segment)):
                if row.get(column) == value and self._is_original(row["status"], row.get("dedup_of"),
                                                                  row.get("job_fingerprint")):
                    found = {name: row[name] for name in _COPIED}
        except FileNotFoundError:
            pass  # rotated and converted meanwhile: its rows were in the parts read above, or none yet
        return found

    def _is_original(self, status: str, dedup_of: str | None, fingerprint: str | None) -> bool:
        return status == "ok" and not dedup_of and fingerprint == self.fingerprint


def checked_row(result: Result) -> Result:
    """`result` as it may be journalled: the run's secrets redacted from every text a server could
    have sent (caption, model, error, ids, fields), and any integer its column cannot hold (or a
    negative token count) null, logged. The last guard: a provider is meant to have checked already."""
    changes: dict[str, Any] = {}
    for name in _REDACTED:
        value = getattr(result, name)
        if value is not None:
            text = redact(value if isinstance(value, str) else str(value))
            if text is not value:
                changes[name] = text
    for name, (low, high) in INT_BOUNDS.items():
        value = getattr(result, name)
        if value is None:
            continue
        low = 0 if name in _COUNTS else low
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            log.warning("%s: %s=%.40r does not fit the column; stored as null", result.image_path, name, value)
            changes[name] = None
    if result.flags is not None and not all(isinstance(f, str) for f in result.flags):
        changes["flags"] = tuple(str(f) for f in result.flags)
    return dataclasses.replace(result, **changes) if changes else result


class _Quarantine:
    """The journal lines of one segment that could not become rows, kept as they were."""

    def __init__(self, path: Path):
        self.path = path
        self._handle = None
        self.lines = 0

    def keep(self, raw: bytes) -> None:
        if self._handle is None:
            self._handle = open(self.path, "ab")
        self._handle.write(raw if raw.endswith(b"\n") else raw + b"\n")
        self.lines += 1

    def close(self, journal_name: str) -> None:
        """Make what was kept durable (before the journal goes), and say so."""
        if self._handle is None:
            return
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        log.warning("%s: %d line(s) could not become Parquet rows; moved to %s, the rest converted",
                    journal_name, self.lines, self.path.name)


def _table(lines: list[JournalLine], quarantine: _Quarantine, journal_name: str, schema: pa.Schema,
           kept_schema: pa.Schema) -> pa.Table:
    """The rows of `lines` as a table of `schema` (SCHEMA and the kept columns); lines that are not
    rows, or that no column can hold, go to `quarantine` (a torn last line is dropped)."""
    rows = []
    for line in lines:
        if line.row is not None and _unpack_kept(line.row, kept_schema):
            rows.append(line)
        elif line.torn:
            log.warning("%s: line %d is torn (a crash mid-write); dropped", journal_name, line.number)
        else:
            quarantine.keep(line.raw)
    try:
        return pa.Table.from_pylist([line.row for line in rows], schema=schema)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        pass  # at least one row does not fit: find which, one at a time
    fitting = []
    for line in rows:
        try:
            pa.Table.from_pylist([line.row], schema=schema)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            quarantine.keep(line.raw)
            continue
        fitting.append(line.row)
    return pa.Table.from_pylist(fitting, schema=schema)


def _unpack_kept(row: dict[str, Any], kept_schema: pa.Schema) -> bool:
    """Put a journal row's kept values (under KEPT) in its columns, as their types; False when one
    cannot be (the line is then quarantined, as a value no column holds)."""
    kept = row.pop(KEPT, None)
    if not len(kept_schema):
        return True
    try:
        row.update(kept_values(kept if isinstance(kept, dict) else None, kept_schema))
    except (ValueError, TypeError, AttributeError):
        return False
    return True


def _upgrade_part(out: Path, number: int, schema: pa.Schema) -> None:
    """Rewrite a part whose schema is not SCHEMA (columns added since), atomically.

    Dataset readers take the schema of one part for all, so a folder mixing old and new parts
    would silently lose the new columns in `pd.read_parquet("out/")`.
    """
    part = part_path(out, number)
    try:
        if pq.read_schema(part).equals(schema):
            return
    except (pa.ArrowException, OSError) as err:
        raise unreadable_part(part, err) from None
    table = pq.read_table(part)
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names
               else pa.nulls(table.num_rows, f.type) for f in schema]
    tmp = out / f"_part-{number:05d}.tmp"
    pq.write_table(pa.Table.from_arrays(columns, schema=schema), tmp, compression="zstd")
    fsync_path(tmp)
    os.replace(tmp, part)
    fsync_path(out)
    log.info("%s: brought up to the current schema", part.name)


def _check_job_file(out: Path, summary: dict[str, Any], allow_other_job: bool,
                    kept_schema: pa.Schema | None) -> pa.Schema:
    """Refuse another job's folder (unless allowed) or other kept columns; record the job; return
    the folder's kept columns."""
    path = out / JOB_FILE
    summary = {**summary, **_kept_record(kept_schema if kept_schema is not None else pa.schema([]))}
    if path.exists():
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            earlier = {}
        recorded = recorded_kept_schema(earlier)
        if kept_schema is None:
            kept_schema = recorded
            summary.update(_kept_record(recorded))
        elif not kept_schema.equals(recorded):
            raise JobError(f"{out}: its rows carry the kept columns {_describe_kept(recorded)}; this job keeps "
                           f"{_describe_kept(kept_schema)} (each part must have one schema). Use a new --out "
                           "folder, or the [input] keep_columns (and input) the folder was written with")
        fingerprints = earlier.get("fingerprints") or [earlier.get("fingerprint")]
        if summary["fingerprint"] == fingerprints[-1]:
            return kept_schema
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
    return kept_schema if kept_schema is not None else pa.schema([])


def _kept_record(kept_schema: pa.Schema) -> dict[str, Any]:
    """What `_job.json` says of the kept columns: names and types to read, and the Arrow schema
    itself (IPC-serialized, base64) to compare and rebuild exactly."""
    return {"kept_columns": [{"name": f.name, "type": str(f.type)} for f in kept_schema],
            "kept_schema": base64.b64encode(kept_schema.serialize().to_pybytes()).decode("ascii")}


def recorded_kept_schema(job_file: dict[str, Any]) -> pa.Schema:
    """The kept columns an out folder's `_job.json` records (none for a folder older than them)."""
    encoded = job_file.get("kept_schema")
    if not encoded:
        return pa.schema([])
    try:
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(encoded)))
    except (ValueError, pa.ArrowException) as err:
        raise JobError(f"{JOB_FILE}: kept_schema is not readable ({err}); was the file edited?") from None


def _describe_kept(kept_schema: pa.Schema) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in kept_schema) or "(none)"


def _refuse_clashes(kept_schema: pa.Schema) -> None:
    """JobError for a kept column named like one of the out folder's own columns, or named twice."""
    clashes = [name for name in kept_schema.names if name in SCHEMA.names]
    if clashes:
        raise JobError(f"[input] keep_columns: {', '.join(clashes)} is also a column caption writes; rename it in "
                       "the input (or leave it out of keep_columns) so that both fit in one row")
    twice = sorted({name for name in kept_schema.names if kept_schema.names.count(name) > 1})
    if twice:
        raise JobError(f"[input] keep_columns names {', '.join(twice)} twice; name each column once")
