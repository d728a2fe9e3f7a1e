"""The test doubles of smtpguard.testing: each provides its interface, and the
in-memory next hop is as strict as a real one (Postfix's smtpd): it refuses
commands out of order with Postfix's replies and delivers only at the end of data."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from smtpguard import replies
from smtpguard.envelope import Client, Envelope, Recipient
from smtpguard.interfaces import INextHop, IRelaySession, IScanner
from smtpguard.replies import Reply
from smtpguard.results import ScanResult
from smtpguard.spool import Message
from smtpguard.testing import (
    HOP_NEED_MAIL,
    HOP_NEED_RCPT,
    HOP_NESTED_MAIL,
    HOP_NO_VALID_RECIPIENTS,
    Delivery,
    FixedScanner,
    MemoryNextHop,
    MemorySession,
)

SENDER = "alice@example.org"
RECIPIENT = "bob@example.com"
ENVELOPE = Envelope(Client(address="192.0.2.1", port=4321, helo="client.example.org", esmtp=True), SENDER)
BODY = b"Subject: test\r\n\r\nHello.\r\n"
PREFIX = b"Received: by test\r\n"
QUEUED = MemoryNextHop().data_reply
NO_SUCH_USER = Reply(550, "5.1.1", "No such user")


def result(waiting: Deferred[Reply]) -> Reply | None:
    """What ``waiting`` fired with, or None while it has not fired."""
    fired: list[Reply] = []

    def keep(reply: Reply) -> Reply:
        fired.append(reply)
        return reply

    waiting.addCallback(keep)
    return fired[0] if fired else None


def session() -> tuple[MemoryNextHop, MemorySession]:
    hop = MemoryNextHop()
    return hop, hop.session()


def in_transaction(*recipients: str) -> tuple[MemoryNextHop, MemorySession]:
    """A session whose MAIL and RCPTs the hop accepted."""
    hop, relay = session()
    assert result(relay.mail(ENVELOPE)) == replies.SENDER_OK
    for address in recipients:
        assert result(relay.rcpt(Recipient(address))) == replies.RECIPIENT_OK
    return hop, relay


def test_doubles_provide_their_interfaces() -> None:
    """FixedScanner is an IScanner, MemoryNextHop an INextHop and its sessions IRelaySessions."""
    assert verifyObject(IScanner, FixedScanner(ScanResult.clean("fixed")))
    hop = MemoryNextHop()
    assert verifyObject(INextHop, hop)
    assert verifyObject(IRelaySession, hop.session())


def test_nested_mail_is_refused() -> None:
    """A second MAIL inside a transaction gets Postfix's 503 5.5.1 nested MAIL, and is
    recorded as sent and as out of state."""
    hop, relay = in_transaction(RECIPIENT)
    assert result(relay.mail(ENVELOPE)) == HOP_NESTED_MAIL
    assert hop.commands == [f"MAIL {SENDER}", f"RCPT {RECIPIENT}", f"MAIL {SENDER}"]
    assert hop.out_of_state == [f"MAIL {SENDER}"]


def test_rcpt_without_mail_is_refused() -> None:
    """RCPT before any MAIL gets Postfix's 503 5.5.1 need MAIL command."""
    hop, relay = session()
    assert result(relay.rcpt(Recipient(RECIPIENT))) == HOP_NEED_MAIL
    assert hop.out_of_state == [f"RCPT {RECIPIENT}"]


def test_rcpt_after_refused_mail_is_refused() -> None:
    """A MAIL the hop refused opens no transaction: the RCPT after it gets 503 5.5.1."""
    hop, relay = session()
    hop.mail_reply = lambda envelope: NO_SUCH_USER
    assert result(relay.mail(ENVELOPE)) == NO_SUCH_USER
    assert result(relay.rcpt(Recipient(RECIPIENT))) == HOP_NEED_MAIL


def test_data_without_mail_is_refused() -> None:
    """DATA outside a transaction gets Postfix's 503 5.5.1 need RCPT command; nothing is delivered."""
    hop, relay = session()
    assert result(relay.data(Message.from_bytes(BODY), PREFIX)) == HOP_NEED_RCPT
    assert hop.out_of_state == ["DATA"]
    assert hop.delivered == []


def test_data_without_accepted_recipient_is_refused() -> None:
    """DATA after a MAIL whose only RCPT was refused gets Postfix's 554 5.5.1 no valid
    recipients; nothing is delivered and the transaction stays open, as in Postfix."""
    hop, relay = in_transaction()
    hop.rcpt_reply = lambda recipient: NO_SUCH_USER
    assert result(relay.rcpt(Recipient(RECIPIENT))) == NO_SUCH_USER
    assert result(relay.data(Message.from_bytes(BODY), PREFIX)) == HOP_NO_VALID_RECIPIENTS
    assert hop.delivered == []
    assert relay.in_transaction


