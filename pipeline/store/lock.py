"""store/lock.py: one process at a time on an out folder."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import JobError
from .layout import LOCK_FILE

__all__ = ["OutFolderLock"]


class OutFolderLock:
    """An exclusive lock on an out folder for one process: two runs on one folder would each
    recover (and so delete) the other's open journal, and pay twice for the same images.

    flock(2) on `OUT/_lock`: the kernel drops it when the process dies, so a kill -9 leaves no
    stale lock. flock does not exclude a second descriptor of the same process reliably, so
    holders within this process are also kept in a table: a second one is refused the same way.
    """

    _held: dict[Path, list] = {}  # resolved folder → [fd, count]

    def __init__(self, out: Path):
        self._key = Path(out).resolve()
        if self._key in self._held:
            raise JobError(f"{out}: in use by another run in this process (pid {os.getpid()}); let it finish first")
        fd = os.open(self._key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise JobError(f"{out}: in use by another caption process (pid {pid}); let it finish or stop it, "
                           "then run again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._held[self._key] = [fd, 1]

    def release(self) -> None:
        held = self._held.get(self._key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del self._held[self._key]
            os.close(held[0])  # closing the descriptor drops the flock
