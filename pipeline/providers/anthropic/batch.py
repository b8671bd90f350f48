"""providers/anthropic/batch.py: Anthropic's Message Batches API, as a `BatchBackend`.

Owns the request line (`{"custom_id", "params"}`), the custom_id rule, the HTTP calls (create a
batch from a chunk file's lines, retrieve, list, cancel, stream the results to disk), the parsing
of one result line into a `LineResult`, and the closure of the crash window that metadata closes
for OpenAI (see `find`). Decides nothing: the batch driver retries, records and turns results into rows.

Anthropic has no file upload: the requests go in the create call's body, so `upload` only checks the
chunk against the limits and names it. Its batches carry no metadata either, so a batch created just
before a crash is found again through a small journal of creates kept beside the chunk files
(`_anthropic_creates.jsonl`) and the provider's list of batches; `find` says what it can and cannot
prove.

References: https://docs.anthropic.com/en/docs/build-with-claude/batch-processing (100,000 requests
or 256 MB a batch, `custom_id` of 1-64 characters `[a-zA-Z0-9_-]`, results `succeeded | errored |
canceled | expired` in any order, available once `processing_status` is `ended`) and
https://docs.anthropic.com/en/api/creating-message-batches (create, retrieve, list newest first with
`limit`/`after_id`, cancel, `request_counts`, `results_url`, `created_at` as RFC 3339).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from ...errors import CaptionError, FatalError, TransientError
from ...records import Encoded
from ..base import BatchInfo, LineResult
from ..http import MAX_CONTROL_BYTES, download_to, read_bounded
from .errors import TYPE_STATUS, classify_response
from .messages import AnthropicProvider, parse_message

__all__ = ["AnthropicBatchBackend", "MAX_BATCH_BYTES", "MAX_BATCH_REQUESTS", "JOURNAL", "batch_info",
           "parse_result_line"]

log = logging.getLogger(__name__)

MAX_BATCH_REQUESTS = 100_000
MAX_BATCH_BYTES = 256 * 1000 * 1000  # "256 MB", read as the smaller (decimal) megabyte
JOURNAL = "_anthropic_creates.jsonl"
"""Beside the chunk files: one line before every create ({"chunk", "at"}), one after ({"chunk", "batch_id"})."""
CLOCK_SKEW_S = 300.0  # our clock and Anthropic's created_at may differ by this much
LIST_PAGE = 100
LIST_MAX_PAGES = 50
UPLOAD_BLOCK = 1 << 20
RAN_NOT = ("canceled", "expired")  # result types of requests that never ran


class AnthropicBatchBackend:
    """The Message Batches endpoints of one Anthropic server, over a shared session."""

    def __init__(self, session: aiohttp.ClientSession, provider: AnthropicProvider, *, timeout_s: float):
        self._session = session
        self._provider = provider
        self._base = provider.root + "/v1/messages/batches"
        self._headers = {k: v for k, v in provider.headers.items() if k.lower() != "content-type"}
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)

    def custom_id(self, key: str) -> str:
        """The sha256 of the key in hex: 64 characters of [0-9a-f], within Anthropic's 1-64 of
        [a-zA-Z0-9_-] whatever the key; the chunk's index maps it back to the key."""
        return hashlib.sha256(key.encode("utf-8")).hexdigest()

    def request_line(self, custom_id: str, image: Encoded) -> bytes:
        """One request as the create body lists it, without `stream`."""
        line = {"custom_id": custom_id, "params": self._provider.body(image, stream=False)}
        return json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"

    async def upload(self, path: Path) -> str:
        """Nothing to upload: check the chunk fits one batch, and name it (its absolute path)."""
        size, lines = path.stat().st_size, _count_lines(path)
        if lines > MAX_BATCH_REQUESTS or size + lines + 16 > MAX_BATCH_BYTES:
            raise FatalError(f"{path.name}: {lines:,} requests, {size:,} bytes: over a Message Batch's "
                             f"{MAX_BATCH_REQUESTS:,} requests / 256 MB; lower --batch-max-requests or "
                             "--batch-max-file-mb")
        return str(path.resolve())

    async def submit(self, file_ref: str, metadata: dict[str, str], window: str) -> BatchInfo:
        """POST /v1/messages/batches with the chunk's lines as `requests`, journalled before and after.

        `metadata` and `window` cannot be sent: Anthropic batches have neither (24 hours, fixed).
        """
        path = Path(file_ref)
        _journal(path, {"chunk": path.name, "at": time.time()})
        headers = {**self._headers, "Content-Type": "application/json"}
        batch = batch_info(await self._call("POST", "", data=_requests_body(path), headers=headers))
        _journal(path, {"chunk": path.name, "batch_id": batch.id})
        return batch

    async def poll(self, batch_id: str) -> BatchInfo:
        return batch_info(await self._call("GET", f"/{batch_id}"))

    async def cancel(self, batch_id: str) -> BatchInfo:
        return batch_info(await self._call("POST", f"/{batch_id}/cancel"))

    async def find(self, metadata: dict[str, str], since: float | None, file_ref: str | None = None
                   ) -> BatchInfo | None:
        """The batch a create for this chunk made before a crash, as far as it can be known.

        1. The journal names its batch (the crash came after the create's answer): that batch.
        2. The journal has no create for it: none was sent, so there is none (None).
        3. A create was sent but its answer never journalled: among the batches listed as created
           since that create (less CLOCK_SKEW_S), not journalled for another chunk, with as many
           requests as the chunk: an ended one whose first result line names one of the chunk's
           custom_ids is it; else the earliest still running (unprovable until it ends: see README).
        """
        if file_ref is None:
            return None
        path = Path(file_ref)
        entries = _read_journal(path)
        mine = [e for e in entries if e.get("chunk") == path.name]
        if found := [e["batch_id"] for e in mine if isinstance(e.get("batch_id"), str)]:
            return await self.poll(found[-1])
        starts = [e["at"] for e in mine if isinstance(e.get("at"), (int, float))]
        if not starts or not path.exists():
            return None
        claimed = {e.get("batch_id") for e in entries}
        candidates = await self._listed_since(min(starts) - CLOCK_SKEW_S, _count_lines(path), claimed)
        return await self._likeliest(candidates, path)

    async def _listed_since(self, start: float, lines: int, claimed: set[Any]) -> list[BatchInfo]:
        """Batches created at or after `start` with `lines` requests and not in `claimed`, oldest first."""
        found: list[BatchInfo] = []
        after = None
        for _ in range(LIST_MAX_PAGES):
            params = {"limit": str(LIST_PAGE), **({"after_id": after} if after else {})}
            page = await self._call("GET", "", params=params)
            for raw in page.get("data") or []:
                batch = batch_info(raw)
                if batch.created_at is not None and batch.created_at < start:
                    return found[::-1]
                if batch.id not in claimed and (batch.counts or {}).get("total") == lines:
                    found.append(batch)
            if not page.get("has_more") or not page.get("last_id"):
                break
            after = page["last_id"]
        return found[::-1]

    async def _likeliest(self, candidates: list[BatchInfo], path: Path) -> BatchInfo | None:
        running = [b for b in candidates if not b.ended]
        ids = None
        for batch in (b for b in candidates if b.ended and b.result_files):
            ids = ids if ids is not None else _custom_ids(path)
            if await self._first_custom_id(batch.result_files[0]) in ids:
                log.info("%s: batch %s matched by its results after a crash", path.name, batch.id)
                return batch
        if running:
            log.warning("%s: batch %s (created after the create, same request count) taken as this chunk's; "
                        "Anthropic batches carry no metadata to prove it", path.name, running[0].id)
            return running[0]
        return None

    async def _first_custom_id(self, url: str) -> str | None:
        """The custom_id of a results file's first line (read no further)."""
        try:
            async with self._session.get(url, headers=self._headers, timeout=self._timeout) as response:
                if response.status != 200:
                    raise classify_response(response.status, response.headers,
                                            await read_bounded(response, MAX_CONTROL_BYTES))
                first = await response.content.readline()
        except aiohttp.ClientError as err:
            raise TransientError(f"results read failed: {type(err).__name__}: {err}") from err
        line = parse_result_line(first)
        return line.custom_id if line is not None else None

    async def download(self, file_ref: str, dest: Path) -> None:
        """GET the batch's results_url (JSONL), streamed to `dest`."""
        url = file_ref if "://" in file_ref else self._provider.root + file_ref
        await download_to(self._session, url, dest, headers=self._headers, timeout=self._timeout,
                          classify=classify_response)

    def parse_result_line(self, raw: bytes) -> LineResult | None:
        return parse_result_line(raw)

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        headers = kwargs.pop("headers", self._headers)
        try:
            async with self._session.request(method, self._base + path, headers=headers, timeout=self._timeout,
                                             **kwargs) as response:
                body = await read_bounded(response, MAX_CONTROL_BYTES)
                error = classify_response(response.status, response.headers, body)
                if error is not None:
                    raise error
                return json.loads(body)
        except (TimeoutError, aiohttp.ClientError, ValueError) as err:
            raise TransientError(f"{method} {self._base + path} failed: {type(err).__name__}: {err}") from err


