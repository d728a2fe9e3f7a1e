"""Clients that leave at every stage of a transaction, against a next hop as
strict as Postfix's smtpd (tests/strict_hop.py), through a real smtpguard on
loopback.

After each stage, repeated by several clients at once: the next client's message
is delivered, the next hop answered no command out of state (no 503), no
next-hop connection stays open past ``keep_time``, and every message the next hop
queued is, after smtpguard's trace headers, byte-identical to one a client sent
and was told 250 for; none when the client was gone before the end of data
reached the next hop.
"""

from __future__ import annotations

import smtplib
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, threads
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol

from smtpguard.pipeline import Pipeline
from smtpguard.policies.default import DefaultPolicy
from smtpguard.results import ScanResult
from smtpguard.server import GuardFactory
from smtpguard.settings import ServerSettings, UpstreamSettings
from smtpguard.testing import FixedScanner
from smtpguard.upstream import HopState, Upstream
from tests.conftest import listen
from tests.strict_hop import StrictHop

CLIENTS = 3  # clients leaving at the same stage at once
KEEP_TIME = 1.0  # [upstream] keep_time
SETTLE = 30.0  # the longest any test waits for something that must happen
SENDER = "alice@example.org"
RECIPIENT = "bob@example.net"
TRACE_PREFIXES = (b"Received: ", b"\t", b"X-Virus-Scanned: ", b"X-Virus-Status: clean")


