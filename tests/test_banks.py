"""One policy bank per transaction: a RCPT whose recipient selects another
[[policy.rules]] bank than the transaction's is refused with 452 4.5.3 before the
next hop hears of it, and the client sends it again in a transaction of its own.

The server is driven with StringTransport and the in-memory next hop; the last
test goes through smtplib, smtpguard as twistd builds it, and Postfix's smtp-sink.
"""

from __future__ import annotations

import re

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock
from zope.interface import implementer

from smtpguard import config as configuration
from smtpguard import replies, tap
from smtpguard.envelope import Client, Envelope, Recipient
from smtpguard.interfaces import IPolicy
from smtpguard.pipeline import Pipeline
from smtpguard.policies.default import DefaultPolicy, OnVirus, PolicySettings, Rule
from smtpguard.replies import Reply
from smtpguard.results import Decision, ScanResult
from smtpguard.scanners.builtin import EICAR_NAME, BuiltinScanner
from smtpguard.server import GuardFactory, ServerSettings
from smtpguard.testing import MemoryNextHop
from tests.conftest import SinkStarter, listen
from tests.test_integration import (
    _DATE,
    CLIENT_HELO,
    EICAR,
    GUARD,
    SENDER,
    connect,
    dumps,
    in_thread,
    lf,
    sink_headers,
    transaction,
    wire,
)
from tests.test_server import (
    CLIENT_NAME,
    EICAR_MESSAGE,
    HOSTNAME,
    MESSAGE,
    NO_SUCH_USER,
    NOW,
    NOW_RFC2822,
    QUEUED,
    SCAN_TIMEOUT,
    Session,
    release_next,
    transaction_id,
)
from tests.test_server import SENDER as SERVER_SENDER
from tests.test_server import transaction as pipelined

LAB = "a@lab.example"  # on_virus = "pass" (a malware lab)
LAB_TOO = "x@mail.LAB.example"
CORP = "b@corp.example"  # [policy] itself: on_virus = "reject"
CORP_TOO = "c@corp.example"
LAB_PASSES = DefaultPolicy(PolicySettings(), [Rule(PolicySettings(on_virus=OnVirus.PASS), ("lab.example",))])
REJECTED = replies.VIRUS_REJECTED.with_text(f"Message rejected: virus found ({EICAR_NAME})")


def banked(policy: IPolicy = LAB_PASSES) -> Session:
    """A session past EHLO with a factory wired as tap.build_factory wires it."""
    clock = Clock()
    clock.advance(NOW)
    hop = MemoryNextHop()
    scanner = BuiltinScanner()
    pipeline = Pipeline(clock, scanner, policy, scan_timeout=SCAN_TIMEOUT)
    factory = GuardFactory(clock, hop, pipeline.process, ServerSettings(hostname=HOSTNAME), pipeline.accepts)
    return Session(factory, hop, clock, scanner).hello()


def passed_eicar(queue_id: str, recipient: str) -> bytes:
    """What the next hop gets for EICAR_MESSAGE let through by on_virus = "pass"."""
    return (
        f"Received: from {CLIENT_NAME} ([127.0.0.1])\r\n"
        f"\tby {HOSTNAME} (smtpguard) with ESMTP id {queue_id}\r\n"
        f"\tfor <{recipient}>; {NOW_RFC2822}\r\n"
        f"X-Virus-Scanned: smtpguard (builtin) on {HOSTNAME}\r\n"
        f"X-Virus-Status: infected ({EICAR_NAME})\r\n"
    ).encode() + EICAR_MESSAGE


def answers(*to_rcpt: Reply, final: Reply = QUEUED) -> list[bytes]:
    """The replies to a pipelined transaction: MAIL, each RCPT, DATA and the end of data."""
    return [reply.to_bytes() for reply in (replies.SENDER_OK, *to_rcpt, replies.START_DATA, final)]


def delivered_to(session: Session) -> list[list[str]]:
    return [[recipient.address for recipient in delivery.envelope.recipients] for delivery in session.hop.delivered]


# -- the server asks the policy at each RCPT -------------------------------------------


