"""engine/dedupe.py: identical bytes are sent once per out folder, across resumed runs too; with
near dedupe, so is a picture whose difference hash is within a few bits of one already sent.

A copy of an image already captioned (or being captioned right now) gets that image's answer:
the same caption, zero tokens, and `dedup_of` naming the image that was sent. Only this job's
answers count (the store's resume index holds the sha256 of this job's ok rows). The online driver
asks `caption_once` (a copy waits for an original in flight); the batch driver asks `original_of`
before it puts an image in a chunk, and `remember`s every ok row it writes. Near copies (online
only) are found in a `NearIndex` of the originals' dHashes and also carry `dedup_distance`; only
originals enter it, so copies never chain away from the picture that was sent. Driver-side
scheduling state, for one event loop; it writes nothing.
"""

from __future__ import annotations

import array
import asyncio
import bisect
import collections
import itertools
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

from ..records import Result
from ..store import HashSet, key_hash

__all__ = ["Deduper", "NearIndex", "hamming_distance", "DEDUP_CACHE"]

DEDUP_CACHE = 4096  # recent ok rows kept to answer duplicates without a disk scan
FRESH_HASHES = 256  # hashes a NearIndex scans one by one before it sorts them into its bands

_MASK64 = (1 << 64) - 1

Original = Result | dict[str, Any]  # the ok row of the copy that was sent: fresh, or read back from disk
Copy = Callable[[Original, int | None], Result]  # (original's row, distance; None for identical bytes) → row


def hamming_distance(a: int, b: int) -> int:
    """Bits in which two 64-bit hashes differ (signed or unsigned alike)."""
    return ((a ^ b) & _MASK64).bit_count()


def _rotl(value: int, bits: int) -> int:
    return ((value << bits) | (value >> (64 - bits))) & _MASK64 if bits else value


