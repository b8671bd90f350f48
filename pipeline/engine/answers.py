"""engine/answers.py: what a chat answer becomes in a row, the same for the online and the batch driver.

Owns four checks on an answer that arrived: its usage (reported, or estimated when the server
sent none or none worth believing), its structured fields (parsed and checked against the job's
JSON Schema; a failure is a `BadOutputError`, which the drivers retry once), its length (shorter
than `output.min_chars`: asked again up to max_attempts, since a gateway may have ended a dropped
upstream cleanly, then kept and flagged), and its quality flags (longer than `output.max_chars`,
shorter than `output.min_chars`, cut by max_tokens, usage not believable). Pure: no I/O, no network.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from .. import cost
from ..errors import BadOutputError, FatalError
from ..job import Job
from ..records import ChatResult, Usage

__all__ = ["answer_fields", "billed_fields", "check_answer", "parse_fields", "quality_flags"]

_FENCE = re.compile(r"^\s*```(?:json)?\s*\n(.*)\n\s*```\s*$", re.DOTALL | re.IGNORECASE)


def parse_fields(job: Job, chat: ChatResult) -> str | None:
    """The answer's JSON object as compact text, checked; None for a plain-text job.

    A Markdown code fence around the JSON is tolerated (json_object servers often add one).
    Raises BadOutputError naming what is wrong: not JSON, not an object, or where the schema fails;
    not worth asking again when the answer was cut by max_tokens. Raises FatalError when the
    schema itself cannot be applied (a $ref to nowhere): no answer could pass.
    """
    structured = job.structured
    if structured.format == "text":
        return None
    text = chat.text
    fenced = _FENCE.match(text)
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except ValueError as err:
        cut = chat.finish_reason == "length"
        why = "cut by max_tokens before its JSON ended; raise max_tokens" if cut else \
            f"not JSON ({err.msg} at character {err.pos})"
        raise _bad(chat, f"answer is {why}: {text[:80]!r}", retryable=not cut) from None
    if not isinstance(value, dict):
        raise _bad(chat, f"answer is JSON but not an object: {text[:80]!r}")
    if structured.schema:
        error = _validator(json.dumps(structured.schema, sort_keys=True)).best_match_error(value)
        if error is not None:
            where = "/".join(map(str, error.absolute_path)) or "top level"
            raise _bad(chat, f"answer does not match the schema at {where}: {error.message}")
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def check_answer(job: Job, chat: ChatResult) -> str | None:
    """`parse_fields`, then the length check: an answer shorter than `output.min_chars` raises a
    BadOutputError carrying it (`answer`), so the retry policy asks again up to max_attempts and the
    Captioner keeps the last one, flagged, when every attempt was short."""
    fields = parse_fields(job, chat)
    low = job.output.min_chars
    if low is not None and len(chat.text) < low:
        raise BadOutputError(f"answer shorter than output.min_chars={low} ({len(chat.text)} characters): "
                             f"{chat.text[:40]!r}", usage=chat.usage, finish_reason=chat.finish_reason,
                             request_id=chat.request_id, answer=chat)
    return fields


def _bad(chat: ChatResult, message: str, *, retryable: bool = True) -> BadOutputError:
    return BadOutputError(message, retryable=retryable, usage=chat.usage, finish_reason=chat.finish_reason,
                          request_id=chat.request_id)


class _Validator:
    def __init__(self, schema: dict[str, Any]):
        import jsonschema  # imported with the first structured answer only

        self._validator = jsonschema.validators.validator_for(schema)(schema)
        self._best_match = jsonschema.exceptions.best_match

    def best_match_error(self, value: Any):
        try:
            return self._best_match(self._validator.iter_errors(value))
        except Exception as err:  # an unresolvable $ref and the like: the schema, not the answer
            raise FatalError(f"[structured.schema] cannot be applied to answers: {type(err).__name__}: {err}") \
                from None


@functools.lru_cache(maxsize=8)
def _validator(schema_json: str) -> _Validator:
    return _Validator(json.loads(schema_json))


def quality_flags(job: Job, text: str, finish_reason: str | None) -> tuple[str, ...] | None:
    """Flags for a caption that arrived but may not be fit for use; None when there are none."""
    flags = []
    if job.output.max_chars is not None and len(text) > job.output.max_chars:
        flags.append("over_max_chars")
    if job.output.min_chars is not None and len(text) < job.output.min_chars:
        flags.append("under_min_chars")
    if finish_reason == "length":
        flags.append("length")
    return tuple(flags) or None


def answer_fields(job: Job, chat: ChatResult, sent_width: int, sent_height: int, fields: str | None) -> dict[str, Any]:
    """The row fields an ok answer fills: model, caption, finish, usage, fields, flags."""
    prompt = job.prompt
    usage: Usage = chat.usage or cost.estimate_usage(sent_width, sent_height, job.image.detail,
                                                     (prompt.system or "") + prompt.user, chat.text,
                                                     model=job.endpoint.model)
    return {
        "model": chat.model or job.endpoint.model,
        "caption": chat.text,
        "finish_reason": chat.finish_reason,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "cached_tokens": usage.cached_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "usage_source": usage.source,
        "service_tier": chat.service_tier,
        "fields": fields,
        "flags": _with(quality_flags(job, chat.text, chat.finish_reason), "usage_rejected" if chat.usage_rejected
                       else None),
    }


def _with(flags: tuple[str, ...] | None, flag: str | None) -> tuple[str, ...] | None:
    return flags if flag is None else (*(flags or ()), flag)


def billed_fields(err: Exception) -> dict[str, Any]:
    """The token counts of an answer that arrived but was unusable: error rows keep what was billed."""
    usage = getattr(err, "usage", None)
    if usage is None:
        return {}
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens, "cached_tokens": usage.cached_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
            "reasoning_tokens": usage.reasoning_tokens, "usage_source": usage.source,
            "finish_reason": getattr(err, "finish_reason", None)}
