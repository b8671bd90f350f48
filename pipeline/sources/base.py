"""sources/base.py: the `ImageSource` interface: where images come from, and nothing else.

A source yields `Item`s: a stable key (the resume key, the `image_path` column) and a way to read
the item's bytes. Readers of an out folder (export, review) find an image again by its key with
`open_by_key`, so nothing outside a source joins paths or knows where bytes live. Items are small
frozen values that can be pickled and read in another process.

`[input] keep_columns` names input columns (or WebDataset members) whose values every output row
carries: an item holds its values in `kept`, and the source says their Arrow types once in
`kept_schema()`, in the job's order (the out folder's Parquet gets one column each).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO, Protocol

import pyarrow as pa

__all__ = ["Item", "ImageSource"]


class Item(Protocol):
    """One image of a source."""

    key: str  # stable across runs: the resume key, POSIX-style for files
    kept: Mapping[str, Any]  # the job's keep_columns for this item (name → value); empty when none

    def read(self) -> bytes:
        """The item's bytes; raises OSError when they cannot be read, or are more than the source's
        size limit (the read itself is bounded)."""

    def open(self) -> BinaryIO:
        """A binary file object, for reads of the header only (sizes for an estimate)."""


class ImageSource(Protocol):
    """Where a run's images come from."""

    skipped: dict[str, int]
    """What the walks so far passed over, by reason ("not an image file": 3, ...): nothing is skipped silently."""

    def items(self) -> Iterator[Item]:
        """Every image, streamed (never listed whole), in an order that is the same on every run."""

    def why_empty(self) -> str | None:
        """None when the source has an item; else why it has none, in words that follow INPUT's name."""

    def open_by_key(self, key: str) -> Item | None:
        """The item with this key, or None when the key cannot name one of this source's items."""

    def kept_schema(self) -> pa.Schema:
        """The Arrow types of the job's keep_columns, in the job's order; an empty schema when none."""