def test_end_of_data_delivers_prefix_and_message() -> None:
    """DATA in a transaction with an accepted recipient delivers the prefix and the
    message, answers the data reply, and ends the transaction."""
    hop, relay = in_transaction(RECIPIENT)
    assert result(relay.data(Message.from_bytes(BODY), PREFIX)) == QUEUED
    assert hop.delivered == [Delivery(ENVELOPE.with_recipient(Recipient(RECIPIENT)), PREFIX + BODY)]
    assert not relay.in_transaction


def test_refused_end_of_data_delivers_nothing() -> None:
    """A negative reply to the end of data delivers nothing, and the transaction is over."""
    hop, relay = in_transaction(RECIPIENT)
    hop.data_reply = Reply(554, "5.6.0", "Content refused")
    assert result(relay.data(Message.from_bytes(BODY), PREFIX)) == hop.data_reply
    assert hop.delivered == []
    assert result(relay.mail(ENVELOPE)) == replies.SENDER_OK


def test_held_end_of_data_delivers_when_answered() -> None:
    """With hold, the message is delivered when the hop gives its final reply, not before."""
    hop, relay = in_transaction(RECIPIENT)
    hop.hold = True
    answer = relay.data(Message.from_bytes(BODY), PREFIX)
    assert hop.delivered == []
    hop.release()
    assert result(answer) == QUEUED
    assert [delivery.data for delivery in hop.delivered] == [PREFIX + BODY]


def test_reset_ends_the_transaction() -> None:
    """After RSET a new MAIL opens a transaction (no nested MAIL)."""
    hop, relay = in_transaction(RECIPIENT)
    assert result(relay.reset()) is None
    assert result(relay.mail(ENVELOPE)) == replies.SENDER_OK
    assert hop.commands == [f"MAIL {SENDER}", f"RCPT {RECIPIENT}", "RSET", f"MAIL {SENDER}"]
    assert hop.out_of_state == []


def test_close_abandons_an_open_transaction() -> None:
    """close() inside a transaction whose end of data never went out delivers nothing
    and records the transaction as abandoned."""
    hop, relay = in_transaction(RECIPIENT)
    relay.close()
    assert hop.commands == [f"MAIL {SENDER}", f"RCPT {RECIPIENT}", "QUIT"]
    assert hop.abandoned == [ENVELOPE.with_recipient(Recipient(RECIPIENT))]
    assert hop.delivered == []


def test_close_after_end_of_data_waits_for_final_reply() -> None:
    """close() after the end of data went out abandons nothing: the message is
    delivered when the final reply comes."""
    hop, relay = in_transaction(RECIPIENT)
    hop.hold = True
    answer = relay.data(Message.from_bytes(BODY), PREFIX)
    relay.close()
    hop.release()
    assert result(answer) == QUEUED
    assert hop.abandoned == []
    assert [delivery.data for delivery in hop.delivered] == [PREFIX + BODY]


def test_calls_after_close_reach_no_next_hop() -> None:
    """After close(), MAIL, RCPT and DATA get 451 4.4.1 (an unreachable next hop's reply),
    are recorded apart from what was sent, and deliver nothing."""
    hop, relay = session()
    relay.close()
    assert result(relay.mail(ENVELOPE)) == replies.UPSTREAM_UNAVAILABLE
    assert result(relay.rcpt(Recipient(RECIPIENT))) == replies.UPSTREAM_UNAVAILABLE
    assert result(relay.data(Message.from_bytes(BODY), PREFIX)) == replies.UPSTREAM_UNAVAILABLE
    assert result(relay.reset()) is None
    relay.close()
    assert hop.commands == ["QUIT"]
    assert hop.after_close == [f"MAIL {SENDER}", f"RCPT {RECIPIENT}", "DATA", "RSET", "QUIT"]
    assert hop.delivered == []


def test_hold_answers_in_order() -> None:
    """Held replies are given in the order the commands were sent."""
    hop, relay = session()
    hop.hold = True
    mail = relay.mail(ENVELOPE)
    rcpt = relay.rcpt(Recipient(RECIPIENT))
    assert (result(mail), result(rcpt)) == (None, None)
    hop.release()
    assert (result(mail), result(rcpt)) == (replies.SENDER_OK, replies.RECIPIENT_OK)
