"""store/index.py: reading an out folder back: its rows, THE latest-row rule, the resume index.

Latest row per image wins: rows are appended in the order attempts ended and parts are numbered
in that order, so an image's latest row is its last row in part order. `LatestRows` is the one
place that rule is written; resume, report, export and review all read through it. Hashes of
keys (8 bytes each, in sorted arrays) stand for the keys, so a million images cost megabytes,
not hundreds of them. Reads only.
"""

from __future__ import annotations

import array
import bisect
import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .layout import parts, unreadable_part

__all__ = ["key_hash", "HashSet", "LatestRows", "iter_rows", "iter_latest_rows", "resume_index", "original_dhashes"]

INDEX_BATCH = 8192  # rows per batch when an index is read: a small, fixed transient


def key_hash(key: str) -> int:
    """64-bit hash of a resume key: the index holds these, not the paths, to stay small.

    Two keys colliding in 64 bits has odds of about n²/2⁶⁵ (3e-8 for a million images).
    """
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")


class HashSet:
    """A set of 64-bit hashes: a sorted array (8 bytes each) built once, plus the few added later."""

    def __init__(self, ordered: array.array):
        self._sorted = ordered  # array('Q'), ascending, no repeats
        self._added: set[int] = set()

    @classmethod
    def of(cls, hashes: Iterable[int]) -> HashSet:
        """The set of `hashes` (any order, repeats allowed)."""
        ordered = array.array("Q")
        for value in sorted(hashes):  # a transient list; what stays is 8 bytes a hash
            if not ordered or ordered[-1] != value:
                ordered.append(value)
        return cls(ordered)

    def __contains__(self, value: int) -> bool:
        index = bisect.bisect_left(self._sorted, value)
        return (index < len(self._sorted) and self._sorted[index] == value) or value in self._added

    def add(self, value: int) -> None:
        if value not in self:
            self._added.add(value)

    def __len__(self) -> int:
        return len(self._sorted) + len(self._added)

    def fork(self) -> HashSet:
        """A set holding the same hashes, to be added to separately (the sorted array is shared)."""
        forked = HashSet(self._sorted)
        forked._added = set(self._added)
        return forked


def iter_rows(out: str | Path, columns: list[str], *, batch_size: int = 65_536) -> Iterator[dict[str, list]]:
    """Yield the out folder's rows, parts in order, a record batch at a time, as column lists.

    A column that a part lacks (written by an older version) comes back as nulls.
    """
    for _, part in parts(Path(out)):
        try:
            handle = pq.ParquetFile(part)
            present = [c for c in columns if c in handle.schema_arrow.names]
            batches = handle.iter_batches(columns=present, batch_size=batch_size)
            for batch in batches:
                rows = batch.to_pydict()
                yield {c: rows[c] if c in rows else [None] * batch.num_rows for c in columns}
        except (pa.ArrowException, OSError) as err:  # a part cut short, overwritten, not Parquet
            raise unreadable_part(part, err) from None


class LatestRows:
    """Which rows of an out folder are their image's latest (see the module docstring).

    Holds only the positions (row numbers across the parts) of rows a later row of the same
    image replaced: few, since an image gets a second row only when its first was an error.
    """

    def __init__(self, replaced: set[int]):
        self._replaced = replaced

    @classmethod
    def of_hashes(cls, hashes: array.array) -> LatestRows:
        """The rule over one key hash per row, in written order."""
        ordered = sorted(hashes)  # a transient list: repeats sit side by side
        repeated = {ordered[i] for i in range(1, len(ordered)) if ordered[i] == ordered[i - 1]}
        del ordered
        if not repeated:
            return cls(set())
        last = {h: i for i, h in enumerate(hashes) if h in repeated}
        return cls({i for i, h in enumerate(hashes) if h in repeated and last[h] != i})

    @classmethod
    def read(cls, out: Path) -> LatestRows:
        """The rule for the rows in `out`'s parts now."""
        hashes = array.array("Q")
        for batch in iter_rows(out, ["image_path"], batch_size=INDEX_BATCH):
            hashes.extend(key_hash(path) for path in batch["image_path"])
        return cls.of_hashes(hashes)

    def is_latest(self, position: int) -> bool:
        return position not in self._replaced


def iter_latest_rows(out: Path, columns: Iterable[str], latest: LatestRows | None = None
                     ) -> Iterator[dict[str, Any]]:
    """Yield each image's latest row (as `{column: value}`, `image_path` always included), in written order."""
    latest = latest or LatestRows.read(out)
    names = list(dict.fromkeys(["image_path", *columns]))
    position = 0
    for batch in iter_rows(out, names):
        for i in range(len(batch["image_path"])):
            if latest.is_latest(position + i):
                yield {name: batch[name][i] for name in names}
        position += len(batch["image_path"])


def resume_index(out: Path, fingerprint: str) -> tuple[HashSet, HashSet]:
    """(key hashes of images whose latest row is ok, hashes of the sha256s of this job's ok rows).

    The first is what a resumed run skips; the second, which files a run need not send again
    (identical bytes). Another job's answers do not count for the second.
    """
    keys, oks, shas = array.array("Q"), array.array("b"), array.array("Q")
    columns = ["image_path", "status", "image_sha256", "job_fingerprint"]
    for batch in iter_rows(out, columns=columns, batch_size=INDEX_BATCH):
        for path, status, sha, row_fingerprint in zip(*(batch[c] for c in columns)):
            keys.append(key_hash(path))
            oks.append(status == "ok")
            if status == "ok" and sha and row_fingerprint == fingerprint:
                shas.append(key_hash(sha))
    latest = LatestRows.of_hashes(keys)
    done = HashSet.of(h for i, (h, ok) in enumerate(zip(keys, oks)) if ok and latest.is_latest(i))
    return done, HashSet.of(shas)


def original_dhashes(out: Path, fingerprint: str) -> array.array:
    """The `dhash` of every ok original (not a copy) of this job, in written order (8 bytes each).

    What near dedupe matches against across resumed runs; rows written without near dedupe
    carry no dhash and are not in it. Read only when the job asks for near dedupe.
    """
    hashes = array.array("q")
    columns = ["dhash", "status", "dedup_of", "job_fingerprint"]
    for batch in iter_rows(out, columns=columns, batch_size=INDEX_BATCH):
        for dhash, status, dedup_of, row_fingerprint in zip(*(batch[c] for c in columns)):
            if dhash is not None and status == "ok" and not dedup_of and row_fingerprint == fingerprint:
                hashes.append(dhash)
    return hashes
