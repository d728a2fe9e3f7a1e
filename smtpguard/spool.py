"""Storage for one received message: memory up to a threshold, then a private
temporary file, so memory stays bounded whatever the message size."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from typing import IO

CHUNK_SIZE = 256 * 1024


class SpoolFull(Exception):
    """The message is larger than the spool accepts."""


class Message:
    """A received message, read-only.  Its bytes use CRLF line endings only and are
    not dot-stuffed.  Close it when the transaction ends."""

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

        A message whose first ``limit`` bytes hold no empty line is all header
        when it is that short, and all body otherwise.
        """
        head = self._read_at(0, min(limit, self.size))
        if head.startswith(b"\r\n"):
            return b"", 2
        end = head.find(b"\r\n\r\n")
        if end >= 0:
            return head[: end + 2], end + 4
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

    def isascii(self) -> bool:
        """Whether the message is 7-bit (RFC 6152: else the next hop needs 8BITMIME)."""
        return all(chunk.isascii() for chunk in self.chunks())

    def read(self) -> bytes:
        """The whole message in memory: for small messages and tests only."""
        return b"".join(self.chunks())

    def headers(self, limit: int = 1024 * 1024) -> bytes:
        """The header block, up to and including the empty line (or ``limit`` bytes)."""
        head = self._read_at(0, min(limit, self.size))
        end = head.find(b"\r\n\r\n")
        if head.startswith(b"\r\n"):
            return b"\r\n"
        return head if end < 0 else head[: end + 4]

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
