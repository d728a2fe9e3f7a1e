"""clamd connections that carry many scans (``zIDSESSION``), and the ones kept idle
between scans: a scan on a kept connection costs clamd and smtpguard no connect,
accept and close."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPullProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpguard.keptpool import Kept
from smtpguard.scanners import clamd_protocol as wire
from smtpguard.spool import Message

IDSESSION = b"zIDSESSION\0"
END = b"zEND\0"


@attrs.frozen
class Received:
    """How an INSTREAM conversation ended: what clamd said, or why we gave up."""

    reply: bytes = b""
    problem: str = ""
    # clamd answered before the end of the stream was written: whatever it said,
    # it did not say it of the whole message.
    early: bool = False
    # What clamd said carries no request number: not an answer to this scan but
    # about the session (its idle timeout: "COMMAND READ TIMED OUT").
    unasked: bool = False


class Sender(Protocol):
    """A protocol that streams a message to clamd: it gives up when the message
    cannot be read."""

    def give_up(self, problem: str) -> None:
        raise NotImplementedError


@implementer(IPullProducer)
class Chunks:
    """Writes the message as INSTREAM chunks, one each time the transport has sent
    the previous one; the zero-length chunk goes with the last (so a small message
    leaves in a single write, together with the command)."""

    def __init__(self, protocol: Sender, chunks: Iterator[bytes]) -> None:
        self._protocol = protocol
        self._chunks: Iterator[bytes] | None = chunks
        self._ahead: bytes | None = None
        self._started = False
        self.finished = False  # the end of the stream is written

    def resumeProducing(self) -> None:
        if self._chunks is None:
            return
        transport = self._protocol.transport
        assert transport is not None
        try:
            chunk = self._ahead if self._started else next(self._chunks, None)
            self._started = True
            # Reading one ahead tells whether this chunk is the last.
            self._ahead = None if chunk is None else next(self._chunks, None)
        except (OSError, ValueError) as error:  # ValueError: the message was closed
            self.stopProducing()
            self._protocol.give_up(f"cannot read the message: {error}")
            return
        pieces = [] if chunk is None else [wire.chunk_header(len(chunk)), chunk]
        if self._ahead is None:
            self.stopProducing()
            self.finished = True
            transport.unregisterProducer()  # type: ignore[attr-defined]
            pieces.append(wire.END_OF_STREAM)
        transport.writeSequence(pieces)

    def pauseProducing(self) -> None:
        """Pull producers are never paused."""

    def stopProducing(self) -> None:
        chunks, self._chunks = self._chunks, None
        if chunks is not None:
            getattr(chunks, "close", lambda: None)()


def _without_ids(data: bytes, request: int) -> bytes:
    """clamd's session reply with this request's ``N: `` prefixes taken off its lines
    (a line of another request keeps its prefix, and reads as an unexpected reply)."""
    prefix = b"%d: " % request
    *lines, rest = data.split(b"\0")
    return b"".join(line.removeprefix(prefix) + b"\0" for line in lines) + rest


class SessionProtocol(Sender):
    """A clamd connection in an IDSESSION, carrying one ``zINSTREAM`` at a time.

    clamd answers each with ``N: <reply>``.  A clean answer (``N: stream: OK``)
    leaves the connection ready for the next scan.  Any other answer ends the
    session (``zEND``, or the stream is cut if it was still being written), and
    the reply is all clamd says until it closes, as on a connection of its own:
    several FOUND lines with HeuristicScanPrecedence, say."""

    def __init__(self, chunk_size: int) -> None:
        self._chunk_size = chunk_size
        self.requests = 0  # INSTREAMs sent on this connection
        self._reply = bytearray()
        self._producer: Chunks | None = None
        self._done: Deferred[Received] | None = None
        self._ending = False
        self._early = False
        self.connected_ = False
        # Told when the connection is gone (by the pool that keeps it idle).
        self.when_lost: Callable[[SessionProtocol], None] | None = None
        self.gone: Deferred[None] = Deferred()

    @property
    def idle(self) -> bool:
        """Connected, in the session, with no scan under way."""
        return self.connected_ and self._done is None and not self._ending

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.connected_ = True
        self.transport.write(IDSESSION)

    def scan(self, message: Message) -> Deferred[Received]:
        """Send ``message`` with INSTREAM; fires with clamd's answer (cancelling it
        aborts the connection)."""
        assert self.idle and self.transport is not None
        self.requests += 1
        self._reply.clear()
        self._early = False
        self._done = Deferred(self._cancel)
        done = self._done
        self.transport.write(wire.INSTREAM)
        self._producer = Chunks(self, message.chunks(self._chunk_size))
        self.transport.registerProducer(self._producer, False)  # type: ignore[attr-defined]
        return done

    def dataReceived(self, data: bytes) -> None:
        if self._done is None:
            return self.give_up("clamd spoke without being asked")
        self._reply += data
        if len(self._reply) > wire.MAX_REPLY:
            return self.give_up(f"reply longer than {wire.MAX_REPLY} bytes")
        if self._ending:
            return None
        end = self._reply.find(b"\0")
        if end < 0:
            return None
        assert self._producer is not None and self.transport is not None
        if self._producer.finished and self._reply == b"%d: stream: OK\0" % self.requests:
            self._finish(Received(reply=b"stream: OK\0"))
            return None
        self._ending = True
        if self._producer.finished:
            self.transport.write(END)
        else:
            self._early = True
            self._producer.stopProducing()  # clamd closes after an early answer (its size limit)
        return None

    def give_up(self, problem: str) -> None:
        self._ending = True
        self._finish(Received(problem=problem))
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def end(self) -> None:
        """Close an idle connection: clamd ends the session when it reads ``zEND``
        (one that is not idle is closing already)."""
        if self.idle and self.transport is not None:
            self._ending = True
            self.transport.write(END)
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(Exception("connection lost"))) -> None:
        self.connected_ = False
        if self._producer is not None:
            self._producer.stopProducing()
        reply = bytes(self._reply)
        unasked = bool(reply) and not reply.startswith(b"%d: " % self.requests)
        self._finish(Received(reply=_without_ids(reply, self.requests), early=self._early, unasked=unasked))
        if self.when_lost is not None:
            self.when_lost(self)
        if not self.gone.called:
            self.gone.callback(None)

    def _finish(self, received: Received) -> None:
        done, self._done = self._done, None
        self._reply.clear()
        if done is not None and not done.called:
            done.callback(received)

    def _cancel(self, done: Deferred[Received]) -> None:
        self._ending = True
        self._done = None
        if self._producer is not None:
            self._producer.stopProducing()
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


def kept_sessions(reactor: IReactorTime, size: int, idle_time: float) -> Kept[SessionProtocol]:
    """Idle session connections to one clamd, kept for the next scans: at most
    ``size``, each for at most ``idle_time`` seconds.  clamd may end a session
    while it is kept (a restart): it is then forgotten."""
    return Kept(reactor, size, idle_time, usable=_idle, let_go=SessionProtocol.end, gone=_gone, watch=_watch)


def _idle(protocol: SessionProtocol) -> bool:
    return protocol.idle


def _gone(protocol: SessionProtocol) -> Deferred[None]:
    return protocol.gone


def _watch(protocol: SessionProtocol, told: Callable[[SessionProtocol], None] | None) -> None:
    protocol.when_lost = told
