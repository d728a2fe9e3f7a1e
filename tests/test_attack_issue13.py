"""A misbehaving clamd, a next hop that ends a kept connection its own way, and
workers, against the kept clamd sessions, the kept next-hop connections and
``workers = N``: clamd and the next hop are scripted on loopback sockets, the
proxy is smtpguard's own factory or a real ``twistd -n smtpguard``."""

from __future__ import annotations

import smtplib
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from smtpguard import config as configuration
from smtpguard import replies, tap
from smtpguard.results import ErrorKind
from tests.engines import EICAR
from tests.strict_hop import StrictHop
from tests.test_clamd import ENVELOPE, FakeEndpoint, message, result_of, scanner, sessions
from tests.test_clamd import listening as listening  # the fixture

SENDER = "alice@example.org"
RECIPIENT = "bob@example.net"


async def listen(listening: list[IListeningPort], factory: Factory, description: str) -> IListeningPort:
    port = await serverFromString(reactor, description).listen(factory)
    listening.append(port)
    return port


async def start_guard(listening: list[IListeningPort], upstream: str, scanners: list[dict[str, Any]]) -> int:
    config = configuration.parse(
        {"server": {"hostname": "guard.test"}, "upstream": {"endpoint": upstream}, "scanners": scanners},
        "attack-13",
    )
    port = await listen(listening, tap.build_factory(config, reactor), "tcp:0:interface=127.0.0.1")
    return int(port.getHost().port)


def smtplib_reply(reply: replies.Reply) -> tuple[int, bytes]:
    return reply.code, f"{reply.enhanced} {reply.text}".encode()


