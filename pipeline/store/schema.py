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

__all__ = ["SCHEMA", "result_line", "read_journal"]

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
"""One row per image attempt that ended. Change it here and in tests/conftest.py (EXPECTED_SCHEMA), deliberately."""

_FIELDS = tuple(f.name for f in dataclasses.fields(Result))


def result_line(result: Result) -> str:
    """One row as a journal line (JSON, `created_at` in Unix milliseconds), newline included."""
    row = {name: getattr(result, name) for name in _FIELDS}
    row["created_at"] = int(result.created_at.timestamp() * 1000)
    return json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n"


def read_journal(path: Path) -> Iterator[dict[str, Any]]:
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
