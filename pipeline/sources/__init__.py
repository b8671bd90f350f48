"""sources: where a run's images come from, behind the `ImageSource` interface.

`open_source` is the one place that picks a source for an INPUT; drivers and readers ask it and
never import a source module themselves. INPUT is a local folder or one image file (`folder.py`),
a table of image paths or bytes (`table.py`: Parquet, CSV, JSONL), a Hugging Face dataset on disk
(`hf.py`), or WebDataset shards (`webdataset.py`: a `.tar`, a brace pattern, a `::` list, or with
`format = "webdataset"` a text file listing shards), local or on an fsspec file system.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import JobError
from ..job import InputSettings
from .base import ImageSource, Item
from .folder import FolderSource
from .fs import is_url
from .sample import LimitedSource, SampledSource
from .webdataset import WebDatasetSource, looks_like_shards, shards_found

__all__ = ["ImageSource", "Item", "open_source", "is_webdataset", "input_exists"]


def is_webdataset(input_path: str | Path, settings: InputSettings | None = None) -> bool:
    """Is INPUT read as WebDataset shards: `format = "webdataset"`, or "auto" and INPUT names `.tar` shards?"""
    settings = settings or InputSettings()
    return settings.format == "webdataset" or (settings.format == "auto" and looks_like_shards(input_path))


def input_exists(input_path: str | Path, settings: InputSettings | None = None) -> bool:
    """Does INPUT name something to read: a local file or folder, or (shards) a first shard or list that exists?"""
    if is_webdataset(input_path, settings):
        return shards_found(input_path, settings)
    return Path(input_path).exists()


def open_source(input_path: str | Path, settings: InputSettings | None = None) -> ImageSource:
    """The source that INPUT names, reading it as the job's `[input]` table says (default: its defaults):
    all of it, a random `sample` of it (`sample_seed`), or its first `limit` items (`sample.py`)."""
    settings = settings or InputSettings()
    source: ImageSource = _open_kind(str(input_path), settings)
    if settings.sample is not None:
        source = SampledSource(source, settings.sample, settings.sample_seed)
    if settings.limit is not None:
        source = LimitedSource(source, settings.limit)
    return source


def _open_kind(location: str, settings: InputSettings) -> ImageSource:
    """The source for `[input] format`; "auto" picks one from INPUT's name and contents:

    a `.parquet` / `.csv` / `.jsonl` / `.ndjson` name is a table; a folder holding dataset_info.json
    and state.json (or dataset_dict.json) is a Hugging Face save_to_disk folder; a folder is a table
    of Parquet shards when the job names a path_column or bytes_column; anything else a folder.
    """
    from . import hf, table  # a folder run never pays for pyarrow's readers

    kind = settings.format
    if is_webdataset(location, settings):
        kind = "webdataset"
    elif kind == "auto":
        if location.rstrip("/").lower().endswith(tuple(table.TABLE_SUFFIXES)):
            kind = "table"
        elif (is_url(location) or Path(location).is_dir()) and hf.is_saved_dataset(location, settings.storage_options):
            kind = "hf"
        elif settings.path_column or settings.bytes_column:
            kind = "table"
        else:
            kind = "folder"
    if kind == "table":
        return table.TableSource(location, settings)
    if kind == "hf":
        return hf.open_hf(location, settings)
    if kind == "webdataset":
        return WebDatasetSource(location, settings)
    for name in ("path_column", "bytes_column", "key_column"):
        if getattr(settings, name) is not None:
            raise JobError(f"[input] {name} applies to a table or a Hugging Face dataset; {location} is read as a "
                           "folder of image files (set [input] format = \"table\" if it is a folder of Parquet shards)")
    if settings.keep_columns:
        raise JobError(f"[input] keep_columns applies to a table, a Hugging Face dataset or WebDataset shards; "
                       f"{location} is read as a folder of image files, which has no columns to keep")
    return FolderSource(location, settings)
