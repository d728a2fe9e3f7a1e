"""Splits a message into its MIME entities with the decisions of the email
package's feed parser, but reading only header lines and the lines that delimit
bodies one by one: bodies are found by searches in C and kept as their exact bytes."""

from __future__ import annotations

import email.policy
import functools
import re
from email.message import Message as EmailMessage

import attrs

# email.feedparser reads every line of every body through a chain of Python
# generators.  This parser makes the same decisions on the same lines (the tests
# compare the two on malformed input), but only header lines and the lines that
# delimit bodies are looked at one by one; the rest is skipped by searches in C.

_HEADER_LINE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[\t ]")  # email.feedparser.headerRE


@attrs.define
class Entity:
    """A message or a part of one: its header ``fields`` (a message without a body)
    and either the exact bytes of its ``body`` or its ``parts``."""

    fields: EmailMessage
    body: bytes = b""
    parts: list[Entity] | None = None


class _Boundary:
    """What ends the parts of one multipart: a line matching the feed parser's
    boundary pattern, made for bytes."""

    def __init__(self, boundary: str) -> None:
        try:
            # The parser holds 8-bit bytes as surrogates; any other character in a
            # decoded parameter can never occur in a line.
            self.separator: bytes | None = ("--" + boundary).encode("ascii", "surrogateescape")
        except UnicodeEncodeError:
            self.separator = None
            return
        self._pattern = re.compile(
            b"(?P<sep>" + re.escape(self.separator) + rb")(?P<end>--)?(?P<ws>[ \t]*)(?P<linesep>\r\n|\r|\n)?$"
        )

    def match(self, line: bytes) -> re.Match[bytes] | None:
        return None if self.separator is None else self._pattern.match(line)


@functools.lru_cache(maxsize=64)
def _boundary(boundary: str) -> _Boundary:
    return _Boundary(boundary)


# An empty line (which ends a message/delivery-status block) starts one byte into
# these; "\r\n" is one line end, not an empty line.
_EMPTY = (b"\n\n", b"\n\r", b"\r\r")


def _without_line_end(body: bytes) -> bytes:
    if body.endswith(b"\r\n"):
        return body[:-2]
    if body.endswith((b"\r", b"\n")):
        return body[:-1]
    return body


