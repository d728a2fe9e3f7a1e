"""Header edits: forged status headers removed, the subject tag, notice headers."""

from __future__ import annotations

from email import message_from_bytes
from email.policy import default as default_policy

from smtpguard import rewrite

SECTION = (
    b"From: Alice <alice@example.com>\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= from\r\n the road\r\n"
    b"X-Virus-Status: clean\r\n"
    b"x-virus-scanned: forged\r\n\tcontinued\r\n"
    b"Content-Type: multipart/mixed;\r\n boundary=XYZ\r\n"
    b"MIME-Version: 1.0\r\n"
)


def test_status_headers_from_the_client_are_removed():
    """X-Virus-Status and X-Virus-Scanned, in any case and with continuation lines, are removed."""
    assert rewrite.without(SECTION, rewrite.STATUS_HEADERS) == (
        b"From: Alice <alice@example.com>\r\n"
        b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= from\r\n the road\r\n"
        b"Content-Type: multipart/mixed;\r\n boundary=XYZ\r\n"
        b"MIME-Version: 1.0\r\n"
    )


def test_subject_tag_is_appended_on_a_continuation_line():
    """The tag goes at the end of a folded, encoded Subject, and decodes as appended text."""
    tagged = rewrite.tag_subject(SECTION, "(No virus check due to scan error)")
    assert b"the road\r\n (No virus check due to scan error)\r\nX-Virus-Status" in tagged
    parsed = message_from_bytes(tagged + b"\r\n", policy=default_policy)
    assert parsed["Subject"] == "Grüße from the road (No virus check due to scan error)"


def test_non_ascii_tag_is_encoded():
    """A tag that is not ASCII is RFC 2047 encoded, with the separating space kept."""
    tagged = rewrite.tag_subject(b"Subject: hello\r\n", "(non vérifié)")
    assert tagged.isascii()
    assert message_from_bytes(tagged + b"\r\n", policy=default_policy)["Subject"] == "hello (non vérifié)"


def test_non_ascii_tag_after_an_encoded_subject_keeps_its_space():
    """After an encoded-word, the space before a non-ASCII tag survives decoding."""
    tagged = rewrite.tag_subject(b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n", "(non vérifié)")
    assert message_from_bytes(tagged + b"\r\n", policy=default_policy)["Subject"] == "Grüße (non vérifié)"


def test_missing_subject_gets_one():
    """A message without Subject gets one holding the tag."""
    assert rewrite.tag_subject(b"From: a@example.com\r\n", "[tag]") == b"From: a@example.com\r\nSubject: [tag]\r\n"


def test_subject_is_decoded():
    """subject() unfolds and decodes the Subject."""
    assert rewrite.subject(SECTION) == "Grüße from the road"
    assert rewrite.subject(b"From: a@example.com\r\n") == ""


def test_notice_headers_replace_the_content_fields():
    """A notice keeps the original fields but its own MIME fields: a well-formed text/plain message."""
    headers = rewrite.notice_headers(rewrite.without(SECTION, rewrite.STATUS_HEADERS), "dropped.\r\n")
    parsed = message_from_bytes(headers + b"\r\ndropped.\r\n", policy=default_policy)
    assert parsed.get_content_type() == "text/plain"
    assert parsed["From"] == "Alice <alice@example.com>"
    assert parsed.get_all("MIME-Version") == ["1.0"]
    assert parsed.get_content().replace("\r\n", "\n") == "dropped.\n"
    assert b"boundary=XYZ" not in headers


def test_status_headers_after_bare_line_ends_are_removed_and_crlf_written():
    """A bare LF or CR ends a header line as CRLF does (a BINARYMIME message keeps
    them): the client's status headers behind them are removed, and the fields
    kept are written with CRLF."""
    section = (
        b"From: a@example.com\nX-Virus-Status: clean\nSubject: hi\rX-Virus-Scanned: x\r\n y\r"
        b"To: b@example.net\r\n"
    )
    assert rewrite.without(section, rewrite.STATUS_HEADERS) == (
        b"From: a@example.com\r\nSubject: hi\r\nTo: b@example.net\r\n"
    )


def test_subject_after_bare_line_ends_is_read_and_tagged():
    """The Subject of a section with bare line ends is read up to its own line end,
    and tagged on a continuation line with CRLF endings."""
    section = b"From: a@example.com\nSubject: hi\nX-Virus-Status: clean\n"
    assert rewrite.subject(section) == "hi"
    assert rewrite.tag_subject(section, "[tag]") == (
        b"From: a@example.com\r\nSubject: hi\r\n [tag]\r\nX-Virus-Status: clean\r\n"
    )
