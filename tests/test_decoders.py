"""Decoders as forgiving as the most forgiving mail reader (every well-known reading
of base64 and quoted-printable scanned) and the inline encodings mail clients turn
into attachments (yEnc, BinHex 4.0, base64 after a transfer-encoding line): the
evasions each found by the built-in scanner, the decoders against the email package
and Perl's MIME decoders, and the finders' limits and polls."""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import hashlib
import subprocess
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpguard.results import ErrorKind, ScanResult
from smtpguard.scanners.builtin import EICAR, BuiltinScanner
from smtpguard.scanners.decoders import (
    base64_readings,
    base64_text,
    decode_base64,
    decode_quoted_printable,
    quoted_printable_readings,
)
from smtpguard.scanners.inline import (
    BINHEX_BANNER,
    CHECK_EVERY,
    FORK_CHUNK,
    binhex_files,
    declared_base64_spans,
    decode_yenc,
    undeclared_base64,
    yenc_blocks,
)
from smtpguard.scanners.mimewalk import Limits
from smtpguard.scanners.signatures import Signatures
from tests.conftest import require_program
from tests.test_builtin import b64, eicar_in, mail, multipart, scan, spooled, text, zipped

_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_BINHEX_ALPHABET = b"!\"#$%&'()*+,-012345689@ABCDEFGHIJKLMNPQRSTUVXYZ[`abcdefhijklmpqr"


# -- building encoded text (from the formats' descriptions, not from smtpguard's decoders) --


def stray_equals(data: bytes, at: int, line: int = 76) -> bytes:
    """``data`` in base64 lines with one "=" put after its ``at``-th character."""
    encoded = base64.b64encode(data)
    encoded = encoded[:at] + b"=" + encoded[at:]
    return b"".join(encoded[i : i + line] + b"\r\n" for i in range(0, len(encoded), line))


def qp_soft_break_with_blanks(data: bytes, blanks: bytes, at: int = 30) -> bytes:
    """``data`` as quoted-printable, a soft line break after ``at`` bytes followed by
    ``blanks`` before its line end."""
    return data[:at].replace(b"=", b"=3D") + b"=" + blanks + b"\r\n" + data[at:].replace(b"=", b"=3D") + b"\r\n"


def yenc_encoded(data: bytes, escape: bytes = b"") -> bytes:
    """yEnc's encoding: each byte plus 42; NUL, LF, CR and "=" (and the bytes of
    ``escape``, as some encoders do) escaped as "=" and the byte plus 64."""
    critical = {0x00, 0x0A, 0x0D, 0x3D} | set(escape)
    out = bytearray()
    for byte in data:
        value = (byte + 42) % 256
        out += bytes([0x3D, (value + 64) % 256]) if value in critical else bytes([value])
    return bytes(out)


def yenc(data: bytes, name: bytes = b"eicar.com", line: int = 128, part: bool = False) -> bytes:
    """A yEnc block (``=ybegin`` ... ``=yend``), lines of ``line`` bytes; ``part``: a
    multi-part block's first part, with its ``=ypart`` line."""
    encoded = yenc_encoded(data)
    body = b"".join(encoded[i : i + line] + b"\r\n" for i in range(0, len(encoded), line))
    size = len(data)
    if part:
        head = b"=ybegin part=1 total=1 line=%d size=%d name=%s\r\n=ypart begin=1 end=%d\r\n" % (line, size, name, size)
    else:
        head = b"=ybegin line=%d size=%d name=%s\r\n" % (line, size, name)
    return head + body + b"=yend size=%d\r\n" % size


def rle90(data: bytes) -> bytes:
    """BinHex's run-length encoding: a run of three or more bytes as the byte, 0x90 and
    the count; a literal 0x90 as 0x90 0x00."""
    out = bytearray()
    at = 0
    while at < len(data):
        byte = data[at]
        run = 1
        while at + run < len(data) and data[at + run] == byte and run < 255:
            run += 1
        literal = b"\x90\x00" if byte == 0x90 else bytes([byte])
        out += literal + b"\x90" + bytes([run]) if run >= 3 else literal * run
        at += run
    return bytes(out)


