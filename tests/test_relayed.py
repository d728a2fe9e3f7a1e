"""DSN and SMTPUTF8 toward a next hop that lacks them, in the pipeline: the
"relayed" DSN of RFC 3461 section 4.1 once such a next hop has taken a message,
and the refusal of RFC 6531 section 3.2 for a message it cannot take.

Unit tests drive Pipeline.process with the in-memory next hop and a Clock; the
integration tests run smtpguard (as twistd builds it) in front of Postfix's
smtp-sink and a scripted next hop on loopback."""

from __future__ import annotations

import email
import json
import smtplib
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from smtpguard import replies, tap
from smtpguard.envelope import Client, Envelope, parse_mail, parse_rcpt
from smtpguard.notifiers import build_notifier
from smtpguard.notifiers.notifier import Notifier
from smtpguard.pipeline import Pipeline
from smtpguard.policies.default import DefaultPolicy, OnVirus, PolicySettings
from smtpguard.results import ScanResult, Threat
from smtpguard.spool import Message
from smtpguard.testing import FixedScanner, MemoryNextHop
from tests.conftest import SinkStarter, listen
from tests.test_integration import (
    GUARD,
    LOOPBACK,
    RECIPIENT,
    SENDER,
    ScriptedNextHop,
    connect,
    guard_config,
    in_thread,
    text_message,
)

TID = "0A1B2C3D4E5F"
ASCII_MESSAGE = b"From: <alice@example.org>\r\nSubject: hello\r\n\r\nHello.\r\n"
UTF8_MESSAGE = "From: <jörg@example.org>\r\nSubject: Grüße\r\n\r\nHallo.\r\n".encode()
NO_DSN = {"PIPELINING": "", "8BITMIME": ""}
WITH_DSN = {**NO_DSN, "DSN": ""}


def envelope(*rcpts: str, mail: str = f"FROM:<{SENDER}>") -> Envelope:
    sender, parameters = parse_mail(mail, 0)
    smtputf8 = parameters.smtputf8
    recipients = tuple(parse_rcpt(rcpt, smtputf8) for rcpt in rcpts or (f"TO:<{RECIPIENT}> NOTIFY=SUCCESS",))
    return Envelope(Client("192.0.2.7", 40001, helo="client.example", hostname=GUARD), sender, parameters, recipients)


def notifier(directory: Path, clock: Clock) -> Notifier:
    """A real notifier whose outbox is never started: what it queues stays on disk."""
    directory.mkdir()
    return build_notifier({"outbox": str(directory)}, MemoryNextHop(), GUARD, clock)


def queued(directory: Path) -> list[tuple[dict[str, Any], bytes]]:
    found = []
    for path in sorted(directory.glob("*.notice")):
        head, _, data = path.read_bytes().partition(b"\n")
        found.append((json.loads(head), data))
    return found


async def process(
    hop: MemoryNextHop,
    env: Envelope,
    data: bytes = ASCII_MESSAGE,
    outbox: Path | None = None,
    result: ScanResult | None = None,
) -> Any:
    """Relay ``data`` for ``env`` through ``hop`` as the server would (MAIL, RCPT,
    then the pipeline); the reply to the end of data."""
    clock = Clock()
    pipeline = Pipeline(
        clock,
        FixedScanner(result or ScanResult.clean()),
        DefaultPolicy(PolicySettings(on_virus=OnVirus.REPLACE)),
        notifier=notifier(outbox, clock) if outbox is not None else None,
    )
    session = hop.session()
    await session.mail(env)
    for recipient in env.recipients:
        await session.rcpt(recipient)
    return await pipeline.process(env, Message.from_bytes(data), session, TID)


# -- the relayed DSN ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("extensions", "dsns"),
    [(WITH_DSN, 0), ({**WITH_DSN, "SMTPUTF8": ""}, 0), (NO_DSN, 1), ({"SMTPUTF8": ""}, 1), ({}, 1)],
)
@pytest_twisted.ensureDeferred
async def test_relayed_dsn_only_toward_a_next_hop_without_dsn(
    tmp_path: Path, extensions: dict[str, str], dsns: int
) -> None:
    """After the next hop's 250, a NOTIFY=SUCCESS recipient's sender gets a relayed
    DSN in the outbox exactly when the next hop offers no DSN."""
    hop = MemoryNextHop()
    hop.extensions = extensions

    reply = await process(hop, envelope(), outbox=tmp_path / "outbox")

    assert reply == hop.data_reply
    assert len(queued(tmp_path / "outbox")) == dsns


