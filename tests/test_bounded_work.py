"""Bounded work per byte in every parser of client data on the scanning side: the
built-in scanner's MIME parser, walk, header parameters and encoded words, and the
parsers of what clamd and scanning commands answer about it.

Growth is measured as a ratio in one run: the CPU time this thread spends on an
input of 100 KB over that on 10 KB.  Linear work gives about 10, quadratic about
100; the tests require less than 30.  Where an operation can be counted (bytes
parsed, entities built, polls made) the tests count it instead.
"""

from __future__ import annotations

import gc
import re
import time
from collections.abc import Callable
from email.message import Message as EmailMessage
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtpguard.results import ErrorKind, ScanResult, Threat
from smtpguard.scanners import mimeparse, mimewalk
from smtpguard.scanners.builtin import EICAR, EICAR_NAME, BuiltinScanner
from smtpguard.scanners.clamd_protocol import Reply, classify
from smtpguard.scanners.command import DEFAULT_THREAT_PATTERN, find_threats
from smtpguard.scanners.decoders import base64_readings, quoted_printable_readings
from smtpguard.scanners.inline import (
    BINHEX_BANNER,
    base64_runs,
    binhex_files,
    decode_yenc,
    undeclared_base64,
    yenc_blocks,
)
from smtpguard.scanners.mimefields import MAX_FIELD, boundary, decode_words, filename, mechanism, parameters
from smtpguard.scanners.mimeparse import CHECK_EVERY, MAX_FIELDS, Entity, parse
from smtpguard.scanners.mimewalk import INSPECT_SIZE, Limits, Walker, rediscovered, uu_blocks
from smtpguard.scanners.readings import READINGS, RFC, Reading
from smtpguard.scanners.signatures import Inspection, Pattern, Signatures
from tests.test_builtin import attachment, mail, multipart, spooled, text

SMALL = 10_000
LARGE = 100_000
# Linear work grows about tenfold from SMALL to LARGE, quadratic a hundredfold.
MAX_GROWTH = 30


def cpu_time(work: Callable[[], object]) -> float:
    started = time.thread_time()
    work()
    return time.thread_time() - started


def growth(work: Callable[[Any], object], make: Callable[[int], Any], small: int = SMALL, large: int = LARGE) -> float:
    """How many times longer ``work`` takes on ``make(large)`` than on ``make(small)``:
    each the least CPU time of a few runs, the garbage collector held off."""
    little, big = make(small), make(large)
    work(little)  # caches (compiled patterns, codecs) warm for both
    gc.collect()
    gc.disable()
    try:
        small_time = min(cpu_time(lambda: work(little)) for _ in range(7))
        large_time = min(cpu_time(lambda: work(big)) for _ in range(3))
    finally:
        gc.enable()
    return large_time / max(small_time, 1e-7)


