"""Files that mail clients find inside a part's text and show as attachments: yEnc
and BinHex 4.0 blocks, and base64 the part did not declare (after a line that reads
like a Content-Transfer-Encoding, whatever its line length, and runs of base64-looking
lines anywhere).  Each finder reads its text once, forward, and calls ``check``
between blocks and every so many steps inside one, as the walk's other finders do.
"""

from __future__ import annotations

import io
import itertools
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, BinaryIO

from smtpguard.scanners.decoders import decode_base64_text

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

Check = Callable[[], None]

# Steps (escapes, repeat markers, lines) between two calls of ``check``.
CHECK_EVERY = 4096
# BinHex forks are made and handed on this much at a time.
FORK_CHUNK = 64 * 1024


def _unchecked() -> None:
    pass


def _line_end(data: bytes, at: int, newline: bytes = b"\n") -> int:
    """Where the line that holds ``at`` ends (its ``newline`` or the end of ``data``)."""
    end = data.find(newline, at)
    return len(data) if end < 0 else end


def _next_line(data: bytes, at: int, newline: bytes = b"\n") -> int:
    """Where the line after the one that holds ``at`` starts."""
    return min(_line_end(data, at, newline) + 1, len(data))


def _newline(data: bytes) -> bytes:
    """What ends ``data``'s lines: LF, or CR in text of bare CRs."""
    return b"\n" if b"\n" in data or b"\r" not in data else b"\r"


# -- undeclared base64 ---------------------------------------------------------------------

# Runs of base64-looking lines: what a part without (or with a wrong)
# Content-Transfer-Encoding, or a multipart whose boundary is broken, may still carry.
_BASE64_RUN = re.compile(
    rb"^[A-Za-z0-9+/]{16,}={0,2}[ \t]*\r?(?:\n|\Z)(?:[A-Za-z0-9+/]{4,}={0,2}[ \t]*\r?(?:\n|\Z))*", re.MULTILINE
)
# Where a run can start after the first line: the search skips from newline to
# newline instead of trying the run's pattern at every byte.
_BASE64_RUN_START = re.compile(rb"\n[A-Za-z0-9+/]{16}")
# A line that reads like a Content-Transfer-Encoding field, found by its line end:
# a pattern that starts with one literal byte is searched for at memory speed, one
# that starts with a class of two (or at a line start) seven times slower.
_TRANSFER_ENCODING = re.compile(rb"(?i:content-transfer-encoding)[ \t]*:")
_TRANSFER_ENCODING_AFTER = {end: re.compile(re.escape(end) + _TRANSFER_ENCODING.pattern) for end in (b"\n", b"\r")}
# The rest of a header section: continuation lines and fields (a blank before the
# colon too).
_HEADER_LIKE = re.compile(rb"[ \t]|[!-9;-~]+[ \t]*:")


def _base64_spans(data: bytes, check: Check, at: int, stop: int) -> Iterator[tuple[int, int]]:
    """Where the runs of base64-looking lines (24 bytes at least) that start in
    ``data[at:stop]`` are: the matches of ``_BASE64_RUN.finditer(data)``, found faster."""
    while at < stop:
        check()
        run = _BASE64_RUN.match(data, at)
        if run is not None:
            if run.end() - at >= 24:
                yield at, run.end()
            at = run.end()
            continue
        start = _BASE64_RUN_START.search(data, at, stop)
        if start is None:
            return
        at = start.start() + 1


def base64_runs(data: bytes, check: Check = _unchecked) -> Iterator[bytes]:
    """The runs of base64-looking lines (24 bytes at least) in ``data``, as they stand."""
    for start, end in _base64_spans(data, check, 0, len(data)):
        yield data[start:end]


def _transfer_encodings(data: bytes, newline: bytes) -> Iterator[int]:
    """Where the lines that read like a Content-Transfer-Encoding field start."""
    if b":" not in data:  # searched for at memory speed: most text has none, and is done
        return
    if _TRANSFER_ENCODING.match(data):
        yield 0
    pattern = _TRANSFER_ENCODING_AFTER[newline]
    at = 0
    while (found := pattern.search(data, at)) is not None:
        yield found.start() + 1
        at = found.end()


def _after_header(data: bytes, at: int, check: Check, newline: bytes) -> int:
    """Where the text after the header lines that start at ``at`` begins: past the
    empty line that ends them, or at the first line that is no header line (the
    header ran into the text)."""
    lines = 0
    while at < len(data):
        lines += 1
        if lines % CHECK_EVERY == 0:
            check()
        if data.startswith(b"\r\n", at):
            return at + 2
        if data[at] in b"\r\n":
            return at + 1
        if _HEADER_LIKE.match(data, at) is None:
            return at
        at = _next_line(data, at, newline)
    return at


