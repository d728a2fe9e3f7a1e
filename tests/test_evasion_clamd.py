"""MIME and archive evasion through a real clamd: what clamd finds, what it answers
OK to (true evasions, which the built-in scanner or a ``chain`` of both catches,
a zip entry only a local header lists among them),
and the error kinds its limit alerts become; end to end through the proxy too."""

from __future__ import annotations

import io
import lzma
import smtplib
import struct
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.endpoints import serverFromString

from smtpguard import config as configuration
from smtpguard import replies, tap
from smtpguard.envelope import Client, Envelope
from smtpguard.interfaces import IScanner
from smtpguard.plugins.clamd import clamd as clamd_plugin
from smtpguard.registry import build_scanner
from smtpguard.results import ErrorKind, ScanResult, Threat
from smtpguard.scanners.builtin import EICAR_NAME, BuiltinScanner
from smtpguard.scanners.clamd import ClamdScanner
from tests.conftest import SmtpSink
from tests.engines import EICAR, EICAR_SIGNATURE, Clamd
from tests.test_builtin import (
    RECIPIENT,
    SENDER,
    attachment,
    b64,
    encrypted_zip,
    headers,
    mail,
    multipart,
    nested_zips,
    spooled,
    text,
    uuencoded,
    zipped,
)
from tests.test_containers import RAR, SEVEN_ZIP, entry, hidden_entry_zip, raw_zip, self_extracting
from tests.test_decoders import binhex, in_text, octet_stream_with, qp_soft_break_with_blanks, stray_equals, yenc

ENVELOPE = Envelope(Client("192.0.2.1", 4321, helo="client.example"), SENDER)
CLAMD_EICAR = f"{EICAR_SIGNATURE}.UNOFFICIAL"
CHAIN = "clamd+builtin"
# The limits the issue asks clamd to alert on; MaxFileSize and MaxScanSize well
# below the defaults (100M, 400M) so that the bombs stay cheap to build.
STRICT = "AlertExceedsMax yes\nAlertEncrypted yes\nMaxRecursion 5\nMaxFileSize 10M\nMaxScanSize 20M\n"
BOMB_SECONDS = 30.0
# clamd inflates archive members into temporary files, not memory: its peak
# resident set stays near its idle size (about 20 MB with one signature).
CLAMD_PEAK_BYTES = 100 * 1024 * 1024


# -- building messages (the rest comes from tests.test_builtin) -------------------------


def attached(part: bytes) -> bytes:
    """A whole message: a text part, then ``part`` (with its own headers)."""
    return mail(multipart(text(), part))


def forwarded(boundary: bytes = b"inner") -> bytes:
    """A message carrying EICAR as a base64 attachment, to be attached itself."""
    return mail(multipart(text(), attachment(EICAR, b"eicar.com"), boundary=boundary))


def rfc822(message: bytes, encoding: bytes | None = None) -> bytes:
    """A message/rfc822 part (headers and body) carrying ``message``."""
    if encoding is None:
        return b"Content-Type: message/rfc822\r\n\r\n" + message
    return b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: " + encoding + b"\r\n\r\n" + b64(message)


def nested_multiparts(levels: int) -> bytes:
    """EICAR as a base64 attachment at the bottom of ``levels`` multiparts."""
    entity = attachment(EICAR, b"eicar.com")
    for level in range(levels):
        entity = multipart(entity, boundary=b"level%d" % level)
    return mail(entity)


def uu_block() -> bytes:
    return b"begin 644 eicar.com\r\n" + uuencoded(EICAR) + b"`\r\nend\r\n"


def qp_every_byte() -> bytes:
    """EICAR with every byte written as =XX, three bytes a line (soft breaks)."""
    encoded = b"".join(b"=%02X" % byte for byte in EICAR)
    return b"=\r\n".join(encoded[i : i + 9] for i in range(0, len(encoded), 9)) + b"\r\n"