def binhex(data: bytes, name: bytes = b"eicar.com", resource: bytes = b"", line: int = 64) -> bytes:
    """A BinHex 4.0 block: the banner, then ":", the 6-bit text of the header and
    forks (each with its CRC), run-length encoded, in lines of ``line``, and ":"."""

    def with_crc(block: bytes) -> bytes:
        return block + binascii.crc_hqx(block + b"\0\0", 0).to_bytes(2, "big")

    header = (
        bytes([len(name)]) + name + b"\0TEXTttxt\0\0" + len(data).to_bytes(4, "big") + len(resource).to_bytes(4, "big")
    )
    stream = rle90(with_crc(header) + with_crc(data) + with_crc(resource))
    encoded = base64.b64encode(stream).rstrip(b"=").translate(bytes.maketrans(_BASE64_ALPHABET, _BINHEX_ALPHABET))
    encoded = b":" + encoded + b":"
    lines = b"\r\n".join(encoded[i : i + line] for i in range(0, len(encoded), line))
    return BINHEX_BANNER + b" 4.0)\r\n" + lines + b"\r\n"


def in_text(block: bytes) -> bytes:
    """A message whose one text/plain part is a greeting and ``block``."""
    return mail(text(b"Here it is:\r\n\r\n" + block + b"\r\nBye.\r\n"))


def octet_stream_with(header_lines: bytes, body: bytes, name: bytes = b"e.com") -> bytes:
    """A message with a text part and an attachment part whose header is a
    Content-Type naming ``name``, then ``header_lines``, a blank line and ``body``."""
    part = b'Content-Type: application/octet-stream; name="' + name + b'"\r\n' + header_lines + b"\r\n" + body
    return mail(multipart(text(), part))


def perl(script: str, data: bytes) -> bytes:
    """What Perl's ``script`` prints, given ``data`` (in ``$t``) on its standard input."""
    program = require_program("perl")
    whole = "local $/; my $t = <STDIN>; binmode STDOUT; " + script
    return subprocess.run([program, "-e", whole], input=data, capture_output=True, check=True).stdout


def email_package_decodes(message: bytes, part: int) -> bytes:
    """What Python's email package decodes the ``part``-th part of ``message`` to."""
    parsed = email.message_from_bytes(message, policy=email.policy.compat32)
    payload = parsed.get_payload(part).get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload


# -- the evasions, each found by the built-in scanner ---------------------------------------


@pytest.mark.parametrize("at", [1, 41, 42, 43])
def test_regression_base64_with_a_stray_equals_sign_is_decoded_as_other_readers_do(at: int) -> None:
    """A base64 attachment with one "=" after the 1st, 2nd or 3rd character of a
    group of four: smtpguard's own decoder restarted after it and found nothing;
    the readings of the email package and MIME-tools (which skip it) are scanned
    too, and EICAR is found."""
    message = octet_stream_with(b"Content-Transfer-Encoding: base64\r\n", stray_equals(EICAR, at))
    assert EICAR not in message
    assert scan(message) == eicar_in("e.com")


def test_stray_equals_sign_evasion_is_what_the_email_package_opens() -> None:
    """The attachment of the stray "=" evasion (in the first half of a group) is EICAR
    to Python's email package: what a client built on it opens."""
    message = octet_stream_with(b"Content-Transfer-Encoding: base64\r\n", stray_equals(EICAR, 41))
    assert email_package_decodes(message, 1) == EICAR


@pytest.mark.parametrize("blanks", [b" ", b"  ", b"\t", b" \t "])
def test_regression_quoted_printable_soft_break_followed_by_blanks_is_a_soft_break(blanks: bytes) -> None:
    """A quoted-printable soft line break with blanks after the "=" (RFC 2045 6.7 (3):
    trailing blanks are stripped before decoding; binascii.a2b_qp keeps them, so the
    break was no break and EICAR was cut in two): found."""
    message = octet_stream_with(
        b"Content-Transfer-Encoding: quoted-printable\r\n", qp_soft_break_with_blanks(EICAR, blanks)
    )
    assert EICAR not in message
    assert scan(message) == eicar_in("e.com")


