"""The built-in scanner: MIME decoding, uuencode, attached messages and zip archives
within limits, the EICAR test file and the user's digests and byte patterns; its
thread and deadline; its configuration; and end to end through the proxy."""

from __future__ import annotations

import base64
import binascii
import email.policy
import hashlib
import io
import random
import re
import smtplib
import sys
import threading
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from email.message import Message as EmailMessage
from email.parser import BytesFeedParser
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock

from smtpguard import config as configuration
from smtpguard import replies, tap
from smtpguard.config import ConfigError
from smtpguard.envelope import Client, Envelope
from smtpguard.plugins.bundled import builtin as builtin_plugin
from smtpguard.results import ErrorKind, ScanResult, Threat, Verdict
from smtpguard.scanners import mimeparse, streams
from smtpguard.scanners.builtin import EICAR, EICAR_NAME, BuiltinScanner
from smtpguard.scanners.decoders import base64_size, base64_text, decode_base64, decode_base64_text
from smtpguard.scanners.inline import base64_runs
from smtpguard.scanners.mimewalk import CHUNK_SIZE, Entity, Limits, parse
from smtpguard.scanners.readings import EMAIL_PACKAGE
from smtpguard.scanners.signatures import (
    MAX_BASE64_PATTERNS,
    Inspection,
    Matcher,
    Pattern,
    SignatureError,
    Signatures,
    parse_pattern,
)
from smtpguard.spool import Message, Spool
from tests.conftest import SmtpSink

ENVELOPE = Envelope(Client("192.0.2.1", 4321, helo="client.example"), "alice@example.org")
SENDER = "alice@example.org"
RECIPIENT = "bob@example.net"


# -- building messages ----------------------------------------------------------------


def spooled(data: bytes, memory_limit: int = 1024 * 1024) -> Message:
    spool = Spool(0, memory_limit=memory_limit)
    spool.write(data)
    return spool.finish()


def scan(data: bytes, **options: Any) -> ScanResult:
    return BuiltinScanner(**options).scan_now(spooled(data))


def b64(data: bytes, line: int = 76) -> bytes:
    encoded = base64.b64encode(data)
    return b"".join(encoded[i : i + line] + b"\r\n" for i in range(0, len(encoded), line))


def uuencoded(data: bytes) -> bytes:
    """``data`` as uuencoded lines (without the begin and end lines)."""
    return b"".join(binascii.b2a_uu(data[i : i + 45]).replace(b"\n", b"\r\n") for i in range(0, len(data), 45))


def headers(content_type: bytes = b"text/plain", encoding: bytes | None = None, name: bytes | None = None) -> bytes:
    lines = b"Content-Type: " + content_type + (b'; name="' + name + b'"' if name else b"") + b"\r\n"
    if name:
        lines += b'Content-Disposition: attachment; filename="' + name + b'"\r\n'
    if encoding is not None:
        lines += b"Content-Transfer-Encoding: " + encoding + b"\r\n"
    return lines


def attachment(data: bytes, name: bytes, content_type: bytes = b"application/octet-stream") -> bytes:
    return headers(content_type, b"base64", name) + b"\r\n" + b64(data)


def multipart(*parts: bytes, boundary: bytes = b"=_boundary_1", subtype: bytes = b"mixed") -> bytes:
    """A multipart entity (headers and body), its parts given with their own headers."""
    body = b"".join(b"--" + boundary + b"\r\n" + part + (b"" if part.endswith(b"\r\n") else b"\r\n") for part in parts)
    return (
        b"Content-Type: multipart/"
        + subtype
        + b'; boundary="'
        + boundary
        + b'"\r\n\r\n'
        + body
        + b"--"
        + boundary
        + b"--\r\n"
    )


def mail(entity: bytes) -> bytes:
    """A whole message: a few top headers, then ``entity`` (its own headers and body)."""
    return f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: test\r\nMIME-Version: 1.0\r\n".encode() + entity


def text(body: bytes = b"Hello Bob.\r\n") -> bytes:
    return headers() + b"\r\n" + body


def zipped(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def nested_zips(layers: int, innermost: dict[str, bytes]) -> bytes:
    """``layers`` zip archives, each the only member (layerN.zip) of the next."""
    archive = zipped(innermost)
    for layer in range(layers - 1, 0, -1):
        archive = zipped({f"layer{layer}.zip": archive})
    return archive


def encrypted_zip(name: str, data: bytes) -> bytes:
    """A zip whose stored member has the "encrypted" flag (bit 0) set in its local and
    central headers: zipfile cannot write real encryption, and the flag is what
    readers go by."""
    archive = bytearray(zipped({name: data}, zipfile.ZIP_STORED))
    local = archive.find(b"PK\x03\x04")
    central = archive.find(b"PK\x01\x02")
    archive[local + 6] |= 0x1
    archive[central + 8] |= 0x1
    return bytes(archive)


def infected(*threats: tuple[str, str]) -> ScanResult:
    return ScanResult.infected(tuple(Threat(name, file) for name, file in threats), "builtin")


def eicar_in(file: str) -> ScanResult:
    return infected((EICAR_NAME, file))


def failed_with(result: ScanResult) -> ErrorKind | None:
    assert result.verdict is Verdict.ERROR, result
    return result.error


# -- clean and EICAR ------------------------------------------------------------------


def test_clean_multipart_message_is_clean() -> None:
    """A text body and an ordinary attachment: clean."""
    message = mail(multipart(text(), attachment(b"%PDF-1.4 nothing to see\r\n" * 100, b"report.pdf")))
    assert scan(message) == ScanResult.clean("builtin")


def test_eicar_in_plain_body() -> None:
    """EICAR in the body of a plain (non-MIME) message is found in "(body)"."""
    assert scan(b"Subject: eicar\r\n\r\n" + EICAR + b"\r\n") == eicar_in("(body)")


def test_eicar_base64_attachment_is_found_under_its_file_name() -> None:
    """A base64 attachment named eicar.com carrying EICAR: the threat names the file."""
    message = mail(multipart(text(), attachment(EICAR, b"eicar.com")))
    assert EICAR not in message
    assert scan(message) == eicar_in("eicar.com")


def test_eicar_quoted_printable_with_a_soft_break_in_the_middle() -> None:
    """Quoted-printable with a soft line break splitting the string: decoded, then found."""
    encoded = EICAR[:30] + b"=\r\n" + EICAR[30:].replace(b"=", b"=3D") + b"\r\n"
    message = mail(multipart(headers(b"text/plain", b"quoted-printable", b"eicar.txt") + b"\r\n" + encoded))
    assert EICAR not in message
    assert scan(message) == eicar_in("eicar.txt")


def test_eicar_uuencoded_part() -> None:
    """A part with Content-Transfer-Encoding x-uuencode is uudecoded."""
    body = b"begin 644 eicar.com\r\n" + uuencoded(EICAR) + b"`\r\nend\r\n"
    message = mail(
        multipart(text(), headers(b"application/octet-stream", b"x-uuencode", b"eicar.com") + b"\r\n" + body)
    )
    assert scan(message) == eicar_in("eicar.com")


def test_eicar_uuencoded_block_inside_a_text_body() -> None:
    """A "begin 644 name" ... "end" block in a plain-text body is decoded and named
    after its begin line."""
    body = b"Here it is:\r\n\r\nbegin 644 eicar.com\r\n" + uuencoded(EICAR) + b"`\r\nend\r\n\r\nBye.\r\n"
    assert scan(b"Subject: uu\r\n\r\n" + body) == eicar_in("eicar.com")


def test_eicar_inside_a_zip_attachment() -> None:
    """EICAR compressed in a zip attachment: found as "archive.zip/member"."""
    message = mail(multipart(text(), attachment(zipped({"docs/eicar.com": EICAR}), b"files.zip", b"application/zip")))
    assert scan(message) == eicar_in("files.zip/docs/eicar.com")


def test_eicar_inside_a_zip_inside_a_zip() -> None:
    """A zip in a zip: the path names both layers."""
    inner = zipped({"eicar.com": EICAR})
    outer = zipped({"readme.txt": b"nothing\r\n", "inner.zip": inner})
    message = mail(multipart(text(), attachment(outer, b"outer.zip")))
    assert scan(message) == eicar_in("outer.zip/inner.zip/eicar.com")


def test_zip_found_by_its_magic_whatever_its_name_and_type() -> None:
    """An attachment named like a document and typed octet-stream that is a zip is opened."""
    message = mail(multipart(text(), attachment(zipped({"eicar.com": EICAR}), b"invoice.pdf")))
    assert scan(message) == eicar_in("invoice.pdf/eicar.com")


def test_attached_message_inside_a_zip() -> None:
    """An .eml in a zip is parsed as a message and its own attachment decoded."""
    forwarded = mail(multipart(text(), attachment(EICAR, b"eicar.com"), boundary=b"inner"))
    message = mail(multipart(text(), attachment(zipped({"forwarded.eml": forwarded}), b"mail.zip")))
    assert scan(message) == eicar_in("mail.zip/forwarded.eml/eicar.com")


def test_attached_message_inside_a_zip_found_by_its_headers() -> None:
    """A zip member without .eml that starts like a mail header is parsed as a message."""
    forwarded = b"Received: from x\r\n" + mail(multipart(text(), attachment(EICAR, b"eicar.com"), boundary=b"in"))
    message = mail(multipart(text(), attachment(zipped({"message.txt": forwarded}), b"mail.zip")))
    assert scan(message) == eicar_in("mail.zip/message.txt/eicar.com")


def test_message_rfc822_part() -> None:
    """A message/rfc822 part is walked like the message around it."""
    forwarded = mail(multipart(text(), attachment(EICAR, b"eicar.com"), boundary=b"inner"))
    message = mail(multipart(text(), b"Content-Type: message/rfc822\r\n\r\n" + forwarded))
    assert scan(message) == eicar_in("eicar.com")


def test_nested_multiparts() -> None:
    """mixed > alternative + related > attachment: the attachment is reached."""
    alternative = multipart(
        text(), headers(b"text/html") + b"\r\n<p>Hi</p>\r\n", boundary=b"b2", subtype=b"alternative"
    )
    related = multipart(text(), attachment(EICAR, b"eicar.com"), boundary=b"b3", subtype=b"related")
    message = mail(multipart(alternative, multipart(text(), related, boundary=b"b4"), boundary=b"b1"))
    assert scan(message) == eicar_in("eicar.com")


def test_deeply_nested_multiparts_cost_no_depth() -> None:
    """Twenty multiparts inside each other (each a layer of MIME, not an archive) with
    the default limits: the attachment at the bottom is found."""
    entity = attachment(EICAR, b"eicar.com")
    for level in range(20):
        entity = multipart(entity, boundary=b"level%d" % level)
    assert scan(mail(entity)) == eicar_in("eicar.com")


def test_multipart_nesting_too_deep_to_parse_is_a_decompress_layer_error() -> None:
    """3000 multiparts inside each other overflow the parser's recursion: decompress-layer,
    not an exception."""
    message = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (n, n) for n in range(3000))
    result = scan(message + b"Content-Type: text/plain\r\n\r\nhello\r\n")
    assert result == ScanResult.failed(ErrorKind.DECOMPRESS_LAYER, "nested too deeply to parse", "builtin")