def message(tag: str, size: int = 0) -> bytes:
    body = b"Hello Bob.\r\n" + (b"x" * 70 + b"\r\n") * (size // 72)
    return f"Subject: {tag}\r\nMessage-ID: <{tag}@example.org>\r\n\r\n".encode() + body


def commands(*lines: str) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode()


ENVELOPE = commands("EHLO client.test", f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RECIPIENT}>")


class Client(Protocol):
    """A raw SMTP client on the reactor: writes what it is told, keeps what it
    hears, and leaves when told (loseConnection)."""

    def __init__(self) -> None:
        self.heard = b""
        self.gone: defer.Deferred[None] = defer.Deferred()
        self._waiting: list[tuple[int, defer.Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.heard += data
        ready = [waiting for count, waiting in self._waiting if self.replies >= count]
        self._waiting = [(count, waiting) for count, waiting in self._waiting if waiting not in ready]
        for waiting in ready:
            waiting.callback(None)

    @property
    def replies(self) -> int:
        """Final reply lines heard so far (``NNN `` at a line start)."""
        return sum(1 for line in self.heard.split(b"\r\n") if line[:3].isdigit() and line[3:4] == b" ")

    def wait_for_replies(self, count: int) -> defer.Deferred[None]:
        waiting: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((count, waiting))
        self.dataReceived(b"")
        return waiting.addTimeout(SETTLE, reactor)

    def connectionLost(self, reason: Any = None) -> None:
        self.gone.callback(None)

    def leave(self) -> defer.Deferred[None]:
        self.transport.loseConnection()  # type: ignore[union-attr]
        return self.gone


async def connect(port: int, data: bytes = b"") -> Client:
    client: Client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(Client))
    await client.wait_for_replies(1)  # the greeting
    if data:
        client.transport.write(data)  # type: ignore[union-attr]
    return client


async def start(listening: list[Any], hop: StrictHop, scanner: Any = None) -> tuple[int, GuardFactory]:
    upstream = Upstream(
        reactor, UpstreamSettings(hop.endpoint, hostname="guard.test", keep_time=KEEP_TIME, timeout=SETTLE)
    )
    pipeline = Pipeline(reactor, scanner or FixedScanner(ScanResult.clean()), DefaultPolicy())
    factory = GuardFactory(reactor, upstream, pipeline.process, ServerSettings(hostname="guard.test"))
    return await listen(listening, factory), factory


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait, a reactor turn at a time and at most SETTLE seconds, for ``condition``."""
    deadline = reactor.seconds() + SETTLE
    while not condition():
        assert reactor.seconds() < deadline, f"never happened: {what}"
        await task.deferLater(reactor, 0.01, lambda: None)


def send_one(port: int, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=SETTLE) as client:
        client.ehlo()
        client.mail(SENDER)
        client.rcpt(RECIPIENT)
        return client.data(data)


def original(queued: bytes) -> bytes:
    """The message a client sent, from what the next hop queued: smtpguard's
    trace headers (and only those) come off the top."""
    lines = queued.split(b"\r\n")
    while lines and lines[0].startswith(TRACE_PREFIXES):
        lines.pop(0)
    return b"\r\n".join(lines)


async def afterwards(port: int, hop: StrictHop, told_250: list[bytes], queued_unheard: int = 0) -> None:
    """The checks after every stage."""
    tag = message("after")
    code, _ = await threads.deferToThread(send_one, port, tag)
    assert code == 250
    told_250.append(tag)
    await hop.wait_for_open(0).addTimeout(KEEP_TIME + SETTLE, reactor)
    assert not hop.out_of_state, [c.replies for c in hop.connections if c.out_of_state]
    assert [c.improper_pipelining for c in hop.connections if c.improper_pipelining] == []
    delivered = [original(queued.data) for queued in hop.queued]
    assert sorted(delivered) == sorted(told_250 + delivered[: len(delivered) - len(told_250)])
    assert len(delivered) == len(told_250) + queued_unheard
    assert all(data in delivered for data in told_250)


# -- before the message: the next hop's session is set up or in a transaction -----------


@pytest.mark.parametrize(
    ("gate", "sent"),
    [
        ("greeting", commands("EHLO client.test", f"MAIL FROM:<{SENDER}>")),
        ("ehlo", commands("EHLO client.test", f"MAIL FROM:<{SENDER}>")),
        ("mail", commands("EHLO client.test", f"MAIL FROM:<{SENDER}>")),
        ("rcpt", ENVELOPE),
    ],
)
@pytest_twisted.ensureDeferred
async def test_client_leaving_while_the_next_hop_answers(
    listening: list[Any], strict_hop: StrictHop, gate: str, sent: bytes
) -> None:
    """Clients that leave while the next hop has not greeted, or not answered
    EHLO, MAIL or RCPT: its connections are cut or reset, never handed on half
    set up; the next client's message is delivered with no 503."""
    port, _ = await start(listening, strict_hop)
    held = getattr(strict_hop.gates, gate)
    held.close()
    clients = [await connect(port, sent) for _ in range(CLIENTS)]
    await held.wait(CLIENTS).addTimeout(SETTLE, reactor)
    await defer.gatherResults([client.leave() for client in clients])
    held.open()
    await afterwards(port, strict_hop, [])


@pytest_twisted.ensureDeferred
async def test_client_leaving_during_the_data_upload(listening: list[Any], strict_hop: StrictHop) -> None:
    """Clients that leave half-way through sending their message: the next hop's
    transaction is ended, nothing is queued."""
    port, _ = await start(listening, strict_hop)
    clients = [await connect(port, ENVELOPE + commands("DATA")) for _ in range(CLIENTS)]
    for client in clients:
        await client.wait_for_replies(5)  # greeting, EHLO, MAIL, RCPT, 354
        client.transport.write(message("partial")[:40])  # type: ignore[union-attr]
    await defer.gatherResults([client.leave() for client in clients])
    await afterwards(port, strict_hop, [])


@pytest_twisted.ensureDeferred
async def test_client_leaving_during_the_scan(listening: list[Any], strict_hop: StrictHop) -> None:
    """Clients that leave while their message is being scanned: when the scan
    ends, nothing is relayed (the next hop never sees their message)."""
    scanner = FixedScanner(None)
    port, _ = await start(listening, strict_hop, scanner)
    data = message("scanned")
    clients = [await connect(port, ENVELOPE + commands("DATA")) for _ in range(CLIENTS)]
    for client in clients:
        await client.wait_for_replies(5)
        client.transport.write(data + b".\r\n")  # type: ignore[union-attr]
    await until(lambda: len(scanner.pending) == CLIENTS, "every message is being scanned")
    await defer.gatherResults([client.leave() for client in clients])
    for pending in scanner.pending:
        pending.callback(ScanResult.clean("fixed"))
    scanner._result = ScanResult.clean()
    await afterwards(port, strict_hop, [])
    assert strict_hop.cut_off == []


# -- the message on its way to the next hop -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_leaving_while_its_message_streams_to_the_next_hop(
    listening: list[Any], strict_hops: Any
) -> None:
    """Clients that leave while their message is being written to the next hop
    (which reads slowly): the next hop is cut off before the end of data and
    queues nothing; no QUIT is written into the message."""
    hop: StrictHop = strict_hops(message_size_limit=64 * 1024 * 1024)
    port, factory = await start(listening, hop)
    big = message("big", size=24 * 1024 * 1024)
    hop.gates.rcpt.close()
    clients = [await connect(port, ENVELOPE + commands("DATA")) for _ in range(CLIENTS)]
    held = await hop.gates.rcpt.wait(CLIENTS).addTimeout(SETTLE, reactor)
    for connection in held:
        connection.transport.pauseProducing()  # the next hop stops reading
    hop.gates.rcpt.open()
    for client in clients:
        await client.wait_for_replies(5)
        client.transport.write(big + b".\r\n")  # type: ignore[union-attr]

    def streaming() -> bool:
        states = [session._relay.state for session in factory.sessions if session._relay is not None]
        return states.count(HopState.STREAMING) == CLIENTS

    await until(streaming, "every message streams to the next hop")
    await defer.gatherResults([client.leave() for client in clients])
    for connection in held:
        connection.transport.resumeProducing()
    await until(lambda: len(hop.cut_off) == CLIENTS, "the next hop saw every message cut off")
    assert all(b"QUIT" not in cut.data for cut in hop.cut_off)
    await afterwards(port, hop, [])


@pytest_twisted.ensureDeferred
async def test_client_leaving_while_the_final_reply_is_awaited(listening: list[Any], strict_hop: StrictHop) -> None:
    """Clients that leave after their end of data reached the next hop, before its
    reply: the message is the next hop's (queued once, byte for byte), smtpguard
    waits for that reply, and the connection serves the next client cleanly.
    This is SMTP's own window (RFC 1047): those clients will send again."""
    port, _ = await start(listening, strict_hop)
    strict_hop.gates.end_of_data.close()
    sent = [message(f"unheard-{index}") for index in range(CLIENTS)]
    clients = [await connect(port, ENVELOPE + commands("DATA")) for _ in range(CLIENTS)]
    for client, data in zip(clients, sent, strict=True):
        await client.wait_for_replies(5)
        client.transport.write(data + b".\r\n")  # type: ignore[union-attr]
    await strict_hop.gates.end_of_data.wait(CLIENTS).addTimeout(SETTLE, reactor)
    await defer.gatherResults([client.leave() for client in clients])
    strict_hop.gates.end_of_data.open()
    await afterwards(port, strict_hop, [], queued_unheard=CLIENTS)
    assert sorted(original(queued.data) for queued in strict_hop.queued[:CLIENTS]) == sorted(sent)


@pytest_twisted.ensureDeferred
async def test_clients_leaving_at_every_stage_at_once(listening: list[Any], strict_hop: StrictHop) -> None:
    """Clients leaving before the greeting, during EHLO, MAIL and RCPT, and
    during the upload, all at once, amid clients that finish: every finished
    message is delivered once, nothing else is queued, and no 503 is heard."""
    port, _ = await start(listening, strict_hop)
    told_250: list[bytes] = []
    for round_ in range(3):
        leaving = [
            await connect(port, commands("EHLO client.test", f"MAIL FROM:<{SENDER}>")),
            await connect(port, ENVELOPE),
            await connect(port, ENVELOPE + commands("DATA") + message("cut")[:30]),
        ]
        finishing = [threads.deferToThread(send_one, port, message(f"done-{round_}-{i}")) for i in range(2)]
        await defer.gatherResults([client.leave() for client in leaving])
        for reply in await defer.gatherResults(finishing):
            assert reply[0] == 250
        told_250 += [message(f"done-{round_}-{i}") for i in range(2)]
    await afterwards(port, strict_hop, told_250)


@pytest_twisted.ensureDeferred
async def test_client_hears_250_only_after_the_strict_next_hop_said_250(
    listening: list[Any], strict_hop: StrictHop
) -> None:
    """While the next hop (as strict as Postfix's smtpd) holds its reply to the end
    of data, the client hears nothing for its message, for as many reactor turns as
    it takes the next hop to answer; then it hears exactly the next hop's 250."""
    port, _ = await start(listening, strict_hop)
    strict_hop.gates.end_of_data.close()
    client = await connect(port, ENVELOPE + commands("DATA"))
    await client.wait_for_replies(5)  # greeting, EHLO, MAIL, RCPT, 354
    client.transport.write(message("held") + b".\r\n")  # type: ignore[union-attr]
    await strict_hop.gates.end_of_data.wait(1).addTimeout(SETTLE, reactor)
    for _ in range(20):
        await task.deferLater(reactor, 0, lambda: None)
    assert (client.replies, strict_hop.queued) == (5, [])
    strict_hop.gates.end_of_data.open()
    await client.wait_for_replies(6)
    [queued] = strict_hop.queued
    size = len(queued.data)  # relayed with BDAT: Postfix counts the bytes it stored
    assert client.heard.split(b"\r\n")[-2] == f"250 2.0.0 Ok: {size} bytes queued as {queued.queue_id}".encode()
    await client.leave()
