"""Splits a message into its MIME entities with the decisions of the email
package's feed parser, but reading only header lines and the lines that delimit
bodies one by one: bodies are found by searches in C and kept as their exact bytes.
Its work is linear in the message's size, and the caller's ``check`` is called
often enough to stop it early (at a deadline, or at a limit of parts).  Asked for
another :class:`~smtpguard.scanners.readings.Reading`, it reads header sections,
parameters and close delimiters as mail clients do instead, and it tells which
other readings would read something in the message differently."""

from __future__ import annotations

import email.policy
import re
from collections import Counter
from collections.abc import Callable, Mapping
from email.message import Message as EmailMessage

import attrs

from smtpguard.scanners import readings
from smtpguard.scanners.mapped import SPAN_MIN, Mapped, Span
from smtpguard.scanners.mimefields import MAX_FIELD, boundaries, filenames
from smtpguard.scanners.readings import RFC, HeaderEnd, Parameters, Reading, Repeated

# email.feedparser reads every line of every body through a chain of Python
# generators.  This parser makes the same decisions on the same lines (the tests
# compare the two on malformed input), but only header lines and the lines that
# delimit bodies are looked at one by one; the rest is skipped by searches in C.

_HEADER_LINE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[\t ]")  # email.feedparser.headerRE
# A field whose name has blanks before its colon (RFC 5322 section 4.5): the name.
_LOOSE_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[\t ]+:")
# The fields that decide how an entity is read; when one is repeated with another
# value, which of them counts is up to the reading.
_DECISIVE = frozenset({"content-type", "content-transfer-encoding", "content-disposition"})

# Header fields kept of one message (all its entities together), and characters
# kept of one field (as many as the header section smtpguard relays may hold): a
# field costs some 200 bytes of memory however short its line, so a message of
# nothing but tiny header lines would otherwise cost forty times its size.  An
# entity whose header went past either is marked ``truncated``.
MAX_FIELDS = 100_000

# ``check`` is called for every entity and after this many lines looked at.
CHECK_EVERY = 4096

Check = Callable[[int], None]


def _unchecked(entities: int) -> None:
    pass


@attrs.define
class Entity:
    """A message or a part of one: its header ``fields`` (a message without a body)
    and either the exact bytes of its ``body`` or its ``parts``.  ``truncated``: header
    fields were dropped or cut short (see :data:`MAX_FIELDS`, ``MAX_FIELD``).
    ``readings``, of a parsed message: the readings (besides the one it was parsed
    with) that read some header section, parameter or close delimiter in it otherwise."""

    fields: EmailMessage
    body: bytes | Span = b""
    parts: list[Entity] | None = None
    truncated: bool = False
    readings: frozenset[Reading] = frozenset()


class _Boundary:
    """What ends the parts of one multipart: a line that is the separator ("--" and
    the boundary), maybe "--" after it, then only spaces and tabs (the feed parser's
    boundary pattern), told apart by comparing the line's :func:`_core`."""

    def __init__(self, boundary: str) -> None:
        try:
            # The parser holds 8-bit bytes as surrogates; any other character in a
            # decoded parameter can never occur in a line.
            self.separator: bytes | None = ("--" + boundary).encode("ascii", "surrogateescape")
        except UnicodeEncodeError:
            self.separator = None

    def delimits(self, line: bytes) -> bool:
        core = _core(line)
        return self.separator is not None and (core == self.separator or core == self.separator + b"--")

    def closes(self, line: bytes) -> bool:
        return self.separator is not None and _core(line) == self.separator + b"--"


# An empty line (which ends a message/delivery-status block) starts one byte into
# these; "\r\n" is one line end, not an empty line.
_EMPTY = (b"\n\n", b"\n\r", b"\r\r")


def _without_line_end(body: bytes) -> bytes:
    if body.endswith(b"\r\n"):
        return body[:-2]
    if body.endswith((b"\r", b"\n")):
        return body[:-1]
    return body