def test_eicar_in_a_message_too_deep_to_parse_is_still_found() -> None:
    """The raw search still runs when parsing gave up."""
    message = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (n, n) for n in range(3000))
    assert scan(message + b"Content-Type: text/plain\r\n\r\n" + EICAR + b"\r\n") == eicar_in("(message)")


def test_empty_message_is_clean() -> None:
    """Zero bytes: clean."""
    assert scan(b"") == ScanResult.clean("builtin")


def test_control_characters_in_a_file_name_are_replaced() -> None:
    """A file name with control characters is reported with "?" in their place."""
    message = b'Subject: x\r\nContent-Type: application/octet-stream; name="a\x01b\x7f.com"\r\n\r\n' + EICAR
    assert scan(message) == eicar_in("a?b?.com")


def test_multipart_whose_boundary_parameter_does_not_match_its_body() -> None:
    """The header says one boundary, the body uses another: the body's is used."""
    message = mail(multipart(text(), attachment(EICAR, b"eicar.com"), boundary=b"real"))
    message = message.replace(b'boundary="real"', b'boundary="announced"')
    assert scan(message) == eicar_in("eicar.com")


def test_multipart_without_a_boundary_parameter() -> None:
    """No boundary parameter at all: the body's boundary is found and used."""
    message = mail(multipart(text(), attachment(EICAR, b"eicar.com"), boundary=b"real")).replace(
        b'; boundary="real"', b""
    )
    assert scan(message) == eicar_in("eicar.com")


def test_multipart_without_a_closing_boundary() -> None:
    """The closing boundary is missing (a truncated message): the parts before are scanned."""
    message = mail(multipart(text(), attachment(EICAR, b"eicar.com"), boundary=b"b")).replace(b"--b--\r\n", b"")
    assert scan(message) == eicar_in("eicar.com")


def test_part_without_content_transfer_encoding_carrying_raw_bytes() -> None:
    """A part with no Content-Transfer-Encoding is taken as it is (7bit)."""
    message = mail(multipart(text(), headers(b"application/octet-stream", None, b"eicar.com") + b"\r\n" + EICAR))
    assert scan(message) == eicar_in("eicar.com")


def test_part_without_content_transfer_encoding_carrying_base64() -> None:
    """A part whose base64 lost its Content-Transfer-Encoding header is decoded anyway."""
    message = mail(multipart(text(), headers(b"application/octet-stream", None, b"eicar.com") + b"\r\n" + b64(EICAR)))
    assert scan(message) == eicar_in("eicar.com")


@pytest.mark.parametrize("encoding", [b"BaSe64", b"BASE64", b" base64 ", b'"base64"'])
def test_content_transfer_encoding_in_any_case_and_spacing(encoding: bytes) -> None:
    """Content-Transfer-Encoding is matched case-insensitively, spaces and quotes aside."""
    part = headers(b"application/octet-stream", encoding, b"eicar.com") + b"\r\n" + b64(EICAR)
    assert scan(mail(multipart(text(), part))) == eicar_in("eicar.com")


def test_eicar_split_across_base64_lines() -> None:
    """Base64 in 8-character lines: no line holds more than a sliver of the string;
    it is decoded before matching."""
    message = mail(
        multipart(text(), headers(b"application/octet-stream", b"base64", b"e.com") + b"\r\n" + b64(EICAR, 8))
    )
    assert scan(message) == eicar_in("e.com")


def test_concatenated_base64_is_not_cut_at_the_first_padding() -> None:
    """Base64 whose first encoding ends in padding and then goes on: the rest is decoded too."""
    encoded = b64(b"harmless preamble") + b64(EICAR)
    assert encoded.split(b"\r\n")[0].endswith(b"=")
    message = mail(multipart(text(), headers(b"application/octet-stream", b"base64", b"two.bin") + b"\r\n" + encoded))
    assert scan(message) == eicar_in("two.bin")


def test_eicar_in_a_header_is_found_in_the_raw_message() -> None:
    """Headers are not files, but the raw message is searched for EICAR too, so no
    structure can hide the test file."""
    message = b"Subject: hi\r\nX-Test: " + EICAR + b"\r\n\r\nHello.\r\n"
    assert scan(message) == eicar_in("(message)")


