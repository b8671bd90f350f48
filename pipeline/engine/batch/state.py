"""engine/batch/state.py: the batch driver's durable record in OUT/_batch/, and its chunk files.

    _run.json                 run id (in every batch's metadata), input folder, the job as run
    _token_param ...          what the provider learned (one file a setting, e.g. max_completion_tokens)
    chunk-00001.jsonl         request lines, streamed to disk (deleted once collected)
    chunk-00001.index.jsonl   one line per request: custom_id, the image key, attempt, image facts
    chunk-00001.json          the chunk's record, replaced atomically (tmp, fsync, rename) at each step:
                              written → uploaded (file id) → submitted (batch id) → collecting → collected
    chunk-00001.retry.jsonl   after collection: images to send again (transient failure, did not run)

Every step is recorded before the next begins, so a crash at any point resumes from the record.
Files and records only: no network, no provider.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import JobError
from ...job import Batch, Job, job_summary
from ...sources import is_url
from ...store import BATCH_DIR, OPEN_CHUNK_STATES, json_value, key_hash, write_atomic

__all__ = ["BatchState", "ChunkRecord", "ChunkWriter", "IndexEntry", "read_index", "crash_point", "CRASH_ENV",
           "RUN_FILE"]

RUN_FILE = "_run.json"
CRASH_ENV = "CAPTION_TEST_CRASH_AT"
"""Test seam: `CAPTION_TEST_CRASH_AT=<step>` ends the process with os._exit(137) at that named step
(`writing`, `uploaded`, `created`, `polling`, `collecting`), as a kill -9 would."""


@dataclass(slots=True)
class ChunkRecord:
    """One chunk's durable record (chunk-NNNNN.json)."""

    name: str
    lines: int
    bytes: int
    state: str  # written | uploaded | submitted | collecting | collected
    file_id: str | None = None
    uploaded_at: float | None = None
    batch_id: str | None = None
    status: str | None = None  # the provider's last word
    counts: dict[str, int] | None = None  # request_counts as last seen
    job: str | None = None  # the fingerprint of the job its requests were made for


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One request of a chunk: its custom_id, the image key, which attempt, the row's image facts."""

    custom_id: str
    key: str
    attempts: int
    image: dict[str, Any]  # the row's facts of the item (`item_facts`: sha256, sizes, kept values)


