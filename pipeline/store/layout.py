"""store/layout.py: the names in an out folder, and what they say about it.

    _job.json                 the job as run and its fingerprint (no secrets)
    _lock                     held (flock) by the one process writing the folder
    _journal-00007.jsonl      the open journal segment: one JSON line per ended attempt
    _quarantine-00007.jsonl   lines of that segment that could not become Parquet rows, kept as they were
    part-00001.parquet ...    closed segments, each converted atomically
    _batch/                   the batch driver's durable record (chunk files and their states)

Names starting with `_` are skipped by pyarrow, pandas, DuckDB and polars, so `out/` reads as one
dataset. Pure names and read-only checks: nothing here writes.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from ..errors import JobError

__all__ = ["JOB_FILE", "LOCK_FILE", "BATCH_DIR", "OPEN_CHUNK_STATES", "part_path", "journal_path", "quarantine_path",
           "parts", "journals", "check_out_folder", "open_batch_chunks", "unreadable_part"]

log = logging.getLogger(__name__)

JOB_FILE = "_job.json"
LOCK_FILE = "_lock"
BATCH_DIR = "_batch"
OPEN_CHUNK_STATES = ("written", "uploaded", "submitted", "collecting")  # a batch chunk not yet collected
_JOURNAL = re.compile(r"^_journal-(\d{5,})\.jsonl$")
_PART = re.compile(r"^part-(\d{5,})\.parquet$")


def part_path(out: Path, number: int) -> Path:
    return out / f"part-{number:05d}.parquet"


def journal_path(out: Path, number: int) -> Path:
    return out / f"_journal-{number:05d}.jsonl"


def quarantine_path(out: Path, number: int) -> Path:
    return out / f"_quarantine-{number:05d}.jsonl"


def unreadable_part(part: Path, err: Exception) -> JobError:
    """The one-line error for a Parquet part that cannot be read (cut short, overwritten, not Parquet)."""
    return JobError(f"{part}: not a readable Parquet part ({type(err).__name__}: {err}); move it out of the "
                    f"folder (its images are then captioned again by the next run)")


def parts(out: Path) -> list[tuple[int, Path]]:
    """(number, path) of every Parquet part, in the order their rows were written."""
    return sorted((int(m.group(1)), p) for p in Path(out).iterdir() if (m := _PART.match(p.name)))


def journals(out: Path) -> Iterator[tuple[int, Path]]:
    """(number, path) of every journal segment (not yet a part)."""
    for path in Path(out).iterdir():
        if m := _JOURNAL.match(path.name):
            yield int(m.group(1)), path


def journal_number(path: Path) -> int:
    return int(_JOURNAL.match(path.name).group(1))


def check_out_folder(out: Path) -> None:
    """Raise JobError unless `out` is a folder written by `caption run`; warn of unconverted journals."""
    if not out.is_dir():
        raise JobError(f"{out}: out folder not found")
    if not (out / JOB_FILE).is_file():
        raise JobError(f"{out}: not an out folder of `caption run` (no {JOB_FILE})")
    pending = sum(1 for _ in journals(out))
    if pending:
        log.warning("%s: %d journal segment(s) are not yet Parquet parts (a run is going on, or one "
                    "crashed: the next `caption run` on this folder converts them); their rows are left out",
                    out, pending)
    kept = sorted(p.name for p in out.glob("_quarantine-*.jsonl"))
    if kept:
        log.warning("%s: journal lines that could not become rows are kept in %s; they are not counted",
                    out, ", ".join(kept))


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