def zipcrypto(name: str, data: bytes, password: bytes = b"infected") -> bytes:
    """A zip whose one stored member is really encrypted with the traditional PKWARE
    cipher (zipfile decrypts it but cannot write it), so EICAR is nowhere in the bytes."""
    keys = [0x12345678, 0x23456789, 0x34567890]

    def crc32_byte(crc: int, byte: int) -> int:
        # zlib.crc32 inverts before and after; the cipher wants the bare table step.
        return zlib.crc32(bytes([byte]), crc ^ 0xFFFFFFFF) ^ 0xFFFFFFFF

    def update(byte: int) -> None:
        keys[0] = crc32_byte(keys[0], byte)
        keys[1] = ((keys[1] + (keys[0] & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
        keys[2] = crc32_byte(keys[2], keys[1] >> 24)

    for byte in password:
        update(byte)
    crc = zlib.crc32(data)
    cipher = bytearray()
    # 12 header bytes, the last the CRC's high byte (what readers check the password with).
    for byte in bytes(11) + bytes([crc >> 24]) + data:
        temp = (keys[2] | 2) & 0xFFFF
        cipher.append(byte ^ (((temp * (temp ^ 1)) >> 8) & 0xFF))
        update(byte)
    filename = name.encode()
    sizes = (crc, len(cipher), len(data), len(filename))
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 1, 0, 0, 0, *sizes, 0) + filename + cipher
    central = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 1, 0, 0, 0, *sizes, 0, 0, 0, 0, 0, 0) + filename
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central), len(local), 0)
    return local + central + end


def eicar_after_padding(padding: int) -> bytes:
    """A zip of one deflated member: ``padding`` zero bytes, then EICAR."""
    return zipped({"padded.bin": bytes(padding) + EICAR})


# -- scanners --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def strict_clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    """A clamd of our own that reports the limits it hits and encrypted archives."""
    engine = Clamd(tmp_path_factory.mktemp("strict-clamd"), extra=STRICT)
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture
def built() -> Iterator[list[ClamdScanner]]:
    """clamd scanners a test builds on the real reactor; their health checks stop at teardown."""
    scanners: list[ClamdScanner] = []
    yield scanners
    for one in scanners:
        one.close()


def clamd_scanner(built: list[ClamdScanner], engine: Clamd) -> ClamdScanner:
    made = clamd_plugin.build({"endpoint": engine.unix_endpoint, "timeout": BOMB_SECONDS}, reactor)
    assert isinstance(made, ClamdScanner)
    built.append(made)
    return made


def chain(engine: Clamd) -> IScanner:
    """``type = "chain"``, ``mode = "all"`` of clamd and the built-in scanner: threats
    of both are named under the chain's name; an error is the failing member's own
    result, under its name."""
    table = {
        "type": "chain",
        "mode": "all",
        "scanners": [
            {"type": "clamd", "endpoint": engine.unix_endpoint, "timeout": BOMB_SECONDS},
            {"type": "builtin"},
        ],
    }
    return build_scanner(table, reactor, "scanners[0]")


async def with_clamd(built: list[ClamdScanner], engine: Clamd, data: bytes) -> ScanResult:
    return await clamd_scanner(built, engine).scan(spooled(data), ENVELOPE)


async def with_chain(engine: Clamd, data: bytes) -> ScanResult:
    return await chain(engine).scan(spooled(data), ENVELOPE)


def with_builtin(data: bytes) -> ScanResult:
    return BuiltinScanner().scan_now(spooled(data))


def peak_memory(engine: Clamd) -> int:
    """clamd's peak resident set so far, in bytes (VmHWM)."""
    assert engine.process is not None
    status = Path(f"/proc/{engine.process.pid}/status").read_text()
    [line] = [line for line in status.splitlines() if line.startswith("VmHWM:")]
    return int(line.split()[1]) * 1024


CLAMD_FOUND = ScanResult.infected((Threat(CLAMD_EICAR),), "clamd")
CLAMD_CLEAN = ScanResult.clean("clamd")


def clamd_failed(kind: ErrorKind, name: str) -> ScanResult:
    return ScanResult.failed(kind, name, "clamd")


def builtin_found(file: str) -> ScanResult:
    return ScanResult.infected((Threat(EICAR_NAME, file),), "builtin")


def chain_found(file: str) -> ScanResult:
    return ScanResult.infected((Threat(EICAR_NAME, file),), CHAIN)


# -- the corpus: what clamd decodes ----------------------------------------------------

_BOUNDARY_REAL = forwarded(b"real")