def test_the_same_threat_in_the_raw_message_is_named_once() -> None:
    """EICAR in the body is also in the raw message: one threat, the body's."""
    assert scan(b"Subject: hi\r\n\r\n" + EICAR + b"\r\n").threats == (Threat(EICAR_NAME, "(body)"),)


def test_every_infected_file_is_named() -> None:
    """Two attachments with EICAR: both are named."""
    message = mail(multipart(attachment(EICAR, b"a.com"), attachment(EICAR, b"b.com")))
    assert scan(message) == infected((EICAR_NAME, "a.com"), (EICAR_NAME, "b.com"))


def test_rfc2047_encoded_file_name_is_decoded() -> None:
    """An attachment name in RFC 2047 encoded words is reported decoded."""
    message = mail(multipart(attachment(EICAR, b"=?utf-8?b?w6lpY2FyLmNvbQ==?=")))
    assert scan(message) == eicar_in("\u00e9icar.com")


# -- limits and errors ------------------------------------------------------------------


def test_zips_nested_as_deep_as_the_limit_are_opened() -> None:
    """Eight zips inside each other (the default max_depth): the innermost member is found."""
    message = mail(multipart(text(), attachment(nested_zips(8, {"eicar.com": EICAR}), b"layer0.zip")))
    path = "layer0.zip/" + "".join(f"layer{n}.zip/" for n in range(1, 8)) + "eicar.com"
    assert scan(message) == eicar_in(path)


def test_zips_nested_beyond_the_limit_are_a_decompress_layer_error() -> None:
    """Nine zips inside each other with max_depth 8: decompress-layer."""
    message = mail(multipart(text(), attachment(nested_zips(9, {"note.txt": b"hello"}), b"layer0.zip")))
    result = scan(message)
    assert failed_with(result) is ErrorKind.DECOMPRESS_LAYER
    assert (
        result.detail == "layer0.zip/" + "/".join(f"layer{n}.zip" for n in range(1, 9)) + ": more than 8 nested layers"
    )


def test_zip_in_zip_beyond_a_configured_depth() -> None:
    """max_depth 1: a zip attachment is opened, the zip inside it is not."""
    message = mail(multipart(attachment(zipped({"inner.zip": zipped({"a.txt": b"a"})}), b"outer.zip")))
    assert failed_with(scan(message, limits=Limits(max_depth=1))) is ErrorKind.DECOMPRESS_LAYER


def test_attached_messages_beyond_the_depth_limit() -> None:
    """message/rfc822 parts count as layers too."""
    entity = text()
    for _ in range(3):
        entity = b"Content-Type: message/rfc822\r\n\r\nSubject: fwd\r\n" + entity
    assert failed_with(scan(mail(entity), limits=Limits(max_depth=2))) is ErrorKind.DECOMPRESS_LAYER


def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of what every decompressing read returns, from now on."""
    inflated: list[int] = []
    read = streams.Decompressing.read

    def counted(reader: streams.Decompressing, size: int = -1) -> bytes:
        data = read(reader, size)
        inflated.append(len(data))
        return data

    monkeypatch.setattr(streams.Decompressing, "read", counted)
    return inflated


@pytest.fixture(scope="module")
def zip_bomb() -> bytes:
    """200 MiB of zeros in one deflated member (about 200 KiB)."""
    buffer = io.BytesIO()
    zeros = bytes(1024 * 1024)
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive, archive.open("zeros.bin", "w") as member:
        for _ in range(200):
            member.write(zeros)
    return buffer.getvalue()


def test_zip_bomb_is_a_content_size_error_after_inflating_only_the_limit(
    zip_bomb: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 MiB of zeros compressed: content-size as soon as the bytes decoded pass
    100 MiB (the default), inflated a chunk (256 KiB) at a time and never a chunk
    more, without holding the expanded data."""
    inflated = count_reads(monkeypatch)
    message = spooled(mail(multipart(text(), attachment(zip_bomb, b"bomb.zip"))))
    tracemalloc.start()
    try:
        result = BuiltinScanner().scan_now(message)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert failed_with(result) is ErrorKind.CONTENT_SIZE
    assert result.detail == "bomb.zip/zeros.bin: more than 104857600 bytes decoded"
    # The decoded attachment (the archive itself) counts towards the limit too.
    chunks_to_pass_the_limit = (Limits().max_expanded_size - len(zip_bomb)) // CHUNK_SIZE + 1
    assert inflated == [CHUNK_SIZE] * chunks_to_pass_the_limit
    assert peak < 32 * 1024 * 1024


def declaring(archive: bytes, size: int) -> bytes:
    """``archive`` with its (one) member's uncompressed size rewritten to ``size`` in
    the local and central headers."""
    lying = bytearray(archive)
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = lying.find(signature) + offset
        lying[at : at + 4] = size.to_bytes(4, "little")
    return bytes(lying)


def test_zip_member_declaring_a_huge_size_is_judged_by_what_it_holds() -> None:
    """A member that declares 200 MiB but inflates to 1 KiB, under a 1 MiB limit: clean
    (the declared size is never counted)."""
    archive = declaring(zipped({"small.txt": b"s" * 1024}), 200 * 1024 * 1024)
    message = mail(multipart(attachment(archive, b"liar.zip")))
    assert scan(message, limits=Limits(max_expanded_size=1024 * 1024)) == ScanResult.clean("builtin")


def test_zip_member_inflating_past_its_declared_size_is_corrupt() -> None:
    """A member that declares 10 bytes but holds 2 MiB: corrupt-file (reading stops at the
    declared size, whose CRC-32 then fails), not 2 MiB of work."""
    archive = declaring(zipped({"small.txt": bytes(2 * 1024 * 1024)}), 10)
    result = scan(mail(multipart(attachment(archive, b"liar.zip"))))
    assert result == ScanResult.failed(
        ErrorKind.CORRUPT_FILE, "liar.zip/small.txt: Bad CRC-32 for file 'small.txt'", "builtin"
    )


def test_too_many_parts_is_a_content_size_error() -> None:
    """More parts than max_parts: content-size."""
    message = mail(multipart(*(text(b"part %d\r\n" % n) for n in range(20))))
    result = scan(message, limits=Limits(max_parts=10))
    assert failed_with(result) is ErrorKind.CONTENT_SIZE
    assert result.detail == "(body): more than 10 parts"


def test_too_many_zip_members_is_a_content_size_error() -> None:
    """A zip with more members than max_parts: content-size."""
    archive = zipped({f"f{n}.txt": b"x" for n in range(50)})
    assert failed_with(scan(mail(multipart(attachment(archive, b"many.zip"))), limits=Limits(max_parts=20))) is (
        ErrorKind.CONTENT_SIZE
    )


def test_decoded_size_beyond_the_limit_is_a_content_size_error() -> None:
    """Base64 decoding to more than max_expanded_size: content-size."""
    message = mail(multipart(attachment(bytes(300_000), b"big.bin")))
    assert failed_with(scan(message, limits=Limits(max_expanded_size=100_000))) is ErrorKind.CONTENT_SIZE


def test_encrypted_zip_member_is_password_protected() -> None:
    """A member with the encryption flag set: password-protected, naming the member."""
    message = mail(multipart(text(), attachment(encrypted_zip("secret.doc", b"who knows"), b"secret.zip")))
    result = scan(message)
    assert result == ScanResult.failed(
        ErrorKind.PASSWORD_PROTECTED, "secret.zip/secret.doc: encrypted archive member", "builtin"
    )


def test_infection_elsewhere_wins_over_an_error() -> None:
    """An encrypted archive and an EICAR attachment: infected (an answer beats a doubt)."""
    message = mail(multipart(attachment(encrypted_zip("secret.doc", b"x"), b"secret.zip"), attachment(EICAR, b"e.com")))
    assert scan(message) == eicar_in("e.com")


