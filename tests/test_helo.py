"""The EHLO/HELO name: a domain (U-labels allowed) or an address literal, nothing
else (RFC 5321 4.1.1.1, 4.1.3; RFC 6531), and how it appears in the EHLO reply
and the Received: header: its ASCII form, unless the transaction is SMTPUTF8.

Unit tests drive the server with StringTransport; the last two go from smtplib
through smtpguard to Postfix's smtp-sink and to smtpguard's capture target."""

from __future__ import annotations

import re
import smtplib
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort

from smtpguard import replies
from smtpguard.capture import capture_factory
from smtpguard.envelope import Client, Envelope, MailParameters
from smtpguard.replies import Reply
from tests.conftest import SinkStarter, listen
from tests.test_integration import CLIENT_TIMEOUT, RECIPIENT, SENDER, dumps, in_thread, start_guard, text_message
from tests.test_integration import transaction as client_transaction
from tests.test_server import (
    HOSTNAME,
    MESSAGE,
    Session,
    tls_session,
    trace_headers,
    transaction,
    transaction_id,
    transaction_replies,
)

U_LABEL_NAME = "bücher.example"
A_LABEL_NAME = "xn--bcher-kva.example"

# name as the client says it -> its ASCII form (the EHLO reply, Received: without SMTPUTF8)
ACCEPTED = {
    "domain": ("client.example.org", "client.example.org"),
    "one label": ("localhost", "localhost"),
    "case kept": ("Client-1.Example.ORG", "Client-1.Example.ORG"),
    "underscore": ("win_pc_7.corp.example", "win_pc_7.corp.example"),
    "underscore first": ("_relay.example", "_relay.example"),
    "all digits": ("192.0.2.1", "192.0.2.1"),
    "A-label": (A_LABEL_NAME, A_LABEL_NAME),
    "U-label": (U_LABEL_NAME, A_LABEL_NAME),
    "U-label upper case": ("BÜCHER.example", A_LABEL_NAME),
    "U-labels only": ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
    "63-octet label": ("a" * 63 + ".example", "a" * 63 + ".example"),
    "255 octets": (".".join(["a" * 63] * 4), ".".join(["a" * 63] * 4)),
    "IPv4 literal": ("[192.0.2.1]", "[192.0.2.1]"),
    "IPv4 literal, leading zero": ("[192.0.2.010]", "[192.0.2.010]"),
    "IPv6 literal": ("[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]"),
    "IPv6 literal, lower-case tag": ("[ipv6:::1]", "[ipv6:::1]"),
    "IPv6 literal, IPv4 inside": ("[IPv6:::ffff:192.0.2.1]", "[IPv6:::ffff:192.0.2.1]"),
    "general literal": ("[x-tag:any!printable~text]", "[x-tag:any!printable~text]"),
    # Not an IPv6-address-literal, but a General-address-literal by its syntax.
    "IPv6 without its tag": ("[2001:db8::1]", "[2001:db8::1]"),
}

REFUSED = {
    "CR": b"evil\rX-Injected: yes",
    "ESC": b"evil\x1b[2J",
    "NUL": b"evil\x00.example",
    "tab": b"evil\tX-Injected:yes",
    "DEL": b"evil\x7f.example",
    "space": b"two words.example",
    "literal and a comment": b"[192.0.2.1] (my laptop)",
    "300 octets": ".".join(["a" * 59] * 4 + ["a" * 60]).encode(),
    "256 octets": (".".join(["a" * 50] * 5) + ".b").encode(),
    "64-octet label": ("a" * 64 + ".example").encode(),
    "over 255 octets as A-labels": ".".join(["bücher" * 8] * 5).encode(),
    "A-label over 63 octets": ("ü" * 60 + ".example").encode(),
    "leading hyphen": b"-client.example",
    "trailing hyphen": b"client-.example",
    "empty label": b"client..example",
    "trailing dot": b"client.example.",
    "leading dot": b".client.example",
    "at sign": b"user@client.example",
    "port": b"client.example:25",
    "angle brackets": b"<client.example>",
    "percent": b"client%example",
    "snowman (IDNA 2003 only)": "☃.example".encode(),
    "emoji": "😀.example".encode(),
    "fullwidth letters": "\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com".encode(),
    "zero width joiner": "a\u200db.example".encode(),
    "not NFC": "bu\u0308cher.example".encode(),
    "ideographic full stop": "例え。テスト".encode(),
    "right-to-left after a digit": "1\u05d0.example".encode(),
    "IPv4 literal, octet 256": b"[192.0.2.256]",
    "IPv4 literal, three octets": b"[192.0.2]",
    "IPv6 literal, bad digit": b"[IPv6:2001:db8::g]",
    "IPv6 literal, zone": b"[IPv6:fe80::1%eth0]",
    "unclosed literal": b"[192.0.2.1",
    "empty literal": b"[]",
    "general literal, no content": b"[x-tag:]",
    "general literal, no tag": b"[:content]",
    "general literal, space": b"[x-tag:two words]",
    "general literal, non-ASCII": "[x-tag:bücher]".encode(),
}