def send(port: int, data: bytes) -> tuple[tuple[int, bytes], tuple[int, bytes]]:
    """One message through smtplib: the replies to MAIL and to its end of data
    (the latter ``(0, b"")`` when MAIL was refused)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=20) as client:
        client.ehlo()
        mail = client.mail(SENDER)
        if mail[0] != 250:
            return mail, (0, b"")
        client.rcpt(RECIPIENT)
        try:
            return mail, client.data(data)
        except smtplib.SMTPDataError as refused:
            return mail, (refused.smtp_code, refused.smtp_error)


# -- 1. clamd answers before it has the whole message ------------------------------------


@pytest.mark.parametrize("make", [sessions, scanner], ids=["idsession", "one-connection-per-scan"])
def test_stream_ok_before_the_end_of_the_stream_is_never_clean(make: Any) -> None:
    """clamd says ``stream: OK`` (``1: stream: OK`` in a session) after the first
    4-byte chunk, before the chunk holding EICAR was even written, then closes:
    that answer is not about the message, so the scan is an ``other`` error, not
    clean (now: clean, and the EICAR part was never scanned)."""
    endpoint = FakeEndpoint()
    clamd, _ = make(endpoint, chunk_size=4)
    scanning = clamd.scan(message(b"0123" + EICAR), ENVELOPE)
    protocol, transport = endpoint.last
    assert transport.producer is not None
    transport.producer.resumeProducing()
    assert not transport.value().endswith(EICAR[:4])
    protocol.dataReceived(b"1: stream: OK\0" if make is sessions else b"stream: OK\0")
    protocol.connectionLost(Failure(ConnectionDone()))

    result = result_of(scanning)
    assert (result.verdict.value, result.error) == ("error", ErrorKind.OTHER)


class EarlyClamd(Protocol):
    """A clamd that answers ``1: stream: OK`` to an IDSESSION's first INSTREAM once
    ``after`` bytes of it have arrived, shuts its sending side, and reads (and
    drops) whatever else comes until smtpguard closes."""

    def __init__(self, after: int, received: list[int]) -> None:
        self._after = after
        self._received = received
        self._count = 0
        self._answered = False

    def dataReceived(self, data: bytes) -> None:
        self._count += len(data)
        if not self._answered and self._count >= self._after:
            self._answered = True
            self._received.append(self._count)
            assert self.transport is not None
            self.transport.write(b"1: stream: OK\0")
            self.transport.loseWriteConnection()  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_real_early_stream_ok_from_clamd_does_not_let_eicar_through(
    tmp_path: Path, listening: list[IListeningPort], strict_hop: StrictHop
) -> None:
    """Through the proxy, a 4 MB message whose EICAR attachment comes last, to a
    clamd on a unix socket that answers ``1: stream: OK`` once it has 64 KiB of the
    stream: the client gets ``451 4.7.1`` (the scan failed) and the next hop gets
    no message (now: 250, and the next hop queues the EICAR)."""
    received: list[int] = []
    socket_path = tmp_path / "clamd.sock"
    clamd = Factory.forProtocol(lambda: EarlyClamd(64 * 1024, received))
    await listen(listening, clamd, f"unix:{socket_path}")
    port = await start_guard(
        listening, strict_hop.endpoint, [{"type": "clamd", "endpoint": f"unix:{socket_path}", "timeout": 20}]
    )
    body = b"From: <alice@example.org>\r\nTo: <bob@example.net>\r\nSubject: big\r\n\r\n"
    body += (b"x" * 78 + b"\r\n") * 50_000 + EICAR + b"\r\n"

    mail, end = await threads.deferToThread(send, port, body)

    assert mail[0] == 250
    assert len(received) == 1 and received[0] < len(body)
    assert end == smtplib_reply(replies.SCAN_DEFERRED)
    assert strict_hop.queued == []


# -- 2. a next hop that answers 421 on a kept connection -------------------------------


@attrs.define
class HopRecord:
    connections: int = 0
    mails: list[tuple[int, str]] = attrs.Factory(list)  # (connection, reply code) per MAIL
    messages: list[bytes] = attrs.Factory(list)


class ClosingHop(LineReceiver):
    """A next hop that takes one transaction per connection and answers the next
    MAIL on it with ``421 4.4.2 Error: timeout exceeded`` and closes, as Postfix's
    smtpd does when its idle timer runs out just as the MAIL arrives."""

    delimiter = b"\r\n"

    def __init__(self, record: HopRecord) -> None:
        self._record = record
        self._number = 0
        self._transactions = 0
        self._data: list[bytes] | None = None

    def connectionMade(self) -> None:
        self._record.connections += 1
        self._number = self._record.connections
        self.sendLine(b"220 hop.test ESMTP Postfix")

    def lineReceived(self, line: bytes) -> None:
        if self._data is not None:
            if line == b".":
                self._record.messages.append(b"\r\n".join(self._data))
                self._data = None
                self._transactions += 1
                self.sendLine(b"250 2.0.0 Ok: queued as ABC")
            else:
                self._data.append(line)
            return
        verb = line[:4].upper()
        if verb == b"EHLO":
            self.sendLine(b"250-hop.test\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES")
        elif verb == b"MAIL" and self._transactions:
            self._record.mails.append((self._number, "421"))
            self.sendLine(b"421 4.4.2 hop.test Error: timeout exceeded")
            self.transport.loseConnection()
        elif verb == b"MAIL":
            self._record.mails.append((self._number, "250"))
            self.sendLine(b"250 2.1.0 Ok")
        elif verb == b"RCPT":
            self.sendLine(b"250 2.1.5 Ok")
        elif verb == b"DATA":
            self._data = []
            self.sendLine(b"354 End data with <CR><LF>.<CR><LF>")
        elif verb in (b"RSET", b"NOOP"):
            self.sendLine(b"250 2.0.0 Ok")
        elif verb == b"QUIT":
            self.sendLine(b"221 2.0.0 Bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"502 5.5.2 Error: command not recognized")


@pytest_twisted.ensureDeferred
async def test_421_from_the_next_hop_on_a_kept_connection_is_not_the_clients(
    listening: list[IListeningPort],
) -> None:
    """Two clients in turn; the next hop closes the kept connection with ``421
    4.4.2`` when the second client's MAIL arrives on it. That 421 is about the
    connection, not the message, as a close would be: smtpguard sends the MAIL
    again on a new connection, the second client hears 250 and its message is
    relayed (now: the client hears the hop's 421 at MAIL)."""
    record = HopRecord()
    hop = await listen(listening, Factory.forProtocol(lambda: ClosingHop(record)), "tcp:0:interface=127.0.0.1")
    port = await start_guard(listening, f"tcp:127.0.0.1:{hop.getHost().port}", [{"type": "builtin"}])
    mail = b"From: <alice@example.org>\r\nTo: <bob@example.net>\r\nSubject: %d\r\n\r\nHello.\r\n"

    first = await threads.deferToThread(send, port, mail % 1)
    second = await threads.deferToThread(send, port, mail % 2)

    assert first == ((250, b"2.1.0 Ok"), (250, b"2.0.0 Ok: queued as ABC"))
    assert record.mails[:2] == [(1, "250"), (1, "421")]
    assert second == ((250, b"2.1.0 Ok"), (250, b"2.0.0 Ok: queued as ABC"))
    subjects = [[line for line in found.split(b"\r\n") if line.startswith(b"Subject:")] for found in record.messages]
    assert subjects == [[b"Subject: 1"], [b"Subject: 2"]]
