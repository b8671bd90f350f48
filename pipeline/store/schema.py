"""store/schema.py: the one Parquet schema of an out folder, and the journal line format of a row.

`Result` (records.py) maps onto `SCHEMA` field by field; a test pins the schema literally. Pure.

A job's `[input] keep_columns` add columns after SCHEMA's, with the input's Arrow types
(`with_kept`). In a journal line their values sit under one key, `"kept"`, as JSON (`json_value`
writes what JSON has no type for: bytes as base64, dates and times as ISO 8601, decimals as text);
`kept_values` turns them back into values of their Arrow types when the line becomes a row.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import decimal
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..records import Result

__all__ = ["SCHEMA", "INT_BOUNDS", "TEXT_COLUMNS", "KEPT", "JournalLine", "result_line", "journal_lines",
           "read_journal", "with_kept", "json_value", "kept_values"]

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

KEPT = "kept"
"""The `Result` field, and the journal key, holding a row's keep_columns values (not a column itself)."""
_FIELDS = tuple(f.name for f in dataclasses.fields(Result) if f.name != KEPT)
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
    if result.kept:
        row[KEPT] = dict(result.kept)
    return json.dumps(row, ensure_ascii=False, separators=(",", ":"), default=json_value) + "\n"


# --- kept columns ----------------------------------------------------------------------------


def with_kept(kept: pa.Schema) -> pa.Schema:
    """SCHEMA followed by the kept columns: the schema of an out folder whose job keeps `kept`."""
    return pa.schema([*SCHEMA, *kept]) if len(kept) else SCHEMA


def json_value(value: object) -> object:
    """`json.dumps`'s `default`: a kept value JSON has no type for, as JSON (`kept_values` reverses it)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (dt.date, dt.time)):  # datetime is a date
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value // dt.timedelta(microseconds=1)
    if isinstance(value, decimal.Decimal):
        return str(value)
    raise TypeError(f"a kept value of type {type(value).__name__} cannot be journalled")


def kept_values(kept: Mapping[str, object] | None, schema: pa.Schema) -> dict[str, object]:
    """A journal line's kept values as values of the kept columns' types (absent ones None).

    Raises ValueError (or TypeError) for a value its type cannot take back.
    """
    kept = kept or {}
    return {f.name: _from_json(kept.get(f.name), f.type) for f in schema}


def _from_json(value: object, kind: pa.DataType) -> object:
    if value is None:
        return None
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind):
        return base64.b64decode(value, validate=True) if isinstance(value, str) else value
    if pa.types.is_timestamp(kind) and isinstance(value, str):
        return dt.datetime.fromisoformat(value)
    if pa.types.is_date(kind) and isinstance(value, str):
        return dt.date.fromisoformat(value)
    if pa.types.is_time(kind) and isinstance(value, str):
        return dt.time.fromisoformat(value)
    if pa.types.is_duration(kind) and isinstance(value, int):
        return dt.timedelta(microseconds=value)
    if pa.types.is_decimal(kind) and isinstance(value, str):
        return decimal.Decimal(value)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return [_from_json(v, kind.value_type) for v in value]
    if pa.types.is_map(kind):
        return [(_from_json(k, kind.key_type), _from_json(v, kind.item_type)) for k, v in value]
    if pa.types.is_struct(kind):
        return {f.name: _from_json(value.get(f.name), f.type) for f in kind}
    return value


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
