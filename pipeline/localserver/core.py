"""core.py: the state every protocol of the bundled endpoint shares, and the controls over it.

Owns the lock, the latency and its seeded RNG, the queue of injected faults, the rate limits, the
requests in flight, the handler and background tasks that stop() cancels, the decode thread pool
(set by the server while it runs), the API key check with its 401 body, and the observations
(`Observed`, with the thumbnail window). `Core.reset` also runs the reset hooks protocols register
for their own state. The controls are thread-safe; everything else is called on the server loop.

It must not know a route or a protocol's body: protocols read requests, decide what they cost and
build the `Observed` record; the core only charges, delays, queues and records. It imports only
aiohttp, Pillow (for the thumbnail's type), the standard library and the package's `wire` and
`limits`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image

from .limits import FAULTS, Limits, LimitSettings, Verdict, concurrency_rejection
from .wire import error_body, json_response

MAX_OBSERVED = 200_000  # observations kept; older ones fall off so a benchmark stays flat in memory
THUMBS_KEPT = 1_000  # only the newest observations keep their thumbnail (~12 kB each)


@dataclass(frozen=True, slots=True)
class Observed:
    """One chat request as the server received it and chose to answer it."""

    t: float  # time.monotonic() at arrival, seconds
    status: int  # HTTP status the server answered with; 0 when it sent none ("drop"/"hang" without stream)
    fault: str | None  # the injected fault, or the limit that answered 429 ("rpm", "tpm", "concurrency", "penalty")
    model: str | None
    stream: bool
    body_keys: tuple[str, ...]  # sorted top-level keys of the JSON body
    max_tokens: Any  # as received, None when absent
    max_completion_tokens: Any
    temperature: Any
    detail: str | None  # image_url.detail of the first image, None when absent
    image_mime: str | None  # the MIME type the first image's data URL declared
    image_size: tuple[int, int] | None  # (width, height) of the decoded first image, pixels
    thumb: Image.Image | None = field(default=None, compare=False, repr=False)  # RGB, long side <= 64 px
    authorized: bool = True  # Authorization matched the server's key (True when it has none)


class Core:
    """Shared state and behaviour controls; see the module docstring for who may call what."""

    def __init__(self, *, latency_s: float, latency_sigma: float, api_key: str | None, seed: int,
                 image_token_scale: float = 1.0):
        check_latency(latency_s, latency_sigma)
        check_scale(image_token_scale)
        self.api_key = api_key
        self._defaults = (latency_s, latency_sigma, seed, image_token_scale)
        self.lock = threading.Lock()  # guards the fields below, in_flight and the protocols' state
        self._latency = (latency_s, latency_sigma)
        self.rng = random.Random(seed)  # latency draws, and whatever protocols shuffle
        self._faults: deque[tuple[str, float | None]] = deque()
        self._limits: Limits | None = None
        self._image_token_scale = image_token_scale  # image tokens are counted at this multiple of the tile rule
        self._observed: deque[Observed] = deque(maxlen=MAX_OBSERVED)
        self._reset_hooks: list[Callable[[], None]] = []
        # loop-thread state: touched only by the server thread once it runs
        self.pool: ThreadPoolExecutor | None = None  # decode threads, set by the server while it runs
        self.in_flight = 0
        self.tasks: set[asyncio.Task[Any]] = set()  # handlers and batch runs, cancelled at stop

    # -- behaviour controls (any thread) ---------------------------------------------------------

    def set_latency(self, seconds: float, sigma: float = 0.0) -> None:
        check_latency(seconds, sigma)
        with self.lock:
            self._latency = (seconds, sigma)

    def fail_next(self, fault: str, times: int = 1, *, retry_after_s: float | None = None) -> None:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known faults: {', '.join(FAULTS)}")
        if times < 0:
            raise ValueError(f"times must be >= 0, not {times}")
        with self.lock:
            self._faults.extend([(fault, retry_after_s)] * times)

    def rate_limit(self, settings: LimitSettings) -> None:
        for name in ("rpm", "tpm", "concurrency", "rps", "tps"):
            value = getattr(settings, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1 or None, not {value!r}")
        if settings.penalty_s < 0:
            raise ValueError(f"penalty_s must be >= 0, not {settings.penalty_s}")
        wait = settings.concurrency_retry_after_s
        if wait is not None and not 0 <= wait <= 3600:
            raise ValueError(f"concurrency_retry_after_s must be between 0 and 3600 s, not {wait}")
        limits = None
        if settings.rpm or settings.tpm or settings.concurrency or settings.rps or settings.tps:
            limits = Limits(settings, time.monotonic())
        with self.lock:
            self._limits = limits

    def set_image_token_scale(self, scale: float) -> None:
        check_scale(scale)
        with self.lock:
            self._image_token_scale = scale

    def on_reset(self, hook: Callable[[], None]) -> None:
        """Have `reset` call `hook` too, with the lock held (so the hook must not take it)."""
        self._reset_hooks.append(hook)

    def reset(self) -> None:
        latency_s, latency_sigma, seed, image_token_scale = self._defaults
        with self.lock:
            self._faults.clear()
            self._limits = None
            self._image_token_scale = image_token_scale
            self._latency = (latency_s, latency_sigma)
            self.rng = random.Random(seed)
            self._observed.clear()
            for hook in self._reset_hooks:
                hook()

    def observed(self) -> list[Observed]:
        with self.lock:
            return list(self._observed)

    # -- for the handlers (server thread) --------------------------------------------------------

    def authorized(self, request: web.Request) -> bool:
        if self.api_key is None:
            return True
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode())

    def refuse(self, request: web.Request, headers: dict[str, str]) -> web.Response | None:
        """The 401 answer when the request's key is wrong or missing, else None."""
        if self.authorized(request):
            return None
        return json_response(401, auth_error(request), headers)

    def enter(self) -> bool:
        """Count a request in flight unless the concurrency limit is reached (which trips the penalty)."""
        with self.lock:
            limits = self._limits
            if limits is not None and limits.concurrency is not None and self.in_flight >= limits.concurrency:
                limits.trip(time.monotonic())
                return False
            self.in_flight += 1
            return True

    def concurrency_refusal(self, request_id: str) -> web.Response:
        """The 429 for a request over the concurrency cap (with retry-after if the limits say one)."""
        with self.lock:
            wait = self._limits.concurrency_retry_after_s if self._limits is not None else None
        return concurrency_rejection(request_id, wait)

    def count_image_tokens(self, tokens: int) -> int:
        """The image tokens this server counts for images the tile rule puts at `tokens`."""
        with self.lock:
            scale = self._image_token_scale
        return tokens if scale == 1.0 else round(tokens * scale)

    def admit(self, cost: int, model: str) -> Verdict:
        """Ask the limits about a request that costs `cost` TPM tokens."""
        with self.lock:
            if self._limits is None:
                return Verdict({})
            return self._limits.admit(cost, model, time.monotonic())

    def pop_fault(self) -> tuple[str | None, float | None]:
        with self.lock:
            return self._faults.popleft() if self._faults else (None, None)

    def draw_latency(self) -> float:
        with self.lock:
            seconds, sigma = self._latency
            if seconds <= 0:
                return 0.0
            return self.rng.lognormvariate(math.log(seconds), sigma) if sigma > 0 else seconds

    def observe(self, record: Observed) -> None:
        """Append one observation; drop the thumbnail of the one that leaves the thumbnail window."""
        with self.lock:
            self._observed.append(record)
            if len(self._observed) > THUMBS_KEPT:
                old = self._observed[-THUMBS_KEPT - 1]
                if old.thumb is not None:
                    self._observed[-THUMBS_KEPT - 1] = dataclasses.replace(old, thumb=None)


def check_latency(seconds: float, sigma: float) -> None:
    if seconds < 0 or sigma < 0:
        raise ValueError(f"latency and sigma must be >= 0, not {seconds} and {sigma}")


def check_scale(scale: float) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 1000:
        raise ValueError(f"image_token_scale must be > 0 and <= 1000, not {scale!r}")


def auth_error(request: web.Request) -> dict[str, Any]:
    if "Authorization" not in request.headers:
        message = ("You didn't provide an API key. You need to provide your API key in an Authorization "
                   "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
    else:
        message = ("Incorrect API key provided. "
                   "You can find your API key at https://platform.openai.com/account/api-keys.")
    return error_body(message, "invalid_request_error", code="invalid_api_key")
