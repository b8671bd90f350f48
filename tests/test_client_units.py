"""Pure parts of the client: the SSE decoder, header parsers, classification, payload, usage."""

from __future__ import annotations

import email.utils
import json
import time

import pytest

from pipeline import errors
from pipeline.providers.http import proxy_for
from pipeline.providers.openai import OpenAIProvider
from pipeline.providers.openai.chat import build_payload, parse_completion, parse_usage
from pipeline.redaction import Redactor, keep_secret
from pipeline.providers.openai.errors import classify_response, parse_duration, parse_retry_after
from pipeline.providers.sse import SSEDecoder
from pipeline.job import load_job


def _events(*chunks: bytes) -> list[tuple[str, str]]:
    decoder = SSEDecoder()
    got = [e for chunk in chunks for e in decoder.feed(chunk)] + list(decoder.finish())
    return [(e.event, e.data) for e in got]


@pytest.mark.parametrize(
    "chunks, expected",
    [
        ([b"data: a\n\n"], [("message", "a")]),
        ([b"data: a\r\n\r\n"], [("message", "a")]),
        ([b"data: a\r\r"], [("message", "a")]),
        ([b"da", b"ta: {\"x\"", b": 1}\n", b"\n"], [("message", '{"x": 1}')]),
        ([b"data: a\r", b"\ndata: b\r\n\r\n"], [("message", "a\nb")]),
        ([b": keep-alive\n\n", b"data: x\n\n"], [("message", "x")]),
        ([b"event: error\ndata: {}\n\n"], [("error", "{}")]),
        ([b"data:no-space\n\n"], [("message", "no-space")]),
        ([b"data: [DONE]\n"], [("message", "[DONE]")]),
        ([b"id: 7\nretry: 10\n\n"], []),
        ([b"data: \xe2\x82", b"\xac\n\n"], [("message", "€")]),
    ],
    ids=["lf", "crlf", "cr", "split-anywhere", "crlf-split", "comment", "event-type", "no-space",
         "done-without-blank-line", "id-retry-only", "utf8-split"],
)
def test_sse_decoder(chunks, expected):
    assert _events(*chunks) == expected


@pytest.mark.parametrize(
    "text, seconds",
    [("1s", 1.0), ("6m0s", 360.0), ("547ms", 0.547), ("2m52.8s", 172.8), ("1h2m", 3720.0), ("0.5", 0.5),
     ("250us", 0.00025), ("", None), ("soon", None), ("-1s", None), ("1s garbage", None), (None, None),
     ("nan", None), ("inf", None)],
    ids=lambda v: repr(v),
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


NOW = time.time()


@pytest.mark.parametrize(
    "headers, seconds",
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"Retry-After-Ms": "20", "retry-after": "9"}, 0.02),
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "0.25"}, 0.25),
        ({"retry-after": email.utils.formatdate(NOW + 30, usegmt=True)}, 30.0),
        ({"retry-after": email.utils.formatdate(NOW - 30, usegmt=True)}, 0.0),
        ({"retry-after": "-5"}, None),
        ({"retry-after": "NaN"}, None),
        ({"retry-after": "tomorrow"}, None),
        ({"retry-after-ms": "abc", "retry-after": "2"}, 2.0),
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "547ms"}, 0.547),
        ({"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "6m0s"}, None),
        ({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "2m52.8s",
          "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"}, 172.8),
        ({}, None),
    ],
    ids=["ms", "ms-wins", "seconds", "fraction", "http-date", "date-past", "negative", "nan", "words",
         "bad-ms-falls-back", "reset-requests", "reset-not-exhausted", "both-exhausted", "none"],
)
def test_parse_retry_after(headers, seconds):
    got = parse_retry_after(headers, now=NOW)
    if seconds is None:
        assert got is None
    else:
        assert got == pytest.approx(seconds, abs=1.0 if "retry-after" in headers and ":" in headers["retry-after"] else 1e-6)


def _err(code=None, type_=None, message="m"):
    return {"error": {"message": message, "type": type_, "code": code}}


