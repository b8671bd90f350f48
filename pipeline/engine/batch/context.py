"""engine/batch/context.py: what one batch invocation's parts share, and how they write a row."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

import tqdm

from ...providers import BatchBackend
from ...records import BatchSummary, Result
from ...sources import ImageSource
from ...store import HashSet, Store, key_hash
from ..caption import Captioner
from ..dedupe import Deduper
from ..retry import RetryPolicy
from .state import BatchState, ChunkRecord

__all__ = ["BatchRun"]

log = logging.getLogger(__name__)

LOG_EVERY_S = 30.0


@dataclass(slots=True)
class BatchRun:
    """One invocation of the batch driver: its step, record, provider and counters."""

    captioner: Captioner
    source: ImageSource | None  # None: `caption batch collect` with no input recorded
    store: Store
    state: BatchState
    backend: BatchBackend
    summary: BatchSummary
    policy: RetryPolicy
    done: HashSet = field(init=False)  # key hashes of images whose latest row is ok
    done_before: HashSet = field(init=False)  # ...before this invocation: what "already done" counts
    dedupe: Deduper = field(init=False)  # identical bytes are sent once (the online rule)
    bar: tqdm.tqdm | None = None
    _last_log: float = 0.0

    def __post_init__(self) -> None:
        self.done_before, sent_shas = self.store.resume_index()
        self.done = self.done_before.fork()
        self.dedupe = Deduper(sent_shas, self.store.find_ok_by_sha)

    def open_bar(self, progress: bool | None) -> None:
        """Show a progress bar when asked to (None: when stderr is a terminal)."""
        if progress if progress is not None else sys.stderr.isatty():
            self.bar = tqdm.tqdm(unit="req", dynamic_ncols=True, file=sys.stderr)

    def record_row(self, row: Result) -> None:
        """Write one row (rolling a part when due) and count it."""
        self.store.append(row)
        self.store.roll_if_due()
        self.summary.count(row)
        if row.status == "ok":
            self.done.add(key_hash(row.image_path))
            self.dedupe.remember(row)

    def live_records(self) -> list[ChunkRecord]:
        return self.state.open_records()

    def show_progress(self) -> None:
        counts = [r.counts or {} for r in self.live_records()]
        total = sum(c.get("total", 0) for c in counts)
        ended = sum(c.get("completed", 0) + c.get("failed", 0) for c in counts)
        if self.bar is not None:
            self.bar.total, self.bar.n = total, ended
            self.bar.set_postfix({"batches": len(counts), "rows ok": self.summary.ok}, refresh=True)
        elif time.monotonic() - self._last_log >= LOG_EVERY_S:
            self._last_log = time.monotonic()
            log.info("batch progress: %d/%d requests ended in %d live batches", ended, total, len(counts))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
