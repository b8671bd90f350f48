"""engine/online.py: the online driver: one request per image, scheduled under the limits.

Scheduling only: the `Captioner` prepares each item and builds each row, the provider speaks the
wire format, the store writes. This module owns the queues, the workers, the limiter gate,
dedupe of identical files, progress and shutdown. The flow:

    source ─▶ [items, bounded] ─▶ P image workers (thread pool) ─▶ [encoded, bounded] ─▶ C request
    workers (dedupe, limiter slot, the retry policy) ─▶ store (journal line, Parquet part)

Every image ends as exactly one row, except when the run stops before its request ended; such
images simply have no row and the next run takes them. Queues are bounded, so memory holds at
most about 3·C encoded images whatever the size of the folder.

Shutdown order (Ctrl-C, SIGTERM, or a fatal provider error):
1. stop feeding: cancel the walker and the image workers, drop encoded images not yet sent;
2. let in-flight requests finish within `limits.grace_s` (a second Ctrl-C abandons them);
3. flush the store: the open journal segment becomes a Parquet part;
4. close the HTTP session (and the bundled server, if we started one);
5. return the summary, which the CLI prints with how to resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import concurrent.futures
import itertools
import logging
import os
import signal
import time
from pathlib import Path

import aiohttp
from tenacity import RetryCallState

from .. import cost
from ..errors import BadImageError, FatalError, InternalError, JobError, RateLimitError
from ..job import Job, job_summary
from .limits import Limiter
from ..providers import HttpRequest, make_provider
from ..providers.http import Transport
from ..records import ChatResult, Encoded, Result, RunSummary
from ..sources import Item, open_source
from ..store import HashSet, Store, key_hash, open_batch_chunks
from .caption import Captioner, item_facts
from .dedupe import Deduper, NearIndex
from .local import bundled_endpoint
from .progress import Counter, Progress
from .retry import FailureStreak, RetryPolicy

__all__ = ["run_online"]

log = logging.getLogger(__name__)

WALK_BATCH = 256  # paths taken from the walker thread at a time
TICK_S = 1.0  # how often the journal is fsynced, parts are rolled and progress is shown
_DONE = object()  # queue sentinel: one per consumer (3.11 has no Queue.shutdown)


COUNT_AFTER_S = 3.0
"""The progress bar's count starts at the first row, or this long after the run's start if no row came."""

REMOTE_READ_WORKERS = 16
"""Image threads at most when reading an item waits on the network (a table of URLs): each holds one
download (bounded by max_file_mb) or one decode; per-host limits are the source's (`fetch_per_host`)."""


def image_workers(source, concurrency: int) -> int:
    """Threads that read and encode images: one per core, or, when reads wait on the network
    (`source.remote_reads`), enough to keep `concurrency` requests fed (at most REMOTE_READ_WORKERS)."""
    cores = os.cpu_count() or 1
    if getattr(source, "remote_reads", False):
        return max(cores, min(REMOTE_READ_WORKERS, concurrency))
    return cores


class _Stopped(Exception):
    """The run is stopping: this image's request was not sent, and it gets no row."""


async def run_online(job: Job, input_path: str | Path, out: str | Path, *, api_key: str | None,
                     headers: dict[str, str], allow_job_change: bool = False, progress: bool | None = None,
                     handle_signals: bool = False) -> RunSummary:
    """Caption `input_path` into `out` with one request per image; return the run's summary."""
    source = open_source(input_path, job.input)
    store = Store.open(out, job_summary(job), part_rows=job.output.part_rows,
                       part_seconds=job.output.part_seconds, allow_other_job=allow_job_change,
                       kept_schema=source.kept_schema())
    store.keep_out(api_key, *headers.values())
    try:
        if live := open_batch_chunks(store.out):
            raise JobError(f"{out}: {live} batch chunk(s) are still with the provider; sending their images "
                           f"online too would pay twice. Run `caption batch collect {out}` (or cancel them)")
        done, sent_shas = await asyncio.to_thread(store.resume_index)
        near_index = None
        if job.dedupe.near:
            near_index = NearIndex(job.dedupe.max_distance, await asyncio.to_thread(store.original_dhashes))
        async with bundled_endpoint(job.endpoint.base_url) as base_url:
            captioner = Captioner(job, make_provider(job, base_url, api_key=api_key, headers=headers))
            runner = _Run(captioner, source, store, done, sent_shas, progress,
                          near_index)
            if handle_signals:
                runner.install_signal_handlers()
            return await runner.main()
    finally:
        store.release()


