"""Test doubles for smtpguard and for plugin authors.

Each provides its interface (checked with ``verifyObject`` in smtpguard's own
tests), keeps what it saw, and answers as it is told.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from smtpguard import replies
from smtpguard.envelope import Envelope, Recipient
from smtpguard.interfaces import INextHop, IRelaySession, IScanner
from smtpguard.replies import Reply
from smtpguard.results import ScanResult
from smtpguard.spool import Message


@implementer(IScanner)
class FixedScanner:
    """Returns ``result`` for every message (or a Deferred you fire yourself when
    ``result`` is None: see :attr:`pending`)."""

    def __init__(self, result: ScanResult | None, name: str = "fixed") -> None:
        self.name = name
        self._result = result
        self.scanned: list[bytes] = []
        self.pending: list[Deferred[ScanResult]] = []

    def scan(self, message: Message, envelope: Envelope) -> Deferred[ScanResult]:
        self.scanned.append(message.read())
        if self._result is not None:
            return defer.succeed(attrs.evolve(self._result, scanner=self.name))
        waiting: Deferred[ScanResult] = Deferred()
        self.pending.append(waiting)
        return waiting


@attrs.define
class Delivery:
    """One message as the in-memory next hop received it."""

    envelope: Envelope
    data: bytes


# What a strict next hop -- Postfix 3.7's smtpd, src/smtpd/smtpd.c (mail_cmd,
# rcpt_cmd, data_cmd), texts checked against Debian's postfix 3.7 -- answers to a
# command out of its order.  The in-memory next hop gives the same replies.
HOP_NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
HOP_NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
HOP_NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
HOP_NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients")


@implementer(IRelaySession)
class MemorySession:
    """One relay session with a :class:`MemoryNextHop`, as strict as a real next hop.

    It records in ``hop.commands`` what the real session would send, refuses a
    command out of order as Postfix does (nested MAIL, RCPT without MAIL, DATA
    without an accepted recipient), delivers only at the end of data with a
    positive reply, and after :meth:`close` answers every call as an unreachable
    next hop would (:data:`smtpguard.replies.UPSTREAM_UNAVAILABLE`) without
    sending anything.
    """

    def __init__(self, hop: MemoryNextHop) -> None:
        self._hop = hop
        # The open transaction: its sender and the recipients the hop accepted.
        self._envelope: Envelope | None = None
        self.closed = False

    @property
    def in_transaction(self) -> bool:
        """Whether a MAIL was accepted and its transaction has not ended yet."""
        return self._envelope is not None

    def _answer(self, reply: Reply, on_answer: Callable[[], None] | None = None) -> Deferred[Reply]:
        """``reply``, now or (with ``hop.hold``) once released; ``on_answer`` runs
        when the hop gives it, before the caller hears it."""
        waiting: Deferred[Reply]
        if self._hop.hold:
            waiting = Deferred()
            self._hop.held.append((waiting, reply))
        else:
            waiting = defer.succeed(reply)
        if on_answer is not None:

            def answered(given: Reply) -> Reply:
                on_answer()
                return given

            waiting.addCallback(answered)
        return waiting

    def _send(self, command: str, refusal: Reply | None) -> Deferred[Reply] | None:
        """Record ``command`` as sent, or as not sent after close(); the reply when
        it cannot go on: unavailable after close(), ``refusal`` out of order."""
        if self.closed:
            self._hop.after_close.append(command)
            return defer.succeed(replies.UPSTREAM_UNAVAILABLE)
        self._hop.commands.append(command)
        if refusal is None:
            return None
        self._hop.out_of_state.append(command)
        return self._answer(refusal)

    @property
    def extensions(self) -> dict[str, str]:
        return self._hop.extensions

    def mail(self, envelope: Envelope) -> Deferred[Reply]:
        refused = self._send(f"MAIL {envelope.sender}", HOP_NESTED_MAIL if self.in_transaction else None)
        if refused is not None:
            return refused
        reply = self._hop.mail_reply(envelope)
        if reply.positive:
            self._envelope = attrs.evolve(envelope, recipients=())
        return self._answer(reply)

    def rcpt(self, recipient: Recipient) -> Deferred[Reply]:
        refused = self._send(f"RCPT {recipient.address}", None if self.in_transaction else HOP_NEED_MAIL)
        if refused is not None:
            return refused
        reply = self._hop.rcpt_reply(recipient)
        if reply.positive and self._envelope is not None:
            self._envelope = self._envelope.with_recipient(recipient)
        return self._answer(reply)

    def data(self, message: Message, prefix: bytes) -> Deferred[Reply]:
        envelope = self._envelope
        refusal = None
        if envelope is None:
            refusal = HOP_NEED_RCPT
        elif not envelope.recipients:
            refusal = HOP_NO_VALID_RECIPIENTS
        refused = self._send("DATA", refusal)
        if refused is not None:
            return refused
        assert envelope is not None
        # The end of data has gone out: the transaction is over, whatever the reply.
        self._envelope = None
        reply = self._hop.data_reply
        if not reply.positive:
            return self._answer(reply)
        delivery = Delivery(envelope, prefix + message.read())
        return self._answer(reply, lambda: self._hop.delivered.append(delivery))

    def reset(self) -> Deferred[None]:
        if self.closed:
            self._hop.after_close.append("RSET")
        else:
            self._hop.commands.append("RSET")
            self._envelope = None
        return defer.succeed(None)

    def close(self) -> None:
        """The client session is over: a transaction still open (its end of data
        never went out) is abandoned, so nothing of it is delivered."""
        if self.closed:
            self._hop.after_close.append("QUIT")
            return
        self._hop.commands.append("QUIT")
        if self._envelope is not None:
            self._hop.abandoned.append(self._envelope)
            self._envelope = None
        self.closed = True


@implementer(INextHop)
class MemoryNextHop:
    """A next hop in memory, as strict as a real one (see :class:`MemorySession`):
    records commands and deliveries; answers with the replies you set.  With
    ``hold = True`` replies wait in :attr:`held` until you fire them (to test
    pipelining and timing).  Its sessions report :attr:`extensions` as the next
    hop's EHLO keywords: by default those smtpguard itself offers.

    What it keeps, for tests to compare:

    - ``commands``: what the sessions sent, in order (``MAIL sender``,
      ``RCPT address``, ``DATA``, ``RSET``, ``QUIT`` for close());
    - ``delivered``: a :class:`Delivery` for each end of data answered positively;
    - ``out_of_state``: the commands refused as out of order (none, from a
      correct caller);
    - ``abandoned``: the envelope of each transaction left open at close();
    - ``after_close``: calls made after close(), which reached no next hop.
    """

    def __init__(self) -> None:
        self.extensions: dict[str, str] = dict.fromkeys(("PIPELINING", "8BITMIME", "SMTPUTF8", "DSN", "CHUNKING"), "")
        self.commands: list[str] = []
        self.delivered: list[Delivery] = []
        self.out_of_state: list[str] = []
        self.abandoned: list[Envelope] = []
        self.after_close: list[str] = []
        self.mail_reply: Callable[[Envelope], Reply] = lambda envelope: replies.SENDER_OK
        self.rcpt_reply: Callable[[Recipient], Reply] = lambda recipient: replies.RECIPIENT_OK
        self.data_reply: Reply = replies.OK.with_text("Ok: queued")
        self.hold = False
        self.held: list[tuple[Deferred[Reply], Reply]] = []
        self.sessions: list[MemorySession] = []

    def release(self) -> None:
        """Fire every held reply, in order."""
        while self.held:
            waiting, reply = self.held.pop(0)
            waiting.callback(reply)

    def session(self) -> MemorySession:
        session = MemorySession(self)
        self.sessions.append(session)
        return session
