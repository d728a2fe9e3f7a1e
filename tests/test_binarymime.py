"""BINARYMIME messages keep their bytes as sent, bare CR and LF included: every
scanner also reads them with CRLF line endings, as mail readers do, and status
headers from the client go whatever their line ends.  Unit tests of the pipeline's
two readings, then end to end: smtplib -> smtpguard -> smtpguard's capture target,
which offers CHUNKING and BINARYMIME, with a real clamd."""

from __future__ import annotations

import base64
import smtplib
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface import implementer

from smtpguard import config as configuration
from smtpguard import replies, tap
from smtpguard.capture import capture_factory
from smtpguard.envelope import BodyType, Client, Envelope, MailParameters
from smtpguard.interfaces import IScanner
from smtpguard.pipeline import Pipeline
from smtpguard.policies.default import DefaultPolicy, PolicySettings
from smtpguard.results import ErrorKind, ScanResult, Threat
from smtpguard.spool import Message
from smtpguard.testing import FixedScanner
from tests.conftest import listen
from tests.engines import EICAR, EICAR_SIGNATURE, Clamd

SENDER = "alice@example.org"
RECIPIENT = "bob@example.net"
CLIENT = Client("192.0.2.1", 4321, helo="client.example")
BINARY = Envelope(CLIENT, SENDER, MailParameters(body=BodyType.BINARYMIME))
EIGHT_BIT = Envelope(CLIENT, SENDER, MailParameters(body=BodyType.EIGHT_BIT_MIME))

AS_SENT = b"Subject: hi\nFrom: alice@example.org\n\nbinary \x00\xff\r\r\n.\n"
WITH_CRLF = b"Subject: hi\r\nFrom: alice@example.org\r\n\r\nbinary \x00\xff\r\n\r\n.\r\n"
FOUND = ScanResult.infected((Threat("Test.Found"),), "reader")
FAILED = ScanResult.failed(ErrorKind.CORRUPT_FILE, "unreadable", "reader")


@implementer(IScanner)
class ByBytes:
    """Answers ``results[data]`` for a message whose bytes are ``data``, clean for
    any other; ``read`` keeps the bytes of every message it scanned."""

    name = "reader"

    def __init__(self, results: dict[bytes, ScanResult]) -> None:
        self._results = results
        self.read: list[bytes] = []

    def scan(self, message: Message, envelope: Envelope) -> Deferred[ScanResult]:
        data = message.read()
        self.read.append(data)
        return defer.succeed(self._results.get(data, ScanResult.clean(self.name)))


def scanned(scanner: IScanner, data: bytes, envelope: Envelope) -> ScanResult:
    """The pipeline's scan of ``data`` (the scanner answers at once)."""
    pipeline = Pipeline(Clock(), scanner, DefaultPolicy(PolicySettings()))
    results: list[ScanResult] = []
    pipeline.scan(Message.from_bytes(data), envelope).addCallback(results.append)
    [result] = results
    return result


def test_binarymime_with_bare_line_ends_is_scanned_as_sent_and_with_crlf():
    """A BINARYMIME message with bare CR and LF is scanned twice: its bytes as sent,
    then with every line end CRLF; clean both times, it is clean."""
    scanner = FixedScanner(ScanResult.clean())
    assert scanned(scanner, AS_SENT, BINARY) == ScanResult.clean("fixed")
    assert scanner.scanned == [AS_SENT, WITH_CRLF]


def test_threat_found_only_with_crlf_line_ends_is_the_verdict():
    """What a scanner finds only in the CRLF reading makes the message infected."""
    assert scanned(ByBytes({WITH_CRLF: FOUND}), AS_SENT, BINARY) == FOUND


@pytest.mark.parametrize("failing", [AS_SENT, WITH_CRLF], ids=["as-sent", "with-crlf"])
def test_scan_error_in_either_reading_is_the_verdict(failing):
    """A scan error in either reading (the other clean) is the result: a scanner
    that could not read one of them has not said the message is clean."""
    assert scanned(ByBytes({failing: FAILED}), AS_SENT, BINARY) == FAILED


def test_message_infected_as_sent_is_not_scanned_again():
    """A threat in the bytes as sent is the verdict at once: nothing can clear it."""
    scanner = ByBytes({AS_SENT: FOUND})
    assert scanned(scanner, AS_SENT, BINARY) == FOUND
    assert scanner.read == [AS_SENT]


@pytest.mark.parametrize(
    ("data", "envelope"), [(WITH_CRLF, BINARY), (WITH_CRLF, EIGHT_BIT)], ids=["binarymime-crlf-only", "8bitmime"]
)
def test_message_with_crlf_line_ends_only_is_scanned_once(data, envelope):
    """A BINARYMIME message with CRLF line ends only, like every message received
    without BINARYMIME (whose line ends are made CRLF as it arrives), has one reading."""
    scanner = FixedScanner(ScanResult.clean())
    scanned(scanner, data, envelope)
    assert scanner.scanned == [data]