FOUND_BY_BOTH = [
    pytest.param(
        mail(
            multipart(
                multipart(text(), headers(b"text/html") + b"\r\n<p>Hi</p>\r\n", boundary=b"b2", subtype=b"alternative"),
                multipart(
                    text(),
                    multipart(text(), attachment(EICAR, b"eicar.com"), boundary=b"b3", subtype=b"related"),
                    boundary=b"b4",
                ),
                boundary=b"b1",
            )
        ),
        "eicar.com",
        id="nested-multiparts",
    ),
    pytest.param(nested_multiparts(18), "eicar.com", id="18-nested-multiparts"),
    pytest.param(
        _BOUNDARY_REAL.replace(b'boundary="real"', b'boundary="announced"'), "eicar.com", id="boundary-not-the-bodys"
    ),
    pytest.param(_BOUNDARY_REAL.replace(b'; boundary="real"', b""), "eicar.com", id="no-boundary-parameter"),
    pytest.param(_BOUNDARY_REAL.replace(b"--real--\r\n", b""), "eicar.com", id="no-closing-boundary"),
    pytest.param(
        _BOUNDARY_REAL.replace(b'boundary="real"', b'boundary*0="re"; boundary*1="al"'),
        "eicar.com",
        id="boundary-in-rfc2231-continuations",
    ),
    pytest.param(
        _BOUNDARY_REAL.replace(b'boundary="real"', b'BOUNDARY="real"'), "eicar.com", id="boundary-parameter-uppercase"
    ),
    pytest.param(
        _BOUNDARY_REAL.replace(b"--real\r\n", b"--real   \r\n"), "eicar.com", id="delimiter-with-trailing-spaces"
    ),
    pytest.param(
        mail(multipart(text(), multipart(attachment(EICAR, b"eicar.com"), boundary=b"same"), boundary=b"same")),
        "eicar.com",
        id="inner-multipart-reuses-the-outer-boundary",
    ),
    pytest.param(_BOUNDARY_REAL.replace(b"\r\n", b"\n"), "eicar.com", id="bare-lf-line-endings"),
    pytest.param(
        attached(headers(b"application/octet-stream", None, b"eicar.com") + b"\r\n" + EICAR),
        "eicar.com",
        id="no-content-transfer-encoding-raw-bytes",
    ),
    pytest.param(
        attached(headers(b"application/octet-stream", b"7bit", b"e.com") + b"\r\n" + b64(EICAR)),
        "e.com",
        id="base64-declared-7bit",
    ),
    pytest.param(
        attached(
            headers(b"application/octet-stream", b"7bit", b"e.com")
            + b"Content-Transfer-Encoding: base64\r\n\r\n"
            + b64(EICAR)
        ),
        "e.com",
        id="two-content-transfer-encodings",
    ),
    *(
        pytest.param(
            attached(headers(b"application/octet-stream", encoding, b"eicar.com") + b"\r\n" + b64(EICAR)),
            "eicar.com",
            id=f"content-transfer-encoding-{name}",
        )
        for encoding, name in [
            (b"BaSe64", "mixed-case"),
            (b"BASE64", "uppercase"),
            (b" base64 ", "spaced"),
            (b'"base64"', "quoted"),
        ]
    ),
    pytest.param(
        mail(
            multipart(
                headers(b"text/plain", b"Quoted-Printable", b"eicar.txt")
                + b"\r\n"
                + EICAR[:30]
                + b"=\r\n"
                + EICAR[30:].replace(b"=", b"=3D")
                + b"\r\n"
            )
        ),
        "eicar.txt",
        id="quoted-printable-mixed-case-soft-break-mid-string",
    ),
    pytest.param(
        attached(headers(b"application/octet-stream", b"quoted-printable", b"e.com") + b"\r\n" + qp_every_byte()),
        "e.com",
        id="quoted-printable-every-byte-three-a-line",
    ),
    pytest.param(
        attached(headers(b"application/octet-stream", b"base64", b"e.com") + b"\r\n" + b64(EICAR, 1)),
        "e.com",
        id="base64-one-character-a-line",
    ),
    pytest.param(
        attached(headers(b"application/octet-stream", b"X-UUENCODE", b"eicar.com") + b"\r\n" + uu_block()),
        "eicar.com",
        id="uuencode-part-uppercase-encoding",
    ),
    pytest.param(mail(text(b"Here:\r\n\r\n" + uu_block())), "eicar.com", id="uuencoded-block-in-a-mime-text-body"),
    pytest.param(attached(rfc822(forwarded())), "eicar.com", id="message-rfc822"),
    pytest.param(
        attached(rfc822(mail(multipart(text(), rfc822(forwarded()), boundary=b"middle")))),
        "eicar.com",
        id="message-rfc822-in-message-rfc822",
    ),
    pytest.param(
        attached(attachment(zipped({"forwarded.eml": forwarded()}), b"mail.zip")),
        "mail.zip/forwarded.eml/eicar.com",
        id="message-rfc822-inside-zip",
    ),
    pytest.param(
        attached(rfc822(mail(multipart(text(), attachment(zipped({"f.eml": forwarded()}), b"m.zip"), boundary=b"m")))),
        "m.zip/f.eml/eicar.com",
        id="message-in-zip-in-message-rfc822",
    ),
    pytest.param(
        attached(
            attachment(zipped({"readme.txt": b"nothing\r\n", "inner.zip": zipped({"eicar.com": EICAR})}), b"o.zip")
        ),
        "o.zip/inner.zip/eicar.com",
        id="zip-inside-zip",
    ),
    pytest.param(
        attached(attachment(zipped({"eicar.com": EICAR}, zipfile.ZIP_BZIP2), b"b.zip")),
        "b.zip/eicar.com",
        id="zip-member-bzip2",
    ),
]


