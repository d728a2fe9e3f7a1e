"""Reading what containers hold: members as readable streams, and the decompressor
that every compressed stream goes through, a bounded step at a time, with its ratio
of output to input watched."""

from __future__ import annotations

import lzma
import zlib
from collections.abc import Callable, Iterable
from typing import IO, Protocol

import attrs

from smtpguard.results import ErrorKind

# Compressed input goes to a decompressor this much at a time, so that the ratio of
# what a stream produced to what it consumed is known to within a step.
INPUT_STEP = 4 * 1024
# What any stream may produce whatever its ratio: small files of one repeated byte
# are common and harmless.
RATIO_FLOOR = 1024 * 1024
# An xz or lzma stream names the memory its decoder needs (mostly its dictionary):
# beyond this it is refused, not allocated.
LZMA_MEMORY = 128 * 1024 * 1024


class ContainerError(Exception):
    """A container, or one of its members, cannot be read: ``kind`` says why."""

    def __init__(self, kind: ErrorKind, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


@attrs.frozen
class Member:
    """One member of a container: its ``contents`` to read (None for a directory, a
    link or another entry without any), or the ``problem`` that keeps them unread."""

    name: str
    contents: Readable | None = None
    problem: ContainerError | None = None


@attrs.frozen
class Bounds:
    """What the walk allows: output at most ``max_ratio`` times the input of any
    decompressed stream, ``max_parts`` members; ``check`` is called at every step
    (it raises to stop the walk)."""

    max_ratio: int
    max_parts: int
    check: Callable[[], None]


class ChunkReader:
    """A readable stream of ``chunks``; ``tap`` sees each chunk as it is taken."""

    def __init__(self, chunks: Iterable[bytes], tap: Callable[[bytes], None] | None = None) -> None:
        self._chunks = iter(chunks)
        self._tap = tap
        self._chunk = b""
        self._at = 0

    def read(self, size: int = -1, /) -> bytes:
        while self._at >= len(self._chunk):
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            if self._tap is not None:
                self._tap(chunk)
            self._chunk, self._at = chunk, 0
        end = len(self._chunk) if size < 0 else self._at + size
        piece = self._chunk[self._at : end]
        self._at += len(piece)
        return piece


class Slice:
    """Bytes ``start`` to ``end`` (or the end) of a seekable file, read where they are
    whatever else reads the file in between."""

    def __init__(self, spool: IO[bytes], start: int, end: int | None = None) -> None:
        self._spool = spool
        self.at = start
        self._end = end

    def read(self, size: int = -1, /) -> bytes:
        if self._end is not None:
            size = self._end - self.at if size < 0 else min(size, self._end - self.at)
            if size <= 0:
                return b""
        self._spool.seek(self.at)
        data = self._spool.read(size)
        self.at += len(data)
        return data


class Decoder(Protocol):
    @property
    def eof(self) -> bool: ...

    @property
    def needs_input(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int = -1, /) -> bytes: ...


class Inflate:
    """zlib's decompressor with the interface of bz2's and lzma's."""

    def __init__(self, wbits: int) -> None:
        self._zlib = zlib.decompressobj(wbits)

    @property
    def eof(self) -> bool:
        return self._zlib.eof

    @property
    def needs_input(self) -> bool:
        return not self._zlib.unconsumed_tail

    @property
    def unused_data(self) -> bytes:
        return self._zlib.unused_data

    def decompress(self, data: bytes, max_length: int = -1, /) -> bytes:
        return self._zlib.decompress(self._zlib.unconsumed_tail + data, max(max_length, 0))


class Stored:
    eof = False
    needs_input = True
    unused_data = b""

    def decompress(self, data: bytes, max_length: int = -1, /) -> bytes:
        return data


_DECODE_ERRORS = (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError)


class Decompressing:
    """``read(size)`` gives the next ``size`` bytes (fewer only at the end) that
    ``decoder`` makes of what ``source`` reads, a bounded step at a time.

    ``restart``, given the input after a stream's end, returns a decoder for another
    stream joined to it (gzip and bzip2 may be concatenated) or None when the rest is
    not one (trailing bytes, ignored as gunzip does).  ``ends_with_input``: the end of
    the input ends the data (a zip entry, whose size its directory gives), not an
    error.  ``limit``: no more than this is produced.  ``finish`` is called with the
    reader once its data has ended, to check it."""

    def __init__(
        self,
        source: Callable[[int], bytes],
        decoder: Decoder,
        bounds: Bounds,
        what: str,
        *,
        restart: Callable[[bytes], Decoder | None] | None = None,
        ends_with_input: bool = False,
        limit: int | None = None,
        pending: bytes = b"",
        finish: Callable[[Decompressing], None] | None = None,
    ) -> None:
        self._source = source
        self._decoder = decoder
        self._bounds = bounds
        self._what = what
        self._restart = restart
        self._ends_with_input = ends_with_input
        self._limit = limit
        self._input = pending
        self._finish = finish
        self._failed: ContainerError | None = None
        self.done = False
        self.consumed = len(pending)
        self.produced = 0
        self.crc = 0

    @property
    def leftover(self) -> int:
        """Input taken but not used: what followed the data's end."""
        return len(self._input) + len(self._decoder.unused_data)

    def read(self, size: int = -1, /) -> bytes:
        if self._failed is not None:
            raise self._failed
        wanted = 256 * 1024 if size < 0 else size
        pieces = []
        try:
            while wanted > 0 and not self.done:
                self._bounds.check()
                piece = self._step(wanted)
                if piece:
                    pieces.append(piece)
                    wanted -= len(piece)
        except ContainerError as error:
            self._failed = error
            raise
        return b"".join(pieces)

    def _take(self, size: int) -> bytes:
        if self._input:
            data, self._input = self._input, b""
            return data
        data = self._source(size)
        self.consumed += len(data)
        return data

    def _end(self) -> bytes:
        self.done = True
        if self._finish is not None:
            self._finish(self)
        return b""

    def _step(self, wanted: int) -> bytes:
        decoder = self._decoder
        if decoder.eof:
            return self._next_stream()
        if self._limit is not None:
            wanted = min(wanted, self._limit - self.produced)
            if wanted <= 0:
                return self._end()
        data = b""
        if decoder.needs_input:
            data = self._take(wanted if isinstance(decoder, Stored) else INPUT_STEP)
            if not data:
                if self._ends_with_input:
                    return self._end()
                raise ContainerError(ErrorKind.CORRUPT_FILE, f"{self._what} data cut short")
        try:
            out = decoder.decompress(data, wanted)
        except _DECODE_ERRORS as error:
            if isinstance(error, lzma.LZMAError) and "memory usage limit" in str(error).lower():
                detail = f"{self._what} data needs more than {LZMA_MEMORY} bytes of memory to decompress"
                raise ContainerError(ErrorKind.CONTENT_SIZE, detail) from None
            raise ContainerError(ErrorKind.CORRUPT_FILE, f"{self._what} data: {error}") from None
        if not out and not data and not decoder.eof and not decoder.needs_input:
            raise ContainerError(ErrorKind.CORRUPT_FILE, f"{self._what} data: the decoder makes no progress")
        self.produced += len(out)
        self.crc = zlib.crc32(out, self.crc)
        ratio = self._bounds.max_ratio
        if self.produced > RATIO_FLOOR and self.produced > ratio * max(self.consumed - self.leftover, 1):
            raise ContainerError(ErrorKind.CONTENT_SIZE, f"decompresses to more than {ratio} times its size")
        return out

    def _next_stream(self) -> bytes:
        """After a stream's end: the next joined stream, if one follows."""
        if self._restart is None:
            return self._end()
        rest = self._decoder.unused_data + self._input
        self._input = b""
        while len(rest.lstrip(b"\x00")) < 6:
            more = self._take(INPUT_STEP)
            if not more:
                break
            rest += more
        # Zeros between streams are padding (xz's, or a tape's after a gzip file).
        rest = rest.lstrip(b"\x00")
        decoder = self._restart(rest) if rest else None
        if decoder is None:
            return self._end()
        self._decoder = decoder
        self._input = rest
        return b""
