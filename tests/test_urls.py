"""Images behind http(s) URLs (sources/urls.py): downloads within limits, over real HTTP on loopback.

A threaded HTTP server on 127.0.0.1 serves real image files and the answers a download must survive:
slow ones, failing ones (503 then fine, 429 with Retry-After), a Content-Length over the limit, a body
that grows past the limit with no Content-Length, a body that drips slower than the deadline, 404s.
"""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from pipeline.errors import BadImageError, FetchError
from pipeline.job import InputSettings
from pipeline.sources.urls import UrlItem, shown_url, url_item


def _jpeg(color=(200, 30, 30), size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG")
    return buffer.getvalue()


class _ImageHost:
    """What the handler serves and counts (one instance per server)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.hits: dict[str, int] = {}
        self.in_flight = 0
        self.most_in_flight = 0
        self.ranges: list[str | None] = []
        self.image = _jpeg()


def _handler(host: _ImageHost):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):  # noqa: N802 (http.server's name)
            path = self.path.split("?")[0]
            with host.lock:
                host.hits[path] = host.hits.get(path, 0) + 1
                hits = host.hits[path]
                host.ranges.append(self.headers.get("Range"))
            self._answer(path, hits)

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None):
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if "Content-Length" not in (headers or {}) and "Transfer-Encoding" not in (headers or {}):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _answer(self, path: str, hits: int):
            if path.startswith("/img/"):
                with host.lock:
                    host.in_flight += 1
                    host.most_in_flight = max(host.most_in_flight, host.in_flight)
                time.sleep(0.05)  # long enough for downloads to overlap
                with host.lock:  # before the body goes out: the client frees its slot once it has the body
                    host.in_flight -= 1
                return self._send(200, host.image, {"Content-Type": "image/jpeg"})
            if path.startswith("/flaky"):  # 503 twice, then the image
                return self._send(503, b"busy") if hits <= 2 else self._send(200, host.image)
            if path == "/throttled":  # 429 with Retry-After: 1, then the image
                return self._send(429, b"slow down", {"Retry-After": "1"}) if hits == 1 else self._send(200, host.image)
            if path == "/big":
                return self._send(200, b"", {"Content-Length": str(50_000_000)})
            if path == "/grows":  # no Content-Length: chunked, past the limit
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for _ in range(40):
                    chunk = b"x" * 100_000
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
                return None
            if path == "/drip":  # a byte every 0.2 s, forever
                self.send_response(200)
                self.send_header("Content-Length", "1000000")
                self.end_headers()
                try:
                    for _ in range(1000):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.2)
                except OSError:
                    pass
                return None
            if path == "/teapot":
                return self._send(418, b"no")
            if path == "/to-file":  # a redirect off the web, its signature in the query string
                return self._send(302, b"", {"Location": "file:///etc/passwd?sig=SIGNEDSECRET"})
            if path == "/to-ftp":
                return self._send(302, b"", {"Location": "ftp://127.0.0.1:9/a.jpg?sig=SIGNEDSECRET"})
            return self._send(404, b"not here")

    return Handler


@pytest.fixture(scope="module")
def image_host():
    host = _ImageHost()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(host))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    yield host, base
    server.shutdown()
    server.server_close()


def _item(url: str, **kw) -> UrlItem:
    settings = dict(key="k", max_bytes=2_000_000, per_host=8, timeout_s=10.0, attempts=3)
    settings.update(kw)
    return UrlItem(url=url, **settings)


def test_download_reads_the_image_bytes(image_host):
    host, base = image_host
    assert _item(f"{base}/img/a.jpg").read() == host.image


def test_transient_answers_are_retried_until_they_pass(image_host):
    host, base = image_host
    assert _item(f"{base}/flaky").read() == host.image
    assert host.hits["/flaky"] == 3
    started = time.monotonic()
    assert _item(f"{base}/throttled").read() == host.image
    assert time.monotonic() - started >= 0.9  # the Retry-After: 1 was waited out (a lower bound, not a timing)


def test_attempts_run_out_into_a_fetch_error(image_host):
    _, base = image_host
    with pytest.raises(FetchError, match=r"HTTP 503.*after 1 of 1 tries"):
        _item(f"{base}/flaky-once", attempts=1).read()


def test_a_fetch_error_is_an_error_kind_of_its_own_and_a_kind_of_bad_image():
    assert FetchError.kind == "fetch" and issubclass(FetchError, BadImageError)


def test_client_errors_are_not_retried(image_host):
    host, base = image_host
    with pytest.raises(FetchError, match="HTTP 404"):
        _item(f"{base}/gone.jpg").read()
    with pytest.raises(FetchError, match="HTTP 418"):
        _item(f"{base}/teapot").read()
    assert host.hits["/gone.jpg"] == 1 and host.hits["/teapot"] == 1


def test_a_content_length_over_the_limit_is_refused_unread(image_host):
    _, base = image_host
    with pytest.raises(FetchError, match=r"50\.00 MB, over the 2\.00 MB limit \(\[input\] max_file_mb\)"):
        _item(f"{base}/big").read()


def test_a_body_that_grows_past_the_limit_is_cut_and_refused(image_host):
    _, base = image_host
    with pytest.raises(FetchError, match=r"over the 2\.00 MB limit"):
        _item(f"{base}/grows").read()


def test_a_dripping_body_stops_at_the_deadline(image_host):
    _, base = image_host
    with pytest.raises(FetchError, match="timed out"):
        _item(f"{base}/drip", timeout_s=1.0, attempts=1).read()


def test_nothing_listening_is_a_fetch_error():
    with pytest.raises(FetchError, match="connection refused"):
        _item("http://127.0.0.1:9/x.jpg", attempts=2).read()


def test_downloads_in_flight_per_host_are_bounded(image_host):
    host, base = image_host
    with host.lock:
        host.most_in_flight = 0
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda i: _item(f"{base}/img/{i}.jpg", per_host=3).read(), range(24)))
    assert all(r == host.image for r in results)
    assert host.most_in_flight == 3


def test_open_asks_for_the_header_bytes_only(image_host):
    host, base = image_host
    with _item(f"{base}/img/header.jpg").open() as handle:
        assert handle.read(2) == b"\xff\xd8"
    assert host.ranges[-1] == "bytes=0-65535"


def test_messages_never_show_a_query_string(image_host):
    _, base = image_host
    signed = f"{base}/gone.jpg?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=deadbeef"
    with pytest.raises(FetchError) as caught:
        _item(signed).read()
    assert "deadbeef" not in str(caught.value) and "AKIAEXAMPLE" not in str(caught.value)
    assert shown_url("https://h:8/a.jpg?sig=1#f") == "https://h:8/a.jpg?…"


@pytest.mark.parametrize("path", ["/to-file", "/to-ftp"], ids=["file", "ftp"])
def test_a_redirect_off_http_is_refused_without_its_query_string(image_host, path):
    """urllib follows a redirect to ftp:// and names a refused file:// target whole, query string and all."""
    host, base = image_host
    with pytest.raises(FetchError, match=r"redirected to .*, not an http\(s\) URL") as caught:
        _item(f"{base}{path}").read()
    assert "SIGNEDSECRET" not in str(caught.value) and host.hits[path] == 1


def test_url_item_takes_the_jobs_input_settings():
    settings = InputSettings(max_file_mb=3.0, fetch_per_host=2, fetch_timeout_s=5.0, fetch_attempts=4, send="url")
    item = url_item("https://example.com/a.jpg", "a", settings, {"id": 7})
    assert (item.max_bytes, item.per_host, item.timeout_s, item.attempts, item.send_url, item.kept) == \
        (3_000_000, 2, 5.0, 4, True, {"id": 7})
