"""engine/progress.py: what a run shows while it goes, the same for every driver that sends online.

`Counter` counts, in the background, what INPUT holds to do (the bar's total) and what is done
already; `Progress` draws a tqdm bar on a terminal, else a log line every LOG_EVERY_S, with
done/total, %, rate, ETA, ok / err / retries / 429s / in flight / tokens and the spend so far at
the model's list price. A driver gives it its summary and a gauge of its limiter (one machine's, or
the cluster's budget actor's).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable

import tqdm

from .. import cost
from ..errors import JobError
from ..job import Job
from ..records import RunSummary
from ..store import HashSet, key_hash

__all__ = ["Counter", "Progress", "Gauge", "LOG_EVERY_S"]

log = logging.getLogger(__name__)

LOG_EVERY_S = 30.0  # progress line interval when stderr is not a terminal

Gauge = Callable[[], tuple[int, int, int]]
"""The limiter's figures now: (429s so far, requests in flight, the in-flight limit)."""


class Counter(threading.Thread):
    """Counts, in the background, the items of the source to do (not done yet) and those done
    already: the progress bar's total and the ETA. It asks the source's `keys()` when it has one
    (a table's key column), else walks its items (directory entries, for a folder); it stops early
    when the run does (a daemon thread, never awaited)."""

    def __init__(self, source, done: HashSet):
        super().__init__(name="caption-quiet-count", daemon=True)  # its walk's log lines repeat the run's own
        self.source, self._done = source, done.fork()  # the run adds to `done`: count against what it was
        self.todo: int | None = None  # set once the count is complete
        self.skipped = 0
        self._given_up = threading.Event()  # not `_stop`: Thread has a method of that name

    def run(self) -> None:
        todo = skipped = 0
        keys = getattr(self.source, "keys", None)
        for key in keys() if keys is not None else (item.key for item in self.source.items()):
            if self._given_up.is_set():
                return
            if key_hash(key) in self._done:
                skipped += 1
            else:
                todo += 1
        self.todo, self.skipped = todo, skipped

    def stop(self, wait_s: float = 0.0) -> None:
        """Give up counting (after waiting up to `wait_s` for a count nearly done)."""
        if wait_s and self.is_alive() and self.todo is None:
            self.join(timeout=wait_s)
        self._given_up.set()


class Progress:
    """A tqdm bar on a terminal; a log line every LOG_EVERY_S otherwise (see the module docstring)."""

    def __init__(self, summary: RunSummary, job: Job, counter: Counter, gauge: Gauge, *, enabled: bool | None):
        self._summary, self._counter, self._gauge = summary, counter, gauge
        tty = sys.stderr.isatty() if enabled is None else enabled
        self._bar = tqdm.tqdm(unit="img", dynamic_ncols=True, file=sys.stderr) if tty else None
        self._last_log = self._started = time.monotonic()
        self._price = list_price(job)

    def update(self) -> None:
        summary = self._summary
        done, total = summary.ok + summary.errors, self._counter.todo
        rate_limited, in_flight, limit = self._gauge()
        stats = {"ok": summary.ok, "err": summary.errors, "retry": summary.retries, "429": rate_limited,
                 "inflight": f"{in_flight}/{limit}", "tok": summary.prompt_tokens + summary.completion_tokens}
        if self._price is not None:
            stats["usd"] = f"{cost.cost_usd(self._price, 'online', summary.prompt_tokens, summary.completion_tokens):.4f}"
        if self._bar is not None:
            if total is not None and self._bar.total != max(total, done):
                self._bar.total = max(total, done)
            self._bar.n = done
            self._bar.set_postfix(stats, refresh=True)
        elif time.monotonic() - self._last_log >= LOG_EVERY_S:
            self._last_log = time.monotonic()
            log.info("progress: %s %s", self._where(done, total), " ".join(f"{k}={v}" for k, v in stats.items()))

    def _where(self, done: int, total: int | None) -> str:
        """"120/1000 (12%) 3.1 img/s eta 4m44s", or "120 done, 3.1 img/s" before the count is complete."""
        rate = done / max(time.monotonic() - self._started, 1e-9)
        if total is None:
            return f"{done} done, {rate:.1f} img/s"
        total = max(total, done)
        left_s = (total - done) / rate if rate > 0 else float("inf")
        eta = "?" if left_s == float("inf") else tqdm.tqdm.format_interval(left_s)
        return f"{done}/{total} ({100 * done / total if total else 100:.0f}%) {rate:.1f} img/s eta {eta}"

    def close(self) -> None:
        if self._bar is not None:
            self.update()
            self._bar.close()


def list_price(job: Job):
    """The job's model's price from the price table, or None (unknown model, unreadable price file)."""
    try:
        return cost.load_prices(job.cost.prices).find(job.endpoint.model)
    except JobError:
        return None
