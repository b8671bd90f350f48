"""providers/base.py: the two interfaces a provider implements, and the values they exchange.

A provider is one wire protocol (OpenAI chat completions today; Anthropic Messages and Gemini
next). `Provider` turns one prepared image into an HTTP request and the server's answer back into
a `ChatResult` or a typed error; `BatchBackend` does the same for the provider's Batch API. Both
are pure about policy: they never retry, sleep, count or write rows. That is the engine's job.
`Provider` does no I/O at all (the engine's transport sends what it builds); `BatchBackend` does
its own HTTP, since Files/Batches calls differ per provider, but decides nothing.

A provider's objects hold only plain values (job, base URL, key, headers, what it learned), so the
per-image step that holds one can be pickled and shipped to another process.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import CaptionError
from ..job import ImageSettings
from ..records import ChatResult, Encoded, RateInfo

__all__ = ["HttpRequest", "StreamParser", "Provider", "BatchInfo", "LineResult", "BatchBackend"]


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One request, ready for the transport: where, with which headers, what JSON."""

    url: str  # absolute
    headers: dict[str, str]  # auth included: never log or store these
    body: dict[str, Any]
    stream: bool  # the answer is an event stream when the server honours it


class StreamParser(Protocol):
    """Folds a streamed answer's bytes, chunk by chunk, into one result."""

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the stream; raise the typed error an error event means."""

    def result(self) -> ChatResult:
        """The whole answer once the stream ended; raise TransientError when it ended badly."""


class Provider(Protocol):
    """One protocol's request and answer formats for one run (see the module docstring)."""

    name: str  # "openai", ...

    def build_request(self, image: Encoded, *, stream: bool) -> HttpRequest:
        """The request that captions `image` (prompt, generation settings, what was learned)."""

    def parse_body(self, body: bytes, headers: Mapping[str, str]) -> ChatResult:
        """A whole (non-streamed) successful answer; raises TransientError/BadOutputError."""

    def stream_parser(self, headers: Mapping[str, str]) -> StreamParser:
        """A parser for a streamed successful answer."""

    def classify(self, status: int, headers: Mapping[str, str], body: bytes) -> CaptionError | None:
        """The typed error an HTTP answer means, or None when it is a success to parse."""

    def rate_info(self, headers: Mapping[str, str]) -> RateInfo | None:
        """The rate-limit counts a response's headers carry, or None."""

    def request_tokens(self, image: Encoded) -> int:
        """What one request counts against a tokens-per-minute budget before it is sent."""

    def image_settings(self, settings: ImageSettings, encoded: Encoded | None = None) -> ImageSettings:
        """The settings to encode an image with, within the protocol's per-image limits.

        Called first without `encoded` (cap the job's settings, e.g. the longest side a protocol
        accepts), then with each encoding made: settings equal to `settings` mean it fits; other
        (smaller) settings mean encode again with those. Must reach a fixed point.
        """

    def learn(self, err: CaptionError, sent: HttpRequest | None = None) -> bool:
        """Adapt to an error the server explained (e.g. a renamed parameter).

        True when the request that failed (`sent`, or a batch line when None) is worth sending
        again at once, as `build_request` now builds it.
        """

    def learned(self) -> dict[str, str]:
        """What `learn` changed, to be kept across runs (name → value); empty when nothing."""

    def adopt(self, learned: Mapping[str, str]) -> None:
        """Take back what an earlier run learned (the values `learned` returned)."""


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """A provider's batch as the driver needs it, whatever the provider calls its fields."""

    id: str
    status: str  # the provider's own word, for people ("in_progress", "ended", ...)
    ended: bool  # no more results will come
    counts: dict[str, int] | None = None  # total / completed / failed, as far as known
    result_files: tuple[str, ...] = ()  # what to download once ended (ids, names or URLs)
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: float | None = None  # Unix seconds
    failure: CaptionError | None = None  # the batch as a whole failed: why (resending fails alike)
    queue_full: bool = False  # it failed only because the provider's queue was full: wait, then resend
    ran_nothing: bool = False  # ended without running any request (failed validation): resend all


@dataclass(frozen=True, slots=True)
class LineResult:
    """What one result line says about one request, before any policy (retry or row) is applied."""

    custom_id: str
    chat: ChatResult | None = None  # the answer, when the request succeeded
    error: CaptionError | None = None  # the typed failure, when it did not
    ran: bool = True  # False: the request never ran (the batch expired or was cancelled first)
    request_id: str | None = None


class BatchBackend(Protocol):
    """One provider's Files/Batches API over the run's HTTP session."""

    def custom_id(self, key: str) -> str:
        """The custom_id a request for image `key` goes under (the chunk's index records the map back)."""

    def request_line(self, custom_id: str, image: Encoded) -> bytes:
        """One input line (newline included) asking for `image`'s caption under `custom_id`."""

    async def upload(self, path: Path) -> str:
        """Upload a chunk file of request lines; return what `submit` takes to name it."""

    async def submit(self, file_ref: str, metadata: dict[str, str], window: str) -> BatchInfo:
        """Create the batch of an uploaded file; `metadata` is how a crashed run finds it again."""

    async def poll(self, batch_id: str) -> BatchInfo:
        """The batch's current state; FatalError with status 404 when the provider lost it."""

    async def find(self, metadata: dict[str, str], since: float | None, file_ref: str | None = None
                   ) -> BatchInfo | None:
        """A batch created with (at least) this metadata, created after `since`; None if none.

        `file_ref` is what `upload` returned for the chunk: a provider whose batches carry no
        metadata matches on what it can learn from it instead.
        """

    async def cancel(self, batch_id: str) -> BatchInfo:
        """Ask the provider to cancel a live batch."""

    async def download(self, file_ref: str, dest: Path) -> None:
        """Stream one result file to `dest`."""

    def parse_result_line(self, raw: bytes) -> LineResult | None:
        """One result line as a LineResult; None for a line that names no request."""
