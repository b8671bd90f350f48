"""sources/folder.py: the local folder source: image files under a folder, streaming, in a fixed order.

Owns the filesystem walk; what counts as an image file or a hidden one, and the resume key (the path
relative to the root, POSIX form, escaped by `escape_key`) are the rules in `keys.py`, which object
stores share. It yields as it goes: a tree of millions of files
is never listed whole, only one directory's names are held at a time (sorted, so that two runs see
the same order). The walk reads directory entries only (their `d_type`, and `stat` for links),
never a file's contents, and never opens anything but folders.

What is passed over, each counted by reason in `FolderSource.skipped` (the run summary prints it):
hidden files and folders (a leading dot); files whose name does not end like an image Pillow can
open here; anything that is not a regular file or a folder (FIFOs, sockets, devices), directly or
through a link, with one log line each; links that resolve outside the root, with one log line
each, unless `follow_links`; links whose target is gone. A folder reached twice (a link loop, or
a second link to it) is walked once.

Reads are bounded: `FileItem.open` refuses a file that is not regular (opened non-blocking, then
`fstat`, since it may have changed since the walk) or larger than `max_bytes`, and `FileItem.read`
reads at most `max_bytes + 1` bytes whatever the file has grown to.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa

from ..job import InputSettings
from .keys import (BROKEN, HIDDEN, NOT_IMAGE, NOT_REGULAR, OUTSIDE, escape_key, image_extensions, is_hidden_name,
                   is_image_name, key_name, too_big, unescape_key)

__all__ = ["image_extensions", "FileItem", "FolderSource", "escape_key", "unescape_key", "key_path",
           "walk_images"]

log = logging.getLogger(__name__)

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
"""O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer, so `fstat` can refuse
it (open(2)); O_NOCTTY: a terminal device never becomes the controlling terminal."""


@dataclass(frozen=True, slots=True)
class FileItem:
    """One image file found by the walk."""

    path: Path  # where to read it (absolute or relative to the working directory)
    key: str  # path relative to the input root, POSIX form, escaped (`escape_key`): the resume key
    max_bytes: int | None = None  # a larger file is refused unread; None: no limit
    kept: Mapping[str, Any] = field(default_factory=dict)  # keep_columns values (a folder has none; a table may)

    def read(self) -> bytes:
        """The file's bytes, at most `max_bytes`; OSError for a file that is not regular or is larger."""
        with self.open() as handle:
            data = handle.read() if self.max_bytes is None else handle.read(self.max_bytes + 1)
        if self.max_bytes is not None and len(data) > self.max_bytes:  # it grew since open's fstat
            raise OSError(errno.EFBIG, too_big(len(data), self.max_bytes, "more than"))
        return data

    def open(self) -> BinaryIO:
        """The file opened for reading, after checking it is a regular file within `max_bytes`
        (`open_regular`). Raises OSError."""
        return open_regular(self.path, self.max_bytes)


def open_regular(path: str | os.PathLike, max_bytes: int | None = None) -> BinaryIO:
    """`path` opened for reading when it is a regular file (of at most `max_bytes`, when given).

    `stat` first, so that a FIFO or device is never opened; then a non-blocking open and `fstat` of
    what was opened, in case the name was swapped since. Raises OSError.
    """
    _check_regular(os.stat(path).st_mode)
    fd = os.open(path, _OPEN_FLAGS)
    try:
        info = os.fstat(fd)
        _check_regular(info.st_mode)
        if max_bytes is not None and info.st_size > max_bytes:
            raise OSError(errno.EFBIG, too_big(info.st_size, max_bytes))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, f"not a regular file ({_file_type(mode)}); not read")


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a file"


