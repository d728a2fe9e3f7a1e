"""XFORWARD and XCLIENT from the MTA or proxy in front (Postfix's XFORWARD_README and
XCLIENT_README): the attributes read one by one (smtpguard.forwarding), then the
server driven with StringTransport and the in-memory next hop: who may send them,
what they make of the transaction's client, when they are reset, and the refusals
after which the session goes on in step.

Replies are compared with those named in smtpguard.replies; the client a message
came from is compared whole, as the next hop's delivery records it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from smtpguard import config as configuration
from smtpguard import forwarding, replies, xtext
from smtpguard.access import AccessRules, networks
from smtpguard.envelope import Client, Envelope, Forwarding, Hop, Recipient
from smtpguard.forwarding import Forwarded, Refused
from smtpguard.incident import Incident
from smtpguard.notifiers.outbox import Outbox
from smtpguard.pipeline import Pipeline
from smtpguard.policies.default import DefaultPolicy, OnVirus, PolicySettings, Rule
from smtpguard.quarantine import envelope_of, metadata
from smtpguard.quarantine_cli import describe
from smtpguard.replies import Reply
from smtpguard.scanners.builtin import EICAR_NAME, BuiltinScanner
from smtpguard.server import GuardFactory, ServerSettings
from smtpguard.testing import MemoryNextHop
from smtpguard.transactionlog import NAMESPACE, log_transaction
from tests.test_quarantine import INFECTED, REPLACED, WHEN
from tests.test_server import (
    CLIENT_NAME,
    EICAR_MESSAGE,
    HOSTNAME,
    MESSAGE,
    NOW,
    NOW_RFC2822,
    PEER,
    QUEUED,
    RECIPIENT,
    SCAN_TIMEOUT,
    SENDER,
    TLS_CONTEXT,
    Session,
    TLSRecordingTransport,
    ehlo_keywords,
    esmtp_extensions,
    transaction,
    transaction_id,
    transaction_replies,
)

MTA = PEER.host  # the test sessions connect from 127.0.0.1:12345
ORIGINAL_ADDRESS = "203.0.113.5"
ORIGINAL_NAME = "mail.client.example"
ORIGINAL_HELO = "client.example"
IDENT = "4XyZ1234AB"
XFORWARD_ALL = (
    f"XFORWARD NAME={ORIGINAL_NAME} ADDR={ORIGINAL_ADDRESS} PORT=4711 PROTO=ESMTPS HELO={ORIGINAL_HELO}"
    f" IDENT={IDENT} SOURCE=REMOTE"
)
# The session's own client, as the server builds it for a connection from PEER.
SESSION = Client(MTA, PEER.port, "127.0.0.1", 25, helo=CLIENT_NAME, esmtp=True, hostname=HOSTNAME)
# The client a message came from after XFORWARD_ALL.
FORWARDED = Client(
    ORIGINAL_ADDRESS,
    4711,
    "127.0.0.1",
    25,
    helo=ORIGINAL_HELO,
    esmtp=True,
    hostname=HOSTNAME,
    name=ORIGINAL_NAME,
    forwarded_protocol="ESMTPS",
    ident=IDENT,
    source="REMOTE",
    hop=Hop(Forwarding.XFORWARD, MTA, PEER.port, CLIENT_NAME),
)
PROXY_HOP = Hop(Forwarding.XCLIENT, MTA, PEER.port, CLIENT_NAME)


def trusting(**hosts: Any) -> AccessRules:
    """Access rules with ``xforward_hosts`` / ``xclient_hosts`` (and other keys) set."""
    values: dict[str, Any] = {
        key: networks(value) if key.endswith(("hosts", "clients")) else value for key, value in hosts.items()
    }
    return AccessRules(**values)


def forwarding_session(**hosts: Any) -> Session:
    """A session from PEER, past EHLO, with the given access rules."""
    return Session.open(access=trusting(**hosts)).hello()


def send(s: Session, *lines: str) -> list[bytes]:
    s.send(*(line.encode() + b"\r\n" for line in lines))
    return s.replies()


def delivered_client(s: Session, index: int = -1) -> Client:
    return s.hop.delivered[index].envelope.client


def received_lines(s: Session, index: int = -1) -> list[str]:
    """The Received: header smtpguard put in front of the delivered message, unfolded into its lines."""
    data = s.hop.delivered[index].data.decode()
    header = data.split("\r\nX-Virus-Scanned:")[0]
    return header.split("\r\n\t")


def traced(s: Session, source: str, protocol: str) -> list[str]:
    """The lines of the Received: header expected for the last message, from ``source``."""
    tid = transaction_id(s.hop.delivered[-1].data)
    return [
        f"Received: from {source}",
        f"by {HOSTNAME} (smtpguard) with {protocol} id {tid}",
        f"for <{RECIPIENT}>; {NOW_RFC2822}",
    ]


# -- values, one attribute at a time ---------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "decoded"),
    [
        ("a+2Bb+3Dc", "a+b=c"),  # xtext, as Postfix's smtp client sends it
        ("a+2bb+3dc", "a+b=c"),  # lower-case hex, which Postfix's xtext_unquote() takes too
        ("user+tag", "user+tag"),  # not xtext: taken as sent (nginx sends LOGIN unencoded)
        ("a=b", "a=b"),
        ("j+C3+BCrgen", "jürgen"),
    ],
)
def test_unquote_reads_values_as_postfix_does(value: str, decoded: str) -> None:
    """xtext.unquote decodes +XX escapes in either case, and takes a value whose "+"
    starts no escape as sent (XCLIENT_README Note 3, XFORWARD_README Note 4)."""
    assert xtext.unquote(value) == decoded


def test_unquote_refuses_octets_that_are_not_utf8() -> None:
    """Escapes that decode to octets that are not UTF-8 raise XtextError."""
    with pytest.raises(xtext.XtextError):
        xtext.unquote("+FF+FE")


def refusal(call: Any, *args: Any) -> Reply:
    with pytest.raises(Refused) as refused:
        call(*args)
    return refused.value.reply


def test_first_xforward_makes_every_attribute_unavailable() -> None:
    """XFORWARD_README: the first XFORWARD sets every attribute to [UNAVAILABLE]
    (empty, port 0) before it updates those it names."""
    assert forwarding.xforward(f"ADDR={ORIGINAL_ADDRESS}", None) == Forwarded(address=ORIGINAL_ADDRESS)


def test_later_xforward_updates_only_what_it_names() -> None:
    """Each later XFORWARD changes the attributes it names and keeps the others."""
    first = forwarding.xforward(f"NAME={ORIGINAL_NAME} ADDR={ORIGINAL_ADDRESS}", None)
    assert forwarding.xforward("PROTO=ESMTP HELO=client.example", first) == Forwarded(
        name=ORIGINAL_NAME, address=ORIGINAL_ADDRESS, protocol="ESMTP", helo="client.example"
    )


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("name=Mail.Client.Example", Forwarded(name="Mail.Client.Example")),
        ("NAME=[unavailable]", Forwarded()),
        ("ADDR=192.0.2.1", Forwarded(address="192.0.2.1")),
        ("ADDR=IPV6:2001:DB8:0::1", Forwarded(address="2001:db8::1")),
        ("ADDR=ipv6:::1", Forwarded(address="::1")),
        ("ADDR=[Unavailable]", Forwarded()),
        ("PORT=0", Forwarded()),
        ("PORT=65535", Forwarded(port=65535)),
        ("PORT=[UNAVAILABLE]", Forwarded()),
        ("PROTO=ESMTPSA", Forwarded(protocol="ESMTPSA")),
        ("PROTO=" + "P" * 64, Forwarded(protocol="P" * 64)),
        ("PROTO=[UNAVAILABLE]", Forwarded()),
        ("HELO=[192.0.2.1]", Forwarded(helo="[192.0.2.1]")),
        ("HELO=win_pc_7", Forwarded(helo="win_pc_7")),
        ("HELO=[IPv6:2001:db8::1]", Forwarded(helo="[IPv6:2001:db8::1]")),
        ("HELO=[x-tag:a+2Bb+3Dc]", Forwarded(helo="[x-tag:a+b=c]")),
        ("IDENT=4XyZ1234AB", Forwarded(ident="4XyZ1234AB")),
        ("IDENT=1tXq2b-0003Ab-7C", Forwarded(ident="1tXq2b-0003Ab-7C")),
        ("SOURCE=local", Forwarded(source="LOCAL")),
        ("SOURCE=REMOTE", Forwarded(source="REMOTE")),
        ("SOURCE=[UNAVAILABLE]", Forwarded()),
        ("ADDR=192.0.2.1\tPORT=25", Forwarded(address="192.0.2.1", port=25)),
        ("ADDR=192.0.2.1 ADDR=192.0.2.2", Forwarded(address="192.0.2.2")),  # the last one counts, as in Postfix
    ],
)
def test_xforward_attribute_accepted(argument: str, expected: Forwarded) -> None:
    """Each XFORWARD attribute as XFORWARD_README defines it, names and
    [UNAVAILABLE] in any case, xtext decoded; an address as a bare address."""
    assert forwarding.xforward(argument, None) == expected


@pytest.mark.parametrize(
    ("argument", "name", "value"),
    [
        ("NAME=192.0.2.1", "NAME", "192.0.2.1"),  # an address is not a host name
        ("NAME=[TEMPUNAVAIL]", "NAME", "[TEMPUNAVAIL]"),  # XCLIENT's only; Postfix's XFORWARD refuses it too
        ("NAME=a..b", "NAME", "a..b"),
        ("NAME=b+C3+BCcher.example", "NAME", "bücher.example"),  # Note 1: no non-ASCII
        ("NAME=a+0D+0Ab", "NAME", "a\r\nb"),
        ("ADDR=192.0.2", "ADDR", "192.0.2"),
        ("ADDR=[192.0.2.1]", "ADDR", "[192.0.2.1]"),  # "not enclosed with []"
        ("ADDR=2001:db8::1", "ADDR", "2001:db8::1"),  # IPv6 only after IPV6:
        ("ADDR=IPV6:fe80::1+25eth0", "ADDR", "IPV6:fe80::1%eth0"),
        ("ADDR=IPV6:192.0.2.1", "ADDR", "IPV6:192.0.2.1"),
        ("PORT=65536", "PORT", "65536"),
        ("PORT=-1", "PORT", "-1"),
        ("PORT=25x", "PORT", "25x"),
        ("PROTO=" + "P" * 65, "PROTO", "P" * 65),
        ("PROTO=E+20SMTP", "PROTO", "E SMTP"),
        ("PROTO=<ESMTP>", "PROTO", "<ESMTP>"),
        ("HELO=foo+20bar", "HELO", "foo bar"),  # what smtpguard's own EHLO refuses
        ("HELO=[192.0.2.1", "HELO", "[192.0.2.1"),
        ("HELO=b+C3+BCcher.example", "HELO", "bücher.example"),  # Note 1: no non-ASCII in XFORWARD
        ("IDENT=a;b", "IDENT", "a;b"),
        ("IDENT=a+09b", "IDENT", "a\tb"),
        ("SOURCE=ELSEWHERE", "SOURCE", "ELSEWHERE"),
    ],
)
def test_xforward_bad_value_refused_with_501(argument: str, name: str, value: str) -> None:
    """A value XFORWARD_README does not allow gets 501 5.5.4 "Bad NAME syntax: <value>",
    the value made printable."""
    assert refusal(forwarding.xforward, argument, None) == replies.bad_attribute_value(name, value)


def test_bad_value_reply_shows_control_characters_escaped() -> None:
    """A decoded CR LF is echoed as visible escapes: the reply stays one line."""
    reply = refusal(forwarding.xforward, "NAME=a+0D+0Ab", None)
    assert reply.to_bytes() == b"501 5.5.4 Bad NAME syntax: a\\x0d\\x0ab\r\n"


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("ADDR=", replies.ATTRIBUTE_EXPECTED),
        ("ADDR", replies.ATTRIBUTE_EXPECTED),
        ("=192.0.2.1", replies.bad_attribute_name("XFORWARD", "")),
        ("FOO=bar", replies.bad_attribute_name("XFORWARD", "FOO")),
        ("LOGIN=alice", replies.bad_attribute_name("XFORWARD", "LOGIN")),  # XCLIENT's, not XFORWARD's
        ("NAME=" + "a" * 256, replies.ATTRIBUTE_TOO_LONG),
        ("HELO=" + "a+2D" * 64, replies.ATTRIBUTE_TOO_LONG),  # 256 as sent, 128 decoded
        ("FOO=" + "a" * 256, replies.ATTRIBUTE_TOO_LONG),  # smtpd.c checks the length before the name
    ],
)
def test_xforward_malformed_attribute_refused_with_501(argument: str, expected: Reply) -> None:
    """A word without a value, a value over 255 characters as sent (both READMEs'
    limit) and an unknown name get smtpd.c's 501 replies, in its order."""
    assert refusal(forwarding.xforward, argument, None) == expected


