"""engine/ray.py: the Ray driver: the same job on a Ray cluster, under one rate budget for all of it.

Scheduling only, as online.py: the stages that run on the cluster are in ray_stages.py (read,
prepare, request) and the budget in ray_budget.py. This module connects to the cluster, builds the
Ray Data pipeline, and is the one writer of the out folder:

    INPUT ─▶ n read tasks (each its share of the keys, minus the done ones) ─▶ prepare on every CPU
    ─▶ a pool of async request actors ◀─▶ one ClusterBudget actor (permits in batches, reports back)
    ─▶ rows back to the driver ─▶ Store (journal line, Parquet part), as in online mode

Only the driver reads the API key from the environment; it travels to the request actors inside
`Secrets`, which never prints it. The out folder keeps its layout and rules, so resume, report,
export and review read it unchanged, and a kill -9 of the driver resumes with the same command. A
row for a key that already has an ok row in this run (a task Ray ran twice after a worker or a node
died) is dropped, so no image gets two ok rows.

Not done on a cluster (yet): dedupe of identical or near-identical files (each file is sent), and
batch mode; `run_ray` refuses the job options that ask for them.

Shutdown (Ctrl-C, SIGTERM, a fatal provider error, the same failure again and again):
1. the budget is halted: no request that has not gone goes, and the images behind them get no row;
2. rows of requests in flight are still taken for up to `limits.grace_s` (a second Ctrl-C: none);
3. the pipeline is shut down, the store flushed (the open journal becomes a Parquet part);
4. the budget actor is ended, and the cluster too if this run started it;
5. the summary goes back to the CLI, which prints it with how to resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import pickle
import signal
import threading
import time
from pathlib import Path
from typing import Any


from ..errors import JobError
from ..extras import require
from ..job import Job, job_summary
from ..providers import make_provider
from ..records import Result, RunSummary
from ..sources import open_source
from ..store import HashSet, Store, key_hash, open_batch_chunks
from .caption import Captioner
from .local import bundled_endpoint
from .progress import Counter, Progress
from .retry import FailureStreak

__all__ = ["run_ray", "RAY_WHAT"]

log = logging.getLogger(__name__)

RAY_WHAT = "--engine ray"
"""What needs Ray, in the one-line error when it is not installed."""
TICK_S = 1.0  # how often the journal is fsynced, parts are rolled and progress is shown
PREPARE_BATCH = 8  # images a prepare task encodes per batch
MAX_REQUEST_BATCH = 64  # images a request actor takes per batch, at most


async def run_ray(job: Job, input_path: str | Path, out: str | Path, *, api_key: str | None,
                  headers: dict[str, str], allow_job_change: bool = False, progress: bool | None = None,
                  handle_signals: bool = False) -> RunSummary:
    """Caption `input_path` into `out` on a Ray cluster (`job.engine.ray_address`); return the summary.

    Raises JobError (exit 2, nothing sent) when Ray is not installed or the job asks for what a
    cluster run does not do.
    """
    ray = require("ray", "ray", what=RAY_WHAT)
    require("ray.data", "ray", what=RAY_WHAT)
    _check_job(job)
    kept = open_source(input_path, job.input).kept_schema()  # keep_columns' types, as online mode records them
    store = Store.open(out, job_summary(job), part_rows=job.output.part_rows,
                       part_seconds=job.output.part_seconds, allow_other_job=allow_job_change, kept_schema=kept)
    store.keep_out(api_key, *headers.values())
    try:
        if live := open_batch_chunks(store.out):
            raise JobError(f"{out}: {live} batch chunk(s) are still with the provider; sending their images "
                           f"online too would pay twice. Run `caption batch collect {out}` (or cancel them)")
        done, _ = await asyncio.to_thread(store.resume_index)
        async with bundled_endpoint(job.endpoint.base_url) as base_url:
            started_here = _connect(ray, job.engine.ray_address)  # on the main thread: Ray sets its handlers there
            try:
                run = _ClusterRun(ray, job, base_url, str(input_path), store, done, api_key, headers, progress)
                if handle_signals:
                    run.install_signal_handlers()
                return await run.main()
            finally:
                if started_here:
                    await asyncio.to_thread(ray.shutdown)
    finally:
        store.release()


def _check_job(job: Job) -> None:
    if job.endpoint.mode == "batch":
        raise JobError(f"{job.source}: --engine ray sends one request per image; batch mode runs on this "
                       "machine: drop --mode batch or --engine ray")
    if job.dedupe.near:
        raise JobError(f"{job.source}: [dedupe] near is not done on a Ray cluster yet; drop it (--no-dedupe-near) "
                       "or run without --engine ray")


def _connect(ray: Any, address: str | None) -> bool:
    """Join the cluster at `address` (None: start one of this machine); True when this run started it."""
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address is None:
        options["include_dashboard"] = False
    try:
        ray.init(address=address, **options)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise JobError(f"--ray-address {address}: cannot join the Ray cluster: {err}") from None
    return True


class _ClusterRun:
    """One cluster run's pipeline, writer and counters."""

    def __init__(self, ray: Any, job: Job, base_url: str, input_path: str, store: Store, done: HashSet,
                 api_key: str | None, headers: dict[str, str], progress: bool | None):
        self.ray, self.job, self.base_url, self.input_path = ray, job, base_url, input_path
        self.store, self.done = store, done
        self.summary = RunSummary(out=store.out)
        self.streak = FailureStreak()
        self.stop = threading.Event()  # halt: nothing more is sent; take the rows in flight for grace_s
        self.abandon = threading.Event()  # stop taking rows at once
        self.stop_at: float | None = None
        self._secrets = (api_key, dict(headers))
        self._lock = threading.Lock()  # the store is written from the consumer thread and the ticker
        self._gauge: dict[str, Any] = {}
        self._budget = None
        self._counter = Counter(open_source(input_path, job.input), done)
        self._progress = Progress(self.summary, job, self._counter, self._gauge_now, enabled=progress)
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
        self._halt("interrupted")

    def _halt(self, why: str) -> None:
        if self.stop.is_set():
            return
        self.stop_at = time.monotonic()
        self.stop.set()
        if self._budget is not None:
            self._budget.halt.remote(why)

    async def main(self) -> RunSummary:
        from .ray_budget import ClusterBudget

        ray = self.ray
        scheduling = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=True)  # beside the driver: it outlives worker nodes
        self._budget = ray.remote(ClusterBudget).options(
            num_cpus=0, max_restarts=-1, max_task_retries=-1, scheduling_strategy=scheduling).remote(self.job.limits)
        self._counter.start()
        ticker = asyncio.create_task(self._tick())
        try:
            await asyncio.to_thread(self._consume, self._dataset())
        except ray.exceptions.RayError as err:  # the cluster gave up (a task failed past its retries, ...)
            first_line = (str(err).strip().splitlines() or [""])[0][:500]
            self._fatal(f"the Ray cluster failed: {type(err).__name__}: {first_line}")
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
            self._counter.stop(wait_s=5.0)  # a small INPUT is counted by now ("already done"); a huge one given up
            await asyncio.to_thread(self._close)
        self.summary.wall_s = time.monotonic() - self._started
        self.summary.skipped = self._counter.skipped
        self.summary.skipped_files = dict(self._counter.source.skipped)
        return self.summary

    def _dataset(self):
        """The Ray Data pipeline: read shards → prepare → request actors (ray_stages.py)."""
        ray = self.ray
        from .ray_stages import BLOCK_KEYS, KeyShards, Requester, Secrets, prepare_batch

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the driver shows its own (done/total, rate, 429s, spend)
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        actors = self.job.engine.ray_actors or max(1, sum(1 for node in ray.nodes() if node.get("Alive")))
        request_batch = max(1, min(MAX_REQUEST_BATCH, math.ceil(self.job.limits.concurrency / actors)))
        # Blocks an actor works on at once: enough for the job's concurrency and half again, no more.
        # A block's rows reach the driver when all of them are answered, and blocks sharing too few
        # permits would all end together at the end of the run.
        blocks_per_actor = max(1, math.ceil(1.5 * self.job.limits.concurrency / (actors * BLOCK_KEYS)))
        preparer = Captioner(self.job, make_provider(self.job, self.base_url, api_key=None, headers={}))
        done_ref = ray.put(self.done)
        log.info("Ray cluster: %d CPUs, %d read shards, %d request actors, %d images a request batch, "
                 "%d blocks an actor", cpus, cpus, actors, request_batch, blocks_per_actor)
        return (ray.data.read_datasource(KeyShards(self.input_path, self.job.input, done_ref, cpus),
                                         override_num_blocks=cpus)
                .map_batches(prepare_batch, fn_kwargs={"captioner": preparer}, batch_size=PREPARE_BATCH,
                             batch_format="pyarrow", num_cpus=1)
                .map_batches(Requester, fn_constructor_args=(self.job, self.base_url, Secrets(*self._secrets),
                                                             self._budget),
                             batch_size=request_batch, batch_format="pyarrow", num_cpus=0,
                             compute=ray.data.ActorPoolStrategy(size=actors,
                                                                max_tasks_in_flight_per_actor=blocks_per_actor)))

    def _consume(self, dataset) -> None:
        """Take the rows as they come back and write them (in this thread), until the end or the stop."""
        with contextlib.closing(iter(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))) as batches:
            for batch in batches:
                with self._lock:
                    for blob, fatal in zip(batch.column("row").to_pylist(), batch.column("fatal").to_pylist()):
                        if fatal is not None:
                            self._fatal(fatal)
                        elif blob is not None:
                            self._record(pickle.loads(blob))
                if self.abandon.is_set() or (self.stop.is_set() and self._grace_over()):
                    break

    def _grace_over(self) -> bool:
        over = time.monotonic() - (self.stop_at or 0.0) >= self.job.limits.grace_s
        if over:
            log.warning("grace period over: images not answered yet will be sent again on resume")
        return over

    def _record(self, result: Result) -> None:
        hashed = key_hash(result.image_path)
        if hashed in self.done:  # a second row for an image already ok in this run (a task run twice)
            log.info("%s: already has an ok row; a second answer (from a retried task) is dropped", result.image_path)
            return
        self.store.append(result)
        self.summary.count(result)
        self.summary.retries += max(0, (result.attempts or 1) - 1)
        if result.status == "ok":
            self.done.add(hashed)
        else:
            log.debug("error row for %s: %s: %s", result.image_path, result.error_kind, result.error)
        if (why := self.streak.note(result)) is not None and not self.summary.fatal:
            self._fatal(why)

    def _fatal(self, why: str) -> None:
        if not self.summary.fatal:
            self.summary.fatal = self.store.scrub(why)
            log.error("stopping: %s", self.summary.fatal)
        self._halt(self.summary.fatal)

    async def _tick(self) -> None:
        """Every TICK_S: fsync the journal, roll a due part, refresh progress."""
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await asyncio.to_thread(self._sync)
            except OSError as err:  # disk full, say: rows stay in the journal, which the next run recovers
                log.error("could not sync or roll the Parquet part: %s", err)
            await asyncio.to_thread(self._read_gauge)
            self._progress.update()

    def _sync(self) -> None:
        with self._lock:
            self.store.sync()
            self.store.roll_if_due()

    def _gauge_now(self) -> tuple[int, int, int]:
        """The budget actor's figures as last read: (429s, in flight, limit), cluster-wide."""
        gauge = self._gauge
        return gauge.get("rate_limited", 0), gauge.get("in_flight", 0), int(gauge.get("limit", 0))

    def _read_gauge(self) -> None:
        try:
            self._gauge = self.ray.get(self._budget.stats.remote(), timeout=5)
        except Exception as err:  # the budget actor restarting: keep the last figures
            log.debug("no budget figures: %s", type(err).__name__)

    def _close(self) -> None:
        self._read_gauge()
        self.summary.rate_limited = self._gauge.get("rate_limited", 0)
        try:
            self.ray.kill(self._budget)
        except Exception as err:
            log.debug("budget actor already gone: %s", err)
        with self._lock:
            self.store.close()
        self._progress.close()