@pytest.mark.parametrize(("data", "file"), FOUND_BY_BOTH)
@pytest_twisted.ensureDeferred
async def test_evasion_hides_eicar_from_neither_scanner(
    clamd: Clamd, built: list[ClamdScanner], data: bytes, file: str
) -> None:
    """clamd (default clamd.conf, the one-line .ndb signature: any file type, so it
    matches inside every part clamd decodes) and the built-in scanner both find EICAR
    despite the trick."""
    assert await with_clamd(built, clamd, data) == CLAMD_FOUND
    assert with_builtin(data) == builtin_found(file)


# -- what clamd answers OK to ----------------------------------------------------------

MISSED_BY_CLAMD = [
    pytest.param(
        attached(headers(b"application/octet-stream", None, b"eicar.com") + b"\r\n" + b64(EICAR)),
        "eicar.com",
        id="base64-part-without-content-transfer-encoding",
    ),
    pytest.param(
        attached(headers(b"application/octet-stream", b"base64", b"two.bin") + b"\r\n" + b64(b"harmless") + b64(EICAR)),
        "two.bin",
        id="base64-going-on-after-padding",
    ),
    pytest.param(
        attached(headers(b"application/octet-stream", b"base64", b"e.com") + b64(EICAR)),
        "e.com",
        id="part-headers-run-into-base64-without-a-blank-line",
    ),
    pytest.param(_BOUNDARY_REAL.replace(b"\r\n", b"\r"), "eicar.com", id="bare-cr-line-endings"),
    pytest.param(
        b"Subject: uu\r\n\r\nHere it is:\r\n\r\n" + uu_block(), "eicar.com", id="uuencoded-body-no-from-header"
    ),
    pytest.param(
        multipart(text(), attachment(EICAR, b"eicar.com")), "eicar.com", id="mime-message-with-only-a-content-type"
    ),
    pytest.param(
        attached(attachment(zipped({"eicar.com": EICAR}, zipfile.ZIP_LZMA), b"l.zip")),
        "l.zip/eicar.com",
        id="zip-member-lzma",
    ),
    pytest.param(nested_multiparts(19), "eicar.com", id="19-nested-multiparts-past-max-recursion-17"),
]


@pytest.mark.parametrize(("data", "file"), MISSED_BY_CLAMD)
@pytest_twisted.ensureDeferred
async def test_clamd_answers_ok_to_a_true_evasion(
    clamd: Clamd, built: list[ClamdScanner], data: bytes, file: str
) -> None:
    """clamd 1.4.6 with its default clamd.conf answers ``stream: OK`` for EICAR hidden
    this way: a base64 part of a multipart with no Content-Transfer-Encoding header at
    all (one declared 7bit is decoded), base64 that goes on after a padded end, base64
    right after the part's headers with no blank line, bare CR line ends, a message
    it does not take for mail (a uuencoded body with no From: header; a header section
    of only Content-Type), zip's LZMA method, and multiparts nested past MaxRecursion
    (17) without AlertExceedsMax. smtpguard reports what clamd said: clean."""
    assert await with_clamd(built, clamd, data) == CLAMD_CLEAN


@pytest.mark.parametrize(("data", "file"), MISSED_BY_CLAMD)
@pytest_twisted.ensureDeferred
async def test_builtin_and_the_chain_catch_what_clamd_misses(clamd: Clamd, data: bytes, file: str) -> None:
    """Each true evasion of clamd is found by the built-in scanner, so a ``chain`` in
    mode ``all`` of clamd and builtin reports it infected."""
    assert with_builtin(data) == builtin_found(file)
    assert await with_chain(clamd, data) == chain_found(file)


# -- forgiving decoders and inline encodings (built by tests.test_decoders) ---------------