def test_regression_virus_to_two_banks_reaches_only_the_passing_bank() -> None:
    """EICAR to a recipient of a "pass" bank and one of the "reject" [policy]: the second RCPT
    gets 452 4.5.3, the next hop never sees it, and the message goes to the first only."""
    s = banked()
    s.send(pipelined(recipients=[LAB, CORP], data=EICAR_MESSAGE))
    assert s.replies() == answers(replies.RECIPIENT_OK, replies.SEPARATE_TRANSACTION)
    assert s.hop.commands == [f"MAIL {SERVER_SENDER}", f"RCPT {LAB}", "DATA"]
    [delivery] = s.hop.delivered
    assert delivery.data == passed_eicar(transaction_id(delivery.data), LAB)
    assert delivered_to(s) == [[LAB]]


def test_refused_recipient_gets_its_own_bank_in_its_own_transaction() -> None:
    """The recipient refused with 452 4.5.3, sent again alone, is decided by its own bank:
    the "reject" [policy] refuses EICAR with 554 5.7.1 and the next hop's transaction is reset."""
    s = banked()
    s.send(pipelined(recipients=[LAB, CORP], data=EICAR_MESSAGE))
    s.replies()
    s.hop.commands.clear()
    s.send(pipelined(recipients=[CORP], data=EICAR_MESSAGE))
    assert s.replies() == answers(replies.RECIPIENT_OK, final=REJECTED)
    assert s.hop.commands == [f"MAIL {SERVER_SENDER}", f"RCPT {CORP}", "RSET"]
    assert delivered_to(s) == [[LAB]]


def test_recipients_of_one_bank_share_a_transaction() -> None:
    """Recipients of the same bank (a subdomain, in any case) and recipients of [policy] each
    share a transaction: no 452."""
    s = banked()
    s.send(pipelined(recipients=[LAB, LAB_TOO], data=MESSAGE))
    s.send(pipelined(recipients=[CORP, CORP_TOO], data=MESSAGE))
    assert s.replies() == answers(replies.RECIPIENT_OK, replies.RECIPIENT_OK) * 2
    assert delivered_to(s) == [[LAB, LAB_TOO], [CORP, CORP_TOO]]


def test_pipelined_rcpts_of_two_banks_answered_in_order() -> None:
    """MAIL, RCPT (bank), RCPT ([policy]), RCPT (bank), DATA pipelined while the next hop holds
    its replies: as the next hop answers one command at a time, the client hears each reply in
    command order, the 452 at once after the first RCPT's 250, and the next hop sees only the
    recipients of the transaction's bank."""
    s = banked()
    s.hop.hold = True
    s.send(pipelined(recipients=[LAB, CORP, LAB_TOO], data=MESSAGE))
    heard = []
    while s.hop.held:
        release_next(s.hop)
        heard.append(s.replies())
    assert heard == [
        [replies.SENDER_OK.to_bytes()],
        [replies.RECIPIENT_OK.to_bytes(), replies.SEPARATE_TRANSACTION.to_bytes()],
        [replies.RECIPIENT_OK.to_bytes(), replies.START_DATA.to_bytes()],
        [QUEUED.to_bytes()],
    ]
    assert s.hop.commands == [f"MAIL {SERVER_SENDER}", f"RCPT {LAB}", f"RCPT {LAB_TOO}", "DATA"]
    assert delivered_to(s) == [[LAB, LAB_TOO]]


def test_bank_is_that_of_the_first_recipient_the_next_hop_accepted() -> None:
    """A recipient the next hop refused sets no bank: the first accepted one does."""
    s = banked()
    s.hop.rcpt_reply = lambda recipient: NO_SUCH_USER if recipient.address == CORP else replies.RECIPIENT_OK
    s.send(pipelined(recipients=[CORP, LAB, CORP_TOO], data=MESSAGE))
    assert s.replies() == answers(NO_SUCH_USER, replies.RECIPIENT_OK, replies.SEPARATE_TRANSACTION)
    assert s.hop.commands == [f"MAIL {SERVER_SENDER}", f"RCPT {CORP}", f"RCPT {LAB}", "DATA"]
    assert delivered_to(s) == [[LAB]]


@implementer(IPolicy)
class OncePerMessage:
    """A third-party policy that knows nothing of IRecipientPolicy."""

    def decide(self, envelope: Envelope, result: ScanResult) -> Decision:
        return LAB_PASSES.decide(envelope, result)


