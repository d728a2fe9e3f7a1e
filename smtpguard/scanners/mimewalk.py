"""Walks a message down to the files it carries: MIME parts (decoded in each reading
of :mod:`~smtpguard.scanners.decoders`), uuencoded, yEnc and BinHex blocks and
undeclared base64 (see :mod:`~smtpguard.scanners.inline`), attached messages,
archives and compressed files (see :mod:`~smtpguard.scanners.containers`), within
limits of depth, count, size and ratio.

It only finds and decodes; what to look for in each file is the caller's
:class:`Inspector`.  Malformed input never raises: it becomes a :class:`Problem`.
Messages are split into parts by :func:`parse`, which follows the rules of the email
package's feed parser but reads only header lines one by one: bodies are found by
searching for the line that ends them, and kept as their exact bytes.
"""

from __future__ import annotations

import binascii
import hashlib
import io
import itertools
import re
import tempfile
from collections.abc import Callable, Hashable, Iterable, Iterator
from email.message import Message as EmailMessage
from typing import IO, Protocol

import attrs

from smtpguard.results import ErrorKind
from smtpguard.scanners import containers, decoders, inline
from smtpguard.scanners.containers import Format
from smtpguard.scanners.decoders import base64_size, base64_text, decode_base64_text
from smtpguard.scanners.mapped import Mapped, Span
from smtpguard.scanners.mimefields import MAX_FIELD, filename, mechanism
from smtpguard.scanners.mimeparse import MAX_FIELDS, Entity, parse
from smtpguard.scanners.readings import RFC, Parameters, Reading, Readings

CHUNK_SIZE = 256 * 1024
# A file goes to its inspector this much at a time, the stop poll between: what an
# inspector does with one piece (each of its patterns searched) is the work a
# stopped scan can still do.
INSPECT_SIZE = 64 * 1024
# Nested archives and messages are spooled to be opened; beyond this they go to disk.
SPOOL_MEMORY = 4 * 1024 * 1024
# A large decoded part is searched for files in its text (uuencoded and other
# blocks) this much at a time; each window starts this much before the last one
# ended, so a block no longer than the overlap is always seen whole in one.
TEXT_WINDOW = 4 * 1024 * 1024
TEXT_OVERLAP = 1024 * 1024
BODY = "(body)"
HEAD = 4096  # bytes looked at to tell what a file is

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
_ZIP_TYPES = {"application/zip", "application/x-zip", "application/x-zip-compressed"}
_MESSAGE_TYPES = {"message/rfc822", "message/global"}
_DECODED = {"base64", "quoted-printable", "x-uuencode", "uuencode", "x-uue", "uue"}
# Only the start of a "begin MODE NAME" line: its name is taken by slicing, since a
# pattern that also matched the name and the blanks after it would backtrack
# quadratically on a line of blanks.
_UU_BEGIN = re.compile(rb"^begin[ \t]+[0-7]{3,4}[ \t]", re.MULTILINE)
_UU_END = re.compile(rb"^end[ \t]*\r?$", re.MULTILINE)
_BOUNDARY_LINE = re.compile(rb"^--([0-9A-Za-z'()+_,./:=? -]{0,69}[0-9A-Za-z'()+_,./:=?-])[ \t]*\r?$", re.MULTILINE)
_HEADER_START = re.compile(rb"[!-9;-~]+:[ \t]")
_MESSAGE_HEADER = re.compile(rb"^(?:mime-version|content-type|received|message-id|return-path):", re.I | re.M)


class FileSink(Protocol):
    def update(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class Inspector(Protocol):
    """What the walk hands each file it finds to, by path (``outer.zip/inner.txt``)."""

    def file(self, path: str) -> FileSink:
        """A file whose contents are to be looked at."""

    def container(self, path: str) -> FileSink:
        """An archive or message whose members the walk visits one by one."""

    def may_match_base64(self, text: bytes) -> bool:
        """Whether base64 ``text`` (its alphabet only, no "=" in it) can decode to a file
        with anything to report; when it cannot, the walk skips decoding it."""


@attrs.frozen
class Limits:
    """How far the walk goes: nested archives and messages (``max_depth``), parts and
    members visited (``max_parts``), bytes produced by decoding (``max_expanded_size``)
    and how many times its compressed size a decompressed stream may grow to
    (``max_ratio``, past its first MiB)."""

    max_depth: int = 8
    max_parts: int = 1000
    max_expanded_size: int = 100 * 1024 * 1024
    # Deflate (zip, gzip) cannot pass about 1032 to 1: only bzip2, xz and lzma data
    # ever goes beyond this, and then it is a bomb.
    max_ratio: int = 2000


@attrs.frozen
class Problem:
    """Something the walk could not look inside, and why."""

    kind: ErrorKind
    detail: str


class _Abort(Exception):
    """Ends the walk; the per-file error handling lets it through."""


class LimitExceeded(_Abort):
    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.detail)
        self.problem = problem


