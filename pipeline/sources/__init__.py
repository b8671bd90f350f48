"""sources: where a run's images come from, behind the `ImageSource` interface.

`open_source` is the one place that picks a source for an INPUT; drivers and readers ask it and
never import a source module themselves. Today INPUT is a local folder or one image file
(`folder.py`); object stores, tables of paths or URLs, WebDataset shards and Hugging Face datasets
are further modules here, picked by `open_source` from INPUT and the job's `[input]` table.
"""

from __future__ import annotations

from pathlib import Path

from ..job import InputSettings
from .base import ImageSource, Item
from .folder import FolderSource
from .sample import LimitedSource, SampledSource

__all__ = ["ImageSource", "Item", "open_source"]


def open_source(input_path: str | Path, settings: InputSettings | None = None) -> ImageSource:
    """The source that INPUT names, reading it as the job's `[input]` table says (default: its defaults):
    all of it, a random `sample` of it (`sample_seed`), or its first `limit` items (`sample.py`)."""
    settings = settings or InputSettings()
    source: ImageSource = FolderSource(input_path, settings)
    if settings.sample is not None:
        source = SampledSource(source, settings.sample, settings.sample_seed)
    if settings.limit is not None:
        source = LimitedSource(source, settings.limit)
    return source
