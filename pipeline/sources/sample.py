"""sources/sample.py: part of a source: a deterministic random sample of it, or its first items.

Wrappers around any `ImageSource`, picked by `open_source` from the `[input]` settings `sample` /
`sample_seed` and `limit`, so every driver and reader sees the same part of INPUT without knowing it
is one. They choose items only: keys, bytes, `open_by_key` and the walk's skip counts are the inner
source's. Neither is part of the job fingerprint, so one out folder takes a sample and later the full
run, which skips what the sample did.

`SampledSource` keeps, in one streaming pass, the N items whose keyed hash `blake2b(key, key=seed)` is
smallest (a bottom-k sample, also called "reservoir sampling by hash": E. Cohen and H. Kaplan,
"Summarizing data using bottom-k sketches", PODC 2007, https://doi.org/10.1145/1281100.1281133).
A good hash makes the N smallest a uniform random sample without replacement; it depends only on
the seed and the keys, never on the walk's timing, so two runs pick the same keys. A bounded heap
holds at most N items (memory O(N)); the chosen ones are then yielded in walk order. The sample of
N is part of the sample of N + 1 with the same seed, and a file added to INPUT changes it only if
its hash is among the N smallest.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
from collections.abc import Iterator

import pyarrow as pa

from .base import ImageSource, Item

__all__ = ["SampledSource", "LimitedSource", "sample_rank", "NOT_SAMPLED"]

NOT_SAMPLED = "not in the sample"
"""The skip reason `SampledSource.skipped` counts the items it left out under."""


def sample_rank(key: str, seed: int) -> int:
    """The item's place in the sample order for this seed: a 64-bit keyed hash of its key."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8,
                             key=seed.to_bytes(8, "big", signed=True))
    return int.from_bytes(digest.digest(), "big")


class SampledSource:
    """The `n` items of `inner` with the smallest `sample_rank` for `seed`, in walk order."""

    def __init__(self, inner: ImageSource, n: int, seed: int = 0):
        if n < 1:
            raise ValueError(f"a sample takes at least one item, not {n}")
        self.inner, self.n, self.seed = inner, n, seed
        self.largest_heap = 0  # the most items a pass held at once (the memory bound, for tests)
        self._left_out = 0  # by the pass that got furthest

    def __repr__(self) -> str:
        return f"SampledSource({self.inner!r}, n={self.n}, seed={self.seed})"

    @property
    def skipped(self) -> dict[str, int]:
        """The inner source's skip counts, plus the items left out of the sample."""
        merged = dict(self.inner.skipped)
        if self._left_out:
            merged[NOT_SAMPLED] = self._left_out
        return merged

    def items(self) -> Iterator[Item]:
        """Walks the whole inner source first (holding at most `n` items), then yields the chosen ones."""
        heap: list[tuple[int, int, Item]] = []  # (-rank, -position, item): the root is the largest rank
        seen = 0
        for position, item in enumerate(self.inner.items()):
            seen = position + 1
            entry = (-sample_rank(item.key, self.seed), -position, item)
            if len(heap) < self.n:
                heapq.heappush(heap, entry)
            elif entry[:2] > heap[0][:2]:  # a smaller rank than the largest kept: it takes that one's place
                heapq.heapreplace(heap, entry)
            self.largest_heap = max(self.largest_heap, len(heap))
        self._left_out = max(self._left_out, seen - len(heap))
        for _, _, item in sorted(heap, key=lambda entry: -entry[1]):
            yield item

    def why_empty(self) -> str | None:
        """The inner source's answer: a sample of at least one item is empty only when INPUT is."""
        return self.inner.why_empty()

    def open_by_key(self, key: str) -> Item | None:
        """The inner source's item for this key, sampled or not (readers find any image of INPUT)."""
        return self.inner.open_by_key(key)

    def kept_schema(self) -> pa.Schema:
        return self.inner.kept_schema()

    @property
    def remote_reads(self) -> bool:
        return getattr(self.inner, "remote_reads", False)


class LimitedSource:
    """The first `n` items of `inner`, in walk order (the walk stops there)."""

    def __init__(self, inner: ImageSource, n: int):
        if n < 1:
            raise ValueError(f"a limit takes at least one item, not {n}")
        self.inner, self.n = inner, n

    def __repr__(self) -> str:
        return f"LimitedSource({self.inner!r}, n={self.n})"

    @property
    def skipped(self) -> dict[str, int]:
        """The inner source's skip counts, as far as its walk went."""
        return self.inner.skipped

    def items(self) -> Iterator[Item]:
        return itertools.islice(self.inner.items(), self.n)

    def why_empty(self) -> str | None:
        return self.inner.why_empty()

    def open_by_key(self, key: str) -> Item | None:
        return self.inner.open_by_key(key)

    def kept_schema(self) -> pa.Schema:
        return self.inner.kept_schema()

    @property
    def remote_reads(self) -> bool:
        return getattr(self.inner, "remote_reads", False)
