"""openai_batch_run.py: running one OpenAI batch in the bundled endpoint.

Owns what happens after a batch is created: checking its input file line by line, waiting its
delay (or a cancel), answering its lines through the same request checks and captioning as chat
(with the injected line faults), shuffling and writing its output and error files, and the status
it ends in (completed, or an injected failed, expired or cancelled end).

It must not route, answer HTTP requests or record observations (batch lines are not chat
requests); the batch's objects and stored state belong to `openai_batch_state`, which it reaches only
through the `BatchState` it is given. It imports only the standard library and modules of this
package (`openai_batch_state` for the store it runs against).

Protocol source (input and output line shapes, output order not guaranteed, `batch_expired` lines
of an expired batch): https://platform.openai.com/docs/guides/batch
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from .core import Core
from .limits import FAULT_ERRORS
from .openai_chat import complete
from .openai_request import checked_pictures, read_fields
from .wire import RequestError, invalid, new_id, parse_json

from .openai_batch_state import BatchState, _BatchJob


# ---------------------------------------------------------------------------------------------
# Input and output lines. Pure.


def _input_problem(line: Any, seen: set[str], endpoint: str) -> tuple[str, str] | None:
    """The (code, message) an input line is refused with, or None when it is a request."""
    if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
        return ("invalid_json_line", "each line must be a JSON object with a string custom_id")
    if line["custom_id"] in seen:
        return ("duplicate_custom_id", f"custom_id {line['custom_id']!r} is used twice in the file")
    if line.get("method") != "POST" or line.get("url") != endpoint:
        return ("invalid_url", f"each line must POST to {endpoint}, the batch's endpoint")
    if not isinstance(line.get("body"), dict):
        return ("invalid_body", "each line's body must be a JSON object")
    return None


def _batch_input_lines(data: bytes, endpoint: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split and check an input file: return (request lines, errors as the batch object lists them)."""
    lines: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        line = parse_json(raw)
        problem = _input_problem(line, seen, endpoint)
        if problem is not None:
            errors.append({"code": problem[0], "message": problem[1], "param": None, "line": number})
            continue
        seen.add(line["custom_id"])
        lines.append(line)
    if not lines and not errors:
        errors.append({"code": "empty_file", "message": "the input file holds no requests", "param": None,
                       "line": None})
    return lines, errors


def _batch_line(custom_id: str, response: dict[str, Any] | None, error: dict[str, Any] | None) -> bytes:
    line = {"id": new_id("batch_req_"), "custom_id": custom_id, "response": response, "error": error}
    return json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _expired_line(custom_id: str) -> bytes:
    message = "This request could not be executed before the completion window expired."
    return _batch_line(custom_id, None, {"code": "batch_expired", "message": message})


def _injected_failure(outcome: str | None) -> dict[str, Any]:
    """The batch error of an injected "failed" or "queue_full" end."""
    injected = {"code": "injected_failure", "message": "The batch failed (injected)."}
    if outcome == "queue_full":  # OpenAI's enqueued-token limit, as its batch errors name it
        injected = {"code": "token_limit_exceeded",
                    "message": "Enqueued token limit reached for local-caption in organization org-local."}
    return {**injected, "param": None, "line": None}


# ---------------------------------------------------------------------------------------------
# Running the batch (server thread).


class Runner:
    """Runs a created batch: validate, wait the delay or a cancel, answer the lines, write the files."""

    def __init__(self, core: Core, state: BatchState):
        self._core, self._state = core, state

    async def run(self, job: _BatchJob) -> None:
        """Validate, wait the batch delay (or a cancel), run the lines, write the result files."""
        with self._core.lock:
            delay_s, data = self._state.delay_s, self._state.files[job.input_file_id].data
        lines, errors = _batch_input_lines(data, job.endpoint)
        if errors or job.outcome in ("failed", "queue_full"):
            job.errors = errors or [_injected_failure(job.outcome)]
            job.set_status("failed")
            return
        job.set_status("in_progress")
        try:
            await asyncio.wait_for(job.cancel.wait(), delay_s)
        except asyncio.TimeoutError:
            pass
        limit = len(lines) if job.outcome is None else (job.run_lines if job.run_lines is not None
                                                        else len(lines) // 2)
        outputs, failures = [], []
        for line in lines[:limit]:
            if job.cancel.is_set():
                break
            ok, text = await self._answer_line(line)
            (outputs if ok else failures).append(text)
            job.completed, job.failed = job.completed + ok, job.failed + (not ok)
        ran = job.completed + job.failed
        if job.outcome == "expired":
            failures += [_expired_line(line["custom_id"]) for line in lines[ran:]]
        self._finish(job, outputs, failures, ran == len(lines) and not job.cancel.is_set())

    def _finish(self, job: _BatchJob, outputs: list[bytes], failures: list[bytes], whole: bool) -> None:
        with self._core.lock:
            if self._state.shuffle:
                self._core.rng.shuffle(outputs)
                self._core.rng.shuffle(failures)
        job.set_status("finalizing")
        if outputs:
            job.output_file_id = self._state.store_file(f"{job.id}_output.jsonl", "batch_output",
                                                        b"".join(outputs)).id
        if failures:
            job.error_file_id = self._state.store_file(f"{job.id}_error.jsonl", "batch_output",
                                                       b"".join(failures)).id
        if job.outcome == "expired" and not whole:
            job.set_status("expired")
        elif job.cancel.is_set() or (job.outcome == "cancelled" and not whole):
            job.set_status("cancelled")
        else:
            job.set_status("completed")

    async def _answer_line(self, line: dict[str, Any]) -> tuple[bool, bytes]:
        """Run one request line through the chat checks and captioning; return (ok, output line)."""
        request_id, body = new_id("req_"), line["body"]
        fault = self._state.pop_line_fault()
        if fault == "batch_expired":
            return False, _expired_line(line["custom_id"])
        try:
            if fault is not None:
                status, message, type_, code = FAULT_ERRORS[fault]
                raise RequestError(status, message, code=code)
            if body.get("stream"):
                raise invalid("Streaming is not supported in the Batch API.", "stream")
            pictures, prompt_tokens = await checked_pictures(body, self._core.pool)
        except RequestError as err:
            response = {"status_code": err.status, "request_id": request_id, "body": err.body()}
            return False, _batch_line(line["custom_id"], response, None)
        completion = complete(read_fields(body), pictures[0], prompt_tokens)
        response = {"status_code": 200, "request_id": request_id, "body": completion.as_object()}
        return True, _batch_line(line["custom_id"], response, None)
