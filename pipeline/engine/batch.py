"""batch.py: the Batch API driver: the same images, payloads and store as online mode, at half price.

A second driver beside `runner.py`, not a fork of it: it reuses `walker.walk_images`,
`images.encode_image`, `client.build_payload` / `parse_batch_response` / `classify_response` and
`store.Store`, and wires them differently:

    walker ─▶ image threads ─▶ request lines ─▶ chunk files (OUT/_batch/chunk-00001.jsonl, ...)
        ─▶ upload (Files API) ─▶ create (Batches API) ─▶ poll ─▶ download output + error files
        ─▶ one row per image (store: journal → Parquet parts), mode = "batch"

Durable record (OUT/_batch/, skipped by dataset readers because of the underscore):

    _run.json                 run id (in every batch's metadata), input folder, the job as run
    chunk-00001.jsonl         request lines, streamed to disk (deleted once collected)
    chunk-00001.index.jsonl   one line per request: custom_id (= the image key), attempt, image facts
    chunk-00001.json          the chunk's record, replaced atomically (tmp, fsync, rename) at each step:
                              written → uploaded (file id) → submitted (batch id) → collecting → collected
    chunk-00001.retry.jsonl   after collection: images to send again (transient failure, did not run)

Every step is recorded before the next begins, so a crash at any point resumes from the record.
The one window a record cannot close, between "create batch" and writing its id, is closed by
listing the provider's batches and matching the metadata (job fingerprint, run id and chunk name)
before any create, so a chunk is never submitted twice. Collection marks the chunk "collecting"
first; a collection cut short is redone, skipping lines whose row (image, request id) is already
in the store, so every result becomes a row exactly once. An image is in at most one live chunk:
new chunks take only images without an ok row, not in a chunk, not ended in this out folder's
batches (a 400 is an error row, not retried here), or listed in a retry file.

References: https://platform.openai.com/docs/guides/batch (request and output line formats,
limits of 50,000 requests and 200 MB a file, statuses, `batch_expired`),
https://platform.openai.com/docs/api-reference/batch (batch object, create, retrieve, list with
`limit`/`after`, cancel) and https://platform.openai.com/docs/api-reference/files (upload with
`purpose=batch`, content).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime as dt
import itertools
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import tqdm

from .. import images
from .. import job as jobmod
from ..client import build_payload, classify_response, parse_batch_response, wants_max_completion_tokens
from ..errors import (
    BadImageError,
    BadOutputError,
    CaptionError,
    FatalError,
    JobError,
    RateLimitError,
    TransientError,
)
from ..job import Job
from ..records import BatchSummary, ChatResult, Encoded, Result, Source
from ..store import BATCH_DIR, OPEN_CHUNK_STATES, OutFolderLock, Store, iter_rows, key_hash, open_batch_chunks, write_atomic
from ..walker import walk_images
from . import answers

__all__ = [
    "BatchAPI",
    "ChunkView",
    "PrepareSummary",
    "batch_status",
    "cancel_batches",
    "ingest_outputs",
    "load_run_job",
    "prepare_requests",
    "run_batch",
    "run_input",
]

log = logging.getLogger(__name__)

STATE_DIR = BATCH_DIR
RUN_FILE = "_run.json"
TOKEN_PARAM_FILE = "_token_param"  # holds "max_completion_tokens" once the server asked for it
CRASH_ENV = "CAPTION_TEST_CRASH_AT"
"""Test seam: `CAPTION_TEST_CRASH_AT=<step>` ends the process with os._exit(137) at that named step
(`writing`, `uploaded`, `created`, `polling`, `collecting`), as a kill -9 would."""
CHAT_URL = "/v1/chat/completions"
ENCODE_BATCH = 32  # images encoded per trip to the thread pool
LIST_PAGE = 100  # batches per page when listing the provider's batches
LIST_MAX_PAGES = 50  # listing stops after this many pages (5,000 batches)
LIST_SKEW_S = 3600  # listing stops at batches created this long before the chunk was uploaded
POLL_BACKOFF_MAX_S = 600.0
LIVE = ("validating", "in_progress", "finalizing", "cancelling")
ENDED = ("completed", "failed", "expired", "cancelled")
_OPEN_STATES = OPEN_CHUNK_STATES


@dataclass(slots=True)
class ChunkRecord:
    """One chunk's durable record (chunk-NNNNN.json)."""

    name: str
    lines: int
    bytes: int
    state: str  # written | uploaded | submitted | collecting | collected
    file_id: str | None = None
    uploaded_at: float | None = None
    batch_id: str | None = None
    status: str | None = None  # the provider's last word
    counts: dict[str, int] | None = None  # request_counts as last seen
    job: str | None = None  # the fingerprint of the job its requests were made for


@dataclass(frozen=True, slots=True)
class ChunkView:
    """A chunk as `caption batch status` shows it."""

    name: str
    state: str
    batch_id: str | None
    status: str | None
    total: int
    completed: int
    failed: int


@dataclass(frozen=True, slots=True)
class _IndexEntry:
    custom_id: str
    key: str
    attempts: int
    image: dict[str, Any]  # the image facts of the row (sha256, sizes)


# --- the durable record --------------------------------------------------------------------


