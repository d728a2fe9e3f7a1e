"""Edits of a message's header section: status headers that only smtpguard may
write, the subject tag, and the headers of a replacement notice.

Header sections are handled as raw bytes; folded fields (continuation lines) stay
intact.  A bare CR or LF ends a line as CRLF does, as mail readers take it (only a
BINARYMIME message can have them), and what is written back ends in CRLF only.
"""

from __future__ import annotations

import re

from smtpguard import headers
from smtpguard.scanners.mimefields import decode_words

STATUS_HEADERS = frozenset({b"x-virus-scanned", b"x-virus-status"})
CONTENT_HEADERS = frozenset(
    {b"mime-version", b"content-type", b"content-transfer-encoding", b"content-disposition", b"content-id"}
)
_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_ENCODED_SPACE = b"=?us-ascii?q?_?="


def fields(section: bytes) -> list[bytes]:
    """The header fields of ``section`` (ending in the empty line or not), each with
    its continuation lines, every line ending in CRLF."""
    found: list[list[bytes]] = []
    for line in _LINE_END.split(section):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and found:
            found[-1].append(line)  # joined once below: a long fold costs linear time
        else:
            found.append([line])
    return [b"\r\n".join(lines) + b"\r\n" for lines in found]


def field_name(field: bytes) -> bytes:
    match = _FIELD_NAME.match(field)
    return match.group(1).lower() if match else b""


def without(section: bytes, names: frozenset[bytes]) -> bytes:
    """``section``'s fields without those named in ``names`` (lower case), no empty line."""
    return b"".join(field for field in fields(section) if field_name(field) not in names)


def tag_subject(section: bytes, tag: str) -> bytes:
    """``section`` (without empty line) with ``tag`` appended to the Subject, on
    continuation lines of its own so that no line grows; RFC 2047 encoded when
    the tag is not ASCII.  A message without Subject gets one."""
    added = headers.field("Subject", tag, text=True)
    if added == b"Subject:\r\n":
        return section  # a tag of white space only: nothing to add
    kept = fields(section)
    for index, field in enumerate(kept):
        if field_name(field) == b"subject":
            continuation = added[len(b"Subject:") :]
            # Between two encoded-words white space vanishes when decoded: then
            # the separating space must be an encoded-word of its own.
            if field.rstrip().endswith(b"?=") and continuation.startswith(b" =?"):
                continuation = b" " + _ENCODED_SPACE + b"\r\n" + continuation
            kept[index] = field[:-2] + b"\r\n" + continuation
            return b"".join(kept)
    return b"".join(kept) + added


def subject(section: bytes) -> str:
    """The decoded Subject of ``section``, or "" when there is none."""
    for field in fields(section):
        if field_name(field) == b"subject":
            raw = field.split(b":", 1)[1].replace(b"\r\n", b"").strip().decode("utf-8", "replace")
            # Not email.header's decoder: its work grows with the square of the field.
            return decode_words(raw)
    return ""


def notice_headers(section: bytes, text: str) -> bytes:
    """The original fields minus the MIME content fields, plus those of a
    text/plain ``text`` (8bit UTF-8 only when it needs to be)."""
    kept = without(section, CONTENT_HEADERS)
    charset, encoding = ("us-ascii", "7bit") if text.isascii() else ("utf-8", "8bit")
    return (
        kept
        + headers.field("MIME-Version", "1.0")
        + headers.field("Content-Type", f"text/plain; charset={charset}")
        + headers.field("Content-Transfer-Encoding", encoding)
    )
