"""Header sections read the way the RFCs and the email package read them and the way
mail clients do: each evasion that hid a file from one reading, the readings on their
own, what reading a message twice costs, and a property test against two references,
Python's email package and a reader written after Thunderbird's libmime."""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import re
import smtplib
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor, threads
from twisted.internet.endpoints import serverFromString

from smtpguard import config as configuration
from smtpguard import replies, tap
from smtpguard.results import ScanResult, Threat
from smtpguard.scanners import mimewalk
from smtpguard.scanners.builtin import EICAR, EICAR_NAME
from smtpguard.scanners.mimefields import mechanism, parameters
from smtpguard.scanners.mimeparse import Entity, parse
from smtpguard.scanners.mimewalk import Limits, Walker
from smtpguard.scanners.readings import (
    CLIENT,
    EMAIL_PACKAGE,
    LAST_FIELDS,
    MIME_TOOLS,
    RFC,
    Parameters,
    Reading,
)
from smtpguard.scanners.signatures import Inspection, Signatures
from tests.conftest import SmtpSink
from tests.test_builtin import RECIPIENT, SENDER, b64, eicar_in, infected, mail, multipart, scan, text

# Read the RFC way, the attachment's part is text; its "Content-Transfer-Encoding:
# base64" line then has the undeclared-base64 finder decode what follows, so the body
# is caught as well as the attachment the other reading splits off.
EICAR_IN_BODY_AND_ATTACHMENT = infected((EICAR_NAME, "(body)"), (EICAR_NAME, "eicar.com"))

# Base64 in lines too short for the search for undeclared base64: the file is found
# only where the part's Content-Transfer-Encoding is read.
SHORT = b64(EICAR, 12)
ATTACHMENT_TYPE = b'Content-Type: application/octet-stream; name="eicar.com"\r\n'
BASE64 = b"Content-Transfer-Encoding: base64\r\n"


def part(*lines: bytes, body: bytes = SHORT) -> bytes:
    """A part: its header lines, the empty line, ``body``."""
    return b"".join(lines) + b"\r\n" + body


def two_structures(parameter: bytes) -> bytes:
    """A message whose Content-Type has ``parameter``, and whose body reads as a
    multipart both with boundary "z" (one text part, holding the other structure as
    text) and with boundary "b" (a text part and the EICAR attachment)."""
    inner = b"--b\r\n" + text() + b"--b\r\n" + part(ATTACHMENT_TYPE, BASE64) + b"--b--\r\n"
    return mail(b"Content-Type: multipart/mixed; " + parameter + b"\r\n\r\n--z\r\n\r\n" + inner + b"--z--\r\n")


def scan_the_rfc_way_only(message: bytes, monkeypatch: pytest.MonkeyPatch) -> ScanResult:
    """The scan of ``message`` by the walk as it was before other readings: the RFC
    reading alone, none other added."""
    monkeypatch.setattr(mimewalk.Readings, "add", lambda self, readings: None)
    return scan(message)


# -- regressions: each of these hid EICAR from the RFC reading ------------------------


@pytest.mark.parametrize("blank", [b" ", b"\t", b" \t "])
def test_regression_blanks_before_the_colon_of_content_transfer_encoding(blank: bytes) -> None:
    """`Content-Transfer-Encoding :` (RFC 5322 section 4.5's obsolete syntax, read by
    mail clients) over base64 in 12-character lines: decoded, EICAR found."""
    message = mail(multipart(text(), part(ATTACHMENT_TYPE, b"Content-Transfer-Encoding" + blank + b": base64\r\n")))
    assert scan(message) == eicar_in("eicar.com")


# In the next two, the RFC reading sees the attachment as text of the part before it:
# what the walk may find in that text (under the name "(body)") is beside the point.


@pytest.mark.parametrize("blank", [b" ", b"\t"])
def test_regression_blanks_before_the_colon_of_content_type(blank: bytes) -> None:
    """`Content-Type :` first in a part's header section (which ends the section for
    the email package, so the encoding after it went unread): EICAR found in the
    attachment, under its name."""
    content_type = ATTACHMENT_TYPE.replace(b"Content-Type:", b"Content-Type" + blank + b":")
    result = scan(mail(multipart(text(), part(content_type, BASE64))))
    assert Threat(EICAR_NAME, "eicar.com") in result.threats


