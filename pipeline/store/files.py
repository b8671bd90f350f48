"""store/files.py: atomic replacement of a file, and fsync of a path: the one way files are written."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from ..errors import JobError

__all__ = ["write_atomic", "open_atomic", "fsync_path"]


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically: a temp file beside it, fsync, rename, fsync the folder."""
    tmp = path.with_name(f"_{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def open_atomic(target: Path, overwrite: bool, *, binary: bool = False, newline: str | None = None) -> Iterator[IO]:
    """Open a hidden temp file beside `target`; on a clean exit move it into place, else delete it.

    Text is UTF-8. Without `overwrite`, an existing `target` is never replaced (JobError).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        if binary:
            with open(tmp, "wb") as handle:
                yield handle
        else:
            with open(tmp, "w", encoding="utf-8", newline=newline) as handle:
                yield handle
        _publish(tmp, target, overwrite)
    finally:
        tmp.unlink(missing_ok=True)


def _publish(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move `tmp` to `target` in one step; without `overwrite`, never replace a file that exists."""
    if overwrite:
        os.replace(tmp, target)
        return
    appeared = f"{target}: appeared while exporting; not overwritten (pass --overwrite to replace it)"
    try:
        os.link(tmp, target)  # fails if target exists, so no window between the check and the write
    except FileExistsError:
        raise JobError(appeared) from None
    except OSError:  # a filesystem without hard links: the up-front check has to do
        if target.exists():
            raise JobError(appeared) from None
        os.replace(tmp, target)