@pytest.mark.parametrize(
    "status, body, expected",
    [
        (200, {"choices": []}, None),
        (200, _err(500, "upstream_error"), errors.TransientError),
        (200, _err("rate_limit_exceeded", "requests"), errors.RateLimitError),
        (400, _err("invalid_value"), errors.BadRequestError),
        (413, b"too large", errors.BadRequestError),
        (422, _err(), errors.BadRequestError),
        (401, _err("invalid_api_key"), errors.AuthError),
        (401, _err(None, "new_api_error", "token quota exhausted"), errors.QuotaError),
        (402, _err(None, None, "Insufficient credits"), errors.QuotaError),
        (400, _err(None, "budget_exceeded", "Budget has been exceeded!"), errors.QuotaError),
        (400, {"type": "error", "error": {"type": "invalid_request_error",
                                          "message": "Your credit balance is too low to access the API."}},
         errors.QuotaError),
        (200, _err(400, "BadRequestError", "image too small"), errors.BadRequestError),
        (403, _err("insufficient_user_quota", "new_api_error"), errors.QuotaError),
        (403, _err(), errors.AuthError),
        (404, _err("model_not_found"), errors.ModelNotFoundError),
        (404, b"Not Found", errors.FatalError),
        (408, b"", errors.TransientError),
        (429, b"", errors.RateLimitError),
        (429, _err("rate_limit_exceeded", "tokens"), errors.RateLimitError),
        (429, _err("insufficient_quota", "insufficient_quota"), errors.QuotaError),
        (429, _err(None, "credit_balance_exhausted"), errors.QuotaError),
        (429, _err("monthly_spend_limit_exceeded"), errors.QuotaError),
        (429, _err("organization_usage_limit_exceeded"), errors.QuotaError),
        (500, _err(None, "server_error"), errors.TransientError),
        (502, b"<html><head><title>502 Bad Gateway</title></head></html>", errors.TransientError),
        (503, b"", errors.TransientError),
        (529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, errors.TransientError),
    ],
    ids=["ok", "200-error", "200-rate-limit", "400", "413", "422", "401", "401-gateway-quota", "402-openrouter",
         "400-litellm-budget", "400-anthropic-credit", "200-vllm-400-event", "403-gateway-quota",
         "403", "404-model", "404-path", "408", "429-bare", "429-rate", "429-quota", "429-credit", "429-spend",
         "429-org-usage", "500", "502-html", "503", "529-anthropic"],
)
def test_classify_response(status, body, expected):
    error = classify_response(status, {"x-request-id": "req_1"}, body)
    if expected is None:
        assert error is None
    else:
        assert type(error) is expected
        assert error.status == status and error.request_id == "req_1"


def test_classify_keeps_html_short_and_429_wait_from_message():
    page = b"<html><head><title>502 Bad Gateway</title></head><body>" + b"x" * 5000 + b"</body></html>"
    assert str(classify_response(502, {}, page)) == "HTTP 502: HTML error page: 502 Bad Gateway"
    error = classify_response(429, {}, _err("rate_limit_exceeded", message="Please try again in 20ms."))
    assert error.retry_after_s == pytest.approx(0.02)


def test_error_hierarchy_is_pinned():
    assert issubclass(errors.AuthError, errors.FatalError)
    assert issubclass(errors.QuotaError, errors.FatalError)
    assert issubclass(errors.ModelNotFoundError, errors.FatalError)
    for cls in (errors.RateLimitError, errors.TransientError, errors.BadRequestError, errors.FatalError,
                errors.BadImageError, errors.BadOutputError):
        assert issubclass(cls, errors.CaptionError)
    assert not issubclass(errors.RateLimitError, errors.TransientError)
    kinds = [c.kind for c in (errors.RateLimitError, errors.TransientError, errors.BadRequestError,
                              errors.BadOutputError, errors.FatalError, errors.AuthError, errors.QuotaError,
                              errors.ModelNotFoundError, errors.BadImageError)]
    assert len(set(kinds)) == len(kinds)