@pytest_twisted.ensureDeferred
async def test_relayed_dsn_content(tmp_path: Path) -> None:
    """The relayed DSN goes to the sender, reports only the recipients that asked
    for SUCCESS, with Action relayed, Status 2.0.0 and the next hop's reply."""
    hop = MemoryNextHop()
    hop.extensions = NO_DSN
    env = envelope(
        "TO:<a@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;orig+2Bx@example.net",
        "TO:<b@example.net> NOTIFY=FAILURE",
        "TO:<c@example.net> NOTIFY=NEVER",
        "TO:<d@example.net>",
        mail=f"FROM:<{SENDER}> ENVID=QQ314159",
    )

    await process(hop, env, outbox=tmp_path / "outbox")

    [(notice, data)] = queued(tmp_path / "outbox")
    assert (notice["recipient"], notice["kind"], notice["transaction_id"]) == (SENDER, "relayed", TID)
    status = email.message_from_bytes(data).get_payload()[1].get_payload()
    assert [list(block.items()) for block in status[1:]] == [
        [
            ("Original-Recipient", "rfc822;orig+x@example.net"),
            ("Final-Recipient", "rfc822; a@example.net"),
            ("Action", "relayed"),
            ("Status", "2.0.0"),
            ("Diagnostic-Code", "smtp; 250 2.0.0 Ok: queued"),
        ]
    ]
    assert status[0]["Original-Envelope-Id"] == "QQ314159"


@pytest.mark.parametrize(
    "rcpt",
    [f"TO:<{RECIPIENT}> NOTIFY=NEVER", f"TO:<{RECIPIENT}> NOTIFY=FAILURE,DELAY", f"TO:<{RECIPIENT}>"],
)
@pytest_twisted.ensureDeferred
async def test_no_relayed_dsn_without_notify_success(tmp_path: Path, rcpt: str) -> None:
    """NOTIFY=NEVER, FAILURE/DELAY only, or no NOTIFY: no relayed DSN."""
    hop = MemoryNextHop()
    hop.extensions = NO_DSN

    await process(hop, envelope(rcpt), outbox=tmp_path / "outbox")

    assert queued(tmp_path / "outbox") == []


@pytest_twisted.ensureDeferred
async def test_no_relayed_dsn_when_the_next_hop_refuses(tmp_path: Path) -> None:
    """A next hop that refuses the end of data has relayed nothing: no relayed DSN."""
    hop = MemoryNextHop()
    hop.extensions = NO_DSN
    hop.data_reply = replies.Reply(554, "5.7.1", "No thanks")

    reply = await process(hop, envelope(), outbox=tmp_path / "outbox")

    assert reply == replies.Reply(554, "5.7.1", "No thanks")
    assert queued(tmp_path / "outbox") == []


@pytest_twisted.ensureDeferred
async def test_no_relayed_dsn_for_a_replaced_message(tmp_path: Path) -> None:
    """A message whose body was replaced by a virus notice was not relayed as sent:
    no relayed DSN (the failure is the policy's to report)."""
    hop = MemoryNextHop()
    hop.extensions = NO_DSN
    virus = ScanResult.infected((Threat("Eicar-Test-Signature"),))

    reply = await process(hop, envelope(), outbox=tmp_path / "outbox", result=virus)

    assert reply == hop.data_reply
    assert len(hop.delivered) == 1
    assert queued(tmp_path / "outbox") == []


@pytest_twisted.ensureDeferred
async def test_relayed_dsn_without_notifications_logs_one_warning() -> None:
    """Without a [notifications] table the relayed DSN cannot be sent: one warning
    per message says so, and the client still hears the next hop's 250."""
    hop = MemoryNextHop()
    hop.extensions = NO_DSN
    env = envelope(f"TO:<{RECIPIENT}> NOTIFY=SUCCESS", "TO:<carol@example.net> NOTIFY=SUCCESS")

    with capturedLogs() as events:
        reply = await process(hop, env)

    assert reply == hop.data_reply
    warnings = [event for event in events if event["log_level"] is LogLevel.warn]
    assert [(event["id"], event["n"]) for event in warnings] == [(TID, 2)]
    assert "no [notifications] configured" in warnings[0]["log_format"]


# -- SMTPUTF8 toward a next hop without it ------------------------------------------