def test_zip_with_a_bad_crc_is_corrupt() -> None:
    """A stored member whose bytes no longer match its CRC-32: corrupt-file."""
    archive = zipped({"note.txt": b"hello, this is a note"}, zipfile.ZIP_STORED).replace(b"hello", b"jello")
    result = scan(mail(multipart(attachment(archive, b"broken.zip"))))
    assert failed_with(result) is ErrorKind.CORRUPT_FILE
    assert result.detail == "broken.zip/note.txt: Bad CRC-32 for file 'note.txt'"


def test_truncated_zip_is_corrupt() -> None:
    """A zip cut in half (no central directory): corrupt-file."""
    archive = zipped({"note.txt": b"hello " * 1000})
    result = scan(mail(multipart(attachment(archive[: len(archive) // 2], b"cut.zip"))))
    assert failed_with(result) is ErrorKind.CORRUPT_FILE


def test_zip_with_undecodable_deflate_data_is_corrupt() -> None:
    """Garbage where the deflate stream should be: corrupt-file."""
    archive = bytearray(zipped({"note.txt": b"hello " * 1000}))
    start = archive.find(b"PK\x03\x04") + 30 + len("note.txt")
    archive[start : start + 8] = b"\xff" * 8
    assert failed_with(scan(mail(multipart(attachment(bytes(archive), b"bad.zip"))))) is ErrorKind.CORRUPT_FILE


def test_corrupt_zip_is_still_searched_as_a_file() -> None:
    """A zip with neither a central directory nor a readable local header, whose
    stored bytes hold EICAR: infected (its bytes are searched)."""
    archive = zipped({"eicar.com": EICAR}, zipfile.ZIP_STORED)[:-10].replace(b"PK\x03\x04", b"PK\x03\xff")
    assert scan(mail(multipart(attachment(archive, b"cut.zip")))) == eicar_in("cut.zip")


# -- the user's signatures ----------------------------------------------------------------


def test_sha256_of_an_attachment_matches() -> None:
    """A decoded attachment whose SHA-256 is listed: infected with the listed name."""
    payload = b"\x4d\x5a totally a dropper " * 50
    signatures = Signatures.build({hashlib.sha256(payload).hexdigest(): "Test.Dropper"})
    message = mail(multipart(text(), attachment(payload, b"setup.exe")))
    assert scan(message, signatures=signatures) == infected(("Test.Dropper", "setup.exe"))


def test_sha256_of_a_zip_member_matches() -> None:
    """A zip member streamed in chunks (larger than one) is hashed whole."""
    payload = bytes(range(256)) * (CHUNK_SIZE // 256 + 100)
    signatures = Signatures.build({hashlib.sha256(payload).hexdigest(): "Test.Big"})
    message = mail(multipart(attachment(zipped({"big.bin": payload}), b"big.zip")))
    assert scan(message, signatures=signatures) == infected(("Test.Big", "big.zip/big.bin"))


def test_sha256_of_an_archive_itself_matches() -> None:
    """The digest of a whole zip attachment is compared too, not only its members'."""
    archive = zipped({"a.txt": b"a"})
    signatures = Signatures.build({hashlib.sha256(archive).hexdigest(): "Test.Archive"})
    assert scan(mail(multipart(attachment(archive, b"a.zip"))), signatures=signatures) == infected(
        ("Test.Archive", "a.zip")
    )


def test_byte_pattern_matches_a_decoded_part() -> None:
    """A hex pattern found in a base64 attachment: infected with the pattern's name."""
    signatures = Signatures.build(patterns=[parse_pattern("Test.Pattern:deadbeefcafe")])
    message = mail(multipart(attachment(b"\x00" * 100 + bytes.fromhex("deadbeefcafe") + b"\x00" * 100, b"blob.bin")))
    assert scan(message, signatures=signatures) == infected(("Test.Pattern", "blob.bin"))


def test_literal_pattern_matches_a_text_body() -> None:
    """A quoted literal pattern matches text."""
    signatures = Signatures.build(patterns=[parse_pattern('Test.Phrase:"powershell -enc"')])
    assert scan(b"Subject: x\r\n\r\nrun powershell -enc AAAA\r\n", signatures=signatures) == infected(
        ("Test.Phrase", "(body)")
    )


def test_pattern_across_a_chunk_boundary_of_a_zip_member() -> None:
    """A stored zip member read in chunks, the pattern straddling the first boundary: found."""
    pattern = b"STRADDLING-PATTERN"
    payload = b"a" * (CHUNK_SIZE - 7) + pattern + b"b" * 1000
    signatures = Signatures.build(patterns=[Pattern("Test.Straddle", pattern)])
    message = mail(multipart(attachment(zipped({"s.bin": payload}, zipfile.ZIP_STORED), b"s.zip")))
    assert scan(message, signatures=signatures) == infected(("Test.Straddle", "s.zip/s.bin"))


def test_matcher_finds_a_pattern_split_at_every_position() -> None:
    """Fed in two pieces split anywhere, or byte by byte, the matcher finds the pattern once."""
    data = b"0123456789" + EICAR + b"abcdef"
    for cut in range(len(data) + 1):
        found: list[Threat] = []
        matcher = Matcher(Signatures(), "f", found)
        matcher.update(data[:cut])
        matcher.update(data[cut:])
        matcher.close()
        assert found == [Threat(EICAR_NAME, "f")], cut
    found = []
    matcher = Matcher(Signatures(), "f", found)
    for byte in data:
        matcher.update(bytes([byte]))
    assert found == [Threat(EICAR_NAME, "f")]


def test_raw_message_search_across_spool_chunks() -> None:
    """EICAR in a header, straddling the spool's 256 KiB read boundary: found."""
    filler = b"X-Filler: " + b"f" * (256 * 1024 - 10 - 20) + b"\r\n"
    message = filler + b"X-Test: " + EICAR + b"\r\n\r\nbody\r\n"
    assert message.find(EICAR) < 256 * 1024 < message.find(EICAR) + len(EICAR)
    assert scan(message) == eicar_in("(message)")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("Test.Hex:DEADbeef", Pattern("Test.Hex", b"\xde\xad\xbe\xef")),
        ('Test.Text:"a:b c"', Pattern("Test.Text", b"a:b c")),
        ("Test.Ndb:0:*:41424344", Pattern("Test.Ndb", b"ABCD")),
    ],
)
def test_pattern_line_forms(line: str, expected: Pattern) -> None:
    """NAME:HEX, NAME:"TEXT" and the .ndb form NAME:TARGET:*:HEX."""
    assert parse_pattern(line) == expected


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("Test:abc", "Test: 'abc' is not an even number of hex digits (wildcards are not supported)"),
        ("Test:0:*:41??42", "Test: '41??42' is not an even number of hex digits (wildcards are not supported)"),
        ("Test:0:100:41424344", "Test: only patterns at any offset (*) are supported, got '100'"),
        ("Test:4142", "Test: a pattern needs at least 4 bytes"),
        ("no-colon", "'no-colon' is not NAME:PATTERN"),
    ],
)
def test_bad_pattern_lines(line: str, problem: str) -> None:
    """Each unusable pattern line is refused with the reason."""
    with pytest.raises(SignatureError) as raised:
        parse_pattern(line)
    assert str(raised.value) == problem


# -- never raises -------------------------------------------------------------------------

_FRAGMENTS = [
    b"Content-Type: multipart/mixed; boundary=b\r\n",
    b"Content-Type: multipart/mixed\r\n",
    b'Content-Type: multipart/alternative; boundary="b"\r\n',
    b"Content-Type: message/rfc822\r\n",
    b"Content-Type: application/zip; name=a.zip\r\n",
    b"Content-Transfer-Encoding: base64\r\n",
    b"Content-Transfer-Encoding: quoted-printable\r\n",
    b"Content-Transfer-Encoding: x-uuencode\r\n",
    b"Content-Disposition: attachment; filename*=utf-8''%E9%ZZ.zip\r\n",
    b"Content-Type: text/plain; name==?utf-8?q?=ZZ?=\r\n",
    b"\r\n",
    b"--b\r\n",
    b"--b--\r\n",
    b"begin 644 x.bin\r\n",
    b"M86)C9&5F\r\n",
    b"end\r\n",
    b"=\r\n",
    b"=ZZ=4\r\n",
    b"UEsDBBQAAAAIAA==\r\n",
    b"PK\x03\x04\x14\x00\x00\x00\x08\x00",
    b"\xff\xfe\x00\x80",
    b"X-Header: value\r\n",
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_random_bytes_never_raise(data: bytes) -> None:
    """Any bytes at all: a ScanResult, never an exception."""
    assert isinstance(scan(data), ScanResult)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=60), st.integers(min_value=1, max_value=4))
def test_malformed_mime_never_raises(fragments: list[bytes], depth: int) -> None:
    """Shuffled MIME headers, boundaries, encodings and archive bytes: a ScanResult,
    never an exception."""
    result = scan(b"".join(fragments), limits=Limits(max_depth=depth, max_parts=50))
    assert isinstance(result, ScanResult)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=400), st.integers(min_value=0, max_value=400))