def test_payload_sends_temperature_only_when_set():
    job = load_job(None, {"prompt.system": "be brief", "image.detail": "low"})
    payload = build_payload(job, "data:image/jpeg;base64,AAAA", stream=True)
    assert "temperature" not in payload and "reasoning_effort" not in payload
    assert payload["stream_options"] == {"include_usage": True}
    assert payload["messages"][0] == {"role": "system", "content": "be brief"}
    image_part = payload["messages"][1]["content"][1]
    assert image_part == {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA", "detail": "low"}}
    job = load_job(None, {"prompt.temperature": 0.2, "prompt.reasoning_effort": "low"})
    payload = build_payload(job, "data:x", stream=False, token_param="max_completion_tokens")
    assert payload["temperature"] == 0.2 and payload["reasoning_effort"] == "low"
    assert "stream" not in payload and payload["max_completion_tokens"] == 300 and "max_tokens" not in payload


def test_usage_details_are_read_and_missing_ones_stay_null():
    usage = parse_usage({"prompt_tokens": 100, "completion_tokens": 40, "total_tokens": 140,
                         "prompt_tokens_details": {"cached_tokens": 64},
                         "completion_tokens_details": {"reasoning_tokens": 32}})
    assert (usage.cached_tokens, usage.reasoning_tokens, usage.total_tokens) == (64, 32, 140)
    usage = parse_usage({"prompt_tokens": 10, "completion_tokens": 5})
    assert (usage.cached_tokens, usage.reasoning_tokens, usage.total_tokens) == (None, None, 15)
    assert parse_usage(None) is None and parse_usage({}) is None


@pytest.mark.parametrize(
    "body, expected",
    [
        (b'{"model":"m","choices":[{"message":{"content":" hi "},"finish_reason":"stop"}]}', "hi"),
        (b'{"model":"m","choices":[{"message":{"content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},'
         b'"finish_reason":"stop"}]}', "ab"),
        (b'{"id": "chatcmpl-', errors.TransientError),
        (b'{"model":"m","choices":[]}', errors.TransientError),
        (b'{"model":"m","choices":[{"message":{"content":""},"finish_reason":"length"}]}', errors.BadOutputError),
    ],
    ids=["string", "parts", "malformed", "no-choices", "empty"],
)
def test_parse_completion(body, expected):
    if isinstance(expected, str):
        assert parse_completion(body, "req").text == expected
    else:
        with pytest.raises(expected):
            parse_completion(body, "req")


@pytest.mark.parametrize(
    "env, url, expected",
    [
        ({"HTTPS_PROXY": "http://proxy:3128"}, "https://api.openai.com/v1/chat/completions", "http://proxy:3128"),
        ({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "api.openai.com"}, "https://api.openai.com/v1/x", None),
        ({"HTTP_PROXY": "http://proxy:3128"}, "https://api.openai.com/v1/x", None),
        ({}, "https://api.openai.com/v1/x", None),
    ],
    ids=["https-proxy", "no-proxy", "other-scheme", "none"],
)
def test_proxy_for_honours_the_proxy_variables_and_no_proxy(monkeypatch, env, url, expected):
    # That the run reads them once, not per request: test_run.py::test_proxy_is_read_once_from_the_environment.
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert proxy_for(url) == expected


@pytest.mark.parametrize(
    "raw",
    [
        {"prompt_tokens": 90, "completion_tokens": 10**15, "total_tokens": 10**15 + 90},
        {"prompt_tokens": -5, "completion_tokens": 8},
        {"prompt_tokens": 90, "completion_tokens": 8.5},
        {"prompt_tokens": True, "completion_tokens": 8},
        {"prompt_tokens": float("nan"), "completion_tokens": 8},
        {"prompt_tokens": float("inf"), "completion_tokens": 8},
        {"prompt_tokens": "90", "completion_tokens": 8},
        {"prompt_tokens": 2**31 - 1, "completion_tokens": 1},  # each fits, the sum does not
        {"prompt_tokens": 90, "completion_tokens": 8, "prompt_tokens_details": {"cached_tokens": -1}},
        {"prompt_tokens": 90, "completion_tokens": 8, "completion_tokens_details": {"reasoning_tokens": 1e300}},
    ],
    ids=["10**15", "negative", "fraction", "bool", "nan", "inf", "string", "sum-overflows", "cached-negative",
         "reasoning-huge"],
)
def test_unbelievable_usage_counts_as_not_reported(raw):
    assert parse_usage(raw) is None
    body = json.dumps({"model": "m", "usage": raw, "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]})
    chat = parse_completion(body.encode(), "req")
    assert chat.usage is None and chat.usage_rejected


def test_whole_number_floats_are_counts():
    assert parse_usage({"prompt_tokens": 90.0, "completion_tokens": 8}).total_tokens == 98


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("key=sk-SECRET123", "key=[redacted]"),
        ("key=sk-SECRET", "key=[redacted]"),  # a prefix of 8+ characters is the key still
        ("key=sk-SECR", "key=sk-SECR"),  # 7 characters: too short to be told from ordinary text
        ("a sk-SECRET123sk-SECRET1 b", "a [redacted][redacted] b"),
        ("org-abc and org-ab", "[redacted] and org-ab"),  # a short secret: whole only
        ("nothing here", "nothing here"),
    ],
    ids=["whole", "cut-to-10", "cut-to-7", "twice-adjacent", "short-secret", "none"],
)
def test_redactor_blanks_every_prefix_of_eight_or_more(text, expected):
    assert Redactor(["sk-SECRET123", "org-abc", None, "abc"]).redact(text) == expected


def test_an_html_page_is_redacted_before_it_is_cut():
    key = "sk-" + "k" * 101
    keep_secret(key)
    error = classify_response(502, {}, f"<html><body>echo: Bearer {key}</body></html>".encode())
    assert key[:8] not in str(error) and "[redacted]" in str(error)


def _stream(*chunks: dict | str) -> bytes:
    return b"".join(f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n".encode() for c in chunks)


def test_a_stream_without_usage_is_transient_once_this_server_has_sent_usage():
    provider = OpenAIProvider(load_job(None), "http://x/v1", api_key=None, headers={})
    text = {"model": "m", "choices": [{"index": 0, "delta": {"content": "A"}, "finish_reason": "stop"}]}
    usage = {"model": "m", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 1}}

    def parse(data: bytes):
        parser = provider.stream_parser({})
        parser.feed(data)
        return parser.result()

    assert parse(_stream(text, "[DONE]")).usage is None  # not known yet whether this server sends usage
    assert parse(_stream(text, usage, "[DONE]")).usage.total_tokens == 10
    with pytest.raises(errors.TransientError, match="without the usage chunk"):
        parse(_stream(text, "[DONE]"))


@pytest.mark.parametrize(("finish", "expected"), [("stop", errors.TransientError), ("length", errors.BadOutputError)])
def test_an_empty_answer_is_transient_unless_cut_by_max_tokens(finish, expected):
    body = json.dumps({"model": "m", "choices": [{"message": {"content": ""}, "finish_reason": finish}]})
    with pytest.raises(expected):
        parse_completion(body.encode(), "req")
