"""Replies back-pressure the client: a client that sends without reading its
replies stops being read once the transport cannot write, so a session's memory
stays bounded whatever the client sends or fails to read."""

from __future__ import annotations

import socket
from typing import Any

import pytest_twisted
from twisted.internet import reactor, threads

from smtpguard import replies
from smtpguard.pipeline import Pipeline
from smtpguard.policies.default import DefaultPolicy
from smtpguard.results import ScanResult
from smtpguard.server import ESMTPServer, GuardFactory
from smtpguard.settings import ServerSettings
from smtpguard.testing import FixedScanner, MemoryNextHop
from tests.conftest import listen
from tests.test_server import ready

NOOP = b"NOOP\r\n"


def test_session_is_the_transports_streaming_producer():
    """Each session registers itself as its transport's streaming producer."""
    s = ready()
    assert (s.transport.producer, s.transport.streaming) == (s.proto, True)


def test_full_write_buffer_stops_reading_and_answering():
    """When the transport says its write buffer is full, the session answers no
    more commands, and stops reading once its backlog passes 256 KiB; when the
    buffer drains, the backlog is answered in order and reading goes on."""
    s = ready()
    s.proto.pauseProducing()  # as the transport does past its buffer size
    s.send(NOOP * 10)
    assert (s.replies(), s.transport.producerState) == ([], "producing")
    s.send(NOOP * 50_000)  # past the backlog a session holds
    assert (s.replies(), s.transport.producerState) == ([], "paused")
    s.proto.resumeProducing()
    assert s.replies() == [replies.OK.to_bytes()] * 50_010
    assert s.transport.producerState == "producing"


def test_full_write_buffer_mid_backlog_stops_at_that_reply():
    """The transport filling up while a pipelined backlog is answered stops the
    session right after the reply that filled it."""
    s = ready()
    written: list[bytes] = []

    def write(data: bytes) -> None:
        written.append(data)
        if len(written) == 3:
            s.proto.pauseProducing()

    s.transport.write = write  # type: ignore[method-assign]
    s.send(NOOP * 10)
    assert written == [replies.OK.to_bytes()] * 3
    s.proto.resumeProducing()
    assert written == [replies.OK.to_bytes()] * 10


def _pending_output(session: ESMTPServer) -> int:
    """Bytes written by the session that its TCP transport still holds."""
    transport: Any = session.transport
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def flood(port: int, total: int) -> tuple[int, socket.socket]:
    """Send up to ``total`` bytes of NOOP, never reading; the bytes the kernel took
    before the server stopped reading (a send that makes no progress for a second),
    and the connection, still open."""
    client = socket.create_connection(("127.0.0.1", port))
    client.settimeout(1.0)
    block = NOOP * 10_000
    sent = 0
    try:
        while sent < total:
            sent += client.send(block)
    except TimeoutError:
        pass
    return sent, client


@pytest_twisted.ensureDeferred
async def test_regression_client_that_never_reads_is_not_read_either(listening: list[Any]) -> None:
    """A client that pipelines 100 MB of NOOP and never reads: smtpguard stops
    reading once its replies cannot be written, so the client gets stuck far
    short of 100 MB, and the session holds a bounded backlog and bounded output."""
    hop = MemoryNextHop()
    pipeline = Pipeline(reactor, FixedScanner(ScanResult.clean()), DefaultPolicy())
    factory = GuardFactory(reactor, hop, pipeline.process, ServerSettings(hostname="guard.test"))
    port = await listen(listening, factory)
    total = 100 * 1024 * 1024
    sent, client = await threads.deferToThread(flood, port, total)
    try:
        assert sent < total // 4
        [session] = list(factory.sessions)
        assert session._write_blocked
        assert _pending_output(session) < 256 * 1024
        assert len(session._buffer) < 1024 * 1024
    finally:
        client.close()