class _State:
    """The OUT/_batch folder: run file, chunk records, and the ledger of keys they hold."""

    def __init__(self, folder: Path, run_id: str, fingerprint: str):
        self.folder = folder
        self.run_id = run_id
        self.fingerprint = fingerprint  # the job now running: other jobs' finished chunks do not end its images
        self.records: dict[str, ChunkRecord] = {}
        self.ledger: dict[int, int] = {}  # key hash → -1 live, 0 ended, n > 0 retry after n attempts

    @classmethod
    def open(cls, out: Path, job: Job, input_path: Path | None, *, writable: bool = True) -> _State:
        """The state of `out`. Writable (the caller holds the out folder's lock): record the run and
        clear what a dead run left half-written; read-only (status): touch nothing."""
        folder = out / STATE_DIR
        run_file = folder / RUN_FILE
        try:
            run = json.loads(run_file.read_text("utf-8")) if run_file.exists() else {}
        except (OSError, ValueError) as err:
            raise JobError(f"{run_file}: unreadable ({err}); move {folder} aside to start the batch run afresh") \
                from None
        if not run:
            run = {"run_id": secrets.token_hex(6), "created_at": time.time()}
        if writable:
            folder.mkdir(parents=True, exist_ok=True)
            if input_path is not None:
                run["input"] = str(input_path.resolve())
            run["job"] = jobmod.job_summary(job)
            write_atomic(run_file, json.dumps(run, indent=2, ensure_ascii=False).encode())
        state = cls(folder, run["run_id"], job.fingerprint)
        state._load(writable)
        other = sorted({r.job for r in state.open_records() if r.job not in (None, job.fingerprint)})
        if writable and other:
            raise JobError(f"{out}: batch chunks of another job ({', '.join(other)}) are still open; collect them "
                           f"with that job (caption batch collect {out} --job ITS_FILE) or cancel them first")
        return state

    def _load(self, writable: bool) -> None:
        for path in sorted(self.folder.glob("chunk-*.json")):
            record = ChunkRecord(**json.loads(path.read_text("utf-8")))
            self.records[record.name] = record
        for path in self.folder.glob("chunk-*.jsonl"):  # written by a run that died before the record
            if writable and path.name.split(".")[0] not in self.records:
                path.unlink()
        for record in self.records.values():
            self.enter_ledger(record)

    def enter_ledger(self, record: ChunkRecord) -> None:
        """Note the keys of a chunk: live while open; once collected, ended or to be sent again."""
        ended = record.state == "collected"
        if ended and record.job not in (None, self.fingerprint):
            return  # another job's answers: this job still has to ask for its own
        for entry in read_index(self.path(record.name, ".index.jsonl")):
            self.ledger[key_hash(entry.key)] = 0 if ended else -1
        if ended:
            for key, attempts in self.retries(record.name):
                self.ledger[key_hash(key)] = attempts

    def retries(self, name: str) -> Iterator[tuple[str, int]]:
        path = self.path(name, ".retry.jsonl")
        if path.exists():
            for line in path.read_text("utf-8").splitlines():
                item = json.loads(line)
                yield item["key"], item["attempts"]

    def path(self, name: str, suffix: str) -> Path:
        return self.folder / f"{name}{suffix}"

    def next_name(self) -> str:
        numbers = [int(name.split("-")[1]) for name in self.records]
        return f"chunk-{max(numbers, default=0) + 1:05d}"

    def save(self, record: ChunkRecord) -> None:
        """Replace the chunk's record atomically; the step it names is durable when this returns."""
        self.records[record.name] = record
        write_atomic(self.path(record.name, ".json"), json.dumps(dataclasses.asdict(record)).encode())

    def open_records(self) -> list[ChunkRecord]:
        return [r for r in self.records.values() if r.state in _OPEN_STATES]

    def metadata(self, job: Job, name: str) -> dict[str, str]:
        """What every batch carries, so a crashed run can find the batches it created."""
        return {"caption_job": job.fingerprint, "caption_chunk": f"{self.run_id}/{name}"}


def read_index(path: Path) -> Iterator[_IndexEntry]:
    """The entries of a chunk's index file."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            item = json.loads(line)
            yield _IndexEntry(item["custom_id"], item["key"], item["attempts"], item["image"])


def _crash_point(step: str) -> None:
    """The kill -9 test seam (CRASH_ENV); does nothing unless the variable names this step."""
    if os.environ.get(CRASH_ENV) == step:
        os._exit(137)


# --- chunk files ---------------------------------------------------------------------------


class _ChunkWriter:
    """Streams request lines and their index entries into one chunk's two files."""

    def __init__(self, folder: Path, name: str, settings: jobmod.Batch):
        self.name = name
        self.lines = 0
        self.bytes = 0
        self._max_lines = settings.max_requests
        self._max_bytes = int(settings.max_file_mb * 1_000_000)
        self._requests = open(folder / f"{name}.jsonl", "wb")
        self._index = open(folder / f"{name}.index.jsonl", "w", encoding="utf-8")

    def fits(self, line: bytes) -> bool:
        """True when the line may join this chunk (a first line always may)."""
        return self.lines == 0 or (self.lines < self._max_lines and self.bytes + len(line) <= self._max_bytes)

    def add(self, line: bytes, entry: _IndexEntry) -> None:
        self._requests.write(line)
        self._index.write(json.dumps(dataclasses.asdict(entry), ensure_ascii=False) + "\n")
        self.lines += 1
        self.bytes += len(line)

    def close(self) -> ChunkRecord:
        """Flush and fsync both files; return the record that says they are whole."""
        for handle in (self._requests, self._index):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        return ChunkRecord(self.name, self.lines, self.bytes, "written")