@pytest.mark.parametrize("part", [False, True])
def test_regression_yenc_block_in_a_text_part_is_decoded(part: bool) -> None:
    """A yEnc block (``=ybegin line= size= name=`` ... ``=yend``, or the first part of
    a multi-part one, with its ``=ypart`` line) in a text/plain part, which clients
    show as an attachment: decoded and scanned under its name."""
    message = in_text(yenc(EICAR, part=part))
    assert EICAR not in message
    assert scan(message) == eicar_in("eicar.com")


def test_regression_binhex_block_in_a_text_part_is_decoded() -> None:
    """A BinHex 4.0 block in a text/plain part, which clients show as an attachment:
    its data fork decoded and scanned under the name in its header."""
    message = in_text(binhex(EICAR))
    assert EICAR not in message
    assert scan(message) == eicar_in("eicar.com")


@pytest.mark.parametrize(
    "header_lines",
    [
        pytest.param(b"Content-Transfer-Encoding : base64\r\n", id="blank-before-the-colon"),
        pytest.param(b"Content-Transfer-Encoding\t: BASE64\r\n", id="tab-before-the-colon"),
        pytest.param(
            b"X-Note this line has no colon\r\nContent-Transfer-Encoding: base64\r\n", id="after-a-line-without-colon"
        ),
    ],
)
@pytest.mark.parametrize("line", [4, 8, 12])
def test_regression_short_base64_lines_after_a_transfer_encoding_line_are_decoded(
    header_lines: bytes, line: int
) -> None:
    """An attachment whose Content-Transfer-Encoding field the splitter does not read
    (a blank before its colon, or a line without a colon before it, ends the header
    section there), in base64 lines shorter than 16 characters, which the fallback
    for undeclared base64 never saw: the text after the transfer-encoding line is
    decoded, and EICAR found."""
    message = octet_stream_with(header_lines, b64(EICAR, line))
    assert EICAR not in message
    assert scan(message) == eicar_in("e.com")


# -- base64: each reader's reading ------------------------------------------------------------


def mime_tools_base64(data: bytes) -> bytes:
    """MIME::Decoder::Base64's reading, from the formats' rules: every character but
    the 64 of the alphabet dropped ("=" too), the rest padded and decoded."""
    text = bytes(byte for byte in data if byte in _BASE64_ALPHABET)
    text = text[: len(text) - (len(text) % 4 == 1)]
    return base64.b64decode(text + b"=" * (-len(text) % 4))


_BASE64_PIECES = [b"QUJD", b"QUI", b"QQ", b"Q", b"=", b"==", b"\r\n", b" ", b"-", b"\x00"]


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from(_BASE64_PIECES), max_size=30))
def test_base64_readings_hold_the_email_packages_and_mime_tools_bytes(pieces: list[bytes]) -> None:
    """Whatever the groups, padding and junk: the bytes Python's email package decodes
    a base64 part to, and those of MIME-tools' rule, are among the readings, and
    smtpguard's own decoding comes first."""
    data = b"".join(pieces)
    readings = list(base64_readings(data))
    assert readings[0] == decode_base64(data)
    assert mime_tools_base64(data) in readings
    opened = email.message_from_bytes(b"Content-Transfer-Encoding: base64\r\n\r\n" + data).get_payload(decode=True)
    if opened != b"".join(data.splitlines()):  # a last group of one character: the email package gives up
        assert opened in readings