class Stopped(_Abort):
    """The caller asked the walk to stop (its deadline passed)."""


Check = Callable[[], None]


def _unchecked() -> None:
    pass


# -- pure helpers ---------------------------------------------------------------------


def join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix and name else prefix or name


def printable(name: str, limit: int = 200) -> str:
    """A file name safe to put in a log line, a reply or a notice."""
    text = "".join(character if character.isprintable() else "?" for character in name.strip())
    return text[:limit]


def part_name(part: EmailMessage, rule: Parameters = Parameters.STANDARD) -> str:
    """The part's file name (RFC 2231 and RFC 2047 decoded, repeated parameters read
    by ``rule``), or "" when it has none."""
    return printable(filename(part, rule))


def transfer_encoding(part: EmailMessage) -> str:
    """The Content-Transfer-Encoding's mechanism, lower-cased, without comments,
    quotes, spaces, parameters or anything else after it."""
    try:
        value = str(part.get("content-transfer-encoding", ""))
    except Exception:  # an undecodable header value: as good as none
        return ""
    return mechanism(value)


_LONE_CR = re.compile(rb"\r(?!\n)")


def _lines_ended_by_lf(data: bytes) -> bytes:
    """``data`` with a lone CR read as a line end, as Python's uudecode
    (``splitlines``) and mail readers take it; uuencoded text has no CR of its own."""
    return _LONE_CR.sub(b"\n", data) if data.count(b"\r") != data.count(b"\r\n") else data


def decode_uu_lines(data: bytes, check: Check = _unchecked) -> bytes:
    decoded = []
    for line in _lines_ended_by_lf(data).split(b"\n"):
        check()
        line = line.rstrip(b"\r")
        if not line or line in (b"`", b" "):
            continue
        try:
            decoded.append(binascii.a2b_uu(line))
        except binascii.Error:
            # Some encoders leave junk past a line's declared length: decode only that.
            length = (((line[0] - 32) & 63) * 4 + 5) // 3
            try:
                decoded.append(binascii.a2b_uu(line[:length]))
            except binascii.Error:
                continue
    return b"".join(decoded)


def uu_blocks(data: bytes, check: Check = _unchecked) -> Iterator[tuple[str, bytes]]:
    """The ``begin MODE NAME`` ... ``end`` blocks in ``data``: (name, decoded bytes).
    A ``begin`` line is the mode and the name, then maybe a CR, and no other CR."""
    if b"begin" not in data:
        return
    data = _lines_ended_by_lf(data)
    position = 0
    while (begin := _UU_BEGIN.search(data, position)) is not None:
        check()
        line_end = data.find(b"\n", begin.end())
        line_end = len(data) if line_end < 0 else line_end
        rest = data[begin.end() : line_end]
        rest = rest[:-1] if rest.endswith(b"\r") else rest
        if b"\r" in rest:
            position = line_end
            continue
        end = _UU_END.search(data, line_end)
        stop = end.start() if end is not None else len(data)
        name = printable(rest.strip(b" \t").decode("utf-8", "replace")) or "(uuencoded)"
        yield name, decode_uu_lines(data[line_end:stop], check)
        position = end.end() if end is not None else len(data)


def is_zip(head: bytes, name: str, content_type: str = "") -> bool:
    return head.startswith(_ZIP_MAGIC) or name.lower().endswith(".zip") or content_type in _ZIP_TYPES


def kind_of(head: bytes, name: str, content_type: str = "", sniff: bool = False) -> Format | None:
    """The kind of container a file is, by its first bytes, its name and its type
    (``sniff`` as :func:`is_message` takes it); None for a plain file."""
    if is_zip(head, name, content_type):
        return Format.ZIP
    found = containers.sniff(head, name)
    if found is not None:
        return found
    return Format.MESSAGE if is_message(head, name, content_type, sniff) else None