def test_regression_line_without_a_colon_before_content_type() -> None:
    """A header line with no colon before Content-Type: mail clients skip it and read
    on; EICAR found in the attachment, under its name."""
    result = scan(mail(multipart(text(), part(b"X-Mailer-Junk\r\n", ATTACHMENT_TYPE, BASE64))))
    assert Threat(EICAR_NAME, "eicar.com") in result.threats


def test_regression_repeated_content_transfer_encoding_is_scanned_with_each() -> None:
    """`7bit` then `base64`: the part is scanned as the first says and as the last
    says; EICAR found."""
    message = mail(multipart(text(), part(ATTACHMENT_TYPE, b"Content-Transfer-Encoding: 7bit\r\n", BASE64)))
    assert scan(message) == eicar_in("eicar.com")


def test_regression_repeated_content_type_is_scanned_with_each() -> None:
    """`text/plain` then a multipart type: the body is scanned as text and split as a
    multipart; EICAR found in the attachment."""
    multipart_type = b'Content-Type: multipart/mixed; boundary="b"\r\n'
    body = b"--b\r\n" + part(ATTACHMENT_TYPE, BASE64) + b"--b--\r\n"
    assert scan(mail(b"Content-Type: text/plain\r\n" + multipart_type + b"\r\n" + body)) == EICAR_IN_BODY_AND_ATTACHMENT


@pytest.mark.parametrize("encoding", [b"(comment) base64", b"(a (nested) comment) BASE64 (and after)"])
def test_regression_comments_around_the_transfer_encoding(encoding: bytes) -> None:
    """A comment before the mechanism (structured header fields allow comments;
    MIME-tools reads them so): decoded as base64, EICAR found."""
    message = mail(multipart(text(), part(ATTACHMENT_TYPE, b"Content-Transfer-Encoding: " + encoding + b"\r\n")))
    assert scan(message) == eicar_in("eicar.com")


def test_regression_repeated_boundary_parameter_is_read_first_and_last() -> None:
    """`boundary="z"; boundary="b"`: the first counts for the email package and
    Thunderbird, the last for MIME-tools (amavisd); both structures are scanned."""
    assert scan(two_structures(b'boundary="z"; boundary="b"')) == EICAR_IN_BODY_AND_ATTACHMENT


@pytest.mark.parametrize(
    "parameter", [b"boundary*=''z; boundary=b", b"boundary=\"b\"; boundary*=us-ascii''z", b"boundary*0=z; boundary=b"]
)
def test_regression_plain_boundary_beside_an_rfc_2231_one(parameter: bytes) -> None:
    """`boundary` and `boundary*`: mail clients take the RFC 2231 form, the email
    package's compat32 policy the plain one; both structures are scanned."""
    assert scan(two_structures(parameter)) == EICAR_IN_BODY_AND_ATTACHMENT


def test_regression_parts_after_a_close_delimiter() -> None:
    """A close delimiter, then more parts of the same boundary: read as an epilogue
    (the RFC) and as more parts; EICAR found in the part after the close."""
    body = b"--b\r\n" + text() + b"--b--\r\n--b\r\n" + part(ATTACHMENT_TYPE, BASE64) + b"--b--\r\n"
    assert scan(mail(b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + body)) == eicar_in("eicar.com")


def quoted_printable(data: bytes) -> bytes:
    """``data`` with every byte quoted, in lines of 16 bytes joined by soft breaks."""
    quoted = b"".join(b"=%02X" % byte for byte in data)
    return b"=\r\n".join(quoted[at : at + 48] for at in range(0, len(quoted), 48)) + b"\r\n"


def test_regression_repeated_file_name_parameter_is_read_first_and_last() -> None:
    """`filename="notes.txt"; filename="forward.eml"` on an attached message: read as
    named last (MIME-tools), the attachment is opened as a message; EICAR found in it."""
    quoted = part(ATTACHMENT_TYPE, b"Content-Transfer-Encoding: quoted-printable\r\n", body=quoted_printable(EICAR))
    inner = mail(multipart(text(), quoted))
    disposition = b'Content-Disposition: attachment; filename="notes.txt"; filename="forward.eml"\r\n'
    message = mail(
        multipart(text(), part(b"Content-Type: application/octet-stream\r\n", disposition, BASE64, body=b64(inner)))
    )
    assert scan(message) == eicar_in("forward.eml/eicar.com")