def test_damaged_zip_never_raises(noise: bytes, at: int) -> None:
    """A zip attachment with bytes overwritten anywhere: a ScanResult, never an exception."""
    archive = bytearray(zipped({"a.txt": b"hello " * 50, "b.zip": zipped({"c.txt": b"c"})}))
    archive[at : at + len(noise)] = noise
    assert isinstance(scan(mail(multipart(attachment(bytes(archive), b"x.zip")))), ScanResult)


# -- the parser and the base64 heuristic, against their references ------------------------

# The lines a MIME parser decides on: header fields, boundaries of two nested
# multiparts (and near misses), attached messages, delivery-status blocks, digests,
# misplaced envelope lines, 8-bit bytes and parameters that cannot be boundaries.
_LINES = [
    b"Content-Type: multipart/mixed; boundary=a",
    b'Content-Type: multipart/alternative; boundary="b"',
    b"Content-Type: multipart/digest; boundary=a",
    b"Content-Type: multipart/mixed",
    b'Content-Type: multipart/mixed; boundary=""',
    b"Content-Type: multipart/mixed; boundary*=utf-8''%C3%A9",
    b'Content-Type: multipart/mixed; boundary="\xe9"',
    b"Content-Type: message/rfc822",
    b"Content-Type: message/delivery-status",
    b"Content-Type: text/plain",
    b"Content-Transfer-Encoding: base64",
    b"Subject: x",
    b"X-8bit: caf\xe9",
    b" continued",
    b"\tcontinued",
    b": no name",
    b"From someone Mon Nov 30 10:00:00 2026",
    b"",
    b"--a",
    b"--a--",
    b"--a \t",
    b"--a-- ",
    b"--a x",
    b"--ab",
    b"--b",
    b"--b--",
    b"--\xe9",
    b"--",
    b"----",
    b"-- ",
    b"- x",
    b"hello",
    b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldY",
    b"\xff\xfe\x00",
    b"begin 644 x.bin",
]
_LINE_ENDS = [b"\r\n", b"\n", b"\r", b""]


def feed_parsed(data: bytes, chunk: int) -> EmailMessage:
    """The email package's parse of ``data``, fed ``chunk`` bytes at a time."""
    parser = BytesFeedParser(policy=email.policy.compat32)
    for start in range(0, len(data), chunk):
        parser.feed(data[start : start + chunk])
    return parser.close()


def feed_tree(message: EmailMessage) -> tuple[Any, ...]:
    """What the walk uses of a parsed message: fields, default type and the body's
    bytes (as the parser holds them, not get_payload()'s charset-decoded text) or parts."""
    payload = message._payload  # the raw form: get_payload() decodes 8-bit text with its charset
    if isinstance(payload, list):
        body: Any = [feed_tree(part) for part in payload]
    else:
        body = (payload or "").encode("ascii", "surrogateescape")
    return (message.items(), message.get_default_type(), message.get_unixfrom(), body)


def entity_tree(entity: Entity) -> tuple[Any, ...]:
    body: Any = [entity_tree(part) for part in entity.parts] if entity.parts is not None else entity.body
    return (entity.fields.items(), entity.fields.get_default_type(), entity.fields.get_unixfrom(), body)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.sampled_from(_LINES), st.sampled_from(_LINE_ENDS)), max_size=40),
    st.integers(min_value=1, max_value=40),
)
def test_parser_splits_malformed_mime_as_the_email_package_does(lines: list[tuple[bytes, bytes]], chunk: int) -> None:
    """Lines of MIME structure in any order, with any line ends: the parser, reading
    the email package's way, finds the same entities, fields and body bytes as
    email.feedparser (fed in chunks); and so does the RFC reading, unless it notes
    that the email package reads a boundary otherwise (given plain and RFC 2231)."""
    data = b"".join(line + end for line, end in lines)
    fed = feed_tree(feed_parsed(data, chunk))
    assert entity_tree(parse(data, reading=EMAIL_PACKAGE)) == fed
    rfc = parse(data)
    assert EMAIL_PACKAGE in rfc.readings or entity_tree(rfc) == fed