class FolderSource:
    """The image files under a local folder (or one image file), as an `ImageSource`."""

    def __init__(self, root: str | Path, settings: InputSettings | None = None):
        self.root = Path(root)
        self.settings = settings or InputSettings()
        self._walks: list[dict[str, int]] = []  # what each walk passed over, by reason

    @property
    def skipped(self) -> dict[str, int]:
        """Reason → files and folders passed over, by the walk that got furthest: a driver may walk
        twice at once (one walk feeds the run, one counts for the progress bar), and each sees the
        same folder, so their counts are not added up."""
        merged: dict[str, int] = {}
        for walk in list(self._walks):
            for reason, count in dict(walk).items():
                merged[reason] = max(merged.get(reason, 0), count)
        return merged

    def __repr__(self) -> str:
        return f"FolderSource({str(self.root)!r})"

    @property
    def max_bytes(self) -> int:
        return _max_bytes(self.settings)

    def items(self) -> Iterator[FileItem]:
        self._walks.append({})
        return walk_images(self.root, self.settings, self._walks[-1])

    def why_empty(self) -> str | None:
        """None when the walk finds an image; otherwise why it finds none, in one line.

        Walks (quietly: no log lines, nothing counted) only as far as the first image file.
        """
        if next(walk_images(self.root, self.settings, {}, quiet=True), None) is not None:
            return None
        if _root_is_file(self.root):
            return ("is not an image file (caption reads files whose names end like an image Pillow opens here: "
                    ".jpg, .png, .webp, .gif, .tif, .avif, ...)")
        if not self.root.is_dir():
            return f"is not a regular file or a folder ({_describe(self.root)})"
        passed: dict[str, int] = {}
        for _ in walk_images(self.root, self.settings, passed, quiet=True):
            pass
        if not passed:
            return "holds no files: nothing to caption"
        return "holds no image file to caption; passed over: " + ", ".join(
            f"{count} {reason}" for reason, count in sorted(passed.items()))

    def open_by_key(self, key: str) -> FileItem | None:
        """The file a key names under `root`; None for a key that cannot name one (see `key_path`),
        or whose path leaves the root through a link that the walk would not follow."""
        if _root_is_file(self.root):
            return FileItem(self.root, key, self.max_bytes) if key == escape_key(self.root.name) else None
        path = key_path(self.root, key)
        if path is None:
            return None
        if not self.settings.follow_links and not _inside(os.path.realpath(path), os.path.realpath(self.root)):
            return None
        return FileItem(path, key, self.max_bytes)

    def kept_schema(self) -> pa.Schema:
        """Empty: a folder has no columns to keep (`open_source` refuses keep_columns for one)."""
        return pa.schema([])


# --- keys ------------------------------------------------------------------------------------


def key_path(root: Path, key: str) -> Path | None:
    """The path under `root` that `key` names, or None when the key is not a walk's key or names
    nothing inside `root` (`keys.key_name`: empty, absolute, `.`/`..`/empty parts, a NUL, a bad escape)."""
    name = key_name(key)
    return None if name is None else root.joinpath(*name.split("/"))


# --- the walk --------------------------------------------------------------------------------


def walk_images(root: str | Path, settings: InputSettings | None = None,
                skipped: dict[str, int] | None = None, *, quiet: bool = False) -> Iterator[FileItem]:
    """Yield a `FileItem` for every image file under `root`, depth first, names sorted.

    A file `root` yields itself (key: its name) when it is a regular image file. Whatever is passed
    over is counted into `skipped` by reason (see the module docstring) and, unless `quiet` or
    ordinary (hidden, not an image), logged.
    """
    root, settings = Path(root), settings or InputSettings()
    walk = _Walk(root, settings, {} if skipped is None else skipped, quiet=quiet)
    if _root_is_file(root):
        name = root.name
        if walk.is_image(name):
            yield FileItem(path=root, key=escape_key(name), max_bytes=walk.max_bytes)
        return
    if not root.is_dir() and os.path.lexists(root):  # a FIFO, socket or device named as INPUT
        walk.skip(NOT_REGULAR, root, _describe(root))
        return
    # A stack of (folder, key prefix, names still to visit, which of them are folders).
    stack = [(root, "", *walk.list_folder(root))]
    while stack:
        folder, prefix, names, subfolders = stack[-1]
        if not names:
            stack.pop()
            continue
        name = names.pop()
        if name in subfolders:
            stack.append((folder / name, f"{prefix}{name}/", *walk.list_folder(folder / name)))
        else:
            yield FileItem(path=folder / name, key=escape_key(prefix + name), max_bytes=walk.max_bytes)


