"""records.py: the small frozen values that flow between stages.

A seam module, like `errors`: stages import these, never one another. No I/O here.
`Result` maps field by field onto `store.SCHEMA` (a test asserts that they match), except `kept`:
the values of the job's `[input] keep_columns`, which the store writes as extra columns.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["Encoded", "Usage", "ChatResult", "RateInfo", "Result", "RunSummary", "BatchSummary"]


@dataclass(frozen=True, slots=True)
class Encoded:
    """An image ready to send: shrunk, re-encoded, with what we learned about the original."""

    sha256: str  # hex digest of the original file's bytes
    file_bytes: int  # size of the original file
    width: int  # original size after EXIF orientation, pixels
    height: int
    sent_width: int  # size of the image we send, pixels
    sent_height: int
    mime: str  # "image/jpeg" | "image/webp" | "image/png"
    data: bytes  # the encoded image we send
    dhash: int | None = None  # difference hash of the sent pixels, as a signed int64; only for near dedupe
    url: str | None = None  # [input] send = "url": the provider fetches this; nothing was read (`data` is empty)

    @property
    def sent_bytes(self) -> int:
        return len(self.data)

    def data_url(self) -> str:
        """Return the `data:<mime>;base64,...` URL that goes in an image_url part."""
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one request, as the server reported them or as we estimated them."""

    prompt_tokens: int
    completion_tokens: int  # includes reasoning tokens, which are billed as output
    total_tokens: int
    cached_tokens: int | None = None  # prompt_tokens_details.cached_tokens, None if not said
    reasoning_tokens: int | None = None  # completion_tokens_details.reasoning_tokens
    source: Literal["reported", "estimated"] = "reported"
    cache_write_tokens: int | None = None  # prompt tokens written to the cache (Anthropic), inside prompt_tokens


@dataclass(frozen=True, slots=True)
class ChatResult:
    """What one successful chat completion gave us."""

    text: str
    model: str  # as the server named it
    finish_reason: str | None
    usage: Usage | None  # None when the server sent no usage, or none worth believing
    request_id: str | None
    usage_rejected: bool = False  # the server sent usage, but not believable counts (negative, 10**15, ...)
    service_tier: str | None = None  # the tier the server says it answered at (OpenAI "flex", "default"), if said


@dataclass(frozen=True, slots=True)
class RateInfo:
    """What a response's `x-ratelimit-*` headers said; None where a header was absent."""

    limit_requests: int | None = None  # requests per minute
    remaining_requests: int | None = None
    limit_tokens: int | None = None  # tokens per minute
    remaining_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Result:
    """One ended attempt at one image: exactly one Parquet row."""

    image_path: str
    status: Literal["ok", "error"]
    job_fingerprint: str
    created_at: dt.datetime  # UTC
    image_sha256: str | None = None
    file_bytes: int | None = None
    width: int | None = None
    height: int | None = None
    sent_width: int | None = None
    sent_height: int | None = None
    sent_bytes: int | None = None
    dhash: int | None = None  # near dedupe: the sent image's difference hash (64 bits as a signed int64)
    model: str | None = None
    caption: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None  # prompt tokens written to the provider's cache (billed above input)
    reasoning_tokens: int | None = None
    mode: Literal["online", "batch"] = "online"
    service_tier: str | None = None  # the tier the answer was served at, as the server said (OpenAI "flex")
    usage_source: Literal["reported", "estimated"] | None = None
    error_kind: str | None = None
    error: str | None = None
    attempts: int = 0
    latency_ms: int | None = None
    request_id: str | None = None
    dedup_of: str | None = None  # for a copy of an image already sent: the image_path that was sent
    dedup_distance: int | None = None  # near copies: bits its dhash differs from the original's (exact: None)
    fields: str | None = None  # structured jobs: the answer's JSON object, checked against the schema
    flags: tuple[str, ...] | None = None  # quality flags: "over_max_chars", "under_min_chars", "length", "usage_rejected"
    kept: Mapping[str, Any] = field(default_factory=dict)  # [input] keep_columns values: extra columns, not SCHEMA's


MAX_NAMED_FAILURES = 10
"""A run's summary names this many of the images that failed (the rest are counted, not kept)."""


@dataclass(slots=True)
class RunSummary:
    """What a run did; the CLI prints it and turns it into an exit code."""

    out: Path
    ok: int = 0
    errors: int = 0
    skipped: int = 0  # already ok in the out folder
    retries: int = 0
    rate_limited: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    fatal: str | None = None  # the provider's message when a fatal error stopped the run
    interrupted: bool = False
    error_kinds: dict[str, int] = field(default_factory=dict)
    dedup_copies: int = 0  # ok rows that copied an identical file's answer (no request, no tokens)
    near_copies: int = 0  # ...of which copied a near-identical picture's answer ([dedupe] near)
    failed: list[str] = field(default_factory=list)  # the first MAX_NAMED_FAILURES images that ended as errors
    skipped_files: dict[str, int] = field(default_factory=dict)  # passed over by the walk, by reason (not images, ...)

    @property
    def exit_code(self) -> int:
        """0 all ok, 1 some error rows, 3 stopped by a fatal provider error, 130 interrupted."""
        if self.fatal:
            return 3
        if self.interrupted:
            return 130
        return 1 if self.errors else 0

    def count(self, row: Result) -> None:
        """Add one written row to the totals (every driver counts its rows through this)."""
        if row.status == "ok":
            self.ok += 1
            self.prompt_tokens += row.prompt_tokens or 0
            self.completion_tokens += row.completion_tokens or 0
            self.dedup_copies += row.dedup_of is not None
            self.near_copies += row.dedup_distance is not None
        else:
            self.errors += 1
            self.error_kinds[row.error_kind] = self.error_kinds.get(row.error_kind, 0) + 1
            if len(self.failed) < MAX_NAMED_FAILURES:
                self.failed.append(row.image_path)


@dataclass(slots=True)
class BatchSummary(RunSummary):
    """A batch run's summary: a run's, plus what is still with the provider."""

    live_batches: int = 0
    submitted: int = 0  # batches created by this invocation
    detached: bool = False
    refused: int = 0  # ingest: lines naming a request that was not prepared (or no safe image path)
    unreadable: int = 0  # ingest: lines that are not a result line at all (not JSON, no custom_id)

    @property
    def exit_code(self) -> int:
        """As online: a detached run that submitted and recorded its work exits 0, or 1 when it wrote
        error rows (bad images, or the error rows of a batch it collected)."""
        return RunSummary.exit_code.fget(self)