@pytest.mark.parametrize(
    ("extensions", "data", "refused"),
    [
        (NO_DSN, UTF8_MESSAGE, True),
        ({"8BITMIME": "", "SMTPUTF8": ""}, UTF8_MESSAGE, False),
        (NO_DSN, ASCII_MESSAGE, False),
    ],
)
@pytest_twisted.ensureDeferred
async def test_smtputf8_message_toward_next_hop(extensions: dict[str, str], data: bytes, refused: bool) -> None:
    """An SMTPUTF8 transaction with non-ASCII headers is refused with 554 5.6.7 and
    reset at a next hop without SMTPUTF8; with SMTPUTF8 offered, or all-ASCII,
    it is delivered."""
    hop = MemoryNextHop()
    hop.extensions = extensions

    reply = await process(hop, envelope(mail=f"FROM:<{SENDER}> SMTPUTF8"), data)

    if refused:
        assert reply == replies.NEXT_HOP_NO_SMTPUTF8_MESSAGE
        assert hop.commands[-1] == "RSET"
        assert hop.delivered == []
    else:
        assert reply == hop.data_reply
        assert [delivery.data.endswith(data) for delivery in hop.delivered] == [True]


@pytest_twisted.ensureDeferred
async def test_unknown_extensions_refuse_nothing() -> None:
    """A relay session that knows no extensions (an empty mapping: the connection
    is gone) refuses nothing for SMTPUTF8: the relay itself answers."""
    hop = MemoryNextHop()
    hop.extensions = {}

    reply = await process(hop, envelope(mail=f"FROM:<{SENDER}> SMTPUTF8"), UTF8_MESSAGE)

    assert reply == hop.data_reply


# -- end to end: smtplib -> smtpguard -> smtp-sink / a scripted next hop -----------------


async def start_guard_with_outbox(listening: list[IListeningPort], upstream: str, outbox: Path) -> int:
    """smtpguard as twistd builds it, with a [notifications] outbox whose delivery
    is not started, so that what is queued stays there to be read."""
    outbox.mkdir()
    config = attrs.evolve(guard_config(upstream), notifications={"outbox": str(outbox)})
    return await listen(listening, tap.build_factory(config, reactor), LOOPBACK)


def transaction(port: int, message: bytes, mail: list[str], rcpts: list[tuple[str, list[str]]]) -> list[Any]:
    """EHLO, MAIL, RCPT..., DATA with smtplib; every reply, a refused DATA included."""
    with connect(port) as client:
        client.ehlo()
        answers = [client.mail(SENDER, mail)]
        client.command_encoding = "utf-8"
        answers += [client.rcpt(address, options) for address, options in rcpts]
        try:
            answers.append(client.data(message))
        except smtplib.SMTPDataError as refused:
            answers.append((refused.smtp_code, refused.smtp_error))
        return answers


def mail_and_rcpt(commands: list[str]) -> list[str]:
    return [line for line in commands if line.upper().startswith(("MAIL ", "RCPT "))]


@pytest_twisted.ensureDeferred
async def test_next_hop_without_dsn_gets_no_dsn_parameters_and_the_sender_a_relayed_dsn(
    listening: list[IListeningPort], smtp_sinks: SinkStarter, tmp_path: Path
) -> None:
    """smtp-sink without DSN (-N) receives MAIL and RCPT without RET, ENVID, NOTIFY
    or ORCPT; after its 250 a relayed DSN for the NOTIFY=SUCCESS recipient is in
    the outbox, naming smtp-sink as Remote-MTA and quoting its reply."""
    sink = smtp_sinks("sink", "-N")
    port = await start_guard_with_outbox(listening, sink.endpoint, tmp_path / "outbox")
    carol = "carol@example.net"

    answers = await in_thread(
        transaction,
        port,
        text_message("relayed"),
        ["RET=HDRS", "ENVID=QQ314159"],
        [(RECIPIENT, ["NOTIFY=SUCCESS,FAILURE", f"ORCPT=rfc822;{RECIPIENT}"]), (carol, ["NOTIFY=FAILURE"])],
    )

    assert answers == [(250, b"2.1.0 Ok"), (250, b"2.1.5 Ok"), (250, b"2.1.5 Ok"), (250, b"2.0.0 Ok")]
    await in_thread(sink.messages, 1)
    assert mail_and_rcpt(sink.commands()) == [f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RECIPIENT}>", f"RCPT TO:<{carol}>"]
    [(notice, data)] = queued(tmp_path / "outbox")
    assert (notice["recipient"], notice["kind"]) == (SENDER, "relayed")
    status = email.message_from_bytes(data).get_payload()[1].get_payload()
    assert status[0]["Original-Envelope-Id"] == "QQ314159"
    assert [list(block.items()) for block in status[1:]] == [
        [
            ("Original-Recipient", f"rfc822;{RECIPIENT}"),
            ("Final-Recipient", f"rfc822; {RECIPIENT}"),
            ("Action", "relayed"),
            ("Status", "2.0.0"),
            ("Remote-MTA", "dns; 127.0.0.1"),
            ("Diagnostic-Code", "smtp; 250 2.0.0 Ok"),
        ]
    ]