def repeated(unit: bytes, prefix: bytes = b"", suffix: bytes = b"") -> Callable[[int], bytes]:
    """Inputs of about ``size`` bytes: ``prefix``, ``unit`` repeated, ``suffix``."""

    def make(size: int) -> bytes:
        return prefix + unit * max(1, (size - len(prefix) - len(suffix)) // len(unit)) + suffix

    return make


def scan(data: bytes) -> ScanResult:
    return BuiltinScanner(limits=Limits(max_parts=100_000)).scan_now(spooled(data))


# -- the cases that froze the process ------------------------------------------------------


def uuencode_trap(size: int) -> bytes:
    """A text line "begin 644 a", then blanks up to ``size``, then one more character."""
    head = b"Subject: x\r\n\r\nbegin 644 a"
    return head + b" " * (size - len(head) - 3) + b"x\r\n"


def test_uuencode_begin_line_of_blanks_scans_in_linear_time() -> None:
    """A 50 KB message whose text is "begin 644 a", blanks and one character (which
    froze the process for about 45 s): clean, and ten times the blanks cost at most
    MAX_GROWTH times the work."""
    assert scan(uuencode_trap(50_000)) == ScanResult.clean("builtin")
    assert growth(scan, uuencode_trap, 5_000, 50_000) < MAX_GROWTH


def semicolon_name(size: int) -> bytes:
    """A part whose quoted name= parameter is ``size`` bytes of ";"."""
    return mail(multipart(b'Content-Type: application/octet-stream; name="' + b";" * size + b'"\r\n\r\nhello\r\n'))


def test_quoted_name_full_of_semicolons_scans_in_linear_time() -> None:
    """A 150 KB quoted name= parameter full of ";" (quadratic in the email package's
    parameter parser): clean, with the work growing linearly."""
    assert scan(semicolon_name(150_000)) == ScanResult.clean("builtin")
    assert growth(scan, semicolon_name, 15_000, 150_000) < MAX_GROWTH


def nested_broken_multiparts(levels: int, payload: bytes) -> bytes:
    """``levels`` multiparts without a boundary parameter, each the only part of the
    one around it (so each is repaired from its body), around ``payload``."""
    body = payload
    for level in range(levels):
        separator = b"--b%d" % level
        body = separator + b"\r\nContent-Type: multipart/mixed\r\n\r\n" + body + b"\r\n" + separator + b"--\r\n"
    return b"Content-Type: multipart/mixed\r\n\r\n" + body


def test_nested_broken_multiparts_are_parsed_again_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """200 nested multiparts whose boundary must be rediscovered, around 1 MB: the
    bytes parsed are at most twice the message (a repaired multipart's parts are not
    repaired again), not 200 times."""
    parsed: list[int] = []

    def counting_parse(data: bytes, check: mimeparse.Check = mimeparse._unchecked, reading: Reading = RFC) -> Entity:
        parsed.append(len(data))
        return parse(data, check, reading)

    monkeypatch.setattr(mimewalk, "parse", counting_parse)
    message = nested_broken_multiparts(200, b"x" * 1_000_000)
    assert scan(message) == ScanResult.clean("builtin")
    assert sum(parsed) <= 2 * len(message) + 1024


def test_repaired_multipart_still_finds_eicar_in_its_parts() -> None:
    """One multipart without its boundary parameter holding a base64 EICAR attachment:
    repaired, and the attachment found."""
    body = multipart(text(), attachment(EICAR, b"e.com"))
    broken = body.replace(b'; boundary="=_boundary_1"', b"", 1)
    assert scan(mail(broken)).threats == (Threat(EICAR_NAME, "e.com"),)


def test_a_message_of_tiny_parts_builds_no_more_entities_than_max_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """100,000 empty parts (700 KB) under max_parts = 1000: content-size, and the
    parser stops after 1001 entities instead of building all of them."""
    built: list[None] = []

    def counted(**options: Any) -> EmailMessage:
        built.append(None)
        return EmailMessage(**options)

    monkeypatch.setattr(mimeparse, "EmailMessage", counted)
    message = b"Content-Type: multipart/mixed; boundary=a\r\n\r\n" + b"--a\r\n\r\n" * 100_000
    result = BuiltinScanner().scan_now(spooled(message))
    assert result == ScanResult.failed(ErrorKind.CONTENT_SIZE, "(body): more than 1000 parts", "builtin")
    assert len(built) == 1001


def test_header_fields_past_the_limit_are_dropped_and_reported() -> None:
    """A message whose parts hold MAX_FIELDS + 5 header fields in all: the parser
    keeps MAX_FIELDS of them, and the scan reports a content-size error naming the
    part where the limit was passed."""
    fields = b"".join(b"X-Filler-%d: x\r\n" % n for n in range(MAX_FIELDS // 2))
    first = b'Content-Type: text/plain; name="a.txt"\r\n' + fields + b"\r\nhello\r\n"
    second = b'Content-Type: text/plain; name="b.txt"\r\n' + fields + b"X: 1\r\n" * 4 + b"\r\nhello\r\n"
    message = multipart(first, second)
    [a, b] = parse(message).parts or []
    assert len(a.fields) + len(b.fields) == MAX_FIELDS - 1 and (a.truncated, b.truncated) == (False, True)
    assert BuiltinScanner().scan_now(spooled(message)) == ScanResult.failed(
        ErrorKind.CONTENT_SIZE,
        f"b.txt: more than {MAX_FIELDS} header fields in the message or {MAX_FIELD} characters in a field",
        "builtin",
    )


def test_header_field_past_max_field_is_cut_and_reported() -> None:
    """A Content-Type of MAX_FIELD + 1000 characters: kept to MAX_FIELD characters,
    and reported."""
    message = b"Content-Type: text/plain; x=" + b"y" * MAX_FIELD + b"\r\n\r\nhello\r\n"
    root = parse(message)
    assert root.truncated and len(root.fields["content-type"]) < MAX_FIELD
    assert BuiltinScanner().scan_now(spooled(message)).error is ErrorKind.CONTENT_SIZE


def blank_error_line(size: int) -> Reply:
    return Reply(("a" + " " * size + "x",), b"")


def test_clamd_line_of_blanks_is_classified_in_linear_time() -> None:
    """A clamd reply line of one word, blanks and no ERROR: an "other" error, with
    work linear in the blanks (the ERROR pattern no longer tries each split)."""
    assert classify(blank_error_line(10), "clamd").error is ErrorKind.OTHER
    assert growth(lambda reply: classify(reply, "clamd"), blank_error_line) < MAX_GROWTH


# -- polls: a stopped scan stops soon ------------------------------------------------------------


class Polls:
    """A ``stopped`` poll that turns true at call number ``at``; counts its calls."""

    def __init__(self, at: int | None = None) -> None:
        self.calls = 0
        self.at = at

    def __call__(self) -> bool:
        self.calls += 1
        return self.at is not None and self.calls >= self.at


def test_parser_checks_every_check_every_lines() -> None:
    """A body of 100,000 lines that begin with a dash inside a multipart: the parser's
    check is called at least once for every CHECK_EVERY lines."""
    lines = 100_000
    message = b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\n\r\n" + b"-x\r\n" * lines + b"--a--\r\n"
    checks: list[int] = []
    parse(message, checks.append)
    assert len(checks) >= lines // CHECK_EVERY


def test_a_stopped_walk_ends_at_the_first_poll_that_says_so() -> None:
    """A walk whose poll turns true at its 5th call: it raises Stopped there, and
    polls no more."""
    polls = Polls(at=5)
    message = b"Content-Type: multipart/mixed; boundary=a\r\n\r\n" + b"--a\r\n\r\nhello\r\n" * 100
    with pytest.raises(mimewalk.Stopped):
        Walker(Limits(), Inspection(Signatures()), polls).walk([message])
    assert polls.calls == 5


def test_a_large_file_is_inspected_chunk_by_chunk_with_a_poll_before_each() -> None:
    """A 4 MB attachment matched against 50 patterns: handed to the matcher in
    INSPECT_SIZE pieces, the poll called before each, so a stopped scan does at most
    one piece's matching more."""
    payload = bytes(4 * 1024 * 1024)
    patterns = [Pattern(f"Test.{n}", b"pattern-%04d" % n) for n in range(50)]
    polls = Polls()
    inspection = Inspection(Signatures.build(patterns=patterns))
    Walker(Limits(), inspection, polls).walk([mail(multipart(attachment(payload, b"zeros.bin")))])
    assert polls.calls >= len(payload) // INSPECT_SIZE


def test_scan_stopped_during_parsing_is_a_timeout() -> None:
    """A scan whose poll turns true while it parses a long message: a timeout result."""
    message = b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\n\r\n" + b"-x\r\n" * 50_000
    result = BuiltinScanner().scan_now(spooled(message), Polls(at=3))
    assert result == ScanResult.failed(ErrorKind.TIMEOUT, "stopped at the deadline", "builtin")


# -- header parameters and encoded words -------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('multipart/mixed; boundary="a;b"; x=1', {"boundary": "a;b", "x": "1"}),
        ('text/plain; name="a\\"b;c.txt"', {"name": 'a"b;c.txt'}),
        ("text/plain; NAME = x.txt ; bare", {"name": "x.txt", "bare": ""}),
        ("text/plain; name=first.txt; name=second.exe", {"name": "first.txt"}),
        ("text/plain; name=plain.txt; name*=utf-8''extended.zip", {"name": "extended.zip"}),
        ("text/plain; name*1=\"b.zip\"; name*0*=utf-8''caf%C3%A9-", {"name": "café-b.zip"}),
        ("text/plain; name*0=a; name*0=x; name*1=b", {"name": "ab"}),
        ("text/plain; name*=nonsense''%E9t%E9", {"name": "été"}),
        ("text/plain; name*=punycode''abc-", {"name": "abc-"}),
        ("text/plain; name*99999=x", {"name*99999": "x"}),
    ],
)
def test_parameters_are_read_as_mail_clients_read_them(value: str, expected: dict[str, str]) -> None:
    """Quoted ";" and escapes, case, bare attributes, the first of duplicates, RFC 2231
    forms over plain ones, sections in order (the first of a repeated one), charsets
    unknown or refused read as Latin-1, section numbers past four digits ignored."""
    assert parameters(value) == expected


def fields_of(header: bytes) -> Any:
    return parse(header + b"\r\n\r\n").fields


def test_filename_prefers_content_disposition_and_decodes_encoded_words() -> None:
    """filename= of Content-Disposition over name= of Content-Type; RFC 2047 words
    decoded, the blank between two of them dropped."""
    header = (
        b"Content-Type: application/octet-stream; name=other.bin\r\n"
        b'Content-Disposition: attachment; filename="=?utf-8?q?r=C3=A9sum=C3=A9?= =?utf-8?b?LnppcA==?="'
    )
    assert filename(fields_of(header)) == "résumé.zip"


def test_boundary_with_trailing_blanks_and_8bit_bytes() -> None:
    """Trailing blanks are no part of a boundary; an 8-bit byte in one becomes U+FFFD,
    as the email package hands it over (so no line can match it)."""
    assert boundary(fields_of(b'Content-Type: multipart/mixed; boundary="a b  "')) == "a b"
    assert boundary(fields_of(b'Content-Type: multipart/mixed; boundary="\xe9"')) == "\ufffd"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("=?iso-8859-1?q?caf=E9?= au lait", "café au lait"),
        ("=?utf-8?b?w6k?=", "é"),
        ("=?utf-8*fr?q?=C3=A9t=C3=A9?=", "été"),
        ("a =?x-unknown?q?=E9?= b", "a é b"),
        ("=?utf-8?q?broken", "=?utf-8?q?broken"),
    ],
)
def test_encoded_words_are_decoded(text: str, expected: str) -> None:
    """Q and B encodings, RFC 2231 language suffixes, unknown charsets as Latin-1, and
    an unfinished word left as it is."""
    assert decode_words(text) == expected


