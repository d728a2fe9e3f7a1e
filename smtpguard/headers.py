"""Header fields as smtpguard writes them.

Every header field smtpguard composes (trace and status fields, notices, DSNs,
released quarantine copies) is made by :func:`field`, so that none carries a
control character smtpguard did not put there: a bare CR, LF or NUL in a value
could otherwise end the field early and start a forged one for any reader that
takes it for a line end.  :func:`printable` makes text safe to show (notice
bodies, the command line).
"""

from __future__ import annotations

import base64
import re

# RFC 5322 section 2.1.1: lines of at most 998 octets, and should be at most 78.
MAX_LINE = 998
FOLD_AT = 78

# C0 controls, DEL, C1 controls, the Unicode line and paragraph separators, and
# lone surrogates (bytes that were not UTF-8, kept by "surrogateescape").
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_ESCAPES = {
    **{code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))},
    0x2028: "\\u2028",
    0x2029: "\\u2029",
    # A surrogate from "surrogateescape" stands for the byte it could not decode.
    **{code: f"\\x{code - 0xDC00:02x}" if code >= 0xDC80 else f"\\u{code:04x}" for code in range(0xD800, 0xE000)},
}
_NAME = re.compile(r"[!-9;-~]+")
_FOLDING_WHITESPACE = re.compile(r"[ \t\r\n]+")
_ENCODED_PREFIX = "=?utf-8?b?"
_ENCODED_SUFFIX = "?="
_ENCODED_MAX = 75  # RFC 2047 section 2: the longest encoded-word


class UnsafeHeader(ValueError):
    """A field that cannot be written safely: a bad name, a control character in a
    structured value, or a line over the RFC 5322 limit."""


def has_control(text: str) -> bool:
    """Whether ``text`` holds a character :func:`printable` would escape."""
    return _UNSAFE.search(text) is not None


def printable(text: str) -> str:
    """``text`` with every control character (C0 with CR, LF and tab, DEL, C1),
    line or paragraph separator and undecodable byte written as a visible
    escape: ESC as ``\\x1b``, CR as ``\\x0d``, U+2028 as ``\\u2028``."""
    return text.translate(_ESCAPES)


def field(name: str, *lines: str, text: bool = False) -> bytes:
    """The header field ``name`` with its CRLF, UTF-8 encoded.

    Structured (the default): ``lines`` are the field's lines as they should be
    folded, each continuation starting with a tab; a control character or an
    empty continuation raises :class:`UnsafeHeader`, as does a line longer than
    998 octets.  Nothing is escaped: a structured value (an address, a date)
    that needed escaping would mean something else.

    ``text=True`` (an unstructured value such as a Subject): ``lines`` are joined
    into one line, every run of spaces, tabs, CRs and LFs becomes one space,
    other control characters become visible escapes (:func:`printable`), and the
    value is folded at spaces near 78 characters; it is RFC 2047 encoded (UTF-8,
    base64) when it is not ASCII, holds ``=?`` or has a word too long for a line.
    """
    if not _NAME.fullmatch(name):
        raise UnsafeHeader(f"not a header field name: {name!r}")
    folded = _unstructured(name, " ".join(lines)) if text else _structured(name, lines)
    return (name + ":" + folded + "\r\n").encode("utf-8")


def _structured(name: str, lines: tuple[str, ...]) -> str:
    for index, line in enumerate(lines):
        if has_control(line):
            raise UnsafeHeader(f"{name}: control character in {printable(line)!r}")
        if index and not line.strip(" "):
            raise UnsafeHeader(f"{name}: empty continuation line")
        width = len(line.encode("utf-8")) + (len(name) + 2 if index == 0 else 1)
        if width > MAX_LINE:
            raise UnsafeHeader(f"{name}: line of {width} octets, more than {MAX_LINE}")
    return " " + "\r\n\t".join(lines)


def _unstructured(name: str, value: str) -> str:
    words = [printable(word) for word in _FOLDING_WHITESPACE.split(value) if word]
    room = MAX_LINE - len(name) - 2
    if all(word.isascii() and "=?" not in word and len(word) <= room for word in words):
        return _fold(name, words)
    return _fold(name, _encoded_words(" ".join(words), FOLD_AT - len(name) - 2))


def _fold(name: str, words: list[str]) -> str:
    """``words`` separated by spaces, a line break before any word that would take
    its line past 78 characters (a word never fits worse than alone on a line)."""
    out: list[str] = []
    width = len(name) + 1
    for word in words:
        if width + 1 + len(word) > FOLD_AT and out:
            out.append("\r\n")
            width = 0
        out.append(" " + word)
        width += 1 + len(word)
    return "".join(out)


def _encoded_words(value: str, first_room: int) -> list[str]:
    """RFC 2047 encoded-words for ``value``, each of whole characters and short
    enough for a line of its own (the first shares its line with the name).
    Readers join adjacent encoded-words without the white space between them."""
    words: list[str] = []
    # base64 takes 3 octets to 4 characters: the octets of one word on the first line, then on the others.
    budget = _octets_in(first_room)
    chunk = b""
    for char in value:
        octets = char.encode("utf-8")
        if chunk and len(chunk) + len(octets) > budget:
            words.append(_encoded_word(chunk))
            chunk = b""
            budget = _octets_in(FOLD_AT - 1)
        chunk += octets
    if chunk:
        words.append(_encoded_word(chunk))
    return words


def _octets_in(room: int) -> int:
    """How many octets one encoded-word carries in ``room`` characters (at least one character's)."""
    characters = min(room, _ENCODED_MAX) - len(_ENCODED_PREFIX) - len(_ENCODED_SUFFIX)
    return max(characters // 4 * 3, 4)


def _encoded_word(octets: bytes) -> str:
    return _ENCODED_PREFIX + base64.b64encode(octets).decode("ascii") + _ENCODED_SUFFIX