def request_line(job: Job, custom_id: str, encoded: Encoded, token_param: str = "max_tokens") -> bytes:
    """One Batch API input line: the online payload without `stream`, keyed by custom_id."""
    body = build_payload(job, encoded.data_url(), stream=False, token_param=token_param)
    line = {"custom_id": custom_id, "method": "POST", "url": CHAT_URL, "body": body}
    return json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _image_facts(encoded: Encoded) -> dict[str, Any]:
    return {"image_sha256": encoded.sha256, "file_bytes": encoded.file_bytes, "width": encoded.width,
            "height": encoded.height, "sent_width": encoded.sent_width, "sent_height": encoded.sent_height,
            "sent_bytes": encoded.sent_bytes}


def _read_and_encode(source: Source, settings: jobmod.ImageSettings) -> Encoded | BadImageError:
    """Runs in the image pool; a bad image comes back as its error instead of raising."""
    try:
        return images.encode_image(source.path.read_bytes(), settings)
    except OSError as err:
        return BadImageError(f"cannot read file: {err.strerror or err}")
    except BadImageError as err:
        return err


def _encoded_sources(job: Job, sources: Iterator[tuple[Source, int]],
                     pool: concurrent.futures.Executor) -> Iterator[tuple[Source, int, Encoded | BadImageError]]:
    """Encode (source, attempt) pairs in the pool, ENCODE_BATCH at a time, in order."""
    while batch := list(itertools.islice(sources, ENCODE_BATCH)):
        results = pool.map(_read_and_encode, [s for s, _ in batch], itertools.repeat(job.image))
        for (source, attempt), result in zip(batch, results):
            yield source, attempt, result


# --- rows ----------------------------------------------------------------------------------


def _row(job: Job, key: str, facts: dict[str, Any], attempts: int, *, chat: ChatResult | None = None,
         err: CaptionError | None = None, request_id: str | None = None) -> Result:
    """The row of one ended image: ok from `chat`, else an error row from `err`."""
    base = {"image_path": key, "job_fingerprint": job.fingerprint, "created_at": dt.datetime.now(dt.UTC),
            "mode": "batch", "attempts": attempts, "model": job.endpoint.model, **facts}
    if chat is None:
        return Result(**{**base, **answers.billed_fields(err)}, status="error", error_kind=err.kind, error=str(err),
                      request_id=(err.request_id or request_id) if err is not None else request_id)
    try:
        fields = answers.parse_fields(job, chat)
    except BadOutputError as bad:  # a batch line is not asked again for this: an error row
        return Result(**{**base, **answers.billed_fields(bad)}, status="error", error_kind=bad.kind, error=str(bad),
                      request_id=chat.request_id or request_id)
    base.update(answers.answer_fields(job, chat, facts.get("sent_width") or 0, facts.get("sent_height") or 0, fields))
    return Result(**base, status="ok", request_id=chat.request_id or request_id)


@dataclass(frozen=True, slots=True)
class _LineOutcome:
    """What one output or error line means: a row, or a retry (row None)."""

    custom_id: str
    row: Result | None
    switch_tokens: bool = False  # the server wants max_completion_tokens: resend this line with it


def _queue_full(batch: dict[str, Any]) -> bool:
    """Did the batch fail only because the provider's queue of enqueued tokens was full?
    (https://platform.openai.com/docs/guides/rate-limits: batch queue limits, `token_limit_exceeded`)"""
    data = ((batch.get("errors") or {}).get("data") or [{}])[0] or {}
    return data.get("code") == "token_limit_exceeded"


def _batch_failure(batch: dict[str, Any]) -> FatalError:
    """The error a `failed` batch carries (OpenAI: `errors.data[].code/message`), as a FatalError:
    resending the same file fails the same way, and the enqueued-token limit needs a wait."""
    data = ((batch.get("errors") or {}).get("data") or [{}])[0] or {}
    code, message = data.get("code") or "failed", data.get("message") or "no reason given"
    hint = ("wait for the live batches to finish (caption batch collect OUT), then run again"
            if code == "token_limit_exceeded" else "fix the cause, then run again; its images will be sent again")
    return FatalError(f"batch {batch.get('id')} failed validation: {code}: {message}; {hint}")


def _read_line_safely(job: Job, raw: bytes, index: dict[str, _IndexEntry]) -> _LineOutcome | None:
    """`read_output_line`, but a line nobody foresaw becomes an internal error row, not a stuck chunk."""
    try:
        return read_output_line(job, raw, index)
    except FatalError:
        raise
    except Exception as err:
        log.exception("internal error on a batch output line")
        try:
            entry = index.get(json.loads(raw).get("custom_id"))
        except (ValueError, AttributeError):
            entry = None
        if entry is None:
            return None
        failure = CaptionError(f"{type(err).__name__}: {err}")
        failure.kind = "internal"
        return _LineOutcome(entry.custom_id, _row(job, entry.key, entry.image, entry.attempts, err=failure))