@pytest_twisted.ensureDeferred
async def test_utf8_orcpt_downgraded_for_a_next_hop_with_dsn_without_smtputf8(
    listening: list[IListeningPort], smtp_sinks: SinkStarter, tmp_path: Path
) -> None:
    """An all-ASCII SMTPUTF8 transaction with a UTF-8 ORCPT reaches smtp-sink (DSN,
    no SMTPUTF8) without the SMTPUTF8 parameter and with the ORCPT in
    utf-8-addr-xtext form; smtp-sink reports itself, so no relayed DSN."""
    sink = smtp_sinks("sink")
    port = await start_guard_with_outbox(listening, sink.endpoint, tmp_path / "outbox")

    answers = await in_thread(
        transaction,
        port,
        text_message("downgraded"),
        ["SMTPUTF8"],
        [(RECIPIENT, ["NOTIFY=SUCCESS", "ORCPT=utf-8;jörg@例え.jp"])],
    )

    assert answers == [(250, b"2.1.0 Ok"), (250, b"2.1.5 Ok"), (250, b"2.0.0 Ok")]
    await in_thread(sink.messages, 1)
    assert mail_and_rcpt(sink.commands()) == [
        f"MAIL FROM:<{SENDER}>",
        f"RCPT TO:<{RECIPIENT}> NOTIFY=SUCCESS ORCPT=utf-8;j\\x{{F6}}rg@\\x{{4F8B}}\\x{{3048}}.jp",
    ]
    assert queued(tmp_path / "outbox") == []


@pytest_twisted.ensureDeferred
async def test_smtputf8_message_with_utf8_headers_refused_toward_smtp_sink(
    listening: list[IListeningPort], smtp_sinks: SinkStarter, tmp_path: Path
) -> None:
    """An SMTPUTF8 message with UTF-8 headers gets 554 5.6.7 at the end of data
    when the next hop (smtp-sink) offers no SMTPUTF8: the next hop's transaction
    is reset and it keeps no message."""
    sink = smtp_sinks("sink")
    port = await start_guard_with_outbox(listening, sink.endpoint, tmp_path / "outbox")
    message = "From: Jörg <jörg@example.org>\r\nSubject: Grüße\r\n\r\nHallo.\r\n".encode()

    answers = await in_thread(transaction, port, message, ["SMTPUTF8"], [(RECIPIENT, [])])

    refusal = replies.NEXT_HOP_NO_SMTPUTF8_MESSAGE
    assert answers == [(250, b"2.1.0 Ok"), (250, b"2.1.5 Ok"), (554, f"{refusal.enhanced} {refusal.text}".encode())]
    commands = sink.commands()
    assert mail_and_rcpt(commands) == [f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RECIPIENT}>"]
    assert "RSET" in commands and "DATA" not in [line.upper() for line in commands]
    assert list(sink.directory.iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_utf8_orcpt_and_headers_as_received_by_a_next_hop_with_smtputf8(
    listening: list[IListeningPort], tmp_path: Path
) -> None:
    """A next hop offering SMTPUTF8 and DSN gets MAIL with SMTPUTF8, the raw UTF-8
    ORCPT as received, and the UTF-8 message."""
    hop = ScriptedNextHop([b"PIPELINING", b"8BITMIME", b"SMTPUTF8", b"DSN"])
    hop_port = await listen(listening, hop)
    port = await start_guard_with_outbox(listening, f"tcp:127.0.0.1:{hop_port}", tmp_path / "outbox")
    message = "From: Jörg <jörg@example.org>\r\nSubject: Grüße\r\n\r\nHallo.\r\n".encode()

    answers = await in_thread(
        transaction, port, message, ["SMTPUTF8"], [(RECIPIENT, ["NOTIFY=SUCCESS", "ORCPT=rfc822;jörg+2B1@例え.jp"])]
    )

    assert answers == [(250, b"2.0.0 Ok"), (250, b"2.0.0 Ok"), (250, b"2.0.0 Ok: queued as SCRIPTED1")]
    assert mail_and_rcpt(hop.commands) == [
        f"MAIL FROM:<{SENDER}> SMTPUTF8",
        f"RCPT TO:<{RECIPIENT}> NOTIFY=SUCCESS ORCPT=rfc822;jörg+2B1@例え.jp",
    ]
    assert hop.messages[0].endswith(message)
    assert queued(tmp_path / "outbox") == []
