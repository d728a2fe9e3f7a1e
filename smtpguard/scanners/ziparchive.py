"""Reads zip archives the way 7-Zip does: the entries their central directory lists,
wherever the archive starts in its file (a self-extractor's code may come first),
and the entries that only a local header describes.  zipfile reads the directory;
the entries' data goes through :class:`~smtpguard.scanners.streams.Decompressing`,
so that no method (bzip2 and LZMA included) expands a member whole."""

from __future__ import annotations

import bz2
import lzma
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, cast

import attrs

from smtpguard.results import ErrorKind
from smtpguard.scanners.streams import (
    LZMA_MEMORY,
    Bounds,
    ContainerError,
    Decoder,
    Decompressing,
    Inflate,
    Member,
    Slice,
    Stored,
)

# zipfile reads a central directory whole, with an object per entry: it may take this
# many bytes per member that max_parts allows.
DIRECTORY_BYTES_PER_PART = 1024

LOCAL_HEADER = b"PK\x03\x04"
_END = b"PK\x05\x06"
# Where a zip's end record is: its 22 bytes, after a comment of up to 65535.
TAIL = 0xFFFF + 22
_DESCRIPTOR = b"PK\x07\x08"
_LOCAL = struct.Struct("<4s5H3L2H")
_END_RECORD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR_SIZE = 20
_ZIP64_END = struct.Struct("<4sQ2H2L4Q")
_METHODS = {
    zipfile.ZIP_STORED: "stored",
    zipfile.ZIP_DEFLATED: "deflate",
    zipfile.ZIP_BZIP2: "bzip2",
    zipfile.ZIP_LZMA: "lzma",
}


@attrs.frozen
class _Entry:
    """A zip entry as its central directory or local header describes it (None: a size
    or CRC that follows the data, in a data descriptor)."""

    name: str
    offset: int
    flags: int
    method: int
    crc: int | None
    compressed: int | None
    size: int | None


def _end_record(spool: IO[bytes], size: int) -> tuple[int, int, int] | None:
    """(entries, directory size, end record offset) as the end of central directory
    record states them (the zip64 one where there is one); None without a record."""
    tail_size = min(size, TAIL)
    spool.seek(size - tail_size)
    tail = spool.read(tail_size)
    at = tail.rfind(_END)
    if at < 0 or len(tail) - at < _END_RECORD.size:
        return None
    entries, directory = _END_RECORD.unpack_from(tail, at)[4:6]
    where = size - tail_size + at
    zip64 = where - _ZIP64_LOCATOR_SIZE - _ZIP64_END.size
    if (entries == 0xFFFF or directory == 0xFFFFFFFF) and zip64 >= 0:
        spool.seek(zip64)
        record = spool.read(_ZIP64_END.size)
        if record[:4] == b"PK\x06\x06":
            entries, directory = _ZIP64_END.unpack(record)[7:9]
    return entries, directory, where


def _local_header(spool: IO[bytes], offset: int) -> tuple[Any, ...] | None:
    spool.seek(offset)
    raw = spool.read(_LOCAL.size)
    if len(raw) < _LOCAL.size or not raw.startswith(LOCAL_HEADER):
        return None
    return _LOCAL.unpack(raw)


def _lzma1(source: Callable[[int], bytes]) -> Decoder:
    """The decoder of a zip LZMA entry, whose data starts with its version and properties."""
    header = source(4)
    properties = source(int.from_bytes(header[2:4], "little")) if len(header) == 4 else b""
    if len(properties) != 5 or properties[0] >= 9 * 5 * 5:
        raise ContainerError(ErrorKind.CORRUPT_FILE, "bad LZMA properties")
    dictionary = int.from_bytes(properties[1:5], "little")
    if dictionary > LZMA_MEMORY:
        detail = f"LZMA data needs a dictionary of {dictionary} bytes, more than {LZMA_MEMORY}"
        raise ContainerError(ErrorKind.CONTENT_SIZE, detail)
    pb, rest = divmod(properties[0], 9 * 5)
    lp, lc = divmod(rest, 9)
    lzma1 = {"id": lzma.FILTER_LZMA1, "lc": lc, "lp": lp, "pb": pb, "dict_size": dictionary}
    return lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[lzma1])


def _zip_decoder(method: int, source: Callable[[int], bytes]) -> Decoder:
    if method == zipfile.ZIP_STORED:
        return Stored()
    if method == zipfile.ZIP_DEFLATED:
        return Inflate(-zlib.MAX_WBITS)
    if method == zipfile.ZIP_BZIP2:
        return bz2.BZ2Decompressor()
    if method == zipfile.ZIP_LZMA:
        return _lzma1(source)
    raise ContainerError(ErrorKind.CORRUPT_FILE, f"compression method {method} is not supported")