def test_a_blank_before_a_colon_is_caught_by_the_rfc_reading_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two defences: walked the RFC way only, the file behind
    `Content-Transfer-Encoding :` is still found, since a part's transfer-encoding
    line has the base64 after it decoded whatever its line length."""
    message = mail(multipart(text(), part(ATTACHMENT_TYPE, b"Content-Transfer-Encoding : base64\r\n")))
    assert scan_the_rfc_way_only(message, monkeypatch) == eicar_in("eicar.com")


def test_missing_close_delimiters_end_parts_at_the_end_of_the_message() -> None:
    """Neither the inner nor the outer multipart closed: the attachment is scanned."""
    inner = b'Content-Type: multipart/mixed; boundary="i"\r\n\r\n--i\r\n' + part(ATTACHMENT_TYPE, BASE64)
    message = mail(b'Content-Type: multipart/mixed; boundary="o"\r\n\r\n--o\r\n' + text() + b"--o\r\n" + inner)
    assert scan(message) == eicar_in("eicar.com")


# -- the readings on their own ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("base64", "base64"),
        (" BASE64;", "base64"),
        ("Base64 (comment)", "base64"),
        ("(comment) base64", "base64"),
        ("(a (b) \\) c) base64", "base64"),
        ('"base64"', "base64"),
        ("base64x", "base64x"),
        ("(never closed base64", ""),
        ("quoted-printable; x=y", "quoted-printable"),
    ],
)
def test_transfer_encoding_mechanism(value: str, expected: str) -> None:
    """Comments (nested, with escapes) and blanks before the mechanism skipped; case,
    quotes and what follows its token dropped; a mechanism with more letters is
    another mechanism, as for every reader."""
    assert mechanism(value) == expected


@pytest.mark.parametrize(
    ("rule", "expected"),
    [(Parameters.STANDARD, "x"), (Parameters.LAST, "x"), (Parameters.PLAIN, "a")],
)
def test_parameter_rules_with_an_rfc_2231_form(rule: Parameters, expected: str) -> None:
    """`a=a; a=b; a*=x`: the RFC 2231 form over plain ones (standard, last), or the
    first plain one over it (plain)."""
    assert parameters("t/s; a=a; a=b; a*=''x", rule) == {"a": expected}


@pytest.mark.parametrize(
    ("rule", "expected"),
    [(Parameters.STANDARD, "a"), (Parameters.LAST, "b"), (Parameters.PLAIN, "a")],
)
def test_parameter_rules_with_plain_forms_only(rule: Parameters, expected: str) -> None:
    """`a=a; a=b`: the first, the last, the first."""
    assert parameters("t/s; a=a; a=b", rule) == {"a": expected}


HEADER_WITH_OTHER_LINES = (
    b"Subject: one\r\nJunk without a colon\r\n continued\r\nX-Spaced : two\r\nX-After: three\r\n\r\nbody\r\n"
)


@pytest.mark.parametrize(
    ("reading", "fields", "body"),
    [
        (
            RFC,
            [("Subject", "one")],
            b"Junk without a colon\r\n continued\r\nX-Spaced : two\r\nX-After: three\r\n\r\nbody\r\n",
        ),
        (CLIENT, [("Subject", "one"), ("X-Spaced", "two"), ("X-After", "three")], b"body\r\n"),
        (MIME_TOOLS, [("Subject", "one")], b"body\r\n"),
    ],
)
def test_a_header_section_with_lines_that_are_not_fields(
    reading: Reading, fields: list[tuple[str, str]], body: bytes
) -> None:
    """The RFC reading ends the header section at the first line that is not a field;
    the client reading skips it (and its continuation) and takes `X-Spaced :`; the
    MIME-tools reading drops every field after it; both read to the empty line."""
    root = parse(HEADER_WITH_OTHER_LINES, reading=reading)
    assert (root.fields.items(), root.body) == (fields, body)


def test_a_header_section_with_a_line_that_is_not_a_field_calls_for_the_client_readings() -> None:
    """Parsed the RFC way, such a message names the readings that read it otherwise."""
    assert parse(HEADER_WITH_OTHER_LINES).readings == {CLIENT, MIME_TOOLS}


def test_repeated_decisive_fields_are_read_first_or_last() -> None:
    """Two Content-Transfer-Encoding fields: the first counts, except for the reading
    that takes the last; parsed the RFC way, the message calls for that reading."""
    message = b"Content-Transfer-Encoding: 7bit\r\nSubject: x\r\nContent-Transfer-Encoding: base64\r\n\r\nQUJD\r\n"
    first, last = parse(message), parse(message, reading=LAST_FIELDS)
    assert first.fields["content-transfer-encoding"] == "7bit" and first.readings == {LAST_FIELDS}
    assert last.fields.get_all("content-transfer-encoding") == ["base64"]


def test_a_separator_after_a_close_delimiter() -> None:
    """The RFC reading stops at the close delimiter; the client reading goes on with
    the parts after it."""
    message = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\none\r\n--b--\r\n--b\r\n\r\ntwo\r\n--b--\r\n"
    rfc, client = parse(message), parse(message, reading=CLIENT)
    assert [entity.body for entity in rfc.parts or []] == [b"one"] and CLIENT in rfc.readings
    assert [entity.body for entity in client.parts or []] == [b"one", b"two"]


@pytest.mark.parametrize(
    ("parameter", "readings"),
    [
        (b"boundary=z; boundary=b", {MIME_TOOLS, LAST_FIELDS}),
        (b"boundary*=''x; boundary=z", {EMAIL_PACKAGE}),
        (b"boundary=z; boundary=b; boundary*=''x", {EMAIL_PACKAGE}),
    ],
)
def test_a_boundary_given_twice_calls_for_the_readings_that_take_another(
    parameter: bytes, readings: set[Reading]
) -> None:
    """Repeated plain boundaries call for the readings that take the last; a plain one
    beside an RFC 2231 one, for the email package's (which takes the plain one)."""
    assert parse(b"Content-Type: multipart/mixed; " + parameter + b"\r\n\r\n").readings == readings