def test_name_of_255_characters_accepted() -> None:
    """255 characters is the longest value (a host name of 4 labels of 63)."""
    name = ".".join(["a" * 63] * 4)
    assert len(name) == 255
    assert forwarding.xforward(f"NAME={name}", None) == Forwarded(name=name)


def test_bad_attribute_after_good_ones_changes_nothing() -> None:
    """A refused command is refused whole: the attributes before its bad one are not taken."""
    current = Forwarded(address="192.0.2.9")
    assert refusal(forwarding.xforward, "NAME=ok.example PORT=x", current) == replies.bad_attribute_value("PORT", "x")
    assert current == Forwarded(address="192.0.2.9")


def test_forwarded_client_mixes_nothing_of_the_session_in() -> None:
    """The transaction's client after XFORWARD is the original one; what XFORWARD
    did not name is unknown, not the session's (XFORWARD_README); the session is its hop."""
    forwarded = forwarding.forwarded_client(attrs.evolve(SESSION, login="x"), Forwarded(address="192.0.2.1"))
    assert forwarded == Client(
        "192.0.2.1",
        0,
        "127.0.0.1",
        25,
        esmtp=True,
        hostname=HOSTNAME,
        forwarded_protocol="",
        source="",
        hop=Hop(Forwarding.XFORWARD, MTA, PEER.port, CLIENT_NAME),
    )
    assert forwarded.protocol == ""


