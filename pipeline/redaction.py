"""redaction.py: the one rule that keeps the run's secrets out of everything it stores, logs or prints.

A seam module, like `errors`: the secrets (the API key, the job's header values) are known before any
request is sent, and whoever learns one calls `keep_secret`; every path that lets a server's words
out (error messages at construction, every text column of a row before it is journalled, log records,
the CLI's own lines) calls `redact` BEFORE it cuts anything. A server that echoes a key back, whole or
cut short by itself or by us, leaves at most MIN_PREFIX_CHARS - 1 of its characters behind. Pure
string work: no I/O.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

__all__ = ["MIN_PREFIX_CHARS", "MIN_SECRET_CHARS", "REDACTED", "Redactor", "keep_secret", "redact"]

REDACTED = "[redacted]"
MIN_SECRET_CHARS = 4  # a shorter value is no secret worth blanking (and would blank ordinary words)
MIN_PREFIX_CHARS = 8  # every prefix of a secret at least this long is blanked too: a cut key is still a key


class Redactor:
    """Blanks a fixed set of secrets, and every prefix of each of at least MIN_PREFIX_CHARS characters.

    Immutable and picklable; `with_secrets` returns a new one with more.
    """

    __slots__ = ("_secrets",)

    def __init__(self, secrets: Iterable[str | None] = ()):
        kept = {s for s in secrets if isinstance(s, str) and len(s) >= MIN_SECRET_CHARS}
        self._secrets = tuple(sorted(kept, key=len, reverse=True))  # longest first: a secret inside another

    def __getstate__(self):
        return self._secrets

    def __setstate__(self, state) -> None:
        self._secrets = state

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def with_secrets(self, *secrets: str | None) -> Redactor:
        return Redactor((*self._secrets, *secrets))

    def redact(self, text: str) -> str:
        """`text` with each secret, and each prefix of one of at least MIN_PREFIX_CHARS, as [redacted]."""
        for secret in self._secrets:
            if len(secret) < MIN_PREFIX_CHARS:
                text = text.replace(secret, REDACTED)
            else:
                text = _blank_prefixes(text, secret)
        return text


def _blank_prefixes(text: str, secret: str) -> str:
    """Replace every run of `text` that is a prefix of `secret` at least MIN_PREFIX_CHARS long."""
    head = secret[:MIN_PREFIX_CHARS]
    pieces, start = [], 0
    while (found := text.find(head, start)) != -1:
        end = found + MIN_PREFIX_CHARS
        while end < len(text) and end - found < len(secret) and text[end] == secret[end - found]:
            end += 1
        pieces += [text[start:found], REDACTED]
        start = end
    if not pieces:
        return text
    return "".join(pieces) + text[start:]


_lock = threading.Lock()
_process = Redactor()  # the secrets this process was told of, for every path that has no redactor of its own


def keep_secret(*secrets: str | None) -> None:
    """Add secrets (None and short values are ignored) to the ones `redact` blanks in this process."""
    global _process
    with _lock:
        _process = _process.with_secrets(*secrets)


def redact(text: str) -> str:
    """`text` without any secret this process was told of (see `keep_secret`), before anything cuts it."""
    return _process.redact(text) if _process else text