def test_policy_without_irecipientpolicy_takes_every_recipient() -> None:
    """A policy that does not provide IRecipientPolicy is never asked: every recipient joins,
    and the message is decided once for all of them, as before banks were split."""
    s = banked(OncePerMessage())
    s.send(pipelined(recipients=[LAB, CORP], data=MESSAGE))
    assert s.replies() == answers(replies.RECIPIENT_OK, replies.RECIPIENT_OK)
    assert delivered_to(s) == [[LAB, CORP]]


def test_pipeline_asks_only_a_recipient_policy() -> None:
    """Pipeline.accepts is the policy's answer for an IRecipientPolicy, and True for any other policy."""
    first = Envelope(Client("192.0.2.7", 40000), SERVER_SENDER, recipients=(Recipient(LAB),))
    with_banks = Pipeline(Clock(), BuiltinScanner(), LAB_PASSES)
    without = Pipeline(Clock(), BuiltinScanner(), OncePerMessage())
    assert (with_banks.accepts(first, Recipient(CORP)), with_banks.accepts(first, Recipient(LAB_TOO))) == (False, True)
    assert without.accepts(first, Recipient(CORP)) is True


# -- end to end ---------------------------------------------------------------------------


def infected_dump(recipient: str, message: bytes) -> bytes:
    """A regex for smtp-sink's dump of ``message`` (EICAR as it is, or its notice)
    relayed by smtpguard to ``recipient``."""
    guard = [
        re.escape(f"Received: from {CLIENT_HELO} ([127.0.0.1])".encode()),
        re.escape(f"\tby {GUARD} (smtpguard) with ESMTP id ".encode()) + rb"[0-9A-F]{12}",
        re.escape(f"\tfor <{recipient}>; ".encode()) + _DATE,
        re.escape(f"X-Virus-Scanned: smtpguard (builtin) on {GUARD}".encode()),
        re.escape(f"X-Virus-Status: infected ({EICAR_NAME})".encode()),
    ]
    head = sink_headers(f"<{SENDER}>", [f"<{recipient}>"]) + b"\n".join(guard) + b"\n"
    return head + re.escape(lf(message) + b"\n")


@pytest_twisted.ensureDeferred
async def test_end_to_end_each_recipient_gets_its_own_bank(
    listening: list[IListeningPort], smtp_sinks: SinkStarter
) -> None:
    """smtplib sends EICAR to a recipient of a "pass" bank and one of the "replace" [policy]:
    the first transaction delivers it as it is to the bank's recipient only, the other hears
    452 4.5.3; sent again alone, it gets the message with its body replaced by the notice."""
    sink = smtp_sinks("sink")
    data = {
        "server": {"hostname": GUARD},
        "upstream": {"endpoint": sink.endpoint},
        "scanners": [{"type": "builtin"}],
        "policy": {
            "on_virus": "replace",
            "virus_notice": "Dropped: {threat}.",
            "rules": [{"recipient_domains": ["lab.example"], "on_virus": "pass"}],
        },
    }
    port = await listen(listening, tap.build_factory(configuration.parse(data, "banks-test"), reactor))
    infected = f"From: <{SENDER}>\r\nSubject: sample\r\n\r\n".encode() + EICAR + b"\r\n"

    def client() -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
        with connect(port) as session:
            session.ehlo()
            first = transaction(session, infected, recipients=((LAB, ()), (CORP, ())))
            # What an MTA does with a 4xx recipient: another transaction for it.
            second = transaction(session, infected, recipients=((CORP, ()),))
            return first, second

    first, second = await in_thread(client)

    accepted = [(250, b"2.1.0 Ok"), (250, b"2.1.5 Ok")]
    assert first == [*accepted, wire(replies.SEPARATE_TRANSACTION), (250, b"2.0.0 Ok")]
    assert second == [*accepted, (250, b"2.0.0 Ok")]
    # Both dumps may carry the same time stamp: tell them apart by recipient.
    passed, replaced = sorted(await dumps(sink, 2), key=lambda dump: CORP.encode() in dump)
    assert re.fullmatch(infected_dump(LAB, infected), passed), passed
    notice = (
        f"From: <{SENDER}>\r\nSubject: sample\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n"
        f"\r\nDropped: {EICAR_NAME}.\r\n"
    ).encode()
    assert re.fullmatch(infected_dump(CORP, notice), replaced), replaced
    rcpts = [line for line in sink.commands() if line.upper().startswith("RCPT")]
    assert rcpts == [f"RCPT TO:<{LAB}>", f"RCPT TO:<{CORP}>"]
