"""Storage for one received message: memory up to a threshold, then a private
temporary file, so memory stays bounded whatever the message size."""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Iterator
from typing import IO

CHUNK_SIZE = 256 * 1024
_LINE_END = re.compile(rb"\r\n|\r|\n")
# A line end followed by another: an empty line, as mail readers split lines (a CR
# is a line end of its own only when no LF follows it).
_EMPTY_LINE = re.compile(rb"(\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")


def _header_end(head: bytes) -> tuple[int, int] | None:
    """(end of the header section's last line, start of the body) in ``head``: at
    its first empty line, whatever the line ends are; None when it has none."""
    first = _LINE_END.match(head)
    if first is not None:
        return 0, first.end()
    crlf = head.find(b"\r\n\r\n")
    end = len(head) if crlf < 0 else crlf + 4
    pairs = head.count(b"\r\n", 0, end)
    if head.count(b"\r", 0, end) == pairs and head.count(b"\n", 0, end) == pairs:
        # CRLF line ends only (as every message but a BINARYMIME one has).
        return None if crlf < 0 else (crlf + 2, crlf + 4)
    empty = _EMPTY_LINE.search(head)
    return None if empty is None else (empty.end(1), empty.end())


class SpoolFull(Exception):
    """The message is larger than the spool accepts."""


class Message:
    """A received message, read-only, not dot-stuffed.  Its line endings are CRLF
    only, except in a BINARYMIME message, which is kept exactly as sent (see
    :mod:`smtpguard.crlf`).  Close it when the transaction ends."""

    def __init__(self, body: IO[bytes], size: int, start: int = 0, owner: bool = True) -> None:
        self._body = body
        self._start = start
        self._owner = owner
        self.size = size - start

    @classmethod
    def from_bytes(cls, data: bytes) -> Message:
        return cls(io.BytesIO(data), len(data))

    def tail(self, offset: int) -> Message:
        """The message from ``offset`` on, sharing this one's storage (closing the
        tail leaves this message open)."""
        return Message(self._body, self._start + self.size, self._start + offset, owner=False)

    def split_headers(self, limit: int = 1024 * 1024) -> tuple[bytes, int]:
        """(header section without the empty line, offset of the body).

        The header section ends at the first empty line, as mail readers find it:
        a bare CR or LF ends a line too.  A message whose first ``limit`` bytes
        hold no empty line is all header when it is that short, and all body
        otherwise.
        """
        head = self._read_at(0, min(limit, self.size))
        found = _header_end(head)
        if found is not None:
            return head[: found[0]], found[1]
        return (head, self.size) if self.size <= limit else (b"", 0)

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """The whole message, from the start, in chunks of at most ``chunk_size``.

        Each iterator keeps its own position, so several readers (scanners
        running side by side, in threads too) never disturb each other.
        """
        for offset in range(0, self.size, chunk_size):
            chunk = self._read_at(offset, min(chunk_size, self.size - offset))
            if not chunk:
                return
            yield chunk

    def _read_at(self, offset: int, size: int) -> bytes:
        offset += self._start
        if isinstance(self._body, io.BytesIO):
            return self._body.getbuffer()[offset : offset + size].tobytes()
        return os.pread(self._body.fileno(), size, offset)

    def fileno(self) -> int | None:
        """The descriptor of the file that holds the message from its first byte on,
        or None when it is held in memory or shares a file at an offset."""
        if isinstance(self._body, io.BytesIO) or self._start:
            return None
        return self._body.fileno()

    def isascii(self) -> bool:
        """Whether the message is 7-bit (RFC 6152: else the next hop needs 8BITMIME)."""
        return all(chunk.isascii() for chunk in self.chunks())

    def read(self) -> bytes:
        """The whole message in memory: for small messages and tests only."""
        return b"".join(self.chunks())

    def headers(self, limit: int = 1024 * 1024) -> bytes:
        """The header block, up to and including the empty line (or ``limit`` bytes)."""
        head = self._read_at(0, min(limit, self.size))
        found = _header_end(head)
        return head if found is None else head[: found[1]]

    def close(self) -> None:
        if self._owner:
            self._body.close()

    @property
    def closed(self) -> bool:
        return self._body.closed


class Spool:
    """Collects a message as it arrives.

    Up to ``memory_limit`` bytes stay in memory; beyond that the data moves to an
    anonymous temporary file in ``directory`` (created 0600 and unlinked at once,
    so nothing is left behind even after a crash).  Writes beyond ``max_size``
    bytes are counted but not stored, and :meth:`finish` then raises SpoolFull.
    """

    def __init__(self, max_size: int, memory_limit: int = 1024 * 1024, directory: str | None = None) -> None:
        self._max_size = max_size
        self._memory_limit = memory_limit
        self._directory = directory
        self._body: IO[bytes] = io.BytesIO()
        self._in_memory = True
        self.size = 0
        self.error: OSError | None = None

    @property
    def overflowed(self) -> bool:
        return bool(self._max_size) and self.size > self._max_size

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.overflowed or self.error is not None:
            return
        try:
            if self._in_memory and self.size > self._memory_limit:
                self._move_to_disk()
            self._body.write(data)
        except OSError as error:
            self.error = error

    def _move_to_disk(self) -> None:
        memory = self._body
        assert isinstance(memory, io.BytesIO)
        disk = tempfile.TemporaryFile(prefix="smtpguard-", dir=self._directory)
        try:
            disk.write(memory.getbuffer())
        except BaseException:
            disk.close()
            raise
        self._body = disk
        self._in_memory = False

    def finish(self) -> Message:
        """Hand over the message; raises SpoolFull or the OSError that writing met."""
        if self.overflowed:
            self.discard()
            raise SpoolFull(self.size)
        if self.error is not None:
            self.discard()
            raise self.error
        try:
            self._body.flush()
        except OSError:
            self.discard()
            raise
        return Message(self._body, self.size)

    def discard(self) -> None:
        self._body.close()