@pytest.mark.parametrize(
    ("argument", "changes"),
    [
        ("NAME=spike.porcupine.org", {"name": "spike.porcupine.org"}),
        ("NAME=[TEMPUNAVAIL]", {"name": ""}),
        ("NAME=[tempunavail]", {"name": ""}),
        ("NAME=[UNAVAILABLE]", {"name": ""}),
        # A new address comes with its own name and port, or none.
        ("ADDR=168.100.189.2", {"address": "168.100.189.2", "port": 0}),
        ("ADDR=IPV6:2001:db8::2 PORT=4711", {"address": "2001:db8::2", "port": 4711}),
        ("ADDR=[UNAVAILABLE]", {"address": "", "port": 0}),
        ("PORT=4711", {"port": 4711}),
        ("HELO=spike.porcupine.org", {"helo": "spike.porcupine.org"}),
        ("HELO=b+C3+BCcher.example", {"helo": "bücher.example"}),  # as EHLO takes it
        ("PROTO=ESMTP", {"esmtp": True}),
        ("PROTO=smtp", {}),
        ("LOGIN=alice", {"login": "alice"}),
        ("LOGIN=user+tag@example.org", {"login": "user+tag@example.org"}),  # nginx: unencoded
        ("LOGIN=j+C3+BCrgen", {"login": "jürgen"}),
        ("LOGIN=[UNAVAILABLE]", {}),
        ("DESTADDR=192.0.2.25 DESTPORT=587", {"server_address": "192.0.2.25", "server_port": 587}),
    ],
)
def test_xclient_attribute_applies(argument: str, changes: dict[str, Any]) -> None:
    """XCLIENT replaces what it names, resets HELO, PROTO (to SMTP) and LOGIN when
    it does not name them (XCLIENT_README "Server response"), keeps TLS, and makes
    the connecting host the hop."""
    session = attrs.evolve(SESSION, name="old.example", login="bob")
    expected = attrs.evolve(session, helo="", esmtp=False, login="", hop=PROXY_HOP)
    if "address" in changes:
        expected = attrs.evolve(expected, name="")
    assert forwarding.xclient(argument, session, PROXY_HOP) == attrs.evolve(expected, **changes)


def test_xclient_keeps_the_first_hop() -> None:
    """A second XCLIENT (the proxy sending its attributes in two commands) keeps
    the connecting host as the hop."""
    first = forwarding.xclient(f"ADDR={ORIGINAL_ADDRESS}", SESSION, PROXY_HOP)
    second = forwarding.xclient("NAME=spike.porcupine.org", first, Hop(Forwarding.XCLIENT, ORIGINAL_ADDRESS, 0))
    assert second.hop == PROXY_HOP


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("PROTO=LMTP", replies.bad_attribute_value("PROTO", "LMTP")),  # "either SMTP or ESMTP"
        ("PROTO=[UNAVAILABLE]", replies.bad_attribute_value("PROTO", "[UNAVAILABLE]")),
        ("NAME=192.0.2.1", replies.bad_attribute_value("NAME", "192.0.2.1")),
        ("ADDR=localhost", replies.bad_attribute_value("ADDR", "localhost")),
        ("HELO=a..b", replies.bad_attribute_value("HELO", "a..b")),
        ("LOGIN=a+00b", replies.bad_attribute_value("LOGIN", "a\x00b")),
        ("DESTPORT=70000", replies.bad_attribute_value("DESTPORT", "70000")),
        ("IDENT=x", replies.bad_attribute_name("XCLIENT", "IDENT")),  # XFORWARD's, not XCLIENT's
        ("ADDR=192.0.2.1 PORT=x", replies.bad_attribute_value("PORT", "x")),
    ],
)
def test_xclient_bad_attribute_refused_with_501(argument: str, expected: Reply) -> None:
    """What XCLIENT_README does not allow gets smtpd.c's 501 5.5.4 reply."""
    assert refusal(forwarding.xclient, argument, SESSION, PROXY_HOP) == expected


