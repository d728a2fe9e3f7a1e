"""A spooled message as the MIME splitter reads it without a copy: a read-only map
of its file, and spans of that map for large bodies.

Pages of a file map count in the process's resident set (VmRSS, VmHWM) while they
are mapped in.  The file's pages are in the page cache anyway (the spool wrote
them), so the map costs no memory of its own as long as the walk lets go of what
it read: :class:`Mapped` releases a region (``madvise(MADV_DONTNEED)``, which
drops the mapping, not the data) once reading has moved a window past it, and
spans are read a window at a time, released behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
from collections.abc import Iterator
from typing import overload

import attrs

from smtpguard.spool import Message

WINDOW = 4 * 1024 * 1024
# A body at least this long is kept as a span of the map, not copied out of it.
SPAN_MIN = 4 * 1024 * 1024


def _page_floor(position: int) -> int:
    return position - position % mmap.PAGESIZE


class Mapped:
    """A read-only map that reads like the ``bytes`` of the message: ``len``, ``find``,
    indexing and slicing (slices are copies)."""

    def __init__(self, region: mmap.mmap) -> None:
        self._map = region
        self._size = len(region)
        self._kept = 0  # mapped-in pages from here on are not released yet

    def __len__(self) -> int:
        return self._size

    @overload
    def __getitem__(self, key: int) -> int: ...

    @overload
    def __getitem__(self, key: slice) -> bytes: ...

    def __getitem__(self, key: int | slice) -> int | bytes:
        return self._map[key]

    def find(self, needle: bytes, start: int = 0) -> int:
        """``bytes.find``, searching a window at a time and releasing what it passed."""
        at = max(start, 0)
        while at < self._size:
            stop = min(at + WINDOW, self._size)
            found = self._map.find(needle, at, min(stop + len(needle) - 1, self._size))
            self.passed(found if found >= 0 else stop)
            if found >= 0:
                return found
            at = stop
        return -1

    def passed(self, position: int) -> None:
        """Reading got to ``position``: release the pages a window or more behind it."""
        if position < self._kept:
            self._kept = _page_floor(position)
        elif position - self._kept >= WINDOW:
            end = _page_floor(position)
            self._map.madvise(mmap.MADV_DONTNEED, self._kept, end - self._kept)
            self._kept = end

    def span(self, start: int, stop: int) -> Span:
        return Span(self, start, stop)

    def windows(self, start: int, stop: int) -> Iterator[bytes]:
        for at in range(start, stop, WINDOW):
            end = min(at + WINDOW, stop)
            window = self._map[at:end]
            self.passed(end)
            yield window


@attrs.frozen
class Span:
    """A body of the message in a :class:`Mapped`, read a window at a time."""

    source: Mapped
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def windows(self) -> Iterator[bytes]:
        return self.source.windows(self.start, self.stop)

    def tobytes(self) -> bytes:
        return b"".join(self.windows())

    def digest(self) -> bytes:
        digest = hashlib.blake2b()
        for window in self.windows():
            digest.update(window)
        return digest.digest()

    def without_line_end(self) -> Span:
        tail = self.source[max(self.start, self.stop - 2) : self.stop]
        cut = 2 if tail.endswith(b"\r\n") else 1 if tail.endswith((b"\r", b"\n")) else 0
        return Span(self.source, self.start, self.stop - cut)


@contextlib.contextmanager
def message_data(message: Message) -> Iterator[bytes | Mapped]:
    """The message to parse: mapped when it is a file of its own, else its bytes."""
    fileno = message.fileno()
    if fileno is None or message.size == 0:
        yield message.read()
        return
    with mmap.mmap(fileno, message.size, access=mmap.ACCESS_READ) as region:
        yield Mapped(region)