def is_message(head: bytes, name: str, content_type: str = "", sniff: bool = False) -> bool:
    """An attached message: by type or name, or (``sniff``, for archive members that
    have no type) by a start that reads like a mail header."""
    if content_type in _MESSAGE_TYPES or name.lower().endswith(".eml"):
        return True
    return sniff and _HEADER_START.match(head) is not None and _MESSAGE_HEADER.search(head) is not None


def rediscovered(
    body: bytes, check: Callable[[int], None] = lambda entities: None, reading: Reading = RFC
) -> Entity | None:
    """A multipart whose boundary parameter is missing or wrong, re-parsed with the
    boundary its body actually uses (the first ``--token`` line that recurs);
    ``check`` and ``reading`` as :func:`~smtpguard.scanners.mimeparse.parse` takes them."""
    lines = _BOUNDARY_LINE.finditer(body)
    first = next(lines, None)
    if first is None:
        return None
    boundary = first.group(1)
    if not any(line.group(1) in (boundary, boundary + b"--") for line in lines):
        return None
    header = b'Content-Type: multipart/mixed; boundary="' + boundary.replace(b'"', b"") + b'"\r\n\r\n'
    entity = parse(header + body, check, reading)
    return entity if entity.parts is not None else None


def _first_time(seen: set[Hashable], key: Hashable) -> bool:
    """Whether ``key`` is new to ``seen`` (it is added)."""
    if key in seen:
        return False
    seen.add(key)
    return True


def _leaf_key(part: Entity, path: str) -> Hashable:
    """What the walk of a part without parts depends on: two readings that find the
    same key find the same files in it."""
    fields = part.fields
    body = part.body
    digest = body.digest() if isinstance(body, Span) else hashlib.blake2b(body).digest()
    return (path, fields.get_content_type(), transfer_encoding(fields), digest)


def _read_back(spool: IO[bytes]) -> Iterator[bytes]:
    spool.seek(0)
    while chunk := spool.read(CHUNK_SIZE):
        yield chunk


def _text_windows(spool: IO[bytes]) -> Iterator[bytes]:
    """``spool`` from its start in windows of TEXT_WINDOW overlapping by TEXT_OVERLAP."""
    spool.seek(0)
    window = spool.read(TEXT_WINDOW)
    while window:
        yield window
        more = spool.read(TEXT_WINDOW - TEXT_OVERLAP)
        window = window[-TEXT_OVERLAP:] + more if more else b""


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


# -- the walk -------------------------------------------------------------------------


