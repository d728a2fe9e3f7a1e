"""clamd ending a kept IDSESSION connection its own way (its CommandReadTimeout)
just as the next scan starts, against the kept clamd sessions: clamd is driven
with StringTransport, or scripted on a loopback unix socket behind the proxy."""

from __future__ import annotations

from pathlib import Path

import pytest_twisted
from twisted.internet import threads
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol

from smtpguard import replies
from tests.engines import EICAR
from tests.strict_hop import StrictHop
from tests.test_attack_issue13 import listen, send, smtplib_reply, start_guard
from tests.test_clamd import (
    CLEAN,
    CLEAN_RESULT,
    ENVELOPE,
    FakeEndpoint,
    framed,
    infected,
    message,
    result_of,
    scanned_in_session,
    sessions,
)
from tests.test_clamd import listening as listening  # the fixture
from tests.test_twistd import smtpguard as smtpguard  # the fixture

# What clamd 1.4 writes on an IDSESSION connection when no command came within its
# CommandReadTimeout, before it closes the connection: no request number, a newline.
COMMAND_READ_TIMED_OUT = b"COMMAND READ TIMED OUT\n"


# -- 4. clamd's CommandReadTimeout on a kept session -----------------------------------------


def test_command_read_timed_out_on_a_kept_session_is_scanned_again_on_a_new_connection() -> None:
    """clamd ends a kept IDSESSION connection at its CommandReadTimeout with
    ``COMMAND READ TIMED OUT`` (no request number) just as the next message goes
    out: that line is about the idle connection, not the message, as a close
    without a word would be.  The message is sent once more on a new connection
    and its answer (EICAR found) counts.  Now the scan is an ``other`` error
    (``unexpected reply from clamd: b'COMMAND READ TIMED OUT\\n'``) and no new
    connection is made."""
    endpoint = FakeEndpoint()
    clamd, _ = sessions(endpoint)
    assert scanned_in_session(endpoint, clamd, 1) == CLEAN_RESULT
    scanning = clamd.scan(message(CLEAN + EICAR), ENVELOPE)
    endpoint.drain()
    endpoint.answer(COMMAND_READ_TIMED_OUT)

    assert endpoint.attempts == 2
    endpoint.drain()
    assert endpoint.last[1].value() == b"zIDSESSION\0zINSTREAM\0" + framed(CLEAN + EICAR)
    endpoint.answer(b"1: stream: Eicar-Signature FOUND\0")
    assert result_of(scanning) == infected("Eicar-Signature")
    assert clamd.endpoints[0].up


class IdleTimingOutClamd(Protocol):
    """A clamd whose sessions answer the first INSTREAM ``1: stream: OK`` (or
    ``1: stream: Eicar-Signature FOUND`` when the stream holds EICAR, then
    close), and meet a second INSTREAM as clamd does when its CommandReadTimeout
    ran out just before it came: ``COMMAND READ TIMED OUT`` and close."""

    def __init__(self, connections: list[int]) -> None:
        self._connections = connections
        self._received = b""
        self._answered = 0

    def connectionMade(self) -> None:
        self._connections.append(0)

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self._received += data
        self._connections[-1] = self._received.count(b"zINSTREAM\0")
        if self._answered == 0 and self._received.endswith(b"\0\0\0\0"):
            self._answered = 1
            if EICAR in self._received:
                self.transport.write(b"1: stream: Eicar-Signature FOUND\0")
                self.transport.loseConnection()
                return
            self.transport.write(b"1: stream: OK\0")
        elif self._answered == 1 and self._received.count(b"zINSTREAM\0") == 2:
            self._answered = 2
            self.transport.write(COMMAND_READ_TIMED_OUT)
            self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_clamds_read_timeout_on_a_kept_session_does_not_defer_the_next_message(
    tmp_path: Path, listening: list[IListeningPort], strict_hop: StrictHop
) -> None:
    """Through the proxy, a clean message and then one with EICAR, to a clamd on
    a unix socket that ends the kept session with ``COMMAND READ TIMED OUT``
    when the second INSTREAM arrives on it: the second message is scanned again
    on a new connection and refused ``554 5.7.1`` as infected, and the next hop
    gets only the first.  Now the client hears ``451 4.7.1`` (scan failed)."""
    connections: list[int] = []
    socket_path = tmp_path / "clamd.sock"
    await listen(listening, Factory.forProtocol(lambda: IdleTimingOutClamd(connections)), f"unix:{socket_path}")
    port = await start_guard(
        listening, strict_hop.endpoint, [{"type": "clamd", "endpoint": f"unix:{socket_path}", "timeout": 20}]
    )
    body = b"From: <alice@example.org>\r\nTo: <bob@example.net>\r\nSubject: %s\r\n\r\n%s\r\n"

    first = await threads.deferToThread(send, port, body % (b"clean", b"Hello."))
    second = await threads.deferToThread(send, port, body % (b"eicar", EICAR))

    assert first[1][0] == 250
    rejected = replies.VIRUS_REJECTED.with_text("Message rejected: virus found (Eicar-Signature)")
    assert second[1] == smtplib_reply(rejected)
    assert connections == [2, 1]
    assert len(strict_hop.queued) == 1
