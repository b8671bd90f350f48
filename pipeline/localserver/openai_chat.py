"""openai_chat.py: the OpenAI chat-completions protocol of the bundled endpoint.

Owns `POST /v1/chat/completions` (streaming with `stream_options.include_usage`, and not) and
`GET /v1/models`: the completion object and its usage, structured answers for `response_format`,
the streamed chunks and their event-stream framing, the shapes the faults give an answer, and the
`Observed` record of every chat request. `OpenAIChat.add_routes` joins it to the app; the batch
protocol reuses `complete` to answer its lines the same way.

It must not share protocol code with the client side (no payload builder, no SSE reader or writer
in common with `pipeline`): a bug shared by both sides would pass every test and still fail
against real servers. Latency, limits, faults and observations go through the shared `Core`;
request checks live in `openai_request`. It imports only aiohttp, the standard library and modules
of this package.

Protocol sources:
- chat.completion and chat.completion.chunk objects, `stream_options.include_usage` (a last chunk
  with `choices: []` and the usage, other chunks with `usage: null`), `data: [DONE]`:
  https://platform.openai.com/docs/api-reference/chat/object and
  https://platform.openai.com/docs/api-reference/chat/streaming
- structured outputs (`response_format` json_schema and json_object):
  https://platform.openai.com/docs/guides/structured-outputs
- `service_tier`: the answer (and every chunk) names the tier it was served at, "default" for a request
  that asked for "auto", "default" or nothing: https://platform.openai.com/docs/api-reference/chat/object
  and https://platform.openai.com/docs/guides/flex-processing
- event-stream framing (`data: ...` lines, a blank line ends an event):
  https://html.spec.whatwg.org/multipage/server-sent-events.html
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .core import Core, Observed, auth_error
from .limits import CONTENT_FAULTS, STREAM_ERROR, fault_response, go_silent
from .openai_request import (
    REASONING_PREFIX,
    Fields,
    Picture,
    checked_pictures,
    output_cap,
    read_fields,
    text_tokens,
)
from .pixels import image_facts, value_for
from .wire import MODEL_ID, RequestError, error_body, json_response, new_id, parse_json, request_headers

log = logging.getLogger(__name__)

REASONING_TOKENS = 16  # hidden reasoning tokens a reasoning model reports per answer
SYSTEM_FINGERPRINT = "fp_localcaption"
WORDS_PER_DELTA = 3  # words per streamed content delta


# ---------------------------------------------------------------------------------------------
# Answers: the completion and its wire forms. Pure.


@dataclass(frozen=True, slots=True)
class Completion:
    """The answer to one request, before it is written as JSON or as a stream."""

    id: str
    created: int  # Unix seconds
    model: str
    content: str
    finish_reason: str | None
    usage: dict[str, Any] | None
    service_tier: str = "default"  # the tier the answer is served at

    def as_object(self) -> dict[str, Any]:
        """The chat.completion object (API reference, "The chat completion object")."""
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.content, "refusal": None},
                    "logprobs": None,
                    "finish_reason": self.finish_reason,
                }
            ],
            "service_tier": self.service_tier,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if self.usage is not None:
            body["usage"] = self.usage
        return body

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None, *, usage_key: bool) -> dict[str, Any]:
        """One chat.completion.chunk; with include_usage, every chunk but the last says usage: null."""
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "service_tier": self.service_tier,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if usage_key:
            body["usage"] = None
        return body

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk when include_usage is set: no choices, the usage of the whole request."""
        body = self.chunk({}, usage_key=False)
        body["choices"] = []
        body["usage"] = self.usage
        return body


def answer_text(response_format: Any, size: tuple[int, int], thumb: Any) -> str:
    """The answer's content: the caption, or a JSON document when `response_format` asks for one.

    json_schema: an object built from the schema (pixels.value_for); json_object: a fixed object.
    """
    facts = image_facts(size, thumb)
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") or {}
        return json.dumps(value_for(schema, facts), ensure_ascii=False)
    if kind == "json_object":
        return json.dumps({"caption": facts["caption"], "colours": facts["colours"], "bright": facts["bright"]},
                          ensure_ascii=False)
    return facts["caption"]


