"""engine/batch/commands.py: the batch mode's entry points: run (and collect), status, cancel, prepare, ingest.

Each opens what it needs (the out folder's store and record, the job's provider and Batch API,
the bundled endpoint for `base_url = "local"`) and hands the work to the driver or does it in a
few lines. The CLI calls these and nothing deeper.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pyarrow as pa

from ... import job as jobmod
from ...errors import BadImageError, FatalError, JobError
from ...job import LOCAL_BASE_URL, Job
from ...providers import BatchBackend, make_batch_backend, make_provider
from ...records import BatchSummary
from ...sources import is_url, open_source
from ...store import BATCH_DIR, HashSet, OutFolderLock, Store, iter_rows, key_hash, write_atomic
from ..caption import Captioner, item_facts
from ..local import bundled_endpoint
from ..retry import RetryPolicy
from .context import BatchRun
from .driver import BatchDriver
from .lines import read_line, result_lines
from .state import RUN_FILE, BatchState, ChunkWriter, IndexEntry, read_index
from .submit import encoded_items

PREPARED_KEPT_FILE = "_kept_schema.arrow"
"""Beside prepared request files: the Arrow schema of the job's keep_columns, when it keeps any."""

__all__ = ["ChunkView", "PrepareSummary", "run_batch", "batch_status", "cancel_batches", "prepare_requests",
           "ingest_outputs", "load_run_job", "run_input"]

CANCELLING = ("cancelling", "cancelled")  # what a provider says of a batch that a cancel reached in time


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


@dataclass(slots=True)
class PrepareSummary:
    """What `prepare_requests` wrote."""

    files: list[Path] = field(default_factory=list)
    requests: int = 0
    bad_images: list[tuple[str, str]] = field(default_factory=list)  # (key, why)


def _open(job: Job, session: aiohttp.ClientSession | None, base_url: str, api_key: str | None,
          headers: Mapping[str, str]) -> tuple[Captioner, BatchBackend]:
    """The job's per-image step in batch mode and its Batch API (no session: lines only)."""
    provider = make_provider(job, base_url, api_key=api_key, headers=headers)
    backend = make_batch_backend(job, provider, session, base_url, api_key=api_key, headers=headers)
    return Captioner(job, provider, mode="batch"), backend


def _prepared_kept(prepared: Path | None) -> pa.Schema | None:
    """The kept columns `prepare_requests` recorded in `prepared`; None (the out folder's) without them."""
    path = Path(prepared) / PREPARED_KEPT_FILE if prepared is not None else None
    if path is None or not path.is_file():
        return None
    try:
        return pa.ipc.read_schema(pa.py_buffer(path.read_bytes()))
    except (pa.ArrowException, OSError) as err:
        raise JobError(f"{path}: not a readable Arrow schema ({err}); prepare the requests again") from None


def _open_store(job: Job, out: Path, allow_job_change: bool, kept_schema: pa.Schema | None = None) -> Store:
    """`out` opened for the job; `kept_schema` None: the kept columns the folder records (no source at hand)."""
    return Store.open(out, jobmod.job_summary(job), part_rows=job.output.part_rows,
                      part_seconds=job.output.part_seconds, allow_other_job=allow_job_change, kept_schema=kept_schema)


async def run_batch(job: Job, input_path: str | Path | None, out: str | Path, *, api_key: str | None,
                    headers: dict[str, str], allow_job_change: bool = False, progress: bool | None = None,
                    detach: bool = False, handle_signals: bool = False) -> BatchSummary:
    """Caption `input_path` through the Batch API into `out`; with `detach`, return once submitted.

    Resumes whatever OUT/_batch records; `input_path` None (`caption batch collect`) takes the
    folder recorded there. Raises JobError for a detached run against the in-process endpoint.
    """
    out = Path(out)
    _refuse_near_dedupe(job)
    if input_path is None:
        input_path = run_input(out)
    if job.endpoint.base_url == LOCAL_BASE_URL and detach:
        raise JobError(f"{job.source}: --detach needs an endpoint that outlives this process; "
                       "start `caption serve` and pass --base-url http://127.0.0.1:8000/v1")
    source = open_source(input_path, job.input) if input_path is not None else None
    store = _open_store(job, out, allow_job_change, source.kept_schema() if source is not None else None)
    store.keep_out(api_key, *headers.values())
    summary = BatchSummary(out=out, detached=detach)
    started = time.monotonic()
    try:
        state = BatchState.open(out, job, input_path)
        async with bundled_endpoint(job.endpoint.base_url) as base_url, \
                aiohttp.ClientSession(trust_env=True) as session:
            captioner, backend = _open(job, session, base_url, api_key, headers)
            captioner.provider.adopt(state.learned())
            run = BatchRun(captioner=captioner, backend=backend, store=store, state=state,
                           source=source,
                           summary=summary, policy=RetryPolicy.of(job.limits))
            run.open_bar(progress)
            try:
                await BatchDriver(run).main(detach, handle_signals=handle_signals)
            except FatalError as err:
                summary.fatal = str(err)
    finally:
        await asyncio.to_thread(store.close)
        store.release()
    summary.wall_s = time.monotonic() - started
    return summary


