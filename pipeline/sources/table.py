"""sources/table.py: a table of image paths or image bytes (Parquet, CSV, JSONL) as an `ImageSource`, streamed.

INPUT is one table file, or a folder (or fsspec prefix) of Parquet shards read in name order as one
table. Each row is one item: `[input] path_column` holds where its image is (a local path, relative
ones resolved against the table's own folder; an fsspec URL; an http(s) URL), or `bytes_column`
holds the image itself (binary, or Hugging Face's `{bytes, path}` image struct). A Parquet table
written by `datasets` names its image feature in its schema metadata, so neither needs to be given.
The resume key is `key_column`'s value, else the path, else the row's number ("0", "1", ... over
the whole table, which stays the same only while the table does). `keep_columns` are carried into
every output row, with their Arrow types (`kept_schema`).

Rows are read a record batch at a time, Parquet one row group at a time (`ParquetFile.iter_batches`
over one row group), CSV and JSONL by blocks (`pyarrow.csv.open_csv`, `pyarrow.json.open_json`):
a table of ten million rows never sits in memory. Items hold locations, or for bytes_column the
bytes of one image (bounded by max_file_mb), never open files, so they pickle.

Every row ends as an item, so every row ends as an output row: a row without a path or bytes,
or with bytes over the limit, is an item whose read fails (an error row), not a skipped row.
`open_by_key` finds a row by key through an index of key hashes built in one pass of the key
column on first use (16 bytes a row), then reads forward to the row (Parquet skips whole row
groups by their footer counts).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import io
import json
import logging
import functools
import os
import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import JobError
from ..job import InputSettings
from .folder import FileItem
from .keys import too_big
from .fs import is_url, open_fs, scheme_of
from .urls import UrlItem, url_item

__all__ = ["TABLE_SUFFIXES", "TableSource", "TableReader", "FsspecItem", "BytesItem", "item_for_path", "hf_image_column",
           "conformed"]

log = logging.getLogger(__name__)

TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
"""File name ending → the table format `open_source` reads a file of (`format = "auto"`)."""
PATH_BATCH_ROWS = 4096  # rows per record batch when the table holds paths (a few hundred bytes a row)
BYTES_BATCH_ROWS = 64  # ...and when it holds the images themselves (a batch holds their bytes)
TEXT_BLOCK_BYTES = 1 << 20  # CSV / JSONL read block: what type inference sees, and one read's memory
_HTTP = ("http", "https")


# --- items -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FsspecItem:
    """An image at an fsspec URL (s3://, gs://, ...), read through fsspec, at most `max_bytes`.
    (http(s) URLs are `urls.UrlItem`s: downloaded with per-host limits and retries, or sent as URLs.)"""

    url: str
    key: str
    max_bytes: int
    kept: Mapping[str, Any] = field(default_factory=dict)
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # may hold credentials

    def open(self) -> BinaryIO:
        """The remote file opened for reading; OSError when it cannot be, or says it is over `max_bytes`."""
        try:
            fs, path = open_fs(self.url, self.storage_options)
            handle = fs.open(path, "rb")
        except OSError:
            raise
        except JobError as err:
            raise OSError(errno.EINVAL, str(err)) from None
        except Exception as err:  # noqa: BLE001  (aiohttp, botocore, ...: one bad URL is an error row)
            raise OSError(errno.EIO, f"cannot fetch {self.url}: {type(err).__name__}: {err}") from None
        size = getattr(handle, "size", None)
        if isinstance(size, int) and size > self.max_bytes:
            handle.close()
            raise OSError(errno.EFBIG, too_big(size, self.max_bytes))
        return handle

    def read(self) -> bytes:
        """The image's bytes; OSError when more than `max_bytes` arrive (the read stops there)."""
        with self.open() as handle:
            try:
                data = handle.read(self.max_bytes + 1)
            except OSError:
                raise
            except Exception as err:  # noqa: BLE001
                raise OSError(errno.EIO, f"cannot fetch {self.url}: {type(err).__name__}: {err}") from None
        if len(data) > self.max_bytes:
            raise OSError(errno.EFBIG, too_big(len(data), self.max_bytes, "more than"))
        return data


@dataclass(frozen=True, slots=True)
class BytesItem:
    """An image whose bytes sit in the table's row; or, with `data` None, a row without a readable image."""

    key: str
    data: bytes | None
    kept: Mapping[str, Any] = field(default_factory=dict)
    problem: str = "the row holds no image"  # why `data` is None (the error row says it)

    def open(self) -> BinaryIO:
        if self.data is None:
            raise OSError(errno.EINVAL, self.problem)
        return io.BytesIO(self.data)

    def read(self) -> bytes:
        if self.data is None:
            raise OSError(errno.EINVAL, self.problem)
        return self.data


def item_for_path(value: Any, key: str, settings: InputSettings, kept: Mapping[str, Any], *,
                  relative_to: str | None = None) -> FileItem | FsspecItem | UrlItem | BytesItem:
    """The item for one path_column value: the one place a path becomes an item.

    A local path (relative ones joined to `relative_to`, the table's folder), an fsspec URL (read
    with the job's storage_options) or an http(s) URL (`urls.py`: downloaded within the job's fetch
    limits, or sent as the URL itself with `send = "url"`). An empty cell gives an item whose read fails, so that the row becomes an error row.
    """
    max_bytes = int(settings.max_file_mb * 1_000_000)
    if value is None or (isinstance(value, str) and not value.strip()):
        return BytesItem(key, None, kept, "the row's path_column is empty")
    if not isinstance(value, str):
        return BytesItem(key, None, kept, f"the row's path_column holds {type(value).__name__}, not a path")
    scheme = scheme_of(value)
    if scheme is None and relative_to is not None and not os.path.isabs(value):
        scheme = scheme_of(relative_to)
        value = posixpath.join(relative_to, value) if scheme else os.path.join(relative_to, value)
    if scheme in _HTTP:
        return url_item(value, key, settings, kept)
    if scheme is not None:
        return FsspecItem(value, key, max_bytes, kept, dict(settings.storage_options))
    return FileItem(Path(value), key, max_bytes, kept)


def _bytes_item(value: Any, key: str, settings: InputSettings, kept: Mapping[str, Any],
                relative_to: str | None) -> FileItem | FsspecItem | UrlItem | BytesItem:
    """The item for one bytes_column value: bytes, or HF's `{bytes, path}` struct (its path when
    it holds no bytes: `datasets` stores images it did not embed by path)."""
    if isinstance(value, dict):
        if value.get("bytes") is None and value.get("path"):
            return item_for_path(value["path"], key, settings, kept, relative_to=relative_to)
        value = value.get("bytes")
    if value is None:
        return BytesItem(key, None, kept, "the row's bytes_column is empty")
    max_bytes = int(settings.max_file_mb * 1_000_000)
    if len(value) > max_bytes:
        return BytesItem(key, None, kept, too_big(len(value), max_bytes))
    return BytesItem(key, bytes(value), kept)


# --- readers ---------------------------------------------------------------------------------


class TableReader:
    """A table's schema and its record batches, `(first row number, batch)`, from a row on."""

    schema: pa.Schema
    where: str  # the table's name in messages
    folder: str  # where relative paths in it are resolved

    def batches(self, columns: list[str], batch_rows: int, start: int = 0) -> Iterator[tuple[int, pa.RecordBatch]]:
        raise NotImplementedError


def _open_binary(location: str, storage_options: dict[str, Any]) -> BinaryIO:
    if is_url(location):
        fs, path = open_fs(location, storage_options)
        return fs.open(path, "rb")
    return open(location, "rb")


@contextlib.contextmanager
def _opened(location: str, storage_options: dict[str, Any], what: str) -> Iterator[BinaryIO]:
    """The table file, opened for reading; JobError naming it when it cannot be; closed after."""
    try:
        handle = _open_binary(location, storage_options)
    except FileNotFoundError:
        raise JobError(f"{location}: file not found") from None
    except OSError as err:
        raise JobError(f"{location}: cannot open the {what}: {err.strerror or err}") from None
    with handle:
        yield handle


class _ParquetReader(TableReader):
    """One Parquet file, or every `.parquet` file under a folder or prefix (names sorted), as one table."""

    def __init__(self, location: str, storage_options: dict[str, Any]):
        self.where, self._options = location, storage_options
        self.files = _parquet_files(location, storage_options)
        if not self.files:
            raise JobError(f"{location}: holds no .parquet file; give a table (.parquet, .csv, .jsonl) or its folder")
        self.folder = location if _is_dir(location, storage_options) else _parent(location)
        with self._open(self.files[0]) as first:
            self.schema = first.schema_arrow

    @contextlib.contextmanager
    def _open(self, file: str) -> Iterator[pq.ParquetFile]:
        with _opened(file, self._options, "Parquet table") as raw:
            try:
                parquet = pq.ParquetFile(raw)
            except (pa.ArrowException, OSError) as err:
                raise JobError(f"{file}: not a readable Parquet file ({err})") from None
            yield parquet

    def row_count(self) -> int:
        """Rows in every shard, from their footers (nothing else is read)."""
        total = 0
        for file in self.files:
            with self._open(file) as handle:
                total += handle.metadata.num_rows
        return total

    def batches(self, columns, batch_rows, start=0):
        row = 0
        for file in self.files:
            with self._open(file) as handle:
                groups = [handle.metadata.row_group(i).num_rows for i in range(handle.num_row_groups)]
                for number, rows in enumerate(groups):
                    if row + rows <= start:  # a whole row group before `start`: skipped unread
                        row += rows
                        continue
                    for batch in handle.iter_batches(batch_size=batch_rows, row_groups=[number], columns=columns):
                        yield row, conformed(batch, self.schema, columns, file)
                        row += batch.num_rows


def conformed(batch: pa.RecordBatch, schema: pa.Schema, columns: list[str], file: str) -> pa.RecordBatch:
    """`batch` with the first shard's types: shards of one table must agree (JobError if they cannot)."""
    target = pa.schema([schema.field(name) for name in columns])
    if batch.schema.equals(target):
        return batch
    try:
        return batch.select(columns).cast(target)
    except (pa.ArrowException, KeyError, ValueError) as err:
        raise JobError(f"{file}: its columns do not match the first shard's ({err}); "
                       "every shard of one table needs the same columns and types") from None


class _TextReader(TableReader):
    """A CSV or JSONL file, read by blocks; the types are inferred from the first block, and the
    path and key columns are read as text."""

    def __init__(self, location: str, kind: str, settings: InputSettings):
        self.where, self.kind, self._settings = location, kind, settings
        self.folder = _parent(location)
        with self._reader() as reader:
            self.schema = reader.schema

    @contextlib.contextmanager
    def _reader(self) -> Iterator[Any]:
        """A streaming reader of the file (`pyarrow.csv.open_csv`, `pyarrow.json.open_json`)."""
        with _opened(self.where, self._settings.storage_options, f"{self.kind.upper()} table") as handle:
            try:
                if self.kind == "csv":
                    from pyarrow import csv

                    # CSV cells are untyped: a path or key of digits stays text ("007" is not 7).
                    text = {c: pa.string() for c in (self._settings.path_column, self._settings.key_column) if c}
                    reader = csv.open_csv(handle, read_options=csv.ReadOptions(block_size=TEXT_BLOCK_BYTES),
                                          convert_options=csv.ConvertOptions(column_types=text))
                else:
                    from pyarrow import json as pjson

                    reader = pjson.open_json(handle, read_options=pjson.ReadOptions(block_size=TEXT_BLOCK_BYTES))
            except pa.ArrowException as err:
                raise JobError(f"{self.where}: not a readable {self.kind.upper()} table ({err})") from None
            yield reader

    def batches(self, columns, batch_rows, start=0):
        row = 0
        with self._reader() as reader:
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                except pa.ArrowException as err:  # a later block that does not parse as the first did
                    raise JobError(f"{self.where}: cannot read past row {row} ({err})") from None
                if row + batch.num_rows > start:
                    for offset in range(0, batch.num_rows, batch_rows):
                        piece = batch.slice(offset, batch_rows)
                        if row + offset + piece.num_rows > start:
                            yield row + offset, piece.select(columns)
                row += batch.num_rows


def _parquet_files(location: str, options: dict[str, Any]) -> list[str]:
    """The table's Parquet files: the file itself, or those under the folder (hidden and `_` names
    left out, as pyarrow's datasets do), sorted by name."""
    if is_url(location):
        fs, path = open_fs(location, options)
        if not fs.isdir(path):
            return [location] if fs.exists(path) else []
        protocol = location.split("://", 1)[0]
        return [f"{protocol}://{p}" for p in sorted(fs.find(path)) if _shard_name(p)]
    root = Path(location)
    if root.is_file():
        return [location]
    if not root.is_dir():
        raise JobError(f"{location}: not found")
    return sorted(str(p) for p in root.rglob("*.parquet") if p.is_file() and _shard_name(str(p.relative_to(root))))


def _shard_name(path: str) -> bool:
    return path.endswith(".parquet") and not any(part.startswith((".", "_")) for part in path.split("/"))


def _is_dir(location: str, options: dict[str, Any]) -> bool:
    if is_url(location):
        fs, path = open_fs(location, options)
        return fs.isdir(path)
    return Path(location).is_dir()


def _parent(location: str) -> str:
    return posixpath.dirname(location.rstrip("/")) if is_url(location) else str(Path(location).parent)


# --- the source ------------------------------------------------------------------------------


def hf_image_column(schema: pa.Schema) -> str | None:
    """The first image feature a `datasets` table names in its schema metadata (`huggingface`), or None."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        features = json.loads(raw).get("info", {}).get("features", {})
    except (ValueError, AttributeError):
        return None
    return next((name for name, feature in features.items()
                 if isinstance(feature, dict) and feature.get("_type") == "Image"), None)


class TableSource:
    """A table of image paths or bytes, as an `ImageSource` (see the module docstring)."""

    def __init__(self, location: str | Path, settings: InputSettings | None = None, *, kind: str | None = None,
                 reader: TableReader | None = None, image_column: str | None = None):
        self.location = str(location)
        self.settings = settings = settings or InputSettings()
        self.skipped: dict[str, int] = {}  # nothing is passed over: every row is an item
        self._reader = reader or _open_reader(self.location, kind or _kind_of(self.location), settings)
        self.schema = self._reader.schema
        self.path_column, self.bytes_column = settings.path_column, settings.bytes_column
        if self.path_column is None and self.bytes_column is None:
            self.bytes_column = image_column or hf_image_column(self.schema)
        self._check_columns()
        self.batches_read = 0  # record batches read by walks so far (tests: the table is streamed)
        self.largest_batch = 0  # the most rows one of them held
        self._index: tuple[pa.UInt64Array, pa.UInt64Array] | None = None  # key hashes sorted, the row of each
        self._keyless_row: int | None = None  # the first row with no key_column value, found by _build_index
        self._cursor: tuple[int, pa.RecordBatch | None, Iterator | None] = (0, None, None)
        self._said_relative = False

    def __repr__(self) -> str:
        return f"TableSource({self.location!r})"

    # --- settings ---

    def _check_columns(self) -> None:
        where, names = self._reader.where, self.schema.names
        if self.path_column is None and self.bytes_column is None:
            raise JobError(f"{where}: a table needs [input] path_column (where each image is) or bytes_column "
                           f"(the image itself); its columns are {', '.join(names)}")
        if self.path_column is not None and self.bytes_column is not None:
            raise JobError("[input] path_column and bytes_column are both set; give one of them")
        for setting, name in (("path_column", self.path_column), ("bytes_column", self.bytes_column),
                              ("key_column", self.settings.key_column)):
            if name is not None and name not in names:
                raise JobError(f"[input] {setting} = {name!r} is not a column of {where}; its columns are "
                               f"{', '.join(names)}")
        missing = [name for name in self.settings.keep_columns if name not in names]
        if missing:
            raise JobError(f"[input] keep_columns names {', '.join(map(repr, missing))}, not a column of {where}; "
                           f"its columns are {', '.join(names)}")
        if self.bytes_column is not None and not _holds_bytes(kind := self.schema.field(self.bytes_column).type):
            raise JobError(f"[input] bytes_column = {self.bytes_column!r} is {kind} in {where}; it must be binary, "
                           "or an image struct of {bytes, path}")
        if self.path_column is not None and not _holds_text(kind := self.schema.field(self.path_column).type):
            raise JobError(f"[input] path_column = {self.path_column!r} is {kind} in {where}; it must hold text "
                           "(paths or URLs)")

    def kept_schema(self) -> pa.Schema:
        return pa.schema([self.schema.field(name) for name in self.settings.keep_columns])

    @functools.cached_property
    def remote_reads(self) -> bool:
        """True when the path column's first value is a URL to download (http(s) with send = "bytes",
        or an fsspec URL): reading an item then waits on the network, and drivers read with more threads."""
        if self.path_column is None:
            return False
        for _, batch in self._reader.batches([self.path_column], 64):
            value = next((v for v in batch.column(0).to_pylist() if isinstance(v, str) and v.strip()), None)
            if value is not None:
                scheme = scheme_of(value)
                return scheme is not None and not (scheme in _HTTP and self.settings.send == "url")
        return False

    # --- the walk ---

    def _columns(self) -> list[str]:
        wanted = [self.path_column or self.bytes_column, self.settings.key_column, *self.settings.keep_columns]
        return [name for name in dict.fromkeys(wanted) if name is not None]

    def _batch_rows(self) -> int:
        return BYTES_BATCH_ROWS if self.bytes_column is not None else PATH_BATCH_ROWS

    def items(self) -> Iterator[FileItem | FsspecItem | UrlItem | BytesItem]:
        """One item per row, in table order, a record batch at a time."""
        for start, batch in self._reader.batches(self._columns(), self._batch_rows()):
            self.batches_read += 1
            self.largest_batch = max(self.largest_batch, batch.num_rows)
            yield from self._items_of(start, batch)

    def _items_of(self, start: int, batch: pa.RecordBatch) -> Iterator[FileItem | FsspecItem | UrlItem | BytesItem]:
        values = batch.to_pydict()
        image = values[self.path_column or self.bytes_column]
        keys = values[self.settings.key_column] if self.settings.key_column else None
        for i in range(batch.num_rows):
            yield self._item(start + i, image[i], keys[i] if keys is not None else None,
                             {name: values[name][i] for name in self.settings.keep_columns})

    def _item(self, row: int, image: Any, key: Any, kept: dict[str, Any]) -> FileItem | FsspecItem | UrlItem | BytesItem:
        folder = self._reader.folder
        key = _key(row, key if self.settings.key_column else image if self.path_column else None)
        if self.path_column is not None:
            if not self._said_relative and isinstance(image, str) and image and not os.path.isabs(image) \
                    and not is_url(image):
                self._said_relative = True
                log.info("%s: relative paths in %s are read from the table's folder, %s", self._reader.where,
                         self.path_column, folder if is_url(folder) else Path(folder).resolve())
            return item_for_path(image, key, self.settings, kept, relative_to=folder)
        return _bytes_item(image, key, self.settings, kept, folder)

    def why_empty(self) -> str | None:
        """None when the table can be captioned: it has a row, and no two rows share a key (two would
        be one image to resume, dedupe and the readers, and one row's kept values would be lost).

        Checking the keys costs one pass of the key column (the index `open_by_key` then uses).
        """
        if not any(batch.num_rows for _, batch in self._reader.batches(self._columns()[:1], 1)):
            return "holds no rows: nothing to caption"
        if self._key_of_index():
            return None
        if self._index is None:
            self._index = self._build_index()
        if self._keyless_row is not None:  # its row-number key could be another row's id, and moves with the table
            return (f"row {self._keyless_row} has no value in {self.settings.key_column!r} ([input] key_column); "
                    "give every row a key, or leave key_column unset")
        ordered, order = self._index
        if len(ordered) < 2:
            return None
        same = pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1))
        for at in pc.indices_nonzero(same).to_pylist():
            rows = sorted((order[at].as_py(), order[at + 1].as_py()))
            first, second = self._key_at(rows[0]), self._key_at(rows[1])
            if first is None or first != second:
                continue  # two keys whose 64-bit hashes clash, not one key twice
            return (f"rows {rows[0]} and {rows[1]} have the same key {first!r} ([input] "
                    f"{'key_column' if self.settings.key_column else 'path_column'}); keys must be unique: set "
                    "[input] key_column to a column of unique values (an id)")
        return None

    def keys(self) -> Iterator[str]:
        """Every row's key, in table order, from the key (or path) column alone: what a count needs,
        without building items or reading a bytes column (the progress bar's total)."""
        column = self.settings.key_column or self.path_column
        if column is None:  # keys are row numbers: counted from Parquet footers, else by a walk of the items
            count = getattr(self._reader, "row_count", None)
            yield from (str(row) for row in range(count())) if count else (item.key for item in self.items())
            return
        for start, batch in self._reader.batches([column], PATH_BATCH_ROWS):
            for i, value in enumerate(batch.column(0).to_pylist()):
                yield _key(start + i, value)

    def _key_at(self, row: int) -> str | None:
        """The key of row `row`, read from the key (or path) column alone."""
        column = self.settings.key_column or self.path_column
        for start, batch in self._reader.batches([column], 1, start=row):
            if start <= row < start + batch.num_rows:
                return _key(row, batch.column(0)[row - start].as_py())
        return None

    # --- finding a row again ---

    def _key_of_index(self) -> bool:
        """True when keys are row numbers (no key_column, and bytes rather than paths)."""
        return self.settings.key_column is None and self.path_column is None

    def open_by_key(self, key: str) -> FileItem | FsspecItem | UrlItem | BytesItem | None:
        """The row with this key, or None when no row has it.

        Row-number keys are read directly; other keys are looked up in an index of key hashes,
        built on the first call in one pass of the key column (16 bytes a row).
        """
        if not isinstance(key, str) or not key:
            return None
        if self._key_of_index():
            row = int(key) if key.isdigit() and str(int(key)) == key else None
        else:
            row = self._row_of(key)
        item = None if row is None else self._item_at(row)
        return item if item is not None and item.key == key else None  # a hash collision names another row

    def _row_of(self, key: str) -> int | None:
        if self._index is None:
            self._index = self._build_index()
        hashes, rows = map(_words, self._index)
        wanted = _hash(key)
        at = bisect.bisect_left(hashes, wanted)
        return rows[at] if at < len(hashes) and hashes[at] == wanted else None

    def _build_index(self) -> tuple[pa.UInt64Array, pa.UInt64Array]:
        """(key hashes ascending, the row of each): one pass of the key column, 16 bytes a row."""
        column = self.settings.key_column or self.path_column
        chunks = []
        for start, batch in self._reader.batches([column], PATH_BATCH_ROWS):
            values = batch.column(0).to_pylist()
            if self.settings.key_column and self._keyless_row is None:
                self._keyless_row = next((start + i for i, v in enumerate(values) if v is None or v == ""), None)
            chunks.append(pa.array([_hash(_key(start + i, v)) for i, v in enumerate(values)], pa.uint64()))
        hashes = pa.concat_arrays(chunks) if chunks else pa.array([], pa.uint64())
        order = pc.sort_indices(hashes)  # a UInt64Array of row numbers
        return hashes.take(order), order

    def _item_at(self, row: int) -> FileItem | FsspecItem | UrlItem | BytesItem | None:
        """The item of row `row`, reading forward from the last batch found (or from its row group)."""
        start, batch, batches = self._cursor
        if batch is None or row < start:
            batches = self._reader.batches(self._columns(), self._batch_rows(), start=row)
            start, batch = next(batches, (0, None))
        while batch is not None and row >= start + batch.num_rows:
            start, batch = next(batches, (0, None))
        self._cursor = (start, batch, batches)
        if batch is None:
            return None
        return next(self._items_of(row, batch.slice(row - start, 1)))


def _key(row: int, value: Any) -> str:
    """The resume key of a row: its key (or path) value as text, or its row number when it has none."""
    return str(row) if value is None or value == "" else str(value)


def _hash(key: str) -> int:
    """64 bits of a key (the index holds these, not the keys): Python's own string hash (SipHash,
    PEP 456), ten times faster than blake2b here; salted per process, which suits an index that lives
    and dies with its process (a clash only costs `open_by_key` a look at the row, or the duplicate
    check a look at both rows)."""
    return hash(key) & 0xFFFF_FFFF_FFFF_FFFF


def _words(values: pa.UInt64Array) -> memoryview:
    """A uint64 array's values as a memoryview of unsigned 64-bit words (no copy; bisect reads it)."""
    if not len(values):
        return memoryview(b"").cast("Q")
    words = memoryview(values.buffers()[1]).cast("Q")
    return words[values.offset:values.offset + len(values)]


def _holds_bytes(kind: pa.DataType) -> bool:
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    return pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0


def _holds_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _kind_of(location: str) -> str:
    suffix = posixpath.splitext(location.rstrip("/"))[1].lower()
    return TABLE_SUFFIXES.get(suffix, "parquet")  # a folder of shards


def _open_reader(location: str, kind: str, settings: InputSettings) -> TableReader:
    if kind == "parquet":
        return _ParquetReader(location, settings.storage_options)
    return _TextReader(location, kind, settings)
