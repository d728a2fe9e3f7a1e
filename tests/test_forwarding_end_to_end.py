"""XFORWARD and XCLIENT end to end on loopback: smtplib (or a raw socket, for
XCLIENT's new greeting) -> smtpguard as twistd builds it from a configuration ->
a strict next hop that offers XFORWARD and records every XFORWARD line it
accepted, as Postfix's re-injecting smtpd with smtpd_authorized_xforward_hosts."""

from __future__ import annotations

import smtplib
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort

from smtpguard import config as configuration
from smtpguard import replies, tap
from smtpguard.replies import Reply
from smtpguard.scanners.builtin import EICAR_NAME
from tests.conftest import StrictHops, listen
from tests.strict_hop import Postfix, StrictHop, fill, stored_size
from tests.test_hostile import RawClient
from tests.test_integration import CLIENT_HELO, EICAR, GUARD, RECIPIENT, SENDER, connect, in_thread, text_message, wire

ORIGINAL = "203.0.113.5"
# What Postfix's smtp client sends a content filter that offers every attribute:
# NAME ADDR PORT in one command, PROTO HELO IDENT SOURCE in another (smtp_proto.c).
POSTFIX_XFORWARD = (
    f"NAME=mail.client.example ADDR={ORIGINAL} PORT=4711",
    "PROTO=ESMTPS HELO=client.example IDENT=4XyZ1234AB SOURCE=REMOTE",
)
SENT_ON = (
    f"XFORWARD NAME=mail.client.example ADDR={ORIGINAL} PORT=4711 PROTO=ESMTPS HELO=client.example"
    " IDENT=4XyZ1234AB SOURCE=REMOTE"
)
GREETING = replies.SERVICE_READY.with_text(f"{GUARD} ESMTP smtpguard")


def queued(hop: StrictHop, index: int = 0) -> Reply:
    """The next hop's reply to the message it queued (sent with BDAT), which the client hears."""
    message = hop.queued[index]
    return fill(Postfix.CHUNKS_QUEUED, stored_size(message.data), message.queue_id)


def config(hop: StrictHop, server: dict[str, Any], **policy: Any) -> configuration.Config:
    data: dict[str, Any] = {
        "server": {"hostname": GUARD, **server},
        "upstream": {"endpoint": hop.endpoint},
        "scanners": [{"type": "builtin"}],
    }
    if policy:
        data["policy"] = policy
    return configuration.parse(data, "end-to-end")


async def start(listening: list[IListeningPort], hop: StrictHop, server: dict[str, Any], **policy: Any) -> int:
    return await listen(listening, tap.build_factory(config(hop, server, **policy), reactor))


def forward_and_send(port: int, xforward: tuple[str, ...], message: bytes) -> tuple[list[str], list[tuple[int, bytes]]]:
    """EHLO, the XFORWARD commands and one transaction with smtplib: the EHLO
    keywords and every reply after EHLO, in order."""
    keywords, answers, _ = forward_and_send_from(port, xforward, message)
    return keywords, answers


def forward_and_send_from(
    port: int, xforward: tuple[str, ...], message: bytes
) -> tuple[list[str], list[tuple[int, bytes]], int]:
    """forward_and_send, and the client's port."""
    with connect(port) as client:
        client_port = client.sock.getsockname()[1]
        client.ehlo()
        answers = [client.docmd("XFORWARD", attributes) for attributes in xforward]
        answers += [client.mail(SENDER), client.rcpt(RECIPIENT)]
        try:
            answers.append(client.data(message))
        except smtplib.SMTPDataError as refused:
            answers.append((refused.smtp_code, refused.smtp_error))
        return list(client.esmtp_features), answers, client_port


