"""sources: where a run's images come from, behind the `ImageSource` interface.

`open_source` is the one place that picks a source for an INPUT; drivers and readers ask it and
never import a source module themselves. INPUT is a local folder or one image file (`folder.py`),
a folder on an fsspec file system, `s3://bucket/prefix/` and the like (`objectstore.py`), a table
of image paths, URLs or bytes (`table.py`: Parquet, CSV, JSONL; http(s) images through `urls.py`), a
Hugging Face dataset on disk (`hf.py`), or WebDataset shards (`webdataset.py`: a `.tar`, a brace
pattern, a `::` list, or with `format = "webdataset"` a text file listing shards); tables, datasets
and shards may be local or on an fsspec file system too. `kind_of` decides which from `[input] format`
and INPUT's name, without reading anything but (for "auto") a folder's file names.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import JobError
from ..job import InputSettings
from .base import ImageSource, Item
from .folder import FolderSource
from .fs import is_url, open_fs
from .sample import LimitedSource, SampledSource
from .webdataset import WebDatasetSource, looks_like_shards, shards_found

__all__ = ["ImageSource", "Item", "open_source", "kind_of", "is_webdataset", "input_exists", "input_problem",
           "is_url"]


def is_webdataset(input_path: str | Path, settings: InputSettings | None = None) -> bool:
    """Is INPUT read as WebDataset shards: `format = "webdataset"`, or "auto" and INPUT names `.tar` shards?"""
    settings = settings or InputSettings()
    return settings.format == "webdataset" or (settings.format == "auto" and looks_like_shards(input_path))


def kind_of(location: str, settings: InputSettings) -> str:
    """"folder", "table", "hf" or "webdataset": `[input] format`, or for "auto", from INPUT's name and contents:

    `.tar` shards (or a brace pattern or `::` list of them) are WebDataset shards; a `.parquet` / `.csv` /
    `.jsonl` / `.ndjson` name is a table; a folder holding dataset_info.json and state.json (or
    dataset_dict.json) is a Hugging Face save_to_disk folder; a folder is a table of Parquet shards when
    the job names a path_column or bytes_column; anything else a folder of image files.
    """
    if is_webdataset(location, settings):
        return "webdataset"
    if settings.format != "auto":
        return settings.format
    from . import hf, table  # a folder run never pays for pyarrow's readers

    if location.rstrip("/").lower().endswith(tuple(table.TABLE_SUFFIXES)):
        return "table"
    if is_url(location):
        open_fs(location, settings.storage_options)  # a missing extra is said of INPUT itself, not of a file in it
    if (is_url(location) or Path(location).is_dir()) and hf.is_saved_dataset(location, settings.storage_options):
        return "hf"
    if settings.path_column or settings.bytes_column:
        return "table"
    return "folder"


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
    kind = kind_of(location, settings)
    if kind == "webdataset":
        return WebDatasetSource(location, settings)
    if kind in ("table", "hf"):
        from . import hf, table

        return table.TableSource(location, settings) if kind == "table" else hf.open_hf(location, settings)
    for name in ("path_column", "bytes_column", "key_column"):
        if getattr(settings, name) is not None:
            raise JobError(f"[input] {name} applies to a table or a Hugging Face dataset; {location} is read as a "
                           "folder of image files (set [input] format = \"table\" if it is a folder of Parquet shards)")
    if settings.keep_columns:
        raise JobError(f"[input] keep_columns applies to a table, a Hugging Face dataset or WebDataset shards; "
                       f"{location} is read as a folder of image files, which has no columns to keep")
    if is_url(location):
        from .objectstore import ObjectStoreSource  # fsspec and its file system load only for a URL

        return ObjectStoreSource(location, settings)
    return FolderSource(location, settings)


def input_problem(input_path: str | Path, settings: InputSettings | None = None, *, folder: bool = False) -> str | None:
    """None when INPUT can be read; else why not, in words that follow its name (the caller raises
    the JobError, exit 2, before anything is sent).

    Shards: the first shard (or the list file) must exist. A local path must exist (with `folder`, be
    a folder). A URL table or dataset must exist; a URL folder must be listable and hold an image (a
    missing bucket, denied access or an empty prefix is said here, not found out mid-run).
    """
    settings = settings or InputSettings()
    location = str(input_path)
    kind = kind_of(location, settings)
    if kind == "webdataset":
        return None if shards_found(location, settings) else "no such shard (or shard list)"
    if not is_url(location):
        path = Path(location)
        if folder and kind == "folder":
            return None if path.is_dir() else "folder not found"
        return None if path.exists() else "input folder not found"
    if kind == "folder":
        return _open_kind(location, settings).why_empty()
    fs, path = open_fs(location, settings.storage_options)
    try:
        return None if fs.exists(path) else "not found"
    except OSError as err:  # denied, no such bucket, ...
        return f"cannot be read ({err})"


def input_exists(input_path: str | Path, settings: InputSettings | None = None) -> bool:
    """Does INPUT name something to read (see `input_problem`)?"""
    return input_problem(input_path, settings) is None
