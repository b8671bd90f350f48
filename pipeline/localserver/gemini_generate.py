"""gemini_generate.py: the Gemini API's generateContent protocol of the bundled endpoint.

Owns `POST /v1beta/models/{model}:generateContent` and `:streamGenerateContent` (`?alt=sse`): the
checks Gemini makes (`x-goog-api-key`, or `?key=`, when the server has a key; `contents[].parts[]`
of text and `inline_data` that decodes to its declared type; `generationConfig` fields of the right
type), the GenerateContentResponse with its `usageMetadata` (images counted by Gemini's rule), the
stream of response chunks, and Gemini's error bodies (`{"error": {"code", "message", "status",
"details"}}`) for faults and limits. Gemini sends no rate-limit headers: a limit's 429 says what
was hit in a `google.rpc.QuotaFailure` and when to come back in a `google.rpc.RetryInfo`.
`check_request` and `compose` also answer the lines of a batch.

The existing controls drive it: latency, `rate_limit` (each limit's 429 names its per-minute or
per-second quota, with its value and the bucket's wait as `retryDelay`), and `fail_next`, whose
faults take Gemini's shapes (FAULT_STATUS: "503" is 503 UNAVAILABLE, "401" the 400 API_KEY_INVALID,
"429_quota" a per-day QuotaFailure, "stream_error" an error chunk mid-stream). A model named
`local-finish-<reason>` (e.g. `local-finish-safety`) ends with that finishReason and no text.

It must not share protocol code with the client side (`pipeline.providers`). It imports only
aiohttp, Pillow, the standard library and modules of this package.

Protocol sources:
- generateContent, streamGenerateContent, GenerateContentResponse, usageMetadata, finishReason:
  https://ai.google.dev/api/generate-content
- Image understanding (inline_data, supported MIME types): https://ai.google.dev/gemini-api/docs/image-understanding
- Image tokens (258 when both sides are at most 384 px, else 258 a 768 × 768 tile):
  https://ai.google.dev/gemini-api/docs/tokens
- Errors (status names and codes): https://ai.google.dev/gemini-api/docs/troubleshooting; error
  details (RetryInfo, QuotaFailure, ErrorInfo): https://cloud.google.com/apis/design/errors#error_details
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import math
import re
import time
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web
from PIL import Image

from .core import Core, Observed
from .limits import CONTENT_FAULTS, NGINX_502, go_silent
from .pixels import image_facts, make_thumb, value_for
from .wire import json_response, new_id, parse_json

MIME_TYPES = {"image/jpeg": ("JPEG", "MPO"), "image/png": ("PNG",), "image/webp": ("WEBP",),
              "image/heic": ("HEIF",), "image/heif": ("HEIF",)}
MAX_REQUEST_BYTES = 20 * 2**20  # inline data needs the whole request under 20 MB (Image understanding docs)
SMALL_PX, TILE_PX, TOKENS_PER_TILE = 384, 768, 258
FINISH_PREFIX = "local-finish-"
WORDS_PER_CHUNK = 3
HELP_URL = "https://ai.google.dev/gemini-api/docs/troubleshooting"
RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
# fail_next's faults in Gemini's shapes: status, google.rpc code name, message
FAULT_STATUS: dict[str, tuple[int, str, str]] = {
    "500": (500, "INTERNAL", f"An internal error has occurred. Please retry or report in {HELP_URL}"),
    "502": (502, "UNAVAILABLE", "Bad gateway"),
    "503": (503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
    "504": (504, "DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
    "408": (504, "DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
    "400": (400, "INVALID_ARGUMENT", "Unable to process input image. Please retry or report in " + HELP_URL),
    "413": (400, "INVALID_ARGUMENT", f"Request payload size exceeds the limit: {MAX_REQUEST_BYTES} bytes."),
    "422": (400, "INVALID_ARGUMENT", "Invalid JSON payload received."),
    "401": (400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key."),
    "403_quota": (400, "FAILED_PRECONDITION", "Gemini API free tier is not available in your country. "
                  "Please enable billing on your project in Google AI Studio."),
    "429_quota": (429, "RESOURCE_EXHAUSTED", "You exceeded your current quota, please check your plan and "
                  "billing details."),
    "429": (429, "RESOURCE_EXHAUSTED", "You exceeded your current quota, please check your plan and billing "
            "details."),
}
LIMIT_QUOTAS = {"rpm": ("GenerateRequestsPerMinutePerProjectPerModel", "requests"),
                "tpm": ("GenerateContentInputTokensPerModelPerMinute", "tokens"),
                "rps": ("GenerateRequestsPerSecondPerProjectPerModel", "requests"),
                "tps": ("GenerateContentInputTokensPerModelPerSecond", "tokens"),
                "penalty": ("GenerateRequestsPerMinutePerProjectPerModel", "requests")}
"""The core's limit that refused a request → the quotaId its QuotaFailure names."""


