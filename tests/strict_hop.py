"""A next hop as strict as Postfix's smtpd, on a real socket, for integration tests.

``StrictHop`` answers as Postfix 3.7's smtpd does with ``smtpd_helo_required = yes``;
it records what each connection sent and heard, queues a message only when a
complete end of data arrived and it answered 250, and has gates that hold it at
the greeting, the EHLO reply, the MAIL and RCPT replies and the final reply, so a
test can stop it at any point without sleeping.  The ``strict_hop`` and
``strict_hops`` fixtures (tests/conftest.py) start it on 127.0.0.1, port 0.

Not emulated: VRFY, ETRN and AUTH (Postfix without SASL) beyond their refusal,
Postfix's time limits, its error counters and tarpit, and its access restrictions
(every sender and recipient is accepted).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from smtpguard import replies, testing
from smtpguard.replies import Reply
from tests.certificates import server_options, throwaway_certificate


class Postfix:
    """Postfix 3.7's smtpd replies (they are written in its src/smtpd/smtpd.c),
    copied from the strings in Debian's postfix 3.7.11 smtpd and from what it
    answered on loopback; test_strict_hop.py compares the double with it."""

    NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
    NESTED_MAIL = testing.HOP_NESTED_MAIL
    NEED_MAIL = testing.HOP_NEED_MAIL
    NEED_RCPT = testing.HOP_NEED_RCPT
    NO_VALID_RECIPIENTS = testing.HOP_NO_VALID_RECIPIENTS
    MAIL_AFTER_BDAT = Reply(503, "5.5.1", "Error: MAIL after BDAT")
    RCPT_AFTER_BDAT = Reply(503, "5.5.1", "Error: RCPT after BDAT")
    DATA_AFTER_BDAT = Reply(503, "5.5.1", "Error: DATA after BDAT")
    IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
    AUTH_NOT_ENABLED = Reply(503, "5.5.1", "Error: authentication not enabled")
    NOT_RECOGNIZED = Reply(500, "5.5.2", "Error: command not recognized")
    BAD_SYNTAX = Reply(500, "5.5.2", "Error: bad syntax")
    BAD_UTF8 = Reply(500, "5.5.2", "Error: bad UTF-8 syntax")
    NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
    # BDAT without CHUNKING, or with bad arguments: the chunk cannot be skipped, so
    # Postfix hangs up after these.
    BDAT_NOT_IMPLEMENTED = Reply(521, "5.5.1", "Error: command not implemented")
    BDAT_SYNTAX = Reply(521, "5.5.4", "Syntax: BDAT count [LAST]")
    NULL_BDAT = Reply(551, "5.7.1", "Null BDAT request")
    CHUNK_TOO_BIG = Reply(552, "5.3.4", "Chunk exceeds message size limit")
    EHLO_SYNTAX = Reply(501, "", "Syntax: EHLO hostname")
    HELO_SYNTAX = Reply(501, "", "Syntax: HELO hostname")
    MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
    RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
    DATA_SYNTAX = Reply(501, "5.5.4", "Syntax: DATA")
    RSET_SYNTAX = Reply(501, "5.5.4", "Syntax: RSET")
    STARTTLS_SYNTAX = Reply(501, "5.5.4", "Syntax: STARTTLS")
    XFORWARD_SYNTAX = Reply(501, "5.5.4", "Syntax: XFORWARD attribute=value...")
    ATTRIBUTE_EXPECTED = Reply(501, "5.5.4", "Error: attribute=value expected")
    BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
    BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
    BAD_SIZE = Reply(501, "5.5.4", "Bad message size syntax")
    BAD_RET = Reply(501, "5.5.4", "Bad RET parameter syntax")
    BAD_NOTIFY = Reply(501, "5.5.4", "Error: Bad NOTIFY parameter syntax")
    BAD_ORCPT = Reply(501, "5.5.4", "Error: Bad ORCPT parameter syntax")
    DSN_DISABLED = Reply(501, "5.7.1", "DSN support is disabled")
    TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
    XFORWARD_FORBIDDEN = Reply(550, "5.7.0", "Error: insufficient authorization")
    TLS_ALREADY_ACTIVE = Reply(554, "5.5.1", "Error: TLS already active")
    READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
    OK = Reply(250, "2.0.0", "Ok")
    SENDER_OK = replies.SENDER_OK
    RECIPIENT_OK = replies.RECIPIENT_OK
    START_DATA = replies.START_DATA
    BYE = replies.CLOSING
    # Templates: fill() puts the values in.
    UNSUPPORTED = Reply(555, "5.5.4", "Unsupported option: {}")
    BAD_XFORWARD_NAME = Reply(501, "5.5.4", "Bad XFORWARD attribute name: {}")
    DISCARDED = Reply(551, "5.0.0", "Discarded {} bytes after earlier error")
    CHUNK_RECEIVED = Reply(250, "2.0.0", "Ok: {} bytes")
    QUEUED = Reply(250, "2.0.0", "Ok: queued as {}")
    CHUNKS_QUEUED = Reply(250, "2.0.0", "Ok: {} bytes queued as {}")


def fill(template: Reply, *values: object) -> Reply:
    """A Postfix reply template with its values in."""
    return template.with_text(template.text.format(*values))


# The order Postfix lists them in its EHLO reply (VRFY and ETRN left out).
EHLO_KEYWORDS = (
    "PIPELINING",
    "SIZE",
    "STARTTLS",
    "XFORWARD",
    "ENHANCEDSTATUSCODES",
    "8BITMIME",
    "DSN",
    "SMTPUTF8",
    "CHUNKING",
)
XFORWARD_ATTRIBUTES = ("NAME", "ADDR", "PROTO", "HELO", "SOURCE", "PORT", "IDENT")
# RFC 2920 section 3.1 and RFC 3207: a command after one of these, sent before its
# reply came, is improper pipelining even where PIPELINING is offered.
LAST_IN_GROUP = frozenset({"EHLO", "HELO", "DATA", "QUIT", "NOOP", "STARTTLS", "AUTH", "VRFY", "EXPN", "TURN"})


def _upper(keywords: Iterable[str]) -> frozenset[str]:
    return frozenset(keyword.upper() for keyword in keywords)


@attrs.frozen
class HopSettings:
    """How the strict hop is set up, in Postfix's terms."""

    hostname: str = "hop.test"
    message_size_limit: int = 10_240_000
    # EHLO keywords not offered, as Postfix's smtpd_discard_ehlo_keywords: a
    # discarded CHUNKING refuses BDAT, DSN its parameters, SMTPUTF8 its MAIL
    # parameter; PIPELINING, SIZE, 8BITMIME and ENHANCEDSTATUSCODES only vanish
    # from the EHLO reply (Postfix still enforces the size limit and accepts
    # BODY=8BITMIME).
    discard_ehlo_keywords: frozenset[str] = attrs.field(default=frozenset(), converter=_upper)
    starttls: bool = False  # smtpd_tls_security_level = may, with a throwaway certificate
    xforward: bool = False  # smtpd_authorized_xforward_hosts covers the client

    def offers(self, keyword: str) -> bool:
        if keyword in ("STARTTLS", "XFORWARD") and not getattr(self, keyword.lower()):
            return False
        return keyword not in self.discard_ehlo_keywords


@attrs.define(eq=False)
class HopConnection:
    """What one connection to the hop sent and heard."""

    number: int
    opened_at: float
    closed_at: float | None = None
    commands: list[str] = attrs.Factory(list)  # command lines in order, no message data
    replies: list[Reply] = attrs.Factory(list)  # every reply written, in order
    xforward: list[str] = attrs.Factory(list)  # the XFORWARD lines it accepted
    improper_pipelining: list[str] = attrs.Factory(list)  # commands followed too early
    tls: bool = False
    in_transaction: bool = False  # a MAIL was accepted and its transaction goes on
    _abort: Callable[[], None] | None = None
    transport: Any = None  # to stop and resume reading (pauseProducing) from a test

    @property
    def open(self) -> bool:
        return self.closed_at is None

    @property
    def out_of_state(self) -> bool:
        """Whether any command got a 503 (bad sequence)."""
        return any(reply.code == 503 for reply in self.replies)

    def abort(self) -> None:
        """The hop drops the connection, as at its own idle timeout."""
        if self._abort is not None and self.open:
            self._abort()


@attrs.frozen
class HopMessage:
    """A message the hop received: queued, refused at its end, or cut off."""

    connection: int  # HopConnection.number
    sender: str
    recipients: tuple[str, ...]
    data: bytes  # as received, without dot-stuffing or the end-of-data line
    mail: str  # the MAIL command line, parameters and all
    rcpts: tuple[str, ...]  # the accepted RCPT command lines
    xforward: tuple[str, ...]  # the XFORWARD lines that came before its MAIL
    chunked: bool  # BDAT rather than DATA
    queue_id: str = ""


class Gate:
    """A point where the hop can be held.  Open (the start), everything passes at
    once; closed, what reaches it waits, in order, until released."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False
        self._held: list[tuple[HopConnection, Callable[[], None]]] = []
        self._waiters: list[tuple[int, Deferred[list[HopConnection]]]] = []

    def __repr__(self) -> str:
        return f"<Gate {self.name} {'closed' if self.closed else 'open'}, {len(self._held)} held>"

    @property
    def held(self) -> list[HopConnection]:
        """The connections waiting here, oldest first."""
        return [connection for connection, _ in self._held]

    def close(self) -> None:
        """Hold whatever reaches the gate from now on."""
        self.closed = True

    def open(self) -> None:
        """Release what is held and let everything pass from now on."""
        self.closed = False
        self.release()

    def release(self, count: int | None = None) -> None:
        """Let the oldest ``count`` held (all by default) go on; the gate stays closed.
        A connection lost meanwhile goes on too: its reply is not written, but a
        message whose end of data arrived is queued, as Postfix does."""
        count = len(self._held) if count is None else count
        going, self._held = self._held[:count], self._held[count:]
        for _, go in going:
            go()

    def wait(self, count: int = 1) -> Deferred[list[HopConnection]]:
        """Fires with :attr:`held` once ``count`` are held here."""
        waiting: Deferred[list[HopConnection]] = Deferred()
        self._waiters.append((count, waiting))
        self._notify()
        return waiting

    def pass_(self, connection: HopConnection, go: Callable[[], None]) -> None:
        if not self.closed:
            go()
            return
        self._held.append((connection, go))
        self._notify()

    def _notify(self) -> None:
        ready = [waiting for count, waiting in self._waiters if len(self._held) >= count]
        self._waiters = [(count, waiting) for count, waiting in self._waiters if waiting not in ready]
        for waiting in ready:
            waiting.callback(self.held)


@attrs.define(eq=False)
class Gates:
    """The hop's gates, all open at the start."""

    greeting: Gate = attrs.Factory(lambda: Gate("greeting"))
    ehlo: Gate = attrs.Factory(lambda: Gate("ehlo"))  # the reply to EHLO and HELO
    mail: Gate = attrs.Factory(lambda: Gate("mail"))  # the reply to MAIL
    rcpt: Gate = attrs.Factory(lambda: Gate("rcpt"))  # the reply to RCPT
    end_of_data: Gate = attrs.Factory(lambda: Gate("end_of_data"))  # the final reply


class _Mode(enum.Enum):
    COMMAND = "command"
    DATA = "data"
    CHUNK = "chunk"


class _Bdat(enum.Enum):
    NONE = "none"  # no BDAT in this transaction
    OK = "ok"  # receiving chunks
    ERROR = "error"  # a chunk was refused: the rest is discarded up to LAST


@attrs.define
class _Transaction:
    sender: str
    mail: str
    xforward: tuple[str, ...]
    recipients: list[str] = attrs.Factory(list)
    rcpts: list[str] = attrs.Factory(list)
    data: list[bytes] = attrs.Factory(list)
    chunked: bool = False

    def message(self, connection: int, queue_id: str = "") -> HopMessage:
        return HopMessage(
            connection,
            self.sender,
            tuple(self.recipients),
            b"".join(self.data),
            self.mail,
            tuple(self.rcpts),
            self.xforward,
            self.chunked,
            queue_id,
        )


def stored_size(data: bytes) -> int:
    """The size Postfix reports for a message: each line ending as CRLF, and one
    added after a last line that has none."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return sum(len(line.removesuffix(b"\r")) + 2 for line in lines)


def _address(text: str) -> tuple[str, str] | None:
    """``<address> rest`` (or a bare ``address rest``) -> (address, rest); None when
    the angle bracket is not closed."""
    text = text.lstrip(" ")
    if text.startswith("<"):
        end = text.find(">")
        return None if end < 0 else (text[1:end], text[end + 1 :])
    address, _, rest = text.partition(" ")
    return address, rest


class StrictHopProtocol(Protocol):
    factory: StrictHop

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._pos = 0  # what of _buffer is consumed
        self._processing = False
        self._busy = False  # a reply is held at a gate
        self._closing = False
        self._lost = False
        self._mode = _Mode.COMMAND
        self._helo = ""
        self._transaction: _Transaction | None = None
        self._bdat = _Bdat.NONE
        self._xforward: list[str] = []
        self._chunk_left = 0
        self._chunk_keep = False
        self._chunk_done: Callable[[], None] = lambda: None
        self.record: HopConnection

    @property
    def _settings(self) -> HopSettings:
        return self.factory.settings

    # -- connection ------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.record = self.factory.opened(self.transport.abortConnection)  # type: ignore[union-attr]
        self.record.transport = self.transport
        greeting = Reply(220, "", f"{self._settings.hostname} ESMTP Postfix")
        self._answer(self.factory.gates.greeting, "CONNECT", greeting)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._lost = self._closing = True
        transaction = self._transaction
        if transaction is not None and (self._mode is _Mode.DATA or self._bdat is _Bdat.OK):
            # What the data phase received, the partial line or chunk included.
            if self._mode is _Mode.DATA:
                transaction.data.append(bytes(self._buffer[self._pos :]))
            self.factory.cut_off.append(transaction.message(self.record.number))
        self.factory.closed(self.record)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._buffer += data
        self._process()

    def _hang_up(self) -> None:
        self._closing = True
        self.transport.loseConnection()  # type: ignore[union-attr]

    # -- replies ---------------------------------------------------------------------

    def _reply(self, reply: Reply, verb: str) -> None:
        if self._lost:
            return
        offered = self._settings.offers("PIPELINING")
        if self._pos < len(self._buffer) and (verb in LAST_IN_GROUP or verb == "CONNECT" or not offered):
            self.record.improper_pipelining.append(verb)
        self.record.replies.append(reply)
        self.transport.write(reply.to_bytes())  # type: ignore[union-attr]

    def _answer(self, gate: Gate, verb: str, reply: Reply | Callable[[], Reply]) -> None:
        """Give ``reply`` (computed when it goes out, if a callable) through ``gate``;
        nothing more is read meanwhile, as Postfix reads the next command only
        after it has answered this one."""

        def go() -> None:
            self._busy = False
            self._reply(reply() if callable(reply) else reply, verb)
            self._process()

        self._busy = True
        gate.pass_(self.record, go)

    # -- input -----------------------------------------------------------------------

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            while not self._busy and not self._closing and self._step():
                pass
        finally:
            self._processing = False
            # One compaction per pass keeps reading linear in what arrived.
            del self._buffer[: self._pos]
            self._pos = 0
        self.factory.changed()

    def _step(self) -> bool:
        """Go on with what is buffered; False when more must arrive first."""
        if self._mode is _Mode.CHUNK:
            return self._pos < len(self._buffer) and self._read_chunk()
        if self._mode is _Mode.DATA:
            return self._read_data()
        return self._read_command()

    def _line(self) -> bytes | None:
        """The next whole line, its LF included, or None."""
        end = self._buffer.find(b"\n", self._pos)
        if end < 0:
            return None
        line = bytes(self._buffer[self._pos : end + 1])
        self._pos = end + 1
        return line

    def _read_command(self) -> bool:
        raw = self._line()
        if raw is None:
            return False
        try:
            line = raw.rstrip(b"\n").removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError:
            self.record.commands.append(repr(raw))
            self._reply(Postfix.BAD_UTF8, "")
            return True
        self.record.commands.append(line)
        verb, _, argument = line.partition(" ")
        verb = verb.upper()
        handler = getattr(self, "smtp_" + verb, None) if verb.isascii() and verb.isalpha() else None
        if not line.strip():
            self._reply(Postfix.BAD_SYNTAX, "")
        elif handler is None:
            self._reply(Postfix.NOT_RECOGNIZED, verb)
        else:
            reply = handler(argument.strip())
            if reply is not None:
                self._reply(reply, verb)
        return True

    def _read_data(self) -> bool:
        transaction = self._transaction
        assert transaction is not None
        while (line := self._line()) is not None:
            if line in (b".\r\n", b".\n"):
                self._end_of_data()
                return True
            transaction.data.append(line[1:] if line.startswith(b".") else line)
        return False

    def _read_chunk(self) -> bool:
        taken = bytes(self._buffer[self._pos : self._pos + self._chunk_left])
        self._pos += len(taken)
        self._chunk_left -= len(taken)
        if self._chunk_keep:
            assert self._transaction is not None
            self._transaction.data.append(taken)
        if not self._chunk_left:
            self._mode = _Mode.COMMAND
            self._chunk_done()
        return True

    # -- transactions ----------------------------------------------------------------

    def _reset(self) -> None:
        """Postfix's mail_reset: the XFORWARD attributes go with the transaction
        (on loopback, Postfix logs orig_client for the next message only)."""
        self._transaction = None
        self.record.in_transaction = False
        self._bdat = _Bdat.NONE
        self._xforward = []

    def _end_of_data(self) -> None:
        transaction = self._transaction
        assert transaction is not None
        self._mode = _Mode.COMMAND
        self._reset()
        number = self.record.number
        factory = self.factory

        def final() -> Reply:
            message = transaction.message(number, factory.queue_id())
            size = stored_size(message.data)
            reply = factory.final_reply
            if size > self._settings.message_size_limit:
                reply = Postfix.TOO_BIG
            elif reply is None and message.chunked:
                reply = fill(Postfix.CHUNKS_QUEUED, size, message.queue_id)
            elif reply is None:
                reply = fill(Postfix.QUEUED, message.queue_id)
            if reply.code // 100 == 2:
                factory.queued.append(message)
            else:
                factory.refused.append(attrs.evolve(message, queue_id=""))
            return reply

        self._answer(factory.gates.end_of_data, "END-OF-MESSAGE", final)

    # -- commands --------------------------------------------------------------------

    def _hello(self, argument: str, verb: str, syntax: Reply) -> None:
        if not argument:
            self._reply(syntax, verb)
            return
        self._helo = argument
        self._reset()
        lines = [self._settings.hostname]
        if verb == "EHLO":
            for keyword in EHLO_KEYWORDS:
                if (keyword == "STARTTLS" and self.record.tls) or not self._settings.offers(keyword):
                    continue
                if keyword == "SIZE":
                    keyword = f"SIZE {self._settings.message_size_limit}"
                elif keyword == "XFORWARD":
                    keyword = "XFORWARD " + " ".join(XFORWARD_ATTRIBUTES)
                lines.append(keyword)
        self._answer(self.factory.gates.ehlo, verb, Reply(250, "", "\n".join(lines)))

    def smtp_EHLO(self, argument: str) -> None:
        self._hello(argument, "EHLO", Postfix.EHLO_SYNTAX)

    def smtp_HELO(self, argument: str) -> None:
        self._hello(argument, "HELO", Postfix.HELO_SYNTAX)

    def smtp_MAIL(self, argument: str) -> None:
        reply = self._mail(argument)
        self._answer(self.factory.gates.mail, "MAIL", reply)

    def _mail(self, argument: str) -> Reply:
        if not self._helo:
            return Postfix.NEED_HELO
        if self._transaction is not None:
            return Postfix.NESTED_MAIL
        if self._bdat is not _Bdat.NONE:
            return Postfix.MAIL_AFTER_BDAT
        if argument[:5].upper() != "FROM:":
            return Postfix.MAIL_SYNTAX
        parsed = _address(argument[5:])
        if parsed is None:
            return Postfix.BAD_SENDER
        sender, rest = parsed
        for option in rest.split():
            refusal = self._mail_option(option)
            if refusal is not None:
                return refusal
        self._transaction = _Transaction(sender, self.record.commands[-1], tuple(self._xforward))
        self.record.in_transaction = True
        return Postfix.SENDER_OK

    def _mail_option(self, option: str) -> Reply | None:
        name, _, value = option.partition("=")
        name = name.upper()
        if name == "SIZE":
            if not (value.isascii() and value.isdigit()):
                return Postfix.BAD_SIZE
            return Postfix.TOO_BIG if int(value) > self._settings.message_size_limit else None
        if name == "BODY" and value.upper() in ("7BIT", "8BITMIME"):
            return None
        if name == "SMTPUTF8" and not value and self._settings.offers("SMTPUTF8"):
            return None
        if name in ("RET", "ENVID"):
            if not self._settings.offers("DSN"):
                return Postfix.DSN_DISABLED
            return Postfix.BAD_RET if name == "RET" and value.upper() not in ("FULL", "HDRS") else None
        return fill(Postfix.UNSUPPORTED, option)

    def smtp_RCPT(self, argument: str) -> None:
        reply = self._rcpt(argument)
        self._answer(self.factory.gates.rcpt, "RCPT", reply)

    def _rcpt(self, argument: str) -> Reply:
        transaction = self._transaction
        if transaction is None:
            return Postfix.NEED_MAIL
        if self._bdat is not _Bdat.NONE:
            return Postfix.RCPT_AFTER_BDAT
        if argument[:3].upper() != "TO:":
            return Postfix.RCPT_SYNTAX
        parsed = _address(argument[3:])
        if parsed is None or not parsed[0]:
            return Postfix.BAD_RECIPIENT
        recipient, rest = parsed
        for option in rest.split():
            refusal = self._rcpt_option(option)
            if refusal is not None:
                return refusal
        transaction.recipients.append(recipient)
        transaction.rcpts.append(self.record.commands[-1])
        return Postfix.RECIPIENT_OK

    def _rcpt_option(self, option: str) -> Reply | None:
        name, _, value = option.partition("=")
        name = name.upper()
        if name not in ("NOTIFY", "ORCPT"):
            return fill(Postfix.UNSUPPORTED, option)
        if not self._settings.offers("DSN"):
            return Postfix.DSN_DISABLED
        if name == "ORCPT":
            return None if ";" in value else Postfix.BAD_ORCPT
        words = value.upper().split(",")
        if words == ["NEVER"] or set(words) <= {"SUCCESS", "FAILURE", "DELAY"}:
            return None
        return Postfix.BAD_NOTIFY

    def smtp_DATA(self, argument: str) -> Reply | None:
        transaction = self._transaction
        if self._bdat is not _Bdat.NONE:
            return Postfix.DATA_AFTER_BDAT
        if transaction is None:
            return Postfix.NEED_RCPT
        if not transaction.recipients:
            return Postfix.NO_VALID_RECIPIENTS
        if argument:
            return Postfix.DATA_SYNTAX
        self._reply(Postfix.START_DATA, "DATA")
        self._mode = _Mode.DATA
        return None

    def smtp_BDAT(self, argument: str) -> Reply | None:
        """RFC 3030, as Postfix's bdat_cmd: every chunk is read whole (a refused one
        too, so its bytes are never taken for commands); after a refused chunk the
        rest of the message is discarded up to LAST."""
        if not self._settings.offers("CHUNKING"):
            self._reply(Postfix.BDAT_NOT_IMPLEMENTED, "BDAT")
            self._hang_up()
            return None
        words = argument.split()
        if not 1 <= len(words) <= 2 or not (words[0].isascii() and words[0].isdigit()) or (
            len(words) == 2 and words[1].upper() != "LAST"
        ):
            self._reply(Postfix.BDAT_SYNTAX, "BDAT")
            self._hang_up()
            return None
        size, last = int(words[0]), len(words) == 2
        transaction = self._transaction
        if size == 0 and not last:
            self._bdat = _Bdat.ERROR
            return Postfix.NULL_BDAT
        refusal = self._chunk_refusal(size)
        if refusal is not None:
            self._skip_chunk(size, last, refusal)
            return None
        assert transaction is not None
        self._bdat = _Bdat.OK
        transaction.chunked = True

        def received() -> None:
            if last:
                self._end_of_data()
            else:
                self._reply(fill(Postfix.CHUNK_RECEIVED, size), "BDAT")

        self._start_chunk(size, True, received)
        return None

    def _chunk_refusal(self, size: int) -> Reply | None:
        transaction = self._transaction
        if self._bdat is _Bdat.ERROR:
            return fill(Postfix.DISCARDED, size)
        if transaction is None:
            return Postfix.NEED_RCPT
        if not transaction.recipients:
            return Postfix.NO_VALID_RECIPIENTS
        if stored_size(b"".join(transaction.data)) + size > self._settings.message_size_limit:
            return Postfix.CHUNK_TOO_BIG
        return None

    def _skip_chunk(self, size: int, last: bool, reply: Reply) -> None:
        """Read the chunk and drop it, then refuse it."""
        def skipped() -> None:
            if last:
                self._reset()
            else:
                self._bdat = _Bdat.ERROR
            self._reply(reply, "BDAT")

        self._start_chunk(size, False, skipped)

    def _start_chunk(self, size: int, keep: bool, done: Callable[[], None]) -> None:
        self._chunk_left, self._chunk_keep, self._chunk_done = size, keep, done
        if size:
            self._mode = _Mode.CHUNK
        else:
            done()

    def smtp_RSET(self, argument: str) -> Reply:
        if argument:
            return Postfix.RSET_SYNTAX
        self._reset()
        return Postfix.OK

    def smtp_NOOP(self, argument: str) -> Reply:
        return Postfix.OK

    def smtp_QUIT(self, argument: str) -> None:
        self._reply(Postfix.BYE, "QUIT")
        self._hang_up()

    def smtp_AUTH(self, argument: str) -> Reply:
        return Postfix.AUTH_NOT_ENABLED if self._helo else Postfix.NEED_HELO

    def smtp_STARTTLS(self, argument: str) -> Reply | None:
        if not self._settings.starttls:
            return Postfix.NOT_IMPLEMENTED
        if argument:
            return Postfix.STARTTLS_SYNTAX
        if self.record.tls:
            return Postfix.TLS_ALREADY_ACTIVE
        self._reply(Postfix.READY_FOR_TLS, "STARTTLS")
        # RFC 3207 section 4.2: what was pipelined in plaintext is discarded, and
        # the session starts over (EHLO first).
        self._pos = len(self._buffer)
        self._helo = ""
        self._reset()
        self.record.tls = True
        self.transport.startTLS(self.factory.tls_options())  # type: ignore[union-attr]
        return None

    def smtp_XFORWARD(self, argument: str) -> Reply:
        if not self._settings.xforward:
            return Postfix.XFORWARD_FORBIDDEN
        if self._transaction is not None:
            return Postfix.IN_TRANSACTION
        if not argument:
            return Postfix.XFORWARD_SYNTAX
        for word in argument.split():
            name, equals, _ = word.partition("=")
            if not equals:
                return Postfix.ATTRIBUTE_EXPECTED
            if name.upper() not in XFORWARD_ATTRIBUTES:
                return fill(Postfix.BAD_XFORWARD_NAME, name)
        line = f"XFORWARD {argument}"
        self._xforward.append(line)
        self.record.xforward.append(line)
        return Postfix.OK


class StrictHop(Factory):
    """The strict next hop: listen with it (the fixtures do) and read what it saw.

    - ``connections``: a :class:`HopConnection` per connection, in order;
      ``open_connections`` counts the open ones, ``wait_for_open(n)`` fires when
      that count is ``n``;
    - ``queued``: each message queued (a complete end of data answered 250),
      ``refused``: each complete one answered otherwise, ``cut_off``: each whose
      data phase the connection lost (never queued);
    - ``gates``: greeting, ehlo, mail, rcpt, end_of_data (:class:`Gate`);
    - ``final_reply``: the reply to the end of data (None: Postfix's 250 ... queued as ID).
    """

    protocol = StrictHopProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(self, reactor: IReactorTime, settings: HopSettings = HopSettings()) -> None:
        self.reactor = reactor
        self.settings = settings
        self.gates = Gates()
        self.final_reply: Reply | None = None
        self.connections: list[HopConnection] = []
        self.queued: list[HopMessage] = []
        self.refused: list[HopMessage] = []
        self.cut_off: list[HopMessage] = []
        self.port = 0
        self._queue_ids = 0
        self._conditions: list[tuple[Callable[[], bool], Deferred[None]]] = []

    @property
    def endpoint(self) -> str:
        """Where it listens, as a client endpoint string."""
        return f"tcp:127.0.0.1:{self.port}"

    @property
    def open_connections(self) -> int:
        return sum(connection.open for connection in self.connections)

    @property
    def out_of_state(self) -> bool:
        """Whether any connection got a 503."""
        return any(connection.out_of_state for connection in self.connections)

    def wait_for_open(self, count: int) -> Deferred[None]:
        """Fires once exactly ``count`` connections are open (at once if they are)."""
        return self.wait_until(lambda: self.open_connections == count)

    def wait_until(self, condition: Callable[[], bool]) -> Deferred[None]:
        """Fires once ``condition()`` holds, checked whenever the hop has read input,
        answered, or a connection came or went (at once if it holds now)."""
        waiting: Deferred[None] = Deferred()
        self._conditions.append((condition, waiting))
        self.changed()
        return waiting

    def changed(self) -> None:
        ready = [waiting for condition, waiting in self._conditions if condition()]
        self._conditions = [(condition, waiting) for condition, waiting in self._conditions if waiting not in ready]
        for waiting in ready:
            waiting.callback(None)

    def certificate(self) -> bytes:
        """The PEM certificate STARTTLS presents, for clients to trust."""
        return throwaway_certificate(self.settings.hostname)[1]

    def tls_options(self) -> Any:
        return server_options(self.settings.hostname)

    def queue_id(self) -> str:
        self._queue_ids += 1
        return f"{self._queue_ids:011X}"

    def opened(self, abort: Callable[[], None]) -> HopConnection:
        connection = HopConnection(len(self.connections) + 1, self.reactor.seconds(), abort=abort)
        self.connections.append(connection)
        self.changed()
        return connection

    def closed(self, connection: HopConnection) -> None:
        connection.closed_at = self.reactor.seconds()
        self.changed()