def read_output_line(job: Job, raw: bytes, index: dict[str, _IndexEntry]) -> _LineOutcome | None:
    """Turn one output/error file line into a row or a retry; None for a line of no known request.

    Per the failure table: 200 → ok row; 400/413/422 and bad output → error row; transient or
    429 → a retry while attempts remain, else an error row; a request that did not run
    (`batch_expired`, or no response) → a retry while attempts remain.
    """
    try:
        line = json.loads(raw)
    except ValueError:
        log.warning("skipping a malformed batch output line")
        return None
    entry = index.get(line.get("custom_id")) if isinstance(line, dict) else None
    if entry is None:
        return None
    retry_left = entry.attempts < job.limits.max_attempts
    response, error = line.get("response"), line.get("error")
    line_id = line.get("id") if isinstance(line.get("id"), str) else None
    if response is None or (isinstance(error, dict) and error.get("code") == "batch_expired"):
        if retry_left:
            return _LineOutcome(entry.custom_id, None)
        failure = TransientError("the batch ended before this request ran (attempts used up)")
        return _LineOutcome(entry.custom_id, _row(job, entry.key, entry.image, entry.attempts, err=failure,
                                                  request_id=line_id))
    try:
        chat = parse_batch_response(response)
    except (RateLimitError, TransientError) as err:
        if retry_left:
            return _LineOutcome(entry.custom_id, None)
        return _LineOutcome(entry.custom_id, _row(job, entry.key, entry.image, entry.attempts, err=err,
                                                  request_id=line_id))
    except CaptionError as err:  # bad request, bad output; a fatal class here concerns this line only
        if wants_max_completion_tokens(err) and retry_left:
            return _LineOutcome(entry.custom_id, None, switch_tokens=True)
        return _LineOutcome(entry.custom_id, _row(job, entry.key, entry.image, entry.attempts, err=err,
                                                  request_id=line_id))
    return _LineOutcome(entry.custom_id, _row(job, entry.key, entry.image, entry.attempts, chat=chat,
                                              request_id=line_id))


# --- the provider --------------------------------------------------------------------------


