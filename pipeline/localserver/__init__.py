"""pipeline.localserver: the bundled OpenAI-compatible endpoint for the demo, the tests and the benchmarks.

An aiohttp server that answers `POST /v1/chat/completions` (streaming with
`stream_options.include_usage`, and not), `GET /v1/models` and `GET /health`. It validates what it
receives (a JSON body, a model, messages, and a `data:image/...;base64,` URL that decodes to a real
image) and answers with a caption computed from the pixels: orientation, size, dominant colours and
brightness. Honest, deterministic, and clearly not a language model. Token usage follows OpenAI's
counting rules, so cost and TPM code can be tested against it. For tests and benchmarks it can add
latency, enforce RPM/TPM/concurrency limits with OpenAI's headers and 429 bodies, and inject faults
(`LocalServer.fail_next`); every chat request is recorded as an `Observed` value.

It also serves the Files and Batches APIs (`/v1/files`, `/v1/batches`): a batch's lines go through
the same request checks and captioning as chat, after a configurable delay
(`LocalServer.set_batch_delay`), with injectable batch ends (`fail_next_batch`: failed, expired,
cancelled) and line faults (`fail_batch_lines`), output in shuffled order by default; every created
batch is recorded (`LocalServer.batches()`).

The server runs on its own event loop in a daemon thread, so synchronous tests and the CLI can drive
it; the behaviour controls are thread-safe.

The modules, one concern each (each module's docstring says what it owns and must not do, and
cites the protocol pages its facts come from):
- `server`: `LocalServer` (lifecycle, routing, the public controls) and `serve_forever`.
- `core`: the shared state (lock, latency RNG, fault queue, limits, in-flight count, tasks), auth
  and the `Observed` records.
- `limits`: RPM/TPM/concurrency limits, the x-ratelimit-* and retry-after headers, the faults.
- `pixels`: the pixel captioner (thumbnail, colours, brightness, caption, structured values).
- `wire`: ids, JSON responses and the error object every part shares.
- `openai_request`: reading and checking a chat-completions body, decoding images, token counts.
- `openai_chat`: the chat-completions and models routes, completions, streamed chunks.
- `openai_batch`, `openai_batch_state`, `openai_batch_run`: the Files and Batches routes; their
  objects and store; running a batch.
A new protocol is one more module whose handler object adds its routes to the app (`add_routes`)
and answers through the shared `Core`; `LocalServer._protocols` lists them.

It must not share protocol code with the client side: no module of this package imports anything
from the rest of `pipeline` (no payload builder, no SSE reader or writer in common), only
aiohttp.web, Pillow, the standard library and each other. A bug shared by both sides would pass
every test and still fail against real servers.
"""

from __future__ import annotations

from .core import Observed
from .limits import FAULTS
from .limits import go_duration as _go_duration  # noqa: F401  (the tests' old name)
from .openai_batch_state import BATCH_LINE_FAULTS, BATCH_OUTCOMES, BatchSeen
from .openai_request import image_tokens as _image_tokens  # noqa: F401  (the tests' and cost.py's old name)
from .server import LocalServer, serve_forever
from .wire import MODEL_ID

__all__ = ["LocalServer", "Observed", "BatchSeen", "serve_forever", "FAULTS", "BATCH_OUTCOMES", "BATCH_LINE_FAULTS",
           "MODEL_ID"]

