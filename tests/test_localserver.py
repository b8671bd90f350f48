"""The bundled endpoint, over real HTTP: what the official SDK parses, what it validates, how it
counts tokens, and that every limit and fault does what it promises.

The HTTP here is plain urllib (and the `openai` SDK), never pipeline.client: the two sides must not
share protocol code.
"""

from __future__ import annotations

import ast
import base64
import functools
import http.client
import io
import json
import math
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import openai
import pytest
from PIL import Image

from pipeline import localserver
from pipeline.localserver import FAULTS, LocalServer, _go_duration, _image_tokens
from pipeline.localserver import core as localserver_core

PROMPT = "Describe this image."
GO_DURATION = re.compile(r"^(\d+h)?(\d+m)?\d+(\.\d+)?(ms|s)$")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never via a proxy


@functools.lru_cache(maxsize=None)
def data_url(width: int = 64, height: int = 48, colour: tuple[int, int, int] = (20, 30, 120), fmt: str = "PNG") -> str:
    """A solid-colour image of that size as a data URL (cached: big PNGs take a moment to encode)."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def chat_payload(url: str | None = None, *, detail: str | None = None, **extra: object) -> dict:
    image_url: dict = {"url": url or data_url()}
    if detail is not None:
        image_url["detail"] = detail
    content = [{"type": "text", "text": PROMPT}, {"type": "image_url", "image_url": image_url}]
    return {"model": "local-caption", "messages": [{"role": "user", "content": content}], **extra}


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)

    def events(self) -> list[str]:
        """The `data:` payloads of an event stream, in order."""
        return [line[len("data: "):] for line in self.body.decode().split("\n") if line.startswith("data: ")]


def post_chat(server: LocalServer, payload: dict | bytes, *, headers: dict | None = None, timeout: float = 10) -> Reply:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(
        server.base_url + "/chat/completions",
        data=body,
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return Reply(response.status, response.headers, response.read())
    except urllib.error.HTTPError as err:
        return Reply(err.code, err.headers, err.read())


def sdk(server: LocalServer, **options: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0, **options)


def expected_prompt_tokens(image_tokens: int) -> int:
    return image_tokens + math.ceil(len(PROMPT) / 4)


# --- the official SDK parses what the server sends --------------------------------------------


def test_openai_sdk_parses_a_plain_answer(server):
    answer = sdk(server).chat.completions.create(
        model="local-caption", messages=chat_payload()["messages"], max_tokens=300
    )

    content = answer.choices[0].message.content
    assert content.startswith("A landscape image, 64×48 pixels, mostly dark blue")
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.prompt_tokens == expected_prompt_tokens(85 + 170)
    assert answer.usage.completion_tokens == math.ceil(len(content) / 4)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer.id.startswith("chatcmpl-") and answer.model == "local-caption"


def test_openai_sdk_parses_a_streamed_answer_with_usage(server):
    client = sdk(server)
    messages = chat_payload()["messages"]
    plain = client.chat.completions.create(model="local-caption", messages=messages)

    chunks = list(
        client.chat.completions.create(
            model="local-caption", messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )

    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == plain.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_stream_without_include_usage_has_no_usage_and_ends_with_done(server):
    reply = post_chat(server, chat_payload(stream=True))

    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    assert reply.headers["x-request-id"].startswith("req_")
    events = reply.events()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert all("usage" not in chunk for chunk in chunks)
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)


# --- validation ----------------------------------------------------------------------------------


def _jpeg_declared_as_png() -> str:
    return data_url(fmt="JPEG").replace("data:image/jpeg", "data:image/png")


BAD_PAYLOADS = [
    ("https-url", lambda: chat_payload("https://example.com/cat.png"), "messages[0].content[1].image_url.url"),
    ("bad-base64", lambda: chat_payload("data:image/png;base64,@@@"), "messages[0].content[1].image_url.url"),
    ("not-an-image", lambda: chat_payload("data:image/png;base64," + base64.b64encode(b"hello").decode()),
     "messages[0].content[1].image_url.url"),
    ("mime-mismatch", lambda: chat_payload(_jpeg_declared_as_png()), "messages[0].content[1].image_url.url"),
    ("svg", lambda: chat_payload("data:image/svg+xml;base64,PHN2Zz4="), "messages[0].content[1].image_url.url"),
    ("bad-detail", lambda: chat_payload(detail="ultra"), "messages[0].content[1].image_url.detail"),
    ("no-image", lambda: {"model": "local-caption", "messages": [{"role": "user", "content": PROMPT}]}, "messages"),
    ("no-model", lambda: {k: v for k, v in chat_payload().items() if k != "model"}, "model"),
    ("zero-max-tokens", lambda: chat_payload(max_tokens=0), "max_tokens"),
    ("stream-options-without-stream", lambda: chat_payload(stream_options={"include_usage": True}), "stream_options"),
    ("not-json", lambda: b"{not json", None),
]


@pytest.mark.parametrize(("make_payload", "param"), [(make, param) for _, make, param in BAD_PAYLOADS],
                         ids=[name for name, _, _ in BAD_PAYLOADS])
def test_bad_request_gets_400_in_openai_error_shape_and_is_observed(server, make_payload, param):
    reply = post_chat(server, make_payload())

    assert reply.status == 400
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]
    assert [o.status for o in server.observed()] == [400]


def test_bad_image_is_observed_with_its_declared_mime(server):
    post_chat(server, chat_payload("data:image/webp;base64," + base64.b64encode(b"RIFF....").decode()))

    [seen] = server.observed()
    assert (seen.status, seen.image_mime, seen.image_size, seen.thumb) == (400, "image/webp", None, None)


# --- token usage ---------------------------------------------------------------------------------

IMAGE_TOKEN_TABLE = [
    ("1024x1024-high", 1024, 1024, "high", 765),
    ("2048x4096-high", 2048, 4096, "high", 1105),
    ("512x512-low", 512, 512, "low", 85),
    ("4096x8192-low", 4096, 8192, "low", 85),
    ("100x100-auto-never-upscaled", 100, 100, "auto", 255),
    ("768x768-auto", 768, 768, "auto", 765),
    ("513x512-high", 513, 512, "high", 425),
    ("missing-detail-is-auto", 1024, 1024, None, 765),
]


@pytest.mark.parametrize(("width", "height", "detail", "tokens"), [row[1:] for row in IMAGE_TOKEN_TABLE],
                         ids=[row[0] for row in IMAGE_TOKEN_TABLE])
def test_image_tokens_follow_openai_tile_formula(width, height, detail, tokens):
    assert _image_tokens(width, height, detail) == tokens


@pytest.mark.parametrize(("width", "height", "detail", "tokens"),
                         [(1024, 1024, "high", 765), (2048, 4096, "high", 1105), (512, 512, "low", 85)],
                         ids=["1024x1024-high", "2048x4096-high", "512x512-low"])
def test_usage_counts_image_tiles_and_text(server, width, height, detail, tokens):
    reply = post_chat(server, chat_payload(data_url(width, height), detail=detail))

    assert reply.status == 200, reply.body
    assert reply.json()["usage"]["prompt_tokens"] == expected_prompt_tokens(tokens)
    assert server.observed()[-1].image_size == (width, height)


def test_max_tokens_cuts_the_caption_with_finish_reason_length(server):
    answer = post_chat(server, chat_payload(max_tokens=5)).json()

    choice = answer["choices"][0]
    assert choice["finish_reason"] == "length"
    assert len(choice["message"]["content"]) == 20
    assert answer["usage"]["completion_tokens"] == 5


GO_DURATIONS = [(0, "0s"), (0.0004, "1ms"), (0.547, "547ms"), (1, "1s"), (172.8, "2m52.8s"), (360, "6m0s"),
                (3600, "1h0m0s"), (1.5, "1.5s")]


@pytest.mark.parametrize(("seconds", "text"), GO_DURATIONS, ids=[text for _, text in GO_DURATIONS])
def test_go_duration_formats_like_openai_reset_headers(seconds, text):
    assert _go_duration(seconds) == text


# --- reasoning-model emulation --------------------------------------------------------------------


def test_reasoning_model_rejects_max_tokens_like_openai(server):
    payload = {**chat_payload(max_tokens=100), "model": "local-reasoning-mini"}

    error = post_chat(server, payload).json()["error"]

    assert error == {
        "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
        "Use 'max_completion_tokens' instead.",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "unsupported_parameter",
    }


def test_reasoning_model_rejects_non_default_temperature(server):
    payload = {**chat_payload(temperature=0.2), "model": "local-reasoning-mini"}

    reply = post_chat(server, payload)

    assert reply.status == 400
    assert reply.json()["error"]["message"] == (
        "Unsupported value: 'temperature' does not support 0.2 with this model. "
        "Only the default (1) value is supported."
    )
    assert reply.json()["error"]["code"] == "unsupported_value"


def test_reasoning_model_reports_reasoning_tokens(server):
    payload = {**chat_payload(max_completion_tokens=300), "model": "local-reasoning-mini"}

    answer = post_chat(server, payload).json()

    usage = answer["usage"]
    content = answer["choices"][0]["message"]["content"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 16
    assert usage["completion_tokens"] == math.ceil(len(content) / 4) + 16


# --- captions and observations --------------------------------------------------------------------


@pytest.mark.parametrize(("size", "colour", "words"), [
    ((30, 60), (220, 20, 20), ("portrait", "30×60", "red")),
    ((40, 40), (250, 250, 250), ("square", "40×40", "white", "very bright")),
    ((90, 40), (10, 10, 10), ("landscape", "90×40", "black", "very dark")),
], ids=["red-portrait", "white-square", "black-landscape"])
def test_caption_is_computed_from_the_pixels(server, size, colour, words):
    content = post_chat(server, chat_payload(data_url(*size, colour))).json()["choices"][0]["message"]["content"]

    for word in words:
        assert word in content


def test_observation_keeps_a_thumbnail_of_the_received_pixels(server):
    image = Image.new("RGB", (300, 200), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 300, 100))  # top half white
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    post_chat(server, chat_payload(url, detail="low", max_tokens=50, temperature=0.5))

    [seen] = server.observed()
    assert (seen.status, seen.image_size, seen.detail, seen.image_mime) == (200, (300, 200), "low", "image/png")
    assert (seen.max_tokens, seen.temperature, seen.max_completion_tokens) == (50, 0.5, None)
    assert seen.body_keys == ("max_tokens", "messages", "model", "temperature")
    assert seen.thumb.mode == "RGB" and max(seen.thumb.size) <= 64
    top, bottom = seen.thumb.getpixel((10, 2)), seen.thumb.getpixel((10, seen.thumb.height - 3))
    assert sum(top) > 600 and sum(bottom) < 100


def test_only_the_newest_observations_keep_thumbnails(server, monkeypatch):
    monkeypatch.setattr(localserver_core, "THUMBS_KEPT", 2)  # the thumbnail window lives in the core

    for _ in range(3):
        post_chat(server, chat_payload())

    assert [seen.thumb is not None for seen in server.observed()] == [False, True, True]


def test_latency_delays_the_answer(server):
    server.set_latency(0.2)

    started = time.monotonic()
    reply = post_chat(server, chat_payload())

    assert reply.status == 200
    assert time.monotonic() - started >= 0.2


def test_lognormal_latency_has_the_requested_median_and_repeats_after_reset(server):
    server.set_latency(0.1, sigma=0.5)
    draws = [server._draw_latency() for _ in range(401)]
    server.reset()
    server.set_latency(0.1, sigma=0.5)

    assert [server._draw_latency() for _ in range(401)] == draws
    assert 0.08 < statistics.median(draws) < 0.12
    assert len(set(draws)) > 1


# --- faults -------------------------------------------------------------------------------------

ERROR_FAULTS = [
    ("500", 500, "server_error", None),
    ("503", 503, "server_error", None),
    ("408", 408, "server_error", None),
    ("400", 400, "invalid_request_error", "invalid_image"),
    ("401", 401, "invalid_request_error", "invalid_api_key"),
    ("403_quota", 403, "new_api_error", "insufficient_user_quota"),
    ("404_model", 404, "invalid_request_error", "model_not_found"),
    ("429_quota", 429, "insufficient_quota", "insufficient_quota"),
    ("error200", 200, "upstream_error", 500),
]


@pytest.mark.parametrize(("fault", "status", "type_", "code"), ERROR_FAULTS,
                         ids=[row[0] for row in ERROR_FAULTS])
def test_error_fault_answers_its_status_and_error_body(server, fault, status, type_, code):
    server.fail_next(fault)

    reply = post_chat(server, chat_payload())

    assert reply.status == status
    error = reply.json()["error"]
    assert (error["type"], error["code"]) == (type_, code)
    assert server.observed()[-1].fault == fault
    assert post_chat(server, chat_payload()).status == 200  # one fault, one request


def test_faults_are_served_first_in_first_out(server):
    server.fail_next("503", times=2)
    server.fail_next("500")

    statuses = [post_chat(server, chat_payload()).status for _ in range(4)]

    assert statuses == [503, 503, 500, 200]


def test_fault_429_sends_retry_after_headers(server):
    server.fail_next("429", retry_after_s=2.5)

    reply = post_chat(server, chat_payload())

    assert reply.status == 429
    assert (reply.headers["retry-after"], reply.headers["retry-after-ms"]) == ("3", "2500")
    assert reply.json()["error"]["code"] == "rate_limit_exceeded"


def test_fault_429_bare_has_no_body_and_no_headers(server):
    server.fail_next("429_bare")

    reply = post_chat(server, chat_payload())

    assert (reply.status, reply.body) == (429, b"")
    assert reply.headers["retry-after"] is None and reply.headers["x-request-id"] is None


def test_fault_html502_sends_an_nginx_page(server):
    server.fail_next("html502")

    reply = post_chat(server, chat_payload())

    assert reply.status == 502
    assert reply.headers["Content-Type"].startswith("text/html")
    assert b"<h1>502 Bad Gateway</h1>" in reply.body


def test_fault_malformed_sends_a_body_that_is_not_json(server):
    server.fail_next("malformed")

    reply = post_chat(server, chat_payload())

    assert reply.status == 200
    with pytest.raises(json.JSONDecodeError):
        reply.json()


def test_fault_no_finish_stream_has_no_finish_reason_and_no_usage(server):
    server.fail_next("no_finish")

    reply = post_chat(server, chat_payload(stream=True, stream_options={"include_usage": True}))

    events = reply.events()
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]"
    assert any(c["choices"][0]["delta"].get("content") for c in chunks)
    assert all(c["choices"] and c["choices"][0]["finish_reason"] is None for c in chunks)
    assert all(c.get("usage") is None for c in chunks)


def test_fault_no_done_stream_ends_without_done(server):
    server.fail_next("no_done")

    events = post_chat(server, chat_payload(stream=True, stream_options={"include_usage": True})).events()

    assert "[DONE]" not in events
    assert json.loads(events[-1])["usage"]["prompt_tokens"] > 0


def test_fault_no_done_without_stream_cuts_the_body_short(server):
    server.fail_next("no_done")

    with pytest.raises(http.client.IncompleteRead):
        post_chat(server, chat_payload())

    assert server.observed()[-1].status == 200


def test_fault_stream_error_sends_an_error_event_then_done(server):
    server.fail_next("stream_error")

    events = post_chat(server, chat_payload(stream=True)).events()

    assert events[-1] == "[DONE]"
    assert json.loads(events[-2]) == {"error": {"message": "upstream stream interrupted", "type": "server_error"}}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_fault_no_usage_answers_without_usage(server, stream):
    server.fail_next("no_usage")
    options = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}

    reply = post_chat(server, chat_payload(**options))

    if stream:
        chunks = [json.loads(e) for e in reply.events()[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"  # the usage chunk is what is left out
        assert all(chunk.get("usage") is None for chunk in chunks)
    else:
        assert "usage" not in reply.json()


def test_fault_empty_answers_an_empty_caption(server):
    server.fail_next("empty")

    answer = post_chat(server, chat_payload()).json()

    assert answer["choices"][0]["message"]["content"] == ""
    assert answer["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_fault_drop_is_a_client_side_error(server, stream):
    server.fail_next("drop")

    with pytest.raises((ConnectionError, urllib.error.URLError, http.client.HTTPException)):
        post_chat(server, chat_payload(stream=stream))

    assert server.observed()[-1].status == (200 if stream else 0)
    assert post_chat(server, chat_payload()).status == 200


def test_fault_drop_is_a_connection_error_in_the_sdk(server):
    server.fail_next("drop")

    with pytest.raises(openai.APIConnectionError):
        sdk(server).chat.completions.create(model="local-caption", messages=chat_payload()["messages"])


def test_fault_hang_sends_nothing_until_the_client_gives_up(server):
    server.fail_next("hang")

    with pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)):
        post_chat(server, chat_payload(), timeout=0.3)

    assert server.observed()[-1].fault == "hang"


def test_unknown_fault_is_refused_at_once(server):
    with pytest.raises(ValueError, match="unknown fault"):
        server.fail_next("418_teapot")
    assert "drop" in FAULTS and "418_teapot" not in FAULTS


# --- rate limits -----------------------------------------------------------------------------------


def test_rpm_limit_answers_429_with_openai_headers(server):
    server.rate_limit(rpm=3)

    replies = [post_chat(server, chat_payload()) for _ in range(4)]

    assert [r.status for r in replies] == [200, 200, 200, 429]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in replies] == ["2", "1", "0", "0"]
    limited = replies[-1]
    assert limited.headers["x-ratelimit-limit-requests"] == "3"
    assert GO_DURATION.match(limited.headers["x-ratelimit-reset-requests"])
    assert limited.headers["retry-after"] == "20"  # one request refills in 60 s / 3
    assert limited.headers["retry-after-ms"] == "20000"
    error = limited.json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert error["message"].startswith("Rate limit reached for local-caption on requests per min (RPM): Limit 3")
    assert server.observed()[-1].fault == "rpm"


def test_tpm_limit_counts_prompt_and_max_tokens(server):
    server.rate_limit(tpm=1000)
    cost = expected_prompt_tokens(255) + 300

    replies = [post_chat(server, chat_payload(max_tokens=300)) for _ in range(2)]

    assert [r.status for r in replies] == [200, 429]
    assert replies[0].headers["x-ratelimit-remaining-tokens"] == str(1000 - cost)
    assert GO_DURATION.match(replies[0].headers["x-ratelimit-reset-tokens"])
    assert replies[1].json()["error"]["type"] == "tokens"
    assert f"Requested {cost}" in replies[1].json()["error"]["message"]


def test_limits_without_headers_send_none(server):
    server.rate_limit(rpm=1, headers=False)

    replies = [post_chat(server, chat_payload()) for _ in range(2)]

    assert [r.status for r in replies] == [200, 429]
    for reply in replies:
        assert not [name for name in reply.headers if name.lower().startswith(("x-ratelimit", "retry-after"))]


def test_penalty_answers_429_for_a_while_after_a_limit_trips(server):
    server.rate_limit(rpm=1, penalty_s=30)

    replies = [post_chat(server, chat_payload()) for _ in range(3)]

    assert [r.status for r in replies] == [200, 429, 429]
    assert replies[2].headers["retry-after"] == "30"
    assert [o.fault for o in server.observed()] == [None, "rpm", "penalty"]


def test_concurrency_limit_answers_429_at_once_without_headers():
    with LocalServer() as server:
        server.rate_limit(rpm=100, concurrency=1)
        server.fail_next("hang")
        request = urllib.request.Request(
            server.base_url + "/chat/completions", data=json.dumps(chat_payload(stream=True)).encode(), method="POST"
        )
        with _OPENER.open(request, timeout=10) as held:  # headers and the first chunk arrived: it is in flight
            assert held.readline().startswith(b"data: ")

            reply = post_chat(server, chat_payload())

        assert reply.status == 429
        assert reply.json()["error"] == {
            "message": "concurrency limit exceeded, please retry later", "type": "rate_limit_error", "code": None
        }
        assert not [name for name in reply.headers if name.lower().startswith(("x-ratelimit", "retry-after"))]
        assert server.observed()[-1].fault == "concurrency"
        started = time.monotonic()
    assert time.monotonic() - started < 3  # stop() does not wait out a hung request


# --- auth, other routes, lifecycle, isolation ---------------------------------------------------------


def test_api_key_is_checked_and_never_stored():
    with LocalServer(api_key="sekret-key") as server:
        wrong = post_chat(server, chat_payload(), headers={"Authorization": "Bearer nope"})
        right = post_chat(server, chat_payload(), headers={"Authorization": "Bearer sekret-key"})

        assert wrong.status == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert right.status == 200
        assert [o.authorized for o in server.observed()] == [False, True]
        assert "sekret" not in repr(server.observed())


def test_models_and_health_routes(server):
    with _OPENER.open(server.base_url + "/models", timeout=5) as response:
        models = json.loads(response.read())
    health_url = server.base_url.removesuffix("/v1") + "/health"
    with _OPENER.open(health_url, timeout=5) as response:
        health = json.loads(response.read())

    assert [m["id"] for m in models["data"]] == ["local-caption"]
    assert health == {"status": "ok"}


def test_stop_is_idempotent_and_base_url_needs_a_running_server():
    server = LocalServer()
    url = server.start()
    assert url == server.base_url and url.startswith("http://127.0.0.1:")
    server.stop()
    server.stop()
    with pytest.raises(RuntimeError):
        server.base_url


def _imported_modules(tree: ast.Module, module: str) -> list[str]:
    """The absolute names of the modules a file imports (`module` is its own dotted name)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module or "")
        elif isinstance(node, ast.ImportFrom):  # relative: resolve against the file's package
            base = module.split(".")[: -node.level]
            names.append(".".join([*base, node.module] if node.module else base))
    return names


def test_localserver_imports_nothing_from_pipeline():
    package = Path(localserver.__file__).parent
    files = sorted(package.glob("*.py"))
    assert {"__init__.py", "server.py", "pixels.py", "limits.py", "openai_chat.py",
            "openai_batch.py", "anthropic_messages.py", "anthropic_batch.py", "gemini_generate.py"} <= \
        {f.name for f in files}
    for path in files:
        module = f"pipeline.localserver.{path.stem}"  # for __init__ too: `from .x` resolves inside the package
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert ast.get_docstring(tree), f"{path.name} must open with a docstring"
        for name in _imported_modules(tree, module):
            inside = name == "pipeline.localserver" or name.startswith("pipeline.localserver.")
            assert inside or not (name == "pipeline" or name.startswith("pipeline.")), f"{path.name} imports {name}"
    probe = "import sys, pipeline.localserver; print(sorted(m for m in sys.modules if m.startswith('pipeline')))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parents[1]).stdout
    loaded_names = ast.literal_eval(loaded.strip())
    assert {"pipeline", "pipeline.localserver"} <= set(loaded_names)
    assert all(m in ("pipeline", "pipeline.localserver") or m.startswith("pipeline.localserver.")
               for m in loaded_names), loaded_names
