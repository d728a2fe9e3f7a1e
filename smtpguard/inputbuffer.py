"""The bytes a client has sent and the server has not processed yet.

Reading moves an offset instead of slicing off what was read, and the read part
is dropped only when new bytes arrive and it is at least as long as what is left:
working through a buffer of pipelined commands costs time in proportion to its
size, not to its size times the number of commands in it.
"""

from __future__ import annotations


class InputBuffer:
    def __init__(self) -> None:
        # A read that arrives when all before it was read is kept as it is, and
        # handed out whole without a copy (the usual case while a message streams
        # in); only a read that is not all used up becomes a bytearray.
        self._data: bytes | bytearray = b""
        self._start = 0  # what comes before was read
        self._searched = 0  # no LF between _start and here: an incomplete line is searched once

    def __len__(self) -> int:
        return len(self._data) - self._start

    def append(self, data: bytes) -> None:
        if not len(self):
            self._data = data
            self._start = self._searched = 0
            return
        # Dropping the read part copies what is left: only worth it once that is
        # no longer than what was read, so each byte is copied at most once more.
        if isinstance(self._data, bytes) or self._start >= len(self):
            self._drop_read()
        assert isinstance(self._data, bytearray)
        self._data += data

    def _drop_read(self) -> None:
        with memoryview(self._data) as view:
            self._data = bytearray(view[self._start :])
        self._searched = max(0, self._searched - self._start)
        self._start = 0

    def clear(self) -> None:
        self._data = b""
        self._start = self._searched = 0

    @property
    def one_read(self) -> bool:
        """Whether what is left is one read, untouched: taking it all copies nothing."""
        return isinstance(self._data, bytes) and not self._start

    def startswith(self, prefix: bytes) -> bool:
        return self._data.startswith(prefix, self._start)

    def head(self, size: int) -> bytes:
        """The next ``size`` bytes (or fewer), left in place."""
        return bytes(self._data[self._start : self._start + size])

    def line(self) -> bytes | None:
        """The next line without its LF, or None while its LF has not arrived."""
        end = self._data.find(b"\n", max(self._start, self._searched))
        if end < 0:
            self._searched = len(self._data)
            return None
        line = self._take(end)
        self._start += 1
        return line

    def take(self, size: int) -> bytes:
        """The next ``size`` bytes, or all there are if fewer."""
        return self._take(min(len(self._data), self._start + size))

    def take_through(self, marker: bytes) -> bytes:
        """Everything up to and including the next ``marker``, or all there is."""
        end = self._data.find(marker, self._start)
        return self._take(len(self._data) if end < 0 else end + len(marker))

    def unread(self, size: int) -> None:
        """Give back the last ``size`` bytes taken (only before the next append)."""
        assert size <= self._start
        self._start -= size
        self._searched = 0

    def _take(self, end: int) -> bytes:
        if isinstance(self._data, bytes) and self._start == 0 and end == len(self._data):
            taken = self._data
        else:
            with memoryview(self._data) as view:
                taken = view[self._start : end].tobytes()
        self._start = end
        return taken
