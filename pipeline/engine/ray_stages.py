"""engine/ray_stages.py: what runs on the Ray cluster's workers: read, prepare, request.

Three stages of one Ray Data pipeline, each a plain function or class that Ray ships to workers:

- `KeyShards`, a Ray Data datasource: read task i of n opens the run's source (`open_source`, so
  any source behind `ImageSource`) and keeps the items whose key hashes to i mod n and that the out
  folder does not have yet (the resume index, shared through the object store), in blocks of
  BLOCK_KEYS keys. The listing is therefore read in parallel, and no list of keys is held anywhere.
- `prepare_batch`: `Captioner.prepare` on every CPU of the cluster (decode, shrink, encode); a file
  that is not an image becomes its error row here.
- `Requester`: a pool of async actors that send the requests through the existing `Transport` and
  `Captioner.caption` (the one retry policy), with a `send` that takes its permits from the
  cluster's one `ClusterBudget` (ray_budget.py). It returns rows; the driver writes them.

Values cross processes pickled inside binary columns (`Item`, `Encoded`, `Result` are small frozen
dataclasses). The API key reaches request actors inside `Secrets`, which never prints it; each
actor registers it for redaction before anything can log. Nothing here writes the out folder.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import pickle
import sys
from typing import Any

import aiohttp
import pyarrow as pa
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from ..errors import BadImageError, FatalError, InternalError, RateLimitError
from ..job import InputSettings, Job
from ..providers import HttpRequest, make_provider
from ..providers.http import Transport
from ..records import ChatResult, Result
from ..redaction import keep_secret, redact
from ..sources import open_source
from ..store import HashSet, key_hash
from .caption import Captioner, image_facts, item_facts
from .ray_budget import BudgetHalted, PermitBroker
from .retry import RetryPolicy

__all__ = ["BLOCK_KEYS", "KeyShards", "Requester", "Secrets", "prepare_batch", "OUTPUT_SCHEMA"]

log = logging.getLogger(__name__)

BLOCK_KEYS = 8
"""Items per block a read task yields. Small: a block is what one task of each later stage takes, and
its rows reach the driver when that task ends (Ray Data hands a task's output on in whole blocks), so
this bounds how many answered images a kill of the driver can cost, and how jumpy progress is."""

OUTPUT_SCHEMA = pa.schema([("key", pa.string()), ("row", pa.binary()), ("fatal", pa.string())])
"""What the request stage hands the driver: the pickled row of each image, or (row null) why the run
must stop (`fatal`), or neither (the image was not sent because the run is stopping)."""

_PREPARED_SCHEMA = pa.schema([("key", pa.string()), ("encoded", pa.binary()), ("row", pa.binary()),
                              ("kept", pa.binary())])  # the item's keep_columns values, pickled (None: none)


class Secrets:
    """The API key and header values on their way to the request actors. Its repr and str never show
    them, so a Ray error that prints a task's arguments prints "[redacted]"."""

    __slots__ = ("_api_key", "_headers")

    def __init__(self, api_key: str | None, headers: dict[str, str]):
        self._api_key = api_key
        self._headers = dict(headers)

    def __repr__(self) -> str:
        return "Secrets([redacted])"

    __str__ = __repr__

    def __getstate__(self):
        return self._api_key, self._headers

    def __setstate__(self, state) -> None:
        self._api_key, self._headers = state

    def reveal(self) -> tuple[str | None, dict[str, str]]:
        """(API key, headers), registered for redaction in this process before they are returned."""
        keep_secret(self._api_key, *self._headers.values())
        _redact_process_logs()
        return self._api_key, dict(self._headers)


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


@functools.cache
def _redact_process_logs() -> None:
    """Every handler of this worker process blanks the run's secrets (the CLI does so on the driver)."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    for handler in root.handlers:
        handler.addFilter(_RedactingFilter())


# --- read ------------------------------------------------------------------------------------------


class KeyShards(Datasource):
    """The items of INPUT not done yet, read by `shards` tasks, each keeping its share of the keys."""

    def __init__(self, input_path: str, settings: InputSettings, done: Any, shards: int):
        super().__init__()
        self._input, self._settings, self._done, self._shards = str(input_path), settings, done, shards

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        # One task per shard whatever `parallelism` says: the shard count decides which task owns a key.
        return [ReadTask(functools.partial(_read_shard, self._input, self._settings, self._done, i, self._shards),
                         BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None))
                for i in range(self._shards)]


def _read_shard(input_path: str, settings: InputSettings, done_ref: Any, shard: int, shards: int):
    """Yield blocks of (key, pickled item) for the keys of shard `shard` that are not done."""
    import ray

    done: HashSet = ray.get(done_ref)
    keys: list[str] = []
    items: list[bytes] = []
    for item in open_source(input_path, settings).items():
        hashed = key_hash(item.key)
        if hashed % shards != shard or hashed in done:
            continue
        keys.append(item.key)
        items.append(pickle.dumps(item))
        if len(keys) >= BLOCK_KEYS:
            yield pa.table({"key": pa.array(keys, pa.string()), "item": pa.array(items, pa.binary())})
            keys, items = [], []
    if keys:
        yield pa.table({"key": pa.array(keys, pa.string()), "item": pa.array(items, pa.binary())})


# --- prepare ---------------------------------------------------------------------------------------


def prepare_batch(batch: pa.Table, captioner: Captioner) -> pa.Table:
    """Read and encode each item of `batch`; an unreadable one gets its error row instead."""
    keys, encoded, rows, kept = [], [], [], []
    for key, blob in zip(batch.column("key").to_pylist(), batch.column("item").to_pylist()):
        item = pickle.loads(blob)
        keys.append(key)
        kept.append(pickle.dumps(dict(item.kept)) if item.kept else None)
        try:
            encoded.append(pickle.dumps(captioner.prepare(item)))
            rows.append(None)
        except BadImageError as err:
            encoded.append(None)
            rows.append(pickle.dumps(captioner.error_row(key, item_facts(item), err, attempts=0)))
    return pa.table({"key": keys, "encoded": encoded, "row": rows, "kept": kept}, schema=_PREPARED_SCHEMA)


# --- request ---------------------------------------------------------------------------------------


class Requester:
    """One async request actor: captions the images of each batch concurrently, under the cluster budget."""

    def __init__(self, job: Job, base_url: str, secrets: Secrets, budget: Any):
        api_key, headers = secrets.reveal()
        self._captioner = Captioner(job, make_provider(job, base_url, api_key=api_key, headers=headers))
        self._job = job
        self._budget = budget
        self._policy = RetryPolicy.of(job.limits)
        prompt = job.prompt
        # the part of a request's token estimate that is not the image (as the online driver's gate)
        from .. import cost

        self._fixed_tokens = cost.text_tokens((prompt.system or "") + prompt.user) + prompt.max_tokens
        self._transport: Transport | None = None
        self._broker: PermitBroker | None = None

    def _open(self) -> None:
        """The HTTP session and the broker, made on the actor's event loop at its first batch."""
        if self._transport is not None:
            return
        limits = self._job.limits
        self._broker = PermitBroker(self._budget)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limits.concurrency + 4))
        self._transport = Transport(session, timeout_s=limits.timeout_s, idle_timeout_s=limits.idle_timeout_s,
                                    stream=self._job.endpoint.stream, on_rate_info=self._broker.observe)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        self._open()
        keys = batch.column("key").to_pylist()
        outcomes = await asyncio.gather(*(self._one(key, encoded, row, kept) for key, encoded, row, kept in zip(
            keys, batch.column("encoded").to_pylist(), batch.column("row").to_pylist(),
            batch.column("kept").to_pylist())))
        return pa.table({"key": keys, "row": [row for row, _ in outcomes], "fatal": [why for _, why in outcomes]},
                        schema=OUTPUT_SCHEMA)

    async def _one(self, key: str, encoded_blob: bytes | None, row_blob: bytes | None, kept_blob: bytes | None
                   ) -> tuple[bytes | None, str | None]:
        """(pickled row, None), or (None, why the run must stop), or (None, None): not sent, no row."""
        if row_blob is not None:
            return row_blob, None
        encoded = pickle.loads(encoded_blob)
        retrying = self._policy.image_retrying(sleep=self._sleep, before_sleep=_log_retry)
        try:
            result: Result = await self._captioner.caption(key, encoded, self._send, retrying)
        except BudgetHalted:
            return None, None
        except FatalError as err:
            return None, redact(str(err)) or type(err).__name__
        except Exception as err:  # a bug or an unforeseen answer: this image's row says so, the run goes on
            log.exception("internal error on %s", key)
            result = self._captioner.error_row(key, image_facts(encoded),
                                               InternalError(f"{type(err).__name__}: {err}"), attempts=0)
        if kept_blob is not None:  # the row joins back to its input, as online rows do
            result = dataclasses.replace(result, kept=pickle.loads(kept_blob))
        return pickle.dumps(result), None

    async def _send(self, request: HttpRequest, tokens: int) -> ChatResult:
        """One request under the cluster budget (as the online driver's gate, with remote permits)."""
        broker = self._broker
        permit = await broker.permit(tokens, self._fixed_tokens, self._job.endpoint.model)
        used, own_wait = None, 0.0
        try:
            chat = await self._transport.send(self._captioner.provider, request)
            if chat.usage is not None and chat.usage.source == "reported":
                used = chat.usage.prompt_tokens + self._job.prompt.max_tokens
        except RateLimitError as err:
            own_wait = await broker.rate_limited(permit, err)
            raise
        finally:
            broker.release(permit, used)
            if own_wait:  # a concurrency cap refused this one request: it waits, its slot already free
                await self._sleep(own_wait)
        broker.success()
        return chat

    async def _sleep(self, seconds: float) -> None:
        """A retry's backoff; a run that stopped meanwhile sends nothing more."""
        await asyncio.sleep(seconds)
        if self._broker is not None and self._broker.halted:
            raise BudgetHalted


def _log_retry(state) -> None:
    err = state.outcome.exception()
    log.debug("retrying (attempt %d done): %s %s", state.attempt_number, getattr(err, "kind", "?"), err)
