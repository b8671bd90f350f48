"""engine/dedupe.py: identical bytes are sent once per out folder, across resumed runs too.

A copy of an image already captioned (or being captioned right now) gets that image's answer:
the same caption, zero tokens, and `dedup_of` naming the image that was sent. Only this job's
answers count (the store's resume index holds the sha256 of this job's ok rows). The online driver
asks `caption_once` (a copy waits for an original in flight); the batch driver asks `original_of`
before it puts an image in a chunk, and `remember`s every ok row it writes. Driver-side
scheduling state, for one event loop; it writes nothing.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Any

from ..records import Result
from ..store import HashSet, key_hash

__all__ = ["Deduper", "DEDUP_CACHE"]

DEDUP_CACHE = 4096  # recent ok rows kept to answer duplicates without a disk scan

Original = Result | dict[str, Any]  # the ok row of the copy that was sent: fresh, or read back from disk


class Deduper:
    """Decides, per image, whether to send it or to copy the answer an identical file got."""

    def __init__(self, sent_shas: HashSet, find_on_disk: Callable[[str], Original | None]):
        self.sent_shas = sent_shas  # hashes of the sha256 of every image with an ok row of this job
        self._find_on_disk = find_on_disk  # sha256 → that ok row (blocking: run in a thread)
        self._sending: dict[int, asyncio.Future] = {}  # sha hash → the row of the copy being sent now
        self._recent: collections.OrderedDict[int, Result] = collections.OrderedDict()  # sha hash → ok row

    async def caption_once(self, sha256: str, caption: Callable[[], Awaitable[Result]],
                           copy: Callable[[Original], Result]) -> Result:
        """`caption()` unless a file with these bytes was (or is being) sent: then `copy(its row)`."""
        sha = key_hash(sha256)
        while (original := await self._sent_copy(sha, sha256)) is None and sha in self._sending:
            pass  # the copy we waited for failed, and another waiter has taken its place: wait for that one
        if original is not None:
            return copy(original)
        future = asyncio.get_running_loop().create_future()
        self._sending[sha] = future
        result = None
        try:
            result = await caption()
        finally:
            del self._sending[sha]
            future.set_result(result if result is not None and result.status == "ok" else None)
        self.remember(result)
        return result

    def remember(self, result: Result) -> None:
        """Note a row just written: if ok, its bytes need not be sent again."""
        if result.status != "ok" or not result.image_sha256:
            return
        sha = key_hash(result.image_sha256)
        self.sent_shas.add(sha)
        if result.dedup_of is None:
            self._recent[sha] = result
            self._recent.move_to_end(sha)
            if len(self._recent) > DEDUP_CACHE:
                self._recent.popitem(last=False)

    async def original_of(self, sha256: str) -> Original | None:
        """The ok row of an image with these bytes already captioned by this job, or None."""
        sha = key_hash(sha256)
        if (recent := self._recent.get(sha)) is not None:
            return recent
        if sha in self.sent_shas:
            return await asyncio.to_thread(self._find_on_disk, sha256)
        return None

    async def _sent_copy(self, sha: int, sha256: str) -> Original | None:
        """The ok row of an earlier copy of these bytes: being sent now, recent, or on disk."""
        if (sending := self._sending.get(sha)) is not None:
            return await asyncio.shield(sending)  # None if that copy failed: then we try ourselves
        if (recent := self._recent.get(sha)) is not None:
            return recent
        if sha in self.sent_shas:
            return await asyncio.to_thread(self._find_on_disk, sha256)
        return None
