"""runner.py: wires walker → images → client → store, with retries, progress and shutdown.

The only module that knows every stage. The flow:

    walker ─▶ [sources, bounded] ─▶ P image workers (thread pool) ─▶ [encoded, bounded] ─▶ C request
    workers (limiter slot, tenacity retries) ─▶ store (journal line, Parquet part)

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
import collections
import concurrent.futures
import datetime as dt
import itertools
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import tqdm
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from .. import cost, images, job as jobmod
from ..client import ChatClient
from ..errors import BadImageError, BadOutputError, CaptionError, FatalError, JobError, RateLimitError, TransientError
from ..job import Job
from ..limits import Limiter
from ..records import ChatResult, Encoded, Result, RunSummary, Source
from ..store import HashSet, Store, key_hash, open_batch_chunks
from ..walker import walk_images
from . import answers

__all__ = ["run_online"]

log = logging.getLogger(__name__)

WALK_BATCH = 256  # paths taken from the walker thread at a time
TICK_S = 1.0  # how often the journal is fsynced, parts are rolled and progress is shown
LOG_EVERY_S = 30.0  # progress line interval when stderr is not a terminal
BAD_OUTPUT_ATTEMPTS = 2  # an unusable answer (empty, not the JSON asked for) is asked for once more
RATE_LIMIT_PATIENCE = 10  # an image ends as rate_limited only after this × max_attempts 429s
DEDUP_CACHE = 4096  # recent ok rows kept to answer duplicates without a disk scan
_DONE = object()


class _InternalError(CaptionError):
    kind = "internal"


class _Stopped(Exception):
    """The run is stopping: this image's request was not sent, and it gets no row."""  # queue sentinel: one per consumer (3.11 has no Queue.shutdown)


async def run_online(job: Job, input_path: str | Path, out: str | Path, *, api_key: str | None,
                     headers: dict[str, str], allow_job_change: bool = False, progress: bool | None = None,
                     handle_signals: bool = False) -> RunSummary:
    """Caption `input_path` into `out` with one request per image; return the run's summary."""
    store = Store.open(out, jobmod.job_summary(job), part_rows=job.output.part_rows,
                       part_seconds=job.output.part_seconds, allow_other_job=allow_job_change)
    store.keep_out(api_key, *headers.values())
    server = None
    try:
        if live := open_batch_chunks(store.out):
            raise JobError(f"{out}: {live} batch chunk(s) are still with the provider; sending their images "
                           f"online too would pay twice. Run `caption batch collect {out}` (or cancel them)")
        done, sent_shas = await asyncio.to_thread(store.resume_index)
        base_url = job.endpoint.base_url
        if base_url == jobmod.LOCAL_BASE_URL:
            from ..localserver import LocalServer  # the demo endpoint, started only when asked for

            server = LocalServer()
            base_url = await asyncio.to_thread(server.start)
        runner = _Run(job, Path(input_path), store, done, sent_shas, progress)
        if handle_signals:
            runner.install_signal_handlers()
        return await runner.main(base_url, api_key, headers)
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
        store.release()