# -- end to end ----------------------------------------------------------------------


def infected_with_bare_cr() -> bytes:
    """EICAR as a base64 attachment of a multipart whose every line ends in a bare
    CR: Python's email package and mail clients open it; clamd reading it as sent
    sees one long line and answers OK."""
    message = (
        b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: report\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="real"\r\n\r\n'
        b"--real\r\nContent-Type: text/plain\r\n\r\nSee the attachment.\r\n"
        b'--real\r\nContent-Type: application/octet-stream; name="eicar.com"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(EICAR) + b"\r\n--real--\r\n"
    )
    return message.replace(b"\r\n", b"\r")


def send_binarymime(port: int, data: bytes) -> tuple[int, bytes]:
    """``data`` as it is, with MAIL ... BODY=BINARYMIME and one BDAT LAST; the reply."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=30) as client:
        client.ehlo()
        assert client.docmd("MAIL", f"FROM:<{SENDER}> BODY=BINARYMIME")[0] == 250
        assert client.rcpt(RECIPIENT)[0] == 250
        client.send(b"BDAT %d LAST\r\n" % len(data) + data)
        return client.getreply()


def send_8bitmime(port: int, data: bytes) -> tuple[int, bytes]:
    """The same bytes with MAIL ... BODY=8BITMIME and DATA (no line of ``data``
    starts with a dot); the reply to the end of data."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=30) as client:
        client.ehlo()
        assert client.docmd("MAIL", f"FROM:<{SENDER}> BODY=8BITMIME")[0] == 250
        assert client.rcpt(RECIPIENT)[0] == 250
        assert client.docmd("DATA")[0] == 354
        client.send(data + b"\r\n.\r\n")
        return client.getreply()


async def guard(listening: list[object], tmp_path: Path, scanner: dict[str, Any]) -> tuple[int, Path]:
    """smtpguard (``scanner``, viruses rejected) in front of a capture target that
    offers CHUNKING and BINARYMIME; (its port, the folder the target stores in)."""
    captured = tmp_path / "captured"
    hop = await listen(listening, capture_factory(reactor, str(captured)))
    data = {
        "server": {"hostname": "guard.test"},
        "upstream": {"endpoint": f"tcp:127.0.0.1:{hop}"},
        "scanners": [scanner],
        "policy": {"on_virus": "reject"},
    }
    return await listen(listening, tap.build_factory(configuration.parse(data, "test"), reactor)), captured


def stored(captured: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted(captured.glob("*.eml"))]


@pytest.mark.parametrize("send", [send_8bitmime, send_binarymime], ids=["8bitmime-data", "binarymime-bdat"])
@pytest_twisted.ensureDeferred
async def test_clamd_finds_eicar_behind_bare_cr_line_ends_sent_either_way(listening, tmp_path, clamd: Clamd, send):
    """The same message with bare CR line ends is rejected (554 5.7.1, clamd's
    threat named) whether it comes as 8BITMIME with DATA (stored with CRLF) or as
    BINARYMIME with BDAT (stored and relayed as sent, scanned with CRLF too), and
    nothing reaches the next hop."""
    port, captured = await guard(listening, tmp_path, {"type": "clamd", "endpoint": clamd.unix_endpoint})
    reply = await threads.deferToThread(send, port, infected_with_bare_cr())
    rejected = replies.VIRUS_REJECTED.with_text(f"Message rejected: virus found ({EICAR_SIGNATURE}.UNOFFICIAL)")
    assert reply == (rejected.code, f"{rejected.enhanced} {rejected.text}".encode())
    assert stored(captured) == []


@pytest_twisted.ensureDeferred
async def test_client_status_headers_behind_bare_line_ends_never_reach_the_next_hop(listening, tmp_path):
    """A clean BINARYMIME message whose header section uses bare LF and CR line ends
    and carries X-Virus-Status and X-Virus-Scanned of its own reaches the next hop
    with smtpguard's two status headers only, its header section in CRLF lines, and
    its body byte for byte as sent."""
    port, captured = await guard(listening, tmp_path, {"type": "builtin"})
    body = b"\x00\xffbinary\r\rlines\n.\n\r\n"
    head = (
        b"From: alice@example.org\nX-Virus-Status: clean\nSubject: hi\rX-Virus-Scanned: by me\r\n"
        b"To: bob@example.net\n"
    )
    reply = await threads.deferToThread(send_binarymime, port, head + b"\n" + body)
    assert reply[0] == 250
    [relayed] = stored(captured)
    assert relayed.startswith(b"Received: from client.example ([127.0.0.1])\r\n")
    assert relayed[relayed.index(b"X-Virus-Scanned:") :] == (
        b"X-Virus-Scanned: smtpguard (builtin) on guard.test\r\nX-Virus-Status: clean\r\n"
        b"From: alice@example.org\r\nSubject: hi\r\nTo: bob@example.net\r\n\r\n" + body
    )
