"""sources/folder.py: the local folder source: image files under a folder, streaming, in a fixed order.

Owns the filesystem walk and the resume key (the path relative to the root, POSIX form). It
yields as it goes: a tree of millions of files is never listed whole, only one directory's names
are held at a time (sorted, so that two runs see the same order). Hidden files and folders (a
leading dot) are skipped; symlinked folders are followed once, so a link loop ends. Reads
directory entries only, never file contents.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

__all__ = ["IMAGE_EXTENSIONS", "FileItem", "FolderSource", "key_path", "walk_images"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


@dataclass(frozen=True, slots=True)
class FileItem:
    """One image file found by the walk."""

    path: Path  # where to read it (absolute or relative to the working directory)
    key: str  # path relative to the input root, POSIX form: the resume key

    def read(self) -> bytes:
        return self.path.read_bytes()

    def open(self) -> BinaryIO:
        return open(self.path, "rb")


class FolderSource:
    """The image files under a local folder (or one image file), as an `ImageSource`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"FolderSource({str(self.root)!r})"

    def items(self) -> Iterator[FileItem]:
        return walk_images(self.root)

    def open_by_key(self, key: str) -> FileItem | None:
        """The file a key names under `root`; None for a key that cannot name one (see `key_path`)."""
        if self.root.is_file():
            return FileItem(self.root, key) if key == _printable(self.root.name) else None
        path = key_path(self.root, key)
        return None if path is None else FileItem(path, key)


def key_path(root: Path, key: str) -> Path | None:
    """`root / key`, or None when the key is empty, absolute or climbs out of `root`.

    Keys come from Parquet rows, which a person may have edited: nothing may be read or written
    outside the folder it was given.
    """
    parts = PurePosixPath(key)
    if not key or parts.is_absolute() or ".." in parts.parts or "\\" in key:
        return None
    return root.joinpath(*parts.parts)


def walk_images(root: str | Path) -> Iterator[FileItem]:
    """Yield a `FileItem` for every image file under `root`, depth first, names sorted.

    A file `root` yields itself (key: its name). Unreadable folders are logged and skipped.
    """
    root = Path(root)
    if root.is_file():
        if root.suffix.lower() in IMAGE_EXTENSIONS:
            yield FileItem(path=root, key=_printable(root.name))
        return
    seen: set[tuple[int, int]] = set()  # (device, inode) of folders entered: ends symlink loops
    # A stack of (folder, key prefix, names still to visit, which of them are folders).
    stack = [(root, "", *_list_folder(root, seen))]
    while stack:
        folder, prefix, names, subfolders = stack[-1]
        if not names:
            stack.pop()
            continue
        name = names.pop()
        if name in subfolders:
            stack.append((folder / name, f"{prefix}{name}/", *_list_folder(folder / name, seen)))
        else:
            yield FileItem(path=folder / name, key=_printable(prefix + name))


def _list_folder(folder: Path, seen: set[tuple[int, int]]) -> tuple[list[str], set[str]]:
    """Return the folder's image files and visible subfolders, reverse-sorted so pop() is in order.

    Only names are held (a flat folder of a million files costs tens of MB, not hundreds), plus
    the set of those names that are folders. Empty for a folder already entered (a symlink loop or
    a second link to it) or unreadable.
    """
    try:
        info = folder.stat()
        ident = (info.st_dev, info.st_ino)
        if ident in seen:
            log.info("skipping %s: folder already walked (symlink loop or duplicate link)", folder)
            return [], set()
        seen.add(ident)
        names: list[str] = []
        subfolders: set[str] = set()
        with os.scandir(folder) as scan:
            for entry in scan:
                if entry.name.startswith("."):
                    continue
                if _is_dir(entry):  # follows symlinks; `seen` stops loops
                    subfolders.add(entry.name)
                    names.append(entry.name)
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    names.append(entry.name)
    except OSError as err:
        log.warning("skipping folder %s: %s", folder, err.strerror or err)
        return [], set()
    names.sort(reverse=True)
    return names, subfolders


def _printable(key: str) -> str:
    """The key as valid UTF-8: a name that is not (an old archive's Latin-1, say) reaches Python
    with surrogate escapes, which no UTF-8 file can hold; they become `\\xe9`-style escapes.
    The file is still opened by its real path."""
    try:
        key.encode("utf-8")
        return key
    except UnicodeEncodeError:
        return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a broken link, or a race with a deletion
        return False
