"""gemini_batch.py: the Gemini API's Batch Mode of the bundled endpoint.

Owns `POST /v1beta/models/{model}:batchGenerateContent` (`{"batch": {"displayName", "inputConfig":
{"fileName"} | {"requests": {"requests": [{"request", "metadata"}]}}}}`, camelCase or snake_case),
`GET /v1beta/batches/{id}`, `GET /v1beta/batches` (newest first, `pageSize`, `pageToken`,
`nextPageToken`), `POST /v1beta/batches/{id}:cancel`, and running a batch: it stays
BATCH_STATE_PENDING for one latency draw (`LocalServer.set_latency`), then answers each request
with the same checks and captions as generateContent (`check_request`, `compose`). Each request that
runs takes the next queued `fail_next` fault: an error fault becomes that line's `error` (a
google.rpc.Status), a content fault shapes its answer. A file batch's results go in a generated
file (`files/batch-{id}`, lines of `{"key", "response" | "error"}` in random order); an inline
batch's in `output.inlinedResponses`, in request order. Answers are Operations (`name`,
`metadata` = the GenerateContentBatch with `@type`, `done`, `response`).

Test controls (`LocalServer.fail_next_gemini_create`, `end_next_gemini_batch`,
`limit_gemini_batches`): the next creates answered 503, before or after creating the batch (an
answer lost on the way back); the next batch ending FAILED (running nothing), EXPIRED or CANCELLED
after running some of its requests; a cap on live (pending or running) batches, over which a create
is answered 429 RESOURCE_EXHAUSTED without RetryInfo, as Gemini answers a create over its batch
limits (100 concurrent batches, enqueued tokens per model: https://ai.google.dev/gemini-api/docs/rate-limits).

It must not share protocol code with the client side. It imports only aiohttp, the standard
library and modules of this package.

Protocol sources: https://ai.google.dev/api/batch-mode (the GenerateContentBatch, BatchState,
BatchStats with int64 counts as strings, InputConfig, GenerateContentBatchOutput, InlinedResponse),
https://ai.google.dev/gemini-api/docs/batch-mode (result lines with `key`; inline requests under
20 MB), and the SDK's reading of them (googleapis/python-genai `batches.py` `_BatchJob_from_mldev`);
google.rpc.Code numbers: https://github.com/googleapis/googleapis/blob/master/google/rpc/code.proto
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .core import Core
from .gemini_batch_files import GeminiFiles, now_rfc3339
from .gemini_generate import FAULT_STATUS, GeminiGenerate, RequestError, check_request, compose, error_object
from .limits import CONTENT_FAULTS
from .wire import json_response, parse_json

MAX_INLINE_BYTES = 20 * 2**20  # inline requests: the whole create request under 20 MB (Batch Mode guide)
LIST_DEFAULT, LIST_MAX = 50, 1000
BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatch"
OUTPUT_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatchOutput"
GRPC_CODES = {"CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
              "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9, "INTERNAL": 13,
              "UNAVAILABLE": 14, "UNAUTHENTICATED": 16}
"""google.rpc.Code name → number (code.proto): a result line's error is a google.rpc.Status."""
ENDINGS = ("failed", "expired", "cancelled")
ENDED = ("BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED", "BATCH_STATE_CANCELLED", "BATCH_STATE_EXPIRED")


@dataclass(frozen=True, slots=True)
class GeminiBatchSeen:
    """A Gemini batch as the tests see it."""

    name: str  # "batches/{id}"
    display_name: str
    model: str
    lines: int
    state: str
    source: str  # "file" or "inline"
    keys: tuple[str, ...] = ()  # the keys of a file batch's lines, in file order