class _Parser:
    """One parse, after email.feedparser.FeedParser: ``_readline``, ``_unread`` and
    ``_ends`` are its input's readline, unreadline and stack of false-EOF matchers
    (``_read_through`` is its loops that read to the end), :meth:`entity` its
    ``_parsegen``."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._position = 0
        self._unread: list[bytes] = []
        self._ends: list[_Boundary | None] = []  # None: an empty line (in message/delivery-status)
        self._last: Entity | None = None
        self._found: dict[bytes, tuple[int, int]] = {}  # needle -> (searched from, found at or -1)

    def _ended_by(self, line: bytes) -> bool:
        """Whether ``line`` is a false end of input (a boundary of an enclosing multipart)."""
        for end in self._ends:
            if (line[:1] in (b"\r", b"\n")) if end is None else end.match(line) is not None:
                return True
        return False

    def _readline(self) -> bytes:
        """The next line, or b"" at the (false) end of input."""
        if self._unread:
            line = self._unread.pop()
        elif self._position < len(self._data):
            stop = self._line_end(self._position)
            line = self._data[self._position : stop]
            self._position = stop
        else:
            return b""
        if line and self._ended_by(line):
            self._unread.append(line)
            return b""
        return line

    def _read_through(self, own: _Boundary | None = None) -> tuple[bytes, bytes | None]:
        """The lines up to the (false) end of input or, with ``own``, up to a line
        ``own`` matches: (their bytes, that line, read, or None at the end)."""
        pieces: list[bytes] = []
        while self._unread:
            line = self._unread.pop()
            if not line:
                return b"".join(pieces), None
            if self._ended_by(line):
                self._unread.append(line)
                return b"".join(pieces), None
            if own is not None and own.match(line) is not None:
                return b"".join(pieces), line
            pieces.append(line)
        data, start = self._data, self._position
        ends = [*self._ends, own] if own is not None else self._ends
        # A separator that cannot be encoded matches no line: it needs no search.
        dashes = any(end is not None and end.separator is not None for end in ends)
        empty = None in ends
        at = start
        while (dashes or empty) and at < len(data):
            stop = self._line_end(at)
            line = data[at:stop]
            if self._ended_by(line):
                self._position = at
                pieces.append(data[start:at])
                return b"".join(pieces), None
            if own is not None and own.match(line) is not None:
                self._position = stop
                pieces.append(data[start:at])
                return b"".join(pieces), line
            at = self._next_line_start(at, dashes, empty)
        self._position = len(data)
        pieces.append(data[start:])
        return b"".join(pieces), None

    def _find(self, needle: bytes, at: int) -> int:
        """``self._data.find(needle, at)``, remembered: reading goes forward, so each
        needle is searched for over the data about once, however many lines it ends."""
        searched, found = self._found.get(needle, (len(self._data) + 1, -1))
        if at < searched or -1 < found < at:
            found = self._data.find(needle, at)
            self._found[needle] = (at, found)
        return found

    def _line_end(self, at: int) -> int:
        """Where the line starting at ``at`` ends (io.StringIO(newline="") splits lines
        at "\r\n", "\r" and "\n").  Found with ``_find``: a search for a character
        class would cost ten times more a byte, and a huge line is read in one go."""
        ends = [found for found in (self._find(b"\n", at), self._find(b"\r", at)) if found >= 0]
        if not ends:
            return len(self._data)
        end = min(ends)
        return end + 2 if self._data[end : end + 2] == b"\r\n" else end + 1

    def _next_line_start(self, at: int, dashes: bool, empty: bool) -> int:
        """The start of the first line after the one at ``at`` that begins with "--" (as
        every boundary line does) or is empty, as asked; or the end of data."""
        data = self._data
        first = len(data)
        if empty:
            for needle in _EMPTY:
                found = self._find(needle, at)
                if found >= 0:
                    first = min(first, found + 1)
        probe = at + 1
        while dashes and probe < first:
            # A search for one byte runs at memory speed; one for "\n--" is forty times slower.
            dash = self._find(b"-", probe)
            if dash < 0 or dash >= first:
                break
            if data[dash - 1] in b"\r\n" and data[dash + 1 : dash + 2] == b"-":
                return dash
            probe = self._line_end(dash)  # no line starts before this line's end
        return first

    def _header_lines(self) -> list[bytes]:
        lines = []
        while line := self._readline():
            if _HEADER_LINE.match(line) is None:
                if line[:1] not in (b"\r", b"\n"):  # not the empty line: the body's first
                    self._unread.append(line)
                break
            lines.append(line)
        return lines

    def _fields(self, fields: EmailMessage, lines: list[bytes]) -> None:
        """FeedParser._parse_headers, defects aside."""
        policy = email.policy.compat32
        name = ""
        value: list[str] = []
        for number, raw in enumerate(lines):
            line = raw.decode("ascii", "surrogateescape")
            if line[0] in " \t":
                if name:  # a continuation line before any field is dropped
                    value.append(line)
                continue
            if name:
                fields.set_raw(*policy.header_source_parse(value))
                name, value = "", []
            if line.startswith("From "):
                if number == 0:
                    fields.set_unixfrom(_without_line_end(raw).decode("ascii", "surrogateescape"))
                elif number == len(lines) - 1:
                    self._unread.append(raw)  # probably the body's first line
                    return
                continue
            colon = line.find(":")
            if colon > 0:
                name, value = line[:colon], [line]
        if name:
            fields.set_raw(*policy.header_source_parse(value))

    def entity(self, parent: Entity | None) -> Entity:
        """The next entity (with its parts, recursively: one call per level of nesting)."""
        entity = Entity(EmailMessage(policy=email.policy.compat32))
        if parent is not None:
            if parent.fields.get_content_type() == "multipart/digest":
                entity.fields.set_default_type("message/rfc822")
            if parent.parts is None:
                parent.parts = []
            parent.parts.append(entity)
        self._last = entity
        self._fields(entity.fields, self._header_lines())
        fields = entity.fields
        if fields.get_content_type() == "message/delivery-status":
            # Blocks of fields, each ended by an empty line.
            while True:
                self._ends.append(None)
                self.entity(entity)
                self._ends.pop()
                self._readline()
                line = self._readline()
                if not line:
                    break
                self._unread.append(line)
        elif fields.get_content_maintype() == "message":
            self.entity(entity)
        elif fields.get_content_maintype() == "multipart" and (boundary := fields.get_boundary()) is not None:
            own = _boundary(boundary)
            if self._preamble(entity, own):
                while self._next_part(own):
                    self._ends.append(own)
                    self.entity(entity)
                    self._ends.pop()
                    self._part_done(entity)
        else:
            entity.body = self._read_through()[0]
        return entity

    def _preamble(self, entity: Entity, own: _Boundary) -> bool:
        """Read up to the first boundary: True when parts follow.  A multipart whose
        first boundary is missing or closing has the text for body (and, closing,
        loses the rest)."""
        preamble, line = self._read_through(own)
        if line is None or own.match(line).group("end"):  # type: ignore[union-attr]
            entity.body = preamble
            self._read_through()
            return False
        self._unread.append(line)
        return True

    def _next_part(self, own: _Boundary) -> bool:
        """Past the boundary line(s) before the next part: False at the closing one
        (the epilogue then read) or at the end of input."""
        line = self._readline()
        if not line:
            return False
        found = own.match(line)
        if found is None:  # the feed parser asserts this cannot happen
            raise ValueError("a part ended on a line that is not its boundary")
        if found.group("end"):
            self._read_through()
            return False
        while True:
            line = self._readline()
            if own.match(line) is None:
                self._unread.append(line)
                return True

    def _part_done(self, entity: Entity) -> None:
        """The line end before a boundary belongs to the boundary: taken off the body
        read last, unless it was a multipart's (its epilogue, which is not kept)."""
        last = self._last
        if last is not None and last.parts is None and last.fields.get_content_maintype() != "multipart":
            last.body = _without_line_end(last.body)
        self._last = entity


def parse(data: bytes) -> Entity:
    """The entity tree of the message in ``data``, as email.feedparser would split it
    (and bodies as their exact bytes).  Raises RecursionError when nested too deeply."""
    return _Parser(data).entity(None)
