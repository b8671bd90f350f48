"""gemini_batch_files.py: the Gemini Files API of the bundled endpoint, as Batch Mode uses it.

Owns the resumable media upload (`POST /upload/v1beta/files` with `X-Goog-Upload-Protocol:
resumable` and `-Command: start`, answered with the session URL in `X-Goog-Upload-URL`; then one or
more `POST`s to that URL with `-Command: upload` (`, finalize` on the last) at increasing
`-Offset`s, answered `X-Goog-Upload-Status: active`, then `final` with `{"file": {...}}`), the File
object (`files/{id}`, `GET /v1beta/files/{id}`), and the download of a file's bytes
(`GET /download/v1beta/files/{id}:download?alt=media`, and `/v1beta/files/{id}:download`, the path
the google-genai SDK uses), and `DELETE /v1beta/files/{id}`. Files are kept in memory, each at most MAX_FILE_BYTES as declared
before its first byte is read. The batches module adds result files (`source: GENERATED`).

It must not share protocol code with the client side. It imports only aiohttp, the standard
library and modules of this package.

Protocol sources: https://ai.google.dev/api/files (the File resource: name, displayName, mimeType,
sizeBytes as an int64 string, createTime, expirationTime (48 h), sha256Hash, uri, downloadUri,
state ACTIVE, source UPLOADED | GENERATED), https://ai.google.dev/gemini-api/docs/files (2 GB a
file), and the upload as googleapis/python-genai sends it (`_api_client.py` `_upload_fd`, 8 MB chunks).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .core import Core
from .gemini_generate import GeminiGenerate, error_object
from .wire import json_response, parse_json

MAX_FILE_BYTES = 2 * 2**30  # "2 GB" a file (Files API docs)
FILE_LIFETIME = dt.timedelta(hours=48)  # files are deleted after 48 hours (Files API docs)
READ_BLOCK = 1 << 20


def now_rfc3339() -> str:
    """The current time as Gemini writes it: RFC 3339, Z, 6 fractional digits."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class StoredFile:
    """A file the server holds: uploaded by a client, or generated (a batch's results)."""

    name: str  # "files/{id}"
    display_name: str
    mime_type: str
    data: bytes
    created: dt.datetime
    source: str = "UPLOADED"

    def as_object(self, root: str) -> dict[str, Any]:
        created = self.created.isoformat(timespec="microseconds").replace("+00:00", "Z")
        expires = (self.created + FILE_LIFETIME).isoformat(timespec="microseconds").replace("+00:00", "Z")
        body = {"name": self.name, "displayName": self.display_name, "mimeType": self.mime_type,
                "sizeBytes": str(len(self.data)), "createTime": created, "updateTime": created,
                "expirationTime": expires, "sha256Hash": base64.b64encode(hashlib.sha256(self.data).digest()).decode(),
                "uri": f"{root}/v1beta/{self.name}", "state": "ACTIVE", "source": self.source}
        if self.source == "GENERATED":
            body["downloadUri"] = f"{root}/download/v1beta/{self.name}:download?alt=media"
        return body


@dataclass(slots=True)
class _Upload:
    """A resumable upload session between its start and its finalize."""

    display_name: str
    mime_type: str
    size: int  # as declared at the start
    received: bytearray


def _not_found(what: str) -> dict[str, Any]:
    return error_object(404, "NOT_FOUND", f"Requested entity was not found. ({what})")


