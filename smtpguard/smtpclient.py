"""A small ESMTP client protocol: commands in, replies out, one Deferred each.

It keeps the server's EHLO capabilities, sends message data dot-stuffed from an
iterator of chunks with backpressure, and never buffers a whole message.  It
refuses to write a command while message data is being written: a command in
the middle of the data would become part of the message.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from twisted.internet import interfaces
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpguard.replies import Reply
from smtpguard.wire import dot_stuff

MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 200


class ProtocolViolation(Exception):
    """The server sent something that is not an SMTP reply."""


class WhileProducing(RuntimeError):
    """A command was about to be written into the message data: a bug of the caller."""


def parse_extensions(reply: Reply) -> dict[str, str]:
    """EHLO reply text -> {KEYWORD: parameters}; the first line is the greeting."""
    extensions: dict[str, str] = {}
    for line in reply.text.split("\n")[1:]:
        keyword, _, parameters = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = parameters
    return extensions


@implementer(interfaces.IPullProducer)
class _DataProducer:
    def __init__(self, transport: interfaces.ITransport, chunks: Iterator[bytes]) -> None:
        self._transport = transport
        self._chunks = chunks
        self.done: Deferred[None] = Deferred()

    def resumeProducing(self) -> None:
        try:
            chunk = next(self._chunks)
        except StopIteration:
            self._finish(None)
        except BaseException:
            self._finish(Failure())
        else:
            self._transport.write(chunk)

    def stopProducing(self) -> None:
        self._finish(Failure(ConnectionDone("stopped producing")))

    def _finish(self, failure: Failure | None) -> None:
        if not self.done.called:
            self._transport.unregisterProducer()  # type: ignore[attr-defined]
            if failure is None:
                self.done.callback(None)
            else:
                self.done.errback(failure)


def _after(first: bytes, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """``first`` joined to the first chunk: the command goes out in the same write."""
    head = next(chunks, b"")
    yield first + head
    yield from chunks


class SMTPClientProtocol(Protocol):
    """Sends commands and matches replies to them in order (so pipelining works)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._lines: list[bytes] = []
        self._waiting: deque[Deferred[Reply]] = deque()
        self._idle_waiters: list[Deferred[None]] = []
        self._producer: _DataProducer | None = None
        self.greeting: Deferred[Reply] = Deferred()
        self._waiting.append(self.greeting)
        self.extensions: dict[str, str] = {}
        self.connected_ = False
        self.tls = False
        # Set by the session once greeting, EHLO (and TLS) are done: only such
        # a connection may serve another session.
        self.set_up = False
        self.lost: Deferred[None] = Deferred()

    @property
    def idle(self) -> bool:
        """Connected, no reply outstanding, no data being written."""
        return self.connected_ and not self._waiting and self._producer is None

    def when_idle(self) -> Deferred[None]:
        """Fires once no reply is outstanding and no data is being written (at
        once if so now); fails if the connection is lost first."""
        waiter: Deferred[None] = Deferred()
        if not self.connected_:
            waiter.errback(ConnectionDone("not connected"))
        elif self.idle:
            waiter.callback(None)
        else:
            self._idle_waiters.append(waiter)
        return waiter

    def _check_idle(self) -> None:
        if self._idle_waiters and self.idle:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def connectionMade(self) -> None:
        self.connected_ = True
        # Commands and the end of data are small writes that must not wait for
        # the peer's delayed ACK (Nagle).
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\n")) >= 0:
            line, self._buffer = self._buffer[:end].rstrip(b"\r"), self._buffer[end + 1 :]
            self._line_received(line)
            if not self.connected_:
                return
        if len(self._buffer) > MAX_REPLY_LINE:
            self._violation("reply line too long")

    def _line_received(self, line: bytes) -> None:
        self._lines.append(line)
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b" ", b"-", b""):
            return self._violation(f"malformed reply {line[:80]!r}")
        if line[3:4] == b"-":
            if len(self._lines) > MAX_REPLY_LINES:
                self._violation("reply too long")
            return None
        lines, self._lines = self._lines, []
        if any(other[:3] != line[:3] for other in lines):
            return self._violation("inconsistent multi-line reply")
        if not self._waiting:
            return self._violation("unexpected reply")
        waiter = self._waiting.popleft()
        if not waiter.called:  # a waiter that timed out was cancelled
            waiter.callback(Reply.from_lines(lines))
        self._check_idle()
        return None

    def _violation(self, why: str) -> None:
        self._fail_all(Failure(ProtocolViolation(why)))
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _fail_all(self, failure: Failure) -> None:
        self.connected_ = False
        self.set_up = False
        waiting, self._waiting = self._waiting, deque()
        idle_waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiting:
            if not waiter.called:
                waiter.errback(failure)
        for idle_waiter in idle_waiters:
            idle_waiter.errback(failure)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._fail_all(reason)
        if not self.lost.called:
            self.lost.callback(None)

    def expect_reply(self) -> Deferred[Reply]:
        waiter: Deferred[Reply] = Deferred()
        if not self.connected_:
            waiter.errback(ConnectionDone("not connected"))
        else:
            self._waiting.append(waiter)
        return waiter

    def command(self, line: str) -> Deferred[Reply]:
        """Send one command line (without CRLF); fires with its reply.

        @raise WhileProducing: message data is being written.
        """
        if self._producer is not None:
            raise WhileProducing(f"{line.split(' ', 1)[0]} while message data is being written")
        waiter = self.expect_reply()
        if self.connected_:
            self.transport.write(line.encode("utf-8") + b"\r\n")  # type: ignore[union-attr]
        return waiter

    def send_data(self, chunks: Iterator[bytes]) -> tuple[Deferred[None], Deferred[Reply]]:
        """After a 354: stream ``chunks`` dot-stuffed, then the final dot.

        Returns (sent, reply): ``sent`` fires when the last byte is written,
        ``reply`` with the server's reply to the end of data.
        """
        return self._produce(dot_stuff(chunks))

    def send_chunk(self, size: int, chunks: Iterator[bytes]) -> tuple[Deferred[None], Deferred[Reply]]:
        """``BDAT size LAST`` followed by ``chunks`` as they are (RFC 3030): one
        round trip, no dot-stuffing.  Returns (sent, reply) as send_data does."""
        return self._produce(_after(f"BDAT {size} LAST\r\n".encode("ascii"), chunks))

    def _produce(self, chunks: Iterator[bytes]) -> tuple[Deferred[None], Deferred[Reply]]:
        if self._producer is not None:
            raise WhileProducing("message data is already being written")
        reply = self.expect_reply()
        producer = _DataProducer(self.transport, chunks)  # type: ignore[arg-type]
        if self.connected_:
            self._producer = producer
            self.transport.registerProducer(producer, False)  # type: ignore[union-attr]

        def written(result: object) -> object:
            self._producer = None
            self._check_idle()
            return result

        producer.done.addBoth(written)
        return producer.done, reply

    def start_tls(self, context: interfaces.IOpenSSLClientConnectionCreator) -> None:
        """Start TLS after the server's 220.  Anything the server sent after that
        220 in clear text would be read as a reply to an encrypted command
        (STARTTLS response injection): it is a violation."""
        if self._buffer or self._lines:
            self._violation("data after the STARTTLS reply")
            raise ProtocolViolation("data after the STARTTLS reply")
        self.transport.startTLS(context)  # type: ignore[union-attr]
        self.tls = True