def nested_mime(draw: random.Random, level: int = 0) -> list[bytes]:
    """The lines of a MIME entity: multiparts (boundaries reused and mistyped, some
    never closed), attached messages, delivery-status blocks and text, nested up to
    five deep; header sections without their empty line now and then."""
    lines = [b"From x"] if draw.random() < 0.1 else []
    kind = draw.random() if level < 5 else 1.0
    boundary = draw.choice([b"a", b"b", b"", b"a b", b"\xe9"])
    if kind < 0.45:
        subtype = draw.choice([b"mixed", b"digest", b"alternative"])
        parameter = b'; boundary="' + boundary + b'"' if draw.random() < 0.9 else b""
        lines.append(b"Content-Type: multipart/" + subtype + parameter)
    elif kind < 0.6:
        lines.append(draw.choice([b"Content-Type: message/rfc822", b"Content-Type: message/delivery-status"]))
    elif kind < 0.8:
        lines.append(b"Content-Type: text/plain")
    lines += [draw.choice([b"Subject: x", b" continued", b"X: \xff", b"From y"]) for _ in range(draw.randint(0, 2))]
    if draw.random() < 0.9:
        lines.append(b"")
    if kind < 0.45:
        lines += [draw.choice([b"preamble", b"", b"--x"]) for _ in range(draw.randint(0, 2))]
        for _ in range(draw.randint(0, 3)):
            delimiter = boundary if draw.random() < 0.85 else draw.choice([b"a", b"b"])
            lines.append(b"--" + delimiter + draw.choice([b"", b"", b" ", b"--"]))
            lines += nested_mime(draw, level + 1)
        if draw.random() < 0.7:
            lines.append(b"--" + boundary + b"--")
        lines += [draw.choice([b"epilogue", b""]) for _ in range(draw.randint(0, 2))]
    elif kind < 0.6 and draw.random() < 0.5:
        lines += nested_mime(draw, level + 1)
    else:
        lines += [
            draw.choice([b"hello", b"", b"-- ", b"--a", b"Status: 5.0.0", b"\xff"]) for _ in range(draw.randint(0, 4))
        ]
    return lines


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False), st.sampled_from([[b"\r\n"], [b"\n"], [b"\r\n", b"\n", b"\r"]]))
def test_parser_splits_nested_mime_as_the_email_package_does(draw: random.Random, ends: list[bytes]) -> None:
    """Nested multiparts and messages, damaged: the same tree as email.feedparser's."""
    lines = nested_mime(draw)
    for _ in range(draw.randint(0, 2)):
        if lines:
            del lines[draw.randrange(len(lines))]
    data = b"".join(line + draw.choice(ends) for line in lines)
    assert entity_tree(parse(data)) == feed_tree(feed_parsed(data, draw.randint(1, 60)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_parser_splits_random_bytes_as_the_email_package_does(data: bytes) -> None:
    """Any bytes at all: the same tree as email.feedparser's."""
    assert entity_tree(parse(data)) == feed_tree(feed_parsed(data, CHUNK_SIZE))


def test_parser_keeps_bodies_as_their_exact_bytes() -> None:
    """Bodies are the exact bytes between the boundaries, 8-bit ones included, less
    the line end that belongs to the boundary after them."""
    body = b"caf\xe9\r\n\xff\x00 binary\r\n"
    message = mail(multipart(text(), headers(b"application/octet-stream", b"binary", b"x.bin") + b"\r\n" + body))
    [first, second] = parse(message).parts or []
    assert (first.body, second.body) == (b"Hello Bob.", b"caf\xe9\r\n\xff\x00 binary")


def python_steps(parsing: Callable[[], object]) -> int:
    """The lines of mimeparse's Python code that ``parsing`` executes: the work that
    grows when a loop runs per byte or per line instead of per search.  A first,
    uncounted run fills the caches, so that only the parse itself is counted."""
    parsing()
    steps = 0

    def count(frame: Any, event: str, arg: Any) -> Any:
        nonlocal steps
        steps += event == "line"
        return count

    def calls(frame: Any, event: str, arg: Any) -> Any:
        return count if frame.f_code.co_filename == mimeparse.__file__ else None

    sys.settrace(calls)
    try:
        parsing()
    finally:
        sys.settrace(None)
    return steps


def test_parser_finds_a_boundary_after_a_line_of_megabytes_in_as_many_steps_as_after_a_short_one() -> None:
    """A part whose body is one 5 MB line, then the closing boundary: split in the
    same number of Python steps as a 50 KB line (a line end is searched for as bytes,
    never a character at a time)."""

    def line_of(size: int) -> bytes:
        return mail(multipart(headers(b"application/octet-stream", None, b"x.bin") + b"\r\n" + b"A" * size))

    huge = line_of(5_000_000)
    [part] = parse(huge).parts or []
    assert part.body == b"A" * 5_000_000
    assert python_steps(lambda: parse(huge)) == python_steps(lambda: parse(line_of(50_000)))


# The run pattern as the walk first used it (finditer over the whole text).
_REFERENCE_RUN = re.compile(
    rb"^[A-Za-z0-9+/]{16,}={0,2}[ \t]*\r?(?:\n|\Z)(?:[A-Za-z0-9+/]{4,}={0,2}[ \t]*\r?(?:\n|\Z))*", re.MULTILINE
)
_RUN_PIECES = [b"QUJD", b"QUJDREVGR0hJSktMTU5P", b"=", b"==", b" ", b"\t", b"\r", b"\n", b"\r\n", b"-", b"\xe9", b"x"]


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from(_RUN_PIECES), max_size=60))
def test_base64_runs_are_the_reference_patterns_matches(pieces: list[bytes]) -> None:
    """base64_runs finds exactly the runs (24 bytes or more) that the reference
    pattern's finditer finds."""
    data = b"".join(pieces)
    expected = [run.group(0) for run in _REFERENCE_RUN.finditer(data) if run.end() - run.start() >= 24]
    assert list(base64_runs(data)) == expected