class BatchAPI:
    """The Files and Batches endpoints of one provider, over a shared aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, *, api_key: str | None,
                 headers: dict[str, str], timeout_s: float):
        self._session = session
        self._base = base_url.rstrip("/")
        self._headers = dict(headers)
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)

    async def upload(self, path: Path) -> str:
        """POST /v1/files (multipart, purpose=batch); return the file id."""
        with open(path, "rb") as handle:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", handle, filename=path.name, content_type="application/jsonl")
            return (await self._call("POST", "/files", data=form))["id"]

    async def create(self, file_id: str, metadata: dict[str, str], window: str) -> dict[str, Any]:
        body = {"input_file_id": file_id, "endpoint": CHAT_URL, "completion_window": window, "metadata": metadata}
        return await self._call("POST", "/batches", json=body)

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        return await self._call("GET", f"/batches/{batch_id}")

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return await self._call("POST", f"/batches/{batch_id}/cancel")

    async def list_page(self, after: str | None) -> dict[str, Any]:
        """GET /v1/batches?limit=…&after=…: one page, newest first."""
        params = {"limit": str(LIST_PAGE), **({"after": after} if after else {})}
        return await self._call("GET", "/batches", params=params)

    async def download(self, file_id: str, dest: Path) -> None:
        """GET /v1/files/{id}/content, streamed to `dest` (output files can be hundreds of MB)."""
        try:
            async with self._session.get(f"{self._base}/files/{file_id}/content", headers=self._headers,
                                         timeout=self._timeout) as response:
                if response.status != 200:
                    raise classify_response(response.status, response.headers, await response.read())
                with open(dest, "wb") as handle:
                    async for block in response.content.iter_chunked(1 << 20):
                        handle.write(block)
        except aiohttp.ClientError as err:
            raise TransientError(f"download failed: {type(err).__name__}: {err}") from err

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            async with self._session.request(method, self._base + path, headers=self._headers,
                                             timeout=self._timeout, **kwargs) as response:
                body = await response.read()
                error = classify_response(response.status, response.headers, body)
                if error is not None:
                    raise error
                return json.loads(body)
        except (TimeoutError, aiohttp.ClientError, ValueError) as err:
            raise TransientError(f"{method} {path} failed: {type(err).__name__}: {err}") from err


async def _with_retries(job: Job, what: str, call, *args: Any) -> Any:
    """Run an idempotent provider call; transient failures and 429s are retried with backoff."""
    for attempt in itertools.count(1):
        try:
            return await call(*args)
        except (TransientError, RateLimitError) as err:
            if attempt >= job.limits.max_attempts:
                raise
            wait = getattr(err, "retry_after_s", None) or job.limits.retry_base_s * 2 ** (attempt - 1)
            log.info("%s: %s; again in %.1f s", what, err, min(wait, job.limits.retry_max_s))
            await asyncio.sleep(min(wait, job.limits.retry_max_s))
    raise AssertionError("unreachable")


# --- the driver ----------------------------------------------------------------------------


class _Driver:
    """One invocation: move every chunk forward, cut new chunks from what is left, poll, collect."""

    def __init__(self, job: Job, input_path: Path | None, store: Store, state: _State, api: BatchAPI,
                 summary: BatchSummary, progress: bool | None):
        self.job, self.input_path, self.store, self.state, self.api = job, input_path, store, state, api
        self.summary = summary
        self.done = store.done_keys()
        self._bar = None
        if progress if progress is not None else sys.stderr.isatty():
            self._bar = tqdm.tqdm(unit="req", dynamic_ncols=True, file=sys.stderr)
        self._last_log = 0.0
        self._first_walk = True  # "already done" is counted on the first walk only
        self._held = False  # the provider's queue is full (token_limit_exceeded): submit again once a batch ends
        token_file = state.folder / TOKEN_PARAM_FILE
        self.token_param = token_file.read_text().strip() if token_file.exists() else "max_tokens"

    async def main(self, detach: bool) -> None:
        try:
            await self.advance_open_chunks()
            while True:
                if not (self._held and self.live_records()):
                    self._held = False
                    await self.submit_pending()
                live = self.live_records()
                if detach or not live:
                    break
                await self.wait_and_collect(live)
        finally:
            if self._bar is not None:
                self._bar.close()
        self.summary.live_batches = len(self.live_records())

    def live_records(self) -> list[ChunkRecord]:
        return self.state.open_records()

    # -- moving recorded chunks forward -----------------------------------------------------

    async def advance_open_chunks(self) -> None:
        """Resume every chunk a previous invocation left open, and collect those that have ended."""
        for record in self.state.open_records():
            if record.state in ("written", "uploaded"):
                await self.submit(record)
            elif record.state == "collecting":
                await self.poll_once(record)  # collect() sees the state and redoes it without duplicates
            else:
                try:
                    await self.poll_once(record)
                except (TransientError, RateLimitError) as err:
                    log.warning("%s: could not ask for batch %s (%s); asking again later", record.name,
                                record.batch_id, err)

    async def submit(self, record: ChunkRecord) -> None:
        """written → uploaded → submitted, each step recorded before the next."""
        if record.state == "written":
            file_id = await _with_retries(self.job, "upload", self.api.upload,
                                          self.state.path(record.name, ".jsonl"))
            _crash_point("uploaded")
            record = dataclasses.replace(record, state="uploaded", file_id=file_id, uploaded_at=time.time())
            self.state.save(record)
        batch = await self.find_created(record)
        if batch is None:
            batch = await self.create(record)
        self.state.save(dataclasses.replace(record, state="submitted", batch_id=batch["id"],
                                            status=batch.get("status"), counts=batch.get("request_counts")))
        log.info("%s: %d requests submitted as batch %s", record.name, record.lines, batch["id"])

    async def create(self, record: ChunkRecord) -> dict[str, Any]:
        """Create the chunk's batch once: a failed create is retried only after the listing says
        it did not happen after all (a lost answer must not become a second batch)."""
        metadata = self.state.metadata(self.job, record.name)
        for attempt in itertools.count(1):
            try:
                batch = await self.api.create(record.file_id, metadata, self.job.batch.completion_window)
                _crash_point("created")
                self.summary.submitted += 1
                return batch
            except (TransientError, RateLimitError) as err:
                if attempt >= self.job.limits.max_attempts:
                    raise
                log.info("%s: create failed (%s); checking the provider's list before trying again", record.name, err)
                await asyncio.sleep(min(self.job.limits.retry_base_s * 2 ** (attempt - 1), self.job.limits.retry_max_s))
                if (found := await self.find_created(record)) is not None:
                    return found
        raise AssertionError("unreachable")

    async def find_created(self, record: ChunkRecord) -> dict[str, Any] | None:
        """The provider's batch for this chunk, if one was created but not recorded (crash window)."""
        wanted = self.state.metadata(self.job, record.name)
        after = None
        for _ in range(LIST_MAX_PAGES):
            page = await _with_retries(self.job, "list batches", self.api.list_page, after)
            for batch in page.get("data") or []:
                if (batch.get("metadata") or {}).items() >= wanted.items():
                    log.info("%s: found batch %s created before a crash", record.name, batch["id"])
                    return batch
                if record.uploaded_at and (batch.get("created_at") or 0) < record.uploaded_at - LIST_SKEW_S:
                    return None
            if not page.get("has_more") or not page.get("last_id"):
                return None
            after = page["last_id"]
        return None

    # -- cutting new chunks -----------------------------------------------------------------

    def _pending(self) -> Iterator[tuple[Source, int]]:
        """(image, attempt number) for every image that should go into a new chunk."""
        for source in walk_images(self.input_path):
            hashed = key_hash(source.key)
            if hashed in self.done:
                self.summary.skipped += self._first_walk
                continue
            used = self.state.ledger.get(hashed)
            if used is None:
                yield source, 1
            elif used > 0:
                yield source, used + 1

    async def submit_pending(self) -> None:
        """Stream what is left into chunk files; submit each chunk as soon as it is closed."""
        if self.input_path is None:
            return
        loop = asyncio.get_running_loop()
        workers = self.job.limits.preprocess_workers or os.cpu_count() or 1
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="caption-image") as pool:
            items = _encoded_sources(self.job, self._pending(), pool)
            writer = None
            while (item := await loop.run_in_executor(None, next, items, None)) is not None:
                source, attempt, encoded = item
                if isinstance(encoded, BadImageError):
                    self.record_row(_row(self.job, source.key, {}, 0, err=encoded))
                    self.state.ledger[key_hash(source.key)] = 0
                    continue
                line = request_line(self.job, source.key, encoded, self.token_param)
                if writer is not None and not writer.fits(line):
                    await self.close_and_submit(writer)
                    writer = None
                if writer is None:
                    writer = _ChunkWriter(self.state.folder, self.state.next_name(), self.job.batch)
                    self.state.records[writer.name] = ChunkRecord(writer.name, 0, 0, "writing")
                writer.add(line, _IndexEntry(source.key, source.key, attempt, _image_facts(encoded)))
                self.state.ledger[key_hash(source.key)] = -1
                if writer.lines == 2:
                    _crash_point("writing")
            if writer is not None:
                await self.close_and_submit(writer)
        self._first_walk = False

    async def close_and_submit(self, writer: _ChunkWriter) -> None:
        record = dataclasses.replace(writer.close(), job=self.job.fingerprint)
        self.state.save(record)
        await self.submit(record)

    # -- polling and collecting -------------------------------------------------------------

    async def wait_and_collect(self, live: list[ChunkRecord]) -> None:
        """Poll the live batches every poll_s (backing off on errors) until at least one is collected."""
        failures = 0
        while True:
            try:
                ended = 0
                for name in [r.name for r in live]:
                    record = self.state.records[name]  # the current record: a pass may have moved it on
                    if record.state in ("submitted", "collecting"):  # collecting: a collection cut short
                        ended += await self.poll_once(record)
                    elif record.state == "collected":
                        ended += 1
                failures = 0
            except (TransientError, RateLimitError) as err:
                failures += 1
                wait = min(self.job.batch.poll_s * 2 ** failures, max(self.job.batch.poll_s, POLL_BACKOFF_MAX_S))
                log.warning("polling failed (%s); again in %.1f s", err, wait)
                await asyncio.sleep(wait)
                continue
            self.show_progress()
            _crash_point("polling")
            if ended:
                return
            await asyncio.sleep(self.job.batch.poll_s)

    async def poll_once(self, record: ChunkRecord) -> bool:
        """Ask for a submitted batch's status; collect it if it has ended. True if collected.

        A batch the provider no longer knows (404: deleted, or the bundled server of a run that
        died) ran nothing we can collect: its lines are sent again.
        """
        try:
            batch = await self.api.retrieve(record.batch_id)
        except FatalError as err:
            if err.status != 404:
                raise
            log.warning("%s: batch %s is gone (%s); its %d requests will be sent again", record.name,
                        record.batch_id, err, record.lines)
            index = {e.custom_id: e for e in read_index(self.state.path(record.name, ".index.jsonl"))}
            self._give_back(record, index, {"id": record.batch_id, "status": "lost"}, None)
            return True
        status = batch.get("status")
        if status in ENDED:
            await self.collect(record, batch, recovering=False)
            return True
        if status != record.status or batch.get("request_counts") != record.counts:
            self.state.records[record.name] = dataclasses.replace(record, status=status,
                                                                  counts=batch.get("request_counts"))
        return False

    async def collect(self, record: ChunkRecord, batch: dict[str, Any], *, recovering: bool) -> None:
        """Download an ended batch's files and write one row per answered image, exactly once."""
        # A collection that was cut short (this process or an earlier one) is redone without
        # writing again the rows it had written.
        recovering = recovering or self.state.records[record.name].state == "collecting"
        record = dataclasses.replace(record, state="collecting", status=batch.get("status"),
                                     counts=batch.get("request_counts"))
        self.state.save(record)
        index = {e.custom_id: e for e in read_index(self.state.path(record.name, ".index.jsonl"))}
        if batch.get("status") == "failed":
            failure = _batch_failure(batch)
            if _queue_full(batch) and any(r.name != record.name for r in self.live_records()):
                log.warning("%s: %s; its requests wait until a live batch ends", record.name, failure)
                self._held, failure = True, None  # an unattended run waits instead of stopping
            return self._give_back(record, index, batch, failure)
        already = self._rows_already_written(index) if recovering else set()
        handled: set[str] = set()
        retries: list[tuple[str, int]] = []
        for suffix, file_id in ((".output.jsonl", batch.get("output_file_id")),
                                (".errors.jsonl", batch.get("error_file_id"))):
            if not file_id:
                continue
            path = self.state.path(record.name, suffix)
            await _with_retries(self.job, "download", self.api.download, file_id, path)
            with open(path, "rb") as handle:
                for raw in handle:
                    self._take(_read_line_safely(self.job, raw, index), index, already, handled, retries)
        for custom_id in index:  # in neither file: it did not run
            if custom_id not in handled:
                self._take(read_output_line(self.job, json.dumps({"custom_id": custom_id}).encode(), index),
                           index, already, handled, retries)
        self._finish_collect(record, retries, batch)

    def _take(self, outcome: _LineOutcome | None, index: dict[str, _IndexEntry], already: set[tuple[str, str]],
              handled: set[str], retries: list[tuple[str, int]]) -> None:
        if outcome is None or outcome.custom_id in handled:
            return
        handled.add(outcome.custom_id)
        entry = index[outcome.custom_id]
        if outcome.switch_tokens:
            self._switch_token_param()
        if outcome.row is None:
            retries.append((entry.key, entry.attempts))
        elif (outcome.row.image_path, outcome.row.request_id) not in already:
            self.record_row(outcome.row)
            if len(handled) == 1:
                _crash_point("collecting")

    def _give_back(self, record: ChunkRecord, index: dict[str, _IndexEntry], batch: dict[str, Any],
                   failure: FatalError | None) -> None:
        """A batch that ran nothing (failed validation, or lost by the provider): every line goes back
        to be sent again by a later run; a failure that resending at once cannot cure stops this one
        (rather than spending every image's attempts in a few seconds)."""
        retries = [(entry.key, entry.attempts) for entry in index.values()]
        self._finish_collect(record, retries, batch)
        if failure is not None:
            raise failure

    def _switch_token_param(self) -> None:
        """Reasoning models refuse max_tokens: send max_completion_tokens from now on, in every run."""
        if self.token_param != "max_completion_tokens":
            self.token_param = "max_completion_tokens"
            write_atomic(self.state.folder / TOKEN_PARAM_FILE, self.token_param.encode())
            log.warning("the server rejects max_tokens for %s; batch lines send max_completion_tokens from now on",
                        self.job.endpoint.model)

    def _finish_collect(self, record: ChunkRecord, retries: list[tuple[str, int]], batch: dict[str, Any]) -> None:
        text = "".join(json.dumps({"key": k, "attempts": a}, ensure_ascii=False) + "\n" for k, a in retries)
        write_atomic(self.state.path(record.name, ".retry.jsonl"), text.encode())
        self.store.sync()
        self.state.save(dataclasses.replace(record, state="collected"))
        self.state.enter_ledger(self.state.records[record.name])
        for suffix in (".jsonl", ".output.jsonl", ".errors.jsonl"):
            self.state.path(record.name, suffix).unlink(missing_ok=True)
        log.info("%s: batch %s %s; %d to send again", record.name, batch.get("id"), batch.get("status"), len(retries))

    def _rows_already_written(self, index: dict[str, _IndexEntry]) -> set[tuple[str, str]]:
        """(image, request id) of rows in the store for this chunk's images: a cut-short collection."""
        self.store.close()  # the open journal becomes a part, so iter_rows sees it
        keys = {e.key for e in index.values()}
        found = set()
        for rows in iter_rows(self.store.out, ["image_path", "request_id"]):
            found.update((p, r) for p, r in zip(rows["image_path"], rows["request_id"]) if p in keys)
        return found

    def record_row(self, row: Result) -> None:
        self.store.append(row)
        if self.store.should_rotate() and (segment := self.store.rotate()) is not None:
            self.store.convert(segment)
        if row.status == "ok":
            self.summary.ok += 1
            self.done.add(key_hash(row.image_path))
            self.summary.prompt_tokens += row.prompt_tokens or 0
            self.summary.completion_tokens += row.completion_tokens or 0
        else:
            self.summary.errors += 1
            self.summary.error_kinds[row.error_kind] = self.summary.error_kinds.get(row.error_kind, 0) + 1

    def show_progress(self) -> None:
        counts = [r.counts or {} for r in self.live_records()]
        total = sum(c.get("total", 0) for c in counts)
        ended = sum(c.get("completed", 0) + c.get("failed", 0) for c in counts)
        if self._bar is not None:
            self._bar.total, self._bar.n = total, ended
            self._bar.set_postfix({"batches": len(counts), "rows ok": self.summary.ok}, refresh=True)
        elif time.monotonic() - self._last_log >= 30:
            self._last_log = time.monotonic()
            log.info("batch progress: %d/%d requests ended in %d live batches", ended, total, len(counts))