# -- what a second reading costs ---------------------------------------------------------------


class Recorder:
    """An inspector that records the path of every file it is handed."""

    def __init__(self) -> None:
        self.inspection = Inspection(Signatures())
        self.files: list[str] = []

    def file(self, path: str) -> Any:
        self.files.append(path)
        return self.inspection.file(path)

    def container(self, path: str) -> Any:
        return self.inspection.container(path)

    def may_match_base64(self, text: bytes) -> bool:
        return self.inspection.may_match_base64(text)


def parses(monkeypatch: pytest.MonkeyPatch) -> list[Reading]:
    """The readings of every parse the walk makes from now on."""
    made: list[Reading] = []

    def counting(data: bytes, check: Any = None, reading: Reading = RFC) -> Entity:
        made.append(reading)
        return parse(data, check or (lambda entities: None), reading)

    monkeypatch.setattr(mimewalk, "parse", counting)
    return made


def test_a_message_every_reading_reads_alike_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """An ordinary multipart: one parse, the RFC one."""
    made = parses(monkeypatch)
    Walker(Limits(), Recorder()).walk([mail(multipart(text(), part(ATTACHMENT_TYPE, BASE64)))])
    assert made == [RFC]


def test_a_second_reading_looks_only_at_the_files_it_reads_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three parts, one with a line without a colon in its header: parsed the RFC, the
    client and the MIME-tools way, and only that part's body is looked at again."""
    made = parses(monkeypatch)
    recorder = Recorder()
    odd = part(b"Content-Type: text/plain\r\nNo colon here\r\n", body=b"odd\r\n")
    message = mail(multipart(text(b"first\r\n"), odd, text(b"third\r\n")))
    Walker(Limits(), recorder).walk([message])
    assert made == [RFC, CLIENT, MIME_TOOLS]
    assert recorder.files == ["(body)"] * 4


def test_parts_read_alike_count_once_against_max_parts() -> None:
    """600 parts and one line without a colon under max_parts = 1000: the second
    reading counts only the part it reads otherwise, so the message is clean."""
    parts = [text(b"part %d\r\n" % number) for number in range(599)] + [part(b"No colon here\r\n", body=b"x\r\n")]
    assert scan(mail(multipart(*parts))) == ScanResult.clean("builtin")


# -- the property: whatever a reference reader opens, the scanner finds --------------------------


def email_package_files(message: bytes) -> Iterator[bytes]:
    """The decoded bodies Python's email package gives for ``message`` (policy.default,
    get_payload(decode=True) over walk())."""
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    for entity in parsed.walk():
        if not entity.is_multipart():
            payload = entity.get_payload(decode=True)
            if isinstance(payload, bytes):
                yield payload