@pytest_twisted.ensureDeferred
async def test_xforward_from_the_mta_in_front_reaches_the_next_hop(
    listening: list[IListeningPort], strict_hops: StrictHops
) -> None:
    """smtplib, as Postfix's smtp client, sends XFORWARD in two commands; smtpguard
    (xforward_hosts = 127.0.0.1) answers 250 2.0.0 to both and tells the next hop
    exactly the original client before MAIL; its Received: header names the MTA
    that connected."""
    hop = strict_hops(xforward=True)
    port = await start(listening, hop, {"xforward_hosts": ["127.0.0.1"]})

    keywords, answers = await in_thread(forward_and_send, port, POSTFIX_XFORWARD, text_message("forwarded"))

    assert "xforward" in keywords
    assert answers == [
        wire(replies.OK),
        wire(replies.OK),
        wire(replies.SENDER_OK),
        wire(replies.RECIPIENT_OK),
        wire(queued(hop)),
    ]
    [message] = hop.queued
    assert message.xforward == (SENT_ON,)
    assert message.data.startswith(f"Received: from {CLIENT_HELO} ([127.0.0.1])\r\n\tby {GUARD} (smtpguard)".encode())


@pytest_twisted.ensureDeferred
async def test_xforward_from_a_host_not_listed_is_refused_and_the_next_hop_hears_the_session(
    listening: list[IListeningPort], strict_hops: StrictHops
) -> None:
    """Without xforward_hosts (the default) EHLO does not offer XFORWARD, XFORWARD
    gets 550 5.7.0, and the next hop hears the connecting client, not a claimed one."""
    hop = strict_hops(xforward=True)
    port = await start(listening, hop, {})

    keywords, answers, client_port = await in_thread(
        forward_and_send_from, port, POSTFIX_XFORWARD[:1], text_message("claimed")
    )

    assert "xforward" not in keywords
    assert answers[0] == wire(replies.NOT_AUTHORIZED)
    [message] = hop.queued
    assert message.xforward == (
        f"XFORWARD NAME=[UNAVAILABLE] ADDR=127.0.0.1 PORT={client_port} PROTO=ESMTP HELO={CLIENT_HELO}"
        " IDENT=[UNAVAILABLE] SOURCE=REMOTE",
    )


@pytest_twisted.ensureDeferred
async def test_bad_xforward_value_gets_501_and_the_session_goes_on(
    listening: list[IListeningPort], strict_hops: StrictHops
) -> None:
    """A bad ADDR gets 501 5.5.4 naming it; the next command of the same session
    and the message go on, with the attributes of the command before."""
    hop = strict_hops(xforward=True)
    port = await start(listening, hop, {"xforward_hosts": ["127.0.0.0/8"]})

    _, answers = await in_thread(
        forward_and_send, port, (f"ADDR={ORIGINAL}", "ADDR=IPV6:not-an-address"), text_message("bad value")
    )

    assert answers == [
        wire(replies.OK),
        wire(replies.bad_attribute_value("ADDR", "IPV6:not-an-address")),
        wire(replies.SENDER_OK),
        wire(replies.RECIPIENT_OK),
        wire(queued(hop)),
    ]
    [message] = hop.queued
    assert message.xforward == (
        f"XFORWARD NAME=[UNAVAILABLE] ADDR={ORIGINAL} PORT=[UNAVAILABLE] PROTO=[UNAVAILABLE] HELO=[UNAVAILABLE]"
        " IDENT=[UNAVAILABLE] SOURCE=[UNAVAILABLE]",
    )


def xclient_session(port: int, message: bytes) -> list[Reply]:
    """As nginx's mail proxy: EHLO, XCLIENT ADDR LOGIN NAME, then (after the new
    greeting) EHLO with the client's name and a transaction; every reply."""
    with RawClient(port) as client:
        answers = [client.reply()]
        client.send(b"EHLO proxy.example\r\n")
        answers.append(client.reply())
        client.send(f"XCLIENT ADDR={ORIGINAL} LOGIN=alice NAME=[UNAVAILABLE]\r\n".encode())
        answers.append(client.reply())
        client.send(f"EHLO {CLIENT_HELO}\r\n".encode())
        answers.append(client.reply())
        client.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode())
        answers += client.replies(3)
        client.send(message + b".\r\nQUIT\r\n")
        answers += client.replies(2)
        return answers


@pytest_twisted.ensureDeferred
async def test_xclient_as_nginx_sends_it_reaches_the_next_hop(
    listening: list[IListeningPort], strict_hops: StrictHops
) -> None:
    """A proxy in xclient_hosts is offered XCLIENT, gets a new 220 greeting for it,
    and the message goes on as the named client's: the next hop's XFORWARD names
    it (ESMTPA for its login) and smtpguard's Received: header traces it."""
    hop = strict_hops(xforward=True)
    port = await start(listening, hop, {"xclient_hosts": ["127.0.0.1"]})

    answers = await in_thread(xclient_session, port, text_message("proxied"))

    assert answers[0] == answers[2] == GREETING
    assert "XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT" in answers[1].text.split("\n")
    assert "XCLIENT" not in answers[3].text  # 203.0.113.5 is not in xclient_hosts
    assert answers[4:] == [
        replies.SENDER_OK,
        replies.RECIPIENT_OK,
        replies.START_DATA,
        queued(hop),
        replies.CLOSING,
    ]
    [message] = hop.queued
    assert message.xforward == (
        f"XFORWARD NAME=[UNAVAILABLE] ADDR={ORIGINAL} PORT=[UNAVAILABLE] PROTO=ESMTPA HELO={CLIENT_HELO}"
        " IDENT=[UNAVAILABLE] SOURCE=REMOTE",
    )
    assert message.data.startswith(
        f"Received: from {CLIENT_HELO} ([{ORIGINAL}])\r\n\tby {GUARD} (smtpguard) with ESMTPA id ".encode()
    )


@pytest_twisted.ensureDeferred
async def test_xclient_from_a_host_not_listed_is_refused(
    listening: list[IListeningPort], strict_hops: StrictHops
) -> None:
    """Without xclient_hosts, XCLIENT gets 550 5.7.0 and no new greeting."""
    port = await start(listening, strict_hops(), {})

    def session() -> list[Reply]:
        with RawClient(port) as client:
            client.reply()
            client.send(f"EHLO proxy.example\r\nXCLIENT ADDR={ORIGINAL}\r\nNOOP\r\n".encode())
            return client.replies(3)[1:]

    assert await in_thread(session) == [replies.NOT_AUTHORIZED, replies.OK]


@pytest.mark.parametrize(("address", "passes"), [(ORIGINAL, True), ("192.0.2.1", False)])
@pytest_twisted.ensureDeferred
async def test_policy_bank_chosen_by_the_xforward_address(
    listening: list[IListeningPort], strict_hops: StrictHops, address: str, passes: bool
) -> None:
    """A [[policy.rules]] bank with client_networks = 203.0.113.0/24 and on_virus =
    "pass": EICAR forwarded for 203.0.113.5 reaches the next hop; forwarded for
    192.0.2.1 it meets [policy]'s reject (554 5.7.1) and nothing is queued.  The
    connection is from 127.0.0.1 both times."""
    hop = strict_hops(xforward=True)
    rules = [{"client_networks": ["203.0.113.0/24"], "on_virus": "pass"}]
    port = await start(listening, hop, {"xforward_hosts": ["127.0.0.1"]}, on_virus="reject", rules=rules)

    _, answers = await in_thread(forward_and_send, port, (f"ADDR={address}",), text_message("eicar", EICAR + b"\r\n"))

    rejected = replies.VIRUS_REJECTED.with_text(f"Message rejected: virus found ({EICAR_NAME})")
    assert answers[-1] == wire(queued(hop) if passes else rejected)
    assert [message.xforward[0].split(" ")[2] for message in hop.queued] == ([f"ADDR={ORIGINAL}"] if passes else [])