# --- entry points --------------------------------------------------------------------------


async def run_batch(job: Job, input_path: str | Path | None, out: str | Path, *, api_key: str | None,
                    headers: dict[str, str], allow_job_change: bool = False, progress: bool | None = None,
                    detach: bool = False) -> BatchSummary:
    """Caption `input_path` through the Batch API into `out`; with `detach`, return once submitted.

    Resumes whatever OUT/_batch records; `input_path` None (`caption batch collect`) takes the
    folder recorded there. Raises JobError for a detached run against the in-process endpoint.
    """
    out = Path(out)
    if input_path is None:
        input_path = run_input(out)
    base_url, server = job.endpoint.base_url, None
    if base_url == jobmod.LOCAL_BASE_URL and detach:
        raise JobError(f"{job.source}: --detach needs an endpoint that outlives this process; "
                       "start `caption serve` and pass --base-url http://127.0.0.1:8000/v1")
    store = Store.open(out, jobmod.job_summary(job), part_rows=job.output.part_rows,
                       part_seconds=job.output.part_seconds, allow_other_job=allow_job_change)
    store.keep_out(api_key, *headers.values())
    summary = BatchSummary(out=out, detached=detach)
    started = time.monotonic()
    try:
        state = _State.open(out, job, Path(input_path) if input_path is not None else None)
        if base_url == jobmod.LOCAL_BASE_URL:
            from ..localserver import LocalServer  # the demo endpoint, started only when asked for

            server = LocalServer()
            base_url = await asyncio.to_thread(server.start)
        async with aiohttp.ClientSession(trust_env=True) as session:
            api = BatchAPI(session, base_url, api_key=api_key, headers=headers, timeout_s=job.limits.timeout_s)
            driver = _Driver(job, Path(input_path) if input_path is not None else None, store, state, api,
                             summary, progress)
            try:
                await driver.main(detach)
            except FatalError as err:
                summary.fatal = str(err)
    finally:
        await asyncio.to_thread(store.close)
        store.release()
        if server is not None:
            await asyncio.to_thread(server.stop)
    summary.wall_s = time.monotonic() - started
    return summary