class _Run:
    """One run's queues, workers and counters."""

    def __init__(self, job: Job, input_path: Path, store: Store, done: HashSet, sent_shas: HashSet,
                 progress: bool | None):
        self.job = job
        self.input_path = input_path
        self.store = store
        self.done = done
        self.sent_shas = sent_shas  # hashes of the sha256 of every image with an ok row
        self._sending: dict[int, asyncio.Future] = {}  # sha hash → the row of the copy being sent now
        self._recent: collections.OrderedDict[int, Result] = collections.OrderedDict()  # sha hash → ok row
        self.summary = RunSummary(out=store.out)
        limits = job.limits
        self.limiter = Limiter(limits.concurrency, rpm=limits.rpm, tpm=limits.tpm, backoff_base_s=limits.retry_base_s,
                               max_pause_s=limits.retry_max_s)
        self.image_workers = limits.preprocess_workers or os.cpu_count() or 1
        self.sources: asyncio.Queue = asyncio.Queue(maxsize=limits.concurrency)
        self.encoded: asyncio.Queue = asyncio.Queue(maxsize=limits.concurrency)
        self.stop = asyncio.Event()
        self.abandon = asyncio.Event()
        self.client: ChatClient | None = None
        self._images_left = self.image_workers
        self._image_formula = cost.image_formula(job.endpoint.model)  # for the TPM count before sending
        self._backoff = wait_random_exponential(multiplier=limits.retry_base_s, max=limits.retry_max_s)
        self._progress = _Progress(self, enabled=progress)
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

    async def main(self, base_url: str, api_key: str | None, headers: dict[str, str]) -> RunSummary:
        limits = self.job.limits
        connector = aiohttp.TCPConnector(limit=limits.concurrency + 4)
        pool = concurrent.futures.ThreadPoolExecutor(self.image_workers, thread_name_prefix="caption-image")
        try:
            async with aiohttp.ClientSession(connector=connector) as session:
                self.client = ChatClient(session, self.job, base_url, api_key=api_key, headers=headers,
                                         on_rate_info=self.limiter.observe)
                await self._run_stages(pool)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            await asyncio.to_thread(self.store.close)
            self._progress.close()
        self.summary.wall_s = time.monotonic() - self._started
        self.summary.rate_limited = self.limiter.rate_limited
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
        sources = walk_images(self.input_path)
        while batch := await asyncio.to_thread(lambda: list(itertools.islice(sources, WALK_BATCH))):
            for source in batch:
                if key_hash(source.key) in self.done:
                    self.summary.skipped += 1
                else:
                    await self.sources.put(source)
        for _ in range(self.image_workers):
            await self.sources.put(_DONE)

    async def _prepare_images(self, pool: concurrent.futures.Executor) -> None:
        loop = asyncio.get_running_loop()
        while (source := await self.sources.get()) is not _DONE:
            try:
                encoded = await loop.run_in_executor(pool, _read_and_encode, source, self.job.image)
            except BadImageError as err:
                self._record(self._error_row(source, None, err, attempts=0))
                continue
            await self.encoded.put((source, encoded))
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
                result = self._error_row(source, encoded, _InternalError(f"{type(err).__name__}: {err}"),
                                         attempts=0)
            self._record(result)

    # --- one image -------------------------------------------------------------------------

    async def _caption_once(self, source: Source, encoded: Encoded) -> Result:
        """Caption an image unless a file with the same bytes was (or is being) sent: copy that.

        Identical files are sent once per out folder, across resumed runs too; the copies get
        the same caption, zero tokens, and `dedup_of` naming the image that was sent.
        """
        sha = key_hash(encoded.sha256)
        while (original := await self._sent_copy(sha, encoded.sha256)) is None and sha in self._sending:
            pass  # the copy we waited for failed, and another waiter has taken its place: wait for that one
        if original is not None:
            return self._dedup_row(source, encoded, original)
        future = asyncio.get_running_loop().create_future()
        self._sending[sha] = future
        result = None
        try:
            result = await self._caption(source, encoded)
        finally:
            del self._sending[sha]
            future.set_result(result if result is not None and result.status == "ok" else None)
        if result.status == "ok":
            self.sent_shas.add(sha)
            self._recent[sha] = result
            if len(self._recent) > DEDUP_CACHE:
                self._recent.popitem(last=False)
        return result

    async def _sent_copy(self, sha: int, sha256: str) -> Result | dict | None:
        """The ok row of an earlier copy of these bytes: being sent now, recent, or on disk."""
        if (sending := self._sending.get(sha)) is not None:
            return await asyncio.shield(sending)  # None if that copy failed: then we try ourselves
        if (recent := self._recent.get(sha)) is not None:
            return recent
        if sha in self.sent_shas:
            return await asyncio.to_thread(self.store.find_ok_by_sha, sha256)
        return None

    async def _caption(self, source: Source, encoded: Encoded) -> Result:
        """Send one image with retries; return its row. Raises FatalError, or _Stopped when the run stops."""
        data_url = encoded.data_url()
        tokens = self._request_tokens(encoded)
        attempts, latency_s = 0, 0.0
        retrying = AsyncRetrying(
            stop=self._retry_stop,
            retry=retry_if_exception_type((RateLimitError, TransientError, BadOutputError)),
            wait=self._retry_wait,
            sleep=self._sleep_unless_stopped,
            before_sleep=self._before_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    started = time.monotonic()
                    chat = await self._attempt(data_url, tokens)
                    latency_s = time.monotonic() - started
                    fields = answers.parse_fields(self.job, chat)
        except FatalError:
            raise
        except CaptionError as err:
            return self._error_row(source, encoded, err, attempts=attempts)
        return self._ok_row(source, encoded, chat, fields, attempts=attempts, latency_s=latency_s)

    async def _attempt(self, data_url: str, tokens: int) -> ChatResult:
        """One request through the limiter's gates; its slot is freed before any retry wait.

        Raises _Stopped, sending nothing, when the run is stopping (Ctrl-C, a fatal error) before
        or while this request waits for its turn.
        """
        permit = await self._acquire_unless_stopped(tokens)
        used = None
        try:
            chat = await self.client.complete(data_url)
            if chat.usage is not None and chat.usage.source == "reported":
                used = chat.usage.prompt_tokens + self.job.prompt.max_tokens
        except RateLimitError as err:
            self.limiter.on_rate_limited(permit, err.retry_after_s, hinted=err.hinted)
            raise
        finally:
            self.limiter.release(permit, used_tokens=used)
        self.limiter.on_success()
        return chat

    async def _acquire_unless_stopped(self, tokens: int):
        if self.stop.is_set():
            raise _Stopped
        acquire = asyncio.ensure_future(self.limiter.acquire(tokens))
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

    def _request_tokens(self, encoded: Encoded) -> int:
        """What a request counts against TPM before it is sent: prompt estimate + max_tokens.

        That is how OpenAI counts it: https://platform.openai.com/docs/guides/rate-limits
        """
        prompt = self.job.prompt
        image = cost.image_tokens(self._image_formula, encoded.sent_width, encoded.sent_height, self.job.image.detail)
        return image + cost.text_tokens((prompt.system or "") + prompt.user) + prompt.max_tokens

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        """A retry's backoff, cut short by Ctrl-C or a fatal error (the image then gets no row)."""
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except asyncio.TimeoutError:
            return
        raise _Stopped

    def _retry_stop(self, state: RetryCallState) -> bool:
        """Stop at max_attempts; while the failure is a 429, allow RATE_LIMIT_PATIENCE times more.

        A rate limit says "later", not "no": an overnight run should not turn a busy provider
        into error rows, but it should not loop for ever on a server that only says 429 either.
        """
        attempts = self.job.limits.max_attempts
        error = state.outcome.exception()
        if isinstance(error, RateLimitError):
            attempts *= RATE_LIMIT_PATIENCE
        elif isinstance(error, BadOutputError):
            attempts = min(attempts, BAD_OUTPUT_ATTEMPTS if error.retryable else 1)
        return state.attempt_number >= attempts

    def _retry_wait(self, state: RetryCallState) -> float:
        """A 429's wait is the limiter's shared pause (slot() waits on it); others back off."""
        if isinstance(state.outcome.exception(), RateLimitError):
            return 0.0
        return self._backoff(state)

    def _before_retry(self, state: RetryCallState) -> None:
        self.summary.retries += 1
        err = state.outcome.exception()
        log.debug("retrying (attempt %d done): %s %s, wait %.2f s", state.attempt_number, err.kind, err,
                  state.next_action.sleep if state.next_action else 0.0)

    # --- rows ------------------------------------------------------------------------------

    def _ok_row(self, source: Source, encoded: Encoded, chat: ChatResult, fields: str | None, *, attempts: int,
                latency_s: float) -> Result:
        return Result(
            **_image_fields(source, encoded, self.job.fingerprint),
            **answers.answer_fields(self.job, chat, encoded.sent_width, encoded.sent_height, fields),
            status="ok",
            attempts=attempts,
            latency_ms=round(latency_s * 1000),
            request_id=chat.request_id,
        )

    def _dedup_row(self, source: Source, encoded: Encoded, original: Result | dict) -> Result:
        get = original.get if isinstance(original, dict) else lambda name: getattr(original, name)
        return Result(
            **_image_fields(source, encoded, self.job.fingerprint),
            status="ok",
            model=get("model"),
            caption=get("caption"),
            finish_reason=get("finish_reason"),
            fields=get("fields"),
            flags=answers.quality_flags(self.job, get("caption") or "", get("finish_reason")),
            prompt_tokens=0,
            completion_tokens=0,
            total_tokens=0,
            dedup_of=get("image_path"),
        )

    def _error_row(self, source: Source, encoded: Encoded | None, err: CaptionError, *, attempts: int) -> Result:
        return Result(
            **_image_fields(source, encoded, self.job.fingerprint),
            **answers.billed_fields(err),
            status="error",
            model=self.job.endpoint.model,
            error_kind=err.kind,
            error=str(err),
            attempts=attempts,
            request_id=err.request_id,
        )

    def _record(self, result: Result) -> None:
        self.store.append(result)
        summary = self.summary
        if result.status == "ok":
            summary.ok += 1
            summary.prompt_tokens += result.prompt_tokens or 0
            summary.completion_tokens += result.completion_tokens or 0
        else:
            summary.errors += 1
            summary.error_kinds[result.error_kind] = summary.error_kinds.get(result.error_kind, 0) + 1
            log.debug("error row for %s: %s: %s", result.image_path, result.error_kind, result.error)

    async def _tick(self) -> None:
        """Every TICK_S: fsync the journal, roll a due part, refresh progress."""
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await asyncio.to_thread(self.store.sync)
                if self.store.should_rotate() and (segment := self.store.rotate()) is not None:
                    await asyncio.to_thread(self.store.convert, segment)
            except OSError as err:  # disk full, say: rows stay in the journal, which the next run recovers
                log.error("could not sync or roll the Parquet part: %s", err)
            self._progress.update()


def _read_and_encode(source: Source, settings: jobmod.ImageSettings) -> Encoded:
    """Runs in the image pool: read the file, shrink and encode it."""
    try:
        data = source.path.read_bytes()
    except OSError as err:
        raise BadImageError(f"cannot read file: {err.strerror or err}") from None
    return images.encode_image(data, settings)


def _image_fields(source: Source, encoded: Encoded | None, fingerprint: str) -> dict:
    fields = {"image_path": source.key, "job_fingerprint": fingerprint,
              "created_at": dt.datetime.now(dt.timezone.utc), "mode": "online"}
    if encoded is not None:
        fields.update(image_sha256=encoded.sha256, file_bytes=encoded.file_bytes, width=encoded.width,
                      height=encoded.height, sent_width=encoded.sent_width, sent_height=encoded.sent_height,
                      sent_bytes=encoded.sent_bytes)
    return fields


class _Progress:
    """A tqdm bar on a terminal; a log line every LOG_EVERY_S otherwise."""

    def __init__(self, run: _Run, *, enabled: bool | None):
        self._run = run
        tty = sys.stderr.isatty() if enabled is None else enabled
        self._bar = tqdm.tqdm(unit="img", dynamic_ncols=True, file=sys.stderr) if tty else None
        self._last_log = time.monotonic()

    def update(self) -> None:
        run, summary = self._run, self._run.summary
        stats = {"ok": summary.ok, "err": summary.errors, "retry": summary.retries,
                 "429": run.limiter.rate_limited, "inflight": f"{run.limiter.in_flight}/{int(run.limiter.limit)}",
                 "tok": summary.prompt_tokens + summary.completion_tokens}
        if self._bar is not None:
            self._bar.n = summary.ok + summary.errors
            self._bar.set_postfix(stats, refresh=True)
        elif time.monotonic() - self._last_log >= LOG_EVERY_S:
            self._last_log = time.monotonic()
            log.info("progress: %s", " ".join(f"{k}={v}" for k, v in stats.items()))

    def close(self) -> None:
        if self._bar is not None:
            self.update()
            self._bar.close()