def _refuse_near_dedupe(job: Job) -> None:
    """Near dedupe is online only: a near copy would have to wait a day for its original's chunk."""
    if job.dedupe.near:
        raise JobError(f"{job.source}: [dedupe] near = true works in online mode only (batch mode sends "
                       "identical files once, but not near copies); drop it or run without --mode batch")


def _run_file(out: Path) -> dict[str, Any]:
    path = Path(out) / BATCH_DIR / RUN_FILE
    if not path.exists():
        raise JobError(f"{out}: no batch run recorded here (no {BATCH_DIR}/{RUN_FILE}); "
                       "start one with caption run ... --mode batch")
    return json.loads(path.read_text("utf-8"))


def run_input(out: str | Path) -> Path | str | None:
    """The input folder a batch run in `out` recorded (a URL stays a string)."""
    recorded = _run_file(Path(out)).get("input")
    return (recorded if is_url(recorded) else Path(recorded)) if recorded else None


def load_run_job(out: str | Path, job_file: str | Path | None = None) -> Job:
    """The job a batch run in `out` ran: `job_file` if given, else rebuilt from the record.

    The record holds header and storage-option names, not values (they may hold credentials): pass
    the job file when the endpoint needs headers or INPUT needs storage options.
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
            if name not in ("headers", "storage_options"):
                overrides[f"{section}.{name}"] = value
    return jobmod.load_job(None, overrides)


async def batch_status(out: str | Path, job: Job, *, api_key: str | None, headers: dict[str, str],
                       refresh: bool = True) -> list[ChunkView]:
    """Every chunk of `out` with its batch's status and counts (fresh from the provider if `refresh`)."""
    state = BatchState.open(Path(out), job, None, writable=False)  # a run may be going on: read only
    policy, views = RetryPolicy.of(job.limits), []
    async with aiohttp.ClientSession(trust_env=True) as session:
        _, backend = _open(job, session, job.endpoint.base_url, api_key, headers)
        for record in state.records.values():
            status, counts = record.status, record.counts or {}
            if refresh and record.batch_id and record.state != "collected":
                batch = await policy.call("status", backend.poll, record.batch_id)
                status, counts = batch.status, batch.counts or {}
            views.append(ChunkView(record.name, record.state, record.batch_id, status,
                                   counts.get("total", record.lines), counts.get("completed", 0),
                                   counts.get("failed", 0)))
    return views


async def cancel_batches(out: str | Path, job: Job, *, api_key: str | None,
                         headers: dict[str, str]) -> list[str]:
    """Ask the provider to cancel every live batch of `out`; return the ids of those it is cancelling.

    A batch that had already ended (the provider answers with its final status) is not counted.
    Their finished lines are collected by the next run; the rest are sent again then.
    """
    lock = OutFolderLock(Path(out))  # not while a run is writing the same records
    try:
        state = BatchState.open(Path(out), job, None)
        policy, cancelled = RetryPolicy.of(job.limits), []
        async with aiohttp.ClientSession(trust_env=True) as session:
            _, backend = _open(job, session, job.endpoint.base_url, api_key, headers)
            for record in state.open_records():
                if record.batch_id and record.state == "submitted":
                    batch = await policy.call("cancel", backend.cancel, record.batch_id)
                    state.save(dataclasses.replace(record, status=batch.status))
                    if batch.status in CANCELLING and record.status not in CANCELLING:
                        cancelled.append(record.batch_id)
        return cancelled
    finally:
        lock.release()


def prepare_requests(job: Job, input_path: str | Path, dest: str | Path) -> PrepareSummary:
    """Write request JSONL files (and their index files, for `ingest_outputs`) into `dest`; send nothing.

    The files are cut at the job's batch limits, for vLLM's `run_batch` or an upload by hand.
    """
    _refuse_near_dedupe(job)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    summary = PrepareSummary()
    captioner, backend = _open(job, None, job.endpoint.base_url, None, {})
    source = open_source(input_path, job.input)
    if len(kept := source.kept_schema()):  # for `ingest --prepared`: the types of the kept values in the index files
        write_atomic(dest / PREPARED_KEPT_FILE, kept.serialize().to_pybytes())
    items = ((item, 1) for item in source.items())
    writer = None
    with concurrent.futures.ThreadPoolExecutor(job.limits.preprocess_workers or os.cpu_count() or 1) as pool:
        for item, _, encoded in encoded_items(captioner.prepare, items, pool):
            if isinstance(encoded, BadImageError):
                summary.bad_images.append((item.key, str(encoded)))
                continue
            line = backend.request_line(item.key, encoded)
            if writer is not None and not writer.fits(line):
                writer.close()
                writer = None
            if writer is None:
                writer = ChunkWriter(dest, f"requests-{len(summary.files) + 1:05d}", job.batch)
                summary.files.append(dest / f"{writer.name}.jsonl")
            writer.add(line, IndexEntry(item.key, item.key, 1, item_facts(item, encoded)))
            summary.requests += 1
    if writer is not None:
        writer.close()
    return summary