class _Run:
    """One run's queues, workers and counters."""

    def __init__(self, captioner: Captioner, source, store: Store, done: HashSet, sent_shas: HashSet,
                 progress: bool | None, near_index: NearIndex | None = None):
        self.captioner = captioner
        self.job = job = captioner.job
        self.source = source
        self.store = store
        self.done = done
        self.dedupe = Deduper(sent_shas, store.find_ok_by_sha, near_index, store.find_ok_by_dhash)
        self.streak = FailureStreak()
        self.summary = RunSummary(out=store.out)
        limits = job.limits
        self.policy = RetryPolicy.of(limits)
        self.limiter = Limiter(limits.concurrency, rpm=limits.rpm, tpm=limits.tpm, rps=limits.rps, tps=limits.tps,
                               backoff_base_s=limits.retry_base_s, max_pause_s=limits.retry_max_s)
        self.image_workers = limits.preprocess_workers or image_workers(source, limits.concurrency)
        self.sources: asyncio.Queue = asyncio.Queue(maxsize=limits.concurrency)
        self.encoded: asyncio.Queue = asyncio.Queue(maxsize=limits.concurrency)
        self.stop = asyncio.Event()
        self.abandon = asyncio.Event()
        self.gate = _Gate(captioner, self.limiter, self.stop, self.summary)
        self._images_left = self.image_workers
        self._counter = Counter(source, done)  # started by the first row, or at COUNT_AFTER_S (`_start_count`)
        limiter = self.limiter
        self._progress = Progress(self.summary, job, self._counter,
                                  lambda: (limiter.rate_limited, limiter.in_flight, int(limiter.limit)),
                                  enabled=progress)
        self._started = time.monotonic()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        if self.stop.is_set():
            log.warning("abandoning in-flight requests")
            self.abandon.set()
            return
        self.summary.interrupted = True
        log.warning("%s: stopping; in-flight requests get up to %.0f s (again to abandon them)",
                    signal.Signals(sig).name, self.job.limits.grace_s)
        self.stop.set()

    async def main(self) -> RunSummary:
        limits = self.job.limits
        connector = aiohttp.TCPConnector(limit=limits.concurrency + 4)
        pool = concurrent.futures.ThreadPoolExecutor(self.image_workers, thread_name_prefix="caption-image")
        try:
            async with aiohttp.ClientSession(connector=connector) as session:
                self.gate.transport = Transport(session, timeout_s=limits.timeout_s, idle_timeout_s=limits.idle_timeout_s,
                                           stream=self.job.endpoint.stream, on_rate_info=self.limiter.observe)
                await self._run_stages(pool)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            await asyncio.to_thread(self.store.close)
            self._counter.stop()
            self._progress.close()
        self.summary.wall_s = time.monotonic() - self._started
        self.summary.rate_limited = self.limiter.rate_limited
        self.summary.skipped_files = dict(self.source.skipped)
        return self.summary

    async def _run_stages(self, pool: concurrent.futures.Executor) -> None:
        feeders = [asyncio.create_task(self._walk())]
        feeders += [asyncio.create_task(self._prepare_images(pool)) for _ in range(self.image_workers)]
        workers = [asyncio.create_task(self._request_images()) for _ in range(self.job.limits.concurrency)]
        ticker = asyncio.create_task(self._tick())
        everything = asyncio.gather(*feeders, *workers)
        stopping = asyncio.create_task(self.stop.wait())
        try:
            await asyncio.wait([everything, stopping], return_when=asyncio.FIRST_COMPLETED)
            failure = everything.exception() if everything.done() and not everything.cancelled() else None
            if failure is not None:  # a stage died: stop, but let the requests in flight finish
                log.error("a stage failed (%s: %s); stopping", type(failure).__name__, failure)
                self.stop.set()
            if not everything.done() or failure is not None:
                await self._drain(feeders, workers)
            if failure is not None:
                raise failure
        finally:
            for task in [*feeders, *workers, ticker, stopping]:
                task.cancel()
            await asyncio.gather(*feeders, *workers, ticker, stopping, everything, return_exceptions=True)

    async def _drain(self, feeders: list[asyncio.Task], workers: list[asyncio.Task]) -> None:
        """Stop feeding, give in-flight requests the grace period, cancel what is left."""
        for task in feeders:
            task.cancel()
        await asyncio.gather(*feeders, return_exceptions=True)
        while not self.encoded.empty():
            self.encoded.get_nowait()  # encoded but never sent: the next run takes them
        for task in workers:
            if not task.done():
                self.encoded.put_nowait(_DONE)
        abandon = asyncio.create_task(self.abandon.wait())
        pending = set(workers)
        deadline = time.monotonic() + self.job.limits.grace_s
        while pending and not abandon.done() and (left := deadline - time.monotonic()) > 0:
            _, pending = await asyncio.wait(pending | {abandon}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            pending.discard(abandon)
        abandon.cancel()
        if pending:
            log.warning("abandoned %d in-flight requests; their images will be sent again on resume", len(pending))
        for task in pending:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)

    # --- stages ----------------------------------------------------------------------------

    async def _walk(self) -> None:
        items = self.source.items()
        while batch := await asyncio.to_thread(lambda: list(itertools.islice(items, WALK_BATCH))):
            for item in batch:
                if key_hash(item.key) in self.done:
                    self.summary.skipped += 1
                else:
                    await self.sources.put(item)
        for _ in range(self.image_workers):
            await self.sources.put(_DONE)

    async def _prepare_images(self, pool: concurrent.futures.Executor) -> None:
        loop = asyncio.get_running_loop()
        while (item := await self.sources.get()) is not _DONE:
            try:
                encoded = await loop.run_in_executor(pool, self.captioner.prepare, item)
            except BadImageError as err:
                self._record(self.captioner.error_row(item.key, item_facts(item), err, attempts=0))
                continue
            await self.encoded.put((item, encoded))
        self._images_left -= 1
        if self._images_left == 0:
            for _ in range(self.job.limits.concurrency):
                await self.encoded.put(_DONE)

    async def _request_images(self) -> None:
        while (item := await self.encoded.get()) is not _DONE:
            source, encoded = item
            try:
                result = await self._caption_once(source, encoded)
            except _Stopped:
                return
            except FatalError as err:
                if not self.summary.fatal:
                    self.summary.fatal = self.store.scrub(str(err))
                    log.error("stopping: %s", self.summary.fatal)
                self.stop.set()
                return
            except Exception as err:  # a bug or an unforeseen answer: this image's row says so, the run goes on
                log.exception("internal error on %s", source.key)
                result = self.captioner.error_row(source.key, item_facts(source, encoded),
                                                  InternalError(f"{type(err).__name__}: {err}"), attempts=0)
            self._record(result)

    # --- one image -------------------------------------------------------------------------

    async def _caption_once(self, item: Item, encoded: Encoded) -> Result:
        """Caption an image with retries, unless a file with the same bytes was (or is being) sent."""
        facts = item_facts(item, encoded)

        async def caption() -> Result:
            gate = self.gate
            retrying = self.policy.image_retrying(sleep=gate.sleep_unless_stopped, before_sleep=gate.before_retry)
            return await self.captioner.caption(item.key, encoded, gate.send, retrying, facts)

        return await self.dedupe.caption_once(
            encoded.sha256, caption, lambda original, distance: self.captioner.dedup_row(item.key, facts, original,
                                                                                          distance),
            dhash=encoded.dhash)

    def _start_count(self) -> None:
        """Start the background count once the run is under way: at its first row, or COUNT_AFTER_S
        after its start, so that the count (a pass over all of INPUT) does not hold back the first
        requests (a million-row table's key column is some 0.5 s of the interpreter's time)."""
        if not self._counter.is_alive() and self._counter.todo is None and not self.stop.is_set():
            with contextlib.suppress(RuntimeError):  # started already (threads start once)
                self._counter.start()

    def _record(self, result: Result) -> None:
        self._start_count()
        self.store.append(result)
        self.summary.count(result)
        if result.status != "ok":
            log.debug("error row for %s: %s: %s", result.image_path, result.error_kind, result.error)
        if (why := self.streak.note(result)) is not None and not self.summary.fatal:
            self.summary.fatal = self.store.scrub(why)
            log.error("stopping: %s", self.summary.fatal)
            self.stop.set()

    async def _tick(self) -> None:
        """Every TICK_S: fsync the journal, roll a due part, refresh progress."""
        while True:
            await asyncio.sleep(TICK_S)
            if time.monotonic() - self._started >= COUNT_AFTER_S:
                self._start_count()
            try:
                await asyncio.to_thread(self.store.sync)
                if self.store.should_rotate() and (segment := self.store.rotate()) is not None:
                    await asyncio.to_thread(self.store.convert, segment)
            except OSError as err:  # disk full, say: rows stay in the journal, which the next run recovers
                log.error("could not sync or roll the Parquet part: %s", err)
            self._progress.update()


