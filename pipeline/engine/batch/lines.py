"""engine/batch/lines.py: what one batch result line becomes: a row, or a request to send again.

The backend parses a line (`BatchBackend.parse_result_line` → `LineResult`); this module applies
the policy, the same failure table as online mode: an answer → an ok row (or bad_output, which a
batch line does not ask again); 400/413/422 → an error row; a transient failure, a 429 or a request
that never ran → sent again in a later chunk while attempts remain, else an error row; a refusal
the provider learns from (a renamed parameter) → sent again as the provider now builds it.
The `Captioner` builds every row. `result_lines` reads a result file a line at a time, each at most
MAX_RESULT_LINE_BYTES (a longer one is skipped, logged: its request did not answer). No other I/O.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from ...errors import FatalError, InternalError, RateLimitError, TransientError
from ...providers import BatchBackend, LineResult
from ...records import Result
from ..caption import Captioner
from .state import IndexEntry

__all__ = ["MAX_RESULT_LINE_BYTES", "LineOutcome", "outcome_of", "read_line", "result_lines"]

log = logging.getLogger(__name__)

MAX_RESULT_LINE_BYTES = 8 * 2**20  # one answer, as online (providers/http.py MAX_ANSWER_BYTES), and its wrapping
_READ_BLOCK = 1 << 20


@dataclass(frozen=True, slots=True)
class LineOutcome:
    """What one result line means for its image: a row, or a retry (row None)."""

    custom_id: str
    row: Result | None
    learned: bool = False  # the provider learned from this line's refusal: keep what it learned


def outcome_of(captioner: Captioner, entry: IndexEntry, result: LineResult, max_attempts: int) -> LineOutcome:
    """The policy above, for a line of a known request."""
    retry_left = entry.attempts < max_attempts
    error = result.error
    if not result.ran:
        if retry_left:
            return LineOutcome(entry.custom_id, None)
        error = TransientError("the batch ended before this request ran (attempts used up)")
    elif error is None:
        row = captioner.answer_row(entry.key, entry.image, result.chat, attempts=entry.attempts,
                                   request_id=result.request_id)
        return LineOutcome(entry.custom_id, row)
    elif isinstance(error, (RateLimitError, TransientError)):
        if retry_left:
            return LineOutcome(entry.custom_id, None)
    elif retry_left and captioner.provider.learn(error):  # a fatal class here concerns this line only
        return LineOutcome(entry.custom_id, None, learned=True)
    row = captioner.error_row(entry.key, entry.image, error, attempts=entry.attempts, request_id=result.request_id)
    return LineOutcome(entry.custom_id, row)


def read_line(captioner: Captioner, backend: BatchBackend, raw: bytes, lookup: Callable[[str], IndexEntry | None],
              max_attempts: int) -> LineOutcome | None:
    """One result line's outcome; None for a line of no request `lookup` knows.

    A line nobody foresaw becomes an internal error row of its image, never a stuck chunk.
    """
    try:
        result = backend.parse_result_line(raw)
        entry = lookup(result.custom_id) if result is not None else None
        return None if entry is None else outcome_of(captioner, entry, result, max_attempts)
    except FatalError:
        raise
    except Exception as err:
        log.exception("internal error on a batch output line")
        custom_id = _custom_id(raw)
        entry = lookup(custom_id) if isinstance(custom_id, str) else None
        if entry is None:
            return None
        failure = InternalError(f"{type(err).__name__}: {err}")
        return LineOutcome(entry.custom_id, captioner.error_row(entry.key, entry.image, failure,
                                                                attempts=entry.attempts))


def result_lines(handle: BinaryIO, name: str, limit: int = MAX_RESULT_LINE_BYTES) -> Iterator[bytes]:
    """The lines of a result file, each at most `limit` bytes; a longer one is skipped (read past
    in blocks, never held) with a log line naming the file and the line."""
    number = 0
    while line := handle.readline(limit + 1):
        number += 1
        if len(line) <= limit:
            yield line
            continue
        while line and not line.endswith(b"\n"):  # the rest of the over-long line
            line = handle.readline(_READ_BLOCK)
        log.warning("%s: line %d is longer than %d bytes; skipped (its request counts as not answered)",
                    name, number, limit)


def _custom_id(raw: bytes) -> str | None:
    try:
        line = json.loads(raw)
    except ValueError:
        return None
    custom_id = line.get("custom_id") if isinstance(line, dict) else None
    return custom_id if isinstance(custom_id, str) else None
