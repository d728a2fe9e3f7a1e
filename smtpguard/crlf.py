"""A message as mail readers read it: a bare CR or a bare LF ends a line as CRLF
does.  Only a BINARYMIME message, which is kept and relayed as sent, can read
otherwise than it is stored; the scanners read it both ways (see the pipeline)."""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator

from smtpguard.spool import CHUNK_SIZE, Message
from smtpguard.wire import LineEndingNormaliser


def bare_line_ends(chunks: Iterable[bytes]) -> int:
    """How many bare CRs and bare LFs ``chunks`` hold (a CRLF split between two
    chunks is one line end, not two bare ones)."""
    count = 0
    after_cr = False
    for chunk in chunks:
        if not chunk:
            continue
        count += chunk.count(b"\r") + chunk.count(b"\n") - 2 * chunk.count(b"\r\n")
        if after_cr and chunk.startswith(b"\n"):
            count -= 2
        after_cr = chunk.endswith(b"\r")
    return count


def with_crlf(message: Message) -> Message:
    """``message`` with every bare CR and bare LF made CRLF: ``message`` itself when
    it has none, else a view that converts as it is read (nothing is copied; it
    reads ``message``'s storage and needs no closing).  Finding out reads
    ``message`` once."""
    bare = bare_line_ends(message.chunks())
    return _CrlfView(message, message.size + bare) if bare else message


class _CrlfView(Message):
    """``raw`` read with CRLF line endings, from byte ``skip`` of that reading on;
    ``size`` is the whole reading's size.  Every read converts from the start of
    ``raw``: the reading cannot be entered in the middle."""

    def __init__(self, raw: Message, size: int, skip: int = 0) -> None:
        super().__init__(io.BytesIO(), 0, owner=False)  # every read goes to ``raw``
        self._raw = raw
        self._skip = skip
        self.size = size - skip

    @property
    def closed(self) -> bool:
        return self._raw.closed

    def tail(self, offset: int) -> Message:
        return _CrlfView(self._raw, self._skip + self.size, self._skip + offset)

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        skip = self._skip
        for piece in self._converted(chunk_size):
            if skip >= len(piece):
                skip -= len(piece)
                continue
            piece, skip = piece[skip:], 0
            for start in range(0, len(piece), chunk_size):
                yield piece[start : start + chunk_size]

    def _converted(self, chunk_size: int) -> Iterator[bytes]:
        converted: list[bytes] = []
        normaliser = LineEndingNormaliser(converted.append)
        for chunk in self._raw.chunks(chunk_size):
            normaliser.feed(chunk)
            yield from converted
            converted.clear()
        normaliser.close()
        yield from converted

    def _read_at(self, offset: int, size: int) -> bytes:
        wanted = bytearray()
        for chunk in self.chunks():
            if offset >= len(chunk):
                offset -= len(chunk)
                continue
            wanted += chunk[offset : offset + size - len(wanted)]
            offset = 0
            if len(wanted) >= size:
                break
        return bytes(wanted)
