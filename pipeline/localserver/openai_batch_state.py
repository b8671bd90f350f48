"""openai_batch_state.py: the OpenAI Files and Batches objects of the bundled endpoint, and their store.

Owns the file and batch objects, the stored files and batches with their controls (`BatchState`:
a delay before the lines run, injected batch ends, per-line faults, failing retrieves of ended
batches, output order), and the record of every created batch (`BatchSeen`). No routes, no HTTP:
`openai_batch` serves these and `openai_batch_run` runs a batch's lines. State lives under the
core's lock. It imports only the standard library and modules of this package.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .core import Core
from .wire import RequestError, invalid, new_id

BATCH_OUTCOMES = ("failed", "expired", "cancelled", "queue_full")
"""Batch ends `LocalServer.fail_next_batch` can inject."""
BATCH_LINE_FAULTS = ("400", "413", "500", "503", "batch_expired")
"""Per-line faults `LocalServer.fail_batch_lines` can inject."""
_BATCH_ENDPOINTS = ("/v1/chat/completions",)
TERMINAL = ("completed", "failed", "expired", "cancelled")


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
            if status in TERMINAL and self._retrieve_faults[1]:
                if self._retrieve_faults[0]:
                    self._retrieve_faults[0] -= 1
                else:
                    self._retrieve_faults[1] -= 1
                    return True
        return False
