"""openai_batch.py: the OpenAI Files and Batches routes of the bundled endpoint.

Owns `/v1/files` (upload, retrieve, content) and `/v1/batches` (create, retrieve, list, cancel)
and checking a create-batch body. The objects and their store with its controls are
`openai_batch_state`'s; running a batch's lines and writing its result files is
`openai_batch_run`'s. `OpenAIBatch.add_routes` joins it to the app.

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
from typing import Any

from aiohttp import web

from .core import Core, auth_error
from .openai_batch_run import Runner
from .openai_batch_state import BatchState, _BatchJob, _StoredFile
from .wire import RequestError, error_body, json_response, parse_json, request_headers

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
