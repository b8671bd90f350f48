"""engine/batch/driver.py: one invocation of the batch driver: move every chunk forward, cut new
chunks from what is left, poll, collect; with `detach`, stop once everything is submitted."""

from __future__ import annotations

import logging

from ...errors import RateLimitError, TransientError
from .collect import Collector
from .context import BatchRun
from .submit import Submitter

__all__ = ["BatchDriver"]

log = logging.getLogger(__name__)


class BatchDriver:
    """Scheduling only: the submitter and the collector do the steps, the Captioner the rows."""

    def __init__(self, run: BatchRun):
        self.run = run
        self.submitter = Submitter(run)
        self.collector = Collector(run)

    async def main(self, detach: bool) -> None:
        run = self.run
        try:
            await self.advance_open_chunks()
            while True:
                if not (self.collector.held and run.live_records()):
                    self.collector.held = False
                    await self.submitter.submit_pending()
                live = run.live_records()
                if detach or not live:
                    break
                await self.collector.wait_and_collect(live)
        finally:
            run.close()
        run.summary.live_batches = len(run.live_records())

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
