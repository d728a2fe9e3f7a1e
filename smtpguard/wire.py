"""The DATA wire format of RFC 5321 section 4.5.2, both ways, in bulk.

Reading: the message ends only at CRLF "." CRLF.  Lines that start with a dot
lose it (after a CRLF only).  Bare CR and bare LF are then normalised to CRLF, so
the stored message -- and anything relayed from it -- has a single, unambiguous
kind of line ending: a smuggled "<LF>.<LF>" arrives at the next hop as a
stuffed "..", never as an end of data.

Writing: every line that starts with a dot gets another, wherever chunk
boundaries fall.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator

_LINE_ENDING = re.compile(rb"\r\n|\r|\n")
_TERMINATOR = b"\r\n.\r\n"
_DOT_LINE = b"\r\n."
# A partial line is held back at most this long before it is passed on.
_HOLD_LIMIT = 64 * 1024


def normalise_line_endings(data: bytes) -> bytes:
    crlf = data.count(b"\r\n")
    if data.count(b"\r") == crlf and data.count(b"\n") == crlf:
        return data
    return _LINE_ENDING.sub(b"\r\n", data)


class LineEndingNormaliser:
    """Normalises a stream of chunks to CRLF line endings (for BDAT data and
    message files), holding back a final CR whose LF may be in the next chunk."""

    def __init__(self, sink: Callable[[bytes], None], normalise: bool = True) -> None:
        self._sink = sink
        self._normalise = normalise
        self._carry = b""

    def feed(self, data: bytes) -> None:
        if not self._normalise:
            return self._sink(data)
        data = self._carry + data
        self._carry = b"\r" if data.endswith(b"\r") else b""
        self._sink(normalise_line_endings(data[: len(data) - len(self._carry)]))

    def close(self) -> None:
        if self._carry:
            self._sink(b"\r\n")
            self._carry = b""


class DataReader:
    """Decodes the bytes that follow a 354 reply.

    Feed received bytes to :meth:`feed`; decoded message bytes go to ``sink``.
    When the end of data is seen, ``feed`` returns the bytes that followed it
    (pipelined commands), otherwise ``None``.
    """

    def __init__(self, sink: Callable[[bytes], None]) -> None:
        self._sink = sink
        self._pending = b""
        self._at_line_start = True
        self.done = False

    def feed(self, data: bytes) -> bytes | None:
        buffer = self._pending + data if self._pending else data
        if self._at_line_start and buffer.startswith(b".\r\n"):
            return self._finish(b"", buffer[3:])
        # One pass finds the first line that starts with a dot, if any: the end
        # of data can only be there or further on, and before it there is no dot
        # to take off (searching bytes is most of what receiving a message costs).
        dot = buffer.find(_DOT_LINE)
        if dot >= 0:
            end = buffer.find(_TERMINATOR, dot)
            if end >= 0:
                return self._finish(buffer[: end + 2], buffer[end + len(_TERMINATOR) :])
        last_line_end = buffer.rfind(b"\r\n")
        cut = last_line_end + 2 if last_line_end >= 0 else 0
        if len(buffer) - cut > _HOLD_LIMIT:
            # A very long line is passed on in pieces, holding back what may
            # still begin a CRLF or a terminator.
            cut = len(buffer) - 4
        if cut:
            self._emit(buffer[:cut], stuffed=0 <= dot < cut)
        self._pending = buffer[cut:]
        return None

    def _finish(self, data: bytes, rest: bytes) -> bytes:
        if data:
            self._emit(data)
        self._pending = b""
        self.done = True
        return rest

    def _emit(self, data: bytes, stuffed: bool = True) -> None:
        """Pass ``data`` on without its stuffed dots; ``stuffed`` False: it has no
        CRLF "." in it."""
        at_line_start, self._at_line_start = self._at_line_start, data.endswith(b"\r\n")
        if at_line_start and data.startswith(b"."):
            data = data[1:]
        if stuffed:
            data = data.replace(b"\r\n.", b"\r\n")
        self._sink(normalise_line_endings(data))


def _stuff(chunk: bytes, at_line_start: bool) -> bytes:
    stuffed = chunk.replace(b"\n.", b"\n..")
    return b"." + stuffed if at_line_start and chunk.startswith(b".") else stuffed


def dot_stuff(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Encode a stored message (CRLF line endings) for DATA, including the final
    ``.`` line.  Works on chunks of any size and boundary."""
    at_line_start = True
    previous = b""
    for chunk in chunks:
        if not chunk:
            continue
        if previous:
            yield previous
        previous = _stuff(chunk, at_line_start)
        at_line_start = chunk.endswith(b"\n")
    # The terminator goes out with the last chunk: a separate tiny write would
    # wait for the peer's delayed ACK.
    yield previous + (b".\r\n" if at_line_start else b"\r\n.\r\n")
