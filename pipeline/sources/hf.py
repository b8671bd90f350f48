"""sources/hf.py: a Hugging Face dataset on disk (a `save_to_disk` folder, or `datasets` Parquet shards).

A `save_to_disk` folder holds `dataset_info.json` (the features: which column is an `Image`),
`state.json` (the Arrow files, in order, under `_data_files`) and those files, each an Arrow IPC
stream. They are read here with pyarrow, a record batch at a time, memory-mapped when local, so
`datasets` itself is not imported (the format: `datasets.arrow_dataset.Dataset.save_to_disk` and
`load_from_disk`, https://huggingface.co/docs/datasets/package_reference/main_classes). Parquet
shards written by `Dataset.to_parquet` are a table (`sources/table.py`), whose schema metadata
names the image feature. The rows then become items as any table's do: the `Image` feature is the
bytes_column (its `{bytes, path}` struct), unless the job names a path_column or bytes_column.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..errors import JobError
from ..job import InputSettings
from .fs import is_url, open_fs
from .table import TableSource, TableReader, conformed

__all__ = ["DATASET_INFO", "STATE", "is_saved_dataset", "open_hf"]

DATASET_INFO, STATE, DATASET_DICT = "dataset_info.json", "state.json", "dataset_dict.json"
MAX_JSON_BYTES = 16 * 1024 * 1024  # dataset_info.json / state.json are small; a bigger one is not theirs


def _join(folder: str, name: str) -> str:
    return posixpath.join(folder, name) if is_url(folder) else str(Path(folder) / name)


def _exists(location: str, options: dict[str, Any]) -> bool:
    if is_url(location):
        fs, path = open_fs(location, options)
        return fs.exists(path)
    return Path(location).is_file()


def is_saved_dataset(location: str, options: dict[str, Any] | None = None) -> bool:
    """True for a `save_to_disk` folder of one dataset, or of a DatasetDict (its splits in subfolders)."""
    options = options or {}
    return (_exists(_join(location, DATASET_INFO), options) and _exists(_join(location, STATE), options)) \
        or _exists(_join(location, DATASET_DICT), options)


def _read_json(location: str, options: dict[str, Any]) -> dict[str, Any]:
    try:
        if is_url(location):
            fs, path = open_fs(location, options)
            with fs.open(path, "rb") as handle:
                raw = handle.read(MAX_JSON_BYTES + 1)
        else:
            with open(location, "rb") as handle:
                raw = handle.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise ValueError(f"over {MAX_JSON_BYTES} bytes")
        found = json.loads(raw)
        if not isinstance(found, dict):
            raise ValueError("not a JSON object")
        return found
    except (OSError, ValueError) as err:
        raise JobError(f"{location}: not a readable datasets file ({err})") from None


class _ArrowStreamReader(TableReader):
    """The Arrow IPC stream files a `save_to_disk` folder lists in its state.json, as one table."""

    def __init__(self, folder: str, options: dict[str, Any]):
        self.where, self.folder, self._options = folder, folder, options
        state = _read_json(_join(folder, STATE), options)
        names = [entry.get("filename") for entry in state.get("_data_files") or [] if isinstance(entry, dict)]
        if not names or not all(isinstance(n, str) and n and "/" not in n and n not in (".", "..") for n in names):
            raise JobError(f"{_join(folder, STATE)}: lists no Arrow files under _data_files (or names outside "
                           "the folder); is this a save_to_disk folder?")
        self.files = [_join(folder, name) for name in names]
        with self._stream(self.files[0]) as reader:
            self.schema = reader.schema

    def _stream(self, file: str) -> pa.ipc.RecordBatchStreamReader:
        try:
            if is_url(file):
                fs, path = open_fs(file, self._options)
                return pa.ipc.open_stream(fs.open(path, "rb"))
            return pa.ipc.open_stream(pa.memory_map(file))
        except (pa.ArrowException, OSError) as err:
            raise JobError(f"{file}: not a readable Arrow stream ({err}); is this a save_to_disk folder?") from None

    def batches(self, columns, batch_rows, start=0) -> Iterator[tuple[int, pa.RecordBatch]]:
        row = 0
        for file in self.files:
            with self._stream(file) as reader:
                for batch in reader:
                    if row + batch.num_rows > start:
                        for offset in range(0, batch.num_rows, batch_rows):
                            piece = batch.slice(offset, batch_rows)
                            if row + offset + piece.num_rows > start:
                                yield row + offset, conformed(piece.select(columns), self.schema, columns, file)
                    row += batch.num_rows


def _image_feature(info: dict[str, Any]) -> str | None:
    features = info.get("features") or {}
    if not isinstance(features, dict):
        return None
    return next((name for name, feature in features.items()
                 if isinstance(feature, dict) and feature.get("_type") == "Image"), None)


def open_hf(location: str, settings: InputSettings) -> TableSource:
    """The Hugging Face dataset at `location` (a save_to_disk folder, or Parquet shards) as a table source."""
    options = settings.storage_options
    if _exists(_join(location, DATASET_DICT), options):
        splits = _read_json(_join(location, DATASET_DICT), options).get("splits") or []
        raise JobError(f"{location}: a DatasetDict; give one split's folder as INPUT "
                       f"({', '.join(_join(location, str(s)) for s in splits) or 'e.g. ' + _join(location, 'train')})")
    if not is_saved_dataset(location, options):
        return TableSource(location, settings, kind="parquet")  # to_parquet shards: the schema names the feature
    image = _image_feature(_read_json(_join(location, DATASET_INFO), options))
    return TableSource(location, settings, reader=_ArrowStreamReader(location, options), image_column=image)