def compose(fields: Fields, caption: str, prompt_tokens: int, fault: str | None) -> Completion:
    """Return the completion for a valid request, shaped by the content faults."""
    model = fields.model or MODEL_ID
    reasoning = REASONING_TOKENS if model.startswith(REASONING_PREFIX) else 0
    cap = output_cap(fields)
    text = CONTENT_FAULTS.get(fault, caption)
    finish: str | None = "stop"
    if cap is not None and text_tokens(len(text)) > cap - reasoning:
        text = text[: max(0, 4 * (cap - reasoning))]  # reasoning tokens spend the budget first
        finish = "length"
    completion_tokens = text_tokens(len(text)) + reasoning
    usage: dict[str, Any] | None = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }
    if fault in ("no_usage", "no_finish"):
        usage = None
    if fault == "no_finish":
        finish = None
    tier = fields.service_tier if fields.service_tier in ("flex", "priority") else "default"
    return Completion(new_id("chatcmpl-"), int(time.time()), model, text, finish, usage, tier)


def complete(fields: Fields, picture: Picture, prompt_tokens: int, fault: str | None = None) -> Completion:
    """The completion answering a checked request whose first image is `picture`."""
    caption = answer_text(fields.response_format, picture.size, picture.thumb)
    return compose(fields, caption, prompt_tokens, fault)


def _split_words(text: str) -> list[str]:
    """Cut text into pieces of a few words each; the pieces join back to exactly `text`."""
    words = [w for w in re.split(r"(?<=\s)(?=\S)", text) if w]
    return ["".join(words[i : i + WORDS_PER_DELTA]) for i in range(0, len(words), WORDS_PER_DELTA)]


