"""Content-Transfer-Encoding decoders as forgiving as the most forgiving mail readers,
and the other readings of the same text where well-known readers disagree.

A part is scanned in every reading that a reader in wide use makes of it, so a
trick that one reader decodes cannot hide behind another reader's decoding:

- base64 with an "=" before its end: smtpguard's own reading decodes each run of
  groups between "=" on its own (two encodings joined together); Perl's
  MIME-tools (MIME::Decoder::Base64, which amavisd uses) drops every "=" with the
  junk and decodes the rest as one stream; Python's email package (binascii, not
  strict) skips an "=" that cannot be padding and stops at one that is.
- quoted-printable with blanks at the end of a line: binascii.a2b_qp (Python's
  email package) keeps them, so "=" then blanks is no soft line break; RFC 2045
  6.7 (3) and MIME-tools strip them first.
"""

from __future__ import annotations

import binascii
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator

_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_NOT_BASE64 = bytes(byte for byte in range(256) if byte not in _BASE64_ALPHABET)
# Blanks that end a line (or the text).  The look-behind starts a match only at the
# first blank of a run, and the possessive run never gives a blank back: a long run
# of blanks that ends in something else is read once, not once per blank.
_NOT_BASE64_OR_PADDING = _NOT_BASE64 + b"="
_TRAILING_BLANKS = re.compile(rb"(?<![ \t])[ \t]++(?=[\r\n]|\Z)")
_BLANK_LINE_ENDS = (b" \n", b"\t\n", b" \r", b"\t\r")


# -- base64 ---------------------------------------------------------------------------


def base64_text(data: bytes) -> bytes:
    """``data``'s base64 characters: junk skipped, the padding at the end dropped."""
    return data.translate(None, _NOT_BASE64).rstrip(b"=")


def decode_base64_text(text: bytes) -> bytes:
    """Decode :func:`base64_text`: bad padding forgiven, and data after a padded end
    (concatenated encodings) not dropped."""
    decoded = []
    for segment in re.split(rb"=+", text) if b"=" in text else [text]:
        if len(segment) % 4 == 1:
            segment = segment[:-1]
        if segment:
            decoded.append(binascii.a2b_base64(segment + b"=" * (-len(segment) % 4)))
    return b"".join(decoded)


def padded_inside(data: bytes) -> bool:
    """Whether an "=" comes before a base64 character in ``data``: where readers of
    base64 part ways."""
    padding = data.find(b"=")
    return padding >= 0 and bool(data[padding:].translate(None, _NOT_BASE64).strip(b"="))


def decode_base64(data: bytes) -> bytes:
    """Lenient base64: junk characters skipped, bad padding forgiven, and data after
    a padded end (concatenated encodings) not dropped."""
    if padded_inside(data):
        return decode_base64_text(base64_text(data))
    return _decode_padded_at_end(data)


def _decode_padded_at_end(data: bytes) -> bytes:
    """:func:`decode_base64` of ``data`` whose "=" (if any) are all at its end."""
    try:
        # The usual shape, whole groups and padding only at the end: binascii skips
        # line ends and junk itself, which spares a copy of the text without them.
        return binascii.a2b_base64(data)
    except binascii.Error:  # a group cut short
        return decode_base64_text(base64_text(data))


def padded_inside_windows(windows: Iterable[bytes]) -> bool:
    """:func:`padded_inside` of the text that ``windows`` make together."""
    padded = False
    for window in windows:
        if not padded:
            padding = window.find(b"=")
            if padding < 0:
                continue
            padded, window = True, window[padding:]
        if window.translate(None, _NOT_BASE64).strip(b"="):
            return True
    return False


def decode_base64_windows(windows: Iterable[bytes]) -> Iterator[bytes]:
    """:func:`decode_base64` of the text that ``windows`` make together, whose "=" (if
    any) are all at its end, decoded a window at a time."""
    carry = b""
    for window in windows:
        text = carry + window.translate(None, _NOT_BASE64_OR_PADDING)
        whole = len(text) - len(text) % 4
        carry = text[whole:]
        if whole:
            yield binascii.a2b_base64(text[:whole])
    if len(carry) > 1:
        yield binascii.a2b_base64(carry + b"=" * (-len(carry) % 4))


def base64_size(text: bytes) -> int:
    """How many bytes :func:`decode_base64_text` makes of ``text``, which holds no "="."""
    usable = len(text) - (len(text) % 4 == 1)
    return usable * 3 // 4


def skipping_padding(text: bytes) -> bytes:
    """MIME-tools' reading of :func:`base64_text`: every "=" dropped, the rest one
    stream of groups."""
    return decode_base64_text(text.replace(b"=", b""))


def stopping_at_padding(text: bytes) -> bytes:
    """Python's email package's reading of :func:`base64_text` (binascii, not strict):
    an "=" in the first half of a group skipped, decoding ended by one that pads a
    group.  A last group of one character, on which the email package gives up and
    keeps the text undecoded, is dropped: the bytes before it are what it holds."""
    for suffix in (b"", b"=="):
        try:
            return binascii.a2b_base64(text + suffix)
        except binascii.Error:  # the last group cut short
            pass
    return binascii.a2b_base64(text[:-1])


def base64_readings(data: bytes) -> Iterator[bytes]:
    """``data`` decoded as base64 by :func:`decode_base64`, then by every other
    reading that makes other bytes of it (see the module's docstring)."""
    if not padded_inside(data):
        yield _decode_padded_at_end(data)
        return
    text = base64_text(data)
    yield from _distinct(decode_base64_text(text), _other_base64_readings(text))


def base64_text_readings(text: bytes) -> Iterator[bytes]:
    """:func:`base64_readings` of :func:`base64_text`."""
    if b"=" not in text:
        yield decode_base64_text(text)
        return
    yield from _distinct(decode_base64_text(text), _other_base64_readings(text))


def _other_base64_readings(text: bytes) -> list[Callable[[], bytes]]:
    return [lambda: skipping_padding(text), lambda: stopping_at_padding(text)]


# -- quoted-printable --------------------------------------------------------------------


def has_trailing_blanks(data: bytes) -> bool:
    """Whether a line of ``data`` ends in a blank: where readers of quoted-printable
    part ways."""
    return data.endswith((b" ", b"\t")) or any(needle in data for needle in _BLANK_LINE_ENDS)


def decode_quoted_printable(data: bytes) -> bytes:
    """Quoted-printable as RFC 2045 6.7 reads it: blanks at the end of a line are
    stripped first (so "=" then blanks is a soft line break), then decoded."""
    return binascii.a2b_qp(_TRAILING_BLANKS.sub(b"", data))


def quoted_printable_readings(data: bytes) -> Iterator[bytes]:
    """``data`` decoded as quoted-printable by binascii (Python's email package), then
    as RFC 2045 reads it when that makes other bytes of it."""
    first = binascii.a2b_qp(data)
    if not has_trailing_blanks(data):
        yield first
        return
    yield from _distinct(first, [lambda: decode_quoted_printable(data)])


# -- readings ----------------------------------------------------------------------------


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _distinct(first: bytes, others: Iterable[Callable[[], bytes]]) -> Iterator[bytes]:
    """``first``, then each of ``others`` made one at a time and yielded unless it is
    the same bytes as one before.  Digests, not the readings, are kept to compare,
    so at most the reading handed out and the one being made are in memory."""
    seen = {_digest(first)}
    yield first
    del first
    for make in others:
        reading = make()
        digest = _digest(reading)
        if digest not in seen:
            seen.add(digest)
            yield reading
        del reading