DECODER_EVASIONS = [
    pytest.param(
        octet_stream_with(b"Content-Transfer-Encoding: base64\r\n", stray_equals(EICAR, 41)),
        "e.com",
        id="base64-with-a-stray-equals-sign",
    ),
    pytest.param(
        octet_stream_with(b"Content-Transfer-Encoding: quoted-printable\r\n", qp_soft_break_with_blanks(EICAR, b"  ")),
        "e.com",
        id="quoted-printable-soft-break-then-blanks",
    ),
    pytest.param(in_text(yenc(EICAR)), "eicar.com", id="yenc-block-in-a-text-part"),
    pytest.param(in_text(binhex(EICAR)), "eicar.com", id="binhex-block-in-a-text-part"),
]


@pytest.mark.parametrize(("data", "file"), DECODER_EVASIONS)
@pytest_twisted.ensureDeferred
async def test_regression_chain_catches_what_forgiving_readers_decode_and_clamd_misses(
    clamd: Clamd, built: list[ClamdScanner], data: bytes, file: str
) -> None:
    """base64 with a stray "=" (the email package and MIME-tools skip it), a
    quoted-printable soft line break followed by blanks (RFC 2045 strips them), a
    yEnc and a BinHex block in a text part (clients show them as attachments):
    clamd answers OK, and the chain of clamd and builtin, which delivered them as
    clean before builtin read them as those readers do, reports EICAR."""
    assert await with_clamd(built, clamd, data) == CLAMD_CLEAN
    assert await with_chain(clamd, data) == chain_found(file)


def test_zipcrypto_builder_makes_a_real_encrypted_archive() -> None:
    """The encrypted archive below is the real thing: zipfile reads EICAR back with
    the password, and EICAR is nowhere in its bytes."""
    archive = zipcrypto("eicar.com", EICAR)
    assert EICAR not in archive
    with zipfile.ZipFile(io.BytesIO(archive)) as reader:
        assert reader.read("eicar.com", pwd=b"infected") == EICAR


ENCRYPTED = attached(attachment(zipcrypto("eicar.com", EICAR), b"secret.zip"))


@pytest_twisted.ensureDeferred
async def test_encrypted_zip_is_clean_to_default_clamd_and_password_protected_to_the_chain(
    clamd: Clamd, built: list[ClamdScanner]
) -> None:
    """EICAR in a password-protected zip: clamd without AlertEncrypted answers OK (it
    cannot look inside); the built-in scanner, and so the chain, report
    password-protected: an error, never clean."""
    assert await with_clamd(built, clamd, ENCRYPTED) == CLAMD_CLEAN
    expected = ScanResult.failed(
        ErrorKind.PASSWORD_PROTECTED, "secret.zip/eicar.com: encrypted archive member", "builtin"
    )
    assert await with_chain(clamd, ENCRYPTED) == expected


@pytest_twisted.ensureDeferred
async def test_zips_nested_past_default_max_recursion_are_clean_to_clamd_and_an_error_to_the_chain(
    clamd: Clamd, built: list[ClamdScanner]
) -> None:
    """EICAR at the bottom of 17 nested zips: clamd stops at its MaxRecursion (17) and,
    without AlertExceedsMax, answers OK; the built-in scanner stops at its depth 8 and
    reports decompress-layer, which the chain reports: never clean."""
    data = attached(attachment(nested_zips(17, {"eicar.com": EICAR}), b"nest.zip"))
    assert await with_clamd(built, clamd, data) == CLAMD_CLEAN
    layers = "/".join(["nest.zip", *(f"layer{n}.zip" for n in range(1, 9))])
    expected = ScanResult.failed(ErrorKind.DECOMPRESS_LAYER, f"{layers}: more than 8 nested layers", "builtin")
    assert await with_chain(clamd, data) == expected


# -- what the built-in scanner misses --------------------------------------------------

RFC822_BASE64 = attached(rfc822(forwarded(), b"base64"))


@pytest_twisted.ensureDeferred
async def test_base64_encoded_message_rfc822_is_found_by_clamd_and_the_chain(
    clamd: Clamd, built: list[ClamdScanner]
) -> None:
    """A message/rfc822 part sent base64-encoded (RFC 2046 allows only 7bit, 8bit or
    binary there, but a lenient reader may decode it): clamd decodes it and finds EICAR, and
    so does the built-in scanner in the chain."""
    assert await with_clamd(built, clamd, RFC822_BASE64) == CLAMD_FOUND
    both = (Threat(CLAMD_EICAR), Threat(EICAR_NAME, "(body)/eicar.com"))
    assert await with_chain(clamd, RFC822_BASE64) == ScanResult.infected(both, CHAIN)


def test_builtin_finds_eicar_in_a_base64_encoded_message_rfc822() -> None:
    """The built-in scanner alone finds EICAR in a base64 message/rfc822 part: the
    undeclared base64 run starts like a message and is opened as one."""
    assert [threat.name for threat in with_builtin(RFC822_BASE64).threats] == [EICAR_NAME]