class ZipReader:
    """The entries of one zip archive in a seekable file: those its central directory
    lists, then those found only by their local headers, in the gaps between what the
    listed ones take (7-Zip extracts those too)."""

    def __init__(self, spool: IO[bytes], bounds: Bounds, embedded: bool) -> None:
        self._spool = spool
        self._bounds = bounds
        self._embedded = embedded
        self._size = spool.seek(0, 2)
        self._taken: list[tuple[int, int]] = []
        self._data_end: int | None = None

    def members(self) -> Iterator[Member]:
        listed, unreadable = self._directory()
        found = False
        for entry in listed:
            found = True
            yield self._listed(entry)
        for member in self._unlisted():
            found = True
            yield member
        if unreadable is not None and not self._embedded:
            if not found:
                raise ContainerError(ErrorKind.CORRUPT_FILE, f"not a readable zip archive: {unreadable}")
            raise ContainerError(ErrorKind.CORRUPT_FILE, f"its central directory cannot be read: {unreadable}")

    def _directory(self) -> tuple[list[_Entry], str | None]:
        """The central directory's entries, or why it cannot be read."""
        stated = _end_record(self._spool, self._size)
        if stated is None:
            return [], "no end of central directory record"
        entries, directory, end = stated
        if not self._embedded:
            limit = self._bounds.max_parts
            if entries > limit:
                raise ContainerError(ErrorKind.CONTENT_SIZE, f"more than {limit} parts")
            if directory > limit * DIRECTORY_BYTES_PER_PART:
                detail = f"a central directory of {directory} bytes, more than {limit} parts need"
                raise ContainerError(ErrorKind.CONTENT_SIZE, detail)
        elif directory > self._bounds.max_parts * DIRECTORY_BYTES_PER_PART:
            return [], "central directory too large"
        try:
            with zipfile.ZipFile(self._spool) as archive:
                infos = archive.infolist()
        except Exception as error:  # zipfile raises many kinds for a bad directory
            return [], str(error) or type(error).__name__
        self._taken.append((end - directory, self._size))
        listed = [
            _Entry(info.filename, info.header_offset, info.flag_bits, info.compress_type, info.CRC, *sizes)
            for info in infos
            for sizes in [(info.compress_size, info.file_size)]
        ]
        return listed, None

    def _listed(self, entry: _Entry) -> Member:
        header = _local_header(self._spool, entry.offset)
        if header is None:
            problem = ContainerError(ErrorKind.CORRUPT_FILE, "bad magic number for file header")
            return Member(entry.name, problem=problem)
        start = entry.offset + _LOCAL.size + header[9] + header[10]
        self._taken.append((entry.offset, start + (entry.compressed or 0)))
        if entry.name.endswith("/"):
            return Member(entry.name)
        return self._member(entry, start)

    def _member(self, entry: _Entry, start: int, described: bool = False) -> Member:
        """The entry whose data starts at ``start``; ``described``: its CRC is in the data
        descriptor after its data, whose end is then noted in ``_data_end``."""
        if entry.flags & 0x41:  # encrypted, traditionally or strongly
            return Member(entry.name, problem=ContainerError(ErrorKind.PASSWORD_PROTECTED, "encrypted archive member"))
        end = None if entry.compressed is None else start + entry.compressed
        data = Slice(self._spool, start, end)
        try:
            decoder = _zip_decoder(entry.method, data.read)
        except ContainerError as error:
            return Member(entry.name, problem=error)

        def check(reader: Decompressing) -> None:
            expected = entry.crc
            if described:
                self._data_end = data.at - reader.leftover
                expected = self._descriptor_crc(self._data_end)
            if expected is not None and reader.crc != expected:
                raise ContainerError(ErrorKind.CORRUPT_FILE, f"Bad CRC-32 for file {entry.name!r}")

        reader = Decompressing(
            data.read,
            decoder,
            self._bounds,
            _METHODS.get(entry.method, f"method {entry.method}"),
            ends_with_input=end is not None,
            limit=entry.size,
            finish=check,
        )
        return Member(entry.name, reader)

    def _descriptor_crc(self, at: int) -> int | None:
        self._spool.seek(at)
        descriptor = self._spool.read(8)
        if descriptor.startswith(_DESCRIPTOR):
            descriptor = descriptor[4:]
        return int.from_bytes(descriptor[:4], "little") if len(descriptor) >= 4 else None

    # entries only a local header lists

    def _gaps(self) -> Iterator[tuple[int, int]]:
        at = 0
        for start, end in sorted(self._taken):
            if start > at:
                yield at, start
            at = max(at, end)
        if at < self._size:
            yield at, self._size

    def _unlisted(self) -> Iterator[Member]:
        for start, end in list(self._gaps()):
            at = start
            while (found := self._find(LOCAL_HEADER, at, end)) is not None:
                self._data_end = None
                member, after = self._unlisted_at(found, end)
                if member is not None:
                    yield member
                at = after()

    def _find(self, signature: bytes, start: int, end: int) -> int | None:
        """Where ``signature`` next occurs from ``start`` on, before ``end``."""
        step = 256 * 1024
        at = start
        while at < end:
            self._bounds.check()
            self._spool.seek(at)
            window = self._spool.read(min(step + len(signature) - 1, end - at))
            found = window.find(signature)
            if found >= 0:
                return at + found
            if len(window) < len(signature):
                return None
            at += len(window) - len(signature) + 1
        return None

    def _unlisted_at(self, offset: int, end: int) -> tuple[Member | None, Callable[[], int]]:
        """The entry whose local header is at ``offset`` if the header is a plausible one,
        and where to look on once it has been read."""
        header = _local_header(self._spool, offset)
        if header is None:
            return None, lambda: offset + 1
        _, version, flags, method, _, _, crc, compressed, size, name_length, extra_length = header
        start = offset + _LOCAL.size + name_length + extra_length
        self._spool.seek(offset + _LOCAL.size)
        raw_name = self._spool.read(name_length)
        encrypted = flags & 0x41
        described = bool(flags & 0x08) and not compressed
        plausible = (
            version <= 63
            and (method in _METHODS or encrypted)
            and 0 < name_length == len(raw_name)
            and b"\x00" not in raw_name
            and (described or start + compressed <= self._size)
        )
        if not plausible:
            return None, lambda: offset + 1
        name = raw_name.decode("utf-8" if flags & 0x800 else "cp437", "replace")
        if encrypted or not described:
            entry = _Entry(name, offset, flags, method, crc, compressed, size)
            return self._member(entry, start), lambda: start + compressed
        if method == zipfile.ZIP_STORED:
            # Stored data whose size follows it: it runs to its data descriptor.
            descriptor = self._find(_DESCRIPTOR, start, end)
            if descriptor is None:
                return None, lambda: offset + 1
            length: int | None = descriptor - start
        else:
            length = None
        entry = _Entry(name, offset, flags, method, None, length, None)

        def after() -> int:
            # Not read to its end, its length is unknown: look on from its header.
            return offset + 1 if self._data_end is None else self._data_end + 12

        return self._member(entry, start, described=True), after


