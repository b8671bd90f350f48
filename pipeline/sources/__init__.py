"""sources: where a run's images come from, behind the `ImageSource` interface.

`open_source` is the one place that picks a source for an INPUT; drivers and readers ask it and
never import a source module themselves. INPUT is a local folder or one image file (`folder.py`),
or WebDataset shards (`webdataset.py`: a `.tar`, a brace pattern, a `::` list, or with
`format = "webdataset"` a text file listing shards); object stores, tables of paths or URLs and
Hugging Face datasets are further modules here, picked by `open_source` from INPUT and the job's
`[input]` table.
"""

from __future__ import annotations

from pathlib import Path

from ..job import InputSettings
from .base import ImageSource, Item
from .folder import FolderSource
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
    source: ImageSource
    if is_webdataset(input_path, settings):
        source = WebDatasetSource(input_path, settings)
    else:
        source = FolderSource(input_path, settings)
    if settings.sample is not None:
        source = SampledSource(source, settings.sample, settings.sample_seed)
    if settings.limit is not None:
        source = LimitedSource(source, settings.limit)
    return source