# -- containers: a zip behind a prefix, entries only a local header lists ---------------

SELF_EXTRACTING = attached(attachment(self_extracting({"eicar.com": EICAR}), b"setup.exe"))


@pytest_twisted.ensureDeferred
async def test_zip_behind_a_prefix_is_found_by_clamd_and_the_chain(clamd: Clamd, built: list[ClamdScanner]) -> None:
    """A self-extracting setup.exe (an executable's code, then a zip holding EICAR):
    clamd finds it, and so does the built-in scanner in the chain, which names the
    member."""
    assert await with_clamd(built, clamd, SELF_EXTRACTING) == CLAMD_FOUND
    both = (Threat(CLAMD_EICAR), Threat(EICAR_NAME, "setup.exe/eicar.com"))
    assert await with_chain(clamd, SELF_EXTRACTING) == ScanResult.infected(both, CHAIN)


LOCAL_HEADER_ONLY = [
    pytest.param(hidden_entry_zip(), b"files.zip", id="deflated"),
    pytest.param(
        raw_zip([entry("readme.txt", b"hi\r\n"), entry("eicar.com", EICAR)], listed={"readme.txt"}, described=True),
        b"files.zip",
        id="deflated-with-a-data-descriptor",
    ),
    pytest.param(zipped({"eicar.com": EICAR}, zipfile.ZIP_BZIP2)[:-22], b"files.zip", id="no-end-record-bzip2"),
]


@pytest.mark.parametrize(("archive", "name"), LOCAL_HEADER_ONLY)
@pytest_twisted.ensureDeferred
async def test_zip_entry_only_in_a_local_header_is_missed_by_clamd_and_found_by_the_chain(
    clamd: Clamd, built: list[ClamdScanner], archive: bytes, name: bytes
) -> None:
    """A zip entry holding EICAR that its central directory does not list (7-Zip
    extracts it): clamd answers OK; the built-in scanner walks the local headers too,
    so the chain reports it infected."""
    data = attached(attachment(archive, name))
    assert await with_clamd(built, clamd, data) == CLAMD_CLEAN
    assert await with_chain(clamd, data) == chain_found("files.zip/eicar.com")


@pytest_twisted.ensureDeferred
async def test_lzma_file_is_missed_by_clamd_and_found_by_the_chain(clamd: Clamd, built: list[ClamdScanner]) -> None:
    """EICAR in an .lzma file (LZMA alone, as xz --format=lzma writes it): clamd
    answers OK, the chain reports it infected."""
    data = attached(attachment(lzma.compress(EICAR, lzma.FORMAT_ALONE), b"eicar.com.lzma"))
    assert await with_clamd(built, clamd, data) == CLAMD_CLEAN
    assert await with_chain(clamd, data) == chain_found("eicar.com.lzma/eicar.com")