# -- XFORWARD sent on ----------------------------------------------------------------------


def test_xforward_sent_on_carries_what_was_received() -> None:
    """To a next hop offering every attribute, smtpguard sends what the MTA in front
    told it, in one command, in XFORWARD_README's order."""
    assert forwarding.xforward_commands(FORWARDED, "NAME ADDR PROTO HELO SOURCE PORT IDENT") == [XFORWARD_ALL]


def test_xforward_sent_on_says_unavailable_for_what_is_not_known() -> None:
    """What the MTA in front did not tell goes as [UNAVAILABLE], as Postfix's smtp client sends it."""
    client = forwarding.forwarded_client(SESSION, Forwarded(address="2001:db8::1"))
    assert forwarding.xforward_commands(client, "NAME ADDR PORT PROTO HELO IDENT SOURCE") == [
        "XFORWARD NAME=[UNAVAILABLE] ADDR=IPV6:2001:db8::1 PORT=[UNAVAILABLE] PROTO=[UNAVAILABLE]"
        " HELO=[UNAVAILABLE] IDENT=[UNAVAILABLE] SOURCE=[UNAVAILABLE]"
    ]


def test_xforward_sent_on_for_a_client_of_ours_says_remote() -> None:
    """A client that connected itself is REMOTE, its protocol is ours, it has no IDENT."""
    assert forwarding.xforward_commands(SESSION, "NAME ADDR PORT PROTO HELO IDENT SOURCE") == [
        f"XFORWARD NAME=[UNAVAILABLE] ADDR={MTA} PORT={PEER.port} PROTO=ESMTP HELO={CLIENT_NAME}"
        " IDENT=[UNAVAILABLE] SOURCE=REMOTE"
    ]


def test_xforward_sent_on_says_esmtpa_after_xclient_login() -> None:
    """A client that logged in at the proxy (XCLIENT LOGIN) went with ESMTPA."""
    client = forwarding.xclient("LOGIN=alice HELO=client.example PROTO=ESMTP", SESSION, PROXY_HOP)
    assert forwarding.xforward_commands(client, "PROTO") == ["XFORWARD PROTO=ESMTPA"]


def test_xforward_sent_on_splits_at_512_octets() -> None:
    """Two names of 255 characters do not fit one command line of 512 octets
    (XFORWARD_README Note 2): they go in two commands, each within the limit."""
    name = ".".join(["a" * 63] * 4)
    client = attrs.evolve(FORWARDED, name=name, helo=name)
    commands = forwarding.xforward_commands(client, "NAME ADDR PORT PROTO HELO IDENT SOURCE")
    assert commands == [
        f"XFORWARD NAME={name} ADDR={ORIGINAL_ADDRESS} PORT=4711 PROTO=ESMTPS",
        f"XFORWARD HELO={name} IDENT={IDENT} SOURCE=REMOTE",
    ]
    assert all(len(command) + 2 <= 512 for command in commands)


def test_xforward_sent_on_gives_up_a_value_too_long_for_any_command() -> None:
    """A HELO literal that xtext makes longer than a command line goes as [UNAVAILABLE]."""
    client = attrs.evolve(FORWARDED, helo="[x:" + "=" * 200 + "]")
    assert forwarding.xforward_commands(client, "HELO") == ["XFORWARD HELO=[UNAVAILABLE]"]


# -- the server: who may ---------------------------------------------------------------------


def ehlo(s: Session) -> list[str]:
    [reply] = send(s, f"EHLO {CLIENT_NAME}")
    return ehlo_keywords(reply)


def test_neither_offered_nor_accepted_by_default() -> None:
    """With empty xforward_hosts and xclient_hosts (the default) EHLO offers
    neither, and both get 550 5.7.0: nobody can claim another address."""
    s = Session.open()
    s.replies()
    assert ehlo(s) == esmtp_extensions(s.factory.settings)
    assert (
        send(s, f"XFORWARD ADDR={ORIGINAL_ADDRESS}", f"XCLIENT ADDR={ORIGINAL_ADDRESS}")
        == [replies.NOT_AUTHORIZED.to_bytes()] * 2
    )
    s.send(transaction())
    assert s.replies() == transaction_replies()
    assert delivered_client(s) == SESSION


def test_xforward_offered_and_accepted_only_from_xforward_hosts() -> None:
    """A client in xforward_hosts is offered XFORWARD with its attributes, and its
    XFORWARD gets 250 2.0.0; XCLIENT is neither offered nor accepted."""
    s = Session.open(access=trusting(xforward_hosts=["127.0.0.0/8"]))
    s.replies()
    keywords = ehlo(s)
    assert keywords == [
        *esmtp_extensions()[:3],
        "XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE",
        *esmtp_extensions()[3:],
    ]
    assert send(s, XFORWARD_ALL, "XCLIENT NAME=x.example") == [replies.OK.to_bytes(), replies.NOT_AUTHORIZED.to_bytes()]


def test_xclient_offered_only_to_xclient_hosts() -> None:
    """A client in xclient_hosts is offered XCLIENT with its attributes, not XFORWARD."""
    s = Session.open(access=trusting(xclient_hosts=["127.0.0.1"]))
    s.replies()
    keywords = ehlo(s)
    assert keywords == [
        *esmtp_extensions()[:3],
        "XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT",
        *esmtp_extensions()[3:],
    ]


def test_xforward_from_other_network_refused() -> None:
    """xforward_hosts naming another network: 550 5.7.0, and the message goes as the session's."""
    s = forwarding_session(xforward_hosts=["192.0.2.0/24"])
    assert send(s, XFORWARD_ALL) == [replies.NOT_AUTHORIZED.to_bytes()]
    s.send(transaction())
    assert s.replies() == transaction_replies()
    assert delivered_client(s) == SESSION