def reference_base64(data: bytes) -> bytes:
    """Lenient base64 as the walk first decoded it: junk dropped, the end's padding
    stripped, each "="-separated segment decoded on its own."""
    stripped = data.translate(
        None, bytes(set(range(256)) - set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="))
    )
    decoded = []
    for segment in re.split(rb"=+", stripped.rstrip(b"=")):
        segment = segment[:-1] if len(segment) % 4 == 1 else segment
        if segment:
            decoded.append(binascii.a2b_base64(segment + b"=" * (-len(segment) % 4)))
    return b"".join(decoded)


@settings(max_examples=1000)
@given(
    st.lists(st.sampled_from([b"QUJD", b"QQ", b"Q", b"=", b"==", b"\r\n", b" ", b"-", b"\xe9", b"\x00"]), max_size=30)
)
def test_decode_base64_is_the_reference_decoding(pieces: list[bytes]) -> None:
    """Whole groups, partial ones, padding anywhere, line ends and junk: decode_base64
    gives what the reference decoding gives."""
    data = b"".join(pieces)
    assert decode_base64(data) == reference_base64(data)


@given(st.binary(max_size=200))
def test_base64_size_is_the_decoded_size(data: bytes) -> None:
    """For base64 text without "=", base64_size is the length decode_base64_text gives."""
    text = base64_text(base64.b64encode(data) + data).replace(b"=", b"")
    assert base64_size(text) == len(decode_base64_text(text))


@settings(max_examples=500, deadline=None)
@given(
    st.binary(min_size=5, max_size=40),
    st.binary(max_size=60),
    st.binary(max_size=60),
    st.integers(min_value=0, max_value=3),
)
def test_base64_that_decodes_to_a_pattern_is_never_skipped(
    pattern: bytes, before: bytes, after: bytes, cut: int
) -> None:
    """Whatever bytes surround a pattern (and so wherever it falls in the groups of
    three), the inspection says base64 of them may match: it is decoded."""
    text = base64_text(base64.b64encode(before + pattern + after))
    text = text[: len(text) - cut] if cut and len(text) - cut > 0 else text
    inspection = Inspection(Signatures.build(patterns=[Pattern("Test.P", pattern)]))
    if pattern in decode_base64_text(text):
        assert inspection.may_match_base64(text)


def test_base64_that_cannot_decode_to_a_pattern_is_skipped() -> None:
    """smtp-source's lines (a digit and 78 X) decode to bytes without EICAR: the
    inspection says so, and they need no decoding."""
    text = base64_text(b"".join(b"%dX" % (n % 10) + b"X" * 77 + b"\r\n" for n in range(100)))
    assert not Inspection(Signatures()).may_match_base64(text)


@pytest.mark.parametrize(
    ("signatures", "why"),
    [
        (Signatures.build({hashlib.sha256(b"x").hexdigest(): "Test.Digest"}), "digests"),
        (Signatures.build(patterns=[Pattern("Test.Short", b"\x00\x01\x02\x03")]), "a 4-byte pattern"),
        (
            Signatures.build(patterns=[Pattern(f"Test.{n}", b"pattern %d" % n) for n in range(MAX_BASE64_PATTERNS)]),
            "too many patterns",
        ),
    ],
)
def test_base64_is_always_decoded_when_skipping_cannot_be_proven_safe(signatures: Signatures, why: str) -> None:
    """With digests to compare, a pattern too short to have a whole group of three
    wherever it starts, or more patterns than pay to search for: always decoded."""
    assert Inspection(signatures).may_match_base64(b"WFhYWFhYWFhYWFhYWFhYWFhY"), why


def headerless_base64(data: bytes, offset: int, line: int = 76) -> bytes:
    """A message whose text part (no Content-Transfer-Encoding) is ``offset`` bytes
    then ``data``, in base64."""
    return mail(multipart(text(), headers(b"text/plain", None, b"e.txt") + b"\r\n" + b64(b"x" * offset + data, line)))


@pytest.mark.parametrize("line", [76, 64, 17, 16])
@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_undeclared_base64_finds_eicar_wherever_it_starts_in_the_groups(offset: int, line: int) -> None:
    """EICAR behind 0 to 3 other bytes (so starting anywhere in a group of three), in
    base64 lines of 76 to 16 characters (a run starts with 16 at least), in a part
    with no Content-Transfer-Encoding: found."""
    assert scan(headerless_base64(EICAR, offset, line)) == eicar_in("e.txt")


def test_undeclared_base64_going_on_after_padding_is_decoded() -> None:
    """Undeclared base64 of two encodings one after the other (padding in between):
    decoded whole, so EICAR in the second is found."""
    part = headers(b"text/plain", None, b"e.txt") + b"\r\n" + b64(b"harmless preamble") + b64(EICAR)
    assert scan(mail(multipart(text(), part))) == eicar_in("e.txt")


def test_undeclared_base64_finds_a_short_pattern() -> None:
    """A 4-byte pattern (too short to look for in the base64 text itself) in undeclared
    base64: the run is decoded and the pattern found."""
    signatures = Signatures.build(patterns=[Pattern("Test.Short", b"\xde\xad\xbe\xef")])
    message = headerless_base64(b"padding" * 5 + b"\xde\xad\xbe\xef" + b"padding" * 5, 1)
    assert scan(message, signatures=signatures) == infected(("Test.Short", "e.txt"))


def test_undeclared_base64_is_hashed_when_there_are_digests() -> None:
    """Undeclared base64 whose decoded bytes have a listed SHA-256: found."""
    payload = b"a dropper that has no pattern in it " * 10
    signatures = Signatures.build({hashlib.sha256(payload).hexdigest(): "Test.Dropper"})
    assert scan(headerless_base64(payload, 0), signatures=signatures) == infected(("Test.Dropper", "e.txt"))


def test_skipped_base64_still_counts_toward_the_decoded_size_limit() -> None:
    """300 KB of smtp-source lines (base64-looking, nothing in them) under a 100 KB
    limit on decoded bytes: content-size, as when they were decoded."""
    body = b"".join(b"%dX" % (n % 10) + b"X" * 77 + b"\r\n" for n in range(3800))
    result = scan(b"Subject: x\r\n\r\n" + body, limits=Limits(max_expanded_size=100_000))
    assert result == ScanResult.failed(ErrorKind.CONTENT_SIZE, "(body): more than 100000 bytes decoded", "builtin")


def test_undeclared_base64_in_a_part_with_8bit_bytes_is_decoded() -> None:
    """A part without Content-Transfer-Encoding that also holds 8-bit text: its
    base64-looking lines are decoded all the same."""
    part = headers(b"text/plain; charset=latin-1", None, b"e.txt") + b"\r\nCaf\xe9 cr\xe8me.\r\n\r\n" + b64(EICAR)
    assert scan(mail(multipart(text(), part))) == eicar_in("e.txt")


def test_byte_pattern_in_an_8bit_part_is_matched_on_its_exact_bytes() -> None:
    """A binary part carrying bytes above 127: a hex pattern of them is found (the
    bytes are not read as text in the part's charset first)."""
    signatures = Signatures.build(patterns=[parse_pattern("Test.Hex:deadbeef00ff")])
    body = b"\x00\x01" + bytes.fromhex("deadbeef00ff") + b"\xfe\r\n"
    part = headers(b"application/octet-stream; charset=latin-1", b"binary", b"x.bin") + b"\r\n" + body
    assert scan(mail(multipart(text(), part)), signatures=signatures) == infected(("Test.Hex", "x.bin"))


def test_sha256_of_an_8bit_part_is_of_its_exact_bytes() -> None:
    """The SHA-256 of a binary part is that of its bytes."""
    payload = bytes(range(256)) * 4
    signatures = Signatures.build({hashlib.sha256(payload).hexdigest(): "Test.Binary"})
    part = headers(b"application/octet-stream", b"binary", b"x.bin") + b"\r\n" + payload + b"\r\n"
    assert scan(mail(multipart(text(), part)), signatures=signatures) == infected(("Test.Binary", "x.bin"))


def test_raw_zip_in_a_binary_part_is_opened() -> None:
    """A zip sent as a binary part (no base64): opened, and its member scanned."""
    part = headers(b"application/zip", b"binary", b"files.zip") + b"\r\n" + zipped({"eicar.com": EICAR}) + b"\r\n"
    assert scan(mail(multipart(text(), part))) == eicar_in("files.zip/eicar.com")


# -- speed and memory -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def five_megabytes() -> bytes:
    payload = hashlib.sha256(b"seed").digest() * (5 * 1024 * 1024 // 32)
    return mail(multipart(text(), attachment(payload, b"large.bin")))


def test_memory_stays_a_bounded_multiple_of_the_message(five_megabytes: bytes) -> None:
    """A 5 MiB base64 attachment (6.8 MB message) from a disk spool is clean, and
    scanning it allocates at most six times its size at peak.  (Its CPU time is
    benchmarks/builtin.py's "5 MB multipart" row.)"""
    message = spooled(five_megabytes)
    tracemalloc.start()
    try:
        result = BuiltinScanner().scan_now(message)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result == ScanResult.clean("builtin")
    assert peak < 6 * len(five_megabytes)


# -- threads and deadline ---------------------------------------------------------------------


def test_without_a_reactor_the_scan_fires_at_once() -> None:
    """BuiltinScanner() scans synchronously: the Deferred has already fired."""
    results: list[ScanResult] = []
    BuiltinScanner().scan(spooled(b"Subject: x\r\n\r\n" + EICAR), ENVELOPE).addCallback(results.append)
    assert results == [eicar_in("(body)")]


def test_injected_runner_runs_the_job_and_the_deadline_is_cancelled() -> None:
    """With a Clock and a runner that runs the job at once: the result, and no timer left."""
    clock = Clock()

    def run(job: Callable[[], ScanResult]) -> Deferred[ScanResult]:
        return defer.succeed(job())

    results: list[ScanResult] = []
    BuiltinScanner(clock, run_in_thread=run).scan(spooled(b"Subject: x\r\n\r\nhi\r\n"), ENVELOPE).addCallback(
        results.append
    )
    assert results == [ScanResult.clean("builtin")]
    assert clock.getDelayedCalls() == []


def test_scan_outlasting_its_timeout_is_a_timeout_and_the_job_is_told_to_stop() -> None:
    """A job still running at the timeout (60 s by default): a timeout result then, not
    before; the job, when it gets on, stops at once with a timeout of its own."""
    clock = Clock()
    held: list[Callable[[], ScanResult]] = []

    def hold(job: Callable[[], ScanResult]) -> Deferred[ScanResult]:
        held.append(job)
        return Deferred()

    results: list[ScanResult] = []
    message = spooled(mail(multipart(text(), attachment(EICAR, b"e.com"))))
    BuiltinScanner(clock, run_in_thread=hold).scan(message, ENVELOPE).addCallback(results.append)
    clock.advance(59.9)
    assert results == []
    clock.advance(0.1)
    assert results == [ScanResult.failed(ErrorKind.TIMEOUT, "no verdict within 60 s", "builtin")]
    [job] = held
    assert job() == ScanResult.failed(ErrorKind.TIMEOUT, "stopped at the deadline", "builtin")


def test_configured_timeout_applies() -> None:
    """timeout = 2.5: the deadline is 2.5 s."""
    clock = Clock()
    results: list[ScanResult] = []
    scanner = BuiltinScanner(clock, timeout=2.5, run_in_thread=lambda job: Deferred())
    scanner.scan(spooled(b"Subject: x\r\n\r\nhi\r\n"), ENVELOPE).addCallback(results.append)
    clock.advance(2.5)
    assert results == [ScanResult.failed(ErrorKind.TIMEOUT, "no verdict within 2.5 s", "builtin")]


def test_a_runner_that_raises_gives_an_other_error() -> None:
    """A runner that raises (say, a stopped thread pool): an "other" error, not an exception."""
    clock = Clock()

    def broken(job: Callable[[], ScanResult]) -> Deferred[ScanResult]:
        raise RuntimeError("thread pool stopped")

    results: list[ScanResult] = []
    BuiltinScanner(clock, run_in_thread=broken).scan(spooled(b"\r\n"), ENVELOPE).addCallback(results.append)
    assert results == [ScanResult.failed(ErrorKind.OTHER, "thread pool stopped", "builtin")]


class ThreadRecordingMessage(Message):
    """A message that notes the threads its chunks are read from."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), len(data))
        self.threads: set[str] = set()

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        self.threads.add(threading.current_thread().name)
        return super().chunks(chunk_size)


@pytest_twisted.ensureDeferred
async def test_scan_runs_off_the_reactor_thread() -> None:
    """With the real reactor the scan runs in a thread of its own: the Deferred has
    not fired when scan() returns, and the message is read off the reactor thread."""
    message = ThreadRecordingMessage(mail(multipart(text(), attachment(EICAR, b"eicar.com"))))
    scanning = BuiltinScanner(reactor).scan(message, ENVELOPE)
    assert not scanning.called
    assert await scanning == eicar_in("eicar.com")
    assert message.threads and threading.current_thread().name not in message.threads


# -- configuration ------------------------------------------------------------------------------


def build(**config: Any) -> BuiltinScanner:
    scanner = builtin_plugin.build(config, Clock())
    assert isinstance(scanner, BuiltinScanner)
    return scanner


def test_configured_limits_apply() -> None:
    """max_depth, max_parts and max_expanded_size from the table are the limits used."""
    message = mail(multipart(attachment(zipped({"inner.zip": zipped({"a.txt": b"a"})}), b"outer.zip")))
    assert failed_with(build(max_depth=1).scan_now(spooled(message))) is ErrorKind.DECOMPRESS_LAYER
    assert failed_with(build(max_parts=2).scan_now(spooled(message))) is ErrorKind.CONTENT_SIZE
    assert failed_with(build(max_expanded_size=10).scan_now(spooled(message))) is ErrorKind.CONTENT_SIZE
    assert build().scan_now(spooled(message)) == ScanResult.clean("builtin")


def test_sha256_file_and_inline_digests(tmp_path: Path) -> None:
    """sha256_file lines ("hex name", comments and blanks allowed) and inline sha256 entries both match."""
    first, second = b"first payload", b"second payload"
    listing = tmp_path / "sha256.txt"
    listing.write_text(f"# known bad\n\n{hashlib.sha256(first).hexdigest().upper()} Test.First\n")
    scanner = build(sha256_file=str(listing), sha256=[f"{hashlib.sha256(second).hexdigest()} Test.Second"])
    message = mail(multipart(attachment(first, b"1.bin"), attachment(second, b"2.bin")))
    assert scanner.scan_now(spooled(message)) == infected(("Test.First", "1.bin"), ("Test.Second", "2.bin"))


def test_patterns_file_and_inline_patterns(tmp_path: Path) -> None:
    """patterns_file (with a ClamAV .ndb line) and inline patterns both match."""
    listing = tmp_path / "patterns.ndb"
    listing.write_text("Test.Ndb:0:*:" + b"ndb-signature".hex() + "\n")
    scanner = build(patterns_file=str(listing), patterns=['Test.Inline:"inline-signature"'])
    message = mail(multipart(attachment(b"..ndb-signature..", b"1.bin"), attachment(b"inline-signature", b"2.bin")))
    assert scanner.scan_now(spooled(message)) == infected(("Test.Ndb", "1.bin"), ("Test.Inline", "2.bin"))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"max_depth": 0}, "max_depth: must be greater than 0, got 0"),
        ({"max_parts": "many"}, "max_parts: expected an integer, got 'many'"),
        ({"timeout": -1}, "timeout: must be greater than 0, got -1.0"),
        ({"sha256": ["abc Test"]}, "sha256: line 1: 'abc' is not a SHA-256 digest (64 hex digits)"),
        ({"sha256": ["0" * 64]}, "sha256: line 1: a name must follow the digest"),
        (
            {"patterns": ["Test:zz"]},
            "patterns: line 1: Test: 'zz' is not an even number of hex digits (wildcards are not supported)",
        ),
        ({"color": "blue"}, "color: unknown key"),
    ],
)
def test_configuration_errors_name_the_key(config: dict[str, Any], message: str) -> None:
    """A bad value is refused with the key and the problem."""
    with pytest.raises(ConfigError) as raised:
        build(**config)
    assert str(raised.value) == message


def test_unreadable_signature_file_is_a_configuration_error(tmp_path: Path) -> None:
    """A sha256_file that does not exist: refused, naming key and path."""
    missing = tmp_path / "missing.txt"
    with pytest.raises(ConfigError) as raised:
        build(sha256_file=str(missing))
    assert str(raised.value) == f"sha256_file: cannot read {missing}: No such file or directory"


def test_bad_line_in_a_patterns_file_names_file_and_line(tmp_path: Path) -> None:
    """A bad line in patterns_file: refused, naming key, file and line number."""
    listing = tmp_path / "patterns.txt"
    listing.write_text("# header\nTest.Good:41424344\nTest.Bad:4142\n")
    with pytest.raises(ConfigError) as raised:
        build(patterns_file=str(listing))
    assert str(raised.value) == f"patterns_file: {listing}: line 3: Test.Bad: a pattern needs at least 4 bytes"


def test_inspection_reports_container_digests_only() -> None:
    """A container's bytes are hashed but not searched: its members are."""
    inspection = Inspection(Signatures.build({hashlib.sha256(EICAR).hexdigest(): "Test.Digest"}))
    sink = inspection.container("c.zip")
    sink.update(EICAR)
    sink.close()
    assert inspection.threats == [Threat("Test.Digest", "c.zip")]


# -- end to end ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_proxy_rejects_an_eicar_attachment_with_554_571(smtp_sink: SmtpSink) -> None:
    """smtplib -> smtpguard ([[scanners]] type = "builtin", in its thread pool) ->
    smtp-sink: a base64 EICAR attachment gets 554 5.7.1 naming the threat and nothing
    reaches the sink; a clean attachment in the same session is delivered."""
    config = configuration.parse(
        {
            "server": {"hostname": "guard.test"},
            "upstream": {"endpoint": smtp_sink.endpoint},
            "scanners": [{"type": "builtin", "max_depth": 4}],
        },
        "builtin-test",
    )
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(tap.build_factory(config, reactor))
    infected_message = mail(multipart(text(), attachment(zipped({"eicar.com": EICAR}), b"eicar.zip")))
    clean_message = mail(multipart(text(), attachment(b"just a report\r\n", b"report.txt")))

    def session() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", port.getHost().port, local_hostname="client.example", timeout=20) as client:
            client.ehlo()
            client.mail(SENDER)
            client.rcpt(RECIPIENT)
            first = client.data(infected_message)
            client.mail(SENDER)
            client.rcpt(RECIPIENT)
            second = client.data(clean_message)
            return first, second

    try:
        first, second = await threads.deferToThread(session)
    finally:
        await port.stopListening()
    rejected = replies.VIRUS_REJECTED.with_text(f"Message rejected: virus found ({EICAR_NAME})")
    assert first == (rejected.code, f"{rejected.enhanced} {rejected.text}".encode())
    assert second[0] == 250
    [dump] = await threads.deferToThread(smtp_sink.messages, 1)
    assert b"Subject: test" in dump and b"report.txt" in dump and b"eicar" not in dump.lower()


def test_undeclared_base64_zip_is_opened() -> None:
    """A zip sent as base64 in a part that declares no encoding is decoded and opened."""
    archive = b64(zipped({"eicar.com": EICAR}))
    result = scan(mail(multipart(text(), headers(b"application/octet-stream", None, b"x.bin") + archive)))
    assert [threat.name for threat in result.threats] == [EICAR_NAME]
