"""The clamd scanner: streams each message to ClamAV's clamd with INSTREAM, over one
or more client endpoints used in turn, with failover and PING health checks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpguard.envelope import Envelope
from smtpguard.interfaces import IClosable, IHealthReporting, IScanner
from smtpguard.keptpool import Kept
from smtpguard.results import ErrorKind, ScanResult, SizeLimit, Verdict
from smtpguard.scanners import clamd_protocol as wire
from smtpguard.scanners.clamd_session import Chunks, Received, Sender, SessionProtocol, kept_sessions
from smtpguard.scanners.deadline import with_deadline
from smtpguard.scanners.optional import EndpointHealth, Health, oversize
from smtpguard.spool import Message

log = Logger()

# Bigger chunks mean fewer writes and reactor turns per message; clamd copies each
# to its temporary file as it arrives, so their size costs it no memory.
CHUNK_SIZE = 256 * 1024


@attrs.frozen
class ClamdSettings:
    timeout: float = 60.0
    stream_max_length: int = wire.DEFAULT_STREAM_MAX_LENGTH
    health_check_interval: float = 10.0
    chunk_size: int = CHUNK_SIZE
    # Idle IDSESSION connections kept per endpoint (0: a connection per scan), and
    # for how long.
    keep_connections: int = 10
    keep_time: float = 10.0


@attrs.define(eq=False)
class EndpointState:
    """One clamd address and what we know about it."""

    description: str
    endpoint: IStreamClientEndpoint
    up: bool = True
    last_error: str = ""
    # The smallest message clamd answered "INSTREAM size limit exceeded" for: its
    # StreamMaxLength is below that, so no message this big is sent there again
    # (until the endpoint has been down and back, perhaps with a new clamd.conf).
    refused_at: int | None = None
    scans: int = 0
    failures: int = 0
    connections: int = 0  # opened for scans
    ping: Deferred[Any] | None = None
    waiting: list[Deferred[None]] = attrs.Factory(list)
    kept: Kept[SessionProtocol] | None = None


class _OneShotFactory(Factory):
    """connectProtocol's factory, quiet: no "Starting factory" log line per scan."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


def _connect(endpoint: IStreamClientEndpoint, protocol: Protocol) -> Deferred[Any]:
    return endpoint.connect(_OneShotFactory(protocol))


class InstreamProtocol(Sender):
    """One ``zINSTREAM`` scan: sends the message and collects everything clamd says
    until it closes the connection (which it does after an INSTREAM reply outside
    an IDSESSION). ``done`` fires with a :class:`Received`; cancelling it aborts
    the connection."""

    def __init__(self, message: Message, chunk_size: int) -> None:
        self._message = message
        self._chunk_size = chunk_size
        self._reply = bytearray()
        self._producer: Chunks | None = None
        self._early = False
        self.done: Deferred[Received] = Deferred(self._cancel)

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(wire.INSTREAM)
        self._producer = Chunks(self, self._message.chunks(self._chunk_size))
        self.transport.registerProducer(self._producer, False)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        if self._producer is None or not self._producer.finished:
            self._early = True
        self._reply += data
        if len(self._reply) > wire.MAX_REPLY:
            self.give_up(f"reply longer than {wire.MAX_REPLY} bytes")

    def give_up(self, problem: str) -> None:
        self._finish(Received(problem=problem))
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(Exception("connection lost"))) -> None:
        if self._producer is not None:
            self._producer.stopProducing()
        self._finish(Received(reply=bytes(self._reply), early=self._early))

    def _finish(self, received: Received) -> None:
        if not self.done.called:
            self.done.callback(received)

    def _cancel(self, done: Deferred[Received]) -> None:
        if self._producer is not None:
            self._producer.stopProducing()
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class PingProtocol(Protocol):
    """``zPING``: ``done`` fires with True when clamd answers ``PONG``."""

    def __init__(self) -> None:
        self._reply = b""
        self.done: Deferred[bool] = Deferred(self._cancel)

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(wire.PING)

    def dataReceived(self, data: bytes) -> None:
        self._reply += data
        if b"\0" in self._reply or len(self._reply) > len(wire.PONG) + 1:
            if not self.done.called:
                self.done.callback(self._reply.split(b"\0")[0] == wire.PONG)
            assert self.transport is not None
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(Exception("connection lost"))) -> None:
        if not self.done.called:
            self.done.callback(False)

    def _cancel(self, done: Deferred[bool]) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


