"""The next hop: an ESMTP client session per client session, forwarding MAIL and
RCPT live and relaying the message after the scan.

Every failure becomes a reply for the client: 451 4.4.1 when the next hop cannot be
reached or drops the connection, 451 4.4.2 when it is too slow, or the next hop's
own reply.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpguard import replies
from smtpguard.envelope import BodyType, Client, Envelope, Recipient, encode_xtext, mail_arguments, rcpt_arguments
from smtpguard.interfaces import INextHop, IRelaySession
from smtpguard.replies import Reply
from smtpguard.settings import UpstreamSettings, UpstreamTLS
from smtpguard.smtpclient import ProtocolViolation, SMTPClientProtocol, parse_extensions
from smtpguard.spool import Message

log = Logger()


class _Failed(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


def _reply_for(failure: Failure) -> Reply:
    if failure.check(_Failed):
        return failure.value.reply  # type: ignore[union-attr,no-any-return]
    if failure.check(defer.TimeoutError, error.TimeoutError):
        return replies.UPSTREAM_TIMEOUT
    if failure.check(ProtocolViolation):
        return replies.UPSTREAM_PROTOCOL
    return replies.UPSTREAM_UNAVAILABLE


def _tls_options(settings: UpstreamSettings) -> Any:
    from twisted.internet import ssl

    if settings.tls is UpstreamTLS.REQUIRED:
        trust = None
        if settings.tls_ca:
            with open(settings.tls_ca, "rb") as pem:
                trust = ssl.Certificate.loadPEM(pem.read())
        return ssl.optionsForClientTLS(settings.tls_hostname or "localhost", trustRoot=trust)
    return ssl.CertificateOptions()


def _xforward(client: Client, offered: str) -> str | None:
    wanted = set(offered.upper().split())
    address = f"IPV6:{client.address}" if ":" in client.address else client.address
    values = {
        "NAME": "[UNAVAILABLE]",
        "ADDR": address,
        "PORT": str(client.port),
        "PROTO": client.protocol,
        "HELO": client.helo or "[UNAVAILABLE]",
    }
    words = [f"{key}={encode_xtext(value)}" for key, value in values.items() if key in wanted]
    return "XFORWARD " + " ".join(words) if words else None


@implementer(IRelaySession)
class UpstreamSession:
    """One client session's connection to the next hop, opened at the first MAIL
    and kept for the following transactions."""

    def __init__(
        self,
        reactor: IReactorTime,
        endpoint: IStreamClientEndpoint,
        settings: UpstreamSettings,
        pool: KeptConnections | None = None,
    ) -> None:
        self._reactor = reactor
        self._endpoint = endpoint
        self._settings = settings
        self._pool = pool
        self._protocol: SMTPClientProtocol | None = None
        self._in_transaction = False

    @property
    def extensions(self) -> dict[str, str]:
        return self._protocol.extensions if self._protocol else {}

    def _command(self, line: str, timeout: float | None = None) -> Deferred[Reply]:
        assert self._protocol is not None
        return self._timed(self._protocol.command(line), timeout)

    def _timed(self, waiting: Deferred[Reply], timeout: float | None = None) -> Deferred[Reply]:
        protocol = self._protocol

        def on_timeout(result: Any, seconds: float) -> Any:
            if protocol is not None and protocol.transport is not None:
                protocol.transport.abortConnection()  # type: ignore[attr-defined]
            if isinstance(result, Failure) and result.check(defer.CancelledError):
                raise defer.TimeoutError(seconds, "no reply from the next hop")
            return result

        return waiting.addTimeout(timeout or self._settings.timeout, self._reactor, on_timeout)  # type: ignore[arg-type]

    async def _connect(self) -> bool:
        """Make sure there is a connection; True if it was kept from an earlier session."""
        if self._protocol is not None and self._protocol.connected_:
            return False
        self._protocol = self._pool.take() if self._pool is not None else None
        if self._protocol is not None:
            return True
        factory = Factory.forProtocol(SMTPClientProtocol)
        factory.noisy = False
        connecting = self._endpoint.connect(factory)
        connecting.addTimeout(self._settings.connect_timeout, self._reactor)  # type: ignore[arg-type]
        protocol: SMTPClientProtocol = await connecting  # type: ignore[assignment]
        self._protocol = protocol
        greeting = await self._timed(protocol.greeting)
        if greeting.code != 220:
            raise _Failed(self._relayed(greeting, replies.UPSTREAM_UNAVAILABLE))
        await self._hello()
        if self._settings.tls is not UpstreamTLS.NONE:
            if "STARTTLS" in protocol.extensions:
                reply = await self._command("STARTTLS")
                if reply.code != 220:
                    raise _Failed(replies.UPSTREAM_UNAVAILABLE)
                protocol.start_tls(_tls_options(self._settings))
                await self._hello()
            elif self._settings.tls is UpstreamTLS.REQUIRED:
                log.warn("next hop offers no STARTTLS but tls = required")
                raise _Failed(replies.UPSTREAM_UNAVAILABLE)
        return False

    async def _hello(self) -> None:
        assert self._protocol is not None
        reply = await self._command(f"EHLO {self._settings.hostname}")
        if reply.code == 250:
            self._protocol.extensions = parse_extensions(reply)
            return
        reply = await self._command(f"HELO {self._settings.hostname}")
        if reply.code != 250:
            raise _Failed(self._relayed(reply, replies.UPSTREAM_UNAVAILABLE))
        self._protocol.extensions = {}

    @staticmethod
    def _relayed(reply: Reply, fallback: Reply) -> Reply:
        """A next hop's refusal as the client should hear it: its own 4xx/5xx, or
        ``fallback`` for anything that makes no sense at this point."""
        return reply if reply.code >= 400 else fallback

    def _run(self, steps: Any) -> Deferred[Reply]:
        def failed(failure: Failure) -> Reply:
            reply = _reply_for(failure)
            log.info("next hop: {why}; client hears {code}", why=failure.getErrorMessage(), code=reply.code)
            self._drop()
            return reply

        return Deferred.fromCoroutine(steps).addErrback(failed)

    def mail(self, envelope: Envelope) -> Deferred[Reply]:
        async def steps() -> Reply:
            if await self._connect():
                try:
                    return await self._mail(envelope)
                except (error.ConnectionDone, error.ConnectionLost):
                    # The next hop closed the kept connection meanwhile: once
                    # more, on a new one.
                    self._drop()
                    await self._connect()
            return await self._mail(envelope)

        return self._run(steps())

    async def _mail(self, envelope: Envelope) -> Reply:
        if not envelope.sender.isascii() and "SMTPUTF8" not in self.extensions:
            return replies.NEXT_HOP_NO_SMTPUTF8
        if envelope.parameters.body is BodyType.BINARYMIME and not {"BINARYMIME", "CHUNKING"} <= self.extensions.keys():
            return replies.NEXT_HOP_NO_BINARYMIME
        offered = self.extensions.get("XFORWARD")
        xforward = None
        if self._settings.xforward and offered is not None and (line := _xforward(envelope.client, offered)):
            xforward = self._command(line)
            if "PIPELINING" not in self.extensions:
                await xforward
        mail = self._command("MAIL " + mail_arguments(envelope.sender, envelope.parameters, self.extensions))
        if xforward is not None:
            try:
                refused = await xforward
            except Exception:
                # Pipelined, MAIL fails with it: the same lost connection, not a
                # second failure to be logged as unhandled.
                mail.addErrback(lambda _: None)
                raise
            if refused.code != 250:
                log.warn("next hop refused XFORWARD: {reply}", reply=refused)
        reply = await mail
        self._in_transaction = reply.code == 250
        return reply

    def rcpt(self, recipient: Recipient) -> Deferred[Reply]:
        async def steps() -> Reply:
            if self._protocol is None or not self._protocol.connected_:
                raise _Failed(replies.UPSTREAM_UNAVAILABLE)
            if not recipient.address.isascii() and "SMTPUTF8" not in self.extensions:
                return replies.NEXT_HOP_NO_SMTPUTF8
            return await self._command("RCPT " + rcpt_arguments(recipient, self.extensions))

        return self._run(steps())

    def data(self, message: Message, prefix: bytes) -> Deferred[Reply]:
        async def steps() -> Reply:
            if self._protocol is None or not self._protocol.connected_:
                raise _Failed(replies.UPSTREAM_UNAVAILABLE)
            if "8BITMIME" not in self.extensions and not (prefix.isascii() and message.isascii()):
                await self._command("RSET")
                self._in_transaction = False
                return replies.NEXT_HOP_NO_8BITMIME
            if "CHUNKING" in self.extensions:
                # One round trip, and the bytes go as they are.
                size = len(prefix) + message.size
                sent, final = self._protocol.send_chunk(size, _with_prefix(prefix, message))
            else:
                reply = await self._command("DATA")
                if reply.code != 354:
                    self._in_transaction = False
                    return self._relayed(reply, replies.UPSTREAM_PROTOCOL)
                sent, final = self._protocol.send_data(_with_prefix(prefix, message))
            final = self._timed(final)
            # If sending stops half-way (spool unreadable, connection gone), the
            # next hop must not keep a partial message: drop the connection, which
            # also fails ``final``.
            sent.addErrback(self._abandon_data)
            reply = await final
            self._in_transaction = False
            return reply

        return self._run(steps())

    def reset(self) -> Deferred[None]:
        if not self._in_transaction or self._protocol is None or not self._protocol.connected_:
            return defer.succeed(None)
        self._in_transaction = False
        return self._run(_reset(self)).addCallback(lambda _: None)

    def close(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is None or not protocol.connected_:
            return
        if self._pool is not None and not self._in_transaction:
            self._pool.give(protocol)
        else:
            _quit(protocol)

    def _abandon_data(self, failure: Failure) -> None:
        log.warn("sending to the next hop stopped: {why}", why=failure.getErrorMessage())
        self._drop()

    def _drop(self) -> None:
        protocol, self._protocol = self._protocol, None
        self._in_transaction = False
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abortConnection()  # type: ignore[attr-defined]


def _quit(protocol: SMTPClientProtocol) -> None:
    protocol.command("QUIT").addErrback(lambda _: None)
    protocol.transport.loseConnection()  # type: ignore[union-attr]


class KeptConnections:
    """Next-hop connections kept open between client sessions, as Postfix's
    connection cache does: a new client session skips the connect, greeting,
    EHLO (and STARTTLS) of its own.  At most ``size`` are kept, each for at most
    ``idle_time`` seconds."""

    def __init__(self, reactor: IReactorTime, size: int, idle_time: float) -> None:
        self._reactor = reactor
        self._size = size
        self._idle_time = idle_time
        self._kept: list[tuple[SMTPClientProtocol, IDelayedCall]] = []

    def __len__(self) -> int:
        return len(self._kept)

    def take(self) -> SMTPClientProtocol | None:
        while self._kept:
            protocol, expiry = self._kept.pop()
            expiry.cancel()
            if protocol.connected_:
                return protocol
        return None

    def give(self, protocol: SMTPClientProtocol) -> None:
        if len(self._kept) >= self._size:
            _quit(protocol)
            return
        expiry = self._reactor.callLater(self._idle_time, self._expire, protocol)
        self._kept.append((protocol, expiry))

    def _expire(self, protocol: SMTPClientProtocol) -> None:
        self._kept = [(kept, expiry) for kept, expiry in self._kept if kept is not protocol]
        if protocol.connected_:
            _quit(protocol)

    def close(self) -> None:
        kept, self._kept = self._kept, []
        for protocol, expiry in kept:
            expiry.cancel()
            if protocol.connected_:
                _quit(protocol)


async def _reset(session: UpstreamSession) -> Reply:
    return await session._command("RSET")


def _with_prefix(prefix: bytes, message: Message) -> Iterator[bytes]:
    if prefix:
        yield prefix
    yield from message.chunks()


@implementer(INextHop)
class Upstream:
    """The next hop at ``settings.endpoint``, reached with an ESMTP client."""

    def __init__(self, reactor: Any, settings: UpstreamSettings) -> None:
        self._reactor = reactor
        self._settings = settings
        self._endpoint = clientFromString(reactor, settings.endpoint)
        self.kept = KeptConnections(reactor, settings.keep_connections, settings.keep_time)
        self._pool = self.kept if settings.keep_connections else None

    def session(self) -> UpstreamSession:
        return UpstreamSession(self._reactor, self._endpoint, self._settings, self._pool)
