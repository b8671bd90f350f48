"""records.py: the small frozen values that flow between stages.

A seam module, like `errors`: stages import these, never one another. No I/O here.
`Result` maps field by field onto `store.SCHEMA` (a test asserts that they match).
"""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["Source", "Encoded", "Usage", "ChatResult", "RateInfo", "Result"]


@dataclass(frozen=True, slots=True)
class Source:
    """One image file found by the walker."""

    path: Path  # where to read it (absolute or relative to the working directory)
    key: str  # path relative to the input root, POSIX form: the resume key


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


@dataclass(frozen=True, slots=True)
class ChatResult:
    """What one successful chat completion gave us."""

    text: str
    model: str  # as the server named it
    finish_reason: str | None
    usage: Usage | None  # None when the server sent no usage
    request_id: str | None


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
    model: str | None = None
    caption: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    mode: Literal["online", "batch"] = "online"
    usage_source: Literal["reported", "estimated"] | None = None
    error_kind: str | None = None
    error: str | None = None
    attempts: int = 0
    latency_ms: int | None = None
    request_id: str | None = None
    dedup_of: str | None = None  # for a copy of an image already sent: the image_path that was sent
    fields: str | None = None  # structured jobs: the answer's JSON object, checked against the schema
    flags: tuple[str, ...] | None = None  # quality flags: "over_max_chars", "length" (cut by max_tokens)