def parse_result_line(raw: bytes) -> LineResult | None:
    """One results line (`{"custom_id", "result": {"type", ...}}`); None for a line naming no request."""
    try:
        line = json.loads(raw)
    except ValueError:
        log.warning("skipping a malformed batch results line")
        return None
    if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
        return None
    custom_id = line["custom_id"]
    result = line.get("result") if isinstance(line.get("result"), dict) else {}
    kind = result.get("type")
    if kind in RAN_NOT:
        return LineResult(custom_id, ran=False)
    if kind == "succeeded":
        message = result.get("message")
        message_id = message.get("id") if isinstance(message, dict) and isinstance(message.get("id"), str) else None
        try:
            return LineResult(custom_id, chat=parse_message(message if isinstance(message, dict) else b"", None),
                              request_id=message_id)
        except CaptionError as err:
            return LineResult(custom_id, error=err, request_id=message_id)
    error = result.get("error") if isinstance(result.get("error"), dict) else {}
    inner = error.get("error") if error.get("type") == "error" and isinstance(error.get("error"), dict) else error
    status = TYPE_STATUS.get(inner.get("type"), 500)
    failure = classify_response(status, {}, {"error": inner}) if kind == "errored" else None
    return LineResult(custom_id, error=failure or TransientError(f"result of unknown type {kind!r}"))


