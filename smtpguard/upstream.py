"""The next hop: an ESMTP client session per client session, forwarding MAIL and
RCPT live and relaying the message after the scan.

Every failure becomes a reply for the client: 451 4.4.1 when the next hop cannot be
reached or drops the connection, 451 4.4.2 when it is too slow, or the next hop's
own reply.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum
from typing import Any

import attrs
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpguard import replies
from smtpguard.envelope import BodyType, Envelope, Recipient, mail_arguments, rcpt_arguments
from smtpguard.forwarding import xforward_commands
from smtpguard.interfaces import INextHop, IRelaySession
from smtpguard.keptpool import Kept
from smtpguard.replies import Reply
from smtpguard.settings import UpstreamSettings, UpstreamTLS
from smtpguard.smtpclient import ProtocolViolation, SMTPClientProtocol, WhileProducing, parse_extensions
from smtpguard.spool import Message

log = Logger()


class _Failed(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


def _reply_for(failure: Failure) -> Reply:
    if failure.check(IllegalTransition, WhileProducing):
        log.failure("next hop session out of order", failure)
        return replies.LOCAL_ERROR
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


@attrs.define
class Reachability:
    """When a new connection to the next hop last got as far as its greeting
    (``succeeded``) and when one last did not (``failed``, with ``problem``), in
    reactor seconds; None: never tried."""

    succeeded: float | None = None
    failed: float | None = None
    problem: str = ""

    @property
    def last_attempt(self) -> float | None:
        times = [time for time in (self.succeeded, self.failed) if time is not None]
        return max(times, default=None)

    @property
    def reachable(self) -> bool:
        """Whether the last attempt got the greeting."""
        return self.succeeded is not None and (self.failed is None or self.succeeded >= self.failed)


class HopState(Enum):
    """Where one client session's conversation with the next hop stands."""

    IDLE = "idle"  # no connection
    CONNECTING = "connecting"  # connect, greeting, EHLO, STARTTLS under way
    READY = "ready"  # set up, outside a transaction
    IN_TRANSACTION = "in transaction"  # MAIL accepted
    STREAMING = "streaming"  # message data going out, its end not yet written
    AWAITING_REPLY = "awaiting reply"  # the end of data is out; its reply is not in


# Every other transition is a bug, caught where it happens.
_TRANSITIONS: dict[HopState, frozenset[HopState]] = {
    HopState.IDLE: frozenset({HopState.CONNECTING}),
    HopState.CONNECTING: frozenset({HopState.READY}),
    HopState.READY: frozenset({HopState.IN_TRANSACTION}),
    HopState.IN_TRANSACTION: frozenset({HopState.READY, HopState.STREAMING}),
    HopState.STREAMING: frozenset({HopState.AWAITING_REPLY}),
    HopState.AWAITING_REPLY: frozenset({HopState.READY}),
}


class IllegalTransition(RuntimeError):
    """The session was asked to do something its state does not allow."""


