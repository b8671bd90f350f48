"""providers/sse.py: an incremental decoder of server-sent events, for every provider that streams.

Pure: bytes in, events out; it knows nothing of aiohttp, JSON or any provider's event names.
Spec: https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["SSEEvent", "SSEDecoder"]


@dataclass(slots=True)
class SSEEvent:
    """One dispatched event: its type (default "message") and its data lines joined by \\n."""

    event: str
    data: str


@dataclass(slots=True)
class SSEDecoder:
    """Incremental event-stream decoder: feed it bytes as they arrive, get whole events back.

    Follows https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation:
    lines end in CRLF, LF or CR; `:` starts a comment; a blank line dispatches the event; several
    `data:` lines join with newlines. One leniency: `finish()` dispatches a last event that lacks
    its blank line, since some servers end with `data: [DONE]\\n` and close.
    """

    _buffer: bytes = b""
    _data: list[str] = field(default_factory=list)
    _event: str = ""

    def feed(self, chunk: bytes) -> Iterator[SSEEvent]:
        """Yield every event completed by `chunk`."""
        self._buffer += chunk
        while True:
            cut = _line_end(self._buffer)
            if cut is None:
                return
            end, size = cut
            line, self._buffer = self._buffer[:end], self._buffer[end + size :]
            event = self._take_line(line.decode("utf-8", errors="replace"))
            if event is not None:
                yield event

    def finish(self) -> Iterator[SSEEvent]:
        """Yield what is left when the stream ends (a trailing line, an undispatched event)."""
        if self._buffer:
            line, self._buffer = self._buffer, b""
            event = self._take_line(line.decode("utf-8", errors="replace"))
            if event is not None:
                yield event
        event = self._take_line("")
        if event is not None:
            yield event

    def _take_line(self, line: str) -> SSEEvent | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = SSEEvent(self._event or "message", "\n".join(self._data))
            self._data, self._event = [], ""
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None  # id and retry fields do not matter for chat completions


def _line_end(buffer: bytes) -> tuple[int, int] | None:
    """Return (index, length) of the first line terminator, or None if no whole line yet.

    A CR at the very end is not taken yet: the LF of a CRLF may be in the next chunk.
    """
    lf, cr = buffer.find(b"\n"), buffer.find(b"\r")
    if cr == -1 or (lf != -1 and lf < cr):
        return None if lf == -1 else (lf, 1)
    if cr + 1 == len(buffer):
        return None
    return cr, 2 if buffer[cr + 1] == 10 else 1