class GeminiFiles:
    """The Files API routes, and the files and upload sessions since the last reset."""

    def __init__(self, core: Core, generate: GeminiGenerate):
        self._core = core
        self._generate = generate  # its key check
        self.files: dict[str, StoredFile] = {}
        self._uploads: dict[str, _Upload] = {}
        core.on_reset(self._forget)

    def _forget(self) -> None:
        self.files.clear()
        self._uploads.clear()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/upload/v1beta/files", self._upload)
        app.router.add_get("/v1beta/files/{id}:download", self._download)
        app.router.add_get("/download/v1beta/files/{id}:download", self._download)
        app.router.add_get("/v1beta/files/{id}", self._get)
        app.router.add_delete("/v1beta/files/{id}", self._delete)

    def names(self) -> list[str]:
        with self._core.lock:
            return list(self.files)

    def add_generated(self, display_name: str, data: bytes) -> StoredFile:
        """Keep a file the server made (a batch's results); the caller holds the core's lock."""
        stored = StoredFile(f"files/{display_name}", display_name, "application/jsonl", data,
                            dt.datetime.now(dt.UTC), source="GENERATED")
        self.files[stored.name] = stored
        return stored

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        upload_id = request.query.get("upload_id")
        if upload_id is not None:  # the session URL is the credential: the SDK sends no key with the bytes
            return await self._receive(request, upload_id)
        if (refusal := self._generate.refuse(request, {})) is not None:
            return refusal
        if request.headers.get("X-Goog-Upload-Protocol", "").lower() != "resumable" or \
                request.headers.get("X-Goog-Upload-Command", "").lower() != "start":
            return json_response(400, error_object(400, "INVALID_ARGUMENT", "only resumable uploads are supported: "
                                                   "X-Goog-Upload-Protocol: resumable, -Command: start"), {})
        size_text = request.headers.get("X-Goog-Upload-Header-Content-Length", "")
        if not size_text.isdigit() or not 0 < int(size_text) <= MAX_FILE_BYTES:
            return json_response(400, error_object(400, "INVALID_ARGUMENT", "X-Goog-Upload-Header-Content-Length "
                                                   f"must be 1 to {MAX_FILE_BYTES} bytes"), {})
        meta = parse_json(await request.content.read(64 * 1024)) or {}
        file = meta.get("file") if isinstance(meta, dict) and isinstance(meta.get("file"), dict) else {}
        upload_id = secrets.token_urlsafe(16)
        mime = request.headers.get("X-Goog-Upload-Header-Content-Type", "application/octet-stream")
        with self._core.lock:
            self._uploads[upload_id] = _Upload(str(file.get("displayName") or file.get("display_name") or ""),
                                               mime, int(size_text), bytearray())
        url = f"{_root(request)}/upload/v1beta/files?upload_id={upload_id}&upload_protocol=resumable"
        return web.Response(status=200, headers={"X-Goog-Upload-URL": url, "X-Goog-Upload-Status": "active"})

    async def _receive(self, request: web.Request, upload_id: str) -> web.StreamResponse:
        """One `upload` (or `upload, finalize`) command of a session: the bytes at the given offset."""
        upload = self._uploads.get(upload_id)
        if upload is None:
            return json_response(404, _not_found("upload session"), {})
        command = {c.strip() for c in request.headers.get("X-Goog-Upload-Command", "").lower().split(",")}
        offset = request.headers.get("X-Goog-Upload-Offset", "")
        if "upload" not in command or not offset.isdigit() or int(offset) != len(upload.received):
            return json_response(400, error_object(400, "INVALID_ARGUMENT", "X-Goog-Upload-Offset must be the bytes "
                                                   f"received so far ({len(upload.received)})"), {})
        async for block in request.content.iter_chunked(READ_BLOCK):
            if len(upload.received) + len(block) > upload.size:
                return json_response(400, error_object(400, "INVALID_ARGUMENT", "more bytes than the declared "
                                                       "X-Goog-Upload-Header-Content-Length"), {})
            upload.received.extend(block)
        if "finalize" not in command:
            return web.Response(status=200, headers={"X-Goog-Upload-Status": "active"})
        if len(upload.received) != upload.size:
            return json_response(400, error_object(400, "INVALID_ARGUMENT", f"received {len(upload.received)} bytes "
                                                   f"of the {upload.size} declared"), {})
        stored = StoredFile(f"files/{secrets.token_hex(6)}", upload.display_name, upload.mime_type,
                            bytes(upload.received), dt.datetime.now(dt.UTC))
        with self._core.lock:
            del self._uploads[upload_id]
            self.files[stored.name] = stored
        return json_response(200, {"file": stored.as_object(_root(request))}, {"X-Goog-Upload-Status": "final"})

    async def _get(self, request: web.Request) -> web.Response:
        if (refusal := self._generate.refuse(request, {})) is not None:
            return refusal
        stored = self.files.get(f"files/{request.match_info['id']}")
        if stored is None:
            return json_response(404, _not_found(f"files/{request.match_info['id']}"), {})
        return json_response(200, stored.as_object(_root(request)), {})

    async def _delete(self, request: web.Request) -> web.Response:
        if (refusal := self._generate.refuse(request, {})) is not None:
            return refusal
        with self._core.lock:
            stored = self.files.pop(f"files/{request.match_info['id']}", None)
        if stored is None:
            return json_response(404, _not_found(f"files/{request.match_info['id']}"), {})
        return json_response(200, {}, {})

    async def _download(self, request: web.Request) -> web.Response:
        if (refusal := self._generate.refuse(request, {})) is not None:
            return refusal
        stored = self.files.get(f"files/{request.match_info['id']}")
        if stored is None:
            return json_response(404, _not_found(f"files/{request.match_info['id']}"), {})
        if request.query.get("alt") != "media":
            return json_response(400, error_object(400, "INVALID_ARGUMENT", "a download needs ?alt=media"), {})
        return web.Response(status=200, body=stored.data, content_type="application/octet-stream")


def _root(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"