_LINE_END = (b"\r\n", b"\n", b"\r")


def client_files(lines: list[bytes], default: bytes = b"text/plain") -> Iterator[bytes]:
    """The decoded bodies a reader written after Thunderbird's libmime gives for an
    entity of ``lines``: the header section runs to the empty line, a line without a
    colon is passed over, blanks before a colon are dropped, the first of repeated
    fields counts, a type or encoding is its first token, the RFC 2231 boundary is
    taken over the first plain one, boundary lines match exactly (trailing blanks
    aside), and after the close delimiter nothing counts."""
    heads: list[bytes] = []
    at = 0
    while at < len(lines) and lines[at] not in _LINE_END:
        if lines[at][:1] in (b" ", b"\t") and heads:
            heads[-1] += lines[at]
        else:
            heads.append(lines[at])
        at += 1
    body = lines[at + 1 :]
    fields: dict[bytes, bytes] = {}
    for head in heads:
        name, colon, value = head.partition(b":")
        if colon:
            fields.setdefault(name.rstrip(b" \t").lower(), value.strip())
    content_type = fields.get(b"content-type", default)
    kind = first_token(content_type)
    if kind.startswith(b"multipart/"):
        boundary = client_boundary(content_type)
        if boundary:
            yield from client_parts(body, b"--" + boundary)
    elif kind == b"message/rfc822":
        yield from client_files(body)
    else:
        encoding = first_token(fields.get(b"content-transfer-encoding", b""))
        raw = b"".join(body)
        if encoding == b"base64":
            letters = re.sub(rb"[^A-Za-z0-9+/]", b"", raw)
            letters = letters[: len(letters) - (len(letters) % 4 == 1)]  # a lone last letter holds no byte
            yield base64.b64decode(letters + b"=" * (-len(letters) % 4))
        elif encoding == b"quoted-printable":
            yield binascii.a2b_qp(raw)
        else:
            yield raw


def first_token(value: bytes) -> bytes:
    """A type or encoding as libmime takes it: up to a ";", "," or blank, lower-cased."""
    return re.split(rb"[;,\s]", value, maxsplit=1)[0].lower()


def client_boundary(content_type: bytes) -> bytes | None:
    plain: bytes | None = None
    extended: bytes | None = None
    for parameter in content_type.split(b";")[1:]:
        name, _, value = parameter.strip().partition(b"=")
        name, value = name.strip().lower(), value.strip()
        if name == b"boundary" and plain is None:
            plain = value.strip(b'"')
        elif name == b"boundary*" and extended is None:
            extended = value.split(b"'")[-1]
    return extended or plain


def client_parts(lines: list[bytes], separator: bytes) -> Iterator[bytes]:
    current: list[bytes] | None = None
    for line in lines:
        stripped = line.rstrip()
        if stripped in (separator, separator + b"--"):
            if current is not None:
                yield from client_files(current)
            if stripped != separator:
                return
            current = []
        elif current is not None:
            current.append(line)
    if current is not None:
        yield from client_files(current)


def opened_by(message: bytes) -> set[str]:
    """The references that open EICAR in ``message``."""
    readers = set()
    if any(EICAR in body for body in email_package_files(message)):
        readers.add("email package")
    if any(EICAR in body for body in client_files(message.splitlines(keepends=True))):
        readers.add("client")
    return readers


# The usual form comes several times in each list, so that many variants are odd in
# one or two ways only, as a reader may still open them.
SEPARATORS = [b":"] * 6 + [b" :", b"\t:"]
ENCODINGS = [b"base64"] * 4 + [b"BASE64", b"Base64;", b"base64 (comment)", b"(comment) base64", b"base64x", b"7bit"]
BOUNDARIES = [
    *[b'boundary="b"'] * 4,
    b'boundary="z"; boundary="b"',
    b'boundary="b"; boundary="z"',
    b"boundary*=''b; boundary=z",
    b"boundary=z; boundary*=''b",
    b"boundary*=''z; boundary=b",
    b"boundary=b; boundary*=''z",
    b'boundary="z"',
]
CLOSES = ["closed", "closed", "missing", "early"]