def error_object(code: int, status: str, message: str, details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Gemini's error body."""
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return {"error": error}


def retry_info(wait_s: float) -> dict[str, Any]:
    """google.rpc.RetryInfo with a protobuf Duration ("13s")."""
    return {"@type": RETRY_INFO, "retryDelay": f"{max(0, math.ceil(wait_s))}s"}


def quota_failure(quota_id: str, value: int | None, model: str) -> dict[str, Any]:
    violation = {"quotaMetric": "generativelanguage.googleapis.com/generate_content_requests", "quotaId": quota_id,
                 "quotaDimensions": {"location": "global", "model": model}}
    if value is not None:
        violation["quotaValue"] = str(value)
    return {"@type": QUOTA_FAILURE, "violations": [violation]}


class RequestError(Exception):
    """A request Gemini refuses: status, code name, message."""

    def __init__(self, status: int, name: str, message: str):
        super().__init__(message)
        self.status, self.name, self.message = status, name, message

    def body(self) -> dict[str, Any]:
        return error_object(self.status, self.name, self.message)


def _invalid(message: str) -> RequestError:
    return RequestError(400, "INVALID_ARGUMENT", message)


# ---------------------------------------------------------------------------------------------
# Checking a body. Pure (decoding runs in the core's threads).


@dataclass(frozen=True, slots=True)
class Checked:
    """A request that passed the checks: what answering it needs."""

    model: str
    max_tokens: int | None
    schema: Any  # generationConfig.responseJsonSchema, else None
    image_mime: str | None
    size: tuple[int, int] | None  # the first image, pixels
    thumb: Any
    image_tokens: int
    text_tokens: int
    temperature: Any = None


def image_tokens(width: int, height: int) -> int:
    """Gemini's count: 258 when both sides are at most 384 px, else 258 a 768 px tile (tokens docs)."""
    if width <= SMALL_PX and height <= SMALL_PX:
        return TOKENS_PER_TILE
    return TOKENS_PER_TILE * math.ceil(width / TILE_PX) * math.ceil(height / TILE_PX)


def _text_tokens(chars: int) -> int:
    return math.ceil(chars / 4)


def _inline(blob: Any, where: str) -> tuple[str, tuple[int, int], Any]:
    if not isinstance(blob, dict):
        raise _invalid(f"Invalid value at '{where}' (inline_data): must be an object")
    mime, data = blob.get("mime_type", blob.get("mimeType")), blob.get("data")
    if mime not in MIME_TYPES:
        raise _invalid(f"Unsupported MIME type: {mime}")
    if not isinstance(data, str) or not data:
        raise _invalid(f"Invalid value at '{where}.data': Field required")
    try:
        raw = _b64decode(data)
        with Image.open(io.BytesIO(raw)) as img:
            if img.format not in MIME_TYPES[mime]:
                raise _invalid(f"Unable to process input image: the data is not {mime}")
            return mime, img.size, make_thumb(img)
    except RequestError:
        raise
    except (binascii.Error, ValueError):
        raise _invalid(f"Invalid value at '{where}.data' (TYPE_BYTES), Base64 decoding failed") from None
    except Exception as err:  # Pillow raises many types for a broken image; all mean "not an image"
        raise _invalid(f"Unable to process input image ({type(err).__name__}). Please retry or report in "
                       f"{HELP_URL}") from None


def _b64decode(data: str) -> bytes:
    """Protobuf JSON bytes: standard or URL-safe base64 (the SDK sends the latter), padding optional."""
    text = data.replace("-", "+").replace("_", "/")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _check_config(config: Any) -> tuple[int | None, Any, Any]:
    """(maxOutputTokens, responseJsonSchema, temperature) of a generationConfig; raises RequestError."""
    if config is None:
        return None, None, None
    if not isinstance(config, dict):
        raise _invalid("Invalid value at 'generation_config': must be an object")
    tokens = config.get("maxOutputTokens", config.get("max_output_tokens"))
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise _invalid("Invalid value at 'generation_config.max_output_tokens' (TYPE_INT32)")
    temperature = config.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0 <= temperature <= 2):
        raise _invalid("Invalid value at 'generation_config.temperature': must be between 0 and 2")
    schema = config.get("responseJsonSchema", config.get("response_json_schema"))
    return tokens, schema, temperature