# -- every parser of client data grows linearly ----------------------------------------------

# Pieces of the syntax each parser reads, in any order: what makes patterns and
# loops go back over the same bytes.
_PIECES = [
    b";", b'"', b"\\", b" ", b"\t", b"\r\n", b"\r", b"\n", b"-", b"--", b"--a", b"=", b"=?", b"?=", b"?",
    b"q?", b"b?", b"*", b"*0*", b"'", b"%", b"%E9", b"a", b"Z", b"0", b":", b"From ", b"begin 644 ", b"end",
    b"AAAA", b"QUJDREVGR0hJSktMTU5P", b"\xe9", b"\x00", b"name=", b"name*0*=",
    b"Content-Type: multipart/mixed; boundary=a\r\n", b"Content-Transfer-Encoding: base64\r\n",
    b"(", b")", b" :", b"X :", b"no colon\r\n", b"--a--\r\n", b"boundary=", b"filename=",
    b"=ybegin ", b"=ypart ", b"=yend", b"==", b"= \r\n", b"  \r\n", b"=3D", BINHEX_BANNER + b" 4.0)", b"!!!!",
    b"r!", b"content-transfer-encoding :", b"base64",
]  # fmt: skip

_MESSAGE_FRAMES: list[tuple[bytes, bytes]] = [
    (b"Subject: x\r\n\r\n", b""),  # a text body
    (b"Subject: x\r\nX-Long: ", b"\r\n\r\nbody\r\n"),  # one header field
    (b'Content-Type: application/octet-stream; name="', b'"\r\n\r\nbody\r\n'),  # a parameter
    (b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\n", b"\r\n--a--\r\n"),  # parts
    (b"Content-Type: text/plain\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 f\r\n", b"\r\nend\r\n"),
    (b"Content-Type: multipart/mixed\r\n\r\n--z\r\n", b"\r\n--z--\r\n"),  # repaired
    (b"Subject: x\r\nno colon\r\nContent-Transfer-Encoding: ", b"\r\n\r\nbody\r\n"),  # read every way
    (b"Subject: x\r\nno colon\r\n", b""),  # a header section without its empty line, read every way
    (b"Content-Type: multipart/mixed; boundary=a; boundary=b\r\n\r\n--b\r\n", b"\r\n--b--\r\n--a--\r\n"),
    (b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\n\r\nx\r\n--a--\r\n", b"\r\n--a\r\n\r\n"),
    (b"Content-Transfer-Encoding: base64\r\n\r\n", b""),  # base64, each reading
    (b"Content-Transfer-Encoding: quoted-printable\r\n\r\n", b""),  # quoted-printable, each reading
    (b"Subject: x\r\n\r\n=ybegin line=128 size=1 name=a\r\n", b"\r\n=yend size=1\r\n"),  # yEnc
    (b"Subject: x\r\n\r\n" + BINHEX_BANNER + b" 4.0)\r\n:", b":\r\n"),  # BinHex
    (b"Subject: x\r\n\r\nContent-Transfer-Encoding : base64\r\n", b""),  # base64 after a field-like line
]

units = st.lists(st.sampled_from(_PIECES), min_size=1, max_size=12).map(b"".join)
HOSTILE = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@HOSTILE
@given(units, st.sampled_from(_MESSAGE_FRAMES))
def test_scanning_grows_linearly(unit: bytes, frame: tuple[bytes, bytes]) -> None:
    """Any repeated piece of MIME syntax in a header, a parameter, a body, a multipart,
    a uuencoded or a repaired part: the built-in scan of 100 KB costs at most
    MAX_GROWTH times that of 10 KB."""
    assert growth(scan, repeated(unit, *frame)) < MAX_GROWTH


@HOSTILE
@given(units, st.sampled_from(_MESSAGE_FRAMES))
def test_parsing_grows_linearly(unit: bytes, frame: tuple[bytes, bytes]) -> None:
    """The MIME parser on its own, on the same inputs."""
    assert growth(parse, repeated(unit, *frame)) < MAX_GROWTH


@HOSTILE
@given(units, st.sampled_from(_MESSAGE_FRAMES), st.sampled_from(READINGS))
def test_parsing_grows_linearly_in_every_reading(
    unit: bytes, frame: tuple[bytes, bytes], reading: Reading
) -> None:
    """The MIME parser reading the mail clients' ways (to the empty line, past lines
    without a colon, after close delimiters), on the same inputs."""
    assert growth(lambda data: parse(data, reading=reading), repeated(unit, *frame)) < MAX_GROWTH


@HOSTILE
@given(units)
def test_transfer_encodings_grow_linearly(unit: bytes) -> None:
    """The mechanism of a Content-Transfer-Encoding of any repeated piece (comments
    nest)."""
    assert growth(mechanism, as_text(repeated(unit, b"(x "))) < MAX_GROWTH


def as_text(make: Callable[[int], bytes]) -> Callable[[int], str]:
    return lambda size: make(size).decode("ascii", "surrogateescape")


@HOSTILE
@given(units)
def test_header_parameters_grow_linearly(unit: bytes) -> None:
    """Parameters of a Content-Type of any repeated piece."""
    assert growth(parameters, as_text(repeated(unit, b"text/plain; "))) < MAX_GROWTH


@HOSTILE
@given(units)
def test_encoded_words_grow_linearly(unit: bytes) -> None:
    """RFC 2047 decoding of any repeated piece."""
    assert growth(decode_words, as_text(repeated(unit))) < MAX_GROWTH


@HOSTILE
@given(units)
def test_uuencode_and_base64_finders_grow_linearly(unit: bytes) -> None:
    """The uuencode, yEnc and BinHex block finders (BinHex forks read whole), the
    undeclared base64 finders and the boundary rediscovery, on any repeated piece."""

    def find_all(data: bytes) -> None:
        list(uu_blocks(data))
        list(yenc_blocks(data))
        for _, fork in binhex_files(data):
            fork.read()
        list(base64_runs(data))
        list(undeclared_base64(data))
        rediscovered(data)

    assert growth(find_all, repeated(unit)) < MAX_GROWTH


@HOSTILE
@given(units)
def test_decoders_grow_linearly(unit: bytes) -> None:
    """Every reading of base64 and of quoted-printable, and yEnc decoding, of any
    repeated piece."""

    def decode_all(data: bytes) -> None:
        list(base64_readings(data))
        list(quoted_printable_readings(data))
        decode_yenc(data)

    assert growth(decode_all, repeated(unit)) < MAX_GROWTH


@HOSTILE
@given(units)
def test_engine_answers_grow_linearly(unit: bytes) -> None:
    """clamd's reply lines and a scanning command's output (which can name the
    message's files), made of any repeated piece."""
    pattern = re.compile(DEFAULT_THREAT_PATTERN, re.MULTILINE)

    def read_answers(data: bytes) -> None:
        classify(Reply((data.decode("latin-1"),), b""), "clamd")
        find_threats(pattern, data)

    assert growth(read_answers, repeated(unit)) < MAX_GROWTH


def test_message_sized_pieces_are_scanned_whole() -> None:
    """A sanity check of the measure: a message of repeated ordinary lines scans
    clean, its growth is linear."""
    make = repeated(b"Hello Bob, this is an ordinary line of text.\r\n", b"Subject: x\r\n\r\n")
    assert scan(make(SMALL)) == ScanResult.clean("builtin")
    assert growth(scan, make) < MAX_GROWTH


def test_regression_long_folded_header_is_split_in_linear_time() -> None:
    """A header field of continuation lines (a 1 MB header section of them took
    7 s) is split into fields in time linear in its size."""
    from smtpguard import rewrite

    assert growth(rewrite.fields, repeated(b" x\r\n", prefix=b"X-Long: a\r\n")) < MAX_GROWTH


def test_regression_long_encoded_subject_is_decoded_in_linear_time() -> None:
    """A Subject of many encoded words (1 MB took 12 s) is decoded for notices in
    time linear in its size, and decoded right."""
    from smtpguard import rewrite

    make = repeated(b" =?utf-8?q?a?=", prefix=b"Subject:", suffix=b"\r\n")
    assert rewrite.subject(make(100)) == "a" * len(make(100)[len(b"Subject:") : -2].split())
    assert growth(rewrite.subject, make) < MAX_GROWTH
