"""cli/logs.py: logging for the `caption` command, and keeping secrets out of what it prints.

Owns the one log handler (one-line records on whatever sys.stderr is now), the filter that blanks
API keys and header secrets in every record, and `scrub`, which does the same for the error lines
the command prints itself. Commands `redact` each secret as soon as they know it.
"""

from __future__ import annotations

import logging
import re
import sys

from .. import redaction

__all__ = ["configure_logging", "redact", "scrub"]

QUIET_THREAD_PREFIX = "caption-quiet-"  # the engine names threads whose log lines repeat another's
_BEARER = re.compile(r"(Bearer\s+)\S+", re.IGNORECASE)


class _RedactingFilter(logging.Filter):
    """Blanks API keys and header secrets in every record before any handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub(_BEARER.sub(r"\1[redacted]", message))
        if clean != message:
            record.msg, record.args = clean, None
        return True


def scrub(text: str) -> str:
    """`text` with every secret of this run (API key, header values), and every prefix of 8 characters
    or more of one, replaced by [redacted]: the one rule of `pipeline.redaction`."""
    return redaction.redact(text)


def redact(secret: str) -> None:
    """Register `secret` so no log record and no scrubbed line ever shows it (too short ones are ignored)."""
    redaction.keep_secret(secret)


class _QuietThreadsFilter(logging.Filter):
    """Drops records from threads named `caption-quiet-*`: work done twice on purpose (the online
    driver's background count walks INPUT again) must not say its findings twice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.threadName.startswith(QUIET_THREAD_PREFIX)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (not the one at set-up, which a caller may have closed)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(debug: bool, verbose: bool) -> None:
    """One redacting stderr handler on the root logger; pipeline's own loggers at DEBUG with --debug/-v."""
    handler = _StderrHandler()
    handler.addFilter(_QuietThreadsFilter())
    handler.addFilter(_RedactingFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("pipeline").setLevel(logging.DEBUG if (debug or verbose) else logging.INFO)