def greeting(name: str) -> Reply:
    return Reply(250, "", f"{HOSTNAME} Hello {name}")


def opened() -> Session:
    session = Session.open()
    session.replies()
    return session


def smtputf8_transaction() -> bytes:
    return transaction().replace(b">\r\n", b"> SMTPUTF8\r\n", 1)


# -- what is accepted -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "ascii_name"), ACCEPTED.values(), ids=ACCEPTED.keys())
def test_name_accepted_and_traced_in_ascii(name: str, ascii_name: str) -> None:
    """A domain (underscores and U-labels too) or an address literal gets 250; the
    reply greets it, and the Received: header of a transaction without SMTPUTF8
    names it, in ASCII form (U-labels as A-labels): the header bytes are ASCII."""
    s = opened()
    s.send(f"HELO {name}\r\n".encode())
    assert s.replies() == [greeting(ascii_name).to_bytes()]
    s.send(transaction())
    assert s.replies() == transaction_replies()
    [delivery] = s.hop.delivered
    assert delivery.envelope.client.helo == name
    assert delivery.data == trace_headers(transaction_id(delivery.data), "SMTP", helo=ascii_name) + MESSAGE
    assert delivery.data.isascii()


def test_u_label_name_traced_as_is_in_smtputf8_transaction() -> None:
    """In an SMTPUTF8 transaction the Received: header names a U-label EHLO name as
    the client gave it, in UTF-8, "with UTF8SMTP" (RFC 6531)."""
    s = opened()
    s.send(f"EHLO {U_LABEL_NAME}\r\n".encode())
    assert s.replies()[0].startswith(b"250-" + greeting(A_LABEL_NAME).text.encode() + b"\r\n")
    s.send(smtputf8_transaction())
    assert s.replies() == transaction_replies()
    [delivery] = s.hop.delivered
    assert delivery.data == trace_headers(transaction_id(delivery.data), "UTF8SMTP", helo=U_LABEL_NAME) + MESSAGE


def test_smtputf8_transaction_after_starttls_is_traced_with_utf8smtps() -> None:
    """An SMTPUTF8 transaction after STARTTLS is traced "with UTF8SMTPS"; the next
    one, without SMTPUTF8, "with ESMTPS" again and the name in ASCII form."""
    s = tls_session()
    s.send(b"STARTTLS\r\n")
    s.replies()
    s.send(f"EHLO {U_LABEL_NAME}\r\n".encode())
    s.replies()
    s.send(smtputf8_transaction(), transaction())
    assert s.replies() == transaction_replies() * 2
    utf8, plain = s.hop.delivered
    assert utf8.data == trace_headers(transaction_id(utf8.data), "UTF8SMTPS", helo=U_LABEL_NAME) + MESSAGE
    assert plain.data == trace_headers(transaction_id(plain.data), "ESMTPS", helo=A_LABEL_NAME) + MESSAGE


def test_surrounding_spaces_are_not_part_of_the_name() -> None:
    """Spaces around the name are dropped: "EHLO  name  " greets and traces "name"."""
    s = opened()
    s.send(b"HELO   client.example.org  \r\n")
    assert s.replies() == [greeting("client.example.org").to_bytes()]


# -- what is refused --------------------------------------------------------------------------


@pytest.mark.parametrize("verb", [b"EHLO", b"HELO"])
@pytest.mark.parametrize("name", REFUSED.values(), ids=REFUSED.keys())
def test_name_refused_and_session_stays_in_sync(verb: bytes, name: bytes) -> None:
    """Anything else gets 501 5.5.4, one reply for the line; no name is recorded
    (MAIL still needs EHLO), the next hop hears nothing, and a proper EHLO then
    works."""
    s = opened()
    s.send(verb + b" " + name + b"\r\nNOOP\r\nMAIL FROM:<" + SENDER.encode() + b">\r\n")
    assert s.replies() == [replies.HELO_REQUIRED.to_bytes(), replies.OK.to_bytes(), replies.NEED_HELO.to_bytes()]
    assert s.hop.commands == []
    s.hello()
    s.send(transaction())
    assert s.replies() == transaction_replies()


