"""sources/urls.py: images behind http(s) URLs, downloaded within limits or sent as the URL itself.

A table source (`table.py`) makes a `UrlItem` for each `http://` or `https://` value of its path
column. How the image reaches the model is the job's `[input] send`:

- `send = "bytes"` (the default): `UrlItem.read` downloads it, and the image stage encodes it like
  any file. Every download is bounded: at most `fetch_per_host` in flight per host (a process-wide
  slot per host, held only while bytes move, never during a backoff), `fetch_timeout_s` for the
  whole download, `max_file_mb` (a `Content-Length` over it is refused unread; a body is read to
  at most the limit + 1 byte), and `fetch_attempts` tries with exponential backoff and jitter
  for what may pass (connection errors, timeouts, 408, 425, 429, 5xx; a `Retry-After` in seconds
  is honoured within the time left). A download that fails is a `FetchError`: an error row with
  `error_kind = "fetch"`, never a crash; the next run tries it again.
- `send = "url"`: nothing is downloaded; the request carries the URL and the provider fetches it
  (OpenAI's `image_url.url` and Anthropic's `{"type": "url"}` image source take http(s) URLs;
  Gemini takes none here, so a job with `api = "gemini"` refuses `send = "url"`). The image's size is
  not known, so the limiter reserves tokens for the largest image the job allows, and the row's
  size and hash columns are empty (and no dedupe by bytes is possible).

Error messages name the URL without its query string: a signed URL (S3 presigned, Azure SAS) carries
its credential there.
"""

from __future__ import annotations

import errno
import http.client
import io
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from ..errors import FetchError
from ..job import InputSettings

__all__ = ["UrlItem", "url_item", "is_http_url", "shown_url", "shown_urls", "HEADER_BYTES"]

HEADER_BYTES = 64 * 1024
"""What a ranged read asks for: enough for the size fields of every format the image stage reads."""

_CHUNK = 64 * 1024
_USER_AGENT = "caption (+https://github.com/caption; image downloader)"
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
"""Statuses that may pass: RFC 9110 §15 (408 Request Timeout, 5xx), RFC 8470 (425 Too Early),
RFC 6585 (429 Too Many Requests)."""
_BACKOFF_BASE_S, _BACKOFF_MAX_S = 0.5, 8.0
_IDLE_S = 10.0
"""Longest wait for one read of the socket; the whole download is bounded by `fetch_timeout_s` too."""

_URL = re.compile(r"https?://[^\s'\"<>]+", re.IGNORECASE)

_slots_lock = threading.Lock()
_slots: dict[tuple[str, int, int], threading.BoundedSemaphore] = {}  # (host, port, per_host) → its slots


def is_http_url(value: str) -> bool:
    """True for an http:// or https:// URL (the only URLs this module fetches)."""
    return value[:8].lower().startswith(("http://", "https://"))


def shown_url(url: str) -> str:
    """The URL as messages show it: scheme, host, path; a query string or fragment becomes "?…"."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # a port that is not a number
        port = ""
    host = parts.hostname or ""  # user:password@ is dropped too
    return f"{parts.scheme}://{host}{port}{parts.path}" + ("?…" if parts.query or parts.fragment else "")


def shown_urls(text: str) -> str:
    """`text` with every http(s) URL in it as `shown_url` shows it: for a server's message that names
    the URL it was sent (a provider's "Error while downloading <url>" with `send = "url"`)."""
    return _URL.sub(lambda match: shown_url(match.group()), text)


@dataclass(frozen=True, slots=True)
class UrlItem:
    """One image behind an http(s) URL (see the module docstring)."""

    url: str
    key: str
    max_bytes: int | None = None  # a larger image is refused; None: no limit
    per_host: int = 8
    timeout_s: float = 30.0
    attempts: int = 3
    send_url: bool = False  # send the URL itself: nothing is downloaded
    kept: Mapping[str, Any] = field(default_factory=dict)

    read_once = True
    """The image stage reads it whole once (the header probe then reads those bytes), rather than
    opening it for a probe and reading it again: that would download it twice."""

    def read(self) -> bytes:
        """The image's bytes; FetchError when they cannot be had within the limits."""
        return _download(self, limit=self.max_bytes)

    def open(self) -> BinaryIO:
        """The first `HEADER_BYTES` bytes (a ranged GET), for an estimate that reads headers only."""
        return io.BytesIO(_download(self, limit=None, first=HEADER_BYTES))


def url_item(url: str, key: str, settings: InputSettings, kept: Mapping[str, Any] | None = None) -> UrlItem:
    """The item for one http(s) URL under the job's `[input]` settings."""
    return UrlItem(url=url, key=key, max_bytes=round(settings.max_file_mb * 1e6), per_host=settings.fetch_per_host,
                   timeout_s=settings.fetch_timeout_s, attempts=settings.fetch_attempts,
                   send_url=settings.send == "url", kept=dict(kept or {}))


def _slot(url: str, per_host: int) -> threading.BoundedSemaphore:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    with _slots_lock:
        return _slots.setdefault(((parts.hostname or "").lower(), port, per_host), threading.BoundedSemaphore(per_host))


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) URLs only. urllib's own handler also follows one to ftp://, and
    refuses one to file:// with the target, query string and all, in its message."""

    def http_error_302(self, req, fp, code, msg, headers):
        target = urllib.parse.urljoin(req.full_url, headers.get("Location") or headers.get("URI") or "")
        if not is_http_url(target):  # checked before urllib's own check, whose message names the target
            fp.close()
            raise FetchError(f"cannot download {shown_url(req.full_url)}: redirected to {shown_url(target)}, "
                             "not an http(s) URL")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