def batch_info(batch: dict[str, Any]) -> BatchInfo:
    """The driver's view of a `message_batch` object."""
    status = str(batch.get("processing_status") or "")
    raw = batch.get("request_counts") if isinstance(batch.get("request_counts"), dict) else {}
    raw = {k: v for k, v in raw.items() if isinstance(v, int)}
    counts = {"total": sum(raw.values()), "completed": raw.get("succeeded", 0),
              "failed": raw.get("errored", 0) + raw.get("canceled", 0) + raw.get("expired", 0), **raw}
    ended = status == "ended"
    url = batch.get("results_url")
    return BatchInfo(id=str(batch.get("id")), status=status, ended=ended, counts=counts,
                     result_files=(url,) if ended and isinstance(url, str) and url else (),
                     created_at=_timestamp(batch.get("created_at")))


def _timestamp(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when.timestamp() if when.tzinfo is not None else None


async def _requests_body(path: Path) -> AsyncIterator[bytes]:
    """`{"requests": [line, line, ...]}` streamed from the chunk file, never held whole."""
    yield b'{"requests":['
    with open(path, "rb") as handle:
        for number, line in enumerate(handle):
            yield (b"," if number else b"") + line.rstrip(b"\n")
    yield b"]}"


def _count_lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(1 for _ in handle)


def _custom_ids(path: Path) -> set[str]:
    with open(path, "rb") as handle:
        return {json.loads(line)["custom_id"] for line in handle if line.strip()}


def _journal(chunk: Path, entry: dict[str, Any]) -> None:
    """Append one line to the create journal beside `chunk`, durable when this returns."""
    with open(chunk.parent / JOURNAL, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _read_journal(chunk: Path) -> list[dict[str, Any]]:
    path = chunk.parent / JOURNAL
    if not path.exists():
        return []
    entries = []
    for line in path.read_text("utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash mid-write
        if isinstance(entry, dict):
            entries.append(entry)
    return entries