def holds_zip(spool: IO[bytes], bounds: Bounds) -> bool:
    """Whether a file that is not a zip carries one: a central directory zipfile reads
    or a plausible local header (a self-extracting archive's, say)."""
    return next(ZipReader(spool, bounds, embedded=True).members(), None) is not None


def ends_like_zip(tail: bytes) -> bool:
    """Whether a file whose last bytes are ``tail`` may end with a zip: its end of
    central directory record is there.  (Looking only there, where zipfile and a
    self-extractor look, costs the same whatever the file's size.)"""
    return tail.rfind(_END, max(0, len(tail) - TAIL)) >= 0


class ZipScout:
    """Passes chunks on unchanged and, from the first zip local header signature on,
    keeps a copy of them in a temporary file (in memory up to ``memory`` bytes) to be
    opened as a zip afterwards, if the stream :func:`ends like a zip <ends_like_zip>`."""

    def __init__(self, memory: int) -> None:
        self._memory = memory
        self._tail = b""
        self._spool: IO[bytes] | None = None

    @property
    def spool(self) -> IO[bytes] | None:
        """The copy, once the stream has ended like a zip."""
        return self._spool if ends_like_zip(self._tail) else None

    def watch(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            if self._spool is not None:
                self._spool.write(chunk)
            # Only where the chunk holds the signature's last byte is it searched for.
            elif b"\x04" in chunk:
                edge = (self._tail[-3:] + chunk[:3]).find(LOCAL_HEADER)
                if 0 <= edge < min(3, len(self._tail)):
                    self._keep(self._tail[edge - 3 :] + chunk)
                elif (at := chunk.find(LOCAL_HEADER)) >= 0:
                    self._keep(chunk[at:])
            self._tail = chunk[-TAIL:] if len(chunk) >= TAIL else (self._tail + chunk)[-TAIL:]
            yield chunk

    def _keep(self, data: bytes) -> None:
        self._spool = cast(IO[bytes], tempfile.SpooledTemporaryFile(max_size=self._memory))
        self._spool.write(data)

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()
