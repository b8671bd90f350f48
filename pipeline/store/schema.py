"""store/schema.py: the one Parquet schema of an out folder, and the journal line format of a row.

`Result` (records.py) maps onto `SCHEMA` field by field; a test pins the schema literally. Pure.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..records import Result

__all__ = ["SCHEMA", "INT_BOUNDS", "TEXT_COLUMNS", "JournalLine", "result_line", "journal_lines", "read_journal"]

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
        ("dhash", pa.int64()),
        ("model", pa.string()),
        ("caption", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("total_tokens", pa.int32()),
        ("cached_tokens", pa.int32()),
        ("cache_write_tokens", pa.int32()),
        ("reasoning_tokens", pa.int32()),
        ("mode", pa.string()),
        ("service_tier", pa.string()),
        ("usage_source", pa.string()),
        ("status", pa.string()),
        ("error_kind", pa.string()),
        ("error", pa.string()),
        ("attempts", pa.int16()),
        ("latency_ms", pa.int32()),
        ("request_id", pa.string()),
        ("dedup_of", pa.string()),
        ("dedup_distance", pa.int8()),
        ("fields", pa.string()),
        ("flags", pa.list_(pa.string())),
        ("job_fingerprint", pa.string()),
        ("created_at", pa.timestamp("ms", tz="UTC")),
    ]
)
"""One row per image attempt that ended. Change it here and in tests/conftest.py (EXPECTED_SCHEMA), deliberately."""

_FIELDS = tuple(f.name for f in dataclasses.fields(Result))
INT_BOUNDS: dict[str, tuple[int, int]] = {
    f.name: (-(2 ** (f.type.bit_width - 1)), 2 ** (f.type.bit_width - 1) - 1)
    for f in SCHEMA if pa.types.is_signed_integer(f.type)
}
"""Integer column → the (lowest, highest) value its Arrow type holds: a larger one would fail the part."""
TEXT_COLUMNS = tuple(f.name for f in SCHEMA if pa.types.is_string(f.type))


def result_line(result: Result) -> str:
    """One row as a journal line (JSON, `created_at` in Unix milliseconds), newline included."""
    row = {name: getattr(result, name) for name in _FIELDS}
    row["created_at"] = int(result.created_at.timestamp() * 1000)
    return json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n"


@dataclasses.dataclass(frozen=True, slots=True)
class JournalLine:
    """One line of a journal: its number, its bytes, and its row (None when it is not one)."""

    number: int
    raw: bytes
    row: dict[str, Any] | None
    torn: bool = False  # the last line, cut short by a crash mid-write (no newline, not JSON)


def journal_lines(path: Path) -> Iterator[JournalLine]:
    """Every line of a journal, read or not (see `JournalLine`)."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                row = json.loads(raw)
                row["created_at"] = dt.datetime.fromtimestamp(row["created_at"] / 1000, dt.timezone.utc)
            except (ValueError, TypeError, KeyError, OverflowError, OSError):
                yield JournalLine(number, raw, None, torn=not raw.endswith(b"\n"))
                continue
            yield JournalLine(number, raw, row)


def read_journal(path: Path) -> Iterator[dict[str, Any]]:
    """Yield a journal's rows; a line that is not one is skipped with a log line."""
    for line in journal_lines(path):
        if line.row is not None:
            yield line.row
        elif line.torn:
            log.warning("%s: line %d is torn (a crash mid-write); dropped", path.name, line.number)
        else:
            log.warning("%s: line %d is not a row; skipped", path.name, line.number)