@dataclass(slots=True)
class _Batch:
    name: str
    display_name: str
    model: str
    items: list[tuple[str | None, Any, Any]]  # (key, request, metadata): a file line's key, or an inline
    # request's metadata (key None)
    input_config: dict[str, Any]
    created: str
    state: str = "BATCH_STATE_PENDING"
    updated: str = ""
    ended: str | None = None
    ending: tuple[str, int] | None = None  # the test control: end as this after running that many
    cancelling: bool = False  # a cancel came while it ran: it stops after the request in hand
    results: list[dict[str, Any]] = field(default_factory=list)  # in input order
    output: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    def as_operation(self) -> dict[str, Any]:
        failed = sum(1 for r in self.results if "error" in r)
        stats = {"requestCount": str(len(self.items)), "successfulRequestCount": str(len(self.results) - failed),
                 "failedRequestCount": str(failed), "pendingRequestCount": str(len(self.items) - len(self.results))}
        meta: dict[str, Any] = {"@type": BATCH_TYPE, "model": f"models/{self.model}", "displayName": self.display_name,
                                "inputConfig": self.input_config, "createTime": self.created,
                                "updateTime": self.updated or self.created, "batchStats": stats, "state": self.state,
                                "name": self.name}
        operation: dict[str, Any] = {"name": self.name, "metadata": meta, "done": self.state in ENDED}
        if self.ended is not None:
            meta["endTime"] = self.ended
        if self.output is not None:
            meta["output"] = self.output
            operation["response"] = {"@type": OUTPUT_TYPE, **self.output}
        if self.error is not None:
            operation["error"] = self.error
        return operation


def _invalid(message: str) -> RequestError:
    return RequestError(400, "INVALID_ARGUMENT", message)


def _status(name: str, message: str) -> dict[str, Any]:
    """A google.rpc.Status as a result line's `error`."""
    return {"code": GRPC_CODES.get(name, 2), "message": message, "status": name}