def _sse(payload: Any) -> bytes:
    """Frame one event: `data: <json>` and a blank line."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _stream_events(completion: Completion, fault: str | None, include_usage: bool) -> list[bytes]:
    """Return the events after the first chunk, in order, shaped by the stream faults."""
    pieces = _split_words(completion.content)
    if fault == "malformed":
        return [b"data: {not json\n\n", b"data: [DONE]\n\n"]
    if fault == "stream_error":
        pieces = pieces[: max(1, len(pieces) // 2)]
    events = [_sse(completion.chunk({"content": piece}, usage_key=include_usage)) for piece in pieces]
    if fault == "stream_error":
        return [*events, _sse(STREAM_ERROR), b"data: [DONE]\n\n"]
    if completion.finish_reason is not None:
        events.append(_sse(completion.chunk({}, completion.finish_reason, usage_key=include_usage)))
    if include_usage and completion.usage is not None:
        events.append(_sse(completion.usage_chunk()))
    if fault != "no_done":
        events.append(b"data: [DONE]\n\n")
    return events


async def _send_truncated(request: web.Request, completion: Completion,
                          headers: dict[str, str]) -> web.StreamResponse:
    """The "no_done" fault without streaming: promise the whole body, send half of it, close."""
    body = json.dumps(completion.as_object(), ensure_ascii=False, separators=(",", ":")).encode()
    response = web.StreamResponse(status=200, headers=headers)
    response.content_type = "application/json"
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    return await go_silent(request, drop=True)


# ---------------------------------------------------------------------------------------------
# The handlers.


@dataclass(slots=True)
class _Exchange:
    """What the server learned about one chat request so far."""

    arrival: float
    request_id: str
    fields: Fields
    authorized: bool
    picture: Picture | None = None  # the first image, once decoded


class OpenAIChat:
    """The chat-completions and models routes, answering through the shared core."""

    def __init__(self, core: Core):
        self._core = core

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._handle_chat)
        app.router.add_get("/v1/models", self._handle_models)

    async def _handle_models(self, request: web.Request) -> web.Response:
        headers = request_headers()
        refusal = self._core.refuse(request, headers)
        if refusal is not None:
            return refusal
        model = {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "caption"}
        return json_response(200, {"object": "list", "data": [model]}, headers)

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        core, arrival, request_id = self._core, time.monotonic(), new_id("req_")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            exchange = _Exchange(arrival, request_id, Fields(), core.authorized(request))
            error = error_body("Request too large", "invalid_request_error", code="request_too_large")
            return self._reply_now(exchange, json_response(413, error, {"x-request-id": request_id}))
        payload = parse_json(raw)
        exchange = _Exchange(arrival, request_id, read_fields(payload), core.authorized(request))
        if not exchange.authorized:
            return self._reply_now(exchange, json_response(401, auth_error(request), {"x-request-id": request_id}))
        if not core.enter():
            return self._reply_now(exchange, core.concurrency_refusal(request_id), "concurrency")
        task = asyncio.current_task()
        if task is not None:
            core.tasks.add(task)
        try:
            return await self._serve_admitted(request, exchange, payload)
        finally:
            core.in_flight -= 1
            core.tasks.discard(task)

    async def _serve_admitted(self, request: web.Request, exchange: _Exchange, payload: Any) -> web.StreamResponse:
        """Validate, decode, apply limits and faults, then answer.

        The TPM cost is the prompt plus the output budget, as OpenAI counts it (rate-limits guide);
        a request without max_tokens or max_completion_tokens is charged its prompt only.
        """
        headers = {"x-request-id": exchange.request_id}
        try:
            pictures, prompt_tokens = await checked_pictures(payload, self._core.pool)
        except RequestError as err:
            return self._reply_now(exchange, json_response(err.status, err.body(), headers))
        image_tokens = sum(picture.tokens for picture in pictures)
        prompt_tokens += self._core.count_image_tokens(image_tokens) - image_tokens  # the server's own rule
        exchange.picture = pictures[0]
        fields = exchange.fields
        verdict = self._core.admit(prompt_tokens + (output_cap(fields) or 0), fields.model or MODEL_ID)
        headers.update(verdict.headers)
        if verdict.limit is not None:
            return self._reply_now(exchange, json_response(429, verdict.body, headers), verdict.limit)
        fault, retry_after_s = self._core.pop_fault()
        completion = complete(fields, pictures[0], prompt_tokens, fault)
        return await self._answer(request, exchange, completion, fault, retry_after_s, headers)

    async def _answer(self, request: web.Request, exchange: _Exchange, completion: Completion,
                      fault: str | None, retry_after_s: float | None, headers: dict[str, str]) -> web.StreamResponse:
        """Record the request, wait the drawn latency, then send the answer the fault calls for."""
        fields = exchange.fields
        silent = fault in ("drop", "hang") and not fields.stream  # no status line at all
        response = fault_response(fault, fields.model, fields.stream, retry_after_s, headers)
        if response is None and not fields.stream and not silent:
            response = json_response(200, completion.as_object(), headers)
        if silent:
            status = 0
        else:
            status = response.status if response is not None else 200  # None: a stream, always 200
        self._observe(exchange, status, fault)
        await asyncio.sleep(self._core.draw_latency())
        if silent:
            return await go_silent(request, fault == "drop")
        if fault == "no_done" and not fields.stream:
            return await _send_truncated(request, completion, headers)
        if response is not None:
            return response
        include_usage = fields.include_usage and fault not in ("no_usage", "no_finish")
        return await self._send_stream(request, completion, fault, include_usage, headers)

    async def _send_stream(self, request: web.Request, completion: Completion, fault: str | None,
                           include_usage: bool, headers: dict[str, str]) -> web.StreamResponse:
        """Write the answer as server-sent events, one write per event."""
        response = web.StreamResponse(status=200, headers={**headers, "Cache-Control": "no-cache"})
        response.content_type = "text/event-stream"
        await response.prepare(request)
        first = completion.chunk({"role": "assistant", "content": "", "refusal": None}, usage_key=include_usage)
        await response.write(_sse(first))
        if fault in ("drop", "hang"):
            return await go_silent(request, fault == "drop")
        for event in _stream_events(completion, fault, include_usage):
            await response.write(event)
        await response.write_eof()
        return response

    def _reply_now(self, exchange: _Exchange, response: web.Response, fault: str | None = None) -> web.Response:
        self._observe(exchange, response.status, fault)
        return response

    def _observe(self, exchange: _Exchange, status: int, fault: str | None) -> None:
        """Record one chat request as an Observed value."""
        fields, picture = exchange.fields, exchange.picture
        self._core.observe(Observed(
            t=exchange.arrival,
            status=status,
            fault=fault,
            model=fields.model,
            stream=fields.stream,
            body_keys=fields.body_keys,
            max_tokens=fields.max_tokens,
            max_completion_tokens=fields.max_completion_tokens,
            temperature=fields.temperature,
            detail=fields.detail,
            image_mime=fields.image_mime,
            image_size=picture.size if picture else None,
            thumb=picture.thumb if picture else None,
            authorized=exchange.authorized,
        ))
        if fault is not None:
            log.debug("answered %s to %s (fault %s)", status, exchange.request_id, fault)
