"""localserver/remote_image.py: image URLs the bundled endpoint fetches itself, as a provider would.

OpenAI's `image_url.url` and Anthropic's `{"type": "url"}` image source may name an http(s) URL
that the provider downloads (https://platform.openai.com/docs/guides/images-vision "Passing a URL";
https://docs.anthropic.com/en/docs/build-with-claude/vision "URL-based image source"). The bundled
endpoint does the same, for loopback hosts only (it is a test server: it must never reach out),
within a size limit and a timeout. Its own code: it shares nothing with the client's downloader.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.error
import urllib.parse
import urllib.request

__all__ = ["fetch_image", "FetchRefused", "MAX_BYTES", "is_remote"]

MAX_BYTES = 20 * 2**20  # what OpenAI's vision guide allows a request's images ("up to 20MB per image")
TIMEOUT_S = 10.0


class FetchRefused(Exception):
    """The URL was not fetched, or not wholly: the message says why (the route turns it into a 400)."""


def is_remote(url: str) -> bool:
    return url[:8].lower().startswith(("http://", "https://"))


def fetch_image(url: str) -> bytes:
    """The bytes behind `url`, when its host is a loopback address; FetchRefused otherwise."""
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        raise FetchRefused(f"cannot resolve host {host!r}") from None
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise FetchRefused(f"host {host!r} is not a loopback address; the bundled endpoint fetches only those")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "caption-localserver"}),
                         timeout=TIMEOUT_S) as response:
            data = response.read(MAX_BYTES + 1)
    except urllib.error.HTTPError as err:
        raise FetchRefused(f"the image URL answered HTTP {err.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise FetchRefused(f"error while downloading the image URL ({type(err).__name__})") from None
    if len(data) > MAX_BYTES:
        raise FetchRefused(f"the image at the URL is over {MAX_BYTES} bytes")
    return data