@pytest.mark.parametrize(
    ("data", "count"),
    [
        pytest.param(b64(EICAR), 1, id="padding-only-at-the-end"),
        pytest.param(b64(b"one!") + b64(b"two"), 3, id="two-encodings-joined"),
        pytest.param(stray_equals(b"sixsix", 1), 2, id="stray-equals-second-in-a-group"),
        pytest.param(stray_equals(b"sixsix", 3), 3, id="stray-equals-last-in-a-group"),
    ],
)
def test_base64_readings_are_decoded_once_each_and_only_when_they_differ(data: bytes, count: int) -> None:
    """Padding only at the end: one reading.  Two encodings joined: smtpguard's
    (both), MIME-tools' (the second out of step) and the email package's (the first
    only).  A stray "=" where no padding can be: the email package skips it as
    MIME-tools does, so two.  One that pads a group: three."""
    readings = list(base64_readings(data))
    assert len(readings) == count == len(set(readings))


@pytest.mark.parametrize("at", [41, 42, 43])
def test_base64_with_a_stray_equals_sign_decodes_to_the_original_in_perls_mime_base64(at: int) -> None:
    """Perl's MIME::Base64, as MIME::Decoder::Base64 calls it (every character outside
    the alphabet, "=" included, removed first), decodes the stray "=" evasion to
    EICAR, and so does one of smtpguard's readings."""
    data = stray_equals(EICAR, at)
    assert perl("use MIME::Base64; $t =~ tr{A-Za-z0-9+/}{}cd; print decode_base64($t);", data) == EICAR
    assert EICAR in list(base64_readings(data))


# -- quoted-printable: each reader's reading ---------------------------------------------------

# Escapes, soft line breaks (bare or with blanks after the "="), blanks before line ends.
_QP_PIECES = [b"ab", b"x", b"=3D", b"=3d", b"=20", b"=\n", b"= \n", b"=\t \n", b" ", b"\t", b"\n"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_QP_PIECES), max_size=25))
def test_rfc2045_quoted_printable_is_what_perls_decode_qp_makes(pieces: list[bytes]) -> None:
    """On lines that end in LF, of escapes, soft line breaks and blanks, smtpguard's
    RFC 2045 reading of quoted-printable is Perl's MIME::QuotedPrint::decode_qp
    (what MIME-tools decodes with): blanks before a line end stripped, "=" then
    blanks a soft line break, hex digits in either case.  (Elsewhere the two part
    ways: decode_qp keeps "==" and blanks at the very end, a2b_qp does not.)"""
    data = b"".join(pieces) + b"\n"
    assert decode_quoted_printable(data) == perl("use MIME::QuotedPrint; print decode_qp($t);", data)


def test_quoted_printable_readings_are_binasciis_then_rfc2045s_when_they_differ() -> None:
    """Blanks after a soft line break: binascii's reading (the email package's) keeps
    them and the "="; the RFC 2045 reading joins the lines.  No trailing blanks: one
    reading."""
    assert list(quoted_printable_readings(b"ab=  \r\ncd\r\n")) == [b"ab=  \r\ncd\r\n", b"abcd\r\n"]
    assert list(quoted_printable_readings(b"ab=\r\ncd=20\r\n")) == [b"abcd \r\n"]


def test_stripping_a_long_run_of_blanks_is_linear() -> None:
    """A megabyte of blanks that ends in a letter (no line end) is read once by the
    trailing-blank pattern, not once per blank: it decodes unchanged."""
    data = b" " * 1_000_000 + b"x"
    assert decode_quoted_printable(data) == data


# -- yEnc ----------------------------------------------------------------------------------------


@given(st.binary(max_size=400), st.sampled_from([b"", b"\t", b"\t .", b"."]))
def test_yenc_decodes_what_an_encoder_made(data: bytes, escape: bytes) -> None:
    """Any bytes, yEnc-encoded (with tab, space or dot escaped too, as some encoders
    do) in lines: decoded back to the same bytes."""
    encoded = yenc_encoded(data, escape)
    lines = b"\r\n".join(encoded[i : i + 64] for i in range(0, len(encoded), 64))
    assert decode_yenc(lines) == data


