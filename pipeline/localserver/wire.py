"""wire.py: the small wire pieces every part of the bundled endpoint shares.

Owns the model id the server answers as, request and object ids, JSON responses, JSON body parsing,
and the error object with the exception that carries one (`RequestError`). The error object has
OpenAI's shape because every answer the server gives today (the core's 401, the limits' 429, the
protocols' 400/404) is OpenAI's; a protocol with another error shape builds its own.

It must not hold state, know a route, or import anything but aiohttp and the standard library.

Error body `{"error": {"message", "type", "param", "code"}}` and status meanings:
https://platform.openai.com/docs/guides/error-codes
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from aiohttp import web

MODEL_ID = "local-caption"


class RequestError(Exception):
    """A request the server refuses, with the OpenAI error fields to answer with."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, "invalid_request_error", param=self.param, code=self.code)


def invalid(message: str, param: str | None, code: str | None = None) -> RequestError:
    """A 400 RequestError naming the offending parameter."""
    return RequestError(400, message, param=param, code=code)


def error_body(message: str, type_: str, *, param: str | None = None, code: Any = None) -> dict[str, Any]:
    """Return OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def json_response(status: int, body: Any, headers: dict[str, str]) -> web.Response:
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return web.Response(status=status, text=text, content_type="application/json", headers=headers)


def parse_json(raw: bytes) -> Any:
    """Return the decoded body, or None when it is not JSON."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def request_headers() -> dict[str, str]:
    """The headers every answer starts from: a fresh x-request-id."""
    return {"x-request-id": new_id("req_")}