def declared_base64_spans(data: bytes, check: Check = _unchecked) -> Iterator[tuple[int, int]]:
    """Where ``data`` holds text that a line reading like "Content-Transfer-Encoding:
    base64" (in any case, a blank before the colon or not) declares base64: from the
    end of the header lines around it to the next line that starts with "--" (a
    boundary) or reads like a Content-Transfer-Encoding, whatever its line length."""
    newline = _newline(data)
    starts = _transfer_encodings(data, newline)
    line = next(starts, None)
    boundary = -1  # the last line found that starts with "--" (len(data): none is left)
    while line is not None:
        check()
        if b"base64" not in data[line : _line_end(data, line, newline)].lower():
            line = next(starts, None)
            continue
        begin = _after_header(data, _next_line(data, line, newline), check, newline)
        line = next((start for start in starts if start >= begin), None)
        if boundary < begin:
            # Searched again only past the last one found: each byte is searched once.
            found = data.find(newline + b"--", begin - 1)
            boundary = len(data) if found < 0 else found + 1
        yield begin, min(boundary, len(data) if line is None else line)


def undeclared_base64(data: bytes, check: Check = _unchecked) -> Iterator[bytes]:
    """The base64 in a part that did not declare it: the text after each line that
    reads like a Content-Transfer-Encoding of base64 (see
    :func:`declared_base64_spans`), and elsewhere the runs of :func:`base64_runs`."""
    at = 0
    for start, stop in declared_base64_spans(data, check):
        for run_start, run_end in _base64_spans(data, check, at, start):
            yield data[run_start:run_end]
        yield data[start:stop]
        at = stop
    for run_start, run_end in _base64_spans(data, check, at, len(data)):
        yield data[run_start:run_end]


# -- yEnc ----------------------------------------------------------------------------------

_YENC_BEGIN = re.compile(rb"^=ybegin[ \t]", re.MULTILINE)
_YENC_PART = re.compile(rb"=ypart[ \t]")
_YENC_END = re.compile(rb"^=yend(?:[ \t]|\r?$)", re.MULTILINE)
_YENC_NAME = re.compile(rb"[ \t]name=")
_YENC_PLAIN = bytes((byte - 42) % 256 for byte in range(256))
_YENC_ESCAPED = bytes((byte - 106) % 256 for byte in range(256))


def decode_yenc(data: bytes, check: Check = _unchecked) -> bytes:
    """yEnc-encoded lines: each byte less 42, and after "=" less 64 more; line ends
    dropped.  A "=" at the end of a line escapes the first byte of the next one, and
    a "=" that ends the text escapes nothing."""
    data = data.replace(b"\r", b"").replace(b"\n", b"")
    pieces = data.split(b"=")
    decoded = [pieces[0].translate(_YENC_PLAIN)]
    escaped_equals = False  # the "=" before this piece was an escaped byte, not an escape
    last = len(pieces) - 1
    for number, piece in enumerate(itertools.islice(pieces, 1, None), 1):
        if number % CHECK_EVERY == 0:
            check()
        if escaped_equals:
            decoded.append(piece.translate(_YENC_PLAIN))
            escaped_equals = False
        elif piece:
            decoded.append(piece[:1].translate(_YENC_ESCAPED) + piece[1:].translate(_YENC_PLAIN))
        elif number < last:  # "==": the second "=" is the byte escaped
            decoded.append(b"=".translate(_YENC_ESCAPED))
            escaped_equals = True
    return b"".join(decoded)


def yenc_blocks(data: bytes, check: Check = _unchecked) -> Iterator[tuple[str, bytes]]:
    """The ``=ybegin ... name=NAME`` ... ``=yend`` blocks in ``data``: (NAME, or ""
    when the line names none, and the decoded bytes).  A ``=ypart`` line right after
    the ``=ybegin`` line is skipped; a block without ``=yend`` runs to the end."""
    if b"=ybegin" not in data:
        return
    position = 0
    while (begin := _YENC_BEGIN.search(data, position)) is not None:
        check()
        line_end = _line_end(data, begin.start())
        name = _YENC_NAME.search(data, begin.start(), line_end)
        text = b"" if name is None else data[name.end() : line_end].strip(b" \t\r")
        start = _next_line(data, begin.start())
        if _YENC_PART.match(data, start):
            start = _next_line(data, start)
        end = _YENC_END.search(data, start)
        stop = end.start() if end is not None else len(data)
        yield text.decode("utf-8", "replace"), decode_yenc(data[start:stop], check)
        position = end.end() if end is not None else len(data)


# -- BinHex 4.0 ----------------------------------------------------------------------------

