"""providers/http.py: the transport every provider's requests go through.

Owns the HTTP exchange of one request: POST the JSON a `Provider` built, hand the rate-limit
headers to whoever listens, and turn the answer (whole or streamed) into the provider's
`ChatResult` or typed error. Timeouts and dropped connections become `TransientError`, and so
does an answer larger than MAX_ANSWER_BYTES (its connection is closed): nothing a server sends is
read without a limit. Knows no provider's format and decides nothing: no retries, no sleeping, no
counting.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from ..errors import CaptionError, TransientError
from ..records import ChatResult, RateInfo
from .base import HttpRequest, Provider

__all__ = ["MAX_ANSWER_BYTES", "MAX_CONTROL_BYTES", "Transport", "download_to", "loads_or_none", "proxy_for",
           "read_bounded"]

MAX_ANSWER_BYTES = 8 * 2**20
"""The most one answer (a body, or a whole stream) may be, in bytes. A caption is a few KB, a JSON
answer with its usage a few more: 8 MB is generous, and an endless body stops here instead of
growing until the run dies of MemoryError."""


class Transport:
    """Sends requests over the run's one aiohttp session, with the job's time limits."""

    def __init__(self, session: aiohttp.ClientSession, *, timeout_s: float, idle_timeout_s: float, stream: bool,
                 on_rate_info: Callable[[RateInfo], None] | None = None):
        self._session = session
        self._limits = (timeout_s, idle_timeout_s)
        # sock_read is the longest silence between two stream chunks; a whole answer has only total.
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_read=idle_timeout_s if stream else None)
        self._on_rate_info = on_rate_info  # told the rate-limit counts of every response
        self._proxies: dict[str, str | None] = {}

    async def send(self, provider: Provider, request: HttpRequest) -> ChatResult:
        """Send one request; return its answer, or raise a `CaptionError` subclass for every failure."""
        proxy = self._proxy(request.url)
        try:
            async with self._session.post(request.url, json=request.body, headers=request.headers, proxy=proxy,
                                          timeout=self._timeout) as response:
                if self._on_rate_info is not None and (info := provider.rate_info(response.headers)):
                    self._on_rate_info(info)
                if response.status != 200 or response.content_type != "text/event-stream":
                    body = await read_bounded(response, MAX_ANSWER_BYTES)
                    error = provider.classify(response.status, response.headers, body)
                    if error is not None:
                        raise error
                    return provider.parse_body(body, response.headers)
                parser = provider.stream_parser(response.headers)
                size = 0
                async for chunk in response.content.iter_any():
                    size += len(chunk)
                    if size > MAX_ANSWER_BYTES:
                        response.close()
                        raise _too_large(MAX_ANSWER_BYTES, "stream")
                    parser.feed(chunk)
                return parser.result()
        except CaptionError:
            raise
        except asyncio.TimeoutError:
            raise TransientError(f"no answer within the time limit (timeout_s={self._limits[0]}, "
                                 f"idle_timeout_s={self._limits[1]})") from None
        except aiohttp.ClientError as err:
            raise TransientError(f"connection failed: {type(err).__name__}: {err}") from err

    def _proxy(self, url: str) -> str | None:
        origin = url.split("/", 3)[:3]
        key = "/".join(origin)
        if key not in self._proxies:
            self._proxies[key] = proxy_for(url)
        return self._proxies[key]


async def read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body of `response`, at most `limit` bytes; over it, the connection is closed and
    TransientError names the limit. A Content-Length over the limit is refused before reading."""
    if response.content_length is not None and response.content_length > limit:
        response.close()
        raise _too_large(limit, "body")
    chunks, size = [], 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            response.close()
            raise _too_large(limit, "body")
        chunks.append(chunk)
    return b"".join(chunks)


MAX_CONTROL_BYTES = 16 * 2**20  # the most a Files/Batches control answer may be (a page of batches is ~100 KB)
DOWNLOAD_BLOCK = 1 << 20


def loads_or_none(body: bytes | None) -> Any:
    """The JSON of a body, or None when it is empty or not JSON (every protocol's error bodies are read so)."""
    if not body:
        return None
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


async def download_to(session: aiohttp.ClientSession, url: str, dest: Path, *, headers: Mapping[str, str],
                      timeout: aiohttp.ClientTimeout,
                      classify: Callable[[int, Mapping[str, str], bytes], CaptionError | None]) -> None:
    """GET `url` and stream its body to `dest` (batch result files can be hundreds of MB, so they are
    never held whole); a status other than 200 raises what `classify` makes of its bounded body."""
    try:
        async with session.get(url, headers=headers, timeout=timeout) as response:
            if response.status != 200:
                body = await read_bounded(response, MAX_CONTROL_BYTES)
                raise classify(response.status, response.headers, body) or TransientError(
                    f"download answered {response.status}", status=response.status)
            with open(dest, "wb") as handle:
                async for block in response.content.iter_chunked(DOWNLOAD_BLOCK):
                    handle.write(block)
    except aiohttp.ClientError as err:
        raise TransientError(f"download failed: {type(err).__name__}: {err}") from err


def _too_large(limit: int, what: str) -> TransientError:
    return TransientError(f"answer {what} larger than {limit:,} bytes (the limit); connection closed")


def proxy_for(url: str) -> str | None:
    """The proxy that HTTPS_PROXY / HTTP_PROXY name for `url`, unless NO_PROXY covers its host.

    Read once per run and origin: aiohttp's trust_env looks the environment (and ~/.netrc) up
    again on every request, which cost almost a millisecond each here.
    """
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy
