"""The ESMTP server side: one protocol instance per client connection, and the
factory an application listens with.

Replies go out strictly in command order: while a command waits for the next hop
or the scanner, input is buffered (and the transport paused when the buffer
grows), so any pipelined group -- ``.\\r\\nQUIT`` included -- is answered in order.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

import attrs
from twisted.internet import interfaces
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smtpguard import forwarding, replies
from smtpguard.access import ClientCounters
from smtpguard.domains import ascii_form
from smtpguard.envelope import (
    BodyType,
    Client,
    Envelope,
    EnvelopeError,
    Forwarding,
    Hop,
    Recipient,
    parse_mail,
    parse_rcpt,
)
from smtpguard.events import Event, Report, ignore
from smtpguard.inputbuffer import InputBuffer
from smtpguard.interfaces import INextHop, IRelaySession
from smtpguard.replies import Reply
from smtpguard.settings import ServerSettings
from smtpguard.spool import Message, Spool, SpoolFull
from smtpguard.tls import negotiated
from smtpguard.wire import DataReader, LineEndingNormaliser

log = Logger()
T = TypeVar("T")

# While a command is pending, stop reading from a client that has sent this much.
_PAUSE_BUFFER = 256 * 1024
# Seconds a closing connection may take to flush its last reply.
_CLOSE_GRACE = 30.0


# end of data -> (envelope, message, relay, transaction id, seconds receiving it) -> reply
Processor = Callable[[Envelope, Message, IRelaySession, str, float], Deferred[Reply]]
# (envelope, recipient) -> whether the recipient may join the envelope's transaction
RecipientCheck = Callable[[Envelope, Recipient], bool]


def _every_recipient(envelope: Envelope, recipient: Recipient) -> bool:
    """A policy that decides once per message takes any recipient."""
    return True


@implementer(interfaces.IPushProducer)
class ESMTPServer(Protocol):
    """One client session."""

    factory: GuardFactory

    def __init__(self) -> None:
        self._buffer = InputBuffer()
        self._busy = False
        self._processing = False
        self._paused = False
        self._closing = False
        self._overlong: bytes | None = None  # the start of a line past max_line_length
        self._chunk: _Chunk | None = None  # a BDAT chunk still arriving
        self._chunks: LineEndingNormaliser | None = None  # BDAT data of this transaction
        self._chunk_refused = False
        self._client: Client | None = None
        self._peer: Hop | None = None  # who connected, should it send XCLIENT
        self._forwarded: forwarding.Forwarded | None = None  # XFORWARD for the next transaction
        self._envelope: Envelope | None = None
        self._relay: IRelaySession | None = None
        self._spool: Spool | None = None
        self._reader: DataReader | None = None
        self._idle: interfaces.IDelayedCall | None = None
        self._deadline: interfaces.IDelayedCall | None = None
        self._message_deadline: interfaces.IDelayedCall | None = None
        self._write_blocked = False  # the client does not read its replies
        self._last_word: Reply | None = None  # a 421 held back while a reply is pending
        self._transaction_id = ""
        self._receiving_since = 0.0  # when DATA or the first BDAT came
        self._counted: str | None = None  # the address this connection is counted under
        self.outcome = "disconnected"  # how the session ended, for the metrics
        self._setup: Setup | None = None  # taken from the factory when the connection is made
        self._lost = False
        self._left = False  # the factory was told that this session no longer uses its setup

    @property
    def setup(self) -> Setup:
        """What this session runs with to its end, whatever the factory is given later."""
        return self._setup if self._setup is not None else self.factory.setup

    @property
    def settings(self) -> ServerSettings:
        return self.setup.settings

    # -- connection ---------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Whether the client waits for the outcome of a command (its message's, say)."""
        return self._busy

    def shut_down(self) -> None:
        """Say 421 and close, unless busy: then that happens right after the pending
        reply (see _async_reply)."""
        if not self._busy and not self._closing:
            self.outcome = "shutdown"
            self._send(replies.SHUTTING_DOWN)
            self._close()

    def connectionMade(self) -> None:
        self._setup = self.factory.enter()
        self.factory.connections += 1
        self.factory.sessions.add(self)
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)  # replies are small writes: never wait for a delayed ACK
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        host = self.transport.getHost()  # type: ignore[union-attr]
        self._client = Client(
            address=getattr(peer, "host", ""),
            port=getattr(peer, "port", 0),
            server_address=getattr(host, "host", ""),
            server_port=getattr(host, "port", 0),
            hostname=self.settings.hostname,
            esmtp=False,
            tls=interfaces.ISSLTransport.providedBy(self.transport),
        )
        self._peer = Hop(Forwarding.XCLIENT, self._client.address, self._client.port)
        # Replies back-pressure the client: while the transport cannot write, no
        # more commands are read or answered (pauseProducing below).
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        refusal = self._admission()
        if refusal is not None:
            self.outcome = "shutdown" if refusal is replies.SHUTTING_DOWN else "refused"
            self._send(refusal)
            self._close()
            return
        reactor = self.factory.reactor
        self._deadline = reactor.callLater(self.settings.session_timeout, self._timed_out, replies.SESSION_TOO_LONG)
        self._send(self._greeting())
        self._arm_idle()

    def _greeting(self) -> Reply:
        return replies.SERVICE_READY.with_text(f"{self.settings.hostname} ESMTP smtpguard")

    def _admission(self) -> Reply | None:
        """Why this connection may not go on, or None."""
        assert self._client is not None
        if self.factory.draining:
            return replies.SHUTTING_DOWN
        if not self.settings.access.allows(self._client.address):
            self.factory.report(Event.REFUSED, "access")
            return replies.ACCESS_DENIED
        if self.factory.connections > self.settings.max_connections:
            self.factory.report(Event.RATE_LIMITED, "max_connections")
            return replies.TOO_MANY_CONNECTIONS
        return self._count_client()

    def _count_client(self) -> Reply | None:
        """Count this connection under its client's address for
        max_connections_per_client (again after XCLIENT names another client), or
        why it may not go on.  A host in xclient_hosts is not counted, as in
        Postfix (smtpd.c: "we exclude xclient authorized hosts from connection
        count/rate control"): its connections count under the clients it names."""
        assert self._client is not None
        if self._counted is not None:
            self.factory.clients.disconnect(self._counted)
            self._counted = None
        address = self._client.address
        # Only the host that connected is exempt: a client it names is counted even
        # when its address is in xclient_hosts too (or re-sending XCLIENT would
        # move a connection out of every count).
        if self._client.hop is None and self.settings.access.may_xclient(address):
            return None
        if not self.factory.clients.connect(address):
            self.factory.report(Event.RATE_LIMITED, "max_connections_per_client")
            return replies.TOO_MANY_CLIENT_CONNECTIONS
        self._counted = address
        return None

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.factory.connections -= 1
        self.factory.sessions.discard(self)
        self.factory.report(Event.SESSION, self.outcome)
        if self._counted is not None:
            self.factory.clients.disconnect(self._counted)
            self._counted = None
        self._closing = True
        self._cancel_timers()
        self._abandon_data()
        if self._relay is not None:
            self._relay.close()
            self._relay = None
        self._lost = True
        self._leave()

    def _leave(self) -> None:
        """Once the client is gone and no outcome is pending, this session no longer
        uses its setup (its scanners and next hop may then be closed)."""
        if self._lost and not self._busy and self._setup is not None and not self._left:
            self._left = True
            self.factory.leave(self._setup)

    def _close(self) -> None:
        self._closing = True
        self._cancel_timers()
        self.transport.loseConnection()  # type: ignore[union-attr]
        # A client that stops reading must not keep the connection open.
        self._idle = self.factory.reactor.callLater(_CLOSE_GRACE, self.transport.abortConnection)  # type: ignore[union-attr]

    def _cancel_timers(self) -> None:
        for timer in (self._idle, self._deadline, self._message_deadline):
            if timer is not None and timer.active():
                timer.cancel()

    def _send(self, reply: Reply) -> None:
        self.transport.write(reply.to_bytes())  # type: ignore[union-attr]

    # -- timers ---------------------------------------------------------------------

    def _arm_idle(self) -> None:
        receiving = self._reader is not None or self._chunk is not None
        timeout = self.settings.data_timeout if receiving else self.settings.command_timeout
        if self._idle is not None and self._idle.active():
            self._idle.reset(timeout)
        else:
            self._idle = self.factory.reactor.callLater(timeout, self._timed_out, replies.TIMEOUT)

    def _start_message_deadline(self) -> None:
        if self._message_deadline is None or not self._message_deadline.active():
            self._message_deadline = self.factory.reactor.callLater(
                self.settings.message_timeout, self._timed_out, replies.MESSAGE_TOO_SLOW
            )

    def _stop_message_deadline(self) -> None:
        if self._message_deadline is not None and self._message_deadline.active():
            self._message_deadline.cancel()
        self._message_deadline = None

    def _disarm_idle(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()

    def _timed_out(self, reply: Reply) -> None:
        if self._busy:
            # Never cut a session while its message is with the next hop: the
            # client must hear the outcome, then this reply, then the close.
            self._closing = True
            self._last_word = self._last_word or reply
            self.outcome = "timeout"
            return
        self.outcome = "timeout"
        self._send(reply)
        self._close()

    # -- input ------------------------------------------------------------------

    # -- IPushProducer: the transport's write buffer is full, or has drained --------

    def pauseProducing(self) -> None:
        self._write_blocked = True
        self._flow_control()

    def resumeProducing(self) -> None:
        self._write_blocked = False
        if not self._closing:
            self._process()

    def stopProducing(self) -> None:
        self._write_blocked = True

    # -- input ------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._buffer.append(data)
        if not self._busy and (self._reader is not None or self._chunk is not None):
            self._arm_idle()  # RFC 5321 4.5.3.2.5: per block of data
        self._process()

    def _process(self) -> None:
        if self._processing:
            return  # a reply that arrived synchronously: the running loop goes on
        self._processing = True
        try:
            self._process_buffer()
        finally:
            self._processing = False
        if not self._buffer:
            self._buffer.clear()  # an idle session keeps no backlog it has read
        self._flow_control()

    def _process_buffer(self) -> None:
        buffer = self._buffer
        answered = False
        while buffer and not self._busy and not self._closing and not self._write_blocked:
            if self._chunk is not None:
                chunk = self._chunk
                chunk.feed(buffer.take(chunk.remaining))
                if not chunk.remaining:
                    self._chunk = None
                    self._respond(chunk.done())
                    if self._chunks is None and not self._chunk_refused:
                        self._stop_message_deadline()  # no message is being received
                continue
            if self._reader is not None:
                self._receive_data()
                continue
            raw = buffer.line()
            if raw is None:
                if len(buffer) > self.settings.max_line_length + 1:  # + the CR of CRLF
                    if self._overlong is None:
                        self._overlong = buffer.head(5)
                    buffer.clear()
                break
            line = raw.rstrip(b"\r")
            if self._overlong is not None or len(line) > self.settings.max_line_length:
                start = self._overlong if self._overlong is not None else line[:5]
                self._overlong = None
                self._send(replies.LINE_TOO_LONG)
                if start[:4].upper() == b"BDAT" and start[4:5] in (b" ", b"\t"):
                    # A chunk whose size could not be read cannot be told from
                    # commands (RFC 3030): nothing after it may be executed.
                    self.outcome = "protocol-error"
                    self._close()
                    return
                continue
            self._respond(self._command(line))
            answered = True
        if answered and not self._busy and not self._closing and self._reader is None and self._chunk is None:
            self._arm_idle()  # RFC 5321 4.5.3.2.7: per command, not per byte

    def _flow_control(self) -> None:
        # Stop reading once a backlog grows while the client does not read its
        # replies or a command waits: memory per session stays bounded.  (Not at
        # once on a full write buffer: a TLS layer holds the greeting until its
        # handshake, which needs reading.)
        should_pause = (self._busy or self._write_blocked) and len(self._buffer) > _PAUSE_BUFFER
        if should_pause != self._paused and self.transport is not None:
            self._paused = should_pause
            if should_pause:
                self.transport.pauseProducing()  # type: ignore[attr-defined]
            else:
                self.transport.resumeProducing()  # type: ignore[attr-defined]

    def _respond(self, outcome: Reply | Deferred[Reply] | None) -> None:
        if isinstance(outcome, Deferred):
            self._busy = True
            self._disarm_idle()
            outcome.addErrback(self._internal_error).addCallback(self._async_reply)
        elif outcome is not None:
            self._send(outcome)

    def _internal_error(self, failure: Failure) -> Reply:
        log.failure("internal error", failure)
        return replies.LOCAL_ERROR

    def _async_reply(self, reply: Reply) -> None:
        self._busy = False
        self._leave()
        if self.transport is None or not self.transport.connected:  # type: ignore[attr-defined]
            return
        self._send(reply)
        if self.factory.draining and not self._closing:
            self._last_word = replies.SHUTTING_DOWN
            self._closing = True
            self.outcome = "shutdown"
        if self._closing:
            if self._last_word is not None:
                self._send(self._last_word)
            self._close()
            return
        self._arm_idle()
        self._process()

    # -- commands -------------------------------------------------------------------

    def _command(self, raw: bytes) -> Reply | Deferred[Reply] | None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return replies.BAD_ENCODING
        verb, _, argument = line.partition(" ")
        # isascii first: str.upper() turns some non-ASCII letters into ASCII ones.
        handler = getattr(self, "smtp_" + verb.upper(), None) if verb.isascii() and verb.isalpha() else None
        if handler is None:
            if verb[:4].upper() == "BDAT" and verb[4:5].isspace():
                self._malformed_bdat()  # "BDAT<TAB>n": a chunk may follow
                return None
            return replies.UNKNOWN_COMMAND
        result: Reply | Deferred[Reply] | None = handler(argument)
        return result

    def smtp_EHLO(self, argument: str) -> Reply | Deferred[Reply]:
        return self._hello(argument, esmtp=True)

    def smtp_HELO(self, argument: str) -> Reply | Deferred[Reply]:
        return self._hello(argument, esmtp=False)

    def _hello(self, argument: str, esmtp: bool) -> Reply | Deferred[Reply]:
        name = argument.strip(" ")
        # A domain or an address literal, nothing else: the name goes into our
        # reply, the Received: header and XFORWARD.
        ascii_name = ascii_form(name)
        if ascii_name is None:
            return replies.HELO_REQUIRED
        assert self._client is not None
        self._client = attrs.evolve(self._client, helo=name, esmtp=esmtp)
        if self._client.tls and not self._client.tls_version:
            # The handshake is over once a command came through it.
            version, cipher = negotiated(self.transport)
            self._client = attrs.evolve(self._client, tls_version=version, tls_cipher=cipher)
        greeting = f"{self.settings.hostname} Hello {ascii_name}"
        reply = Reply(250, "", "\n".join([greeting, *self._extensions()]) if esmtp else greeting)
        return self._then(self._reset_transaction(), reply)

    def _extensions(self) -> list[str]:
        assert self._client is not None
        offered = ["PIPELINING", f"SIZE {self.settings.max_message_size}", "8BITMIME"]
        if self.settings.tls is not None and not self._client.tls:
            offered.append("STARTTLS")
        # Only to the hosts allowed to send them, as Postfix offers them.
        if self.settings.access.may_xclient(self._client.address):
            offered.append(forwarding.XCLIENT_KEYWORD)
        if self.settings.access.may_xforward(self._client.address):
            offered.append(forwarding.XFORWARD_KEYWORD)
        offered += ["ENHANCEDSTATUSCODES", "SMTPUTF8", "DSN", "CHUNKING", "BINARYMIME"]
        return offered

    def smtp_MAIL(self, argument: str) -> Reply | Deferred[Reply]:
        assert self._client is not None
        if not self._client.helo:
            return replies.NEED_HELO
        if self.settings.require_tls and not self._client.tls:
            return replies.TLS_REQUIRED
        if self._envelope is not None:
            return replies.NESTED_MAIL
        try:
            sender, parameters = parse_mail(argument, self.settings.max_message_size)
        except EnvelopeError as error:
            return error.reply
        client = self._client
        if self._forwarded is not None:
            client = forwarding.forwarded_client(self._client, self._forwarded)
        # Counted for the original client, when the MTA in front named it.
        if not self.factory.clients.message(client.address or self._client.address, self.factory.reactor.seconds()):
            self.factory.report(Event.RATE_LIMITED, "max_messages_per_client")
            return replies.RATE_LIMITED
        envelope = Envelope(client, sender, parameters)
        if self._relay is None:
            self._relay = self.setup.next_hop.session()

        def started(reply: Reply) -> Reply:
            if reply.positive:
                self._envelope = envelope
                self._transaction_id = secrets.token_hex(6).upper()
            return reply

        return self._relay.mail(envelope).addCallback(started)

    def smtp_RCPT(self, argument: str) -> Reply | Deferred[Reply]:
        if self._envelope is None or self._relay is None:
            return replies.NEED_MAIL
        if len(self._envelope.recipients) >= self.settings.max_recipients:
            return replies.TOO_MANY_RECIPIENTS
        try:
            recipient = parse_rcpt(argument, self._envelope.parameters.smtputf8)
        except EnvelopeError as error:
            return error.reply
        if not self.setup.accepts(self._envelope, recipient):
            # The policy would decide otherwise for this recipient than for the
            # others: refused before the next hop hears of it, the client sends
            # it again in a transaction of its own (RFC 5321 4.5.3.1.10).
            return replies.SEPARATE_TRANSACTION

        def added(reply: Reply) -> Reply:
            if reply.positive and self._envelope is not None:
                self._envelope = self._envelope.with_recipient(recipient)
            return reply

        return self._relay.rcpt(recipient).addCallback(added)

    def smtp_DATA(self, argument: str) -> Reply:
        if argument.strip():
            return replies.SYNTAX_ERROR
        if self._envelope is None:
            return replies.NEED_MAIL
        if self._chunks is not None or self._chunk_refused:
            return replies.BAD_SEQUENCE  # RFC 3030: no DATA after BDAT
        if self._envelope.parameters.body is BodyType.BINARYMIME:
            return replies.BINARYMIME_NEEDS_BDAT
        if not self._envelope.recipients:
            return replies.NO_VALID_RECIPIENTS
        self._spool = self._new_spool()
        self._reader = DataReader(self._spool.write)
        self._arm_idle()
        self._start_message_deadline()
        return replies.START_DATA

    def smtp_BDAT(self, argument: str) -> Reply | Deferred[Reply] | None:
        """RFC 3030: the chunk's bytes follow the command line; every chunk is read
        (even a refused one, so its bytes are never taken for commands), and
        the message is scanned and relayed after the LAST one like any other."""
        parsed = _bdat_arguments(argument)
        if parsed is None:
            self._malformed_bdat()
            return None
        size, last = parsed
        refusal = self._bdat_refusal()
        if refusal is not None:
            self._chunk_refused = not last
            if last:
                self._abandon_data()
            return self._read_chunk(size, None, lambda: refusal)
        if self._chunks is None:
            assert self._envelope is not None
            self._spool = self._new_spool()
            # Binary content is relayed with BDAT only; anything else gets one kind
            # of line ending, as DATA does, so no next hop can see another boundary.
            binary = self._envelope.parameters.body is BodyType.BINARYMIME
            self._chunks = LineEndingNormaliser(self._spool.write, normalise=not binary)
        chunks = self._chunks

        def received() -> Reply | Deferred[Reply]:
            if not last:
                return replies.CHUNK_RECEIVED.with_text(f"Ok: {size} octets received")
            chunks.close()
            self._chunks = None
            return self._end_of_data()

        return self._read_chunk(size, chunks.feed, received)

    def _malformed_bdat(self) -> None:
        # Without a size the chunk cannot be told from commands: stop here.
        self.outcome = "protocol-error"
        self._send(replies.BAD_BDAT_SYNTAX)
        self._close()

    def _bdat_refusal(self) -> Reply | None:
        if self._envelope is None:
            return replies.NEED_MAIL
        if self._reader is not None or self._chunk_refused:
            return replies.BAD_SEQUENCE
        if not self._envelope.recipients:
            return replies.NO_VALID_RECIPIENTS
        return None

    def _read_chunk(
        self, size: int, sink: Callable[[bytes], None] | None, done: Callable[[], Reply | Deferred[Reply]]
    ) -> Reply | Deferred[Reply] | None:
        chunk = _Chunk(size, sink, done)
        if not size:
            return done()
        self._chunk = chunk
        self._arm_idle()
        self._start_message_deadline()
        return None

    def smtp_RSET(self, argument: str) -> Reply | Deferred[Reply]:
        if argument.strip():
            return replies.SYNTAX_ERROR
        return self._then(self._reset_transaction(), replies.RESET_OK)

    def smtp_NOOP(self, argument: str) -> Reply:
        return replies.OK

    def smtp_QUIT(self, argument: str) -> None:
        self.outcome = "quit"
        self._send(replies.CLOSING)
        self._close()

    def smtp_VRFY(self, argument: str) -> Reply:
        return replies.CANNOT_VRFY if argument.strip() else replies.SYNTAX_ERROR

    def smtp_EXPN(self, argument: str) -> Reply:
        return replies.NOT_IMPLEMENTED

    def smtp_HELP(self, argument: str) -> Reply:
        return replies.HELP

    def smtp_STARTTLS(self, argument: str) -> Reply | None:
        assert self._client is not None
        if self.settings.tls is None:
            return replies.NOT_IMPLEMENTED
        if argument.strip():
            return replies.SYNTAX_ERROR
        if self._client.tls:
            return replies.TLS_ALREADY_ACTIVE
        self._send(replies.READY_FOR_TLS)
        # RFC 3207: whatever was pipelined after STARTTLS is discarded, and the
        # session starts over once the handshake is done.
        self._buffer.clear()
        self._envelope = None
        self._forwarded = None
        if self._relay is not None:
            self._relay.close()
            self._relay = None
        self._client = attrs.evolve(self._client, helo="", esmtp=False, tls=True)
        self.transport.startTLS(self.settings.tls)  # type: ignore[union-attr]
        return None

    def smtp_XFORWARD(self, argument: str) -> Reply:
        """Postfix's XFORWARD_README: the original client of the next transaction,
        from the MTA in front.  As smtpd.c's xforward_cmd() checks: 503 in a
        transaction, 501 without attributes, 550 from a host not in
        xforward_hosts; then each valid command updates the attributes and gets
        "250 2.0.0 Ok", a refused one (501) changes nothing."""
        refusal = self._forwarding_refusal(
            argument, replies.XFORWARD_SYNTAX, self.settings.access.may_xforward, "xforward"
        )
        if refusal is not None:
            return refusal
        try:
            self._forwarded = forwarding.xforward(argument, self._forwarded)
        except forwarding.Refused as refused:
            return refused.reply
        return replies.OK

    def smtp_XCLIENT(self, argument: str) -> Reply | Deferred[Reply] | None:
        """Postfix's XCLIENT_README, as nginx's mail proxy sends it: the client of
        the rest of the session.  Checked as XFORWARD is; then the session goes
        back to its greeting (a new 220, EHLO needed again unless HELO came with
        it) and the checks made at connect are made for the new client: outside
        allowed_clients, or over max_connections_per_client, it is refused as a
        connection is, and closed.  Whether XCLIENT and XFORWARD are allowed is
        asked again too, for the new address (XCLIENT_README Note 1: "Once ADDR is
        sent, the client is usually no longer authorized to send XCLIENT")."""
        assert self._client is not None and self._peer is not None
        refusal = self._forwarding_refusal(
            argument, replies.XCLIENT_SYNTAX, self.settings.access.may_xclient, "xclient"
        )
        if refusal is not None:
            return refusal
        try:
            self._client = forwarding.xclient(argument, self._client, self._peer)
        except forwarding.Refused as refused:
            return refused.reply
        refusal = None
        if not self.settings.access.allows(self._client.address):
            self.factory.report(Event.REFUSED, "access")
            refusal = replies.ACCESS_DENIED
        refusal = refusal or self._count_client()
        if refusal is not None:
            self.outcome = "refused"
            self._send(refusal)
            self._close()
            return None
        return self._then(self._reset_transaction(), self._greeting())

    def _forwarding_refusal(
        self, argument: str, syntax: Reply, allowed: Callable[[str], bool], command: str
    ) -> Reply | None:
        assert self._client is not None
        if self._envelope is not None:
            return replies.TRANSACTION_IN_PROGRESS
        if not argument.strip(" \t"):
            return syntax
        if not allowed(self._client.address):
            self.factory.report(Event.REFUSED, command)
            return replies.NOT_AUTHORIZED
        return None

    # -- transactions ---------------------------------------------------------------

    def _then(self, pending: Deferred[None] | None, reply: Reply) -> Reply | Deferred[Reply]:
        return reply if pending is None else pending.addCallback(lambda _: reply)

    def _reset_transaction(self) -> Deferred[None] | None:
        self._envelope = None
        self._forwarded = None  # XFORWARD_README: at RSET (and EHLO, XCLIENT, as Postfix's mail_reset())
        self._abandon_data()
        if self._relay is None:
            return None
        return self._relay.reset()

    def _receive_data(self) -> None:
        assert self._reader is not None
        # Out of a backlog of several reads, the reader gets the data up to the
        # next CRLF "." CRLF only, so what was pipelined after a message is not
        # copied along with it; a single read goes whole, which copies nothing.
        # The reader gives back whatever followed the end of data.
        buffer = self._buffer
        if buffer.startswith(b".\r\n"):
            piece = buffer.take(3)  # the end of data, if a line starts here
        elif buffer.one_read:
            piece = buffer.take(len(buffer))
        else:
            piece = buffer.take_through(b"\r\n.\r\n")
        rest = self._reader.feed(piece)
        if rest is None:
            return
        buffer.unread(len(rest))
        self._reader = None
        self._respond(self._end_of_data())

    def _end_of_data(self) -> Reply | Deferred[Reply]:
        self._stop_message_deadline()
        spool, envelope, relay = self._spool, self._envelope, self._relay
        self._spool = None
        assert spool is not None and envelope is not None and relay is not None
        try:
            message = spool.finish()
        except SpoolFull:
            return self._refuse_message(replies.MESSAGE_TOO_BIG)
        except OSError as error:
            log.error("spool write failed: {error}", error=error)
            return self._refuse_message(replies.SPOOL_UNAVAILABLE)
        self._envelope = None
        self._forwarded = None  # XFORWARD_README: "At the end of each MAIL FROM transaction (i.e. RSET or DOT)"

        def done(reply: Reply) -> Reply:
            message.close()
            return reply

        receiving = self.factory.reactor.seconds() - self._receiving_since
        return self.setup.process(envelope, message, relay, self._transaction_id, receiving).addBoth(done)

    def _refuse_message(self, reply: Reply) -> Reply | Deferred[Reply]:
        """``reply`` to an end of data the scanners never saw."""
        self.factory.report(Event.MESSAGE_REFUSED, f"{reply.code // 100}xx")
        return self._then(self._reset_transaction(), reply)

    def _new_spool(self) -> Spool:
        self._receiving_since = self.factory.reactor.seconds()
        return Spool(self.settings.max_message_size, self.settings.spool_memory, self.settings.spool_directory)

    def _abandon_data(self) -> None:
        self._stop_message_deadline()
        if self._spool is not None:
            self._spool.discard()
            self._spool = None
        self._reader = None
        self._chunks = None
        self._chunk_refused = False


def _bdat_arguments(argument: str) -> tuple[int, bool] | None:
    """``BDAT`` arguments -> (chunk size, last), or None when malformed."""
    words = argument.split()
    if not 1 <= len(words) <= 2 or not (words[0].isascii() and words[0].isdigit()) or len(words[0]) > 15:
        return None
    if len(words) == 2 and words[1].upper() != "LAST":
        return None
    return int(words[0]), len(words) == 2


class _Chunk:
    """A BDAT chunk being read: ``remaining`` bytes still to come, each passed to
    ``sink`` (or dropped, for a refused chunk), then ``done`` gives the reply."""

    def __init__(
        self, size: int, sink: Callable[[bytes], None] | None, done: Callable[[], Reply | Deferred[Reply]]
    ) -> None:
        self.remaining = size
        self._sink = sink
        self.done = done

    def feed(self, data: bytes) -> None:
        self.remaining -= len(data)
        if self._sink is not None:
            self._sink(data)


@attrs.frozen(eq=False)
class Setup:
    """What a session runs with from its connection to its end: the next hop, the
    message processor, the recipient check and the server settings.  A factory
    hands its current one to each new session; a reload gives it another."""

    next_hop: INextHop
    process: Processor
    settings: ServerSettings = ServerSettings()
    accepts: RecipientCheck = _every_recipient


class _SetupField(Generic[T]):
    """One field of a factory's current setup; setting it gives the factory a new
    setup (for sessions to come), as embedders and tests set these attributes."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, factory: GuardFactory, owner: type | None = None) -> T:
        return cast(T, getattr(factory.setup, self._name))

    def __set__(self, factory: GuardFactory, value: T) -> None:
        changes: dict[str, Any] = {self._name: value}
        factory.reconfigure(attrs.evolve(factory.setup, **changes))


class GuardFactory(Factory):
    """Listen with this to run smtpguard on any endpoint.

    ``next_hop`` is where accepted mail goes (an L{INextHop}, usually
    L{smtpguard.upstream.Upstream}); ``process`` handles each message at its end
    of data (usually L{smtpguard.pipeline.Pipeline.process}); ``accepts`` says
    whether a RCPT may join its transaction (usually
    L{smtpguard.pipeline.Pipeline.accepts}); ``report`` hears of each session's
    end and of each client refused (L{smtpguard.events}).  The first four are the
    factory's :class:`Setup`, which :meth:`reconfigure` replaces for the sessions
    to come.
    """

    protocol = ESMTPServer  # type: ignore[assignment]
    next_hop = _SetupField[INextHop]()
    process = _SetupField[Processor]()
    settings = _SetupField[ServerSettings]()
    accepts = _SetupField[RecipientCheck]()

    def __init__(
        self,
        reactor: Any,
        next_hop: INextHop,
        process: Processor,
        settings: ServerSettings = ServerSettings(),
        accepts: RecipientCheck = _every_recipient,
        report: Report = ignore,
    ) -> None:
        verifyObject(INextHop, next_hop)
        self.report = report
        self.reactor = reactor
        self.setup = Setup(next_hop, process, settings, accepts)
        self.connections = 0
        self.sessions: set[ESMTPServer] = set()
        self.draining = False
        # Counted across setups: a reload changes the limits, not who is connected.
        self.clients = ClientCounters(settings.access)
        self._users: dict[Setup, int] = {}
        self._retiring: dict[Setup, list[Deferred[None]]] = {}

    def reconfigure(self, setup: Setup) -> Deferred[None]:
        """Sessions made from now on run with ``setup`` (those under way keep
        theirs); fires once no session uses the previous setup any more."""
        previous, self.setup = self.setup, setup
        self.clients.rules = setup.settings.access
        if previous not in self._users:
            return succeed(None)
        retired: Deferred[None] = Deferred()
        self._retiring.setdefault(previous, []).append(retired)
        return retired

    def enter(self) -> Setup:
        """A session starts: the setup it runs with."""
        self._users[self.setup] = self._users.get(self.setup, 0) + 1
        return self.setup

    def leave(self, setup: Setup) -> None:
        """A session that ran with ``setup`` is over (its outcomes too)."""
        users = self._users.pop(setup) - 1
        if users:
            self._users[setup] = users
            return
        for retired in self._retiring.pop(setup, []):
            retired.callback(None)

    def drain(self) -> None:
        """Shutting down: idle sessions get 421 at once, busy ones right after the
        reply they wait for, so no client loses the outcome of a message it sent."""
        self.draining = True
        for session in list(self.sessions):
            session.shut_down()

    @property
    def busy(self) -> bool:
        return any(session.busy for session in self.sessions)

    @property
    def refused_client_connections(self) -> int:
        """Connections refused for ``max_connections_per_client`` since the start (for metrics)."""
        return self.clients.refused_connections
