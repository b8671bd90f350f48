"""providers/gemini/batch.py: the Gemini API's Batch Mode and Files API, as a `BatchBackend`.

Owns the request line (`{"key", "request"}`), the HTTP calls (a resumable upload of a chunk file to
the Files API, `models/{model}:batchGenerateContent` naming that file, `batches/{id}` get, list and
`:cancel`, the results file streamed from `download/v1beta/{file}:download?alt=media`), the parsing
of one result line into a `LineResult`, and how a batch is found again after a crash: its
`displayName` names the job, the run and the chunk (Gemini batches have no other metadata), so the
driver's metadata match works as it does for OpenAI. Decides nothing: the batch driver retries,
records and turns results into rows. One piece of housekeeping: once a batch is seen ended, its input
file is deleted (a project may hold 20 GB of files, and Gemini keeps them 48 hours), best effort; a
batch that ran nothing is sent again from a new chunk file, so nothing needs it any more.

Always a file, never inline requests: a chunk of base64 images passes the inline limit (the whole
create request under 20 MB) after a few dozen images, while an input file may hold 2 GB; a
create that names a file is a few hundred bytes, so trying it again costs nothing; and the results
of a file batch come back as a file streamed to disk, where inline results would come inside the
batch object that every poll reads (bounded at MAX_CONTROL_BYTES, and held whole).

References:
- Batch Mode guide (inline requests under 20 MB or a JSONL input file of `{"key", "request"}`
  lines uploaded with the Files API; results as `inlinedResponses` or a `responsesFile` of lines with
  `key` and `response` or `error`; 50 % of the standard price; 24 h target, expiry after 48 h):
  https://ai.google.dev/gemini-api/docs/batch-mode
- REST reference: `models.batchGenerateContent` (body `{"batch": {"displayName", "inputConfig":
  {"fileName"}}}`, answered with an Operation whose `metadata` is the GenerateContentBatch: `name`,
  `state` BATCH_STATE_PENDING | RUNNING | SUCCEEDED | FAILED | CANCELLED | EXPIRED, `batchStats`
  with int64 counts as strings, `output.responsesFile`, RFC 3339 `createTime`), `batches.get`,
  `batches.list` (`pageSize`, `pageToken` → `operations`, `nextPageToken`), `batches.cancel`:
  https://ai.google.dev/api/batch-mode
- Files API, media upload (`POST /upload/v1beta/files` with `X-Goog-Upload-Protocol: resumable`,
  `-Command: start`, `-Header-Content-Length`, `-Header-Content-Type`; the session URL comes back in
  `X-Goog-Upload-URL`; then `-Command: upload, finalize` at `-Offset: 0`, answered `{"file": {...}}`
  with `X-Goog-Upload-Status: final`; 2 GB a file): https://ai.google.dev/api/files and
  https://ai.google.dev/gemini-api/docs/files; the same calls in googleapis/python-genai
  (`files.py` upload/download, `_api_client.py` `_upload_fd`, `batches.py` `_BatchJob_from_mldev`).
- google.rpc.Code numbers (a result line's `error` is a google.rpc.Status, whose `code` is one):
  https://github.com/googleapis/googleapis/blob/master/google/rpc/code.proto
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp

from ...errors import BadRequestError, CaptionError, FatalError, TransientError
from ...records import Encoded
from ..base import BatchInfo, LineResult
from ..http import MAX_CONTROL_BYTES, download_to, loads_or_none, read_bounded
from .errors import classify_response
from .generate import GeminiProvider, parse_response

__all__ = ["GeminiBatchBackend", "MAX_FILE_BYTES", "ENDED_STATES", "batch_info", "display_name",
           "metadata_of", "parse_result_line", "resource_name"]

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 2 * 2**30  # the Files API's limit for one file ("2 GB")
LIST_PAGE = 100  # batches a page when listing
LIST_MAX_PAGES = 50
STATE_PREFIX = "BATCH_STATE_"
ENDED_STATES = frozenset({"BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED", "BATCH_STATE_CANCELLED",
                          "BATCH_STATE_EXPIRED"})
NAME_PREFIX = "caption"  # displayName = "caption <job fingerprint> <run id>/<chunk>"
MAX_COUNT = 10**9  # a batchStats count above this is not believed
GRPC_HTTP = {1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400, 10: 409, 11: 400, 12: 501,
             13: 500, 14: 503, 15: 500, 16: 401}
"""google.rpc.Code → the HTTP status it maps to (code.proto), for a result line's error."""
_FRACTION = re.compile(r"(\.\d{6})\d+")  # RFC 3339 with 9 fractional digits: Python reads at most 6
_RESOURCE = re.compile(r"^(batches|files)/[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
"""A batch or file name as Gemini makes them ("batches/123abc", "files/batch-123abc"): names go into
URLs, so a server's answer with anything else ("../x", a query) is not followed."""


def resource_name(value: Any, kind: str) -> str | None:
    """`value` if it is a well-formed `kind` name ("batches" or "files"), else None."""
    found = _RESOURCE.match(value) if isinstance(value, str) else None
    return value if found and found.group(1) == kind else None


def display_name(metadata: dict[str, str]) -> str:
    """The batch's displayName for the driver's metadata (job fingerprint, run id / chunk)."""
    return f"{NAME_PREFIX} {metadata.get('caption_job', '')} {metadata.get('caption_chunk', '')}"


def metadata_of(name: Any) -> dict[str, str]:
    """The driver's metadata back from a displayName `display_name` made; {} for any other name."""
    parts = name.split(" ") if isinstance(name, str) else []
    if len(parts) != 3 or parts[0] != NAME_PREFIX:
        return {}
    return {"caption_job": parts[1], "caption_chunk": parts[2]}


class GeminiBatchBackend:
    """The Files and Batch Mode endpoints of one Gemini API server, over a shared session."""

    def __init__(self, session: aiohttp.ClientSession, provider: GeminiProvider, *, timeout_s: float):
        self._session = session
        self._provider = provider
        self._root = provider.root
        self._model_url = provider.model_url  # {root}/v1beta/models/{model}
        self._headers = {k: v for k, v in provider.headers.items() if k.lower() != "content-type"}
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
        self._deleted: set[str] = set()  # input files of ended batches, deleted (or tried) by this process

    def custom_id(self, key: str) -> str:
        """The image key itself: a line's `key` is any string the caller picks, echoed in its result."""
        return key

    def request_line(self, custom_id: str, image: Encoded) -> bytes:
        """One input line: `{"key", "request"}`, the request the online GenerateContentRequest."""
        line = {"key": custom_id, "request": self._provider.body(image)}
        return json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"

    async def upload(self, path: Path) -> str:
        """Upload a chunk file with the Files API's resumable protocol; return its name ("files/…")."""
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise FatalError(f"{path.name}: {size:,} bytes, over the Files API's 2 GB a file; lower "
                             "--batch-max-file-mb")
        start = {**self._headers, "Content-Type": "application/json", "X-Goog-Upload-Protocol": "resumable",
                 "X-Goog-Upload-Command": "start", "X-Goog-Upload-Header-Content-Length": str(size),
                 "X-Goog-Upload-Header-Content-Type": "application/jsonl"}
        body = {"file": {"displayName": path.name}}
        _, headers = await self._call("POST", f"{self._root}/upload/v1beta/files", json=body, headers=start)
        session_url = headers.get("X-Goog-Upload-URL")
        if not session_url:
            raise TransientError("the upload start was answered without an X-Goog-Upload-URL")
        session_url = _on_origin(session_url, self._root)
        finish = {**self._headers, "X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0",
                  "Content-Length": str(size)}
        with open(path, "rb") as handle:
            answer, headers = await self._call("POST", session_url, data=handle, headers=finish)
        if headers.get("X-Goog-Upload-Status", "final") != "final":
            raise TransientError(f"{path.name}: the upload did not finish (status {headers['X-Goog-Upload-Status']})")
        name = resource_name(answer["file"].get("name"), "files") if isinstance(answer.get("file"), dict) else None
        if name is None:
            raise TransientError(f"{path.name}: the upload was answered without a file name")
        return name

    async def submit(self, file_ref: str, metadata: dict[str, str], window: str) -> BatchInfo:
        """POST models/{model}:batchGenerateContent naming the uploaded file; `metadata` goes in the
        displayName. `window` is not sent: Gemini batches have none to choose (48 h)."""
        body = {"batch": {"displayName": display_name(metadata), "inputConfig": {"fileName": file_ref}}}
        headers = {**self._headers, "Content-Type": "application/json"}
        answer, _ = await self._call("POST", self._model_url + ":batchGenerateContent", json=body, headers=headers)
        batch = batch_info(answer)
        if resource_name(batch.id, "batches") is None:
            raise FatalError(f"batchGenerateContent answered a batch name that is not one: {batch.id[:80]!r}")
        return batch

    async def poll(self, batch_id: str) -> BatchInfo:
        """GET batches/{id}; FatalError with status 404 when Gemini no longer knows it."""
        answer, _ = await self._call("GET", f"{self._root}/v1beta/{batch_id}")
        batch = batch_info(answer)
        if batch.ended:
            await self._delete_input(_meta(answer))
        return batch

    async def _delete_input(self, meta: dict[str, Any]) -> None:
        """DELETE the input file of an ended batch, once; a failure is only logged (Gemini deletes it
        after 48 hours anyway)."""
        config = meta.get("inputConfig") if isinstance(meta.get("inputConfig"), dict) else {}
        name = resource_name(config.get("fileName"), "files")
        if name is None or name in self._deleted:
            return
        self._deleted.add(name)
        try:
            await self._call("DELETE", f"{self._root}/v1beta/{name}")
        except CaptionError as err:
            log.debug("could not delete %s (%s); Gemini deletes it after 48 hours", name, err)

    async def cancel(self, batch_id: str) -> BatchInfo:
        """POST batches/{id}:cancel (answered with an empty object), then the batch as it is now:
        "cancelling" while it has not yet ended. A batch that ended already may refuse the cancel
        (400): then it is reported as it ended."""
        try:
            await self._call("POST", f"{self._root}/v1beta/{batch_id}:cancel", json={},
                             headers={**self._headers, "Content-Type": "application/json"})
        except BadRequestError:
            return await self.poll(batch_id)
        batch = await self.poll(batch_id)
        if batch.ended:
            return batch
        return BatchInfo(batch.id, "cancelling", False, batch.counts, (), batch.metadata, batch.created_at)

    async def find(self, metadata: dict[str, str], since: float | None, file_ref: str | None = None
                   ) -> BatchInfo | None:
        """The batch whose displayName carries `metadata`, among those created after `since`.

        Gemini does not document the list's order, so every page is read (up to LIST_MAX_PAGES).
        """
        wanted, token = display_name(metadata), None
        for _ in range(LIST_MAX_PAGES):
            params = {"pageSize": str(LIST_PAGE), **({"pageToken": token} if token else {})}
            page, _ = await self._call("GET", f"{self._root}/v1beta/batches", params=params)
            for raw in page.get("operations") or []:
                batch = batch_info(raw)
                if resource_name(batch.id, "batches") is None:
                    continue
                if since is not None and batch.created_at is not None and batch.created_at < since:
                    continue
                if _meta(raw).get("displayName") == wanted:
                    return batch
            token = page.get("nextPageToken")
            if not isinstance(token, str) or not token:
                return None
        return None

    async def download(self, file_ref: str, dest: Path) -> None:
        """GET download/v1beta/{files/…}:download?alt=media, streamed to `dest`."""
        url = f"{self._root}/download/v1beta/{file_ref}:download"
        await download_to(self._session, url + "?alt=media", dest, headers=self._headers, timeout=self._timeout,
                          classify=classify_response)

    def parse_result_line(self, raw: bytes) -> LineResult | None:
        return parse_result_line(raw)

    async def _call(self, method: str, url: str, **kwargs: Any) -> tuple[dict[str, Any], Any]:
        """One control call: its JSON object (or {}) and its headers; raises the typed error it means."""
        headers = kwargs.pop("headers", self._headers)
        try:
            async with self._session.request(method, url, headers=headers, timeout=self._timeout,
                                             **kwargs) as response:
                body = await read_bounded(response, MAX_CONTROL_BYTES)
                answer = loads_or_none(body) if body.strip() else {}
                # A failed batch's Operation carries its own `error` (a google.rpc.Status) beside its
                # `name`: that is an answer, not an error body.
                named = response.status == 200 and isinstance(answer, dict) and "name" in answer
                error = None if named else classify_response(response.status, response.headers, body)
                if error is not None:
                    raise error
                if not isinstance(answer, dict):
                    raise ValueError("the answer is not a JSON object")
                return answer, response.headers
        except (TimeoutError, aiohttp.ClientError, ValueError) as err:
            raise TransientError(f"{method} {url.split('?')[0]} failed: {type(err).__name__}: {err}") from err


def _on_origin(url: str, root: str) -> str:
    """`url` moved to `root`'s scheme and host: the key goes with the upload, so never to another host
    (a relay may hand back Google's own session URL; the google-genai SDK rewrites it the same way)."""
    parts, base = urllib.parse.urlsplit(url), urllib.parse.urlsplit(root)
    return urllib.parse.urlunsplit((base.scheme, base.netloc, parts.path, parts.query, ""))


def parse_result_line(raw: bytes) -> LineResult | None:
    """One results-file line: `{"key", "response"}` (a GenerateContentResponse) or `{"key", "error"}`
    (a google.rpc.Status); None for a line naming no request."""
    try:
        line = json.loads(raw)
    except ValueError:
        log.warning("skipping a malformed batch results line")
        return None
    if not isinstance(line, dict) or not isinstance(line.get("key"), str):
        return None
    # The guide says each line holds "a GenerateContentResponse or a status object": `error`, as an
    # InlinedResponse names it; `status` is read too, in case a line names it so.
    key, response, error = line["key"], line.get("response"), line.get("error", line.get("status"))
    if isinstance(error, dict):
        return LineResult(key, error=_line_error(error))
    if not isinstance(response, dict):
        return LineResult(key, error=TransientError("result line with neither response nor error"))
    request_id = response.get("responseId") if isinstance(response.get("responseId"), str) else None
    try:
        return LineResult(key, chat=parse_response(response, None), request_id=request_id)
    except CaptionError as err:
        return LineResult(key, error=err, request_id=request_id)


def _line_error(status: dict[str, Any]) -> CaptionError:
    """A result line's google.rpc.Status as the typed error its code means (gRPC or HTTP numbering)."""
    code = status.get("code")
    http = code if isinstance(code, int) and 400 <= code < 600 else GRPC_HTTP.get(code, 0) \
        if isinstance(code, int) else 0
    error = {**status, "code": http or None}
    return classify_response(200, {}, {"error": error}) or TransientError(str(status.get("message") or "error"))


def _meta(operation: Any) -> dict[str, Any]:
    """The GenerateContentBatch of an Operation (`metadata`), or the object itself if it is one."""
    if not isinstance(operation, dict):
        return {}
    meta = operation.get("metadata")
    return meta if isinstance(meta, dict) else operation


def batch_info(operation: dict[str, Any]) -> BatchInfo:
    """The driver's view of a batch Operation (or of a bare GenerateContentBatch)."""
    meta = _meta(operation)
    state = str(meta.get("state") or "BATCH_STATE_UNSPECIFIED")
    ended = state in ENDED_STATES or operation.get("done") is True
    output = meta.get("output") if isinstance(meta.get("output"), dict) else {}
    response = operation.get("response") if isinstance(operation.get("response"), dict) else {}
    results = output.get("responsesFile") or response.get("responsesFile")
    files = (results,) if ended and resource_name(results, "files") else ()
    failure, failed = None, state == "BATCH_STATE_FAILED"
    if failed:
        error = operation.get("error") if isinstance(operation.get("error"), dict) else {}
        failure = FatalError(f"batch {operation.get('name')} failed: {error.get('message') or 'no reason given'}")
    return BatchInfo(id=str(operation.get("name") or meta.get("name")),
                     status=state.removeprefix(STATE_PREFIX).lower(), ended=ended, counts=_counts(meta),
                     result_files=files, metadata=metadata_of(meta.get("displayName")),
                     created_at=_timestamp(meta.get("createTime")), failure=failure if not files else None,
                     ran_nothing=failed and not files)


def _counts(meta: dict[str, Any]) -> dict[str, int] | None:
    """batchStats (int64 counts, as strings in JSON) as total / completed / failed."""
    stats = meta.get("batchStats")
    if not isinstance(stats, dict):
        return None
    numbers = {}
    for field, name in (("requestCount", "total"), ("successfulRequestCount", "completed"),
                        ("failedRequestCount", "failed"), ("pendingRequestCount", "pending")):
        value = stats.get(field, 0)
        text = str(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else ""
        numbers[name] = int(text) if text.isdigit() and int(text) <= MAX_COUNT else 0
    return numbers


def _timestamp(text: Any) -> float | None:
    """Unix seconds of an RFC 3339 time ("2014-10-02T15:01:23.045123456Z"); None if it is not one."""
    if not isinstance(text, str):
        return None
    try:
        when = dt.datetime.fromisoformat(_FRACTION.sub(r"\1", text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return when.timestamp() if when.tzinfo is not None else None
