"""engine/batch/submit.py: cut new chunks from what is left, and take each to the provider exactly once.

An image is in at most one live chunk: new chunks take only images without an ok row, not in a
chunk, not ended in this out folder's batches (a 400 is an error row, not retried here), or
listed in a retry file. Identical bytes are sent once, as online: an image whose sha256 this job
already captioned gets a dedup row copying that answer at once; one whose sha256 is in a live chunk
(this one or one still with the provider) is not sent and gets no row yet: the walk after that
chunk is collected finds the original's row and copies it (or, if the original failed, sends the
copy). Nothing about such copies is recorded, so a crash loses no decision. A chunk goes written → uploaded → submitted, each step recorded before
the next. The one window a record cannot close, between "create batch" and writing its id, is
closed by asking the provider for a batch with the chunk's metadata (job fingerprint, run id and
chunk name) before any create, so a chunk is never submitted twice. A provider that refuses a
create with 429 once its retries are spent, while batches of ours are live (a cap on live batches
or enqueued tokens), leaves the chunk uploaded, and no new chunk is cut, until one of them ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Iterator

from ...errors import BadImageError, RateLimitError
from ...providers import BatchInfo
from ...records import Encoded
from ...sources import Item
from ...store import key_hash
from ..caption import item_facts
from .context import BatchRun
from .state import ChunkRecord, ChunkWriter, IndexEntry, crash_point

__all__ = ["Submitter", "encoded_items"]

log = logging.getLogger(__name__)

ENCODE_BATCH = 32  # images encoded per trip to the thread pool
LIST_SKEW_S = 3600  # a crashed create is looked for among batches created since the upload, less this


def encoded_items(run_prepare, items: Iterator[tuple[Item, int]], pool: concurrent.futures.Executor
                  ) -> Iterator[tuple[Item, int, Encoded | BadImageError]]:
    """Prepare (item, attempt) pairs in the pool, ENCODE_BATCH at a time, in order; a bad image
    comes back as its error instead of raising."""
    def prepare(item: Item) -> Encoded | BadImageError:
        try:
            return run_prepare(item)
        except BadImageError as err:
            return err

    while batch := list(itertools.islice(items, ENCODE_BATCH)):
        for (item, attempt), result in zip(batch, pool.map(prepare, [i for i, _ in batch])):
            yield item, attempt, result


class Submitter:
    """The submitting half of the batch driver."""

    def __init__(self, run: BatchRun):
        self.run = run
        self._first_walk = True  # "already done" is counted on the first walk only
        self._live_shas: set[int] = set()  # sha256 hashes of the images in live chunks, this walk
        self.waiting = False  # the provider refuses more batches until one of ours ends (see `create_or_wait`)

    async def submit(self, record: ChunkRecord) -> None:
        """written → uploaded → submitted, each step recorded before the next."""
        run = self.run
        if record.state == "written":
            file_id = await run.policy.call("upload", run.backend.upload, run.state.path(record.name, ".jsonl"))
            crash_point("uploaded")
            record = dataclasses.replace(record, state="uploaded", file_id=file_id, uploaded_at=time.time())
            run.state.save(record)
        batch = await self.find_created(record)
        if batch is None:
            batch = await self.create_or_wait(record)
        if batch is None:
            return
        run.state.save(dataclasses.replace(record, state="submitted", batch_id=batch.id, status=batch.status,
                                           counts=batch.counts))
        log.info("%s: %d requests submitted as batch %s", record.name, record.lines, batch.id)

    async def create(self, record: ChunkRecord) -> BatchInfo:
        """Create the chunk's batch once: a failed create is tried again only after the provider
        says it did not happen after all (a lost answer must not become a second batch)."""
        run = self.run
        metadata = run.state.metadata(run.captioner.job, record.name)

        async def create_once() -> BatchInfo:
            batch = await run.backend.submit(record.file_id, metadata, run.captioner.job.batch.completion_window)
            crash_point("created")
            run.summary.submitted += 1
            return batch

        return await run.policy.call(f"{record.name}: create", create_once, after_wait=lambda: self.find_created(record))

    async def create_or_wait(self, record: ChunkRecord) -> BatchInfo | None:
        """`create`, or None (and `waiting` set) when the provider still refuses with 429 after the
        retries while another of our batches is live: the chunk stays uploaded until that one ends."""
        try:
            return await self.create(record)
        except RateLimitError as err:
            if not any(r.name != record.name and r.state in ("submitted", "collecting")
                       for r in self.run.live_records()):
                raise
            log.warning("%s: the provider takes no more batches for now (%s); it is created once a live batch "
                        "ends", record.name, err)
            self.waiting = True
            return None

    async def find_created(self, record: ChunkRecord) -> BatchInfo | None:
        """The provider's batch for this chunk, if one was created but not recorded (crash window)."""
        run = self.run
        since = record.uploaded_at - LIST_SKEW_S if record.uploaded_at else None
        found = await run.policy.call("list batches", run.backend.find,
                                      run.state.metadata(run.captioner.job, record.name), since, record.file_id)
        if found is not None:
            log.info("%s: found batch %s created before a crash", record.name, found.id)
        return found

    def _pending(self) -> Iterator[tuple[Item, int]]:
        """(item, attempt number) for every image that should go into a new chunk."""
        run = self.run
        for item in run.source.items():
            hashed = key_hash(item.key)
            if hashed in run.done:  # counted once, and only if done before this invocation
                run.summary.skipped += self._first_walk and hashed in run.done_before
                continue
            used = run.state.ledger.get(hashed)
            if used is None:
                yield item, 1
            elif used > 0:
                yield item, used + 1

    async def submit_pending(self) -> None:
        """Stream what is left into chunk files; submit each chunk as soon as it is closed."""
        run = self.run
        if run.source is None:
            return
        loop = asyncio.get_running_loop()
        self._live_shas = run.state.live_shas()
        workers = run.captioner.job.limits.preprocess_workers or os.cpu_count() or 1
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="caption-image") as pool:
            items = encoded_items(run.captioner.prepare, self._pending(), pool)
            writer = None
            while not self.waiting and (found := await loop.run_in_executor(None, next, items, None)) is not None:
                writer = await self._add(writer, *found)
            if writer is not None:
                await self.close_and_submit(writer)
        self._first_walk = False

    async def _add(self, writer: ChunkWriter | None, item: Item, attempt: int,
                   encoded: Encoded | BadImageError) -> ChunkWriter | None:
        """Put one image's request line in the open chunk (a full chunk is submitted first)."""
        run = self.run
        if isinstance(encoded, BadImageError):
            run.record_row(run.captioner.error_row(item.key, item_facts(item), encoded, attempts=0))
            run.state.ledger[key_hash(item.key)] = 0
            return writer
        if await self._copied(item, encoded):
            return writer
        custom_id = run.backend.custom_id(item.key)
        line = run.backend.request_line(custom_id, encoded)
        if writer is not None and not writer.fits(line):
            await self.close_and_submit(writer)
            writer = None
        if writer is None:
            writer = ChunkWriter(run.state.folder, run.state.next_name(), run.captioner.job.batch)
            run.state.records[writer.name] = ChunkRecord(writer.name, 0, 0, "writing")
        writer.add(line, IndexEntry(custom_id, item.key, attempt, item_facts(item, encoded)))
        run.state.ledger[key_hash(item.key)] = -1
        if encoded.sha256:
            self._live_shas.add(key_hash(encoded.sha256))
        if writer.lines == 2:
            crash_point("writing")
        return writer

    async def _copied(self, item: Item, encoded: Encoded) -> bool:
        """True when these bytes are not to be sent: copied from this job's answer now (a dedup
        row), or waiting for a live chunk that holds them (no row yet; a later walk copies it)."""
        run = self.run
        if not encoded.sha256:  # an image sent as its URL: no bytes to compare
            return False
        original = await run.dedupe.original_of(encoded.sha256)
        if original is not None:
            run.record_row(run.captioner.dedup_row(item.key, item_facts(item, encoded), original))
            return True
        if key_hash(encoded.sha256) in self._live_shas:
            log.debug("%s: the same bytes are in a live chunk; copied once that chunk is collected", item.key)
            return True
        return False

    async def close_and_submit(self, writer: ChunkWriter) -> None:
        record = dataclasses.replace(writer.close(), job=self.run.captioner.job.fingerprint)
        self.run.state.save(record)
        if not self.waiting:  # else it stays written, submitted once a live batch ends
            await self.submit(record)