@pytest.mark.parametrize("command", ["XFORWARD", "XCLIENT"])
def test_inside_a_transaction_refused_with_503(command: str) -> None:
    """Between MAIL and the end of data: 503 5.5.1, and the transaction goes on."""
    s = forwarding_session(xforward_hosts=["127.0.0.1"], xclient_hosts=["127.0.0.1"])
    s.begin()
    assert send(s, f"{command} ADDR={ORIGINAL_ADDRESS}") == [replies.TRANSACTION_IN_PROGRESS.to_bytes()]
    s.send(b"DATA\r\n", MESSAGE + b".\r\n")
    assert s.replies() == [replies.START_DATA.to_bytes(), QUEUED.to_bytes()]
    assert delivered_client(s) == SESSION


@pytest.mark.parametrize(
    ("command", "syntax"), [("XFORWARD", replies.XFORWARD_SYNTAX), ("XCLIENT", replies.XCLIENT_SYNTAX)]
)
@pytest.mark.parametrize("rest", ["", " ", " \t "])
def test_without_attributes_refused_with_501(command: str, syntax: Reply, rest: str) -> None:
    """A command without attributes: 501 5.5.4 Syntax (before authorization, as smtpd.c checks)."""
    s = forwarding_session()
    assert send(s, command + rest) == [syntax.to_bytes()]


# -- the server: XFORWARD ------------------------------------------------------------------------


def xforwarding() -> Session:
    return forwarding_session(xforward_hosts=["127.0.0.1"])


def test_xforward_makes_the_transaction_client_the_original_one() -> None:
    """After XFORWARD, the message's client (what the log, the policy banks, the
    notices, the quarantine and the XFORWARD sent on use) is the original client,
    with the MTA in front as its hop."""
    s = xforwarding()
    assert send(s, XFORWARD_ALL) == [replies.OK.to_bytes()]
    s.send(transaction())
    assert s.replies() == transaction_replies()
    assert delivered_client(s) == FORWARDED


def test_xforward_in_pieces_accumulates() -> None:
    """XFORWARD_README: attributes sent in several commands (as Postfix's smtp client
    sends NAME ADDR PORT, then PROTO HELO IDENT SOURCE) all count."""
    s = xforwarding()
    first = f"XFORWARD NAME={ORIGINAL_NAME} ADDR={ORIGINAL_ADDRESS} PORT=4711"
    second = f"XFORWARD PROTO=ESMTPS HELO={ORIGINAL_HELO} IDENT={IDENT} SOURCE=REMOTE"
    assert send(s, first, second) == [replies.OK.to_bytes()] * 2
    s.send(transaction())
    assert s.replies() == transaction_replies()
    assert delivered_client(s) == FORWARDED


@pytest.mark.parametrize(
    "ending",
    [
        pytest.param(["RSET"], id="RSET"),
        pytest.param([f"EHLO {CLIENT_NAME}"], id="EHLO"),
        pytest.param(["MAIL FROM:<a@example.org>", "RSET"], id="transaction then RSET"),
    ],
)
def test_xforward_reset_at_rset(ending: list[str]) -> None:
    """XFORWARD_README: the attributes go at RSET (and at EHLO, as in Postfix): the
    next transaction's client is the session's own."""
    s = xforwarding()
    send(s, XFORWARD_ALL, *ending)
    s.send(transaction())
    assert s.replies() == transaction_replies()
    assert delivered_client(s) == SESSION


def test_xforward_reset_at_end_of_data() -> None:
    """XFORWARD_README: the attributes go at the end of data (DOT): only the first
    of two transactions is the original client's."""
    s = xforwarding()
    s.send(XFORWARD_ALL.encode() + b"\r\n", transaction(), transaction())
    assert s.replies() == [replies.OK.to_bytes(), *transaction_replies(), *transaction_replies()]
    assert [delivery.envelope.client for delivery in s.hop.delivered] == [FORWARDED, SESSION]