@pytest.mark.parametrize(
    ("data", "name", "detail"),
    [
        pytest.param(RAR, b"a.rar", "a.rar: RAR archive: not opened (smtpguard has no RAR decoder)", id="rar"),
        pytest.param(
            SEVEN_ZIP, b"a.7z", "a.7z: 7z archive: not opened (no 7z decoder whose memory use can be bounded)", id="7z"
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_archive_not_opened_is_an_error_of_the_chain(
    clamd: Clamd, built: list[ClamdScanner], data: bytes, name: bytes, detail: str
) -> None:
    """A RAR or 7z archive (here one clamd cannot read either): clamd answers OK, the
    built-in scanner decompress-layer, and so does the chain: never clean."""
    message = attached(attachment(data, name))
    assert await with_clamd(built, clamd, message) == CLAMD_CLEAN
    expected = ScanResult.failed(ErrorKind.DECOMPRESS_LAYER, detail, "builtin")
    assert await with_chain(clamd, message) == expected


# -- clamd's limits, reported (AlertExceedsMax, AlertEncrypted) ------------------------


@pytest_twisted.ensureDeferred
async def test_zips_nested_within_max_recursion_are_scanned(strict_clamd: Clamd, built: list[ClamdScanner]) -> None:
    """MaxRecursion 5 counts the message and its attachment as layers: three nested
    zips are still opened and EICAR found."""
    data = attached(attachment(nested_zips(3, {"eicar.com": EICAR}), b"nest.zip"))
    assert await with_clamd(built, strict_clamd, data) == CLAMD_FOUND


@pytest.mark.parametrize("innermost", [{"eicar.com": EICAR}, {"readme.txt": b"nothing to see\r\n"}])
@pytest_twisted.ensureDeferred
async def test_zips_nested_past_max_recursion_are_decompress_layer(
    strict_clamd: Clamd, built: list[ClamdScanner], innermost: dict[str, bytes]
) -> None:
    """Six nested zips with MaxRecursion 5 and AlertExceedsMax: clamd's
    Heuristics.Limits.Exceeded.MaxRecursion is decompress-layer, whatever the bottom holds."""
    data = attached(attachment(nested_zips(6, innermost), b"nest.zip"))
    expected = clamd_failed(ErrorKind.DECOMPRESS_LAYER, "Heuristics.Limits.Exceeded.MaxRecursion")
    assert await with_clamd(built, strict_clamd, data) == expected


@pytest_twisted.ensureDeferred
async def test_multiparts_past_max_recursion_are_decompress_layer_and_the_chain_finds_eicar(
    strict_clamd: Clamd, built: list[ClamdScanner]
) -> None:
    """19 nested multiparts: with AlertExceedsMax clamd reports MaxRecursion
    (decompress-layer) instead of OK; the built-in scanner, for which multiparts cost
    no depth, finds EICAR, and in the chain the threat wins over clamd's error."""
    data = nested_multiparts(19)
    expected = clamd_failed(ErrorKind.DECOMPRESS_LAYER, "Heuristics.Limits.Exceeded.MaxRecursion")
    assert await with_clamd(built, strict_clamd, data) == expected
    assert await with_chain(strict_clamd, data) == chain_found("eicar.com")


@pytest_twisted.ensureDeferred
async def test_encrypted_zip_member_is_password_protected(strict_clamd: Clamd, built: list[ClamdScanner]) -> None:
    """With AlertEncrypted, a really encrypted zip member is Heuristics.Encrypted.Zip:
    password-protected."""
    expected = clamd_failed(ErrorKind.PASSWORD_PROTECTED, "Heuristics.Encrypted.Zip")
    assert await with_clamd(built, strict_clamd, ENCRYPTED) == expected


@pytest_twisted.ensureDeferred
async def test_zip_flagged_encrypted_is_password_protected(strict_clamd: Clamd, built: list[ClamdScanner]) -> None:
    """A member whose headers only carry the "encrypted" flag (tests.test_builtin's
    encrypted_zip) is reported the same way."""
    data = attached(attachment(encrypted_zip("readme.txt", b"nothing to see\r\n"), b"secret.zip"))
    expected = clamd_failed(ErrorKind.PASSWORD_PROTECTED, "Heuristics.Encrypted.Zip")
    assert await with_clamd(built, strict_clamd, data) == expected


@pytest_twisted.ensureDeferred
async def test_encrypted_flag_over_plain_stored_eicar_does_not_hide_it(
    strict_clamd: Clamd, built: list[ClamdScanner]
) -> None:
    """The flag without real encryption, EICAR stored: clamd matches the archive's own
    bytes, and a threat wins over the encryption alert."""
    data = attached(attachment(encrypted_zip("eicar.com", EICAR), b"secret.zip"))
    assert await with_clamd(built, strict_clamd, data) == CLAMD_FOUND


@pytest_twisted.ensureDeferred
async def test_eicar_past_max_file_size_in_a_zip_member_is_a_true_evasion(
    strict_clamd: Clamd, built: list[ClamdScanner]
) -> None:
    """A zip member of 12 MB of zeros then EICAR, MaxFileSize 10M: clamd inflates
    only the first 10 MB ("trimming output size to maxfilesize") and answers OK:
    AlertExceedsMax does not cover this truncation. The built-in scanner (100 MiB
    budget) finds EICAR, so the chain does."""
    data = attached(attachment(eicar_after_padding(12 * 1024 * 1024), b"pad.zip"))
    assert await with_clamd(built, strict_clamd, data) == CLAMD_CLEAN
    assert await with_chain(strict_clamd, data) == chain_found("pad.zip/padded.bin")


@pytest.fixture(scope="module")
def flat_bomb() -> bytes:
    """25 members of 8 MiB of zeros each: 200 MiB inflated, 200 kB deflated."""
    return attached(attachment(zipped({f"zeros{n:02}.bin": bytes(8 * 1024 * 1024) for n in range(25)}), b"bomb.zip"))


@pytest.fixture(scope="module")
def single_bomb() -> bytes:
    """One member of 200 MiB of zeros (plus EICAR at the very end): 200 kB deflated."""
    return attached(attachment(eicar_after_padding(200 * 1024 * 1024), b"bomb.zip"))


@pytest_twisted.ensureDeferred
async def test_zip_bomb_of_many_members_is_content_size_in_bounded_time_and_memory(
    strict_clamd: Clamd, built: list[ClamdScanner], flat_bomb: bytes
) -> None:
    """25 x 8 MiB of zeros, MaxScanSize 20M: Heuristics.Limits.Exceeded.MaxScanSize,
    content-size within the scanner's 30 s timeout (later would be a timeout
    result), and clamd's peak memory stays under 100 MiB."""
    result = await with_clamd(built, strict_clamd, flat_bomb)
    assert result == clamd_failed(ErrorKind.CONTENT_SIZE, "Heuristics.Limits.Exceeded.MaxScanSize")
    assert peak_memory(strict_clamd) < CLAMD_PEAK_BYTES


@pytest_twisted.ensureDeferred
async def test_zip_bomb_of_one_member_is_clean_to_clamd_and_content_size_to_the_chain(
    strict_clamd: Clamd, built: list[ClamdScanner], single_bomb: bytes
) -> None:
    """One member of 200 MiB of zeros with EICAR at its end: clamd inflates 10 MB of it
    within the scanner's 30 s timeout and in bounded memory and, silently truncated,
    answers OK (EICAR missed); the built-in scanner stops at 100 MiB with
    content-size, so the chain reports content-size: never clean."""
    result = await with_clamd(built, strict_clamd, single_bomb)
    assert result == CLAMD_CLEAN
    assert peak_memory(strict_clamd) < CLAMD_PEAK_BYTES
    expected = ScanResult.failed(
        ErrorKind.CONTENT_SIZE, "bomb.zip/padded.bin: more than 104857600 bytes decoded", "builtin"
    )
    assert await with_chain(strict_clamd, single_bomb) == expected


# -- end to end --------------------------------------------------------------------------


def send(port: int, data: bytes) -> tuple[int, bytes]:
    """One message through smtplib; the reply to its end of data."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=40) as client:
        client.ehlo()
        client.mail(SENDER)
        client.rcpt(RECIPIENT)
        return client.data(data)


def reply_of(reply: replies.Reply) -> tuple[int, bytes]:
    return reply.code, f"{reply.enhanced} {reply.text}".encode()


@pytest_twisted.ensureDeferred
async def test_proxy_with_a_chain_stops_what_either_scanner_misses(clamd: Clamd, smtp_sink: SmtpSink) -> None:
    """smtplib -> smtpguard ([[scanners]] type = "chain", mode "all", of clamd and
    builtin) -> smtp-sink: an LZMA zip (clamd misses it) is rejected naming builtin's
    threat, a base64 message/rfc822 (builtin misses it) naming clamd's, 17 nested
    zips (clamd OK, builtin decompress-layer) are deferred, and only the clean
    message reaches the sink, scanned by both."""
    config = configuration.parse(
        {
            "server": {"hostname": "guard.test"},
            "upstream": {"endpoint": smtp_sink.endpoint},
            "scanners": [
                {
                    "type": "chain",
                    "mode": "all",
                    "scanners": [
                        {"type": "clamd", "endpoint": clamd.unix_endpoint, "timeout": 20},
                        {"type": "builtin"},
                    ],
                }
            ],
        },
        "evasion-test",
    )
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(tap.build_factory(config, reactor))
    lzma = attached(attachment(zipped({"eicar.com": EICAR}, zipfile.ZIP_LZMA), b"l.zip"))
    nested = attached(attachment(nested_zips(17, {"eicar.com": EICAR}), b"nest.zip"))
    clean = attached(attachment(b"just a report\r\n", b"report.txt"))
    try:
        answers = [await threads.deferToThread(send, port.getHost().port, data) for data in (lzma, RFC822_BASE64)]
        answers += [await threads.deferToThread(send, port.getHost().port, data) for data in (nested, clean)]
    finally:
        await port.stopListening()
    virus = replies.VIRUS_REJECTED
    assert answers[:3] == [
        reply_of(virus.with_text(f"Message rejected: virus found ({EICAR_NAME})")),
        reply_of(virus.with_text(f"Message rejected: virus found ({CLAMD_EICAR}, {EICAR_NAME})")),
        reply_of(replies.SCAN_DEFERRED),
    ]
    assert answers[3][0] == 250
    [dump] = await threads.deferToThread(smtp_sink.messages, 1)
    assert f"X-Virus-Scanned: smtpguard ({CHAIN}) on guard.test\nX-Virus-Status: clean\n".encode() in dump
    assert b"report.txt" in dump