@implementer(IRelaySession)
class UpstreamSession:
    """One client session's conversation with the next hop, opened at the first
    MAIL and kept for the following transactions.

    Its :class:`HopState` is explicit and every change is checked.  When the
    client goes (:meth:`close`), a message whose end of data has not been
    written is abandoned by cutting the connection (the next hop never queues a
    part of it); one whose end of data is out is waited for; and a connection
    goes back to the pool only fully set up, outside a transaction, with no reply
    outstanding.  Any failure drops the connection (state ``IDLE``).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        endpoint: IStreamClientEndpoint,
        settings: UpstreamSettings,
        pool: KeptConnections | None = None,
        reachability: Reachability | None = None,
    ) -> None:
        self._reactor = reactor
        self._endpoint = endpoint
        self._settings = settings
        self._pool = pool
        self._reachability = reachability if reachability is not None else Reachability()
        self._protocol: SMTPClientProtocol | None = None
        self._connecting: Deferred[Any] | None = None
        self.state = HopState.IDLE
        self.closed = False
        self._last_extensions: dict[str, str] = {}
        self._last_remote_mta: str | None = None

    @property
    def extensions(self) -> dict[str, str]:
        """The EHLO extensions of the connection in use, or of the last one (the
        pipeline asks after the reply to the end of data, when a client that left
        has had its connection released)."""
        return self._protocol.extensions if self._protocol else self._last_extensions

    @property
    def remote_mta(self) -> str | None:
        """The next hop's address, for the Remote-MTA field of a relayed DSN."""
        return self._last_remote_mta

    def _enter(self, state: HopState) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise IllegalTransition(f"{self.state.value} -> {state.value}")
        self.state = state

    # -- connection -----------------------------------------------------------------

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

    async def _ensure_connection(self) -> bool:
        """Bring the session to READY; True if it took a kept connection."""
        if self.state is not HopState.IDLE:
            return False
        kept = self._pool.take(self._settings) if self._pool is not None else None
        self._enter(HopState.CONNECTING)
        if kept is None:
            kept = await self._open(starttls=self._settings.tls is not UpstreamTLS.NONE)
            kept.set_up = True
            taken = False
        else:
            taken = True
        self._protocol = kept
        self._last_extensions = kept.extensions
        self._last_remote_mta = getattr(kept.transport.getPeer(), "host", None) if kept.transport else None
        self._enter(HopState.READY)
        return taken

    async def _open(self, starttls: bool) -> SMTPClientProtocol:
        """A new connection, greeted, EHLO'd and (as the settings ask) in TLS."""
        factory = Factory.forProtocol(SMTPClientProtocol)
        factory.noisy = False
        self._connecting = self._endpoint.connect(factory)
        self._connecting.addTimeout(self._settings.connect_timeout, self._reactor)  # type: ignore[arg-type]
        try:
            protocol: SMTPClientProtocol = await self._connecting  # type: ignore[assignment]
        except Exception as problem:
            if not self.closed:
                _failed(self._reachability, self._reactor, problem)
            raise
        finally:
            self._connecting = None
        self._protocol = protocol
        if self.closed:
            raise _Failed(replies.UPSTREAM_UNAVAILABLE)
        try:
            greeting = await self._timed(protocol.greeting)
        except Exception as problem:
            _failed(self._reachability, self._reactor, problem)
            raise
        if greeting.code != 220:
            _failed(self._reachability, self._reactor, f"greeting {greeting.code} {greeting.text}")
            raise _Failed(self._relayed(greeting, replies.UPSTREAM_UNAVAILABLE))
        self._reachability.succeeded = self._reactor.seconds()
        await self._hello()
        if not starttls:
            return protocol
        if "STARTTLS" not in protocol.extensions:
            if self._settings.tls is UpstreamTLS.REQUIRED:
                log.warn("next hop offers no STARTTLS but tls = required")
                raise _Failed(replies.UPSTREAM_UNAVAILABLE)
            return protocol
        reply = await self._command("STARTTLS")
        if reply.code != 220:
            if self._settings.tls is UpstreamTLS.REQUIRED:
                log.warn("next hop refused STARTTLS ({reply}) but tls = required", reply=reply)
                raise _Failed(replies.UPSTREAM_UNAVAILABLE)
            # Opportunistic, as Postfix's "may" level: carry on in plain text.
            log.info("next hop refused STARTTLS ({reply}); going on without TLS", reply=reply)
            return protocol
        try:
            protocol.start_tls(_tls_options(self._settings))
            await self._hello()
        except Exception:
            if self._settings.tls is UpstreamTLS.REQUIRED or self.closed:
                raise
            # The handshake failed and took the connection with it: a new one,
            # in plain text, as Postfix does at its "may" level.
            log.info("TLS with the next hop failed; reconnecting without TLS")
            self._abort(protocol)
            return await self._open(starttls=False)
        return protocol

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

        if self.closed:
            steps.close()
            return defer.succeed(replies.UPSTREAM_UNAVAILABLE)
        return Deferred.fromCoroutine(steps).addErrback(failed)

    # -- IRelaySession --------------------------------------------------------------

    def mail(self, envelope: Envelope) -> Deferred[Reply]:
        async def steps() -> Reply:
            if await self._ensure_connection():
                try:
                    reply = await self._mail(envelope)
                except (error.ConnectionDone, error.ConnectionLost):
                    pass
                else:
                    if reply.code != 421:
                        return reply
                # The next hop closed the kept connection meanwhile, or closes it
                # now (421: its idle time ran out as the MAIL came, as Postfix's
                # smtpd says): once more, on a new one.
                self._drop()
                await self._ensure_connection()
            return await self._mail(envelope)

        return self._run(steps())

    async def _mail(self, envelope: Envelope) -> Reply:
        assert self._protocol is not None
        if not self._protocol.idle:
            await self._protocol.when_idle()
        if self.state is HopState.IN_TRANSACTION:
            # The last transaction ended without a RSET (its DATA was refused,
            # say): end it, or the next hop answers "nested MAIL".
            await self._reset()
        if self.state is not HopState.READY:
            raise IllegalTransition(f"MAIL in state {self.state.value}")
        if not envelope.sender.isascii() and "SMTPUTF8" not in self.extensions:
            return replies.NEXT_HOP_NO_SMTPUTF8
        if envelope.parameters.body is BodyType.BINARYMIME and not {"BINARYMIME", "CHUNKING"} <= self.extensions.keys():
            return replies.NEXT_HOP_NO_BINARYMIME
        offered = self.extensions.get("XFORWARD")
        xforward: list[Deferred[Reply]] = []
        if self._settings.xforward and offered is not None:
            for line in xforward_commands(envelope.client, offered):
                xforward.append(self._command(line))
                if "PIPELINING" not in self.extensions:
                    await xforward[-1]
        mail = self._command("MAIL " + mail_arguments(envelope.sender, envelope.parameters, self.extensions))
        for index, waiting in enumerate(xforward):
            try:
                refused = await waiting
            except Exception:
                # Pipelined, the commands after it fail with it: the same lost
                # connection, not more failures to be logged as unhandled.
                for later in (*xforward[index + 1 :], mail):
                    later.addErrback(lambda _: None)
                raise
            if refused.code != 250:
                # As Postfix's smtp client does: the message goes on without it.
                log.warn("next hop refused XFORWARD: {reply}", reply=refused)
        reply = await mail
        if reply.code == 250:
            self._enter(HopState.IN_TRANSACTION)
        return reply

    def rcpt(self, recipient: Recipient) -> Deferred[Reply]:
        async def steps() -> Reply:
            self._require(HopState.IN_TRANSACTION)
            if not recipient.address.isascii() and "SMTPUTF8" not in self.extensions:
                return replies.NEXT_HOP_NO_SMTPUTF8
            return await self._command("RCPT " + rcpt_arguments(recipient, self.extensions))

        return self._run(steps())

    def data(self, message: Message, prefix: bytes) -> Deferred[Reply]:
        async def steps() -> Reply:
            protocol = self._require(HopState.IN_TRANSACTION)
            if "8BITMIME" not in self.extensions and not (prefix.isascii() and message.isascii()):
                await self._reset()
                return replies.NEXT_HOP_NO_8BITMIME
            if "CHUNKING" in self.extensions:
                # One round trip, and the bytes go as they are.
                size = len(prefix) + message.size
                self._enter(HopState.STREAMING)
                sent, final = protocol.send_chunk(size, _with_prefix(prefix, message))
            else:
                reply = await self._command("DATA")
                if reply.code != 354:
                    # Still in the transaction at the next hop: the next MAIL or
                    # the end of the session sends RSET.
                    return self._relayed(reply, replies.UPSTREAM_PROTOCOL)
                if self.closed:
                    # The client left while DATA was answered: nothing is sent.
                    raise _Failed(replies.UPSTREAM_UNAVAILABLE)
                self._enter(HopState.STREAMING)
                sent, final = protocol.send_data(_with_prefix(prefix, message))
            final = self._timed(final)
            # If sending stops half-way (spool unreadable, connection gone), the
            # next hop must not keep a partial message: drop the connection, which
            # also fails ``final``.
            sent.addCallbacks(self._end_of_data_written, self._abandon_data)
            reply = await final
            if self.state is HopState.STREAMING:
                # A reply before the producer saw its end: a refusal may have come
                # early, while the next hop still reads, so that connection goes.
                if not reply.positive:
                    self._drop()
                    return self._relayed(reply, replies.UPSTREAM_PROTOCOL)
                self._enter(HopState.AWAITING_REPLY)
            self._enter(HopState.READY)
            if self.closed:
                log.info("next hop answered {code} for a client that has left", code=reply.code)
                self._release()
            return reply

        return self._run(steps())

    def reset(self) -> Deferred[None]:
        if self.state is not HopState.IN_TRANSACTION or self.closed:
            return defer.succeed(None)
        return self._run(self._reset_steps()).addCallback(lambda _: None)

    async def _reset_steps(self) -> Reply:
        await self._reset()
        return replies.RESET_OK

    async def _reset(self) -> None:
        reply = await self._command("RSET")
        if reply.code != 250:
            raise _Failed(self._relayed(reply, replies.UPSTREAM_PROTOCOL))
        self._enter(HopState.READY)

    def close(self) -> None:
        """The client session is over (see the class docstring)."""
        if self.closed:
            return
        self.closed = True
        if self.state is HopState.IDLE:
            return
        if self.state in (HopState.CONNECTING, HopState.STREAMING):
            if self._connecting is not None:
                self._connecting.cancel()
            self._drop()
        elif self.state is not HopState.AWAITING_REPLY:
            self._release()
        # AWAITING_REPLY: data() releases the connection once the reply is in.

    # -- releasing ------------------------------------------------------------------

    def _require(self, state: HopState) -> SMTPClientProtocol:
        if self._protocol is None or not self._protocol.connected_:
            raise _Failed(replies.UPSTREAM_UNAVAILABLE)
        if self.state is not state:
            raise IllegalTransition(f"expected {state.value}, in {self.state.value}")
        return self._protocol

    def _end_of_data_written(self, _: object) -> None:
        if self.state is HopState.STREAMING:
            self._enter(HopState.AWAITING_REPLY)

    def _release(self) -> None:
        """Once every outstanding reply is in: end a transaction still open, then
        keep the connection for another session or say QUIT."""
        protocol = self._protocol
        if protocol is None:
            return

        async def settle() -> None:
            await protocol.when_idle()
            if self.state is HopState.IN_TRANSACTION and self._pool is not None:
                await self._reset()  # to be kept; QUIT alone ends it otherwise
            if self._protocol is not protocol:
                return  # dropped meanwhile
            kept = self.state is HopState.READY and self._pool is not None
            self._protocol = None
            self.state = HopState.IDLE
            if kept:
                assert self._pool is not None
                self._pool.give(protocol)
            else:
                _quit(protocol)

        def failed(failure: Failure) -> None:
            log.info("next hop connection dropped on release: {why}", why=failure.getErrorMessage())
            self._drop()

        Deferred.fromCoroutine(settle()).addErrback(failed)

    def _abandon_data(self, failure: Failure) -> None:
        log.warn("sending to the next hop stopped: {why}", why=failure.getErrorMessage())
        self._drop()

    def _drop(self) -> None:
        protocol, self._protocol = self._protocol, None
        self.state = HopState.IDLE
        if protocol is not None:
            self._abort(protocol)

    @staticmethod
    def _abort(protocol: SMTPClientProtocol) -> None:
        protocol.set_up = False
        if protocol.transport is not None:
            protocol.transport.abortConnection()  # type: ignore[attr-defined]


