"""store: the out folder's rules: its layout, the one schema, the one writer, THE latest-row rule.

    layout.py   the names in an out folder and read-only checks of them
    schema.py   the Parquet schema and the journal line format of a row
    sink.py     the `Sink` interface and `Store`: journal, atomic Parquet parts, crash recovery
    index.py    reading back: rows, `LatestRows` (latest row per image wins), the resume index
    lock.py     one process at a time on a folder
    files.py    atomic file replacement

No network, no images, no provider: only the out folder.
"""

from .files import open_atomic, write_atomic
from .index import HashSet, LatestRows, iter_latest_rows, iter_rows, key_hash, resume_index
from .layout import BATCH_DIR, JOB_FILE, OPEN_CHUNK_STATES, check_out_folder, open_batch_chunks
from .lock import OutFolderLock
from .schema import SCHEMA, json_value, with_kept
from .sink import Sink, Store, recorded_kept_schema

__all__ = ["SCHEMA", "Sink", "Store", "HashSet", "LatestRows", "OutFolderLock", "key_hash", "iter_rows",
           "iter_latest_rows", "resume_index", "write_atomic", "open_atomic", "check_out_folder", "open_batch_chunks", "BATCH_DIR",
           "JOB_FILE", "OPEN_CHUNK_STATES", "json_value", "with_kept", "recorded_kept_schema"]