def test_xforward_reset_at_end_of_bdat() -> None:
    """The last BDAT chunk ends the transaction as DOT does."""
    s = xforwarding()
    body = b"Subject: t\r\n\r\nhi\r\n"
    s.send(XFORWARD_ALL.encode() + b"\r\n", f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\n".encode())
    s.send(f"BDAT {len(body)} LAST\r\n".encode() + body, transaction())
    assert [delivery.envelope.client for delivery in s.hop.delivered] == [FORWARDED, SESSION]


def test_xforward_survives_a_refused_mail() -> None:
    """A MAIL that is refused opens no transaction: the attributes wait for the next MAIL."""
    s = xforwarding()
    assert send(s, XFORWARD_ALL, "MAIL FROM:<not an address>") == [
        replies.OK.to_bytes(),
        replies.BAD_SENDER_SYNTAX.to_bytes(),
    ]
    s.send(transaction())
    assert s.replies() == transaction_replies()
    assert delivered_client(s) == FORWARDED


def test_refused_xforward_leaves_the_session_in_step() -> None:
    """A bad value gets 501 5.5.4 and changes nothing; the commands pipelined after
    it are answered in order and the message goes with the attributes of before."""
    s = xforwarding()
    s.send(
        f"XFORWARD ADDR={ORIGINAL_ADDRESS}\r\nXFORWARD ADDR=300.1.1.1 NAME=x.example\r\n".encode(),
        transaction(),
    )
    assert s.replies() == [
        replies.OK.to_bytes(),
        replies.bad_attribute_value("ADDR", "300.1.1.1").to_bytes(),
        *transaction_replies(),
    ]
    assert delivered_client(s) == forwarding.forwarded_client(SESSION, Forwarded(address=ORIGINAL_ADDRESS))


def test_received_header_after_xforward_names_the_mta_in_front() -> None:
    """After XFORWARD the Received: header traces the MTA that connected (whose own
    Received: names the original client), with the session's protocol."""
    s = xforwarding()
    s.send(XFORWARD_ALL.encode() + b"\r\n", transaction())
    s.replies()
    assert received_lines(s) == traced(s, f"{CLIENT_NAME} ([{MTA}])", "ESMTP")


def test_log_line_names_the_original_client_and_the_hop() -> None:
    """The transaction's log line: client=name[address]:port of the original client,
    via=XFORWARD[mta]:port, and the IDENT (its queue id in front)."""
    pipeline = Pipeline(Clock(), BuiltinScanner(), DefaultPolicy(), observers=[log_transaction])
    s = Session.open(process=pipeline.process, access=trusting(xforward_hosts=["127.0.0.1"])).hello()
    with capturedLogs() as events:
        s.send(XFORWARD_ALL.encode() + b"\r\n", transaction())
    [line] = [formatEvent(event) for event in events if event["log_namespace"] == NAMESPACE]
    expected = f"client={ORIGINAL_NAME}[{ORIGINAL_ADDRESS}]:4711 via=XFORWARD[{MTA}]:{PEER.port} ident={IDENT} from="
    assert expected in line


def test_message_rate_counted_for_the_original_client() -> None:
    """max_messages_per_client counts the original client's messages: a second
    message from the same original client is refused (450 4.7.1), one from
    another original client over the same connection is not."""
    s = forwarding_session(xforward_hosts=["127.0.0.1"], max_messages_per_client=1)
    s.send(XFORWARD_ALL.encode() + b"\r\n", transaction())
    s.send(XFORWARD_ALL.encode() + b"\r\n", f"MAIL FROM:<{SENDER}>\r\n".encode())
    s.send(b"XFORWARD ADDR=192.0.2.77\r\n", transaction())
    assert s.replies() == [
        replies.OK.to_bytes(),
        *transaction_replies(),
        replies.OK.to_bytes(),
        replies.RATE_LIMITED.to_bytes(),
        replies.OK.to_bytes(),
        *transaction_replies(),
    ]
    assert [delivery.envelope.client.address for delivery in s.hop.delivered] == [ORIGINAL_ADDRESS, "192.0.2.77"]


def test_policy_bank_chosen_by_the_original_client() -> None:
    """A [[policy.rules]] bank with client_networks is chosen by the address
    XFORWARD names: EICAR from the lab network passes, from elsewhere it is rejected."""
    lab = Rule(PolicySettings(on_virus=OnVirus.PASS), client_networks=networks(["203.0.113.0/24"]))
    s = with_policy(DefaultPolicy(PolicySettings(on_virus=OnVirus.REJECT), [lab]), xforward_hosts=["127.0.0.1"])
    s.send(XFORWARD_ALL.encode() + b"\r\n", transaction(data=EICAR_MESSAGE))
    s.send(b"XFORWARD ADDR=192.0.2.1\r\n", transaction(data=EICAR_MESSAGE))
    rejected = replies.VIRUS_REJECTED.with_text(f"Message rejected: virus found ({EICAR_NAME})")
    assert s.replies() == [
        replies.OK.to_bytes(),
        *transaction_replies(),
        replies.OK.to_bytes(),
        *transaction_replies(final=rejected),
    ]
    assert [delivery.envelope.client.address for delivery in s.hop.delivered] == [ORIGINAL_ADDRESS]


def with_policy(policy: DefaultPolicy, **hosts: Any) -> Session:
    """A session past EHLO, its factory wired as tap.build_factory wires it."""
    clock = Clock()
    clock.advance(NOW)
    hop = MemoryNextHop()
    scanner = BuiltinScanner()
    pipeline = Pipeline(clock, scanner, policy, scan_timeout=SCAN_TIMEOUT)
    settings = ServerSettings(hostname=HOSTNAME, access=trusting(**hosts))
    return Session(GuardFactory(clock, hop, pipeline.process, settings, pipeline.accepts), hop, clock, scanner).hello()


# -- the server: XCLIENT ----------------------------------------------------------------------------


def proxied(**hosts: Any) -> Session:
    return forwarding_session(**{"xclient_hosts": ["127.0.0.1"], **hosts})


GREETING = replies.SERVICE_READY.with_text(f"{HOSTNAME} ESMTP smtpguard")
NGINX_XCLIENT = f"XCLIENT ADDR={ORIGINAL_ADDRESS} LOGIN=alice NAME=[UNAVAILABLE]"


def test_xclient_answers_with_a_new_greeting_and_needs_ehlo_again() -> None:
    """XCLIENT_README: the session goes back to its greeting: 220, then MAIL before a
    new EHLO gets 503 5.5.1 (XCLIENT sent no HELO)."""
    s = proxied()
    assert send(s, NGINX_XCLIENT, f"MAIL FROM:<{SENDER}>") == [GREETING.to_bytes(), replies.NEED_HELO.to_bytes()]
    assert s.hop.commands == []


def test_xclient_as_nginx_sends_it_then_a_message() -> None:
    """nginx's mail proxy: XCLIENT ADDR LOGIN NAME, the 220, EHLO with the client's
    name, the transaction: the message is the named client's, the proxy its hop,
    and the Received: header traces the client, with ESMTPA for its login."""
    s = proxied()
    assert send(s, NGINX_XCLIENT, f"EHLO {ORIGINAL_HELO}")[0] == GREETING.to_bytes()
    s.send(transaction())
    assert s.replies() == transaction_replies()
    assert delivered_client(s) == attrs.evolve(
        SESSION, address=ORIGINAL_ADDRESS, port=0, helo=ORIGINAL_HELO, login="alice", hop=PROXY_HOP
    )
    assert received_lines(s) == traced(s, f"{ORIGINAL_HELO} ([{ORIGINAL_ADDRESS}])", "ESMTPA")


def test_xclient_with_helo_and_proto_needs_no_new_ehlo() -> None:
    """What XCLIENT names is kept (XCLIENT_README): with HELO and PROTO=ESMTP the
    client may go on with MAIL at once; the Received: header names the client as
    name and address."""
    s = proxied()
    command = f"XCLIENT NAME={ORIGINAL_NAME} ADDR={ORIGINAL_ADDRESS} PORT=4711 HELO={ORIGINAL_HELO} PROTO=ESMTP"
    assert send(s, command) == [GREETING.to_bytes()]
    s.send(transaction())
    assert s.replies() == transaction_replies()
    assert received_lines(s)[0] == f"Received: from {ORIGINAL_HELO} ({ORIGINAL_NAME} [{ORIGINAL_ADDRESS}])"
    assert delivered_client(s).namaddr == f"{ORIGINAL_NAME}[{ORIGINAL_ADDRESS}]:4711"


def test_xclient_without_address_keeps_it_and_received_says_unknown_when_unavailable() -> None:
    """ADDR=[UNAVAILABLE]: the Received: header has no address to trace: "(unknown)"."""
    s = proxied()
    send(s, f"XCLIENT ADDR=[UNAVAILABLE] HELO={ORIGINAL_HELO} PROTO=ESMTP")
    s.send(transaction())
    assert s.replies() == transaction_replies()
    assert received_lines(s)[0] == f"Received: from {ORIGINAL_HELO} (unknown)"


def test_refused_xclient_changes_nothing_and_the_session_goes_on() -> None:
    """A bad value: 501 5.5.4, no new greeting, the session's client and EHLO stay."""
    s = proxied()
    s.send(b"XCLIENT ADDR=192.0.2.300\r\n", transaction())
    assert s.replies() == [replies.bad_attribute_value("ADDR", "192.0.2.300").to_bytes(), *transaction_replies()]
    assert delivered_client(s) == SESSION


def test_xclient_address_outside_xclient_hosts_may_send_no_more() -> None:
    """XCLIENT_README Note 1: once ADDR names a client outside xclient_hosts, that
    client may not send XCLIENT (550 5.7.0), and EHLO no longer offers it."""
    s = proxied()
    send(s, f"XCLIENT ADDR={ORIGINAL_ADDRESS}")
    assert ehlo(s) == esmtp_extensions()
    assert send(s, "XCLIENT ADDR=127.0.0.1") == [replies.NOT_AUTHORIZED.to_bytes()]


def test_xclient_in_two_commands_address_last() -> None:
    """XCLIENT_README Note 1: HELO and PROTO first, then NAME and ADDR; the second
    XCLIENT resets HELO, since it did not name it."""
    s = proxied()
    replies_ = send(
        s, f"XCLIENT HELO={ORIGINAL_HELO} PROTO=ESMTP", f"XCLIENT NAME={ORIGINAL_NAME} ADDR={ORIGINAL_ADDRESS}"
    )
    assert replies_ == [GREETING.to_bytes()] * 2
    assert send(s, f"MAIL FROM:<{SENDER}>") == [replies.NEED_HELO.to_bytes()]


def test_xclient_address_outside_allowed_clients_refused_as_at_connect() -> None:
    """The connection-level checks are made for the new client: outside
    allowed_clients it gets 554 5.7.1 and the connection is closed."""
    s = proxied(allowed_clients=["127.0.0.1", "192.0.2.0/24"])
    assert send(s, f"XCLIENT ADDR={ORIGINAL_ADDRESS}") == [replies.ACCESS_DENIED.to_bytes()]
    assert s.closed


def test_xclient_address_inside_allowed_clients_accepted() -> None:
    """A new client inside allowed_clients gets the new greeting."""
    s = proxied(allowed_clients=["127.0.0.1", "203.0.113.0/24"])
    assert send(s, f"XCLIENT ADDR={ORIGINAL_ADDRESS}") == [GREETING.to_bytes()]
    assert not s.closed


def test_proxy_connections_count_for_the_clients_it_names() -> None:
    """A host in xclient_hosts is not counted under max_connections_per_client (as in
    Postfix); each connection counts under the client XCLIENT names, and one over
    the limit for that client gets 421 4.7.0 and is closed."""
    first = Session.open(access=trusting(xclient_hosts=["127.0.0.1"], max_connections_per_client=1))
    second, third = first.another(), first.another()
    assert [s.replies() for s in (first, second, third)] == [[GREETING.to_bytes()]] * 3
    assert send(first, f"XCLIENT ADDR={ORIGINAL_ADDRESS}") == [GREETING.to_bytes()]
    assert send(second, "XCLIENT ADDR=192.0.2.8") == [GREETING.to_bytes()]
    assert send(third, f"XCLIENT ADDR={ORIGINAL_ADDRESS}") == [replies.TOO_MANY_CLIENT_CONNECTIONS.to_bytes()]
    assert third.closed
    first.lose()
    fourth = first.another()
    fourth.replies()
    assert send(fourth, f"XCLIENT ADDR={ORIGINAL_ADDRESS}") == [GREETING.to_bytes()]


def test_xclient_ends_the_xforward_attributes() -> None:
    """XCLIENT resets the session, XFORWARD attributes included."""
    s = proxied(xforward_hosts=["127.0.0.1"])
    send(s, XFORWARD_ALL, f"XCLIENT HELO={CLIENT_NAME} PROTO=ESMTP")
    s.send(transaction())
    assert s.replies() == transaction_replies()
    assert delivered_client(s) == attrs.evolve(SESSION, hop=PROXY_HOP)


def test_xclient_keeps_tls() -> None:
    """XCLIENT_README: TLS is not reset: after STARTTLS and XCLIENT, EHLO does not
    offer STARTTLS again and the message is traced with ESMTPS."""
    s = Session.open(
        tls=TLS_CONTEXT, transport_class=TLSRecordingTransport, access=trusting(xclient_hosts=["127.0.0.1"])
    ).hello()
    assert send(s, "STARTTLS") == [replies.READY_FOR_TLS.to_bytes()]
    assert send(s, f"XCLIENT ADDR={ORIGINAL_ADDRESS}") == [GREETING.to_bytes()]
    assert ehlo(s) == esmtp_extensions()
    s.send(transaction())
    assert s.replies() == transaction_replies()
    assert delivered_client(s).tls is True
    assert received_lines(s)[1].startswith(f"by {HOSTNAME} (smtpguard) with ESMTPS id ")


# -- configuration ---------------------------------------------------------------------------------


def parsed(server: dict[str, Any], listeners: list[dict[str, Any]] | None = None) -> configuration.Config:
    data = {
        "server": {"listen": ["tcp:10025"], **server},
        "listeners": listeners or [],
        "upstream": {"endpoint": "tcp:127.0.0.1:1"},
        "scanners": [{"type": "builtin"}],
    }
    return configuration.parse(data, "f.toml")


def test_hosts_are_empty_by_default() -> None:
    """Without xforward_hosts and xclient_hosts nobody may send either command."""
    [listener] = parsed({}).listeners
    assert (listener.access.xforward_hosts, listener.access.xclient_hosts) == ((), ())


def test_hosts_set_in_server_and_per_listener() -> None:
    """[server] sets them for its listeners; a [[listeners]] table inherits them or
    sets its own (an empty list: nobody)."""
    loaded = parsed(
        {"xforward_hosts": ["127.0.0.1", "::1"], "xclient_hosts": "10.0.0.0/8"},
        [
            {"endpoint": "tcp:10026"},
            {"endpoint": "tcp:10027", "xforward_hosts": [], "xclient_hosts": ["192.0.2.0/24"]},
        ],
    )
    inherited = (networks(["127.0.0.1", "::1"]), networks(["10.0.0.0/8"]))
    assert [(listener.access.xforward_hosts, listener.access.xclient_hosts) for listener in loaded.listeners] == [
        inherited,
        inherited,
        ((), networks(["192.0.2.0/24"])),
    ]


@pytest.mark.parametrize(
    ("server", "listeners", "message"),
    [
        ({"xforward_hosts": ["127.0.0.300"]}, [], "f.toml: server.xforward_hosts: "),
        ({"xclient_hosts": [1]}, [], "f.toml: server.xclient_hosts: "),
        ({}, [{"endpoint": "tcp:1", "xclient_hosts": ["nginx"]}], "f.toml: listeners[0].xclient_hosts: "),
    ],
)
def test_bad_hosts_stop_the_start_naming_the_key(
    server: dict[str, Any], listeners: list[dict[str, Any]], message: str
) -> None:
    """A value that is not a list of networks stops the start with the file and key."""
    with pytest.raises(configuration.ConfigError) as raised:
        parsed(server, listeners)
    assert str(raised.value).startswith(message)


# -- notices and the quarantine ----------------------------------------------------------------------


def test_replacement_notice_names_the_original_client() -> None:
    """The notice that replaces an infected message names the client XFORWARD gave
    ("Your mail <client>:<port>-<server>:<port> ...")."""
    s = with_policy(DefaultPolicy(PolicySettings(on_virus=OnVirus.REPLACE)), xforward_hosts=["127.0.0.1"])
    s.send(XFORWARD_ALL.encode() + b"\r\n", transaction(data=EICAR_MESSAGE))
    assert s.replies() == [replies.OK.to_bytes(), *transaction_replies()]
    notice = f"Your mail {ORIGINAL_ADDRESS}:4711-127.0.0.1:25 contains contaminated file (body) with virus"
    assert s.hop.delivered[0].data.endswith(f"\r\n\r\n{notice} {EICAR_NAME}, so it is dropped.\r\n".encode())


def test_replacement_notice_names_the_xclient_destination() -> None:
    """XCLIENT DESTADDR and DESTPORT are the server side of the notice."""
    s = with_policy(DefaultPolicy(PolicySettings(on_virus=OnVirus.REPLACE)), xclient_hosts=["127.0.0.1"])
    send(s, f"XCLIENT ADDR={ORIGINAL_ADDRESS} PORT=4711 DESTADDR=192.0.2.25 DESTPORT=587 HELO=a.example PROTO=ESMTP")
    s.send(transaction(data=EICAR_MESSAGE))
    assert s.replies() == transaction_replies()
    notice = f"Your mail {ORIGINAL_ADDRESS}:4711-192.0.2.25:587 contains contaminated file (body) with virus"
    assert s.hop.delivered[0].data.endswith(f"\r\n\r\n{notice} {EICAR_NAME}, so it is dropped.\r\n".encode())


def test_quarantine_metadata_keeps_the_forwarded_client_and_gives_it_back() -> None:
    """The quarantine's JSON holds the original client, its host name, protocol,
    ident, source and hop; envelope_of gives back the very envelope, so a release
    tells the next hop the original client again; ``show`` prints both."""
    envelope = Envelope(FORWARDED, SENDER, recipients=(Recipient(RECIPIENT),))
    data = json.loads(json.dumps(metadata(Incident("0123456789AB", envelope, INFECTED, REPLACED, b"", WHEN), 0)))
    assert data["client"] == {
        "address": ORIGINAL_ADDRESS,
        "port": 4711,
        "server_address": "127.0.0.1",
        "server_port": 25,
        "helo": ORIGINAL_HELO,
        "esmtp": True,
        "tls": False,
        "hostname": HOSTNAME,
        "tls_version": "",
        "tls_cipher": "",
        "name": ORIGINAL_NAME,
        "login": "",
        "forwarded_protocol": "ESMTPS",
        "ident": IDENT,
        "source": "REMOTE",
        "hop": {"command": "XFORWARD", "address": MTA, "port": PEER.port, "helo": CLIENT_NAME},
    }
    assert envelope_of(data) == envelope
    assert describe(data)[3:5] == [
        f"client:      {ORIGINAL_NAME}[{ORIGINAL_ADDRESS}]:4711 helo={ORIGINAL_HELO} ESMTPS",
        f"via:         XFORWARD from [{MTA}]:{PEER.port}",
    ]


def test_notices_tell_the_next_hop_they_were_written_here(tmp_path: Path) -> None:
    """A notice smtpguard sends goes with XFORWARD ADDR=127.0.0.1, its own name as
    HELO, and SOURCE=LOCAL: it originated on this host (XFORWARD_README)."""
    clock = Clock()
    hop = MemoryNextHop()
    box = Outbox(clock, str(tmp_path), hop, hostname=HOSTNAME)
    box.start()
    box.add("alice@example.org", b"Subject: notice\r\n\r\nHello.\r\n", "sender", "T1")
    clock.advance(0)
    [delivery] = hop.delivered
    assert forwarding.xforward_commands(delivery.envelope.client, "NAME ADDR PORT PROTO HELO IDENT SOURCE") == [
        f"XFORWARD NAME=[UNAVAILABLE] ADDR=127.0.0.1 PORT=[UNAVAILABLE] PROTO=ESMTP HELO={HOSTNAME}"
        " IDENT=[UNAVAILABLE] SOURCE=LOCAL"
    ]
