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

__all__ = ["ImageSource", "Item", "open_source"]


def open_source(input_path: str | Path, settings: InputSettings | None = None) -> ImageSource:
    """The source that INPUT names, reading it as the job's `[input]` table says (default: its defaults)."""
    return FolderSource(input_path, settings)
