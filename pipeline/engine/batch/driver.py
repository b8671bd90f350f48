"""engine/batch/driver.py: one invocation of the batch driver: move every chunk forward, cut new
chunks from what is left, poll, collect; with `detach`, stop once everything is submitted."""

from __future__ import annotations

import asyncio
import logging
import signal

from ...errors import RateLimitError, TransientError
from .collect import Collector
from .context import BatchRun
from .submit import Submitter

__all__ = ["BatchDriver"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)

log = logging.getLogger(__name__)


class BatchDriver:
    """Scheduling only: the submitter and the collector do the steps, the Captioner the rows."""

    def __init__(self, run: BatchRun):
        self.run = run
        self.submitter = Submitter(run)
        self.collector = Collector(run)

    async def main(self, detach: bool, *, handle_signals: bool = False) -> None:
        """Run to the end (or, with `detach`, until everything is submitted).

        With `handle_signals`, Ctrl-C or SIGTERM stops it between two awaits and marks the summary
        interrupted: every step is recorded before the next begins, so the next run resumes from
        the record, as after a kill -9. A second signal is not caught.
        """
        run = self.run
        stopping = _Interrupt(asyncio.current_task()) if handle_signals else None
        try:
            await self._loop(detach)
        except asyncio.CancelledError:
            if stopping is None or not stopping.fired:
                raise
            run.summary.interrupted = True
            asyncio.current_task().uncancel()
        finally:
            if stopping is not None:
                stopping.remove()
            run.close()
        run.summary.live_batches = len(run.live_records())

    async def _loop(self, detach: bool) -> None:
        run = self.run
        await self.advance_open_chunks()
        while True:
            if not (self.collector.held and run.live_records()) and not self.submitter.waiting:
                self.collector.held = False
                await self.submit_waiting()
                await self.submitter.submit_pending()
            live = run.live_records()
            if detach or not live:
                return
            await self.collector.wait_and_collect(live)
            self.submitter.waiting = False  # a batch ended: the provider may take another now

    async def submit_waiting(self) -> None:
        """Submit the chunks a refused create left written or uploaded (see `Submitter.create_or_wait`)."""
        for record in self.run.state.open_records():
            if self.submitter.waiting:
                return
            if record.state in ("written", "uploaded"):
                await self.submitter.submit(record)

    async def advance_open_chunks(self) -> None:
        """Resume every chunk a previous invocation left open, and collect those that have ended."""
        for record in self.run.state.open_records():
            if record.state in ("written", "uploaded"):
                await self.submitter.submit(record)
            elif record.state == "collecting":
                await self.collector.poll_once(record)  # collect() sees the state and redoes it without duplicates
            else:
                try:
                    await self.collector.poll_once(record)
                except (TransientError, RateLimitError) as err:
                    log.warning("%s: could not ask for batch %s (%s); asking again later", record.name,
                                record.batch_id, err)


class _Interrupt:
    """SIGINT/SIGTERM cancel one task, once; the handlers are removed as they fire."""

    def __init__(self, task: asyncio.Task):
        self._task = task
        self.fired = False
        self._loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            self._loop.add_signal_handler(sig, self._fire, sig)

    def _fire(self, sig: int) -> None:
        log.warning("%s: stopping; the batches stay with the provider, and the next run collects them",
                    signal.Signals(sig).name)
        self.fired = True
        self.remove()
        self._task.cancel()

    def remove(self) -> None:
        for sig in _SIGNALS:
            self._loop.remove_signal_handler(sig)
