"""Hostile servers the bundled endpoint is too well-behaved to be: endless bodies, absurd usage, keys echoed back,
gateways that end a dropped upstream "cleanly". Each is a tiny aiohttp app on loopback, defined here, that
`caption run` talks to over real HTTP; the assertions are on what ends up in the out folder and the output."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from aiohttp import web
from PIL import Image

from conftest import copy_samples, distinct_copies, read_rows
from pipeline.providers.http import MAX_ANSWER_BYTES

Handler = Callable[[web.Request, int], Awaitable[web.StreamResponse]]
KEY = "sk-proj-" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z" * 3  # a 104-character key, as OpenAI's project keys are
assert len(KEY) == 104


class Hostile:
    """A loopback HTTP server in its own thread; `handler(request, n)` answers the n-th chat request (from 1)."""

    def __init__(self):
        self.handler: Handler | None = None
        self.requests: list[dict] = []  # the JSON bodies received, in order
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        return await self.handler(request, len(self.requests))

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def hostile_server() -> Iterator[Hostile]:
    server = Hostile()
    yield server
    server.stop()


@pytest.fixture
def hostile(hostile_server: Hostile) -> Hostile:
    hostile_server.requests.clear()
    hostile_server.handler = None
    return hostile_server


def completion(text: str = "A red brick wall in daylight.", *, usage: dict | None = None, model: str = "gpt-test",
               id: str = "chatcmpl-1", finish: str = "stop") -> dict:
    usage = {"prompt_tokens": 90, "completion_tokens": 8, "total_tokens": 98} if usage is None else usage
    return {"id": id, "object": "chat.completion", "model": model, "usage": usage,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}]}


async def sse(request: web.Request, chunks: list[dict | str]) -> web.StreamResponse:
    """An event stream of `chunks` (dicts as JSON, strings as they are), as OpenAI frames them."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for chunk in chunks:
        data = chunk if isinstance(chunk, str) else json.dumps(chunk)
        await response.write(f"data: {data}\n\n".encode())
    await response.write_eof()
    return response


def delta(text: str | None = None, finish: str | None = None) -> dict:
    choice = {"index": 0, "delta": {"content": text} if text is not None else {}, "finish_reason": finish}
    return {"id": "chatcmpl-s", "object": "chat.completion.chunk", "model": "gpt-test", "choices": [choice]}


USAGE_CHUNK = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "model": "gpt-test", "choices": [],
               "usage": {"prompt_tokens": 90, "completion_tokens": 8, "total_tokens": 98}}


def full_stream(text: str = "A red brick wall in daylight.") -> list[dict | str]:
    return [delta(text), delta(finish="stop"), USAGE_CHUNK, "[DONE]"]


@pytest.fixture
def run(tmp_path, cli, write_job, monkeypatch, hostile):
    """`run(folder, *flags, **job_overrides)`: caption run against the hostile server, key = KEY; Ran."""
    monkeypatch.setenv("HOSTILE_KEY", KEY)

    def go(folder: Path, *flags: str, out: Path | None = None, **overrides):
        job = write_job(tmp_path / "job.toml", endpoint_api_key_env="HOSTILE_KEY", limits_concurrency=1,
                        **{"endpoint_stream": False, "limits_max_attempts": 2, **overrides})
        return cli("run", folder, "--job", job, "--out", out or tmp_path / "out", "--base-url", hostile.base_url,
                   "--no-progress", *flags)

    return go


@pytest.fixture
def one_image(tmp_path) -> Path:
    return copy_samples(tmp_path / "in", ["brick_wall_grey.jpg"])


# --- item 2: nothing is read without a size limit ------------------------------------------------


ENDLESS_BYTES = 5 * MAX_ANSWER_BYTES  # "endless" enough: a run without a limit reads it all (and then fails to parse)