class _Gate:
    """Where every request of a run passes: the limiter's gates, the transport, and the stop event.

    A request that has not gone when the run stops never goes; a retry's backoff is slept here,
    cut short by the stop, and never holds a limiter slot.
    """

    def __init__(self, captioner: Captioner, limiter: Limiter, stop: asyncio.Event, summary: RunSummary):
        self.provider = captioner.provider
        prompt = captioner.job.prompt
        self.max_tokens = prompt.max_tokens
        self.model = captioner.job.endpoint.model
        # the part of a request's token estimate that is not the image: never calibrated away
        self.fixed_tokens = cost.text_tokens((prompt.system or "") + prompt.user) + prompt.max_tokens
        self.limiter = limiter
        self.stop = stop
        self.summary = summary
        self.transport: Transport | None = None  # set once the run's HTTP session is open

    async def send(self, request: HttpRequest, tokens: int) -> ChatResult:
        """One request through the limiter's gates; its slot is freed before any retry wait.

        `tokens` is the provider's estimate; the limiter reserves it as calibrated against the
        prompt tokens the server reports, which settle the reservation.

        Raises _Stopped, sending nothing, when the run is stopping (Ctrl-C, a fatal error) before
        or while this request waits for its turn.
        """
        permit = await self._acquire_unless_stopped(tokens)
        used, own_wait = None, 0.0
        try:
            chat = await self.transport.send(self.provider, request)
            if chat.usage is not None and chat.usage.source == "reported":
                used = chat.usage.prompt_tokens + self.max_tokens
        except RateLimitError as err:
            own_wait = self.limiter.on_rate_limited(permit, err)
            raise
        finally:
            self.limiter.release(permit, used_tokens=used)
            if own_wait:  # a concurrency cap refused this one request: it waits, its slot already free
                await self.sleep_unless_stopped(own_wait)
        self.limiter.on_success()
        return chat

    async def _acquire_unless_stopped(self, tokens: int):
        if self.stop.is_set():
            raise _Stopped
        acquire = asyncio.ensure_future(self.limiter.acquire(tokens, fixed_tokens=self.fixed_tokens, model=self.model))
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait([acquire, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not acquire.done():
                acquire.cancel()
        if acquire.cancelled() or not acquire.done():
            raise _Stopped
        permit = acquire.result()
        if self.stop.is_set():
            self.limiter.release(permit)
            raise _Stopped
        return permit

    async def sleep_unless_stopped(self, seconds: float) -> None:
        """A retry's backoff, cut short by Ctrl-C or a fatal error (the image then gets no row)."""
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except asyncio.TimeoutError:
            return
        raise _Stopped

    def before_retry(self, state: RetryCallState) -> None:
        self.summary.retries += 1
        err = state.outcome.exception()
        log.debug("retrying (attempt %d done): %s %s, wait %.2f s", state.attempt_number, err.kind, err,
                  state.next_action.sleep if state.next_action else 0.0)

    # --- rows ------------------------------------------------------------------------------
