"""Messages that a mail reader opens to reveal the EICAR file, and that the built-in
scanner must therefore never call clean (docs/scanners/builtin.md)."""

from __future__ import annotations

import email.policy
from email import message_from_bytes

from smtpguard.scanners.builtin import EICAR
from tests.test_builtin import eicar_in, multipart, scan, uuencoded

HEADER = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: report\r\nMIME-Version: 1.0\r\n"
UUENCODED_PART = (
    b'Content-Type: application/octet-stream; name="e.com"\r\n'
    b"Content-Transfer-Encoding: x-uuencode\r\n"
    b"\r\n"
    b"begin 644 e.com\r\n" + uuencoded(EICAR) + b"`\r\nend\r\n"
)


def email_package_reveals(message: bytes) -> bool:
    """Whether Python's email package, walking the message, decodes a part to EICAR."""
    parsed = message_from_bytes(message, policy=email.policy.default)
    return any(EICAR in (part.get_payload(decode=True) or b"") for part in parsed.walk() if not part.is_multipart())


def cr_only(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\r")


def test_uuencoded_part_with_lines_ending_in_a_lone_cr_is_infected() -> None:
    """Trick: a part declared `Content-Transfer-Encoding: x-uuencode` whose body lines
    end in a lone CR (the message's other lines in CRLF). Python's email package splits
    the body with `splitlines()`, for which a lone CR ends a line, and decodes EICAR."""
    headers, _, body = UUENCODED_PART.partition(b"\r\n\r\n")
    message = HEADER + headers + b"\r\n\r\n" + cr_only(body) + b"\r\n"
    assert email_package_reveals(message)
    assert scan(message) == eicar_in("e.com")


def test_uuencoded_part_of_a_message_in_cr_only_line_ends_is_infected() -> None:
    """Trick: a whole message whose every line ends in a lone CR, holding a multipart
    with an `x-uuencode` attachment. Python's email package reads CR as a line end in
    the header, the multipart and the uuencoded body alike, and decodes EICAR (the same
    message with base64 instead is found; uuencode is not)."""
    message = cr_only(HEADER + multipart(UUENCODED_PART))
    assert email_package_reveals(message)
    assert scan(message) == eicar_in("e.com")


def test_inline_uuencoded_block_in_text_with_lone_cr_line_ends_is_infected() -> None:
    """Trick: a `begin 644` block inline in a text/plain part, its lines ending in a
    lone CR. Readers that turn inline uuencode into an attachment take a lone CR as
    a line end; so does the scanner."""
    body = b"See attached.\r\nbegin 644 e.com\r\n" + uuencoded(EICAR) + b"`\r\nend\r\n"
    message = HEADER + b"Content-Type: text/plain\r\n\r\n" + cr_only(body)
    assert scan(message) == eicar_in("e.com")