async def endless_body(request: web.Request, n: int) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    block = b'{"pad": "' + b"x" * (1 << 20)
    try:
        for _ in range(ENDLESS_BYTES // len(block)):
            await response.write(block)
    except (ConnectionResetError, RuntimeError):
        pass  # the client hung up: what it should do
    return response


async def endless_stream(request: web.Request, n: int) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    event = f"data: {json.dumps(delta('x' * 4000))}\n\n".encode()
    try:
        for _ in range(ENDLESS_BYTES // len(event)):
            await response.write(event)
    except (ConnectionResetError, RuntimeError):
        pass
    return response


@pytest.mark.parametrize(("handler", "stream"), [(endless_body, False), (endless_stream, True)],
                         ids=["body", "stream"])
def test_an_endless_answer_stops_at_the_limit_and_is_a_transient_error_row(hostile, run, one_image, tmp_path,
                                                                           handler, stream):
    hostile.handler = handler
    ran = run(one_image, endpoint_stream=stream)
    assert ran.code == 1, ran.err
    (row,) = read_rows(tmp_path / "out")
    assert row["error_kind"] == "transient" and f"larger than {MAX_ANSWER_BYTES:,} bytes" in row["error"]
    assert row["attempts"] == 2 and len(hostile.requests) == 2


# --- item 3: every number a server sends is checked before it is stored ---------------------------


def test_absurd_usage_is_estimated_and_flagged_and_the_folder_stays_readable(hostile, run, one_image, tmp_path,
                                                                             cli):
    async def absurd(request, n):
        return web.json_response(completion(usage={"prompt_tokens": 90, "completion_tokens": 10**15,
                                                   "total_tokens": 10**15 + 90}))

    hostile.handler = absurd
    ran = run(one_image)
    assert ran.code == 0, ran.err
    (row,) = read_rows(tmp_path / "out")
    assert row["status"] == "ok" and row["usage_source"] == "estimated" and "usage_rejected" in row["flags"]
    assert 0 < row["completion_tokens"] < 1000
    again = run(one_image)  # the folder is not wedged: a rerun opens it, and skips the done image
    assert again.code == 0 and "1 already done" in again.out
    assert cli("report", tmp_path / "out").code == 0


# --- items 5 and 6: the key is redacted before anything is cut, everywhere a server's text goes -----


def _bearer(request: web.Request) -> str:
    return request.headers.get("Authorization", "")


async def echo_in_html(request, n):
    # no <title>: the message is the page's first 80 characters, which hold most of the key
    page = f"<html><body>auth={_bearer(request)} was refused" + " " * 200 + "</body></html>"
    return web.Response(status=502, text=page, content_type="text/html")


async def echo_in_json_error(request, n):
    key = _bearer(request).removeprefix("Bearer ")
    return web.json_response({"error": {"message": f"bad key={key[:12]} (key={key})", "type": "server_error"}},
                             status=500)


async def echo_in_answer(request, n):
    key = _bearer(request).removeprefix("Bearer ")
    return web.json_response(completion(f"The key is {key}, or {key[:20]}.", model=f"m-{key}", id=key))


async def echo_in_stream(request, n):
    key = _bearer(request).removeprefix("Bearer ")
    return await sse(request, [{**delta(f"key {key[:9]}"), "id": key, "model": key}, delta(finish="stop"),
                               USAGE_CHUNK, "[DONE]"])


def _prefixes(secret: str) -> list[str]:
    return [secret[:n] for n in range(8, len(secret) + 1)]


@pytest.mark.parametrize(("handler", "stream"),
                         [(echo_in_html, False), (echo_in_json_error, False), (echo_in_answer, False),
                          (echo_in_stream, True)],
                         ids=["html-error-page", "json-error", "caption-model-id", "stream"])
def test_an_echoed_key_is_redacted_in_rows_logs_and_output(hostile, run, one_image, tmp_path, handler, stream):
    hostile.handler = handler
    ran = run(one_image, "-v", endpoint_stream=stream)
    shown = ran.out + ran.err
    stored = b"".join(p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file())
    table = pq.read_table(tmp_path / "out").to_pylist()
    assert table and "[redacted]" in json.dumps(table, default=str)
    cut = KEY[:8]  # no prefix of 8 characters or more survives (every longer one starts with this)
    assert cut not in shown and cut.encode() not in stored
    assert all(p not in json.dumps(table, default=str) for p in _prefixes(KEY))


def test_a_short_key_is_not_stored_cut(hostile, run, one_image, tmp_path, monkeypatch):
    monkeypatch.setenv("HOSTILE_KEY", "sk-SECRET123")

    async def echo(request, n):
        key = _bearer(request).removeprefix("Bearer ")
        return web.json_response({"error": {"message": f"key={key[:10]} is wrong"}}, status=500)

    hostile.handler = echo
    run(one_image)
    (row,) = read_rows(tmp_path / "out")
    assert "sk-SECRET" not in row["error"] and "key=[redacted]" in row["error"]


# --- item 13: a stream a gateway ended "cleanly" after the upstream dropped ----------------------


def test_a_stream_without_the_usage_chunk_this_server_sent_before_is_retried(hostile, run, tmp_path):
    folder = distinct_copies(tmp_path / "in", "brick_wall_grey.jpg", ["a.jpg", "b.jpg"])

    async def litellm(request, n):
        if n == 2:  # the upstream dropped after one token; the gateway said stop and [DONE]
            return await sse(request, [delta("A"), delta(finish="stop"), "[DONE]"])
        return await sse(request, full_stream())

    hostile.handler = litellm
    ran = run(folder, endpoint_stream=True, limits_max_attempts=3)
    assert ran.code == 0, ran.err
    rows = read_rows(tmp_path / "out")
    assert [r["caption"] for r in rows] == ["A red brick wall in daylight."] * 2
    assert len(hostile.requests) == 3 and rows[1]["attempts"] == 2


def test_an_empty_caption_with_stop_is_transient_and_gets_every_attempt(hostile, run, one_image, tmp_path):
    async def empty_then_fine(request, n):
        return web.json_response(completion("" if n < 3 else "A red brick wall."))

    hostile.handler = empty_then_fine
    ran = run(one_image, limits_max_attempts=3)
    assert ran.code == 0, ran.err
    (row,) = read_rows(tmp_path / "out")
    assert row["caption"] == "A red brick wall." and row["attempts"] == 3


def _sent_is_square(body: dict) -> bool:
    """Whether the image a chat request carries is square (the brick wall) rather than 3:2 (the cup)."""
    url = body["messages"][-1]["content"][-1]["image_url"]["url"]
    width, height = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size
    return width == height


def test_answers_under_min_chars_are_asked_again_then_kept_and_flagged(hostile, run, tmp_path):
    # Which image a request is for is read from the image it carries, not from the order requests
    # arrive in: a retry's backoff frees the slot, so the other image may go in between.
    folder = copy_samples(tmp_path / "in", {"a_short.jpg": "brick_wall_grey.jpg", "b_fine.jpg": "coffee_cup.jpg"})
    short_answers = iter(["Close-up", "A", "Close"])

    async def short(request, n):
        square = _sent_is_square(hostile.requests[n - 1])
        return web.json_response(completion(next(short_answers) if square else "A red brick wall in daylight."))

    hostile.handler = short
    ran = run(folder, limits_max_attempts=3, output_min_chars=12)
    assert ran.code == 0, ran.err
    rows = {r["image_path"]: r for r in read_rows(tmp_path / "out")}
    assert rows["b_fine.jpg"]["caption"] == "A red brick wall in daylight." and not rows["b_fine.jpg"]["flags"]
    short_row = rows["a_short.jpg"]  # walked first: three short answers, the last one kept and flagged
    assert (short_row["status"], short_row["caption"], short_row["attempts"]) == ("ok", "Close", 3)
    assert short_row["flags"] == ["under_min_chars"]


# --- item 18: an HTML page answered with status 200 -------------------------------------------------


async def html_with_200(request: web.Request, n: int) -> web.Response:
    page = "<html><head><title>Login required | Corporate proxy</title></head><body>" + "x" * 5000 + "</body></html>"
    return web.Response(text=page, content_type="text/html")


def test_an_html_page_with_status_200_is_an_error_naming_the_page(hostile, run, one_image, tmp_path):
    hostile.handler = html_with_200
    ran = run(one_image, limits_max_attempts=1)
    assert ran.code == 1
    (row,) = read_rows(tmp_path / "out")
    assert row["error_kind"] == "transient"
    assert row["error"] == "HTTP 200: answer is not a chat completion (HTML error page: Login required | Corporate proxy)"