_opener = urllib.request.build_opener(_HttpOnlyRedirects)


class _Retry(Exception):
    def __init__(self, reason: str, wait_s: float | None = None):
        super().__init__(reason)
        self.wait_s = wait_s


def _download(item: UrlItem, *, limit: int | None, first: int | None = None) -> bytes:
    """The body of `item.url` (its first `first` bytes when given), within the item's limits."""
    deadline = time.monotonic() + item.timeout_s
    reason = "no attempt made"
    for attempt in range(1, item.attempts + 1):
        try:
            with _slot(item.url, item.per_host):
                return _get(item.url, deadline, limit=limit, first=first)
        except _Retry as err:
            reason = str(err)
            if attempt == item.attempts:
                break
            backoff = min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            wait = max(backoff, err.wait_s or 0.0)
            if time.monotonic() + wait >= deadline:
                reason += f"; no time left for another try within {item.timeout_s:g} s ([input] fetch_timeout_s)"
                break
            time.sleep(wait)
    raise FetchError(f"cannot download {shown_url(item.url)}: {reason} "
                     f"(after {attempt} of {item.attempts} tries, [input] fetch_attempts)")


def _get(url: str, deadline: float, *, limit: int | None, first: int | None) -> bytes:
    """One GET; raises _Retry for what may pass and FetchError for what will not."""
    headers = {"User-Agent": _USER_AGENT, "Accept": "image/*,*/*;q=0.5"}
    if first is not None:
        headers["Range"] = f"bytes=0-{first - 1}"  # RFC 9110 §14.2; a server may ignore it and send all
    request = urllib.request.Request(url, headers=headers)
    try:
        with _opener.open(request, timeout=min(_left(deadline), _IDLE_S)) as response:
            size = response.headers.get("Content-Length", "")
            if limit is not None and size.isdigit() and int(size) > limit:
                raise FetchError(f"{shown_url(url)} is {int(size) / 1e6:,.2f} MB, over the "
                                 f"{limit / 1e6:,.2f} MB limit ([input] max_file_mb); not downloaded")
            return _body(response, deadline, limit=limit, first=first, url=url)
    except urllib.error.HTTPError as err:
        with err:
            if err.code in _RETRY_STATUS:
                raise _Retry(f"HTTP {err.code}", _retry_after(err.headers.get("Retry-After"))) from None
            raise FetchError(f"cannot download {shown_url(url)}: HTTP {err.code} {err.reason}") from None
    except FetchError:
        raise
    except urllib.error.URLError as err:
        if isinstance(err.reason, (socket.timeout, TimeoutError, ConnectionError, OSError)):
            raise _Retry(_os_reason(err.reason)) from None
        raise FetchError(f"cannot download {shown_url(url)}: {err.reason}") from None
    except (TimeoutError, socket.timeout):
        raise _Retry("timed out") from None
    except (ConnectionError, http.client.HTTPException, OSError) as err:
        raise _Retry(_os_reason(err)) from None
    except ValueError as err:  # urllib's word for a URL it cannot parse
        raise FetchError(f"cannot download {shown_url(url)}: {err}") from None


def _body(response: Any, deadline: float, *, limit: int | None, first: int | None, url: str) -> bytes:
    """Read the body in chunks, never past `limit` + 1 bytes (or `first`), nor past the deadline."""
    cap = first if first is not None else (None if limit is None else limit + 1)
    data = bytearray()
    while cap is None or len(data) < cap:
        if time.monotonic() >= deadline:
            raise _Retry("timed out while reading the body")
        chunk = response.read1(_CHUNK if cap is None else min(_CHUNK, cap - len(data)))  # one recv: the
        # deadline is checked between reads, each read waits at most the socket's timeout (`_IDLE_S`)
        if not chunk:
            break
        data += chunk
    if first is None and limit is not None and len(data) > limit:
        raise FetchError(f"{shown_url(url)} is over the {limit / 1e6:,.2f} MB limit ([input] max_file_mb); "
                         "not downloaded")
    return bytes(data)


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Retry("timed out")
    return left


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (RFC 9110 §10.2.3), when it is a small whole number; a date is ignored."""
    if value and value.strip().isdigit():
        return min(float(value.strip()), 300.0)
    return None


def _os_reason(err: BaseException) -> str:
    if isinstance(err, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(err, OSError) and err.errno in (errno.ECONNREFUSED, errno.ECONNRESET):
        return "connection refused" if err.errno == errno.ECONNREFUSED else "connection reset"
    return f"{type(err).__name__}: {getattr(err, 'strerror', None) or err}"