def test_yenc_equals_after_equals_and_a_dangling_escape() -> None:
    """ "==" is the escaped "=" (0x3D - 106), and an "=" that ends the text escapes nothing."""
    assert decode_yenc(b"k==k=") == bytes([0x41, (0x3D - 106) % 256, 0x41])


def test_yenc_blocks_named_partial_and_unended() -> None:
    """Two blocks: the first named and ended by ``=yend``, the second with no name
    and no ``=yend`` (it runs to the end); text around them is not decoded."""
    data = (
        b"hi\r\n"
        + yenc(b"first", b"a b.bin")
        + b"between\r\n=ybegin line=128 size=6\r\n"
        + yenc_encoded(b"second")
        + b"\r\n"
    )
    assert list(yenc_blocks(data)) == [("a b.bin", b"first"), ("", b"second")]


def test_yenc_line_not_at_a_line_start_is_not_a_block() -> None:
    """ "=ybegin" inside a line (a quoted-printable "=" before "ybegin", say) begins no block."""
    assert list(yenc_blocks(b"x=ybegin line=1 size=1 name=a\r\nkk\r\n=yend\r\n")) == []


# -- BinHex 4.0 ------------------------------------------------------------------------------


def forks(data: bytes) -> list[tuple[str, bytes]]:
    return [(name, stream.read()) for name, stream in binhex_files(data)]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600), st.binary(max_size=100), st.integers(min_value=1, max_value=600))
def test_binhex_data_and_resource_forks_are_what_an_encoder_made(data: bytes, resource: bytes, runs: int) -> None:
    """Any data fork (with runs, so the run-length encoding is used, 0x90 among them)
    and resource fork: decoded back, named from the header."""
    data = data + b"\x90" * (runs % 7) + b"z" * runs
    expected = [("file.bin", data)] + ([("file.bin (resource fork)", resource)] if resource else [])
    assert forks(binhex(data, b"file.bin", resource)) == expected


def test_binhex_without_line_breaks_after_the_banner_and_in_a_mac_name() -> None:
    """The ":" on the banner's line, no line breaks, and a Mac Roman name: decoded."""
    block = binhex(EICAR, "r\u00e9sum\u00e9.com".encode("mac_roman"), line=10_000).replace(b")\r\n:", b"):")
    assert forks(block) == [("r\u00e9sum\u00e9.com", EICAR)]


def test_binhex_with_an_unreadable_header_is_one_file_of_all_its_bytes() -> None:
    """A block whose first byte is no name length (0): all of it is one unnamed file."""
    stream = b"\x00" + EICAR
    encoded = base64.b64encode(stream).rstrip(b"=").translate(bytes.maketrans(_BASE64_ALPHABET, _BINHEX_ALPHABET))
    assert forks(BINHEX_BANNER + b" 4.0)\r\n:" + encoded + b":\r\n") == [("", stream)]


def test_binhex_run_length_bomb_stops_at_the_limit_in_bounded_memory() -> None:
    """A BinHex data fork of 64 MiB of zeros (850 KB of text) under a 16 MiB limit on
    decoded bytes: content-size naming the file, made a piece at a time, so the peak
    of memory stays under four times the message."""
    message = spooled(in_text(binhex(bytes(64 * 1024 * 1024), b"zeros.bin")))
    limit = 16 * 1024 * 1024
    tracemalloc.start()
    try:
        result = BuiltinScanner(limits=Limits(max_expanded_size=limit)).scan_now(message)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result == ScanResult.failed(ErrorKind.CONTENT_SIZE, f"zeros.bin: more than {limit} bytes decoded", "builtin")
    assert peak < 4 * message.size + 2 * FORK_CHUNK


def test_binhex_zip_is_opened() -> None:
    """A zip in a BinHex data fork is opened like any attachment."""
    assert scan(in_text(binhex(zipped({"eicar.com": EICAR}), b"files.zip"))) == eicar_in("files.zip/eicar.com")


# -- base64 after a transfer-encoding line ------------------------------------------------------