def _max_bytes(settings: InputSettings) -> int:
    return int(settings.max_file_mb * 1_000_000)


def _root_is_file(root: Path) -> bool:
    try:
        return stat.S_ISREG(root.stat().st_mode)
    except (OSError, ValueError):
        return False


def _describe(path: Path) -> str:
    try:
        return _file_type(path.stat().st_mode)
    except OSError as err:
        return err.strerror or str(err)


@dataclass(slots=True)
class _Walk:
    """One walk's settings, the folders it entered, and what it passed over."""

    root: Path
    settings: InputSettings
    skipped: dict[str, int]
    quiet: bool = False  # no log lines (a look-ahead walk, such as `why_empty`)
    seen: set[tuple[int, int]] = field(default_factory=set)  # (device, inode) of folders entered: ends loops
    real_root: str = ""

    def __post_init__(self) -> None:
        self.real_root = os.path.realpath(self.root)

    @property
    def max_bytes(self) -> int:
        return _max_bytes(self.settings)

    def skip(self, reason: str, path: str | Path, detail: str | None = None) -> None:
        """Count one thing passed over; log it when it is not the ordinary kind (hidden, not an image)."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if detail is not None and not self.quiet:
            log.info("skipping %s: %s", path, detail)

    def is_image(self, name: str) -> bool:
        if is_image_name(name):
            return True
        self.skip(NOT_IMAGE, name)
        return False

    def list_folder(self, folder: Path) -> tuple[list[str], set[str]]:
        """Return the folder's image files and visible subfolders, reverse-sorted so pop() is in order.

        Only names are held (a flat folder of a million files costs tens of MB, not hundreds), plus
        the set of those names that are folders. Empty for a folder already entered (a symlink loop
        or a second link to it) or unreadable.
        """
        try:
            info = folder.stat()
            ident = (info.st_dev, info.st_ino)
            if ident in self.seen:
                if not self.quiet:
                    log.info("skipping %s: folder already walked (symlink loop or duplicate link)", folder)
                return [], set()
            self.seen.add(ident)
            names: list[str] = []
            subfolders: set[str] = set()
            with os.scandir(folder) as scan:
                for entry in scan:
                    kind = self._kind(entry)
                    if kind == "folder":
                        subfolders.add(entry.name)
                        names.append(entry.name)
                    elif kind == "file" and self.is_image(entry.name):
                        names.append(entry.name)
        except OSError as err:
            if not self.quiet:
                log.warning("skipping folder %s: %s", folder, err.strerror or err)
            return [], set()
        names.sort(reverse=True)
        return names, subfolders

    def _kind(self, entry: os.DirEntry) -> str | None:
        """"folder", "file" (regular), or None for an entry passed over (counted, and logged unless ordinary).

        Plain entries are told apart by their `d_type` (no system call); only links are resolved
        and stat'ed. Nothing is opened.
        """
        path = entry.path
        if is_hidden_name(entry.name):
            self.skip(HIDDEN, path)
            return None
        try:
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if not self.settings.follow_links and not _inside(target, self.real_root):
                    self.skip(OUTSIDE, path, f"a link to {target}, outside INPUT (--follow-links follows it)")
                    return None
                mode = entry.stat().st_mode
            elif entry.is_dir(follow_symlinks=False):
                return "folder"
            elif entry.is_file(follow_symlinks=False):
                return "file"
            else:
                mode = entry.stat(follow_symlinks=False).st_mode
        except OSError as err:  # a broken link, or a race with a deletion
            self.skip(BROKEN, path, err.strerror or str(err))
            return None
        if stat.S_ISDIR(mode):
            return "folder"
        if stat.S_ISREG(mode):
            return "file"
        self.skip(NOT_REGULAR, path, f"not a regular file ({_file_type(mode)}); not read")
        return None


def _inside(path: str, real_root: str) -> bool:
    """Is the resolved `path` the resolved root or below it?"""
    return path == real_root or path.startswith(real_root.rstrip(os.sep) + os.sep)