def _failed(reachability: Reachability, reactor: IReactorTime, problem: object) -> None:
    reachability.failed = reactor.seconds()
    reachability.problem = str(problem) or type(problem).__name__


def _quit(protocol: SMTPClientProtocol) -> None:
    """Say QUIT on an idle connection and close it."""
    protocol.set_up = False
    protocol.command("QUIT").addErrback(lambda _: None)
    protocol.transport.loseConnection()  # type: ignore[union-attr]


class KeptConnections:
    """Next-hop connections kept open between client sessions, as Postfix's
    connection cache does: a new client session skips the connect, greeting,
    EHLO (and STARTTLS) of its own.  At most ``size`` are kept, each for at most
    ``idle_time`` seconds; only set-up, idle connections are taken in, and one is
    handed out only if it still is and its TLS state is what the settings ask.
    Once closed (a reload, a stop), a connection given back is told QUIT."""

    def __init__(self, reactor: IReactorTime, size: int, idle_time: float) -> None:
        self._kept: Kept[SMTPClientProtocol] = Kept(
            reactor, size, idle_time, usable=_reusable, let_go=_close_unused, gone=lambda protocol: protocol.lost
        )

    def __len__(self) -> int:
        return len(self._kept)

    def take(self, settings: UpstreamSettings) -> SMTPClientProtocol | None:
        return self._kept.take(lambda protocol: protocol.tls or settings.tls is not UpstreamTLS.REQUIRED)

    def give(self, protocol: SMTPClientProtocol) -> None:
        self._kept.give(protocol)

    def close(self) -> Deferred[None]:
        """Close every kept connection, and each one given later; fires once the
        kept ones are all gone."""
        return self._kept.close()