def test_declared_base64_spans_run_from_the_header_end_to_a_boundary_or_the_next_field() -> None:
    """After each Content-Transfer-Encoding line naming base64: from past its header
    lines and their empty line to the next line starting with "--", and from past
    headers that run straight into the text to the next transfer-encoding line.  A
    line naming another encoding starts nothing."""
    first = b"Content-Transfer-Encoding : base64\r\nContent-Disposition: attachment\r\n\r\nQUJD\r\nREVG\r\n"
    second = b"content-transfer-encoding: BASE64\r\nQUJD\r\n"
    other = b"Content-Transfer-Encoding: 7bit\r\n\r\nplain\r\n"
    data = first + b"--b\r\n" + second + other
    spans = [data[start:stop] for start, stop in declared_base64_spans(data)]
    assert spans == [b"QUJD\r\nREVG\r\n", b"QUJD\r\n"]


def test_undeclared_base64_keeps_runs_outside_the_declared_spans() -> None:
    """A long-lined base64 run before a transfer-encoding line, then short lines after
    it: each found once, in order."""
    run = b64(b"x" * 60)
    data = b"text\r\n" + run + b"Content-Transfer-Encoding: base64\r\n\r\nQUJD\r\n"
    assert list(undeclared_base64(data)) == [run, b"QUJD\r\n"]


def test_transfer_encoding_line_in_cr_only_text_is_found() -> None:
    """Text whose lines end in bare CRs: the transfer-encoding line is found all the same."""
    data = b"x\rContent-Transfer-Encoding: base64\r\rQUJD\r"
    assert [data[start:stop] for start, stop in declared_base64_spans(data)] == [b"QUJD\r"]


# -- polls ------------------------------------------------------------------------------------


class Checks:
    """A ``check`` that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def test_yenc_decoding_checks_every_check_every_escapes() -> None:
    """A yEnc block of 200,000 escaped bytes: ``check`` is called once for each
    CHECK_EVERY of them."""
    checks = Checks()
    assert decode_yenc(yenc_encoded(b"\x13" * 200_000), checks) == b"\x13" * 200_000
    assert checks.calls == 200_000 // CHECK_EVERY


def test_binhex_decoding_checks_every_check_every_repeat_markers() -> None:
    """A BinHex data fork of 40,000 runs (a repeat marker each): ``check`` is called
    at least once for each CHECK_EVERY markers."""
    data = b"aaaabbbb" * 20_000
    checks = Checks()
    assert [(name, stream.read()) for name, stream in binhex_files(binhex(data), checks)] == [("eicar.com", data)]
    assert checks.calls >= 40_000 // CHECK_EVERY


def test_header_lines_after_a_transfer_encoding_line_are_read_with_checks() -> None:
    """50,000 header lines after a transfer-encoding line: ``check`` is called at
    least once for each CHECK_EVERY of them."""
    data = b"Content-Transfer-Encoding: base64\r\n" + b"X-A: b\r\n" * 50_000 + b"\r\nQUJD\r\n"
    checks = Checks()
    assert [data[start:stop] for start, stop in declared_base64_spans(data, checks)] == [b"QUJD\r\n"]
    assert checks.calls >= 50_000 // CHECK_EVERY


def test_digest_of_a_yenc_file_is_of_its_decoded_bytes() -> None:
    """A listed SHA-256 matches the bytes a yEnc block decodes to."""
    payload = bytes(range(256)) * 3
    signatures = Signatures.build({hashlib.sha256(payload).hexdigest(): "Test.Yenc"})
    result = scan(in_text(yenc(payload, b"p.bin")), signatures=signatures)
    assert [(threat.name, threat.file) for threat in result.threats] == [("Test.Yenc", "p.bin")]


def test_base64_text_keeps_inner_padding() -> None:
    """The text the readings are made from keeps an "=" inside and drops the end's."""
    assert base64_text(b"QU=J D\r\nQQ==") == b"QU=JDQQ"