def _core(line: bytes) -> bytes:
    """A line without its line end and the spaces and tabs before it."""
    return _without_line_end(line).rstrip(b" \t")


class _Parser:
    """One parse, after email.feedparser.FeedParser: ``_readline``, ``_unread`` and
    ``_ends`` are its input's readline, unreadline and stack of false-EOF matchers
    (``_read_through`` is its loops that read to the end), :meth:`entity` its
    ``_parsegen``."""

    def __init__(self, data: bytes | Mapped, check: Check, reading: Reading) -> None:
        self._data = data
        self._reading = reading
        self.readings: set[Reading] = set()
        self._position = 0
        self._unread: list[bytes] = []
        self._ends: list[_Boundary | None] = []  # None: an empty line (in message/delivery-status)
        # The separators of ``_ends``, counted, so a line is compared with each at once.
        self._separators: Counter[bytes] = Counter()
        self._last: Entity | None = None
        self._found: dict[bytes, tuple[int, int]] = {}  # needle -> (searched from, found at or -1)
        self._check = check
        self._entities = 0
        self._lines = 0
        self._fields_kept = 0

    def _tick(self) -> None:
        """One more line looked at: now and then, the caller's check."""
        self._lines += 1
        if self._lines % CHECK_EVERY == 0:
            self._check(self._entities)

    def _push(self, end: _Boundary | None) -> None:
        self._ends.append(end)
        if end is not None and end.separator is not None:
            self._separators[end.separator] += 1

    def _pop(self) -> None:
        end = self._ends.pop()
        if end is not None and end.separator is not None:
            self._separators[end.separator] -= 1
            if not self._separators[end.separator]:
                del self._separators[end.separator]

    def _ended_by(self, line: bytes) -> bool:
        """Whether ``line`` is a false end of input (a boundary of an enclosing multipart)."""
        if line[:1] in (b"\r", b"\n"):
            return None in self._ends
        if not self._separators or line[:2] != b"--":
            return False
        core = _core(line)
        return core in self._separators or (core.endswith(b"--") and core[:-2] in self._separators)

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

    def _read_through(self, own: _Boundary | None = None) -> tuple[bytes | Span, bytes | None]:
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
            if own is not None and own.delimits(line):
                return b"".join(pieces), line
            pieces.append(line)
        data, start = self._data, self._position
        # A separator that cannot be encoded matches no line: it needs no search.
        dashes = bool(self._separators) or (own is not None and own.separator is not None)
        empty = None in self._ends
        at = start
        while (dashes or empty) and at < len(data):
            self._tick()
            stop = self._line_end(at)
            line = data[at:stop]
            if self._ended_by(line):
                self._position = at
                return self._body(pieces, start, at), None
            if own is not None and own.delimits(line):
                self._position = stop
                return self._body(pieces, start, at), line
            at = self._next_line_start(at, dashes, empty)
        self._position = len(data)
        return self._body(pieces, start, len(data)), None

    def _body(self, pieces: list[bytes], start: int, stop: int) -> bytes | Span:
        """``pieces`` then the data from ``start`` to ``stop``: a large body of a mapped
        message stays a span of it, read later a window at a time."""
        if not pieces and isinstance(self._data, Mapped) and stop - start >= SPAN_MIN:
            return self._data.span(start, stop)
        pieces.append(self._data[start:stop])
        return b"".join(pieces)

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
            self._tick()
            # A search for one byte runs at memory speed; one for "\n--" is forty times slower.
            dash = self._find(b"-", probe)
            if dash < 0 or dash >= first:
                break
            if data[dash - 1] in b"\r\n" and data[dash + 1 : dash + 2] == b"-":
                return dash
            probe = self._line_end(dash)  # no line starts before this line's end
        return first

    def _header(self, entity: Entity) -> None:
        """Read the entity's header lines into its fields, one at a time (as
        FeedParser._parse_headers does, defects aside): up to the first line that
        is not a header line, which is left unread unless it is the empty line.  Other
        readings read on to the empty line (see :meth:`_other_line`)."""
        fields = entity.fields
        name = ""
        value: list[str] = []
        length = 0
        number = 0
        held = b""  # a "From " line past the first: dropped, unless it turns out to be the last
        decisive: dict[str, tuple[str, str]] = {}  # of the decisive fields: the first, or last, kept
        while raw := self._readline():
            self._tick()
            if _HEADER_LINE.match(raw) is None:
                if raw[:1] in (b"\r", b"\n"):  # the empty line
                    break
                field_line = self._other_line(raw)
                if field_line is None:
                    break
                if not field_line:
                    if name:  # its continuation lines go with the line passed over
                        self._field(entity, value, decisive)
                        name, value = "", []
                    if self._reading.header_end is HeaderEnd.EMPTY_LINE_STOPPING:
                        self._skip_to_empty_line()
                        break
                    continue
                raw = field_line
            held = b""
            line = raw.decode("ascii", "surrogateescape")
            if line[0] in " \t":
                if name:  # a continuation line before any field is dropped
                    length += len(line)
                    if length <= MAX_FIELD:
                        value.append(line)
                    else:
                        entity.truncated = True
            else:
                if name:
                    self._field(entity, value, decisive)
                    name, value = "", []
                if line.startswith("From "):
                    if number == 0:
                        fields.set_unixfrom(_without_line_end(raw).decode("ascii", "surrogateescape"))
                    else:
                        held = raw
                else:
                    colon = line.find(":")
                    if colon > 0:
                        name, value, length = line[:colon], [line[:MAX_FIELD]], len(line)
                        entity.truncated |= length > MAX_FIELD
            number += 1
        if held:
            self._unread.append(held)  # probably the body's first line
        elif name:
            self._field(entity, value, decisive)
        if self._reading.repeated is Repeated.LAST:
            for key, (field_name, text) in decisive.items():
                if len(fields.get_all(key, ())) > 1:
                    del fields[key]
                    fields.set_raw(field_name, text)

    def _skip_to_empty_line(self) -> None:
        """Read past the rest of a header section, up to and with its empty line,
        searching for it as for a boundary rather than line by line."""
        self._push(None)
        self._read_through()
        self._pop()
        self._readline()

    def _other_line(self, raw: bytes) -> bytes | None:
        """A line of a header section that is not a field, as this reading takes it:
        None where the header section ends at it (the line left unread, the body's
        first), the line as a field where the reading takes blanks before a colon,
        else b"" (passed over)."""
        self.readings |= readings.OTHER_LINE
        if self._reading.header_end is HeaderEnd.FIRST_OTHER_LINE:
            self._unread.append(raw)
            return None
        loose = _LOOSE_NAME.match(raw) if self._reading.loose_names else None
        return b"" if loose is None else loose.group(1) + raw[loose.end() - 1 :]

    def _field(self, entity: Entity, value: list[str], decisive: dict[str, tuple[str, str]]) -> None:
        """Add the field made of ``value``'s lines, unless :data:`MAX_FIELDS` are kept.
        Of a decisive field, ``decisive`` keeps the first (or, for a reading that takes
        the last, the last) name and value."""
        if self._fields_kept >= MAX_FIELDS:
            entity.truncated = True
            return
        self._fields_kept += 1
        name, text = email.policy.compat32.header_source_parse(value)
        key = name.lower()
        if key in _DECISIVE:
            if key not in decisive:
                decisive[key] = (name, text)
            elif decisive[key][1] != text:
                self.readings |= readings.REPEATED_FIELDS
                if self._reading.repeated is Repeated.LAST:
                    decisive[key] = (name, text)
        entity.fields.set_raw(name, text)

    def entity(self, parent: Entity | None) -> Entity:
        """The next entity (with its parts, recursively: one call per level of nesting)."""
        entity = Entity(EmailMessage(policy=email.policy.compat32))
        self._entities += 1
        self._check(self._entities)
        if parent is not None:
            if parent.fields.get_content_type() == "multipart/digest":
                entity.fields.set_default_type("message/rfc822")
            if parent.parts is None:
                parent.parts = []
            parent.parts.append(entity)
        self._last = entity
        self._header(entity)
        fields = entity.fields
        self._note_parameters(filenames(fields))
        if fields.get_content_type() == "message/delivery-status":
            # Blocks of fields, each ended by an empty line.
            while True:
                self._push(None)
                self.entity(entity)
                self._pop()
                self._readline()
                line = self._readline()
                if not line:
                    break
                self._unread.append(line)
        elif fields.get_content_maintype() == "message":
            self.entity(entity)
        elif fields.get_content_maintype() == "multipart" and (separator := self._boundary(fields)) is not None:
            own = _Boundary(separator)
            if self._preamble(entity, own):
                while self._next_part(own):
                    self._push(own)
                    self.entity(entity)
                    self._pop()
                    self._part_done(entity)
        else:
            entity.body = self._read_through()[0]
        return entity

    def _boundary(self, fields: EmailMessage) -> str | None:
        """The multipart boundary as this reading reads it."""
        found = boundaries(fields)
        self._note_parameters(found)
        return found[self._reading.parameters]

    def _note_parameters(self, found: Mapping[Parameters, object]) -> None:
        """Note the readings that read a parameter otherwise than the standard rule."""
        standard = found[Parameters.STANDARD]
        if found[Parameters.LAST] != standard:
            self.readings |= readings.LAST_PARAMETER
        if found[Parameters.PLAIN] != standard:
            self.readings |= readings.PLAIN_PARAMETER

    def _preamble(self, entity: Entity, own: _Boundary) -> bool:
        """Read up to the first boundary: True when parts follow.  A multipart whose
        first boundary is missing or closing has the text for body (and, closing,
        loses the rest, see :meth:`_after_close`)."""
        preamble, line = self._read_through(own)
        if line is not None and own.closes(line):
            line = self._after_close(own)
        if line is None:
            entity.body = preamble
            return False
        self._unread.append(line)
        return True

    def _next_part(self, own: _Boundary) -> bool:
        """Past the boundary line(s) before the next part: False at the closing one
        (the epilogue then read) or at the end of input."""
        line = self._readline()
        if not line:
            return False
        if not own.delimits(line):  # the feed parser asserts this cannot happen
            raise ValueError("a part ended on a line that is not its boundary")
        if own.closes(line) and self._after_close(own) is None:
            return False
        while True:
            line = self._readline()
            if not own.delimits(line):
                self._unread.append(line)
                return True

    def _after_close(self, own: _Boundary) -> bytes | None:
        """Read past a close delimiter: the epilogue, or, for a reading that lets parts
        go on after it, up to a separator of the same boundary, which is returned."""
        while (line := self._read_through(own)[1]) is not None:
            if not own.closes(line):
                self.readings |= readings.SEPARATOR_AFTER_CLOSE
                if not self._reading.close_ends:
                    return line
        return None

    def _part_done(self, entity: Entity) -> None:
        """The line end before a boundary belongs to the boundary: taken off the body
        read last, unless it was a multipart's (its epilogue, which is not kept)."""
        last = self._last
        if last is not None and last.parts is None and last.fields.get_content_maintype() != "multipart":
            body = last.body
            last.body = body.without_line_end() if isinstance(body, Span) else _without_line_end(body)
        self._last = entity


def parse(data: bytes | Mapped, check: Check = _unchecked, reading: Reading = RFC) -> Entity:
    """The entity tree of the message in ``data``, as email.feedparser would split it
    (and bodies as their exact bytes), with parameters read by
    :mod:`~smtpguard.scanners.mimefields`; or, given another ``reading``, as that
    reading would.  ``check`` is called with the number of entities made so far, for
    each entity and every :data:`CHECK_EVERY` lines looked at; what it raises ends the
    parse.  Raises RecursionError when nested too deeply."""
    parser = _Parser(data, check, reading)
    root = parser.entity(None)
    root.readings = frozenset(parser.readings - {reading})
    return root
