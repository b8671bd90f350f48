"""sources: where a run's images come from, behind the `ImageSource` interface.

`open_source` is the one place that picks a source for an INPUT; drivers and readers ask it and
never import a source module themselves. INPUT is a local folder or one image file (`folder.py`),
or a folder on an fsspec file system, `s3://bucket/prefix/` and the like (`objectstore.py`); tables
of paths or URLs, WebDataset shards and Hugging Face datasets are further modules here, picked by
`_base_source` from INPUT and the job's `[input]` table.
"""

from __future__ import annotations

from pathlib import Path

from ..job import InputSettings
from .base import ImageSource, Item
from .folder import FolderSource
from .fs import is_url
from .sample import LimitedSource, SampledSource

__all__ = ["ImageSource", "Item", "open_source", "input_problem", "is_url"]


def open_source(input_path: str | Path, settings: InputSettings | None = None) -> ImageSource:
    """The source that INPUT names, reading it as the job's `[input]` table says (default: its defaults):
    all of it, a random `sample` of it (`sample_seed`), or its first `limit` items (`sample.py`)."""
    settings = settings or InputSettings()
    source = _base_source(input_path, settings)
    if settings.sample is not None:
        source = SampledSource(source, settings.sample, settings.sample_seed)
    if settings.limit is not None:
        source = LimitedSource(source, settings.limit)
    return source


def _base_source(input_path: str | Path, settings: InputSettings) -> ImageSource:
    """INPUT's own source, by what INPUT is and `[input] format`: one branch per kind of source."""
    if is_url(str(input_path)) and settings.format in ("auto", "folder"):
        from .objectstore import ObjectStoreSource  # fsspec and its file system load only for a URL

        return ObjectStoreSource(str(input_path), settings)
    return FolderSource(input_path, settings)


def input_problem(input_path: str | Path, settings: InputSettings | None = None, *, folder: bool = False) -> str | None:
    """None when INPUT can be read; else why not, in words that follow its name (the caller raises
    the JobError, exit 2, before anything is sent).

    A local path must exist (with `folder`, be a folder); a URL must be listable and hold an image
    (a missing bucket, denied access or an empty prefix is said here, not found out mid-run).
    """
    if is_url(str(input_path)):
        return _base_source(input_path, settings or InputSettings()).why_empty()
    path = Path(input_path)
    if folder:
        return None if path.is_dir() else "folder not found"
    return None if path.exists() else "input folder not found"
