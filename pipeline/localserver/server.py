"""server.py: the bundled endpoint's HTTP server: `LocalServer` and `serve_forever`.

Owns the lifecycle (an aiohttp app on its own event loop in a daemon thread, with the decode
threads; start, stop, the context manager), the routing (`/health`, then every protocol's
`add_routes`), and `LocalServer`'s public face: the behaviour controls tests, benchmarks and the
CLI call, each handed to the shared `Core` or to the protocol whose state it concerns.

It must not speak a protocol itself: requests are read and answered by the protocol modules
(`openai_chat`, `openai_batch`; a new protocol is one more module with an `add_routes(app)` and
one more entry in `LocalServer._protocols`). It imports nothing from the rest of `pipeline`: only
aiohttp, the standard library and modules of this package.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from .core import Core, Observed
from .limits import LimitSettings
from .anthropic_batch import AnthropicBatches
from .anthropic_messages import AnthropicMessages
from .gemini_batch import GeminiBatches, GeminiBatchSeen
from .gemini_batch_files import GeminiFiles
from .gemini_generate import GeminiGenerate
from .openai_batch import OpenAIBatch
from .openai_batch_state import BatchSeen
from .openai_chat import OpenAIChat
from .wire import json_response, request_headers

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024 * 1024  # aiohttp's default is 1 MiB, too small for a large data URL
DECODE_THREADS = 4  # Pillow releases the GIL while decoding, so images decode in parallel
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
SHUTDOWN_GRACE_S = 1.0  # aiohttp's wait for handlers at stop; ours are cancelled before that


class _LoopThread:
    """Serves an aiohttp app on its own event loop in a daemon thread; cancels the core's tasks at stop."""

    def __init__(self, host: str, port: int, core: Core, make_app: Callable[[], web.Application]):
        self._host, self._port, self._core, self._make_app = host, port, core, make_app
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._startup_error: BaseException | None = None
        self.bound_port: int | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Start the thread and wait until the socket is bound (or the start failed, which raises)."""
        ready = threading.Event()
        self._startup_error = None
        self._core.pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="localserver-decode")
        self._thread = threading.Thread(target=self._run_loop, args=(ready,), name="localserver", daemon=True)
        self._thread.start()
        if not ready.wait(START_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"LocalServer did not start within {START_TIMEOUT_S} s")
        if self._startup_error is not None:
            error = self._startup_error
            self.stop()
            raise error

    def stop(self) -> None:
        """Cancel what is in flight, close the socket, join the thread. Idempotent."""
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and stop_event is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop_event.set)
            except RuntimeError:  # the loop closed between the check and the call
                pass
        thread.join(STOP_TIMEOUT_S)
        if self._core.pool is not None:
            self._core.pool.shutdown(wait=False, cancel_futures=True)
        self._thread = self._loop = self._stop_event = self._core.pool = None
        self.bound_port = None

    def _run_loop(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(ready))
        except BaseException as err:  # report a failed start to start(), which re-raises it
            self._startup_error = err
        finally:
            ready.set()
            loop.close()

    async def _serve(self, ready: threading.Event) -> None:
        self._stop_event = asyncio.Event()
        runner = web.AppRunner(self._make_app(), handler_cancellation=True, access_log=None,
                               shutdown_timeout=SHUTDOWN_GRACE_S)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port)
            await site.start()
            self.bound_port = runner.addresses[0][1]
            ready.set()
            await self._stop_event.wait()
        finally:
            pending = list(self._core.tasks)
            for task in pending:  # "hang" and latency sleeps end now
                task.cancel()
            await runner.cleanup()
            await asyncio.gather(*pending, return_exceptions=True)  # let them finish cancelling


class LocalServer:
    """An OpenAI-compatible captioning server on its own event loop in a daemon thread.

    Use as a context manager (`with LocalServer() as server: server.base_url`), or call `start()`
    and `stop()`. The behaviour controls (`set_latency`, `fail_next`, `rate_limit`, `reset`) and
    `observed()` may be called from any thread while it runs.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, latency_s: float = 0.0,
                 latency_sigma: float = 0.0, api_key: str | None = None, seed: int = 0,
                 image_token_scale: float = 1.0):
        self._host = host
        self._core = Core(latency_s=latency_s, latency_sigma=latency_sigma, api_key=api_key, seed=seed,
                          image_token_scale=image_token_scale)
        self._chat = OpenAIChat(self._core)
        self._batch = OpenAIBatch(self._core)
        anthropic = AnthropicMessages(self._core)
        gemini = GeminiGenerate(self._core)
        self._gemini_files = GeminiFiles(self._core, gemini)
        self._gemini_batches = GeminiBatches(self._core, gemini, self._gemini_files)
        # each adds its routes to the app (Gemini's batches before generateContent's models/{target})
        self._protocols = (self._chat, self._batch, anthropic, AnthropicBatches(self._core, anthropic),
                           self._gemini_files, self._gemini_batches, gemini)
        self._life = _LoopThread(host, port, self._core, self._make_app)

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The OpenAI base URL of the running server, e.g. "http://127.0.0.1:41234/v1"."""
        if self._life.bound_port is None:
            raise RuntimeError("LocalServer is not running; call start() first")
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._life.bound_port}/v1"

    def start(self) -> str:
        """Start serving in a daemon thread; return the base URL once the socket is bound.

        Raises RuntimeError if already running, OSError if the address cannot be bound.
        """
        if self._life.running:
            raise RuntimeError("LocalServer is already running")
        self._life.start()
        log.debug("local server listening on %s", self.base_url)
        return self.base_url

    def stop(self) -> None:
        """Stop serving: cancel what is in flight, close the socket, join the thread. Idempotent."""
        self._life.stop()

    def __enter__(self) -> LocalServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/health", _handle_health)
        for protocol in self._protocols:
            protocol.add_routes(app)
        return app

    # -- behaviour controls (any thread) ---------------------------------------------------------

    def set_latency(self, seconds: float, sigma: float = 0.0) -> None:
        """Delay every chat answer by `seconds`; with sigma > 0, draw lognormal delays with that median.

        Draws come from a RNG seeded at construction, so a run's delays repeat.
        """
        self._core.set_latency(seconds, sigma)

    def fail_next(self, fault: str, times: int = 1, *, retry_after_s: float | None = None) -> None:
        """Queue `fault` for the next `times` chat requests that pass validation and limits (FIFO).

        A request that gets 400/401 or a limit's 429 does not use up a queued fault. The faults:

        - "500" "502" "503" "504" "408": that status, JSON error of type server_error.
        - "html502": 502 with nginx's HTML error page.
        - "400" (invalid image), "413", "422": client-error statuses with an OpenAI error body.
        - "401", "403_quota" (one-api/new-api quota), "404_model", "429_quota": fatal-class errors.
        - "429": rate_limit_exceeded, with retry-after and retry-after-ms when `retry_after_s` is given.
        - "429_bare": 429 with an empty body and no headers at all.
        - "429_flex": flex's 429 "Resource Unavailable" (code resource_unavailable); queue it before flex requests.
        - "error200": 200 whose JSON body is a gateway-style error (also for stream requests).
        - "stream_error": a few content deltas, an error event, [DONE] (without stream: as error200).
        - "no_done": the stream ends without [DONE] (without stream: half the body, then EOF).
        - "no_finish": no finish_reason and no usage anywhere (one-api dropping an upstream error).
        - "no_usage": a normal answer without usage.
        - "malformed": a body (or a stream event) that is not JSON.
        - "drop": the connection is cut (for a stream, after the first chunk).
        - "hang": nothing (for a stream, after the first chunk) until the client gives up.
        - "empty": a normal answer whose content is "".
        - "bad_json": a normal answer whose content is chatty text, not the JSON that was asked for.

        Raises ValueError for a name not in FAULTS or a negative count.
        """
        self._core.fail_next(fault, times, retry_after_s=retry_after_s)

    def rate_limit(self, *, rpm: int | None = None, tpm: int | None = None, concurrency: int | None = None,
                   headers: bool = True, penalty_s: float = 0.0, rps: int | None = None, tps: int | None = None,
                   start_empty: bool = False, concurrency_retry_after_s: float | None = None) -> None:
        """Replace the limits: requests and tokens per minute and per second, requests in flight, 429 penalty window.

        None means no limit. Buckets start full, or empty with `start_empty` (another client just
        used them). Per-minute buckets send x-ratelimit-* headers; per-second ones name themselves
        only in their 429's message ("on requests per second (RPS): Limit 10, ..."). With
        headers=False, no x-ratelimit-* or retry-after headers are sent. A request over the
        concurrency cap gets a bare 429, or, with `concurrency_retry_after_s`, "Too many concurrent
        requests" with retry-after / retry-after-ms (and still no x-ratelimit-*), as relays answer.
        Raises ValueError for a limit below 1, a negative penalty or an out-of-range wait.
        """
        self._core.rate_limit(LimitSettings(rpm=rpm, tpm=tpm, concurrency=concurrency, headers=headers,
                                            penalty_s=penalty_s, rps=rps, tps=tps, start_empty=start_empty,
                                            concurrency_retry_after_s=concurrency_retry_after_s))

    def set_image_token_scale(self, scale: float) -> None:
        """Count image tokens at `scale` times OpenAI's gpt-4o tile rule (85 + 170 per tile), in usage and TPM.

        The server counts every model's images by that rule (a relay or self-hosted server counting
        its own way); a scale other than 1 makes it count differently from the gpt-4o formula too.
        Raises ValueError unless 0 < scale <= 1000.
        """
        self._core.set_image_token_scale(scale)

    def reset(self) -> None:
        """Forget faults, limits and observations; latency, the image token scale and the RNG go back
        to their start values.

        Files, batches and the batch controls are forgotten too.
        """
        self._core.reset()

    def observed(self) -> list[Observed]:
        """Return a copy of the observations of every chat request, in arrival order.

        Only the newest THUMBS_KEPT keep their thumbnail; at most MAX_OBSERVED are kept.
        """
        return self._core.observed()

    def _draw_latency(self) -> float:
        """The next latency draw (as a chat answer would wait it); for tests of the RNG."""
        return self._core.draw_latency()

    # -- Files and Batches: controls (any thread) -----------------------------------------------

    def set_batch_delay(self, seconds: float) -> None:
        """Let every new batch stay `in_progress` for `seconds` before its lines run."""
        self._batch.state.set_batch_delay(seconds)

    def fail_next_batch(self, outcome: str, *, run_lines: int | None = None) -> None:
        """Make the next created batch end as `outcome` ("failed", "expired" or "cancelled").

        "failed" runs nothing (as a batch that fails validation); "queue_full" fails the same way with
        code token_limit_exceeded (the provider's queue of enqueued tokens is full). "expired" runs `run_lines` lines
        (default half), then lists the rest in the error file with code `batch_expired`.
        "cancelled" runs `run_lines` lines (default half); the rest appear in neither file.
        """
        self._batch.state.fail_next_batch(outcome, run_lines=run_lines)

    def fail_batch_lines(self, fault: str, times: int = 1) -> None:
        """Answer the next `times` batch request lines that run with `fault` (see BATCH_LINE_FAULTS):
        that HTTP status in the line's response, or "batch_expired" in its error."""
        self._batch.state.fail_batch_lines(fault, times)

    def fail_ended_retrieves(self, times: int = 1, *, after: int = 0) -> None:
        """Answer 503 to `times` retrieves of an ended batch, after letting `after` of them through."""
        self._batch.state.fail_ended_retrieves(times, after=after)

    def shuffle_batch_output(self, shuffle: bool) -> None:
        """Write output and error files in random order (the default, as OpenAI does not promise
        an order) or in input order."""
        self._batch.state.shuffle_batch_output(shuffle)

    def batches(self) -> list[BatchSeen]:
        """Every batch created since the last reset, oldest first, with its metadata and line count."""
        return self._batch.state.seen()

    # -- Gemini Batch Mode: controls (any thread) --------------------------------------------------

    def fail_next_gemini_create(self, times: int = 1, *, created: bool = False) -> None:
        """Answer the next `times` batchGenerateContent calls 503 UNAVAILABLE: before making the batch,
        or (`created`) after making it, as when the answer is lost on its way back."""
        self._gemini_batches.fail_next_create(times, created=created)

    def end_next_gemini_batch(self, outcome: str, *, run_lines: int | None = None) -> None:
        """Make the next created Gemini batch end as `outcome`: "failed" (BATCH_STATE_FAILED, running
        nothing), "expired" or "cancelled" after running `run_lines` requests (default half)."""
        self._gemini_batches.end_next_batch(outcome, run_lines)

    def limit_gemini_batches(self, live: int | None) -> None:
        """Answer a batchGenerateContent 429 RESOURCE_EXHAUSTED (no RetryInfo) while `live` Gemini batches
        are pending or running; None lifts the cap. Raises ValueError for a cap below 1."""
        self._gemini_batches.limit_live(live)

    def gemini_refused_creates(self) -> int:
        """How many batchGenerateContent calls the live-batch cap refused since the last reset."""
        return self._gemini_batches.refused

    def gemini_files(self) -> list[str]:
        """The names of the files the Gemini Files API holds now (uploaded, and batch results)."""
        return self._gemini_files.names()

    def gemini_batches(self) -> list[GeminiBatchSeen]:
        """Every Gemini batch created since the last reset, oldest first."""
        return self._gemini_batches.seen()


async def _handle_health(request: web.Request) -> web.Response:
    return json_response(200, {"status": "ok"}, request_headers())


def serve_forever(host: str = "127.0.0.1", port: int = 8000, *, latency_s: float = 0.0,
                  latency_sigma: float = 0.0, rpm: int | None = None, tpm: int | None = None,
                  concurrency: int | None = None, api_key: str | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM (for `caption serve`); print the base URL line once listening.

    Raises OSError when the address cannot be bound.
    """
    server = LocalServer(host, port, latency_s=latency_s, latency_sigma=latency_sigma, api_key=api_key)
    if rpm or tpm or concurrency:
        server.rate_limit(rpm=rpm, tpm=tpm, concurrency=concurrency)
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
    try:
        with server:
            print(f"caption serve: listening on {server.base_url}", flush=True)
            while not stop.wait(0.5):
                pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