def test_refused_name_leaves_the_earlier_one() -> None:
    """A refused EHLO after an accepted one changes nothing: the transaction that
    follows is traced with the earlier name."""
    s = opened()
    s.send(f"EHLO {U_LABEL_NAME}\r\n".encode(), "EHLO 😀.example\r\n".encode())
    assert s.replies()[1:] == [replies.HELO_REQUIRED.to_bytes()]
    s.send(transaction())
    [delivery] = s.hop.delivered
    assert delivery.data == trace_headers(transaction_id(delivery.data), helo=A_LABEL_NAME) + MESSAGE


# -- the values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("helo", "ascii_name"),
    [(U_LABEL_NAME, A_LABEL_NAME), ("[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]"), ("", ""), ("😀.example", "")],
    ids=["U-label", "literal", "none", "not a name"],
)
def test_client_helo_ascii(helo: str, ascii_name: str) -> None:
    """Client.helo_ascii (what XFORWARD HELO= carries) is the name in ASCII form,
    and empty when there is no name or it has no ASCII form."""
    assert Client("192.0.2.1", 25, helo=helo).helo_ascii == ascii_name


@pytest.mark.parametrize(
    ("esmtp", "tls", "smtputf8", "keyword"),
    [
        (False, False, False, "SMTP"),
        (True, False, False, "ESMTP"),
        (True, True, False, "ESMTPS"),
        (True, False, True, "UTF8SMTP"),
        (True, True, True, "UTF8SMTPS"),
    ],
)
def test_envelope_protocol_keyword(esmtp: bool, tls: bool, smtputf8: bool, keyword: str) -> None:
    """The WITH keyword of a transaction follows EHLO/HELO, TLS and SMTPUTF8."""
    client = Client("192.0.2.1", 25, esmtp=esmtp, tls=tls)
    assert Envelope(client, SENDER, MailParameters(smtputf8=smtputf8)).protocol == keyword


# -- end to end -------------------------------------------------------------------------------


def send_as(port: int, name: str, mail_options: tuple[str, ...] = ()) -> list[tuple[int, bytes]]:
    """smtplib says EHLO ``name`` (UTF-8 on the wire) and sends one message."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname=name, timeout=CLIENT_TIMEOUT) as client:
        client.command_encoding = "utf-8"
        client.ehlo()
        return client_transaction(client, text_message("helo"), mail_options=mail_options)


@pytest_twisted.ensureDeferred
async def test_u_label_name_reaches_smtp_sink_as_a_label(
    listening: list[IListeningPort], smtp_sinks: SinkStarter
) -> None:
    """smtplib says EHLO bücher.example; the message smtp-sink (no SMTPUTF8) stores
    carries "Received: from xn--bcher-kva.example ([127.0.0.1])" and not one 8-bit
    byte."""
    sink = smtp_sinks("sink")
    port = await start_guard(listening, sink.endpoint)

    answers = await in_thread(send_as, port, U_LABEL_NAME)

    assert answers == [(250, b"2.1.0 Ok"), (250, b"2.1.5 Ok"), (250, b"2.0.0 Ok")]
    [dump] = await dumps(sink)
    received = re.escape(
        f"\nReceived: from {A_LABEL_NAME} ([127.0.0.1])\n\tby guard.test (smtpguard) with ESMTP id ".encode()
    )
    assert re.search(received + rb"[0-9A-F]{12}\n\tfor <" + re.escape(RECIPIENT.encode()) + b">; ", dump), dump
    assert dump.isascii()


@pytest_twisted.ensureDeferred
async def test_u_label_name_in_smtputf8_transaction_reaches_capture_in_utf8(
    listening: list[IListeningPort], tmp_path: Path
) -> None:
    """smtplib says EHLO bücher.example and MAIL ... SMTPUTF8; the message the
    capture target stores starts "Received: from bücher.example ([127.0.0.1])"
    "with UTF8SMTP"."""
    capture = tmp_path / "capture"
    capture_port = await listen(listening, capture_factory(reactor, str(capture)))
    port = await start_guard(listening, f"tcp:127.0.0.1:{capture_port}")

    answers = await in_thread(send_as, port, U_LABEL_NAME, ("SMTPUTF8",))

    assert answers[:2] == [(250, b"2.1.0 Ok"), (250, b"2.1.5 Ok")] and answers[2][0] == 250, answers
    [stored] = sorted(capture.glob("*.eml"))
    received = re.escape(
        f"Received: from {U_LABEL_NAME} ([127.0.0.1])\r\n\tby guard.test (smtpguard) with UTF8SMTP id ".encode()
    )
    assert re.match(
        received + rb"[0-9A-F]{12}\r\n\tfor <" + re.escape(RECIPIENT.encode()) + b">; ", stored.read_bytes()
    )