class BatchState:
    """The OUT/_batch folder: run file, chunk records, and the ledger of keys they hold."""

    def __init__(self, folder: Path, run_id: str, fingerprint: str):
        self.folder = folder
        self.run_id = run_id
        self.fingerprint = fingerprint  # the job now running: other jobs' finished chunks do not end its images
        self.records: dict[str, ChunkRecord] = {}
        self.ledger: dict[int, int] = {}  # key hash → -1 live, 0 ended, n > 0 retry after n attempts

    @classmethod
    def open(cls, out: Path, job: Job, input_path: Path | str | None, *, writable: bool = True) -> BatchState:
        """The state of `out`. Writable (the caller holds the out folder's lock): record the run and
        clear what a dead run left half-written; read-only (status): touch nothing."""
        folder = out / BATCH_DIR
        run_file = folder / RUN_FILE
        try:
            run = json.loads(run_file.read_text("utf-8")) if run_file.exists() else {}
        except (OSError, ValueError) as err:
            raise JobError(f"{run_file}: unreadable ({err}); move {folder} aside to start the batch run afresh") \
                from None
        if not run:
            run = {"run_id": secrets.token_hex(6), "created_at": time.time()}
        if writable:
            folder.mkdir(parents=True, exist_ok=True)
            if input_path is not None:
                run["input"] = str(input_path) if is_url(str(input_path)) else str(Path(input_path).resolve())
            run["job"] = job_summary(job)
            write_atomic(run_file, json.dumps(run, indent=2, ensure_ascii=False).encode())
        state = cls(folder, run["run_id"], job.fingerprint)
        state._load(writable)
        other = sorted({r.job for r in state.open_records() if r.job not in (None, job.fingerprint)})
        if writable and other:
            raise JobError(f"{out}: batch chunks of another job ({', '.join(other)}) are still open; collect them "
                           f"with that job (caption batch collect {out} --job ITS_FILE) or cancel them first")
        return state

    def _load(self, writable: bool) -> None:
        for path in sorted(self.folder.glob("chunk-*.json")):
            record = ChunkRecord(**json.loads(path.read_text("utf-8")))
            self.records[record.name] = record
        for path in self.folder.glob("chunk-*.jsonl"):  # written by a run that died before the record
            if writable and path.name.split(".")[0] not in self.records:
                path.unlink()
        for record in self.records.values():
            self.enter_ledger(record)

    def enter_ledger(self, record: ChunkRecord) -> None:
        """Note the keys of a chunk: live while open; once collected, ended or to be sent again."""
        ended = record.state == "collected"
        if ended and record.job not in (None, self.fingerprint):
            return  # another job's answers: this job still has to ask for its own
        for entry in read_index(self.path(record.name, ".index.jsonl")):
            self.ledger[key_hash(entry.key)] = 0 if ended else -1
        if ended:
            for key, attempts in self.retries(record.name):
                self.ledger[key_hash(key)] = attempts

    def retries(self, name: str) -> Iterator[tuple[str, int]]:
        path = self.path(name, ".retry.jsonl")
        if path.exists():
            for line in path.read_text("utf-8").splitlines():
                item = json.loads(line)
                yield item["key"], item["attempts"]

    def write_retries(self, name: str, retries: list[tuple[str, int]]) -> None:
        """Record, atomically, the (key, attempts used) of a collected chunk's images to send again."""
        text = "".join(json.dumps({"key": k, "attempts": a}, ensure_ascii=False) + "\n" for k, a in retries)
        write_atomic(self.path(name, ".retry.jsonl"), text.encode())

    def path(self, name: str, suffix: str) -> Path:
        return self.folder / f"{name}{suffix}"

    def next_name(self) -> str:
        numbers = [int(name.split("-")[1]) for name in self.records]
        return f"chunk-{max(numbers, default=0) + 1:05d}"

    def save(self, record: ChunkRecord) -> None:
        """Replace the chunk's record atomically; the step it names is durable when this returns."""
        self.records[record.name] = record
        write_atomic(self.path(record.name, ".json"), json.dumps(dataclasses.asdict(record)).encode())

    def live_shas(self) -> set[int]:
        """Hashes of the sha256 of every image in a chunk not yet collected (from their index files)."""
        found = set()
        for record in self.open_records():
            path = self.path(record.name, ".index.jsonl")
            if path.exists():
                found.update(key_hash(e.image["image_sha256"]) for e in read_index(path) if e.image.get("image_sha256"))
        return found

    def open_records(self) -> list[ChunkRecord]:
        return [r for r in self.records.values() if r.state in OPEN_CHUNK_STATES]

    def metadata(self, job: Job, name: str) -> dict[str, str]:
        """What every batch carries, so a crashed run can find the batches it created."""
        return {"caption_job": job.fingerprint, "caption_chunk": f"{self.run_id}/{name}"}

    def learned(self) -> dict[str, str]:
        """What the provider learned in earlier runs of this folder (setting → value)."""
        found = {}
        for path in self.folder.glob("_*"):
            name = path.name[1:]
            if path.is_file() and name.isidentifier():
                found[name] = path.read_text("utf-8").strip()
        return found

    def keep_learned(self, learned: dict[str, str]) -> None:
        """Record what the provider learned, so that every later run sends as it does now."""
        for name, value in learned.items():
            path = self.folder / f"_{name}"
            if not path.exists() or path.read_text("utf-8").strip() != value:
                write_atomic(path, value.encode())


def read_index(path: Path) -> Iterator[IndexEntry]:
    """The entries of a chunk's index file."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            item = json.loads(line)
            yield IndexEntry(item["custom_id"], item["key"], item["attempts"], item["image"])


def crash_point(step: str) -> None:
    """The kill -9 test seam (CRASH_ENV); does nothing unless the variable names this step."""
    if os.environ.get(CRASH_ENV) == step:
        os._exit(137)



class ChunkWriter:
    """Streams request lines and their index entries into one chunk's two files."""

    def __init__(self, folder: Path, name: str, settings: Batch):
        self.name = name
        self.lines = 0
        self.bytes = 0
        self._max_lines = settings.max_requests
        self._max_bytes = int(settings.max_file_mb * 1_000_000)
        self._requests = open(folder / f"{name}.jsonl", "wb")
        self._index = open(folder / f"{name}.index.jsonl", "w", encoding="utf-8")

    def fits(self, line: bytes) -> bool:
        """True when the line may join this chunk (a first line always may)."""
        return self.lines == 0 or (self.lines < self._max_lines and self.bytes + len(line) <= self._max_bytes)

    def add(self, line: bytes, entry: IndexEntry) -> None:
        self._requests.write(line)
        self._index.write(json.dumps(dataclasses.asdict(entry), ensure_ascii=False, default=json_value) + "\n")
        self.lines += 1
        self.bytes += len(line)

    def close(self) -> ChunkRecord:
        """Flush and fsync both files; return the record that says they are whole."""
        for handle in (self._requests, self._index):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        return ChunkRecord(self.name, self.lines, self.bytes, "written")