BINHEX_BANNER = b"(This file must be converted with BinHex"
_BINHEX_ALPHABET = b"!\"#$%&'()*+,-012345689@ABCDEFGHIJKLMNPQRSTUVXYZ[`abcdefhijklmpqr"
_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
# BinHex packs 6-bit values as base64 does, from another alphabet: translated to
# base64's, binascii decodes it.
_BINHEX_TO_BASE64 = bytes.maketrans(_BINHEX_ALPHABET, _BASE64_ALPHABET)
_NOT_BINHEX = bytes(byte for byte in range(256) if byte not in _BINHEX_ALPHABET)
_REPEAT = 0x90  # run-length marker: the byte before it, COUNT times in all (0: a literal 0x90)
# After the name: version (1), type (4), creator (4), flags (2), data fork length
# (4), resource fork length (4), header CRC (2).
_HEADER_REST = 21


def _unpacked(data: bytes, check: Check) -> Iterator[bytes]:
    """BinHex's run-length encoding undone, in pieces of about FORK_CHUNK bytes (or
    one longer run of ``data`` without a marker).  A marker makes at most 254
    bytes, so a piece stays small whatever the ratio, and the reader can stop a
    bomb after any one."""
    pieces: list[bytes] = []
    size = 0
    last = 0
    at = 0
    markers = 0
    while at < len(data):
        marker = data.find(_REPEAT, at)
        stop = len(data) if marker < 0 else marker
        if stop > at:
            pieces.append(data[at:stop])
            size += stop - at
            last = data[stop - 1]
        if marker < 0 or marker + 1 >= len(data):
            break
        markers += 1
        if markers % CHECK_EVERY == 0:
            check()
        count = data[marker + 1]
        if count == 0:
            pieces.append(bytes([_REPEAT]))
            size += 1
            last = _REPEAT
        elif count > 1:
            pieces.append(bytes([last]) * (count - 1))
            size += count - 1
        at = marker + 2
        if size >= FORK_CHUNK:
            yield b"".join(pieces)
            pieces, size = [], 0
    if pieces:
        yield b"".join(pieces)


class _ChunkStream(io.RawIOBase):
    """The bytes of an iterator of chunks, read as a file."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        view = memoryview(buffer).cast("B")
        size = min(len(view), len(self._pending))
        view[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


def as_file(chunks: Iterator[bytes]) -> BinaryIO:
    """A file whose bytes are ``chunks``, made as they are read."""
    return io.BufferedReader(_ChunkStream(chunks), FORK_CHUNK)


def _fork(stream: BinaryIO, size: int | None) -> Iterator[bytes]:
    """The next ``size`` bytes of ``stream`` (None: all that is left), a piece at a time."""
    while size is None or size > 0:
        chunk = stream.read(FORK_CHUNK if size is None else min(size, FORK_CHUNK))
        if not chunk:
            return
        if size is not None:
            size -= len(chunk)
        yield chunk


def binhex_text(data: bytes, banner: int) -> tuple[bytes, int]:
    """The 6-bit text of the BinHex block whose banner is at ``banner``, from the
    first ":" after the banner to the next ":" (or the end), every byte outside
    BinHex's alphabet (line ends, blanks) dropped; and where the block ends."""
    start = data.find(b":", banner + len(BINHEX_BANNER))
    if start < 0:
        return b"", len(data)
    end = data.find(b":", start + 1)
    end = len(data) if end < 0 else end + 1
    return data[start + 1 : end].translate(None, _NOT_BINHEX), end


def binhex_files(data: bytes, check: Check = _unchecked) -> Iterator[tuple[str, BinaryIO]]:
    """The files in the BinHex 4.0 blocks of ``data``, as (name, stream): the data
    fork under the name the block gives, and the resource fork, when it has one,
    as "NAME (resource fork)".  A block whose header cannot be read is one file, all
    its bytes, named "".  Each stream must be read (or left) before the next one
    is asked for; they decode as they are read, so a run-length bomb costs only
    the bytes read of it."""
    at = data.find(BINHEX_BANNER) if b"(" in data else -1  # a search for one byte runs at memory speed
    while at >= 0:
        check()
        text, end = binhex_text(data, at)
        eight_bit = decode_base64_text(text.translate(_BINHEX_TO_BASE64))
        yield from _forks(as_file(_unpacked(eight_bit, check)))
        at = data.find(BINHEX_BANNER, end)


def _forks(stream: BinaryIO) -> Iterator[tuple[str, BinaryIO]]:
    length = stream.read(1)
    if not length:
        return
    name = stream.read(length[0]) if 1 <= length[0] <= 63 else b""
    rest = stream.read(_HEADER_REST) if name else b""
    if len(rest) < _HEADER_REST:
        yield "", as_file(itertools.chain([length, name, rest], _fork(stream, None)))
        return
    text = name.decode("mac_roman")
    data_length = int.from_bytes(rest[11:15], "big")
    resource_length = int.from_bytes(rest[15:19], "big")
    data_fork = _fork(stream, data_length)
    yield text, as_file(data_fork)
    for _ in data_fork:  # what the reader left of it
        pass
    stream.read(2)  # the data fork's CRC
    if resource_length:
        yield f"{text} (resource fork)", as_file(_fork(stream, resource_length))
