"""anthropic_batch.py: the Message Batches API of the bundled endpoint.

Owns `POST /v1/messages/batches` (requests inline, custom_id checked: 1-64 of [a-zA-Z0-9_-],
unique, at most 100,000), retrieve, list (newest first, `limit`, `after_id`, `has_more`,
`last_id`), cancel, and the results JSONL (`succeeded | errored | canceled | expired`, in random
order). A batch stays `in_progress` for one latency draw (`LocalServer.set_latency`), then answers
its requests with the same checks and captions as `POST /v1/messages`; each request takes the next
queued `fail_next` fault that is an error answer (as an `errored` result). A cancel before then
ends every request `canceled`.

It must not share protocol code with the client side. It imports only aiohttp, the standard
library and modules of this package.

Protocol sources: https://docs.anthropic.com/en/docs/build-with-claude/batch-processing and
https://docs.anthropic.com/en/api/creating-message-batches (the message_batch object,
`request_counts`, `results_url`, RFC 3339 times, result line shapes).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .anthropic_messages import FAULT_TYPES, AnthropicMessages, ParamsError, check_params, compose, error_object
from .core import Core
from .wire import json_response, new_id, parse_json

CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_REQUESTS = 100_000
LIST_DEFAULT, LIST_MAX = 20, 1000


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class _Batch:
    id: str
    created_at: str
    requests: list[dict[str, Any]]
    status: str = "in_progress"  # in_progress | canceling | ended
    results: list[bytes] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    ended_at: str | None = None
    cancel_initiated_at: str | None = None

    def as_object(self, root: str) -> dict[str, Any]:
        counts = {k: self.counts.get(k, 0) for k in ("processing", "succeeded", "errored", "canceled", "expired")}
        if self.status != "ended":
            counts["processing"] = len(self.requests)
        return {"id": self.id, "type": "message_batch", "processing_status": self.status, "request_counts": counts,
                "ended_at": self.ended_at, "created_at": self.created_at, "expires_at": self.created_at,
                "archived_at": None, "cancel_initiated_at": self.cancel_initiated_at,
                "results_url": f"{root}/v1/messages/batches/{self.id}/results" if self.status == "ended" else None}


def _result_line(custom_id: str, result: dict[str, Any]) -> bytes:
    return json.dumps({"custom_id": custom_id, "result": result}, separators=(",", ":")).encode() + b"\n"


def check_requests(body: Any) -> list[dict[str, Any]]:
    """The requests of a create body; raises ParamsError for a body Anthropic refuses whole."""
    requests = body.get("requests") if isinstance(body, dict) else None
    if not isinstance(requests, list) or not requests:
        raise ParamsError(400, "invalid_request_error", "requests: Field required")
    if len(requests) > MAX_REQUESTS:
        raise ParamsError(400, "invalid_request_error", f"requests: at most {MAX_REQUESTS} requests a batch")
    seen: set[str] = set()
    for i, item in enumerate(requests):
        custom_id = item.get("custom_id") if isinstance(item, dict) else None
        if not isinstance(custom_id, str) or not CUSTOM_ID.match(custom_id):
            raise ParamsError(400, "invalid_request_error",
                              f"requests.{i}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'")
        if custom_id in seen:
            raise ParamsError(400, "invalid_request_error", f"requests.{i}.custom_id: duplicate custom_id")
        if not isinstance(item.get("params"), dict):
            raise ParamsError(400, "invalid_request_error", f"requests.{i}.params: Field required")
        seen.add(custom_id)
    return requests


class AnthropicBatches:
    """The Message Batches routes, and the batches created since the last reset."""

    def __init__(self, core: Core, messages: AnthropicMessages):
        self._core = core
        self._messages = messages  # its key and version checks
        self._batches: dict[str, _Batch] = {}
        core.on_reset(self._batches.clear)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages/batches", self._create)
        app.router.add_get("/v1/messages/batches", self._list)
        app.router.add_get("/v1/messages/batches/{id}", self._retrieve)
        app.router.add_post("/v1/messages/batches/{id}/cancel", self._cancel)
        app.router.add_get("/v1/messages/batches/{id}/results", self._results)

    async def _create(self, request: web.Request) -> web.Response:
        headers = {"request-id": new_id("req_")}
        if (refusal := self._messages.refuse(request, headers)) is not None:
            return refusal
        try:
            requests = check_requests(parse_json(await request.read()))
        except ParamsError as err:
            return json_response(err.status, err.body(), headers)
        batch = _Batch(new_id("msgbatch_"), _now(), requests)
        with self._core.lock:
            self._batches[batch.id] = batch
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._core.tasks.add(task)
        task.add_done_callback(self._core.tasks.discard)
        return json_response(200, batch.as_object(_root(request)), headers)

    async def _run(self, batch: _Batch) -> None:
        await asyncio.sleep(self._core.draw_latency())
        lines = []
        for item in batch.requests:
            if batch.status == "canceling":
                lines.append(_result_line(item["custom_id"], {"type": "canceled"}))
                continue
            lines.append(_result_line(item["custom_id"], await self._answer(item["params"])))
        self._core.rng.shuffle(lines)  # Anthropic does not promise the input order
        counts: dict[str, int] = {}
        for line in lines:
            kind = json.loads(line)["result"]["type"]
            counts[kind] = counts.get(kind, 0) + 1
        with self._core.lock:
            batch.results, batch.counts, batch.status, batch.ended_at = lines, counts, "ended", _now()

    async def _answer(self, params: dict[str, Any]) -> dict[str, Any]:
        try:
            checked, _ = await asyncio.get_running_loop().run_in_executor(self._core.pool, check_params, params)
        except ParamsError as err:
            return {"type": "errored", "error": err.body()}
        fault, _ = self._core.pop_fault()
        if fault in FAULT_TYPES:
            _, type_, message = FAULT_TYPES[fault]
            return {"type": "errored", "error": error_object(type_, message)}
        return {"type": "succeeded", "message": compose(checked, fault).as_object()}

    def _batch_or_404(self, request: web.Request, headers: dict[str, str]) -> tuple[_Batch | None, web.Response | None]:
        if (refusal := self._messages.refuse(request, headers)) is not None:
            return None, refusal
        batch = self._batches.get(request.match_info["id"])
        if batch is None:
            return None, json_response(404, error_object("not_found_error", "batch not found"), headers)
        return batch, None

    async def _retrieve(self, request: web.Request) -> web.Response:
        headers = {"request-id": new_id("req_")}
        batch, refusal = self._batch_or_404(request, headers)
        return refusal or json_response(200, batch.as_object(_root(request)), headers)

    async def _cancel(self, request: web.Request) -> web.Response:
        headers = {"request-id": new_id("req_")}
        batch, refusal = self._batch_or_404(request, headers)
        if refusal is not None:
            return refusal
        with self._core.lock:
            if batch.status == "in_progress":
                batch.status, batch.cancel_initiated_at = "canceling", _now()
        return json_response(200, batch.as_object(_root(request)), headers)

    async def _results(self, request: web.Request) -> web.Response:
        headers = {"request-id": new_id("req_")}
        batch, refusal = self._batch_or_404(request, headers)
        if refusal is not None:
            return refusal
        if batch.status != "ended":
            return json_response(400, error_object("invalid_request_error", "Batch has not ended yet"), headers)
        return web.Response(status=200, body=b"".join(batch.results), content_type="application/binary",
                            headers=headers)

    async def _list(self, request: web.Request) -> web.Response:
        headers = {"request-id": new_id("req_")}
        if (refusal := self._messages.refuse(request, headers)) is not None:
            return refusal
        try:
            limit = min(LIST_MAX, max(1, int(request.query.get("limit", LIST_DEFAULT))))
        except ValueError:
            return json_response(400, error_object("invalid_request_error", "limit: must be an integer"), headers)
        newest = list(self._batches.values())[::-1]
        after = request.query.get("after_id")
        if after is not None:
            ids = [b.id for b in newest]
            newest = newest[ids.index(after) + 1:] if after in ids else []
        page = newest[:limit]
        data = [b.as_object(_root(request)) for b in page]
        return json_response(200, {"data": data, "has_more": len(newest) > limit, "first_id": data[0]["id"] if data else None,
                           "last_id": data[-1]["id"] if data else None}, headers)


def _root(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"