def _run_file(out: Path) -> dict[str, Any]:
    path = Path(out) / STATE_DIR / RUN_FILE
    if not path.exists():
        raise JobError(f"{out}: no batch run recorded here (no {STATE_DIR}/{RUN_FILE}); "
                       "start one with caption run ... --mode batch")
    return json.loads(path.read_text("utf-8"))


def run_input(out: str | Path) -> Path | None:
    """The input folder a batch run in `out` recorded."""
    recorded = _run_file(Path(out)).get("input")
    return Path(recorded) if recorded else None


def load_run_job(out: str | Path, job_file: str | Path | None = None) -> Job:
    """The job a batch run in `out` ran: `job_file` if given, else rebuilt from the record.

    The record holds header names, not values: pass the job file when the endpoint needs headers.
    """
    summary = _run_file(Path(out))["job"]
    if job_file is not None:
        job = jobmod.load_job(job_file, {"endpoint.mode": "batch"})
        if job.fingerprint != summary["fingerprint"]:
            raise JobError(f"{job_file}: is not the job of {out} (fingerprint {job.fingerprint}, "
                           f"recorded {summary['fingerprint']})")
        return job
    overrides: dict[str, Any] = {"request.extra": summary.get("request", {}).get("extra", {})}
    for section in jobmod.SECTIONS:
        for name, value in (summary.get(section) or {}).items():
            if name != "headers":
                overrides[f"{section}.{name}"] = value
    return jobmod.load_job(None, overrides)