class GeminiBatches:
    """The Batch Mode routes, the batches since the last reset, and their test controls."""

    def __init__(self, core: Core, generate: GeminiGenerate, files: GeminiFiles):
        self._core = core
        self._generate = generate  # its key check
        self._files = files
        self._batches: dict[str, _Batch] = {}
        self._create_faults: deque[bool] = deque()  # per create to fail: True = after creating the batch
        self._endings: deque[tuple[str, int | None]] = deque()
        self._max_live: int | None = None
        self.refused = 0  # creates answered 429 by the live-batch cap
        core.on_reset(self._forget)

    def _forget(self) -> None:
        self._batches.clear()
        self._create_faults.clear()
        self._endings.clear()
        self._max_live, self.refused = None, 0

    def add_routes(self, app: web.Application) -> None:
        """Before GeminiGenerate's: its `/v1beta/models/{target}` would take the create otherwise."""
        app.router.add_post("/v1beta/models/{model}:batchGenerateContent", self._create)
        app.router.add_get("/v1beta/batches", self._list)
        app.router.add_post("/v1beta/batches/{id}:cancel", self._cancel)
        app.router.add_get("/v1beta/batches/{id}", self._get)

    # -- controls (any thread) --------------------------------------------------------------------

    def fail_next_create(self, times: int, *, created: bool) -> None:
        if times < 0:
            raise ValueError(f"times must be >= 0, not {times}")
        with self._core.lock:
            self._create_faults.extend([created] * times)

    def end_next_batch(self, outcome: str, run_lines: int | None) -> None:
        if outcome not in ENDINGS:
            raise ValueError(f"unknown outcome {outcome!r}; one of {', '.join(ENDINGS)}")
        with self._core.lock:
            self._endings.append((outcome, run_lines))

    def limit_live(self, live: int | None) -> None:
        if live is not None and (isinstance(live, bool) or not isinstance(live, int) or live < 1):
            raise ValueError(f"live must be a whole number >= 1 or None, not {live!r}")
        with self._core.lock:
            self._max_live = live

    def seen(self) -> list[GeminiBatchSeen]:
        with self._core.lock:
            return [GeminiBatchSeen(b.name, b.display_name, b.model, len(b.items), b.state,
                                    "file" if "fileName" in b.input_config else "inline",
                                    tuple(key for key, _, _ in b.items if key is not None))
                    for b in self._batches.values()]

    # -- routes ------------------------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.Response:
        if (refusal := self._generate.refuse(request, {})) is not None:
            return refusal
        raw = await request.read()
        try:
            batch = self._batch_of(parse_json(raw), request.match_info["model"], len(raw))
        except RequestError as err:
            return json_response(err.status, err.body(), {})
        with self._core.lock:
            live = sum(1 for b in self._batches.values() if b.state not in ENDED)
            if self._max_live is not None and live >= self._max_live:
                self.refused += 1
                return json_response(429, error_object(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota, "
                                                       "please check your plan and billing details."), {})
            fault = self._create_faults.popleft() if self._create_faults else None
            if fault is False:  # refused before anything was made
                return json_response(503, error_object(503, "UNAVAILABLE", "The service is currently unavailable."), {})
            if self._endings:
                outcome, run_lines = self._endings.popleft()
                batch.ending = (outcome, len(batch.items) // 2 if run_lines is None else run_lines)
            self._batches[batch.name] = batch
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._core.tasks.add(task)
        task.add_done_callback(self._core.tasks.discard)
        if fault is True:  # made, but the answer is lost on the way back
            return json_response(503, error_object(503, "UNAVAILABLE", "The service is currently unavailable."), {})
        return json_response(200, batch.as_operation(), {})

    def _batch_of(self, body: Any, model: str, size: int) -> _Batch:
        """The batch a create body asks for; raises RequestError for a body Gemini refuses whole."""
        spec = body.get("batch") if isinstance(body, dict) else None
        if not isinstance(spec, dict):
            raise _invalid("* BatchGenerateContentRequest.batch: batch is required")
        name = spec.get("displayName", spec.get("display_name"))
        if not isinstance(name, str) or not name:
            raise _invalid("* GenerateContentBatch.display_name: display_name is required")
        config = spec.get("inputConfig", spec.get("input_config"))
        if not isinstance(config, dict):
            raise _invalid("* GenerateContentBatch.input_config: input_config is required")
        file_name = config.get("fileName", config.get("file_name"))
        inline = config.get("requests")
        if isinstance(file_name, str):
            items, input_config = self._file_items(file_name), {"fileName": file_name}
        elif isinstance(inline, dict) and isinstance(inline.get("requests"), list) and inline["requests"]:
            if size > MAX_INLINE_BYTES:
                raise _invalid(f"Request payload size exceeds the limit: {MAX_INLINE_BYTES} bytes.")
            items = [(None, r.get("request"), r.get("metadata")) if isinstance(r, dict) else (None, None, None)
                     for r in inline["requests"]]
            input_config = {"requests": {"requests": [{"metadata": m} if m else {} for _, _, m in items]}}
        else:
            raise _invalid("* InputConfig: one of file_name or requests is required")
        now = now_rfc3339()
        return _Batch(f"batches/{secrets.token_hex(8)}", name, model.removeprefix("models/"), items, input_config, now)

    def _file_items(self, file_name: str) -> list[tuple[str | None, Any, Any]]:
        stored = self._files.files.get(file_name)
        if stored is None:
            raise RequestError(404, "NOT_FOUND", f"Requested entity was not found. ({file_name})")
        items: list[tuple[str | None, Any, Any]] = []
        for line in stored.data.splitlines():
            if not line.strip():
                continue
            item = parse_json(line)
            key = item.get("key") if isinstance(item, dict) and isinstance(item.get("key"), str) else ""
            items.append((key, item.get("request") if isinstance(item, dict) else None, None))
        if not items:
            raise _invalid(f"{file_name}: the input file holds no request")
        return items

    async def _get(self, request: web.Request) -> web.Response:
        batch, refusal = self._batch_or_error(request)
        return refusal or json_response(200, batch.as_operation(), {})

    async def _cancel(self, request: web.Request) -> web.Response:
        batch, refusal = self._batch_or_error(request)
        if refusal is not None:
            return refusal
        if batch.state in ENDED:
            return json_response(400, error_object(400, "FAILED_PRECONDITION",
                                                   f"{batch.name} has ended; it cannot be cancelled"), {})
        if batch.state == "BATCH_STATE_PENDING":
            self._finish(batch, "BATCH_STATE_CANCELLED")  # nothing ran
        else:
            batch.cancelling = True  # the runner ends it once the request in hand is answered
        return json_response(200, {}, {})

    async def _list(self, request: web.Request) -> web.Response:
        if (refusal := self._generate.refuse(request, {})) is not None:
            return refusal
        size_text, token = request.query.get("pageSize", str(LIST_DEFAULT)), request.query.get("pageToken", "0")
        if not size_text.isdigit() or not token.isdigit():
            return json_response(400, error_object(400, "INVALID_ARGUMENT", "pageSize and pageToken must be "
                                                   "whole numbers"), {})
        size, start = min(LIST_MAX, max(1, int(size_text))), int(token)
        with self._core.lock:
            newest = list(self._batches.values())[::-1]
            page = [b.as_operation() for b in newest[start: start + size]]
        body: dict[str, Any] = {"operations": page}
        if start + size < len(newest):
            body["nextPageToken"] = str(start + size)
        return json_response(200, body, {})

    def _batch_or_error(self, request: web.Request) -> tuple[_Batch | None, web.Response | None]:
        if (refusal := self._generate.refuse(request, {})) is not None:
            return None, refusal
        name = f"batches/{request.match_info['id']}"
        batch = self._batches.get(name)
        if batch is None:
            return None, json_response(404, error_object(404, "NOT_FOUND", f"Requested entity was not found. "
                                                         f"({name})"), {})
        return batch, None

    # -- running a batch ---------------------------------------------------------------------------

    async def _run(self, batch: _Batch) -> None:
        await asyncio.sleep(self._core.draw_latency())
        if batch.state != "BATCH_STATE_PENDING":
            return  # cancelled while pending: ended already, nothing ran
        outcome, stop_after = batch.ending or ("succeeded", len(batch.items))
        if outcome == "failed":
            batch.error = _status("INVALID_ARGUMENT", "The batch failed: the input file is not valid JSONL.")
            return self._finish(batch, "BATCH_STATE_FAILED")
        batch.state = "BATCH_STATE_RUNNING"
        for number, (key, params, metadata) in enumerate(batch.items):
            if batch.cancelling or number >= stop_after:
                break
            result = await self._answer(params, batch.model)
            if key is not None:
                batch.results.append({"key": key, **result})
            else:
                batch.results.append({**result, **({"metadata": metadata} if metadata else {})})
        state = {"succeeded": "BATCH_STATE_SUCCEEDED", "expired": "BATCH_STATE_EXPIRED",
                 "cancelled": "BATCH_STATE_CANCELLED"}[outcome]
        self._finish(batch, "BATCH_STATE_CANCELLED" if batch.cancelling else state)

    def _finish(self, batch: _Batch, state: str) -> None:
        """End the batch: its results into a generated file (file input) or inline (inline input)."""
        with self._core.lock:
            if batch.results and "fileName" in batch.input_config:
                lines = [json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
                         for r in batch.results]
                self._core.rng.shuffle(lines)  # Gemini does not promise the input order
                stored = self._files.add_generated(f"batch-{batch.name.split('/')[1]}", b"".join(lines))
                batch.output = {"responsesFile": stored.name}
            elif batch.results:
                batch.output = {"inlinedResponses": {"inlinedResponses": batch.results}}
            batch.state, batch.ended = state, now_rfc3339()
            batch.updated = batch.ended

    async def _answer(self, params: Any, model: str) -> dict[str, Any]:
        """One request's `response` or `error`, as generateContent would answer it."""
        try:
            checked = await asyncio.get_running_loop().run_in_executor(self._core.pool, check_request, params, model)
        except RequestError as err:
            return {"error": _status(err.name, err.message)}
        fault, _ = self._core.pop_fault()
        if fault in FAULT_STATUS:
            _, name, message = FAULT_STATUS[fault]
            return {"error": _status(name, message)}
        if fault is not None and fault not in CONTENT_FAULTS and fault not in ("no_usage", "no_finish"):
            return {"error": _status("INTERNAL", "An internal error has occurred.")}
        answer = compose(checked, fault)
        return {"response": answer.chunk(answer.text, final=True)}
