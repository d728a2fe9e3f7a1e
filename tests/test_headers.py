"""smtpguard.headers: the one function that writes header fields, and printable().

Every field is parsed back with Python's email package, as a mail reader would."""

from __future__ import annotations

import ast
import base64
import email
import email.policy
import re
from pathlib import Path

import pytest

from smtpguard import headers
from smtpguard.headers import UnsafeHeader, field, has_control, printable

C0_AND_DEL = [chr(code) for code in (*range(0x20), 0x7F)]
OTHER_UNSAFE = ["\x80", "\x85", "\x9b", "\x9f", "\u2028", "\u2029", "\udcff"]
# Any byte that could end or break a header line, or steer a terminal.
CONTROL_BYTE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n")


def parsed(fields: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(fields + b"\r\n", policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


def lines_of(data: bytes) -> list[bytes]:
    assert data.endswith(b"\r\n")
    return data[:-2].split(b"\r\n")


# -- structured fields --------------------------------------------------------------


def test_structured_field_is_folded_with_tabs_exactly() -> None:
    """A structured field's lines are joined by CRLF and a tab, ending in CRLF."""
    assert field("Received", "from a ([192.0.2.1])", "by b (smtpguard) with ESMTP id 1", "for <c@d.example>") == (
        b"Received: from a ([192.0.2.1])\r\n\tby b (smtpguard) with ESMTP id 1\r\n\tfor <c@d.example>\r\n"
    )


@pytest.mark.parametrize("control", C0_AND_DEL + OTHER_UNSAFE, ids=lambda c: f"U+{ord(c):04X}")
def test_structured_value_with_a_control_character_is_refused(control: str) -> None:
    """Every C0 control (CR, LF and tab included), DEL, C1 control, line or
    paragraph separator and undecodable byte in a structured value raises
    UnsafeHeader: nothing is written."""
    with pytest.raises(UnsafeHeader):
        field("To", f"<alice{control}Subject: forged@example.org>")


def test_structured_continuation_with_a_control_character_is_refused() -> None:
    """A control character in any line of a folded field is refused, not only in the first."""
    with pytest.raises(UnsafeHeader):
        field("Received", "from a", "for <victim@[192.0.2.1\rX-Injected: yes]>")


@pytest.mark.parametrize("blank", ["", " ", "  "])
def test_empty_continuation_line_is_refused(blank: str) -> None:
    """A continuation line with nothing on it would read as the end of the header section."""
    with pytest.raises(UnsafeHeader):
        field("Received", "from a", blank)


def test_structured_line_of_998_octets_is_written_and_999_refused() -> None:
    """RFC 5322's limit: a line of 998 octets (name included) is written, one more is refused."""
    value = "x" * (998 - len("X-Long: "))
    assert len(lines_of(field("X-Long", value))[0]) == 998
    with pytest.raises(UnsafeHeader):
        field("X-Long", value + "x")
    with pytest.raises(UnsafeHeader):
        field("X-Long", "short", "y" * 998)


def test_structured_non_ascii_value_is_utf8() -> None:
    """An internationalised address (SMTPUTF8) is written as UTF-8 (RFC 6532)."""
    assert field("To", "<jörg@example.net>") == "To: <jörg@example.net>\r\n".encode()


@pytest.mark.parametrize("name", ["", "Sub ject", "Subject:", "Sub\rject", "X-\x00", "Sübject"])
def test_bad_field_name_is_refused(name: str) -> None:
    """A field name is printable ASCII without colon or space (RFC 5322 ftext)."""
    with pytest.raises(UnsafeHeader):
        field(name, "value")


# -- unstructured text ----------------------------------------------------------------


def test_short_ascii_text_is_written_as_it_is() -> None:
    """Plain ASCII text that fits on a line is written unchanged."""
    assert field("X-Virus-Status", "infected (Eicar-Test-Signature)", text=True) == (
        b"X-Virus-Status: infected (Eicar-Test-Signature)\r\n"
    )


@pytest.mark.parametrize("control", C0_AND_DEL, ids=lambda c: f"U+{ord(c):04X}")
def test_every_c0_control_and_del_in_text_is_neutralised(control: str) -> None:
    """In unstructured text a tab, CR or LF becomes a space; every other C0
    control and DEL a visible escape; no control byte is written and nothing
    after it becomes a field of its own."""
    data = field("Subject", f"hello{control}Bcc: victim@example.com", text=True)
    shown = " " if control in "\t\r\n" else f"\\x{ord(control):02x}"
    expected = f"hello{shown}Bcc: victim@example.com"
    assert CONTROL_BYTE.search(data) is None
    message = parsed(data)
    assert message["Subject"] == expected
    assert message["Bcc"] is None
    assert list(message.keys()) == ["Subject"]


@pytest.mark.parametrize("control", OTHER_UNSAFE, ids=lambda c: f"U+{ord(c):04X}")
def test_c1_controls_and_separators_in_text_become_escapes(control: str) -> None:
    """C1 controls, U+2028/U+2029 and undecodable bytes become visible escapes."""
    data = field("Subject", f"a{control}b", text=True)
    assert parsed(data)["Subject"] == f"a{printable(control)}b"
    assert data.isascii()


def test_crlf_in_text_never_starts_a_field() -> None:
    """CRLF followed by a field name inside text stays inside the Subject."""
    data = field("Subject", "Invoice\r\nBcc: victim@example.com\r\n\r\nbody", text=True)
    assert data == b"Subject: Invoice Bcc: victim@example.com body\r\n"


def test_non_ascii_text_is_rfc2047_encoded_utf8() -> None:
    """Text that is not ASCII is written as base64 UTF-8 encoded-words, 7-bit."""
    data = field("Subject", "Grüße aus Köln", text=True)
    assert data == b"Subject: =?utf-8?b?R3LDvMOfZSBhdXMgS8O2bG4=?=\r\n"
    assert parsed(data)["Subject"] == "Grüße aus Köln"


def test_text_that_looks_encoded_is_encoded_so_it_reads_literally() -> None:
    """A value holding ``=?`` is encoded, so a reader shows it as written instead
    of decoding it into something else (a CRLF, say)."""
    data = field("Subject", "=?utf-8?q?a=0D=0ABcc:_x@example.com?=", text=True)
    assert parsed(data)["Subject"] == "=?utf-8?q?a=0D=0ABcc:_x@example.com?="


def test_long_ascii_text_is_folded_at_spaces_under_78() -> None:
    """Many words are folded at spaces, every line at most 78 characters, and
    unfold to the same text."""
    text = " ".join(f"word{number}" for number in range(500))
    data = field("Subject", text, text=True)
    assert max(len(line) for line in lines_of(data)) <= 78
    assert len(lines_of(data)) > 1
    assert parsed(data)["Subject"] == text


def test_a_word_too_long_for_a_line_is_encoded_in_pieces() -> None:
    """One 100,000-character word cannot be folded: it is split into encoded-words,
    each at most 75 characters on a line of at most 78, decoding to the word."""
    word = "L" * 100_000
    data = field("X-Long", word, text=True)
    lines = lines_of(data)
    assert max(len(line) for line in lines) <= 78
    assert all(len(encoded) <= 75 for encoded in re.findall(rb"=\?[^ ]*\?=", data))
    assert parsed(data)["X-Long"] == word


def test_long_non_ascii_text_keeps_whole_characters_per_encoded_word() -> None:
    """Long non-ASCII text (4-octet characters too) is split between characters:
    every encoded-word decodes on its own and the whole decodes to the text."""
    text = "日本語のテキスト😀 " * 400
    data = field("Subject", text, text=True)
    words = re.findall(rb"=\?utf-8\?b\?([^?]*)\?=", data)
    for word in words:
        base64.b64decode(word).decode("utf-8")  # raises when a character was cut
    assert max(len(line) for line in lines_of(data)) <= 78
    assert parsed(data)["Subject"] == " ".join(text.split())


def test_empty_text_gives_an_empty_field() -> None:
    """Empty or blank text: the field name and nothing else."""
    assert field("Subject", " \r\n\t ", text=True) == b"Subject:\r\n"


# -- printable -------------------------------------------------------------------------


@pytest.mark.parametrize("control", C0_AND_DEL, ids=lambda c: f"U+{ord(c):04X}")
def test_printable_escapes_every_c0_control_and_del(control: str) -> None:
    """printable() writes each C0 control (tab, CR, LF too) and DEL as \\xNN."""
    assert printable(f"a{control}b") == f"a\\x{ord(control):02x}b"
    assert has_control(control)


def test_printable_escapes_c1_separators_and_undecodable_bytes() -> None:
    """C1 controls as \\xNN, U+2028/2029 as \\uNNNN, a byte kept by surrogateescape as \\xNN."""
    assert printable("\x85\x9b\u2028\u2029" + b"\xff".decode("utf-8", "surrogateescape")) == (
        "\\x85\\x9b\\u2028\\u2029\\xff"
    )


def test_printable_keeps_printable_text() -> None:
    """Printable text, non-ASCII included, is unchanged."""
    text = "Grüße, 日本語 ✓ \\x1b stays as typed"
    assert printable(text) == text
    assert not has_control(text)


def test_headers_module_imports_nothing_of_smtpguard() -> None:
    """smtpguard.headers stands alone, so every module may use it."""
    tree = ast.parse(Path(headers.__file__).read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [name for name in imported if name.startswith("smtpguard")]
