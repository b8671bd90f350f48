"""readers/inputs.py: how the run that wrote an out folder read its INPUT, for readers that read it again.

Export, review and report find images again through the input's source; they open it with the
`[input]` settings `_job.json` records, so a table is read by the same columns and a folder is
walked the same way. Reads `_job.json` only.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..job import InputSettings
from ..store import JOB_FILE

__all__ = ["run_input_settings"]


def run_input_settings(out: Path) -> InputSettings:
    """The `[input]` settings the run that wrote `out` used (defaults for an out folder older than them),
    so readers find its images the way its walk did (`follow_links`), and read a table as it did
    (format, path/bytes/key columns, shard members and keys). Storage options are recorded by name only: the environment's
    credentials apply."""
    try:
        table = json.loads((out / JOB_FILE).read_text(encoding="utf-8")).get("input") or {}
        columns = {name: table[name] for name in ("path_column", "bytes_column", "key_column")
                   if isinstance(table.get(name), str)}
        kind = table.get("format") if table.get("format") in ("auto", "folder", "table", "webdataset", "hf") else "auto"
        shards = {name: table[name] for name, kind_of in (("image_members", str), ("shard_keys", bool))
                  if isinstance(table.get(name), kind_of)}  # how WebDataset shards were read
        return InputSettings(follow_links=table.get("follow_links") is True,
                             max_file_mb=float(table.get("max_file_mb", InputSettings.max_file_mb)),
                             format=kind, **columns, **shards)
    except (OSError, ValueError, TypeError, AttributeError):
        return InputSettings()
