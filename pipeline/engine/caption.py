"""engine/caption.py: the per-image step, the same for every driver: item → prepared image → request → row.

`Captioner` reads and encodes one source item, asks the provider for its caption (with the one
retry policy, through whatever `send` the driver gives it), and builds the one row the attempt
ends as. It holds no queue, no store, no session and no lock, only the job and the provider, so
it can be pickled and shipped to another process; drivers own the scheduling (queues, limits,
dedupe, shutdown) and the writing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from tenacity import AsyncRetrying

from .. import cost, images
from ..errors import BadImageError, BadOutputError, CaptionError, FatalError, JobError
from ..job import ImageSettings, Job
from ..providers import HttpRequest, Provider
from ..records import ChatResult, Encoded, Result
from ..sources import Item
from ..sources.urls import shown_urls
from . import answers

__all__ = ["Captioner", "Send", "image_facts", "item_facts"]

Send = Callable[[HttpRequest, int], Awaitable[ChatResult]]
"""How a driver sends one request: (request, tokens it counts against a budget) → answer."""


def image_facts(encoded: Encoded | None) -> dict[str, Any]:
    """The row fields that describe the image itself (empty when it never became one)."""
    if encoded is None or encoded.url is not None:  # nothing was read of an image sent as its URL
        return {}
    return {"image_sha256": encoded.sha256, "file_bytes": encoded.file_bytes, "width": encoded.width,
            "height": encoded.height, "sent_width": encoded.sent_width, "sent_height": encoded.sent_height,
            "sent_bytes": encoded.sent_bytes, "dhash": encoded.dhash}


def item_facts(item: Item, encoded: Encoded | None = None) -> dict[str, Any]:
    """The row fields an item's every row carries: `image_facts`, and its keep_columns values
    (`kept`, when the job keeps any), so an ok, error, bad-image or copy row joins back to its input."""
    facts = image_facts(encoded)
    if item.kept:
        facts["kept"] = dict(item.kept)
    return facts


@dataclass(slots=True)
class Captioner:
    """One job's per-image step over one provider (see the module docstring)."""

    job: Job
    provider: Provider
    mode: Literal["online", "batch"] = "online"

    def __post_init__(self) -> None:
        budget, detail = self.job.image.token_budget, self.job.image.detail
        floor = cost.min_image_tokens(cost.image_formula(self.job.endpoint.model), detail)
        if budget is not None and budget < floor:
            raise JobError(f"{self.job.source}: [image] token_budget = {budget} is below the {floor} tokens the "
                           f"smallest image costs for {self.job.endpoint.model} at detail {detail}; raise it")

    def prepare(self, item: Item) -> Encoded:
        """Read and encode one item (CPU-bound: run it off the event loop); raises BadImageError.

        The header is read first (`images.probe_size`), so a file that is not an image is refused
        before it is read whole; the read itself is bounded by the source's size limit.
        """
        if getattr(item, "send_url", False):
            return self._by_url(item)
        try:
            if getattr(item, "read_once", False):  # a download: read it once, probe the bytes
                data = item.read()
                width, height = images.probe_size(io.BytesIO(data))
            else:
                with item.open() as handle:
                    width, height = images.probe_size(handle)
                data = item.read()
        except OSError as err:
            raise BadImageError(f"cannot read file: {err.strerror or err}") from None
        settings = self.provider.image_settings(self._sized(width, height))  # within the protocol's per-image limits
        while True:
            encoded = images.encode_image(data, settings, dhash=self.job.dedupe.near)
            smaller = self.provider.image_settings(settings, encoded)  # the same: it fits; else encode again
            if smaller == settings:
                return encoded
            settings = smaller

    def _by_url(self, item: Item) -> Encoded:
        """An image sent as its URL ([input] send = "url"): nothing is read; its size is not known, so
        it counts as the largest image the job sends (`max_side` square) against a token budget."""
        side = self._sized(self.job.image.max_side, self.job.image.max_side).max_side
        return Encoded(sha256="", file_bytes=0, width=0, height=0, sent_width=side, sent_height=side, mime="",
                       data=b"", url=getattr(item, "url"))

    def _sized(self, width: int, height: int) -> ImageSettings:
        """The job's image settings for a `width` × `height` image: `max_side` capped at what the
        model keeps and at the job's token budget (`cost.sent_side`)."""
        image = self.job.image
        side = cost.sent_side(cost.image_formula(self.job.endpoint.model), image.detail, width, height,
                              image.max_side, image.token_budget)
        return image if side >= image.max_side else dataclasses.replace(image, max_side=side)

    async def caption(self, key: str, encoded: Encoded, send: Send, retrying: AsyncRetrying,
                      facts: dict[str, Any] | None = None) -> Result:
        """Ask for one image's caption, retrying as `retrying` says; return the row it ends as.

        `facts`: the row fields of the item (`item_facts`; default: `image_facts(encoded)`).
        Raises FatalError (no other image will fare better), and whatever `send` raises that is
        not a CaptionError (a driver's signal that the run is stopping).
        """
        facts = image_facts(encoded) if facts is None else facts
        tokens = self.provider.request_tokens(encoded)
        attempts, latency_s = 0, 0.0
        try:
            async for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    started = time.monotonic()
                    chat = await self._attempt(encoded, tokens, send)
                    latency_s = time.monotonic() - started
                    fields = answers.check_answer(self.job, chat)
        except FatalError:
            raise
        except BadOutputError as err:
            if err.answer is None:
                return self.error_row(key, facts, err, attempts=attempts)
            # every attempt was suspect (too short): keep the last answer, flagged
            return self.ok_row(key, facts, err.answer, answers.parse_fields(self.job, err.answer),
                               attempts=attempts, latency_s=latency_s)
        except CaptionError as err:
            return self.error_row(key, facts, err, attempts=attempts)
        return self.ok_row(key, facts, chat, fields, attempts=attempts, latency_s=latency_s)

    async def _attempt(self, encoded: Encoded, tokens: int, send: Send) -> ChatResult:
        """One attempt; a request the server refused for a reason the provider learns from
        (a renamed parameter, a flex tier with no room when the job falls back) is built again and
        resent at once, within the same attempt. No await between `learn` and `build_request`."""
        while True:
            request = self.provider.build_request(encoded, stream=self.job.endpoint.stream)
            try:
                return await send(request, tokens)
            except CaptionError as err:
                if isinstance(err, FatalError) or not self.provider.learn(err, request):
                    raise

    # --- rows ------------------------------------------------------------------------------

    def _row(self, key: str, facts: dict[str, Any], **fields: Any) -> Result:
        return Result(image_path=key, job_fingerprint=self.job.fingerprint, created_at=dt.datetime.now(dt.UTC),
                      mode=self.mode, **facts, **fields)

    def ok_row(self, key: str, facts: dict[str, Any], chat: ChatResult, fields: str | None, *, attempts: int,
               latency_s: float | None = None, request_id: str | None = None) -> Result:
        """The row of an answer that arrived and passed the job's checks."""
        answer = answers.answer_fields(self.job, chat, facts.get("sent_width") or 0, facts.get("sent_height") or 0,
                                       fields)
        return self._row(key, facts, **answer, status="ok", attempts=attempts,
                         latency_ms=None if latency_s is None else round(latency_s * 1000),
                         request_id=chat.request_id or request_id)

    def answer_row(self, key: str, facts: dict[str, Any], chat: ChatResult, *, attempts: int,
                   request_id: str | None = None) -> Result:
        """The row of an answer that is not asked for again: ok, or bad_output when it fails the checks."""
        try:
            fields = answers.parse_fields(self.job, chat)
        except BadOutputError as bad:
            return self.error_row(key, facts, bad, attempts=attempts, request_id=chat.request_id or request_id)
        return self.ok_row(key, facts, chat, fields, attempts=attempts, request_id=request_id)

    def error_row(self, key: str, facts: dict[str, Any], err: CaptionError, *, attempts: int,
                  request_id: str | None = None) -> Result:
        """The row of an image whose attempts ended in `err` (what an unusable answer was billed, kept).

        URLs in the message lose their query string: a provider that could not fetch a signed image
        URL (`send = "url"`) names it whole, credential and all."""
        return self._row(key, facts, **answers.billed_fields(err), status="error", model=self.job.endpoint.model,
                         error_kind=err.kind, error=shown_urls(str(err)), attempts=attempts,
                         request_id=err.request_id or request_id)

    def dedup_row(self, key: str, facts: dict[str, Any], original: Result | dict[str, Any],
                  distance: int | None = None) -> Result:
        """The row of a copy of an image already captioned: its caption, zero tokens, `dedup_of`, and
        for a near copy `dedup_distance` (bits of the dHash that differ; None for identical bytes)."""
        get = original.get if isinstance(original, dict) else lambda name: getattr(original, name)
        return self._row(key, facts, status="ok", model=get("model"), caption=get("caption"),
                         finish_reason=get("finish_reason"), fields=get("fields"),
                         flags=answers.quality_flags(self.job, get("caption") or "", get("finish_reason")),
                         prompt_tokens=0, completion_tokens=0, total_tokens=0, dedup_of=get("image_path"),
                         dedup_distance=distance)