def check_request(params: Any, model: str) -> Checked:
    """Check a GenerateContentRequest and decode its images; raises RequestError. Runs in a decode thread."""
    if not isinstance(params, dict):
        raise _invalid("Invalid JSON payload received.")
    max_tokens, schema, temperature = _check_config(params.get("generationConfig", params.get("generation_config")))
    contents = params.get("contents")
    if not isinstance(contents, list) or not contents:
        raise _invalid("* GenerateContentRequest.contents: contents is not specified")
    system = params.get("systemInstruction", params.get("system_instruction"))
    chars = sum(len(p.get("text", "")) for p in (system or {}).get("parts") or [] if isinstance(p, dict)) \
        if isinstance(system, dict) else 0
    images = []
    for i, content in enumerate(contents):
        parts = content.get("parts") if isinstance(content, dict) else None
        if not isinstance(parts, list) or not parts:
            raise _invalid(f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty.")
        for j, part in enumerate(parts):
            where = f"contents[{i}].parts[{j}]"
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                chars += len(part["text"])
            elif isinstance(part, dict) and ("inline_data" in part or "inlineData" in part):
                images.append(_inline(part.get("inline_data", part.get("inlineData")), where))
            else:
                raise _invalid(f"Invalid value at '{where}': a part needs text or inline_data")
    first = images[0] if images else (None, None, None)
    return Checked(model, max_tokens, schema, first[0], first[1], first[2],
                   sum(image_tokens(*size) for _, size, _ in images), _text_tokens(chars), temperature)


# ---------------------------------------------------------------------------------------------
# Answers. Pure.


@dataclass(frozen=True, slots=True)
class Answer:
    """One answer before it is written as JSON or as chunks."""

    id: str
    model: str
    text: str
    finish: str | None
    image_tokens: int
    text_tokens: int
    output_tokens: int
    usage: bool = True  # False: the "no_usage" fault leaves usageMetadata out

    def usage_metadata(self, output_tokens: int | None = None) -> dict[str, Any]:
        prompt = self.image_tokens + self.text_tokens
        output = self.output_tokens if output_tokens is None else output_tokens
        details = [{"modality": "TEXT", "tokenCount": self.text_tokens}]
        if self.image_tokens:
            details.append({"modality": "IMAGE", "tokenCount": self.image_tokens})
        return {"promptTokenCount": prompt, "candidatesTokenCount": output, "totalTokenCount": prompt + output,
                "promptTokensDetails": details}

    def chunk(self, text: str, *, final: bool, output_tokens: int | None = None) -> dict[str, Any]:
        """A GenerateContentResponse carrying `text`; the final one carries finishReason."""
        candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
        if final and self.finish is not None:
            candidate["finishReason"] = self.finish
        body: dict[str, Any] = {"candidates": [candidate], "modelVersion": self.model, "responseId": self.id}
        if self.usage:
            body["usageMetadata"] = self.usage_metadata(output_tokens)
        return body


def compose(checked: Checked, fault: str | None = None) -> Answer:
    """The answer to a checked request: the pixel caption (or a schema's object), cut at maxOutputTokens."""
    if checked.size is None:
        text = "I see no image in this request."
    else:
        facts = image_facts(checked.size, checked.thumb)
        text = json.dumps(value_for(checked.schema, facts), ensure_ascii=False) if checked.schema else facts["caption"]
    text = CONTENT_FAULTS.get(fault, text)
    finish: str | None = "STOP"
    if checked.model.startswith(FINISH_PREFIX):
        text, finish = "", checked.model.removeprefix(FINISH_PREFIX).upper().replace("-", "_")
    if checked.max_tokens is not None and _text_tokens(len(text)) > checked.max_tokens:
        text, finish = text[: 4 * checked.max_tokens], "MAX_TOKENS"
    if fault == "no_finish":
        finish = None
    return Answer(new_id("resp_"), checked.model, text, finish, checked.image_tokens, checked.text_tokens,
                  _text_tokens(len(text)), usage=fault != "no_usage")


def _event(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\r\n\r\n"


def stream_chunks(answer: Answer, fault: str | None) -> list[bytes]:
    """The chunks of `:streamGenerateContent?alt=sse`: a few words each, usage so far in each, the
    last with finishReason; shaped by the stream faults."""
    words = [w for w in re.split(r"(?<=\s)(?=\S)", answer.text) if w] or [""]
    pieces = ["".join(words[i: i + WORDS_PER_CHUNK]) for i in range(0, len(words), WORDS_PER_CHUNK)]
    if fault == "malformed":
        return [_event(answer.chunk(pieces[0], final=False, output_tokens=1)), b"data: {not json\r\n\r\n"]
    if fault == "stream_error":
        half = pieces[: max(1, len(pieces) // 2)]
        return [*[_event(answer.chunk(p, final=False, output_tokens=1)) for p in half],
                _event(error_object(503, "UNAVAILABLE", "The model is overloaded. Please try again later."))]
    if fault == "no_done":
        pieces = pieces[:-1] or [""]
    events, sent = [], 0
    for number, piece in enumerate(pieces):
        sent += len(piece)
        final = number == len(pieces) - 1 and fault != "no_done"
        events.append(_event(answer.chunk(piece, final=final, output_tokens=_text_tokens(sent))))
    return events


# ---------------------------------------------------------------------------------------------
# The handler.


class GeminiGenerate:
    """The generateContent routes, answering through the shared core."""

    def __init__(self, core: Core):
        self._core = core

    def add_routes(self, app: web.Application) -> None:
        for version in ("v1beta", "v1"):  # the client speaks v1beta; the SDK 3.x defaults to v1
            app.router.add_post(f"/{version}/models/{{target}}", self._handle)

    def refuse(self, request: web.Request, headers: dict[str, str]) -> web.Response | None:
        """The 400 API_KEY_INVALID Gemini answers for a wrong key (403 PERMISSION_DENIED for none)."""
        key = self._core.api_key
        given = request.headers.get("x-goog-api-key") or request.query.get("key") or ""
        if key is None or hmac.compare_digest(given.encode(), key.encode()):
            return None
        if not given:
            return json_response(403, error_object(403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers "
                                           "(callers without established identity). Please use API Key or other "
                                           "form of API consumer identity to call this API."), headers)
        details = [{"@type": ERROR_INFO, "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]
        return json_response(400, error_object(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.",
                                       details), headers)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        core, arrival = self._core, time.monotonic()
        headers: dict[str, str] = {}
        model, _, method = request.match_info["target"].rpartition(":")
        if method not in ("generateContent", "streamGenerateContent") or not model:
            return json_response(404, error_object(404, "NOT_FOUND", f"Method not found: {method}"), headers)
        stream = method == "streamGenerateContent"
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return json_response(400, error_object(*FAULT_STATUS["413"]), headers)
        refusal = self.refuse(request, headers)
        if refusal is not None:
            self._observe(arrival, refusal.status, None, None, stream, authorized=False)
            return refusal
        if not core.enter():
            self._observe(arrival, 429, "concurrency", None, stream)
            return self._concurrency_refusal(headers)
        task = asyncio.current_task()
        if task is not None:
            core.tasks.add(task)
        try:
            return await self._serve(request, arrival, model, stream, parse_json(raw), headers)
        finally:
            core.in_flight -= 1
            core.tasks.discard(task)

    def _concurrency_refusal(self, headers: dict[str, str]) -> web.Response:
        given = self._core.concurrency_refusal("")
        details = [retry_info(float(given.headers["retry-after"]))] if "retry-after" in given.headers else []
        return json_response(429, error_object(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota).",
                                       details), headers)

    async def _serve(self, request: web.Request, arrival: float, model: str, stream: bool, params: Any,
                     headers: dict[str, str]) -> web.StreamResponse:
        try:
            checked = await asyncio.get_running_loop().run_in_executor(self._core.pool, check_request, params, model)
        except RequestError as err:
            self._observe(arrival, err.status, None, None, stream)
            return json_response(err.status, err.body(), headers)
        checked = _scaled(checked, self._core)
        verdict = self._core.admit(checked.image_tokens + checked.text_tokens + (checked.max_tokens or 0), model)
        if verdict.limit is not None:
            self._observe(arrival, 429, verdict.limit, checked, stream)
            return json_response(429, limit_body(verdict.limit, verdict.headers, model), headers)
        fault, retry_after_s = self._core.pop_fault()
        answer = compose(checked, fault)
        return await self._answer(request, arrival, checked, stream, answer, fault, retry_after_s, headers)

    async def _answer(self, request: web.Request, arrival: float, checked: Checked, stream: bool, answer: Answer,
                      fault: str | None, retry_after_s: float | None, headers: dict[str, str]) -> web.StreamResponse:
        response = fault_response(fault, stream, retry_after_s, checked.model, headers)
        silent = fault in ("drop", "hang") and not stream
        self._observe(arrival, 0 if silent else response.status if response is not None else 200, fault, checked,
                      stream)
        await asyncio.sleep(self._core.draw_latency())
        if silent:
            return await go_silent(request, fault == "drop")
        if response is not None:
            return response
        if not stream:
            return await self._send_body(request, answer, fault, headers)
        if request.query.get("alt") != "sse":  # without alt=sse Gemini streams one JSON array
            chunks = [json.loads(c[len(b"data: "):]) for c in stream_chunks(answer, None)]
            return json_response(200, chunks, headers)
        sse = web.StreamResponse(status=200, headers={**headers, "Cache-Control": "no-cache"})
        sse.content_type = "text/event-stream"
        await sse.prepare(request)
        for number, chunk in enumerate(stream_chunks(answer, fault)):
            await sse.write(chunk)
            if number == 0 and fault in ("drop", "hang"):
                return await go_silent(request, fault == "drop")
        await sse.write_eof()
        return sse

    async def _send_body(self, request: web.Request, answer: Answer, fault: str | None,
                         headers: dict[str, str]) -> web.StreamResponse:
        body = json.dumps(answer.chunk(answer.text, final=True), ensure_ascii=False, separators=(",", ":")).encode()
        if fault == "malformed":
            body = b'{"candidates": [{"content'
        if fault != "no_done":
            return web.Response(status=200, body=body, content_type="application/json", headers=headers)
        response = web.StreamResponse(status=200, headers=headers)  # promise the whole body, send half
        response.content_type = "application/json"
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        return await go_silent(request, drop=True)

    def _observe(self, arrival: float, status: int, fault: str | None, checked: Checked | None, stream: bool,
                 authorized: bool = True) -> None:
        self._core.observe(Observed(
            t=arrival, status=status, fault=fault, model=checked.model if checked else None, stream=stream,
            body_keys=(), max_tokens=checked.max_tokens if checked else None, max_completion_tokens=None,
            temperature=checked.temperature if checked else None, detail=None,
            image_mime=checked.image_mime if checked else None, image_size=checked.size if checked else None,
            thumb=checked.thumb if checked else None, authorized=authorized))


def _scaled(checked: Checked, core: Core) -> Checked:
    """`checked` with its image tokens as this server counts them (`image_token_scale`)."""
    return replace(checked, image_tokens=core.count_image_tokens(checked.image_tokens))


def limit_body(limit: str, openai_headers: dict[str, str], model: str) -> dict[str, Any]:
    """The 429 of a core limit: a QuotaFailure naming its quota, and RetryInfo with the bucket's wait."""
    quota_id, bucket = LIMIT_QUOTAS.get(limit, LIMIT_QUOTAS["rpm"])
    wait = openai_headers.get("retry-after")
    limit_value = openai_headers.get(f"x-ratelimit-limit-{bucket}")
    details = [quota_failure(quota_id, int(limit_value) if limit_value and limit_value.isdigit() else None, model)]
    if wait is not None:
        details.append(retry_info(float(wait)))
    message = (f"You exceeded your current quota, please check your plan and billing details. Quota exceeded for "
               f"metric: generativelanguage.googleapis.com/generate_content_{bucket}, limit: {limit_value or '?'}")
    return error_object(429, "RESOURCE_EXHAUSTED", message, details)


def fault_response(fault: str | None, stream: bool, retry_after_s: float | None, model: str,
                   headers: dict[str, str]) -> web.Response | None:
    """The ready answer of a fault that does not depend on the caption, in Gemini's shapes."""
    if fault in FAULT_STATUS:
        status, name, message = FAULT_STATUS[fault]
        details: list[dict[str, Any]] = []
        if fault == "401":
            details = [{"@type": ERROR_INFO, "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]
        elif fault == "429_quota":
            details = [quota_failure("GenerateRequestsPerDayPerProjectPerModel-FreeTier", 250, model), retry_info(30)]
        elif fault == "429":
            details = [quota_failure("GenerateRequestsPerMinutePerProjectPerModel-FreeTier", 10, model)]
            details += [retry_info(retry_after_s)] if retry_after_s is not None else []
        return json_response(status, error_object(status, name, message, details), headers)
    if fault == "html502":
        return web.Response(status=502, text=NGINX_502, content_type="text/html", headers=headers)
    if fault == "404_model":
        return json_response(404, error_object(404, "NOT_FOUND", f"models/{model} is not found for API version v1beta, or "
                                       "is not supported for generateContent."), headers)
    if fault == "429_bare":
        return web.Response(status=429)
    if fault == "error200" or (fault == "stream_error" and not stream):
        status = 503 if fault == "stream_error" else 200
        return json_response(status, error_object(503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
                     headers)
    return None