async def batch_status(out: str | Path, job: Job, *, api_key: str | None, headers: dict[str, str],
                       refresh: bool = True) -> list[ChunkView]:
    """Every chunk of `out` with its batch's status and counts (fresh from the provider if `refresh`)."""
    state = _State.open(Path(out), job, None, writable=False)  # a run may be going on: read only
    views = []
    async with aiohttp.ClientSession(trust_env=True) as session:
        api = BatchAPI(session, job.endpoint.base_url, api_key=api_key, headers=headers,
                       timeout_s=job.limits.timeout_s)
        for record in state.records.values():
            status, counts = record.status, record.counts or {}
            if refresh and record.batch_id and record.state != "collected":
                batch = await _with_retries(job, "status", api.retrieve, record.batch_id)
                status, counts = batch.get("status"), batch.get("request_counts") or {}
            views.append(ChunkView(record.name, record.state, record.batch_id, status,
                                   counts.get("total", record.lines), counts.get("completed", 0),
                                   counts.get("failed", 0)))
    return views


async def cancel_batches(out: str | Path, job: Job, *, api_key: str | None,
                         headers: dict[str, str]) -> list[str]:
    """Ask the provider to cancel every live batch of `out`; return their ids.

    Their finished lines are collected by the next run; the rest are sent again then.
    """
    lock = OutFolderLock(Path(out))  # not while a run is writing the same records
    try:
        return await _cancel_batches(Path(out), job, api_key=api_key, headers=headers)
    finally:
        lock.release()


async def _cancel_batches(out: Path, job: Job, *, api_key: str | None, headers: dict[str, str]) -> list[str]:
    state = _State.open(out, job, None)
    cancelled = []
    async with aiohttp.ClientSession(trust_env=True) as session:
        api = BatchAPI(session, job.endpoint.base_url, api_key=api_key, headers=headers,
                       timeout_s=job.limits.timeout_s)
        for record in state.open_records():
            if record.batch_id and record.state == "submitted":
                batch = await _with_retries(job, "cancel", api.cancel, record.batch_id)
                state.save(dataclasses.replace(record, status=batch.get("status")))
                cancelled.append(record.batch_id)
    return cancelled


@dataclass(slots=True)
class PrepareSummary:
    """What `prepare_requests` wrote."""

    files: list[Path] = field(default_factory=list)
    requests: int = 0
    bad_images: list[tuple[str, str]] = field(default_factory=list)  # (key, why)


def prepare_requests(job: Job, input_path: str | Path, dest: str | Path) -> PrepareSummary:
    """Write request JSONL files (and their index files, for `ingest_outputs`) into `dest`; send nothing.

    The files are cut at the job's batch limits, for vLLM's `run_batch` or an upload by hand.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    summary = PrepareSummary()
    sources = ((source, 1) for source in walk_images(input_path))
    writer = None
    with concurrent.futures.ThreadPoolExecutor(job.limits.preprocess_workers or os.cpu_count() or 1) as pool:
        for source, _, encoded in _encoded_sources(job, sources, pool):
            if isinstance(encoded, BadImageError):
                summary.bad_images.append((source.key, str(encoded)))
                continue
            line = request_line(job, source.key, encoded)
            if writer is not None and not writer.fits(line):
                writer.close()
                writer = None
            if writer is None:
                writer = _ChunkWriter(dest, f"requests-{len(summary.files) + 1:05d}", job.batch)
                summary.files.append(dest / f"{writer.name}.jsonl")
            writer.add(line, _IndexEntry(source.key, source.key, 1, _image_facts(encoded)))
            summary.requests += 1
    if writer is not None:
        writer.close()
    return summary


def ingest_outputs(job: Job, out: str | Path, files: list[Path], *, prepared: Path | None = None,
                   allow_job_change: bool = False) -> BatchSummary:
    """Turn Batch API output files into rows of `out` (custom_id is the image key).

    With `prepared` (the folder `prepare_requests` wrote), rows carry the image facts from its index
    files; without, those columns are empty. Every line becomes a row (a transient failure is an
    error row: there is no later chunk to retry it in); lines of images already ok are skipped.
    """
    out = Path(out)
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise JobError(f"{', '.join(missing)}: output file not found; nothing was ingested")
    if prepared is not None and not Path(prepared).is_dir():
        raise JobError(f"--prepared {prepared}: folder not found")
    index: dict[str, _IndexEntry] = {}
    for path in sorted(Path(prepared).glob("*.index.jsonl")) if prepared else []:
        index.update((e.custom_id, e) for e in read_index(path))
    store = Store.open(out, jobmod.job_summary(job), part_rows=job.output.part_rows,
                       part_seconds=job.output.part_seconds, allow_other_job=allow_job_change)
    summary = BatchSummary(out=out)
    final = dataclasses.replace(job, limits=dataclasses.replace(job.limits, max_attempts=1))
    done = store.done_keys()
    try:
        for path in files:
            with open(path, "rb") as handle:
                for raw in handle:
                    outcome = _ingest_line(final, raw, index)
                    if outcome is None or outcome.row is None:
                        continue
                    if key_hash(outcome.row.image_path) in done:
                        summary.skipped += 1
                        continue
                    store.append(outcome.row)
                    if outcome.row.status == "ok":
                        done.add(key_hash(outcome.row.image_path))
                        summary.ok += 1
                    else:
                        summary.errors += 1
                        kind = outcome.row.error_kind
                        summary.error_kinds[kind] = summary.error_kinds.get(kind, 0) + 1
    finally:
        store.close()
        store.release()
    return summary


def _ingest_line(job: Job, raw: bytes, index: dict[str, _IndexEntry]) -> _LineOutcome | None:
    try:
        custom_id = json.loads(raw).get("custom_id")
    except (ValueError, AttributeError):
        return None
    if not isinstance(custom_id, str):
        return None
    local = {custom_id: index.get(custom_id) or _IndexEntry(custom_id, custom_id, 1, {})}
    return read_output_line(job, raw, local)
