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


@implementer(IRelaySession)
class MemorySession:
    def __init__(self, hop: MemoryNextHop) -> None:
        self._hop = hop
        self._envelope: Envelope | None = None
        self.closed = False

    def _answer(self, reply: Reply) -> Deferred[Reply]:
        if self._hop.hold:
            waiting: Deferred[Reply] = Deferred()
            self._hop.held.append((waiting, reply))
            return waiting
        return defer.succeed(reply)

    @property
    def extensions(self) -> dict[str, str]:
        return self._hop.extensions

    def mail(self, envelope: Envelope) -> Deferred[Reply]:
        self._hop.commands.append(f"MAIL {envelope.sender}")
        reply = self._hop.mail_reply(envelope)
        if reply.positive:
            self._envelope = envelope
        return self._answer(reply)

    def rcpt(self, recipient: Recipient) -> Deferred[Reply]:
        self._hop.commands.append(f"RCPT {recipient.address}")
        reply = self._hop.rcpt_reply(recipient)
        if reply.positive and self._envelope is not None:
            self._envelope = self._envelope.with_recipient(recipient)
        return self._answer(reply)

    def data(self, message: Message, prefix: bytes) -> Deferred[Reply]:
        self._hop.commands.append("DATA")
        reply = self._hop.data_reply
        if reply.positive and self._envelope is not None:
            self._hop.delivered.append(Delivery(self._envelope, prefix + message.read()))
        self._envelope = None
        return self._answer(reply)

    def reset(self) -> Deferred[None]:
        self._hop.commands.append("RSET")
        self._envelope = None
        return defer.succeed(None)

    def close(self) -> None:
        self._hop.commands.append("QUIT")
        self.closed = True


@implementer(INextHop)
class MemoryNextHop:
    """A next hop in memory: records commands and deliveries; answers with the
    replies you set.  With ``hold = True`` replies wait in :attr:`held` until you
    fire them (to test pipelining and timing).  Its sessions report
    :attr:`extensions` as the next hop's EHLO keywords: by default those
    smtpguard itself offers."""

    def __init__(self) -> None:
        self.extensions: dict[str, str] = dict.fromkeys(("PIPELINING", "8BITMIME", "SMTPUTF8", "DSN", "CHUNKING"), "")
        self.commands: list[str] = []
        self.delivered: list[Delivery] = []
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