def _with_prefix(prefix: bytes, message: Message) -> Iterator[bytes]:
    """The message after ``prefix`` (its new header fields), joined to its first
    chunk: a write and a reactor turn less for each message."""
    chunks = message.chunks()
    yield prefix + next(chunks, b"")
    yield from chunks


def _reusable(protocol: SMTPClientProtocol) -> bool:
    return protocol.set_up and protocol.idle


def _close_unused(protocol: SMTPClientProtocol) -> None:
    """Let go of a connection that is not kept: an idle one (the surplus of a full
    or closed pool among them) hears QUIT, one still waiting for a reply is cut."""
    if protocol.idle:
        _quit(protocol)
    elif protocol.transport is not None and protocol.connected_:
        protocol.transport.abortConnection()  # type: ignore[attr-defined]


@implementer(INextHop)
class Upstream:
    """The next hop at ``settings.endpoint``, reached with an ESMTP client."""

    def __init__(self, reactor: Any, settings: UpstreamSettings) -> None:
        self._reactor = reactor
        self._settings = settings
        self._endpoint = clientFromString(reactor, settings.endpoint)
        self.kept = KeptConnections(reactor, settings.keep_connections, settings.keep_time)
        self._pool = self.kept if settings.keep_connections else None
        self.reachability = Reachability()
        self._probe_waiters: list[Deferred[bool]] | None = None

    def session(self) -> UpstreamSession:
        return UpstreamSession(self._reactor, self._endpoint, self._settings, self._pool, self.reachability)

    def probe(self) -> Deferred[bool]:
        """Connect, wait for the greeting and say QUIT: fires with whether the next
        hop greeted with 220 (recorded in :attr:`reachability`); never fails.
        Probes asked for while one is under way share it."""
        waiting: Deferred[bool] = Deferred()
        if self._probe_waiters is not None:
            self._probe_waiters.append(waiting)
            return waiting
        self._probe_waiters = [waiting]

        def done(reachable: bool) -> None:
            waiters, self._probe_waiters = self._probe_waiters or [], None
            for waiter in waiters:
                waiter.callback(reachable)

        Deferred.fromCoroutine(self._probe()).addCallback(done)
        return waiting

    async def _probe(self) -> bool:
        factory = Factory.forProtocol(SMTPClientProtocol)
        factory.noisy = False
        protocol: SMTPClientProtocol | None = None
        try:
            connecting = self._endpoint.connect(factory)
            connecting.addTimeout(self._settings.connect_timeout, self._reactor)
            protocol = await connecting  # type: ignore[assignment]
            assert protocol is not None
            greeting = await protocol.greeting.addTimeout(self._settings.timeout, self._reactor)
        except Exception as problem:
            if protocol is not None and protocol.transport is not None:
                protocol.transport.abortConnection()  # type: ignore[attr-defined]
            _failed(self.reachability, self._reactor, problem)
            return False
        _quit(protocol)
        if greeting.code != 220:
            _failed(self.reachability, self._reactor, f"greeting {greeting.code} {greeting.text}")
            return False
        self.reachability.succeeded = self._reactor.seconds()
        return True

    def close(self) -> Deferred[None]:
        """Close the connections kept for later sessions (when the service stops);
        fires once they are gone."""
        return self.kept.close()
