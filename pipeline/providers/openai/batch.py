"""providers/openai/batch.py: OpenAI's Files and Batches APIs, as a `BatchBackend`.

Owns the batch input line format, the HTTP calls (upload a JSONL file, create, retrieve, list,
cancel a batch, stream a result file to disk) and the parsing of one result line into a
`LineResult`. Decides nothing: the batch driver retries, records and turns results into rows.

References: https://platform.openai.com/docs/guides/batch (request and output line formats,
limits of 50,000 requests and 200 MB a file, statuses, `batch_expired`, the enqueued-token limit
`token_limit_exceeded`), https://platform.openai.com/docs/api-reference/batch (batch object,
create, retrieve, list with `limit`/`after`, cancel) and
https://platform.openai.com/docs/api-reference/files (upload with `purpose=batch`, content).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from ...errors import CaptionError, FatalError, TransientError
from ...records import ChatResult, Encoded
from ..base import BatchInfo, LineResult
from ..http import MAX_CONTROL_BYTES, download_to, read_bounded
from .chat import OpenAIProvider, parse_completion
from .errors import classify_response

__all__ = ["OpenAIBatchBackend", "parse_batch_response"]

log = logging.getLogger(__name__)

CHAT_URL = "/v1/chat/completions"
LIST_PAGE = 100  # batches per page when listing the provider's batches
LIST_MAX_PAGES = 50  # listing stops after this many pages (5,000 batches)
ENDED = ("completed", "failed", "expired", "cancelled")


class OpenAIBatchBackend:
    """The Files and Batches endpoints of one OpenAI-compatible server, over a shared session."""

    def __init__(self, session: aiohttp.ClientSession, provider: OpenAIProvider, base_url: str, *,
                 api_key: str | None, headers: Mapping[str, str], timeout_s: float):
        self._session = session
        self._provider = provider  # the request body and what it learned (the token parameter)
        self._base = base_url.rstrip("/")
        self._headers = dict(headers)
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)

    def custom_id(self, key: str) -> str:
        """The image key itself: OpenAI takes any string, and the rows name the key."""
        return key

    def request_line(self, custom_id: str, image: Encoded) -> bytes:
        """One input line: the online payload without `stream`, keyed by custom_id."""
        body = self._provider.body(image, stream=False)
        line = {"custom_id": custom_id, "method": "POST", "url": CHAT_URL, "body": body}
        return json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"

    async def upload(self, path: Path) -> str:
        """POST /v1/files (multipart, purpose=batch); return the file id."""
        with open(path, "rb") as handle:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", handle, filename=path.name, content_type="application/jsonl")
            return (await self._call("POST", "/files", data=form))["id"]

    async def submit(self, file_ref: str, metadata: dict[str, str], window: str) -> BatchInfo:
        body = {"input_file_id": file_ref, "endpoint": CHAT_URL, "completion_window": window, "metadata": metadata}
        return batch_info(await self._call("POST", "/batches", json=body))

    async def poll(self, batch_id: str) -> BatchInfo:
        return batch_info(await self._call("GET", f"/batches/{batch_id}"))

    async def cancel(self, batch_id: str) -> BatchInfo:
        return batch_info(await self._call("POST", f"/batches/{batch_id}/cancel"))

    async def find(self, metadata: dict[str, str], since: float | None, file_ref: str | None = None
                   ) -> BatchInfo | None:
        """Page through the batches (newest first) for one carrying `metadata`; stop at batches
        created before `since`, or after LIST_MAX_PAGES pages."""
        after = None
        for _ in range(LIST_MAX_PAGES):
            page = await self.list_page(after)
            for batch in page.get("data") or []:
                if (batch.get("metadata") or {}).items() >= metadata.items():
                    return batch_info(batch)
                if since is not None and (batch.get("created_at") or 0) < since:
                    return None
            if not page.get("has_more") or not page.get("last_id"):
                return None
            after = page["last_id"]
        return None

    async def list_page(self, after: str | None) -> dict[str, Any]:
        """GET /v1/batches?limit=…&after=…: one page, newest first."""
        params = {"limit": str(LIST_PAGE), **({"after": after} if after else {})}
        return await self._call("GET", "/batches", params=params)

    async def download(self, file_ref: str, dest: Path) -> None:
        """GET /v1/files/{id}/content, streamed to `dest` (output files can be hundreds of MB)."""
        await download_to(self._session, f"{self._base}/files/{file_ref}/content", dest, headers=self._headers,
                          timeout=self._timeout, classify=classify_response)

    def parse_result_line(self, raw: bytes) -> LineResult | None:
        """One output/error file line; None for a malformed line or one without a custom_id."""
        try:
            line = json.loads(raw)
        except ValueError:
            log.warning("skipping a malformed batch output line")
            return None
        if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
            return None
        custom_id, response, error = line["custom_id"], line.get("response"), line.get("error")
        line_id = line.get("id") if isinstance(line.get("id"), str) else None
        if response is None or (isinstance(error, dict) and error.get("code") == "batch_expired"):
            return LineResult(custom_id, ran=False, request_id=line_id)
        try:
            return LineResult(custom_id, chat=parse_batch_response(response), request_id=line_id)
        except CaptionError as err:
            return LineResult(custom_id, error=err, request_id=line_id)

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            async with self._session.request(method, self._base + path, headers=self._headers,
                                             timeout=self._timeout, **kwargs) as response:
                body = await read_bounded(response, MAX_CONTROL_BYTES)
                error = classify_response(response.status, response.headers, body)
                if error is not None:
                    raise error
                return json.loads(body)
        except (TimeoutError, aiohttp.ClientError, ValueError) as err:
            raise TransientError(f"{method} {path} failed: {type(err).__name__}: {err}") from err


def batch_info(batch: dict[str, Any]) -> BatchInfo:
    """The driver's view of an OpenAI batch object."""
    status = str(batch.get("status") or "")
    failed = status == "failed"
    data = (((batch.get("errors") or {}).get("data") or [{}])[0] or {}) if failed else {}
    failure = None
    if failed:
        code, message = data.get("code") or "failed", data.get("message") or "no reason given"
        failure = FatalError(f"batch {batch.get('id')} failed validation: {code}: {message}")
    files = tuple(f for f in (batch.get("output_file_id"), batch.get("error_file_id")) if f)
    return BatchInfo(id=str(batch.get("id")), status=status, ended=status in ENDED,
                     counts=batch.get("request_counts"), result_files=files,
                     metadata=dict(batch.get("metadata") or {}), created_at=batch.get("created_at"),
                     failure=failure, queue_full=data.get("code") == "token_limit_exceeded", ran_nothing=failed)


def parse_batch_response(response: Any) -> ChatResult:
    """Turn the `response` of one Batch API output line into a ChatResult, or raise its typed error.

    `response` is `{"status_code", "request_id", "body"}` as in
    https://platform.openai.com/docs/guides/batch ("the output file"); the body is what the chat
    endpoint would have answered, so the same failure table applies (`classify_response`), and a
    200 body is parsed as `parse_completion` parses one.
    """
    if not isinstance(response, dict) or not isinstance(response.get("status_code"), int):
        raise TransientError("batch output line without a response status", status=None)
    request_id = response.get("request_id") if isinstance(response.get("request_id"), str) else None
    headers = {"x-request-id": request_id} if request_id else {}
    body = response.get("body")
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode() if body is not None else b""
    error = classify_response(response["status_code"], headers, raw)
    if error is not None:
        raise error
    return parse_completion(raw, request_id)