class NearIndex:
    """64-bit hashes, searchable for every hash within `max_distance` bits of a query.

    Multi-index hashing (Norouzi, Punjani and Fleet, "Fast Search in Hamming Space with
    Multi-Index Hashing", CVPR 2012): the 64 bits are cut into `max_distance + 1` bands, and two
    hashes within `max_distance` bits agree exactly on at least one band (pigeonhole: each differing
    bit spoils one band at most). Each band keeps the hashes in a sorted array, rotated so the band
    is their top bits, and a query reads only the run of hashes sharing its band value: at the
    default 4 (bands of 12-13 bits) about 5·n/8192 candidates for uniform hashes, more where
    pictures look alike. Memory: 8 bytes × (max_distance + 1) per hash. New hashes are scanned one
    by one until FRESH_HASHES of them are sorted in; sorted levels of equal size merge, as in a
    binomial heap, so adding costs O(log n) amortised (C-speed sorts) and a query O(bands · log² n).
    """

    def __init__(self, max_distance: int, hashes: Iterable[int] = ()):
        self.max_distance = max_distance
        count = max_distance + 1
        widths = [64 // count + (i < 64 % count) for i in range(count)]
        self._bands = [(sum(widths[:i]), width) for i, width in enumerate(widths)]  # (offset from the top, width)
        self._levels: list[list[array.array]] = []  # each: one sorted array('Q') of rotated hashes per band
        self._fresh: list[int] = []
        if first := [value & _MASK64 for value in hashes]:
            self._levels.append(self._level(first))

    def __len__(self) -> int:
        return len(self._fresh) + sum(len(level[0]) for level in self._levels)

    def add(self, value: int) -> None:
        """Index one more hash (signed or unsigned)."""
        self._fresh.append(value & _MASK64)
        if len(self._fresh) < FRESH_HASHES:
            return
        level, self._fresh = self._level(self._fresh), []
        while self._levels and len(self._levels[-1][0]) <= len(level[0]):
            level = [array.array("Q", sorted(itertools.chain(older, newer)))
                     for older, newer in zip(self._levels.pop(), level)]
        self._levels.append(level)

    def matches(self, value: int) -> list[tuple[int, int]]:
        """Every indexed hash within `max_distance` of `value`: (hash, distance), nearest first."""
        value &= _MASK64
        found = {candidate: hamming_distance(candidate, value) for candidate in self._candidates(value)}
        return sorted(((h, d) for h, d in found.items() if d <= self.max_distance), key=lambda pair: (pair[1], pair[0]))

    def nearest(self, value: int) -> tuple[int, int] | None:
        """The indexed hash nearest `value` (unsigned) and its distance, if one is within `max_distance`."""
        found = self.matches(value)
        return found[0] if found else None

    def _level(self, values: list[int]) -> list[array.array]:
        return [array.array("Q", sorted(_rotl(v, offset) for v in values)) for offset, _ in self._bands]

    def _candidates(self, value: int) -> Iterator[int]:
        yield from self._fresh
        for level in self._levels:
            for (offset, width), keys in zip(self._bands, level):
                shift = 64 - width
                band = _rotl(value, offset) >> shift
                start, end = bisect.bisect_left(keys, band << shift), bisect.bisect_left(keys, (band + 1) << shift)
                for i in range(start, end):
                    yield _rotl(keys[i], 64 - offset) if offset else keys[i]


class Deduper:
    """Decides, per image, whether to send it or to copy the answer an identical (or, with `near`,
    a near-identical) image got."""

    def __init__(self, sent_shas: HashSet, find_on_disk: Callable[[str], Original | None],
                 near: NearIndex | None = None, find_near_on_disk: Callable[[int], Original | None] | None = None):
        self.sent_shas = sent_shas  # hashes of the sha256 of every image with an ok row of this job
        self._find_on_disk = find_on_disk  # sha256 → that ok row (blocking: run in a thread)
        self.near = near  # dHashes of this job's ok originals; None: near dedupe is off
        self._find_near_on_disk = find_near_on_disk  # dhash (signed int64) → that original's ok row (blocking)
        self._sending: dict[int, asyncio.Future] = {}  # sha hash → the row of the copy being sent now
        self._sending_near: dict[int, int] = {}  # sha hash → dhash (unsigned) of an image being sent now
        self._recent: collections.OrderedDict[int, Result] = collections.OrderedDict()  # sha hash → ok row
        self._recent_near: collections.OrderedDict[int, Result] = collections.OrderedDict()  # dhash → original

    async def caption_once(self, sha256: str, caption: Callable[[], Awaitable[Result]], copy: Copy,
                           dhash: int | None = None) -> Result:
        """`caption()` unless a file with these bytes (or, with near dedupe, a picture whose `dhash` is
        near) was or is being sent: then `copy(its row, distance)`, distance None for identical bytes."""
        if not sha256:  # an image sent as its URL: no bytes were read, so none to compare
            return await caption()
        sha = key_hash(sha256)
        while (original := await self._sent_copy(sha, sha256)) is None and sha in self._sending:
            pass  # the copy we waited for failed, and another waiter has taken its place: wait for that one
        if original is not None:
            return copy(original, None)
        if self.near is not None and dhash is not None:
            if (near := await self._near_copy(dhash & _MASK64)) is not None:
                return copy(*near)
            self._sending_near[sha] = dhash & _MASK64
        future = asyncio.get_running_loop().create_future()
        self._sending[sha] = future
        result = None
        try:
            result = await caption()
        finally:
            del self._sending[sha]
            self._sending_near.pop(sha, None)
            future.set_result(result if result is not None and result.status == "ok" else None)
        self.remember(result)
        return result

    def remember(self, result: Result) -> None:
        """Note a row just written: if ok, its bytes (and, an original's, its dHash) need not be sent again."""
        if result.status != "ok" or not result.image_sha256:
            return
        sha = key_hash(result.image_sha256)
        self.sent_shas.add(sha)
        if result.dedup_of is None:
            _keep(self._recent, sha, result)
            if self.near is not None and result.dhash is not None:
                self.near.add(result.dhash)
                _keep(self._recent_near, result.dhash & _MASK64, result)

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
        return await self.original_of(sha256)

    async def _near_copy(self, dhash: int) -> tuple[Original, int] | None:
        """(The ok row of an original within the distance, how far) — captioned, or being sent now."""
        while True:
            if (hit := self.near.nearest(dhash)) is not None:
                original, distance = hit
                row = self._recent_near.get(original)
                if row is None:
                    signed = original - (1 << 64) if original >= 1 << 63 else original
                    row = await asyncio.to_thread(self._find_near_on_disk, signed)
                return (row, distance) if row is not None else None
            in_flight = [(hamming_distance(h, dhash), sha) for sha, h in self._sending_near.items()]
            distance, sha = min(in_flight, default=(self.near.max_distance + 1, 0))
            if distance > self.near.max_distance:
                return None
            if (row := await asyncio.shield(self._sending[sha])) is not None:
                return row, distance
            # that original failed: look again (another may have been captioned or be in flight)


def _keep(cache: collections.OrderedDict, key: int, row: Result) -> None:
    """Put `row` in a bounded most-recent cache."""
    cache[key] = row
    cache.move_to_end(key)
    if len(cache) > DEDUP_CACHE:
        cache.popitem(last=False)