@st.composite
def variants(draw: st.DrawFn) -> bytes:
    """A message of two structures (see :func:`two_structures`) whose EICAR part's
    header section and top Content-Type vary: blanks before colons, lines without
    one, repeated fields, encodings with comments, case and garbage, repeated and RFC
    2231 boundaries, and a close delimiter in place, missing or before the attachment."""
    separator = st.sampled_from(SEPARATORS)
    content_type = b"Content-Type" + draw(separator) + b' application/octet-stream; name="eicar.com"\r\n'
    encoding = b"Content-Transfer-Encoding" + draw(separator) + b" " + draw(st.sampled_from(ENCODINGS)) + b"\r\n"
    lines = [content_type, encoding]
    for extra in (b"No colon at all\r\n", b"Content-Transfer-Encoding: 7bit\r\n", b"Content-Type: text/plain\r\n"):
        if draw(st.integers(0, 3)) == 0:
            lines.insert(draw(st.integers(0, len(lines))), extra)
    attachment = part(*lines)
    close = draw(st.sampled_from(CLOSES))
    inner = b"--b\r\n" + text() + (b"--b--\r\n" if close == "early" else b"") + b"--b\r\n" + attachment
    inner += b"--b--\r\n" if close == "closed" else b""
    top = b"Content-Type" + draw(separator) + b" multipart/mixed; " + draw(st.sampled_from(BOUNDARIES))
    junk = b"No colon either\r\n" if draw(st.integers(0, 3)) == 0 else b""
    return mail(junk + top + b"\r\n\r\n--z\r\n\r\n" + inner + b"--z--\r\n")


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(variants())
def test_eicar_that_the_email_package_or_a_mail_client_opens_is_found(message: bytes) -> None:
    """Whatever header variant: when Python's email package or the client-style
    reference reader decodes EICAR from the message, the scanner finds it."""
    readers = opened_by(message)
    event(f"opened by: {', '.join(sorted(readers)) or 'neither'}")
    if readers:
        assert EICAR_NAME in {threat.name for threat in scan(message).threats}


@pytest.mark.parametrize(
    ("message", "readers"),
    [
        (mail(multipart(text(), part(ATTACHMENT_TYPE, BASE64))), {"email package", "client"}),
        (mail(multipart(text(), part(ATTACHMENT_TYPE, b"Content-Transfer-Encoding : base64\r\n"))), {"client"}),
        (mail(multipart(text(), part(b"No colon\r\n", ATTACHMENT_TYPE, BASE64))), {"client"}),
        (two_structures(b"boundary=b; boundary*=''z"), {"email package"}),
        (two_structures(b'boundary="z"; boundary="b"'), set()),
        (mail(multipart(text(), part(ATTACHMENT_TYPE, b"Content-Transfer-Encoding: base64x\r\n"))), set()),
    ],
)
def test_the_references_open_what_they_should(message: bytes, readers: set[str]) -> None:
    """The property's references, checked: both open a plain attachment; only the
    client reads blanks before a colon and lines without one; only the email
    package takes a plain boundary beside an RFC 2231 one (policy.default takes the
    first of them); neither takes the last of repeated boundaries, nor base64x."""
    assert opened_by(message) == readers


# -- end to end ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_proxy_rejects_eicar_behind_a_blank_before_a_colon(smtp_sink: SmtpSink) -> None:
    """smtplib -> smtpguard (builtin scanner) -> smtp-sink: an attachment whose
    `Content-Transfer-Encoding :` only mail clients read gets 554 5.7.1 naming EICAR,
    and nothing reaches the sink."""
    config = configuration.parse(
        {
            "server": {"hostname": "guard.test"},
            "upstream": {"endpoint": smtp_sink.endpoint},
            "scanners": [{"type": "builtin"}],
        },
        "readings-test",
    )
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(tap.build_factory(config, reactor))
    message = mail(multipart(text(), part(ATTACHMENT_TYPE, b"Content-Transfer-Encoding : base64\r\n")))

    def send() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", port.getHost().port, local_hostname="client.example", timeout=20) as client:
            client.ehlo()
            client.mail(SENDER)
            client.rcpt(RECIPIENT)
            return client.data(message)

    try:
        reply = await threads.deferToThread(send)
    finally:
        await port.stopListening()
    rejected = replies.VIRUS_REJECTED.with_text(f"Message rejected: virus found ({EICAR_NAME})")
    assert reply == (rejected.code, f"{rejected.enhanced} {rejected.text}".encode())
    assert list(smtp_sink.directory.iterdir()) == []
