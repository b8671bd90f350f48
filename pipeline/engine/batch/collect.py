"""engine/batch/collect.py: watch the live batches and turn each ended one into rows, exactly once.

Collection marks the chunk "collecting" first; a collection cut short is redone, skipping lines
whose row (image, request id) is already in the store, so every result becomes a row exactly once.
What a batch did not answer for good goes in the chunk's retry file, for a later chunk. Polls
start at FIRST_POLL_S and double up to `batch.poll_s`, so a batch that ends in seconds (a local
server, a small batch) is collected in seconds, and a long one is asked about every poll_s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterator

from ...errors import FatalError, RateLimitError, TransientError
from ...providers import BatchInfo, LineResult
from ...store import iter_rows
from .context import BatchRun
from .lines import LineOutcome, outcome_of, read_line, result_lines
from .state import ChunkRecord, IndexEntry, crash_point, read_index

__all__ = ["Collector", "poll_waits"]

log = logging.getLogger(__name__)

POLL_BACKOFF_MAX_S = 600.0
FIRST_POLL_S = 1.0  # the first wait between polls; doubled each poll up to batch.poll_s
_RESULT_FILE = ".results-{}.jsonl"


class Collector:
    """The collecting half of the batch driver."""

    def __init__(self, run: BatchRun):
        self.run = run
        self.held = False  # the provider's queue is full: submit again once a batch ends

    async def wait_and_collect(self, live: list[ChunkRecord]) -> None:
        """Poll the live batches (see `poll_waits`; backing off on errors) until at least one is collected."""
        run, failures = self.run, 0
        poll_s = run.captioner.job.batch.poll_s
        waits = poll_waits(poll_s)
        backoff = dataclasses.replace(run.policy, base_s=poll_s, max_s=max(poll_s, POLL_BACKOFF_MAX_S))
        while True:
            try:
                ended = 0
                for name in [r.name for r in live]:
                    record = run.state.records[name]  # the current record: a pass may have moved it on
                    if record.state in ("submitted", "collecting"):  # collecting: a collection cut short
                        ended += await self.poll_once(record)
                    elif record.state == "collected":
                        ended += 1
                failures = 0
            except (TransientError, RateLimitError) as err:
                failures += 1
                wait = backoff.backoff_s(failures + 1)
                log.warning("polling failed (%s); again in %.1f s", err, wait)
                await asyncio.sleep(wait)
                continue
            run.show_progress()
            crash_point("polling")
            if ended:
                return
            await asyncio.sleep(next(waits))

    async def poll_once(self, record: ChunkRecord) -> bool:
        """Ask for a submitted batch's status; collect it if it has ended. True if collected.

        A batch the provider no longer knows (404: deleted, or the bundled server of a run that
        died) ran nothing we can collect: its lines are sent again.
        """
        run = self.run
        try:
            batch = await run.backend.poll(record.batch_id)
        except FatalError as err:
            if err.status != 404:
                raise
            log.warning("%s: batch %s is gone (%s); its %d requests will be sent again", record.name,
                        record.batch_id, err, record.lines)
            self._give_back(record, self._index(record), BatchInfo(record.batch_id, "lost", True), None)
            return True
        if batch.ended:
            await self.collect(record, batch, recovering=False)
            return True
        if batch.status != record.status or batch.counts != record.counts:
            run.state.records[record.name] = dataclasses.replace(record, status=batch.status, counts=batch.counts)
        return False

    async def collect(self, record: ChunkRecord, batch: BatchInfo, *, recovering: bool) -> None:
        """Download an ended batch's files and write one row per answered image, exactly once."""
        run = self.run
        # A collection that was cut short (this process or an earlier one) is redone without
        # writing again the rows it had written.
        recovering = recovering or run.state.records[record.name].state == "collecting"
        record = dataclasses.replace(record, state="collecting", status=batch.status, counts=batch.counts)
        run.state.save(record)
        index = self._index(record)
        if batch.ran_nothing:
            failure = self._failure(record, batch)
            return self._give_back(record, index, batch, failure)
        seen = _Seen(self._rows_already_written(index) if recovering else set())
        max_attempts = run.captioner.job.limits.max_attempts
        for number, file_ref in enumerate(batch.result_files, 1):
            path = run.state.path(record.name, _RESULT_FILE.format(number))
            await run.policy.call("download", run.backend.download, file_ref, path)
            with open(path, "rb") as handle:
                for raw in result_lines(handle, path.name):
                    self._take(read_line(run.captioner, run.backend, raw, index.get, max_attempts), index, seen)
        for custom_id, entry in index.items():  # in no file: it did not run
            if custom_id not in seen.handled:
                self._take(outcome_of(run.captioner, entry, LineResult(custom_id, ran=False), max_attempts),
                           index, seen)
        self._finish_collect(record, seen.retries, batch)

    def _failure(self, record: ChunkRecord, batch: BatchInfo) -> FatalError | None:
        """Why a batch that ran nothing stops the run; None when waiting cures it (a full queue
        while another of our batches is live: an unattended run waits instead of stopping)."""
        if batch.queue_full and any(r.name != record.name for r in self.run.live_records()):
            log.warning("%s: %s; its requests wait until a live batch ends", record.name, batch.failure)
            self.held = True
            return None
        hint = ("wait for the live batches to finish (caption batch collect OUT), then run again"
                if batch.queue_full else "fix the cause, then run again; its images will be sent again")
        return FatalError(f"{batch.failure}; {hint}")

    def _take(self, outcome: LineOutcome | None, index: dict[str, IndexEntry], seen: _Seen) -> None:
        if outcome is None or outcome.custom_id in seen.handled:
            return
        seen.handled.add(outcome.custom_id)
        if outcome.learned:
            self.run.state.keep_learned(self.run.captioner.provider.learned())
        if outcome.row is None:
            entry = index[outcome.custom_id]
            seen.retries.append((entry.key, entry.attempts))
        elif (outcome.row.image_path, outcome.row.request_id) not in seen.written:
            self.run.record_row(outcome.row)
            if len(seen.handled) == 1:
                crash_point("collecting")

    def _give_back(self, record: ChunkRecord, index: dict[str, IndexEntry], batch: BatchInfo,
                   failure: FatalError | None) -> None:
        """A batch that ran nothing (failed validation, or lost by the provider): every line goes back
        to be sent again by a later run; a failure that resending at once cannot cure stops this one
        (rather than spending every image's attempts in a few seconds)."""
        self._finish_collect(record, [(entry.key, entry.attempts) for entry in index.values()], batch)
        if failure is not None:
            raise failure

    def _finish_collect(self, record: ChunkRecord, retries: list[tuple[str, int]], batch: BatchInfo) -> None:
        state = self.run.state
        state.write_retries(record.name, retries)
        self.run.store.sync()
        state.save(dataclasses.replace(record, state="collected"))
        state.enter_ledger(state.records[record.name])
        state.path(record.name, ".jsonl").unlink(missing_ok=True)
        for path in state.folder.glob(f"{record.name}{_RESULT_FILE.format('*')}"):
            path.unlink()
        log.info("%s: batch %s %s; %d to send again", record.name, batch.id, batch.status, len(retries))

    def _rows_already_written(self, index: dict[str, IndexEntry]) -> set[tuple[str, str]]:
        """(image, request id) of rows in the store for this chunk's images: a cut-short collection."""
        self.run.store.close()  # the open journal becomes a part, so iter_rows sees it
        keys = {e.key for e in index.values()}
        found = set()
        for rows in iter_rows(self.run.store.out, ["image_path", "request_id"]):
            found.update((p, r) for p, r in zip(rows["image_path"], rows["request_id"]) if p in keys)
        return found

    def _index(self, record: ChunkRecord) -> dict[str, IndexEntry]:
        return {e.custom_id: e for e in read_index(self.run.state.path(record.name, ".index.jsonl"))}


def poll_waits(poll_s: float, first_s: float = FIRST_POLL_S) -> Iterator[float]:
    """Seconds to wait before each next poll: first_s, doubling, then poll_s for ever (never above poll_s)."""
    wait = min(first_s, poll_s)
    while True:
        yield wait
        wait = min(wait * 2, poll_s)


@dataclasses.dataclass(slots=True)
class _Seen:
    """What one collection has done so far."""

    written: set[tuple[str, str]]  # (image, request id) already in the store before it began
    handled: set[str] = dataclasses.field(default_factory=set)  # custom ids taken
    retries: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (key, attempts) to send again
