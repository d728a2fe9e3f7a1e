"""MIME header parameters (RFC 2045 and RFC 2231) and RFC 2047 encoded words, read
in one pass over a capped length of the field: the email package's own routines for
these (``Message.get_param``, ``decode_header``) are quadratic on hostile input."""

from __future__ import annotations

import binascii
import re
from email.message import Message as EmailMessage
from urllib.parse import unquote_to_bytes

from smtpguard.scanners.readings import Parameters

# A field longer than this is read only this far (the parser keeps no more of it
# either, and the walk reports it): as long as the header section smtpguard reads.
MAX_FIELD = 1024 * 1024

# A ";" splits parameters unless it is inside a quoted string; a quote after a
# backslash does not open or close one (email.message._parseparam's rule).
_DELIMITER = re.compile(r'(?<!\\)"|;')
_SECTION = re.compile(r"(\w+)\*(?:([0-9]{1,4})\*?)?", re.ASCII)  # RFC 2231: name*, name*0, name*0*
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
# Each search for a word reads at most to the next "?" twice, so the scan stays linear.
_ENCODED_WORD = re.compile(r"=\?([^?\s]*)\?([bBqQ])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"\s*")
_COMMENT_SYNTAX = re.compile(r"[()\\]")
_MECHANISM = re.compile(r'"?([A-Za-z0-9-]*)')
# Text codecs whose decoders are not linear (and that no mail client labels text with).
_REFUSED_CHARSETS = frozenset({"punycode", "idna"})


def text_of(data: bytes, charset: str) -> str:
    """``data`` decoded from ``charset``; Latin-1 when the charset is unknown or refused."""
    name = charset.strip().lower().replace("-", "").replace("_", "")
    if name not in _REFUSED_CHARSETS:
        try:
            return data.decode(charset, "replace")
        except (LookupError, UnicodeError, ValueError):
            pass
    return data.decode("latin-1")


def _unquoted(value: str) -> str:
    """A quoted-string's contents (quoted pairs resolved); a token as it is."""
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return _QUOTED_PAIR.sub(r"\1", value[1:-1])
    return value


def _segments(value: str) -> list[str]:
    """``value`` split at each ";" outside a quoted string."""
    segments = []
    start, quoted = 0, False
    for found in _DELIMITER.finditer(value):
        if found.group() == '"':
            quoted = not quoted
        elif not quoted:
            segments.append(value[start : found.start()])
            start = found.end()
    segments.append(value[start:])
    return segments


def _extended(sections: list[tuple[int, int, str, bool]]) -> str:
    """An RFC 2231 value from its sections (section number, position, text, encoded):
    in section order, the first of any repeated section, percent-decoded where
    encoded, and the whole decoded from the charset the first section names."""
    pieces: list[bytes] = []
    seen: set[int] = set()
    charset = None
    for number, _, text, encoded in sorted(sections):
        if number in seen:
            continue
        seen.add(number)
        if encoded and charset is None:
            charset = "us-ascii"
            parts = text.split("'", 2)
            if len(parts) == 3:
                charset, _, text = parts
        raw = text.encode("utf-8", "surrogateescape")
        pieces.append(unquote_to_bytes(raw) if encoded else raw)
    joined = b"".join(pieces)
    return joined.decode("utf-8", "surrogateescape") if charset is None else text_of(joined, charset)


# A field's parameters: the first and the last value of each plain one, and the RFC 2231 ones.
_Read = tuple[dict[str, str], dict[str, str], dict[str, str]]


def _read(value: str) -> _Read:
    """The parameters of ``value`` three ways: the first and the last of each plain
    one, and the RFC 2231 ones."""
    first: dict[str, str] = {}
    last: dict[str, str] = {}
    extended: dict[str, list[tuple[int, int, str, bool]]] = {}
    for position, segment in enumerate(_segments(value[:MAX_FIELD])[1:]):
        name, _, raw = segment.partition("=")
        name, raw = name.strip().lower(), raw.strip()
        section = _SECTION.fullmatch(name)
        if section is None:
            last[name] = _unquoted(raw)
            first.setdefault(name, last[name])
            continue
        number = -1 if section.group(2) is None else int(section.group(2))
        encoded = name.endswith("*")
        text = raw if encoded else _unquoted(raw)
        extended.setdefault(section.group(1), []).append((number, position, text, encoded))
    return first, last, {name: _extended(sections) for name, sections in extended.items()}


def _chosen(read: _Read, rule: Parameters) -> dict[str, str]:
    first, last, extended = read
    if rule is Parameters.PLAIN:
        return extended | first
    return (last if rule is Parameters.LAST else first) | extended


def parameters(value: str, rule: Parameters = Parameters.STANDARD) -> dict[str, str]:
    """The parameters of a Content-Type or Content-Disposition ``value``: lower-case
    names to their values (unquoted, RFC 2231 sections joined and decoded).  Of a
    parameter given more than once, the value ``rule`` picks; by default as mail
    clients read them: an RFC 2231 form (``name*=`` or ``name*0=``) over the plain
    ``name=``, and the first of repeated plain ones.  Only the first
    :data:`MAX_FIELD` characters are read."""
    return _chosen(_read(value), rule)


def field(fields: EmailMessage, name: str) -> str | None:
    """The first ``name`` field's value as the email package hands it to its own
    parameter parser (8-bit bytes become U+FFFD), or None."""
    value = fields.get(name)
    return None if value is None else str(value)


def boundaries(fields: EmailMessage) -> dict[Parameters, str | None]:
    """The multipart boundary of ``fields`` as each rule reads it (trailing white space
    dropped, as RFC 2046 does not allow it), None where the Content-Type has none."""
    value = field(fields, "content-type")
    read = _read("" if value is None else value)
    found = {rule: _chosen(read, rule).get("boundary") for rule in Parameters}
    return {rule: None if text is None else text.rstrip() for rule, text in found.items()}


def boundary(fields: EmailMessage, rule: Parameters = Parameters.STANDARD) -> str | None:
    """The multipart boundary of ``fields`` as ``rule`` reads it (see :func:`boundaries`)."""
    return boundaries(fields)[rule]


def _named(fields: EmailMessage) -> list[tuple[str, _Read]]:
    """The parameters that can name a file: Content-Disposition's ``filename``, then
    Content-Type's ``name``, each with its field's parameters read (see :func:`_read`)."""
    return [
        (key, _read(value))
        for header, key in (("content-disposition", "filename"), ("content-type", "name"))
        if (value := field(fields, header)) is not None
    ]


def _filename(named: list[tuple[str, _Read]], rule: Parameters) -> str:
    for key, read in named:
        found = _chosen(read, rule).get(key)
        if found is not None:
            return decode_words(found.strip())
    return ""


def filename(fields: EmailMessage, rule: Parameters = Parameters.STANDARD) -> str:
    """The Content-Disposition ``filename``, else the Content-Type ``name``, as ``rule``
    reads them, with any RFC 2047 encoded words decoded; "" when there is neither."""
    return _filename(_named(fields), rule)


def filenames(fields: EmailMessage) -> dict[Parameters, str]:
    """:func:`filename` as each rule reads it."""
    named = _named(fields)
    return {rule: _filename(named, rule) for rule in Parameters}


def mechanism(value: str) -> str:
    """A Content-Transfer-Encoding ``value``'s mechanism, lower-cased, as RFC 2045 reads
    it and MIME-tools does: comments (nested ones too) and blanks before it skipped,
    and quotes around it, a comment, ``;`` or anything else after its token dropped."""
    text = value[:MAX_FIELD].lstrip()
    while text.startswith("("):
        text = text[_comment_end(text) :].lstrip()
    token = _MECHANISM.match(text)
    return token.group(1).lower() if token else ""


def _comment_end(text: str) -> int:
    """Where the comment that opens ``text`` ends (its length when it never closes),
    found by jumps from one parenthesis or backslash to the next."""
    depth = 0
    at = 0
    while (found := _COMMENT_SYNTAX.search(text, at)) is not None:
        at = found.end()
        if found.group() == "\\":
            at += 1
        elif found.group() == "(":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return at
    return len(text)


def _word(found: re.Match[str]) -> str:
    charset, encoding, text = found.groups()
    raw = text.encode("utf-8", "surrogateescape")
    if encoding in "bB":
        try:
            data = binascii.a2b_base64(raw + b"=" * (-len(raw) % 4))
        except binascii.Error:
            data = raw
    else:
        data = binascii.a2b_qp(raw.replace(b"_", b" "))
    return text_of(data, charset.partition("*")[0])  # RFC 2231 section 5: charset*language


def decode_words(text: str) -> str:
    """``text`` with its RFC 2047 encoded words decoded; white space between two
    adjacent encoded words dropped, as RFC 2047 section 6.2 asks."""
    if "=?" not in text:
        return text
    pieces: list[str] = []
    at = 0
    after_word = False
    for found in _ENCODED_WORD.finditer(text):
        gap = text[at : found.start()]
        if not (after_word and _BETWEEN_WORDS.fullmatch(gap)):
            pieces.append(gap)
        pieces.append(_word(found))
        at = found.end()
        after_word = True
    pieces.append(text[at:])
    return "".join(pieces)
