"""openai_batch.py: the OpenAI Files and Batches protocol of the bundled endpoint: objects, state, routes.

Owns `/v1/files` (upload, retrieve, content) and `/v1/batches` (create, retrieve, list, cancel):
the file and batch objects, the stored files and batches with their controls (`BatchState`: a
delay before the lines run, injected batch ends, per-line faults, failing retrieves of ended
batches, output order), and checking a create-batch body. Every created batch is recorded
(`BatchSeen`). Running a batch's lines and writing its result files is `openai_batch_run`'s.
`OpenAIBatch.add_routes` joins it to the app.

It must not answer chat requests or record observations (batch lines are not chat requests), and
shares no protocol code with the client side. Its state lives under the core's lock, and its runs
are core tasks, so stop() cancels them and reset() clears the state (a `Core.on_reset` hook).
It imports only aiohttp, the standard library and modules of this package.

Protocol sources:
- Batch API guide (request line `{"custom_id", "method", "url", "body"}`, output and error files
  whose lines are `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`,
  output order not guaranteed, unfinished requests of an expired batch in the error file with
  code `batch_expired`): https://platform.openai.com/docs/guides/batch
- Batch object (status validating|failed|in_progress|finalizing|completed|expired|cancelling|
  cancelled, request_counts {total, completed, failed}, metadata), create, retrieve, cancel, and
  list (`limit`, `after`, newest first, `has_more`/`first_id`/`last_id`):
  https://platform.openai.com/docs/api-reference/batch
- File object, upload (multipart `purpose` + `file`), retrieve, content:
  https://platform.openai.com/docs/api-reference/files
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .core import Core, auth_error
from .openai_batch_run import Runner
from .wire import RequestError, error_body, invalid, json_response, new_id, parse_json, request_headers

BATCH_OUTCOMES = ("failed", "expired", "cancelled", "queue_full")
"""Batch ends `LocalServer.fail_next_batch` can inject."""
BATCH_LINE_FAULTS = ("400", "413", "500", "503", "batch_expired")
"""Per-line faults `LocalServer.fail_batch_lines` can inject."""
_BATCH_ENDPOINTS = ("/v1/chat/completions",)
_TERMINAL = ("completed", "failed", "expired", "cancelled")


# ---------------------------------------------------------------------------------------------
# The objects.


@dataclass(frozen=True, slots=True)
class BatchSeen:
    """One batch as the server saw it created: for tests to assert "exactly one batch per chunk"."""

    id: str
    metadata: dict[str, str]
    lines: int  # request lines in its input file
    status: str  # its status when `batches()` was called


@dataclass(frozen=True, slots=True)
class _StoredFile:
    id: str
    filename: str
    purpose: str
    created_at: int
    data: bytes

    def as_object(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": len(self.data), "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed"}


@dataclass(slots=True)
class _BatchJob:
    """A batch and its progress; mutated on the server loop only."""

    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str]
    created_at: int
    lines: int
    outcome: str | None  # an injected end: "failed" | "expired" | "cancelled", or None
    run_lines: int | None  # with "expired"/"cancelled": how many lines run before it
    status: str = "validating"
    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    stamps: dict[str, int] = field(default_factory=dict)  # in_progress_at, completed_at, ...
    cancel: asyncio.Event = field(default_factory=asyncio.Event)

    def set_status(self, status: str) -> None:
        self.status = status
        self.stamps[f"{status}_at"] = int(time.time())

    def as_object(self) -> dict[str, Any]:
        stamps = ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")
        body: dict[str, Any] = {
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status, "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "created_at": self.created_at, "expires_at": self.created_at + 86_400,
            "request_counts": {"total": self.lines, "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata or None,
        }
        body.update({f"{name}_at": self.stamps.get(f"{name}_at") for name in stamps})
        return body


# ---------------------------------------------------------------------------------------------
# The stored files and batches, and the controls over them.


class BatchState:
    """Stored files and batches and the batch controls' queues, all guarded by the core's lock.

    The controls may be called from any thread; `clear` runs from `Core.reset`, lock held.
    """

    def __init__(self, core: Core):
        self._core = core
        self.files: dict[str, _StoredFile] = {}
        self.batches: dict[str, _BatchJob] = {}  # in creation order
        self.delay_s = 0.0
        self._outcomes: deque[tuple[str, int | None]] = deque()
        self._line_faults: deque[str] = deque()
        self.shuffle = True
        self._retrieve_faults: list[int] = [0, 0]  # [ended-batch retrieves to let through, then to fail]
        core.on_reset(self.clear)

    def clear(self) -> None:
        """Forget files, batches and the controls (the tables are cleared in place)."""
        self.files.clear()
        self.batches.clear()
        self.delay_s = 0.0
        self._outcomes.clear()
        self._line_faults.clear()
        self.shuffle = True
        self._retrieve_faults = [0, 0]

    # -- controls (any thread) -------------------------------------------------------------------

    def set_batch_delay(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"batch delay must be >= 0, not {seconds}")
        with self._core.lock:
            self.delay_s = seconds

    def fail_next_batch(self, outcome: str, *, run_lines: int | None = None) -> None:
        if outcome not in BATCH_OUTCOMES:
            raise ValueError(f"unknown batch outcome {outcome!r}; known: {', '.join(BATCH_OUTCOMES)}")
        with self._core.lock:
            self._outcomes.append((outcome, run_lines))

    def fail_batch_lines(self, fault: str, times: int = 1) -> None:
        if fault not in BATCH_LINE_FAULTS:
            raise ValueError(f"unknown batch line fault {fault!r}; known: {', '.join(BATCH_LINE_FAULTS)}")
        with self._core.lock:
            self._line_faults.extend([fault] * times)

    def fail_ended_retrieves(self, times: int = 1, *, after: int = 0) -> None:
        with self._core.lock:
            self._retrieve_faults = [after, times]

    def shuffle_batch_output(self, shuffle: bool) -> None:
        with self._core.lock:
            self.shuffle = shuffle

    def seen(self) -> list[BatchSeen]:
        with self._core.lock:
            return [BatchSeen(b.id, dict(b.metadata), b.lines, b.status) for b in self.batches.values()]

    # -- for the handlers and the runner (server thread) -----------------------------------------

    def store_file(self, filename: str, purpose: str, data: bytes) -> _StoredFile:
        stored = _StoredFile(new_id("file-"), filename, purpose, int(time.time()), data)
        with self._core.lock:
            self.files[stored.id] = stored
        return stored

    def new_batch(self, body: Any) -> _BatchJob:
        """Check a create-batch body and register the batch; raises RequestError."""
        if not isinstance(body, dict):
            raise invalid("Expected a JSON object body.", None)
        endpoint, window = body.get("endpoint"), body.get("completion_window")
        if endpoint not in _BATCH_ENDPOINTS:
            raise invalid(f"Invalid endpoint {endpoint!r}: this server batches /v1/chat/completions.", "endpoint")
        if window != "24h":
            raise invalid(f"Invalid completion_window {window!r}: only '24h' is supported.", "completion_window")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise invalid("metadata must be an object of string values.", "metadata")
        with self._core.lock:
            stored = self.files.get(body.get("input_file_id"))
            if stored is None:
                raise RequestError(404, f"No such File object: {body.get('input_file_id')}",
                                   param="input_file_id")
            outcome, run_lines = self._outcomes.popleft() if self._outcomes else (None, None)
            count = sum(1 for raw in stored.data.splitlines() if raw.strip())
            job = _BatchJob(new_id("batch_"), stored.id, endpoint, window, dict(metadata), int(time.time()),
                            count, outcome, run_lines)
            self.batches[job.id] = job
        return job

    def pop_line_fault(self) -> str | None:
        with self._core.lock:
            return self._line_faults.popleft() if self._line_faults else None

    def fail_retrieve(self, status: str) -> bool:
        """Whether this retrieve of a batch in `status` answers 503 (fail_ended_retrieves)."""
        with self._core.lock:
            if status in _TERMINAL and self._retrieve_faults[1]:
                if self._retrieve_faults[0]:
                    self._retrieve_faults[0] -= 1
                else:
                    self._retrieve_faults[1] -= 1
                    return True
        return False


# ---------------------------------------------------------------------------------------------
# The routes (server thread).


class OpenAIBatch:
    """The Files and Batches routes; `state` holds what they store and the controls over it."""

    def __init__(self, core: Core):
        self._core = core
        self.state = BatchState(core)
        self._runner = Runner(core, self.state)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/files", self._handle_file_upload)
        app.router.add_get("/v1/files/{file_id}", self._handle_file_get)
        app.router.add_get("/v1/files/{file_id}/content", self._handle_file_content)
        app.router.add_post("/v1/batches", self._handle_batch_create)
        app.router.add_get("/v1/batches", self._handle_batch_list)
        app.router.add_get("/v1/batches/{batch_id}", self._handle_batch_get)
        app.router.add_post("/v1/batches/{batch_id}/cancel", self._handle_batch_cancel)

    async def _handle_file_upload(self, request: web.Request) -> web.Response:
        headers = request_headers()
        refusal = self._core.refuse(request, headers)
        if refusal is not None:
            return refusal
        purpose, filename, data = await _read_upload(request)
        if data is None or purpose is None:
            error = error_body("Expected a multipart body with 'file' and 'purpose'.", "invalid_request_error",
                               param="file")
            return json_response(400, error, headers)
        if purpose != "batch":
            error = error_body(f"This server accepts purpose 'batch' only, not {purpose!r}.",
                               "invalid_request_error", param="purpose")
            return json_response(400, error, headers)
        stored = self.state.store_file(filename, "batch", data)
        return json_response(200, stored.as_object(), headers)

    async def _handle_file_get(self, request: web.Request) -> web.Response:
        stored, failure = self._file_or_error(request)
        return failure or json_response(200, stored.as_object(), request_headers())

    async def _handle_file_content(self, request: web.Request) -> web.Response:
        stored, failure = self._file_or_error(request)
        if failure is not None:
            return failure
        return web.Response(status=200, body=stored.data, content_type="application/octet-stream",
                            headers=request_headers())

    async def _handle_batch_create(self, request: web.Request) -> web.Response:
        headers = request_headers()
        refusal = self._core.refuse(request, headers)
        if refusal is not None:
            return refusal
        body = parse_json(await request.read())
        try:
            job = self.state.new_batch(body)
        except RequestError as err:
            return json_response(err.status, err.body(), headers)
        task = asyncio.get_running_loop().create_task(self._runner.run(job))
        self._core.tasks.add(task)
        task.add_done_callback(self._core.tasks.discard)
        return json_response(200, job.as_object(), headers)

    async def _handle_batch_get(self, request: web.Request) -> web.Response:
        job, failure = self._batch_or_error(request)
        if failure:
            return failure
        body = job.as_object()
        if self.state.fail_retrieve(body["status"]):
            return json_response(503, error_body("The server is overloaded.", "server_error"), request_headers())
        return json_response(200, body, request_headers())

    async def _handle_batch_list(self, request: web.Request) -> web.Response:
        headers = request_headers()
        refusal = self._core.refuse(request, headers)
        if refusal is not None:
            return refusal
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            return json_response(400, error_body("limit must be from 1 to 100", "invalid_request_error",
                                                 param="limit"), headers)
        with self._core.lock:
            newest_first = list(reversed(self.state.batches.values()))
        after = request.query.get("after")
        if after is not None:
            ids = [b.id for b in newest_first]
            newest_first = newest_first[ids.index(after) + 1:] if after in ids else []
        page = newest_first[:limit]
        body = {"object": "list", "data": [b.as_object() for b in page], "has_more": len(newest_first) > limit,
                "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}
        return json_response(200, body, headers)

    async def _handle_batch_cancel(self, request: web.Request) -> web.Response:
        job, failure = self._batch_or_error(request)
        if failure is not None:
            return failure
        if job.status in ("validating", "in_progress", "finalizing"):
            job.set_status("cancelling")
            job.cancel.set()
        return json_response(200, job.as_object(), request_headers())

    def _file_or_error(self, request: web.Request) -> tuple[_StoredFile | None, web.Response | None]:
        return self._lookup(request, self.state.files, "file_id", "id", "No such File object: {}")

    def _batch_or_error(self, request: web.Request) -> tuple[_BatchJob | None, web.Response | None]:
        return self._lookup(request, self.state.batches, "batch_id", "batch_id", "No batch found with id '{}'.")

    def _lookup(self, request: web.Request, table: dict[str, Any], key: str, param: str,
                missing: str) -> tuple[Any, web.Response | None]:
        """The object the URL names, or the 401/404 answer OpenAI gives instead."""
        headers = request_headers()
        if not self._core.authorized(request):
            return None, json_response(401, auth_error(request), headers)
        wanted = request.match_info[key]
        with self._core.lock:
            found = table.get(wanted)
        if found is None:
            error = error_body(missing.format(wanted), "invalid_request_error", param=param)
            return None, json_response(404, error, headers)
        return found, None


async def _read_upload(request: web.Request) -> tuple[str | None, str, bytes | None]:
    """Read a multipart upload: (purpose, filename, data); data is None when the body is not one."""
    purpose, filename, data = None, "upload.jsonl", None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if part.name == "purpose":
                purpose = (await part.text()).strip()
            elif part.name == "file":
                filename = part.filename or filename
                data = bytes(await part.read())
    except (ValueError, AssertionError, KeyError):
        data = None
    return purpose, filename, data