class Walker:
    """One walk of one message: :meth:`walk` hands every file to ``inspector`` and
    returns the problems met.  ``stopped`` is polled between parts and chunks."""

    def __init__(self, limits: Limits, inspector: Inspector, stopped: Callable[[], bool] = lambda: False) -> None:
        self._limits = limits
        self._inspector = inspector
        self._stopped = stopped
        self.problems: list[Problem] = []
        self.parts = 0
        self.expanded = 0
        self._bounds = containers.Bounds(limits.max_ratio, limits.max_parts, self._check)

    def walk(self, chunks: Iterable[bytes] | Mapped) -> list[Problem]:
        """Walk the message in ``chunks``, or mapped.  Raises :class:`Stopped`, and
        whatever reading ``chunks`` raises; malformed content only ever becomes a problem."""
        try:
            self._parsed(chunks, depth=0, prefix="")
        except LimitExceeded as exceeded:
            self.problems.append(exceeded.problem)
        except RecursionError:  # the parser recurses once per nested multipart
            self.problems.append(Problem(ErrorKind.DECOMPRESS_LAYER, "nested too deeply to parse"))
        return self.problems

    # accounting

    def _problem(self, kind: ErrorKind, detail: str) -> None:
        self.problems.append(Problem(kind, detail))

    def _too_deep(self, depth: int, path: str) -> bool:
        """Whether opening a container at ``depth`` goes past the limit (then noted)."""
        if depth < self._limits.max_depth:
            return False
        self._problem(ErrorKind.DECOMPRESS_LAYER, f"{path}: more than {self._limits.max_depth} nested layers")
        return True

    def _check(self) -> None:
        if self._stopped():
            raise Stopped()

    def _parse_check(self, prefix: str, base: int | None = None) -> Callable[[int], None]:
        """The parser's check: stopped, or more entities than parts are left (after
        ``base`` of them, by default the parts counted so far)."""

        def check(entities: int) -> None:
            self._check()
            if (self.parts if base is None else base) + entities > self._limits.max_parts:
                detail = f"{prefix or BODY}: more than {self._limits.max_parts} parts"
                raise LimitExceeded(Problem(ErrorKind.CONTENT_SIZE, detail))

        return check

    def _count_part(self, path: str) -> None:
        self._check()
        self.parts += 1
        if self.parts > self._limits.max_parts:
            detail = f"{path}: more than {self._limits.max_parts} parts"
            raise LimitExceeded(Problem(ErrorKind.CONTENT_SIZE, detail))

    def _expand(self, size: int, path: str) -> None:
        self._check()
        self.expanded += size
        if self.expanded > self._limits.max_expanded_size:
            detail = f"{path}: more than {self._limits.max_expanded_size} bytes decoded"
            raise LimitExceeded(Problem(ErrorKind.CONTENT_SIZE, detail))

    # messages

    def _parsed(self, chunks: Iterable[bytes] | Mapped, depth: int, prefix: str) -> None:
        """Parse and walk the message in ``chunks`` (or mapped), whose contents are at
        ``depth``: once for each reading that reads its headers differently."""
        # Only the parser's own failures are the content's fault: an error reading
        # ``chunks`` (a closed spool, say) goes on up.
        data = chunks if isinstance(chunks, Mapped) else b"".join(chunks)
        reads = Readings(self.parts)
        while reads.next():
            try:
                # Each reading may build as many entities as the first.
                root = parse(data, self._parse_check(prefix, reads.base), reads.reading)
            except (_Abort, RecursionError):
                raise
            except Exception as error:  # the parser is lenient: this is a last resort
                self._problem(ErrorKind.CORRUPT_FILE, f"{prefix or 'message'}: cannot parse: {error!r}")
                return
            reads.add(root.readings)
            if not reads.pending:
                del data
            self._message(root, depth, prefix, reads)

    def _message(self, root: Entity, depth: int, prefix: str, reads: Readings) -> None:
        """Every part of ``root``, in order, as ``reads`` reads them.  Nested multiparts
        use a stack of our own, not recursion: only attached messages and archives add
        depth.  A multipart is repaired (see :func:`rediscovered`) only outside a
        repaired one, so each byte is parsed again at most once per layer and reading."""
        stack: list[tuple[Entity, bool]] = [(root, False)]
        while stack:
            part, repaired = stack.pop()
            fields = part.fields
            name = part_name(fields, reads.reading.parameters)
            path = join(prefix, name or BODY)
            leaf = part.parts is None
            if leaf and reads.tracking and reads.seen(_leaf_key(part, path)):
                continue  # read the same way before: looked at, and counted, then
            if reads.again and not leaf:
                self._check()  # a multipart or message: counted by the first reading
            else:
                self._count_part(path)
            if part.truncated:
                limits = f"{MAX_FIELDS} header fields in the message or {MAX_FIELD} characters in a field"
                self._problem(ErrorKind.CONTENT_SIZE, f"{path}: more than {limits}")
            if part.parts is not None:
                if fields.get_content_maintype() != "message":
                    stack.extend((child, repaired) for child in reversed(part.parts))
                elif not self._too_deep(depth, join(prefix, name or "(message)")):
                    for child in part.parts:
                        self._message(child, depth + 1, join(prefix, name), reads)
                continue
            raw = part.body
            if isinstance(raw, Span):
                if self._large(raw, fields, prefix, path, depth, name):
                    continue
                raw = raw.tobytes()
            readings = self._decoded(fields, raw, path)
            first = next(readings)
            if fields.get_content_maintype() == "multipart" and not repaired:
                repair = rediscovered(first, self._parse_check(prefix), reads.reading)
                if repair is not None:
                    stack.append((repair, True))
                    continue
            for data in itertools.chain([first], readings):
                self._file(data, path, depth, name, fields.get_content_type())
                self._embedded(data, fields, prefix, path, depth)

    def _large(self, body: Span, fields: EmailMessage, prefix: str, path: str, depth: int, name: str) -> bool:
        """A large part decoded a window at a time into a spool and walked from there;
        False when it has to be read whole: a multipart to repair, base64 with an "="
        before its end (read several ways), or another encoding."""
        encoding = transfer_encoding(fields)
        if fields.get_content_maintype() == "multipart" or (encoding in _DECODED and encoding != "base64"):
            return False
        if encoding == "base64" and decoders.padded_inside_windows(body.windows()):
            return False
        chunks = decoders.decode_base64_windows(body.windows()) if encoding == "base64" else body.windows()
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY) as spool:
            for chunk in chunks:
                if encoding == "base64":
                    self._expand(len(chunk), path)
                spool.write(chunk)
            spool.seek(0)
            kind = kind_of(spool.read(HEAD), name, fields.get_content_type())
            if kind is None or not self._container(spool, path, depth, kind, name):
                self._plain(_read_back(spool), path, depth)
            seen: set[Hashable] = set()
            for window in _text_windows(spool):
                self._embedded(window, fields, prefix, path, depth, seen)
        return True

    def _decoded(self, part: EmailMessage, raw: bytes, path: str) -> Iterator[bytes]:
        """The part's body decoded as its Content-Transfer-Encoding says: smtpguard's
        own reading first, then each reading of another well-known decoder that makes
        other bytes of it (see :mod:`~smtpguard.scanners.decoders`)."""
        encoding = transfer_encoding(part)
        if encoding == "base64":
            readings = decoders.base64_readings(raw)
        elif encoding == "quoted-printable":
            readings = decoders.quoted_printable_readings(raw)
        elif encoding in _DECODED:
            blocks = [block for _, block in uu_blocks(raw, self._check)]
            readings = iter([b"".join(blocks) if blocks else decode_uu_lines(raw, self._check)])
        else:
            yield raw
            return
        for data in readings:
            self._expand(len(data), path)
            yield data

    def _embedded(
        self, data: bytes, part: EmailMessage, prefix: str, path: str, depth: int, seen: set[Hashable] | None = None
    ) -> None:
        """Files hidden in a part's text: uuencoded, yEnc and BinHex blocks, and base64
        the part did not declare (no or a wrong Content-Transfer-Encoding, a broken
        multipart).  With ``seen`` (windows of one part that overlap), a block found
        in a window before is passed over."""

        # Keys are made only for overlapping windows: hashing every block and run
        # of an ordinary part costs a pass over it.
        for name, block in self._blocks(data):
            if seen is not None and not _first_time(seen, (name, hashlib.blake2b(block).digest())):
                continue
            block_path = join(prefix, name)
            self._count_part(block_path)
            self._expand(len(block), block_path)
            self._file(block, block_path, depth, name)
        for name, fork in inline.binhex_files(data, self._check):
            name = printable(name) or "(binhex)"
            if seen is not None and not _first_time(seen, ("binhex", name)):
                continue
            self._count_part(join(prefix, name))
            self._member(fork, join(prefix, name), depth, name)
        if transfer_encoding(part) in _DECODED:
            return
        for run in inline.undeclared_base64(data, self._check):
            text = base64_text(run)
            if seen is None or _first_time(seen, hashlib.blake2b(text).digest()):
                self._undeclared(text, path, depth)

    def _blocks(self, data: bytes) -> Iterator[tuple[str, bytes]]:
        """The uuencoded and yEnc blocks in ``data``: (name, decoded bytes)."""
        if b"begin" not in data:  # in "begin 644" and "=ybegin" alike: one search rules out both
            return
        yield from uu_blocks(data, self._check)
        for name, block in inline.yenc_blocks(data, self._check):
            yield printable(name) or "(yenc)", block

    def _undeclared(self, text: bytes, path: str, depth: int) -> None:
        """Undeclared base64 (its :func:`~smtpguard.scanners.decoders.base64_text`), in
        each reading.  A reading that starts like an archive or a message is opened
        like one (a forwarded message sent as base64 without its headers, say); any
        other is a plain file, skipped when the inspector says its bytes cannot match,
        since decoding it would show nothing."""
        head = decode_base64_text(text[: HEAD // 3 * 4])
        kind = kind_of(head, "", sniff=True)
        if kind is None and b"=" not in text and not self._inspector.may_match_base64(text):
            self._expand(base64_size(text), path)
            return
        for block in decoders.base64_text_readings(text):
            self._expand(len(block), path)
            if kind is not None and self._container(io.BytesIO(block), path, depth, kind, ""):
                continue
            self._plain_data(block, path, depth, kind)

    # files

    def _inspect(self, sink: FileSink, chunks: Iterable[bytes]) -> None:
        """Hand ``chunks`` to ``sink`` in pieces of at most INSPECT_SIZE, polling
        between them."""
        try:
            for chunk in chunks:
                for start in range(0, len(chunk), INSPECT_SIZE):
                    self._check()
                    sink.update(chunk[start : start + INSPECT_SIZE] if len(chunk) > INSPECT_SIZE else chunk)
        finally:
            sink.close()

    def _file(self, data: bytes, path: str, depth: int, name: str, content_type: str = "") -> None:
        """A decoded file in memory: an archive or message is opened, anything else
        (or a container too deep to open) inspected."""
        kind = kind_of(data[:HEAD], name, content_type)
        # Already in memory: opened in place, not copied.
        if kind is not None and self._container(io.BytesIO(data), path, depth, kind, name):
            return
        self._plain_data(data, path, depth, kind)

    def _plain_data(self, data: bytes, path: str, depth: int, kind: Format | None) -> None:
        """A file in memory that is not opened as a container: inspected, and a zip it
        ends with (behind a self-extractor's code, say) opened."""
        self._inspect(self._inspector.file(path), (data,))
        if kind is None and containers.ends_like_zip(data[-containers.ZIP_TAIL :]):
            self._embedded_zip(io.BytesIO(data), path, depth)

    def _plain(self, chunks: Iterable[bytes], path: str, depth: int) -> None:
        """A file streaming by that is not opened as a container: as :meth:`_plain_data`."""
        scout = containers.ZipScout(SPOOL_MEMORY)
        try:
            self._inspect(self._inspector.file(path), scout.watch(chunks))
            if scout.spool is not None:
                self._embedded_zip(scout.spool, path, depth)
        finally:
            scout.close()

    def _embedded_zip(self, spool: IO[bytes], path: str, depth: int) -> None:
        """The zip inside a file at ``depth`` that is not one, if there is one."""
        if containers.holds_zip(spool, self._bounds) and not self._too_deep(depth, path):
            self._open(Format.ZIP, spool, path, depth + 1, "", embedded=True)

    def _container(self, spool: IO[bytes], path: str, depth: int, kind: Format, name: str) -> bool:
        """Open ``spool`` (at ``depth``) as the ``kind`` of container it is; False when it
        is too deep or cannot be opened, for the caller to inspect it as a plain file."""
        if self._too_deep(depth, path):
            return False
        self._inspect(self._inspector.container(path), _read_back(spool))
        if kind is Format.MESSAGE:
            self._parsed(_read_back(spool), depth + 1, path)
            return True
        spool.seek(0)
        source = spool if kind is Format.ZIP else containers.ChunkReader(_read_back(spool))
        return self._open(kind, source, path, depth + 1, name)

    def _open(self, kind: Format, source: object, prefix: str, depth: int, name: str, embedded: bool = False) -> bool:
        """Walk the members of the ``kind`` container in ``source``, whose contents are at
        ``depth``; False when not one member could be read."""
        opened = False
        try:
            for member in containers.members(kind, source, name, self._bounds, embedded):
                opened = True
                path = join(prefix, printable(member.name) or "(unnamed)")
                self._count_part(path)
                if member.problem is not None:
                    self._problem(member.problem.kind, f"{path}: {member.problem.detail}")
                elif member.contents is not None:
                    try:
                        self._member(member.contents, path, depth, member.name)
                    except containers.ContainerError as error:
                        self._problem(error.kind, f"{path}: {error.detail}")
        except containers.ContainerError as error:
            self._problem(error.kind, f"{prefix}: {error.detail}")
        return opened

    def _member(self, member: containers.Readable, path: str, depth: int, name: str) -> None:
        """One archive member, read in bounded chunks: what counts is the bytes it
        actually decompresses to, never the size the archive declares."""

        def chunks() -> Iterator[bytes]:
            while chunk := member.read(CHUNK_SIZE):
                self._expand(len(chunk), path)
                yield chunk

        stream = chunks()
        first = next(stream, b"")
        kind = kind_of(first[:HEAD], name, sniff=True)
        if kind is not None and not self._too_deep(depth, path):
            if kind in containers.STREAMED:
                sink = self._inspector.container(path)
                try:
                    reader = containers.ChunkReader(_chain(first, stream), sink.update)
                    self._open(kind, reader, path, depth + 1, name)
                finally:
                    sink.close()
                return
            with tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY) as spool:
                for chunk in _chain(first, stream):
                    spool.write(chunk)
                if not self._container(spool, path, depth, kind, name):
                    self._inspect(self._inspector.file(path), _read_back(spool))
            return
        self._plain(_chain(first, stream), path, depth)