@implementer(IScanner, IClosable, IHealthReporting)
class ClamdScanner:
    """Scans with clamd at ``endpoints`` (descriptions and Twisted client endpoints).

    Each scan uses the next endpoint that is up, in turn; one that cannot be
    reached, answers nothing or misses the deadline is marked down and the next
    one is tried (only for failures to connect: a message is never sent twice).
    Endpoints marked down are PINGed every ``health_check_interval`` seconds, or
    at once when a scan finds none up, and used again once they answer PONG.
    """

    name = "clamd"

    def __init__(
        self, reactor: Any, endpoints: Sequence[tuple[str, IStreamClientEndpoint]], settings: ClamdSettings
    ) -> None:
        if not endpoints:
            raise ValueError("at least one clamd endpoint is needed")
        self._reactor = reactor
        self._settings = settings
        self.endpoints = tuple(EndpointState(description, endpoint) for description, endpoint in endpoints)
        if settings.keep_connections:
            for state in self.endpoints:
                state.kept = kept_sessions(reactor, settings.keep_connections, settings.keep_time)
        self._turn = 0
        self._timer: IDelayedCall | None = None
        self._stopped = False

    @property
    def max_size(self) -> SizeLimit:
        """Bigger messages are not sent: they are a ``content-size`` error."""
        return SizeLimit(
            self._settings.stream_max_length, "stream_max_length", "together with StreamMaxLength in clamd.conf"
        )

    def scan(self, message: Message, envelope: Envelope) -> Deferred[ScanResult]:
        scanning = Deferred.fromCoroutine(self._scan(message))
        return with_deadline(scanning, self._settings.timeout, self._reactor, self.name)

    async def _scan(self, message: Message) -> ScanResult:
        too_big = oversize(message.size, self.max_size, self.name)
        if too_big is not None:
            return too_big
        live = self._in_turn()
        if not live:
            # A Deferred of our own: cancelling the scan ends the wait, not the PINGs.
            checked: Deferred[None] = Deferred()
            self.check_health().addCallback(_fire, checked)
            await checked
            live = self._in_turn()
        fitting = [state for state in live if state.refused_at is None or message.size < state.refused_at]
        if live and not fitting:
            smallest = min(state.refused_at or 0 for state in live)
            return self._failed(ErrorKind.CONTENT_SIZE, f"clamd's StreamMaxLength is below {smallest} bytes")
        for state in fitting:
            kept = state.kept is not None
            received = await (self._on_session(state, message) if kept else self._alone(state, message))
            if received is not None:
                return self._result(state, message, received)
        return self._failed(ErrorKind.ENGINE_NOT_READY, self._unavailable())

    async def _connected(self, state: EndpointState, protocol: Protocol) -> bool:
        """Whether ``protocol`` got connected to ``state``'s clamd (if not, it is down)."""
        try:
            await _connect(state.endpoint, protocol)
        except (CancelledError, ConnectingCancelledError):
            self._mark_down(state, "not connected before the deadline")
            raise CancelledError() from None
        except Exception as error:
            self._mark_down(state, str(error))
            return False
        state.connections += 1
        return True

    async def _answer(self, state: EndpointState, answer: Deferred[Received]) -> Received:
        try:
            return await answer
        except CancelledError:
            self._mark_down(state, "no reply before the deadline")
            raise

    async def _alone(self, state: EndpointState, message: Message) -> Received | None:
        """The scan on a connection of its own, which clamd closes after answering;
        None if clamd could not be reached."""
        protocol = InstreamProtocol(message, self._settings.chunk_size)
        if not await self._connected(state, protocol):
            return None
        state.scans += 1
        return await self._answer(state, protocol.done)

    async def _on_session(self, state: EndpointState, message: Message) -> Received | None:
        """The scan on a kept IDSESSION connection, or a new one; None if clamd could
        not be reached.  clamd may have ended a kept session just as the message
        went out (a restart; its idle timeout, saying "COMMAND READ TIMED OUT"):
        closed with nothing said of this scan, it is made once more on a new
        connection.  (A new connection that closes unanswered is an error:
        a message that brings clamd down is not sent to it again and again.)"""
        assert state.kept is not None
        kept = state.kept.take()
        state.scans += 1
        if kept is not None:
            received = await self._answer(state, kept.scan(message))
            if (received.reply and not received.unasked) or received.problem:
                state.kept.give(kept)
                return received
        protocol = SessionProtocol(self._settings.chunk_size)
        if not await self._connected(state, protocol):
            if kept is not None:
                return Received()  # sent once, unanswered: not sent anywhere else
            state.scans -= 1
            return None
        received = await self._answer(state, protocol.scan(message))
        state.kept.give(protocol)
        return received

    def _result(self, state: EndpointState, message: Message, received: Received) -> ScanResult:
        if received.problem:
            return self._failed(ErrorKind.OTHER, received.problem)
        reply = wire.split_reply(received.reply)
        if not reply.lines and not reply.rest:
            self._mark_down(state, "connection closed without a reply")
        if any(line.startswith("INSTREAM size limit exceeded") for line in reply.lines):
            state.refused_at = min(state.refused_at or message.size, message.size)
        result = wire.classify(reply, self.name)
        if received.early and result.verdict is Verdict.CLEAN:
            # clamd answers early only to refuse (its size limit): "OK" before the
            # end of the stream says nothing of the rest of the message.
            return self._failed(ErrorKind.OTHER, "clamd said OK before the whole message was sent")
        return result

    def _failed(self, kind: ErrorKind, detail: str) -> ScanResult:
        return ScanResult.failed(kind, detail, self.name)

    def _in_turn(self) -> list[EndpointState]:
        """The endpoints that are up, starting one further each time (round robin)."""
        live = [state for state in self.endpoints if state.up]
        if not live:
            return live
        start = self._turn % len(live)
        self._turn += 1
        return live[start:] + live[:start]

    def _unavailable(self) -> str:
        return "; ".join(f"{state.description}: {state.last_error or 'down'}" for state in self.endpoints)

    # -- health -----------------------------------------------------------------------

    def _mark_down(self, state: EndpointState, error: str) -> None:
        state.failures += 1
        state.last_error = error
        if state.up:
            log.warn("clamd at {endpoint} is not available: {error}", endpoint=state.description, error=error)
            state.up = False
        if state.kept is not None:
            state.kept.empty()  # not closed: once the endpoint is back, its sessions are kept again
        self._schedule_check()

    def _schedule_check(self) -> None:
        if self._timer is None and not self._stopped and not all(state.up for state in self.endpoints):
            self._timer = self._reactor.callLater(self._settings.health_check_interval, self._periodic_check)

    def _periodic_check(self) -> None:
        self._timer = None
        self.check_health().addCallback(lambda _: self._schedule_check())

    def health(self) -> Health:
        """Up or down as the last scan or PING found each endpoint (those down
        are PINGed every ``health_check_interval`` seconds); working while one is up."""
        endpoints = tuple(EndpointHealth(self.name, state.description, state.up) for state in self.endpoints)
        working = any(state.up for state in self.endpoints)
        return Health(working, endpoints, "" if working else f"{self.name}: {self._unavailable()}")

    def check(self) -> Deferred[None]:
        """PING every endpoint, up or down; fires (never fails) when every PING
        has ended: those that answer PONG are up, the others down."""
        return self._ping_all([state for state in self.endpoints if not self._stopped])

    def check_health(self) -> Deferred[None]:
        """PING every endpoint marked down; those that answer PONG are used again.

        @return: a Deferred that fires (never fails) when every PING has ended.
        """
        return self._ping_all([state for state in self.endpoints if not state.up])

    def _ping_all(self, states: list[EndpointState]) -> Deferred[None]:
        waits = [self._wait_for_ping(state) for state in states]
        return defer.DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    def _wait_for_ping(self, state: EndpointState) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        state.waiting.append(waiter)
        if state.ping is None:
            seconds = min(self._settings.timeout, self._settings.health_check_interval)
            ping: Deferred[str] = Deferred.fromCoroutine(self._ping(state.endpoint))
            state.ping = ping
            # Set before the callbacks: a PING that fails at once has ended when they run.
            ping.addTimeout(seconds, self._reactor, onTimeoutCancel=lambda _, __: f"no PONG within {seconds:g} s")
            ping.addCallbacks(self._pinged, self._ping_failed, (state,), errbackArgs=(state,))
        return waiter

    async def _ping(self, endpoint: IStreamClientEndpoint) -> str:
        protocol = PingProtocol()
        try:
            await _connect(endpoint, protocol)
        except (CancelledError, ConnectingCancelledError):
            raise CancelledError() from None
        except Exception as error:
            return str(error)
        return "" if await protocol.done else "no PONG in the reply"

    def _ping_failed(self, failure: Failure, state: EndpointState) -> None:
        self._pinged(f"PING failed: {failure.getErrorMessage() or failure.value!r}", state)

    def _pinged(self, error: str, state: EndpointState) -> None:
        state.ping = None
        if not error:
            if not state.up:
                log.info("clamd at {endpoint} answers again", endpoint=state.description)
            state.up = True
            state.refused_at = None
        elif state.up:
            self._mark_down(state, error)
        else:
            state.last_error = error
        waiting, state.waiting = state.waiting, []
        for waiter in waiting:
            _fire(None, waiter)

    def close(self) -> Deferred[None]:
        """Stop the health checks: the next one is not scheduled any more, and the
        PINGs under way are aborted; end the kept connections, and those of the
        scans under way as they finish.  Fires once the kept connections are gone."""
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for state in self.endpoints:
            if state.ping is not None:
                state.ping.cancel()
        closing = [state.kept.close() for state in self.endpoints if state.kept is not None]
        return defer.gatherResults(closing).addCallback(lambda _: None)


def _fire(result: object, waiter: Deferred[None]) -> None:
    """Fire ``waiter`` unless it has been cancelled meanwhile."""
    if not waiter.called:
        waiter.callback(None)
