"""Stopping without losing an outcome: idle sessions are told 421 at once, a
session waiting for its message's outcome gets it first, and the service waits."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from smtpguard import replies
from smtpguard.smtpclient import SMTPClientProtocol
from smtpguard.tap import Drain, Shared
from smtpguard.upstream import Upstream, UpstreamSettings
from tests.test_chain import Held
from tests.test_server import Session, ready

QUEUED = replies.OK.with_text("Ok: queued").to_bytes()


def waiting_for_the_next_hop() -> Session:
    """A session whose message is with a next hop that holds its replies."""
    session = ready()
    session.begin()
    session.hop.hold = True
    session.send(b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    return session


def test_idle_session_is_told_421_at_once():
    """An idle session gets 421 4.3.2 and is closed when the factory drains."""
    session = ready()
    session.factory.drain()
    assert session.replies() == [replies.SHUTTING_DOWN.to_bytes()]
    assert session.closed


def test_busy_session_gets_its_outcome_before_421():
    """A session whose message is with the next hop hears the outcome, then 421."""
    session = waiting_for_the_next_hop()
    session.replies()
    session.factory.drain()
    assert session.replies() == [] and not session.closed
    session.hop.release()
    assert session.replies() == [QUEUED, replies.SHUTTING_DOWN.to_bytes()]
    assert session.closed


def test_new_connection_while_draining_is_refused():
    """A connection accepted while draining gets 421 4.3.2 instead of the greeting."""
    session = ready()
    session.factory.drain()
    late = session.another()
    assert late.replies() == [replies.SHUTTING_DOWN.to_bytes()]


def test_drain_service_waits_for_pending_outcomes():
    """Stopping the Drain service fires only once every session has had its
    outcome and its connection is gone (or at its timeout): until then the
    outcome may still be in the connection's write buffer."""
    session = waiting_for_the_next_hop()
    clock: Clock = session.clock
    drain = Drain(clock, [session.factory], timeout=30.0)
    drain.startService()
    stopped = drain.stopService()
    clock.advance(1.0)
    assert not stopped.called
    session.hop.release()
    clock.advance(0.1)
    assert session.closed and not stopped.called
    session.lose()
    clock.advance(0.1)
    assert stopped.called


def test_drain_service_gives_up_at_its_timeout():
    """A next hop that never answers does not hold the shutdown past the timeout."""
    session = waiting_for_the_next_hop()
    clock: Clock = session.clock
    drain = Drain(clock, [session.factory], timeout=5.0)
    drain.startService()
    stopped = drain.stopService()
    clock.advance(4.9)
    assert not stopped.called
    clock.advance(0.2)
    assert stopped.called


def test_drain_service_releases_what_was_shared_once_the_sessions_are_done():
    """``release`` runs only after the last pending outcome, and stopping waits
    for it."""
    session = waiting_for_the_next_hop()
    clock: Clock = session.clock
    releasing: Deferred[None] = Deferred()
    calls: list[None] = []

    def release() -> Deferred[None]:
        calls.append(None)
        return releasing

    drain = Drain(clock, [session.factory], timeout=30.0, release=release)
    drain.startService()
    stopped: list[None] = []
    drain.stopService().addCallback(stopped.append)
    clock.advance(1.0)
    assert calls == []
    session.hop.release()
    session.lose()
    clock.advance(0.1)
    assert calls == [None] and stopped == []
    releasing.callback(None)
    assert stopped == [None]


def test_shared_close_closes_the_scanners_and_the_kept_next_hop_connections():
    """Closing what the listeners share closes the scanner and tells every kept
    next-hop connection QUIT: no timer and no connection is left."""
    clock = MemoryReactorClock()
    upstream = Upstream(clock, UpstreamSettings("tcp:127.0.0.1:10026", hostname="guard.test"))
    protocol, transport = SMTPClientProtocol(), StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"220 next.hop ESMTP\r\n")
    protocol.set_up = True
    upstream.kept.give(protocol)
    scanner = Held()
    closed: list[None] = []
    Shared(scanner, upstream).close().addCallback(closed.append)
    assert scanner.closed == 1 and closed == []
    scanner.closing.callback(None)
    assert len(upstream.kept) == 0
    assert transport.value() == b"QUIT\r\n" and transport.disconnecting
    assert closed == []  # until the connection is gone
    protocol.connectionLost(Failure(ConnectionDone()))
    assert closed == [None]
    assert clock.getDelayedCalls() == []