def ingest_outputs(job: Job, out: str | Path, files: list[Path], *, prepared: Path | None = None,
                   allow_job_change: bool = False) -> BatchSummary:
    """Turn Batch API output files into rows of `out` (custom_id is the image key).

    With `prepared` (the folder `prepare_requests` wrote), only the requests it prepared are taken,
    and rows carry the image facts from its index files; a line of any other custom_id is refused
    (counted in `summary.refused`, never a row). Without, those columns are empty, and a custom_id
    that is no safe relative path (`../x`, `/etc/passwd`) is refused. A line that is not a result
    line is counted in `summary.unreadable`. Every other line becomes a row (a transient failure is
    an error row: there is no later chunk to retry it in), except lines of images already ok and
    lines already ingested (the same image and request id): so ingesting a file twice adds nothing.
    """
    out = Path(out)
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise JobError(f"{', '.join(missing)}: output file not found; nothing was ingested")
    if prepared is not None and not Path(prepared).is_dir():
        raise JobError(f"--prepared {prepared}: folder not found")
    index: dict[str, IndexEntry] = {}
    for path in sorted(Path(prepared).glob("*.index.jsonl")) if prepared else []:
        index.update((e.custom_id, e) for e in read_index(path))
    captioner, backend = _open(job, None, job.endpoint.base_url, None, {})
    store = _open_store(job, out, allow_job_change, _prepared_kept(prepared))
    summary, done = BatchSummary(out=out), store.done_keys()
    if prepared is not None:
        lookup = index.get
    else:
        lookup = lambda custom_id: IndexEntry(custom_id, custom_id, 1, {}) if _safe_key(custom_id) else None  # noqa: E731
    try:
        ingested = _ingested(store)
        for path in files:
            with open(path, "rb") as handle:
                for raw in result_lines(handle, Path(path).name):
                    _ingest_line(captioner, backend, raw, lookup, store, summary, done, ingested)
    finally:
        store.close()
        store.release()
    return summary


def _ingest_line(captioner: Captioner, backend: BatchBackend, raw: bytes, lookup, store: Store,
                 summary: BatchSummary, done: HashSet, ingested: HashSet) -> None:
    """One output line of `ingest_outputs`: counted as unreadable or refused, skipped, or one row."""
    custom_id = _custom_id_of(backend, raw)
    if custom_id is None:
        summary.unreadable += bool(raw.strip())
        return
    if lookup(custom_id) is None:
        summary.refused += 1
        return
    outcome = read_line(captioner, backend, raw, lookup, max_attempts=1)
    if outcome is None or outcome.row is None:
        summary.unreadable += 1
        return
    row = outcome.row
    if key_hash(row.image_path) in done or _row_hash(row.image_path, row.request_id) in ingested:
        summary.skipped += 1
        return
    store.append(row)
    summary.count(row)
    ingested.add(_row_hash(row.image_path, row.request_id))
    if row.status == "ok":
        done.add(key_hash(row.image_path))


def _custom_id_of(backend: BatchBackend, raw: bytes) -> str | None:
    """The request a result line names, as the job's protocol spells it (`custom_id`, Gemini's `key`);
    None for a line that names none."""
    try:
        result = backend.parse_result_line(raw)
    except Exception:  # a line the protocol cannot read is unreadable, whatever it raised
        return None
    return result.custom_id if result is not None else None


def _safe_key(custom_id: str) -> bool:
    """True for a custom_id that can be an image path relative to INPUT (no `..`, not absolute)."""
    parts = custom_id.replace("\\", "/").split("/")
    return bool(custom_id) and not custom_id.startswith("/") and ".." not in parts and ":" not in parts[0] \
        and "\0" not in custom_id


def _row_hash(image_path: str, request_id: str | None) -> int:
    return key_hash(f"{image_path}\0{request_id or ''}")


def _ingested(store: Store) -> HashSet:
    """(image, request id) hashes of every row in the folder: lines ingested before are not again."""
    return HashSet.of(_row_hash(p, r) for rows in iter_rows(store.out, ["image_path", "request_id"])
                      for p, r in zip(rows["image_path"], rows["request_id"]))
