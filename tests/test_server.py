"""Unit tests of the ESMTP server protocol (smtpguard.server), driven with
StringTransport and a Clock, with an in-memory next hop behind it.

Every reply is compared, byte for byte, with the reply named in smtpguard.replies
(or with the next hop's own reply where the client must hear that one)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from smtpguard import replies
from smtpguard.envelope import BodyType, Notify, Return
from smtpguard.inputbuffer import InputBuffer
from smtpguard.interfaces import IScanner
from smtpguard.pipeline import Pipeline
from smtpguard.policies.default import DefaultPolicy
from smtpguard.replies import Reply
from smtpguard.scanners.builtin import EICAR, EICAR_NAME, BuiltinScanner
from smtpguard.server import ESMTPServer, GuardFactory, Processor, ServerSettings
from smtpguard.testing import FixedScanner, MemoryNextHop

HOSTNAME = "mx.example.net"
CLIENT_NAME = "client.example.org"
SENDER = "alice@example.org"
RECIPIENT = "bob@example.com"
OTHER_RECIPIENT = "carol@example.com"
PEER = IPv4Address("TCP", "127.0.0.1", 12345)
HOST = IPv4Address("TCP", "127.0.0.1", 25)
# The Clock starts here, so that the Received: header carries a known date.
NOW = 1_700_000_000.0
NOW_RFC2822 = "Tue, 14 Nov 2023 22:13:20 +0000"
SCAN_TIMEOUT = 30.0
TLS_CONTEXT = object()  # stands for an IOpenSSLServerConnectionCreator

MESSAGE = b"From: <alice@example.org>\r\nTo: <bob@example.com>\r\nSubject: test\r\n\r\nHello Bob.\r\n"
EICAR_MESSAGE = b"Subject: eicar\r\n\r\n" + EICAR + b"\r\n"
QUEUED = MemoryNextHop().data_reply  # what the in-memory next hop answers to DATA
NEXT_HOP_REFUSES = Reply(554, "5.6.0", "Content refused by the next hop")
NEXT_HOP_DEFERS = Reply(451, "4.3.0", "Next hop is busy")
NO_SUCH_USER = Reply(550, "5.1.1", "No such user here")
SENDER_BLOCKED = Reply(550, "5.7.1", "Sender blocked here")
# Any line ending other than CRLF.
BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")


# -- helpers ----------------------------------------------------------------------------


class TLSRecordingTransport(StringTransport):
    """A StringTransport that records startTLS calls, and what had been written when
    each call came."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tls_started: list[tuple[Any, bytes]] = []

    def startTLS(self, contextFactory: Any) -> None:
        self.tls_started.append((contextFactory, self.value()))


def split_replies(output: bytes) -> list[bytes]:
    """Cut raw server output into whole replies (multi-line replies kept together)."""
    assert output == b"" or output.endswith(b"\r\n"), output
    found: list[bytes] = []
    current = b""
    for line in output.split(b"\r\n")[:-1]:
        assert re.match(rb"^\d{3}[ -]", line + b" "), line
        current += line + b"\r\n"
        if line[3:4] != b"-":
            found.append(current)
            current = b""
    assert current == b"", "unfinished multi-line reply"
    return found


class Session:
    """One client connection to a GuardFactory with an in-memory next hop, on a Clock."""

    def __init__(
        self,
        factory: GuardFactory,
        hop: MemoryNextHop,
        clock: Clock,
        scanner: IScanner,
        transport_class: type[StringTransport] = StringTransport,
    ) -> None:
        self.factory = factory
        self.hop = hop
        self.clock = clock
        self.scanner = scanner
        self.transport = transport_class(peerAddress=PEER, hostAddress=HOST)
        self.proto: ESMTPServer = factory.buildProtocol(PEER)  # type: ignore[assignment]
        self.proto.makeConnection(self.transport)

    @classmethod
    def open(
        cls,
        scanner: IScanner | None = None,
        transport_class: type[StringTransport] = StringTransport,
        process: Processor | None = None,
        **settings: Any,
    ) -> Session:
        """A new factory, next hop and clock, and one connection to them."""
        clock = Clock()
        clock.advance(NOW)
        hop = MemoryNextHop()
        scanner = scanner if scanner is not None else BuiltinScanner()
        if process is None:
            process = Pipeline(clock, scanner, DefaultPolicy(), scan_timeout=SCAN_TIMEOUT).process
        factory = GuardFactory(clock, hop, process, ServerSettings(**{"hostname": HOSTNAME, **settings}))
        return cls(factory, hop, clock, scanner, transport_class)

    def another(self) -> Session:
        """A further connection to the same factory."""
        return Session(self.factory, self.hop, self.clock, self.scanner)

    def send(self, *pieces: bytes) -> None:
        for piece in pieces:
            self.proto.dataReceived(piece)

    def send_bytewise(self, data: bytes) -> None:
        self.send(*(data[i : i + 1] for i in range(len(data))))

    def replies(self) -> list[bytes]:
        """The replies written since the last call."""
        output = self.transport.value()
        self.transport.clear()
        return split_replies(output)

    def hello(self) -> Session:
        """Consume the greeting and say EHLO."""
        self.replies()
        self.send(f"EHLO {CLIENT_NAME}\r\n".encode())
        assert self.replies()[0].startswith(b"250-")
        return self

    def begin(self, *recipients: str, sender: str = SENDER) -> None:
        """MAIL and RCPT, all accepted."""
        recipients = recipients or (RECIPIENT,)
        self.send(f"MAIL FROM:<{sender}>\r\n".encode())
        self.send(*(f"RCPT TO:<{recipient}>\r\n".encode() for recipient in recipients))
        assert self.replies() == [replies.SENDER_OK.to_bytes()] + [replies.RECIPIENT_OK.to_bytes()] * len(recipients)

    def lose(self) -> None:
        """The connection goes away (StringTransport never says so by itself)."""
        self.proto.connectionLost(Failure(ConnectionDone()))

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


def ready(**settings: Any) -> Session:
    """A session past the greeting and EHLO."""
    return Session.open(**settings).hello()


def release_next(hop: MemoryNextHop) -> None:
    """Fire the oldest held next-hop reply only."""
    waiting, reply = hop.held.pop(0)
    waiting.callback(reply)


def transaction(recipients: Iterable[str] = (RECIPIENT,), sender: str = SENDER, data: bytes = MESSAGE) -> bytes:
    """A whole transaction as a client pipelines it, data included."""
    lines = [f"MAIL FROM:<{sender}>\r\n".encode()]
    lines += [f"RCPT TO:<{recipient}>\r\n".encode() for recipient in recipients]
    return b"".join([*lines, b"DATA\r\n", data, b".\r\n"])


def transaction_replies(recipients: int = 1, final: Reply = QUEUED) -> list[bytes]:
    return [
        replies.SENDER_OK.to_bytes(),
        *[replies.RECIPIENT_OK.to_bytes()] * recipients,
        replies.START_DATA.to_bytes(),
        final.to_bytes(),
    ]


def trace_headers(
    transaction_id: str, protocol: str = "ESMTP", recipient: str = RECIPIENT, helo: str = CLIENT_NAME
) -> bytes:
    """What smtpguard puts in front of a clean message it relays."""
    return (
        f"Received: from {helo} ([127.0.0.1])\r\n"
        f"\tby {HOSTNAME} (smtpguard) with {protocol} id {transaction_id}\r\n"
        f"\tfor <{recipient}>; {NOW_RFC2822}\r\n"
        f"X-Virus-Scanned: smtpguard (builtin) on {HOSTNAME}\r\n"
        f"X-Virus-Status: clean\r\n"
    ).encode()


def transaction_id(delivered: bytes) -> str:
    match = re.search(rb" id ([0-9A-F]{12})\r\n", delivered)
    assert match is not None, delivered
    return match.group(1).decode()


def ehlo_keywords(reply: bytes) -> list[str]:
    """The extension lines of an EHLO reply, after checking its multi-line form."""
    lines = reply.split(b"\r\n")[:-1]
    assert all(line.startswith(b"250-") for line in lines[:-1]), reply
    assert lines[-1].startswith(b"250 "), reply
    assert lines[0][4:] == f"{HOSTNAME} Hello {CLIENT_NAME}".encode()
    return [line[4:].decode() for line in lines[1:]]


def esmtp_extensions(settings: ServerSettings = ServerSettings()) -> list[str]:
    return [
        "PIPELINING",
        f"SIZE {settings.max_message_size}",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "DSN",
        "CHUNKING",
        "BINARYMIME",
    ]


@pytest.fixture
def session() -> Session:
    return ready()


# -- greeting, EHLO, HELO -------------------------------------------------------------------


def test_greeting() -> None:
    """A new connection is greeted with 220 and the configured host name."""
    s = Session.open()
    assert s.replies() == [replies.SERVICE_READY.with_text(f"{HOSTNAME} ESMTP smtpguard").to_bytes()]


def test_ehlo_lists_extensions() -> None:
    """EHLO lists exactly PIPELINING, SIZE <max>, 8BITMIME, ENHANCEDSTATUSCODES, SMTPUTF8 and DSN."""
    s = Session.open(max_message_size=12345)
    s.replies()
    s.send(f"EHLO {CLIENT_NAME}\r\n".encode())
    [reply] = s.replies()
    assert sorted(ehlo_keywords(reply)) == sorted(esmtp_extensions(s.factory.settings))
    assert "SIZE 12345" in ehlo_keywords(reply)


def test_ehlo_offers_starttls_when_tls_configured() -> None:
    """With settings.tls set, EHLO lists STARTTLS in addition to the other extensions."""
    s = Session.open(tls=TLS_CONTEXT)
    s.replies()
    s.send(f"EHLO {CLIENT_NAME}\r\n".encode())
    [reply] = s.replies()
    assert sorted(ehlo_keywords(reply)) == sorted([*esmtp_extensions(), "STARTTLS"])


def test_helo() -> None:
    """HELO is answered with a single 250 line naming the client, without extensions."""
    s = Session.open()
    s.replies()
    s.send(f"HELO {CLIENT_NAME}\r\n".encode())
    assert s.replies() == [Reply(250, "", f"{HOSTNAME} Hello {CLIENT_NAME}").to_bytes()]
    s.send(transaction())
    assert s.replies() == transaction_replies()
    assert s.hop.delivered[0].envelope.client.helo == CLIENT_NAME
    assert s.hop.delivered[0].envelope.client.esmtp is False


@pytest.mark.parametrize("line", [b"EHLO\r\n", b"EHLO   \r\n", b"HELO\r\n"])
def test_hello_without_argument(line: bytes) -> None:
    """EHLO or HELO without a host name is refused with 501 5.5.4."""
    s = Session.open()
    s.replies()
    s.send(line)
    assert s.replies() == [replies.HELO_REQUIRED.to_bytes()]


def test_mail_before_ehlo() -> None:
    """MAIL before EHLO/HELO gets 503 5.5.1 and the next hop is not contacted."""
    s = Session.open()
    s.replies()
    s.send(f"MAIL FROM:<{SENDER}>\r\n".encode())
    assert s.replies() == [replies.NEED_HELO.to_bytes()]
    assert s.hop.commands == []


@pytest.mark.parametrize("line", [f"RCPT TO:<{RECIPIENT}>\r\n".encode(), b"DATA\r\n"])
def test_rcpt_and_data_before_ehlo(line: bytes) -> None:
    """RCPT or DATA before EHLO gets 503 5.5.1."""
    s = Session.open()
    s.replies()
    s.send(line)
    assert s.replies() == [replies.NEED_MAIL.to_bytes()]
    assert s.hop.commands == []


def test_ehlo_resets_transaction(session: Session) -> None:
    """A second EHLO abandons the open transaction, at the next hop too."""
    session.begin()
    session.send(f"EHLO {CLIENT_NAME}\r\n".encode(), b"DATA\r\n")
    ehlo, data = session.replies()
    assert ehlo.startswith(f"250-{HOSTNAME} Hello {CLIENT_NAME}\r\n".encode())
    assert data == replies.NEED_MAIL.to_bytes()
    assert session.hop.commands == [f"MAIL {SENDER}", f"RCPT {RECIPIENT}", "RSET"]


# -- simple commands -----------------------------------------------------------------------


def test_unknown_command(session: Session) -> None:
    """An unknown verb gets 500 5.5.1."""
    session.send(b"FROB nicate\r\n")
    assert session.replies() == [replies.UNKNOWN_COMMAND.to_bytes()]


def test_invalid_utf8_command(session: Session) -> None:
    """A command line that is not UTF-8 gets 500 5.5.2."""
    session.send(b"NOOP \xff\xfe\r\n")
    assert session.replies() == [replies.BAD_ENCODING.to_bytes()]


def test_noop(session: Session) -> None:
    """NOOP gets 250 2.0.0."""
    session.send(b"NOOP\r\n")
    assert session.replies() == [replies.OK.to_bytes()]


def test_rset_abandons_transaction(session: Session) -> None:
    """RSET gets 250 2.0.0, ends the transaction and resets the next hop."""
    session.begin()
    session.send(b"RSET\r\n", b"DATA\r\n")
    assert session.replies() == [replies.RESET_OK.to_bytes(), replies.NEED_MAIL.to_bytes()]
    assert session.hop.commands == [f"MAIL {SENDER}", f"RCPT {RECIPIENT}", "RSET"]


def test_vrfy(session: Session) -> None:
    """VRFY with an argument gets 252 2.5.0."""
    session.send(b"VRFY bob\r\n")
    assert session.replies() == [replies.CANNOT_VRFY.to_bytes()]


def test_help(session: Session) -> None:
    """HELP gets 214 2.0.0."""
    session.send(b"HELP\r\n")
    assert session.replies() == [replies.HELP.to_bytes()]


def test_expn(session: Session) -> None:
    """EXPN gets 502 5.5.1."""
    session.send(b"EXPN staff\r\n")
    assert session.replies() == [replies.NOT_IMPLEMENTED.to_bytes()]


def test_quit(session: Session) -> None:
    """QUIT gets 221 2.0.0 and the connection is closed; later bytes are ignored."""
    session.send(b"QUIT\r\nNOOP\r\n")
    assert session.replies() == [replies.CLOSING.to_bytes()]
    assert session.closed


def test_quit_closes_next_hop_session(session: Session) -> None:
    """When the client connection ends, the next hop session is closed (QUIT)."""
    session.begin()
    session.send(b"QUIT\r\n")
    session.lose()
    assert session.hop.commands == [f"MAIL {SENDER}", f"RCPT {RECIPIENT}", "QUIT"]
    assert session.hop.delivered == []


# -- MAIL and RCPT -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"MAIL\r\n", replies.SYNTAX_ERROR.with_text("Syntax: MAIL FROM:<address>")),
        (b"MAIL TO:<alice@example.org>\r\n", replies.SYNTAX_ERROR.with_text("Syntax: MAIL FROM:<address>")),
        (b"MAIL FROM:alice@example.org\r\n", replies.SYNTAX_ERROR.with_text("Syntax: MAIL FROM:<address>")),
        (b"MAIL FROM:<alice>\r\n", replies.BAD_SENDER_SYNTAX),
        (b"MAIL FROM:<alice@exa mple.org>\r\n", replies.BAD_SENDER_SYNTAX),
    ],
    ids=["no-argument", "to-instead-of-from", "no-brackets", "no-domain", "space-in-domain"],
)
def test_mail_syntax_error(session: Session, line: bytes, expected: Reply) -> None:
    """A malformed MAIL gets 501 (5.5.4 for the command, 5.1.7 for the address) and never reaches the next hop."""
    session.send(line)
    assert session.replies() == [expected.to_bytes()]
    assert session.hop.commands == []


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"RCPT\r\n", replies.SYNTAX_ERROR.with_text("Syntax: RCPT TO:<address>")),
        (b"RCPT FROM:<bob@example.com>\r\n", replies.SYNTAX_ERROR.with_text("Syntax: RCPT TO:<address>")),
        (b"RCPT TO:<bob>\r\n", replies.BAD_RECIPIENT_SYNTAX),
        (b"RCPT TO:<@example.com>\r\n", replies.BAD_RECIPIENT_SYNTAX),
    ],
    ids=["no-argument", "from-instead-of-to", "no-domain", "no-local-part"],
)
def test_rcpt_syntax_error(session: Session, line: bytes, expected: Reply) -> None:
    """A malformed RCPT gets 501 (5.5.4 for the command, 5.1.3 for the address) and never reaches the next hop."""
    session.send(f"MAIL FROM:<{SENDER}>\r\n".encode())
    session.replies()
    session.send(line)
    assert session.replies() == [expected.to_bytes()]
    assert session.hop.commands == [f"MAIL {SENDER}"]


def test_null_sender(session: Session) -> None:
    """MAIL FROM:<> (bounces) is accepted."""
    session.send(transaction(sender=""))
    assert session.replies() == transaction_replies()
    assert session.hop.delivered[0].envelope.sender == ""


def test_nested_mail(session: Session) -> None:
    """A second MAIL inside a transaction gets 503 5.5.1."""
    session.begin()
    session.send(b"MAIL FROM:<mallory@example.org>\r\n")
    assert session.replies() == [replies.NESTED_MAIL.to_bytes()]
    assert session.hop.commands == [f"MAIL {SENDER}", f"RCPT {RECIPIENT}"]


def test_rcpt_before_mail(session: Session) -> None:
    """RCPT before MAIL gets 503 5.5.1."""
    session.send(f"RCPT TO:<{RECIPIENT}>\r\n".encode())
    assert session.replies() == [replies.NEED_MAIL.to_bytes()]
    assert session.hop.commands == []


def test_data_without_mail(session: Session) -> None:
    """DATA before MAIL gets 503 5.5.1."""
    session.send(b"DATA\r\n")
    assert session.replies() == [replies.NEED_MAIL.to_bytes()]


def test_data_without_rcpt(session: Session) -> None:
    """DATA after MAIL but without an accepted recipient gets 554 5.5.1, and what follows is read as commands."""
    session.send(f"MAIL FROM:<{SENDER}>\r\n".encode(), b"DATA\r\n", b"NOOP\r\n")
    assert session.replies() == [
        replies.SENDER_OK.to_bytes(),
        replies.NO_VALID_RECIPIENTS.to_bytes(),
        replies.OK.to_bytes(),
    ]


def test_size_over_maximum_at_mail() -> None:
    """MAIL with SIZE above the maximum gets 552 5.3.4 and the next hop is not contacted."""
    s = ready(max_message_size=1000)
    s.send(f"MAIL FROM:<{SENDER}> SIZE=1001\r\n".encode())
    assert s.replies() == [replies.MESSAGE_TOO_BIG.to_bytes()]
    assert s.hop.commands == []


def test_size_at_maximum_accepted() -> None:
    """MAIL with SIZE equal to the maximum is accepted and the size reaches the next hop."""
    s = ready(max_message_size=1000)
    s.send(f"MAIL FROM:<{SENDER}> SIZE=1000\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode(), MESSAGE, b".\r\n")
    assert s.replies() == transaction_replies()
    assert s.hop.delivered[0].envelope.parameters.size == 1000


def test_body_8bitmime(session: Session) -> None:
    """BODY=8BITMIME is accepted, reaches the next hop, and 8-bit content is relayed unchanged."""
    body = "Subject: café\r\n\r\nGrüße\r\n".encode()
    session.send(f"MAIL FROM:<{SENDER}> BODY=8BITMIME\r\n".encode())
    session.send(transaction(data=body)[len(f"MAIL FROM:<{SENDER}>\r\n") :])
    assert session.replies() == transaction_replies()
    [delivery] = session.hop.delivered
    assert delivery.envelope.parameters.body is BodyType.EIGHT_BIT_MIME
    assert delivery.data.endswith(body)


def test_body_unsupported_type(session: Session) -> None:
    """An unknown BODY type gets 555 5.5.4."""
    session.send(f"MAIL FROM:<{SENDER}> BODY=UTF16\r\n".encode())
    assert session.replies() == [replies.UNKNOWN_PARAMETER.with_text("Unsupported BODY type").to_bytes()]
    assert session.hop.commands == []


def test_regression_utf8_addresses_accepted_with_smtputf8(session: Session) -> None:
    """With SMTPUTF8, UTF-8 sender and recipient addresses are accepted and reach the next hop as they are."""
    sender, recipient = "jöran@exämple.org", "δοκιμή@παράδειγμα.δοκιμή"
    session.send(f"MAIL FROM:<{sender}> SMTPUTF8\r\nRCPT TO:<{recipient}>\r\nDATA\r\n".encode(), MESSAGE, b".\r\n")
    assert session.replies() == transaction_replies()
    [delivery] = session.hop.delivered
    assert (delivery.envelope.sender, delivery.envelope.parameters.smtputf8) == (sender, True)
    assert [r.address for r in delivery.envelope.recipients] == [recipient]
    assert session.hop.commands == [f"MAIL {sender}", f"RCPT {recipient}", "DATA"]


def test_utf8_sender_without_smtputf8(session: Session) -> None:
    """A UTF-8 sender address without SMTPUTF8 gets 553 5.6.7."""
    session.send("MAIL FROM:<jöran@exämple.org>\r\n".encode())
    assert session.replies() == [replies.NON_ASCII_ADDRESS.to_bytes()]
    assert session.hop.commands == []


def test_utf8_recipient_without_smtputf8(session: Session) -> None:
    """A UTF-8 recipient address in a transaction without SMTPUTF8 gets 553 5.6.7."""
    session.send(f"MAIL FROM:<{SENDER}>\r\n".encode())
    session.replies()
    session.send("RCPT TO:<δοκιμή@παράδειγμα.δοκιμή>\r\n".encode())
    assert session.replies() == [replies.NON_ASCII_ADDRESS.to_bytes()]
    assert session.hop.commands == [f"MAIL {SENDER}"]


def test_regression_dsn_parameters_reach_next_hop(session: Session) -> None:
    """DSN's RET, ENVID (xtext-decoded), NOTIFY and ORCPT are parsed and are in the envelope the next hop gets."""
    session.send(
        f"MAIL FROM:<{SENDER}> RET=HDRS ENVID=QQ314159+2Bx\r\n".encode(),
        f"RCPT TO:<{RECIPIENT}> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+40example.com\r\n".encode(),
        f"RCPT TO:<{OTHER_RECIPIENT}> NOTIFY=NEVER\r\n".encode(),
        b"DATA\r\n",
        MESSAGE,
        b".\r\n",
    )
    assert session.replies() == transaction_replies(recipients=2)
    [delivery] = session.hop.delivered
    assert delivery.envelope.parameters.ret is Return.HEADERS
    assert delivery.envelope.parameters.envid == "QQ314159+x"
    first, second = delivery.envelope.recipients
    assert first.parameters.notify == frozenset({Notify.SUCCESS, Notify.FAILURE})
    assert first.parameters.orcpt == "rfc822;bob+40example.com"
    assert second.parameters.notify == frozenset()
    assert second.parameters.orcpt is None


def test_unknown_mail_parameter(session: Session) -> None:
    """An unknown MAIL parameter gets 555 5.5.4 and never reaches the next hop."""
    session.send(f"MAIL FROM:<{SENDER}> FROB=1\r\n".encode())
    assert session.replies() == [replies.UNKNOWN_PARAMETER.with_text("Unsupported parameter FROB").to_bytes()]
    assert session.hop.commands == []


def test_unknown_rcpt_parameter(session: Session) -> None:
    """An unknown RCPT parameter gets 555 5.5.4 and never reaches the next hop."""
    session.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}> FROB\r\n".encode())
    assert session.replies() == [
        replies.SENDER_OK.to_bytes(),
        replies.UNKNOWN_PARAMETER.with_text("Unsupported parameter FROB").to_bytes(),
    ]
    assert session.hop.commands == [f"MAIL {SENDER}"]


def test_duplicate_parameter(session: Session) -> None:
    """A parameter given twice gets 501 5.5.4."""
    session.send(f"MAIL FROM:<{SENDER}> SIZE=10 SIZE=20\r\n".encode())
    assert session.replies() == [replies.SYNTAX_ERROR.to_bytes()]
    assert session.hop.commands == []


def test_regression_next_hop_refusal_of_mail_reaches_client(session: Session) -> None:
    """The next hop's own refusal of MAIL is what the client hears, and no transaction is open afterwards."""
    session.hop.mail_reply = lambda envelope: SENDER_BLOCKED
    session.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\n".encode())
    assert session.replies() == [SENDER_BLOCKED.to_bytes(), replies.NEED_MAIL.to_bytes()]


def test_regression_next_hop_refusal_of_rcpt_reaches_client(session: Session) -> None:
    """The next hop's own refusal of RCPT is what the client hears; the refused recipient gets no mail."""
    session.hop.rcpt_reply = lambda recipient: (
        NO_SUCH_USER if recipient.address == OTHER_RECIPIENT else replies.RECIPIENT_OK
    )
    session.send(transaction(recipients=[OTHER_RECIPIENT, RECIPIENT]))
    assert session.replies() == [
        replies.SENDER_OK.to_bytes(),
        NO_SUCH_USER.to_bytes(),
        replies.RECIPIENT_OK.to_bytes(),
        replies.START_DATA.to_bytes(),
        QUEUED.to_bytes(),
    ]
    assert [r.address for r in session.hop.delivered[0].envelope.recipients] == [RECIPIENT]


def test_data_after_all_recipients_refused(session: Session) -> None:
    """When the next hop refused every recipient, DATA gets 554 5.5.1."""
    session.hop.rcpt_reply = lambda recipient: NO_SUCH_USER
    session.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode())
    assert session.replies() == [
        replies.SENDER_OK.to_bytes(),
        NO_SUCH_USER.to_bytes(),
        replies.NO_VALID_RECIPIENTS.to_bytes(),
    ]


# -- limits ----------------------------------------------------------------------------------


def test_regression_recipient_limit() -> None:
    """RCPT beyond max_recipients gets 452 4.5.3; the message goes to the accepted recipients only."""
    s = ready(max_recipients=2)
    s.send(transaction(recipients=[RECIPIENT, OTHER_RECIPIENT, "dave@example.com"]))
    assert s.replies() == [
        replies.SENDER_OK.to_bytes(),
        replies.RECIPIENT_OK.to_bytes(),
        replies.RECIPIENT_OK.to_bytes(),
        replies.TOO_MANY_RECIPIENTS.to_bytes(),
        replies.START_DATA.to_bytes(),
        QUEUED.to_bytes(),
    ]
    assert s.hop.commands == [f"MAIL {SENDER}", f"RCPT {RECIPIENT}", f"RCPT {OTHER_RECIPIENT}", "DATA"]


def test_max_connections() -> None:
    """A connection beyond max_connections gets 421 4.7.0 and is closed; it reads no commands."""
    first = Session.open(max_connections=1)
    second = first.another()
    assert second.replies() == [replies.TOO_MANY_CONNECTIONS.to_bytes()]
    assert second.closed
    second.send(f"EHLO {CLIENT_NAME}\r\n".encode())
    assert second.replies() == []
    assert not first.closed


def test_connection_slot_freed_on_disconnect() -> None:
    """Once a connection ends, a new one under max_connections is served again."""
    first = Session.open(max_connections=1)
    first.lose()
    third = first.another()
    assert third.replies() == [replies.SERVICE_READY.with_text(f"{HOSTNAME} ESMTP smtpguard").to_bytes()]
    assert not third.closed


def test_message_over_maximum_size_refused() -> None:
    """A message that turns out larger than the maximum gets 552 5.3.4 after the final dot and is not delivered."""
    s = ready(max_message_size=1000)
    s.begin()
    s.send(b"DATA\r\n", b"Subject: big\r\n\r\n", b"x" * 78 + b"\r\n", *[b"y" * 78 + b"\r\n"] * 20, b".\r\n")
    assert s.replies() == [replies.START_DATA.to_bytes(), replies.MESSAGE_TOO_BIG.to_bytes()]
    assert s.hop.delivered == []
    assert s.hop.commands == [f"MAIL {SENDER}", f"RCPT {RECIPIENT}", "RSET"]


def test_regression_session_usable_after_oversized_message() -> None:
    """After a 552 for an oversized message, the next transaction on the same session is delivered."""
    s = ready(max_message_size=1000)
    s.send(transaction(data=b"Subject: big\r\n\r\n" + b"z" * 2000 + b"\r\n"))
    assert s.replies() == transaction_replies(final=replies.MESSAGE_TOO_BIG)
    s.send(transaction())
    assert s.replies() == transaction_replies()
    [delivery] = s.hop.delivered
    assert delivery.data.endswith(MESSAGE)


def test_command_line_of_maximum_length_accepted() -> None:
    """A command line of exactly max_line_length characters (CRLF not counted) is executed."""
    s = ready(max_line_length=100)
    s.send(b"NOOP " + b"A" * 95 + b"\r\n")
    assert s.replies() == [replies.OK.to_bytes()]


def test_command_line_of_maximum_length_split_before_lf_accepted() -> None:
    """A command line of exactly max_line_length characters is executed even when its LF comes in a later packet."""
    s = ready(max_line_length=100)
    s.send(b"NOOP " + b"A" * 95 + b"\r", b"\n")
    assert s.replies() == [replies.OK.to_bytes()]


def test_command_line_over_maximum_length_refused() -> None:
    """A command line one character longer than max_line_length gets 500 5.5.2."""
    s = ready(max_line_length=100)
    s.send(b"NOOP " + b"A" * 96 + b"\r\n")
    assert s.replies() == [replies.LINE_TOO_LONG.to_bytes()]


def test_command_line_over_maximum_length_with_bare_lf_refused() -> None:
    """A command line one character longer than max_line_length gets 500 5.5.2 when it ends in a bare LF too."""
    s = ready(max_line_length=100)
    s.send(b"NOOP " + b"A" * 96 + b"\n")
    assert s.replies() == [replies.LINE_TOO_LONG.to_bytes()]


LONG_LINE = b"NOOP " + b"A" * 5000 + b" RSET\r\nNOOP\r\n"


@pytest.mark.parametrize(
    "pieces",
    [
        [LONG_LINE],
        [LONG_LINE[i : i + 512] for i in range(0, len(LONG_LINE), 512)],
        [LONG_LINE[:5005], LONG_LINE[5005:5006], b"RSET\r\n", b"NOOP\r\n"],
    ],
    ids=["one-packet", "512-byte-packets", "split-before-rset"],
)
def test_regression_long_command_line_rest_not_executed(pieces: list[bytes]) -> None:
    """A command line over max_line_length gets one 500 5.5.2; no part of it is executed, and the next command is."""
    s = ready()
    s.begin()
    s.send(*pieces)
    assert s.replies() == [replies.LINE_TOO_LONG.to_bytes(), replies.OK.to_bytes()]
    assert s.hop.commands == [f"MAIL {SENDER}", f"RCPT {RECIPIENT}"]
    s.send(b"DATA\r\n", MESSAGE, b".\r\n")
    assert s.replies() == [replies.START_DATA.to_bytes(), QUEUED.to_bytes()]


def test_regression_endless_command_line_buffer_bounded(session: Session) -> None:
    """Megabytes without LF in command mode do not grow the buffer; the eventual LF gets one 500 5.5.2."""
    limit = session.factory.settings.max_line_length
    piece = b"A" * 65536
    for _ in range(64):
        session.send(piece)
        assert len(session.proto._buffer) <= limit + len(piece)
    session.send(b"\r\nNOOP\r\n")
    assert session.replies() == [replies.LINE_TOO_LONG.to_bytes(), replies.OK.to_bytes()]


def test_regression_endless_body_line_bounded() -> None:
    """Megabytes without LF in DATA are neither buffered nor stored beyond the limits, and end in 552 5.3.4."""
    s = ready(max_message_size=1_000_000)
    s.begin()
    s.send(b"DATA\r\n")
    piece = b"B" * 65536
    for _ in range(64):
        s.send(piece)
        assert len(s.proto._buffer) == 0
        assert s.proto._reader is not None and len(s.proto._reader._pending) <= 2 * len(piece)
    s.send(b"\r\n.\r\n")
    assert s.replies() == [replies.START_DATA.to_bytes(), replies.MESSAGE_TOO_BIG.to_bytes()]
    assert s.hop.delivered == []


def test_regression_long_body_line_is_data(session: Session) -> None:
    """A body line far longer than max_line_length is message data, relayed whole, never commands."""
    line = b"C" * 100_000 + b"RSET"
    session.send(transaction(data=b"Subject: long\r\n\r\n" + line + b"\r\nQUIT\r\n"))
    assert session.replies() == transaction_replies()
    assert session.hop.delivered[0].data.endswith(b"\r\n\r\n" + line + b"\r\nQUIT\r\n")
    assert not session.closed


class CountingBuffer(InputBuffer):
    """An InputBuffer that counts the bytes it copies: each one received, each one
    handed out, and what is left each time the read part is dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.copied = 0

    def append(self, data: bytes) -> None:
        self.copied += len(data)
        super().append(data)

    def _drop_read(self) -> None:
        self.copied += len(self)
        super()._drop_read()

    def _take(self, end: int) -> bytes:
        taken = super()._take(end)
        self.copied += len(taken)
        return taken


MAIL_WAITING = (f"MAIL FROM:<{SENDER}>\r\n".encode(), [replies.SENDER_OK.to_bytes()])
BDAT_TRANSACTION = transaction().split(b"DATA\r\n")[0] + f"BDAT {len(MESSAGE)} LAST\r\n".encode() + MESSAGE
# unit -> (what comes first, and its replies; one unit of the backlog, and its replies)
BACKLOGS = {
    "NOOP": (MAIL_WAITING, (b"NOOP\r\n", [replies.OK.to_bytes()])),
    "DATA": ((b"", []), (transaction(), transaction_replies())),
    "BDAT": ((b"", []), (BDAT_TRANSACTION, transaction_replies()[:2] + transaction_replies()[3:])),
}


@pytest.mark.parametrize(("unit", "count"), [("NOOP", 10_000), ("DATA", 100), ("BDAT", 100)])
def test_pipelined_backlog_is_worked_through_in_linear_time(unit: str, count: int) -> None:
    """A backlog pipelined behind a MAIL that waits for the next hop (NOOPs, or
    whole transactions with DATA or BDAT, each waiting for the next hop in turn)
    is answered in order, copying each received byte at most three times: five
    times the backlog, five times the bytes copied (slicing off the rest of the
    buffer per command made it 25 times)."""
    (lead, lead_replies), (wire, heard) = BACKLOGS[unit]

    def copied(units: int) -> int:
        s = ready()
        s.proto._buffer = counting = CountingBuffer()
        s.hop.hold = True
        s.send(lead + wire * units)
        s.hop.release()
        assert s.replies() == lead_replies + heard * units
        assert counting.copied <= 3 * len(lead + wire * units)
        return counting.copied

    small, large = copied(count), copied(5 * count)
    assert 4.9 < large / small < 5.1


def test_input_paused_while_busy_with_large_backlog(session: Session) -> None:
    """While a command waits for the next hop, a large pipelined backlog pauses reading, and reading resumes after."""
    session.hop.hold = True
    session.send(f"MAIL FROM:<{SENDER}>\r\n".encode(), b"NOOP\r\n" * 50_000)
    assert session.transport.producerState == "paused"
    session.hop.release()
    assert session.replies() == [replies.SENDER_OK.to_bytes()] + [replies.OK.to_bytes()] * 50_000
    assert session.transport.producerState == "producing"


# -- pipelining -----------------------------------------------------------------------------


def test_pipelined_group_answered_in_order_after_next_hop(session: Session) -> None:
    """MAIL, RCPT, RCPT, DATA in one packet are answered only as the next hop answers, and in order."""
    session.hop.hold = True
    session.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nRCPT TO:<{OTHER_RECIPIENT}>\r\nDATA\r\n".encode())
    assert session.replies() == []
    assert session.hop.commands == [f"MAIL {SENDER}"]
    release_next(session.hop)
    assert session.replies() == [replies.SENDER_OK.to_bytes()]
    assert session.hop.commands == [f"MAIL {SENDER}", f"RCPT {RECIPIENT}"]
    release_next(session.hop)
    assert session.replies() == [replies.RECIPIENT_OK.to_bytes()]
    release_next(session.hop)
    assert session.replies() == [replies.RECIPIENT_OK.to_bytes(), replies.START_DATA.to_bytes()]


def test_regression_pipelined_body_not_parsed_as_commands(session: Session) -> None:
    """Body lines pipelined after DATA while RCPTs are pending are message data, not commands."""
    session.hop.hold = True
    body = b"RSET\r\nMAIL FROM:<mallory@example.org>\r\nQUIT\r\n"
    session.send(transaction(recipients=[RECIPIENT, OTHER_RECIPIENT], data=body))
    session.hop.release()
    assert session.replies() == transaction_replies(recipients=2)
    assert session.hop.commands == [f"MAIL {SENDER}", f"RCPT {RECIPIENT}", f"RCPT {OTHER_RECIPIENT}", "DATA"]
    assert session.hop.delivered[0].data.endswith(b"\r\n" + body)
    assert not session.closed


def test_regression_pipelined_rcpt_while_previous_pending(session: Session) -> None:
    """A RCPT pipelined while the previous RCPT waits for the next hop is not refused with 503."""
    session.hop.hold = True
    session.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nRCPT TO:<{OTHER_RECIPIENT}>\r\n".encode())
    session.hop.release()
    assert session.replies() == [
        replies.SENDER_OK.to_bytes(),
        replies.RECIPIENT_OK.to_bytes(),
        replies.RECIPIENT_OK.to_bytes(),
    ]


def test_regression_dot_quit_answered_in_order(session: Session) -> None:
    """A whole transaction plus ".\\r\\nQUIT\\r\\n" in one packet gets 250 for the message before 221."""
    session.hop.hold = True
    session.send(transaction() + b"QUIT\r\n")
    assert session.replies() == []
    assert not session.closed
    session.hop.release()
    assert session.replies() == [*transaction_replies(), replies.CLOSING.to_bytes()]
    assert session.closed
    assert len(session.hop.delivered) == 1


def test_pipelined_replies_never_out_of_order(session: Session) -> None:
    """Released one at a time, held next-hop replies come out one at a time, each after the previous command's."""
    session.hop.hold = True
    session.send(transaction() + b"NOOP\r\n" + transaction(recipients=[OTHER_RECIPIENT]) + b"QUIT\r\n")
    expected = [*transaction_replies(), replies.OK.to_bytes(), *transaction_replies(), replies.CLOSING.to_bytes()]
    heard: list[bytes] = []
    while session.hop.held:
        release_next(session.hop)
        heard += session.replies()
        assert heard == expected[: len(heard)]
    assert heard == expected
    assert [d.envelope.recipients[0].address for d in session.hop.delivered] == [RECIPIENT, OTHER_RECIPIENT]


# -- end of data ------------------------------------------------------------------------------


def test_delivered_bytes(session: Session) -> None:
    """The next hop gets the trace headers (Received, X-Virus-Scanned, X-Virus-Status), then the message, unstuffed."""
    stuffed = MESSAGE + b"..leading dot\r\n...two dots\r\n..\r\nend\r\n"  # "..": a line "." in the message
    session.send(transaction(data=stuffed))
    assert session.replies() == transaction_replies()
    [delivery] = session.hop.delivered
    unstuffed = MESSAGE + b".leading dot\r\n..two dots\r\n.\r\nend\r\n"
    assert delivery.data == trace_headers(transaction_id(delivery.data)) + unstuffed
    assert session.hop.commands == [f"MAIL {SENDER}", f"RCPT {RECIPIENT}", "DATA"]


def test_dot_stuffed_first_line(session: Session) -> None:
    """A stuffed dot on the very first line of the message is removed too."""
    session.send(transaction(data=b"..first\r\nsecond\r\n"))
    assert session.replies() == transaction_replies()
    assert session.hop.delivered[0].data.endswith(b"X-Virus-Status: clean\r\n.first\r\nsecond\r\n")


def test_received_header_names_one_id_per_transaction(session: Session) -> None:
    """Each transaction gets its own transaction id in its Received header."""
    session.send(transaction(), transaction())
    first, second = session.hop.delivered
    assert transaction_id(first.data) != transaction_id(second.data)


def test_regression_eicar_rejected(session: Session) -> None:
    """A message carrying EICAR gets 554 5.7.1 naming the threat; nothing is delivered and the next hop is reset."""
    session.send(transaction(data=EICAR_MESSAGE))
    virus_found = replies.VIRUS_REJECTED.with_text(f"Message rejected: virus found ({EICAR_NAME})")
    assert session.replies() == transaction_replies(final=virus_found)
    assert session.hop.delivered == []
    assert session.hop.commands == [f"MAIL {SENDER}", f"RCPT {RECIPIENT}", "RSET"]


def test_scanner_that_never_answers_defers() -> None:
    """A scanner that does not answer within the scan deadline leads to 451 4.7.1 and nothing delivered."""
    s = ready(scanner=FixedScanner(None))
    s.send(transaction())
    assert s.replies() == transaction_replies()[:-1]
    s.clock.advance(SCAN_TIMEOUT - 0.1)
    assert s.replies() == []
    s.clock.advance(0.1)
    assert s.replies() == [replies.SCAN_DEFERRED.to_bytes()]
    assert s.hop.delivered == []
    assert s.hop.commands == [f"MAIL {SENDER}", f"RCPT {RECIPIENT}", "RSET"]
    assert not s.closed


@pytest.mark.parametrize("refusal", [NEXT_HOP_REFUSES, NEXT_HOP_DEFERS], ids=["554", "451"])
def test_regression_next_hop_refusal_of_data_reaches_client(session: Session, refusal: Reply) -> None:
    """When the next hop refuses the message, the client hears the next hop's reply, code and text."""
    session.hop.data_reply = refusal
    session.send(transaction())
    assert session.replies() == transaction_replies(final=refusal)
    assert session.hop.delivered == []
    assert session.hop.commands == [f"MAIL {SENDER}", f"RCPT {RECIPIENT}", "DATA"]


def test_250_only_after_next_hop_accepted(session: Session) -> None:
    """The client's 250 for the message is written only once the next hop has said 250."""
    session.hop.hold = True
    session.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\n".encode())
    session.hop.release()
    session.replies()
    session.send(b"DATA\r\n", MESSAGE, b".\r\n")
    assert session.replies() == [replies.START_DATA.to_bytes()]
    assert session.hop.commands[-1] == "DATA"
    assert len(session.hop.held) == 1
    session.hop.release()
    assert session.replies() == [QUEUED.to_bytes()]


def test_processing_failure_defers() -> None:
    """An unexpected failure while processing a message gets 451 4.3.0, and the session goes on."""

    def broken(*args: Any) -> defer.Deferred[Reply]:
        return defer.fail(RuntimeError("processing exploded"))

    s = ready(process=broken)
    s.send(transaction(), b"NOOP\r\n")
    assert s.replies() == [*transaction_replies(final=replies.LOCAL_ERROR), replies.OK.to_bytes()]
    assert s.hop.delivered == []
    assert not s.closed


def test_disconnect_during_data_delivers_nothing(session: Session) -> None:
    """A client that disconnects in the middle of DATA has nothing delivered, and the next hop session is closed."""
    session.begin()
    session.send(b"DATA\r\n", MESSAGE)
    session.lose()
    assert session.hop.delivered == []
    assert session.hop.commands == [f"MAIL {SENDER}", f"RCPT {RECIPIENT}", "QUIT"]


def test_next_hop_session_reused_across_transactions(session: Session) -> None:
    """Several transactions in one client session use one next-hop session."""
    session.send(transaction(), transaction(recipients=[OTHER_RECIPIENT]))
    assert session.replies() == transaction_replies() * 2
    assert len(session.hop.sessions) == 1
    assert len(session.hop.delivered) == 2


# -- SMTP smuggling ---------------------------------------------------------------------------

SMUGGLED = b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@x>\r\nDATA\r\nSubject: smuggled\r\n"


@pytest.mark.parametrize(
    ("ending", "stored"),
    [
        (b"\n.\n", b"\r\n.\r\n"),
        (b"\r.\r", b"\r\n.\r\n"),
        (b"\n.\r\n", b"\r\n.\r\n"),
        (b"\r\n.\n", b"\r\n\r\n"),  # the line starts with a dot after CRLF: unstuffed
        (b"\r.\r\n", b"\r\n.\r\n"),
    ],
    ids=["LF.LF", "CR.CR", "LF.CRLF", "CRLF.LF", "CR.CRLF"],
)
@pytest.mark.parametrize("delivery", ["one-packet", "bytewise"])
def test_regression_smtp_smuggling(session: Session, ending: bytes, stored: bytes, delivery: str) -> None:
    """A fake end of data with bare CR/LF ends nothing: one message, CRLF only, the smuggled commands are data."""
    data = b"Subject: smuggling\r\n\r\nfirst" + ending + SMUGGLED + b"last\r\n"
    wire = transaction(data=data)
    if delivery == "bytewise":
        session.send_bytewise(wire)
    else:
        session.send(wire)
    assert session.replies() == transaction_replies()
    [message] = session.hop.delivered
    assert message.data.endswith(b"Subject: smuggling\r\n\r\nfirst" + stored + SMUGGLED + b"last\r\n")
    assert BARE_CR_OR_LF.search(message.data) is None
    assert session.hop.commands == [f"MAIL {SENDER}", f"RCPT {RECIPIENT}", "DATA"]


@pytest.mark.parametrize("cut", range(6))
@pytest.mark.parametrize("body", [b"Subject: split\r\n\r\nbody\r\n", b""], ids=["message", "empty"])
def test_end_of_data_split_between_reads(session: Session, body: bytes, cut: int) -> None:
    """However the end of data is split between two reads, with commands pipelined
    behind it in the second: the message ends there, whole, and each command after
    it is answered once."""
    first = transaction(data=body)
    wire = first + b"NOOP\r\n" + transaction()
    at = len(first) - 5 + cut
    session.send(wire[:at], wire[at:])
    assert session.replies() == [*transaction_replies(), replies.OK.to_bytes(), *transaction_replies()]
    split, after = session.hop.delivered
    assert split.data == trace_headers(transaction_id(split.data)) + body
    assert after.data == trace_headers(transaction_id(after.data)) + MESSAGE


def test_bare_line_endings_normalised(session: Session) -> None:
    """Bare CR and bare LF inside a message reach the next hop as CRLF."""
    session.send(transaction(data=b"Subject: x\r\n\r\none\ntwo\rthree\r\n"))
    assert session.hop.delivered[0].data.endswith(b"\r\n\r\none\r\ntwo\r\nthree\r\n")


# -- timeouts ---------------------------------------------------------------------------------


def test_idle_command_timeout(session: Session) -> None:
    """A client silent for command_timeout gets 421 4.4.2 and is disconnected."""
    timeout = session.factory.settings.command_timeout
    session.clock.advance(timeout - 1)
    assert session.replies() == []
    session.send(b"NOOP\r\n")
    session.clock.advance(timeout - 1)
    assert session.replies() == [replies.OK.to_bytes()]
    assert not session.closed
    session.clock.advance(1)
    assert session.replies() == [replies.TIMEOUT.to_bytes()]
    assert session.closed


def test_regression_data_timeout() -> None:
    """During DATA, data_timeout applies to each block; when it passes, 421 4.4.2, close, and nothing is delivered."""
    s = ready(data_timeout=60.0, command_timeout=300.0)
    s.begin()
    s.send(b"DATA\r\n", b"Subject: slow\r\n")
    s.clock.advance(59)
    s.send(b"\r\nstill coming\r\n")
    s.clock.advance(59)
    assert s.replies() == [replies.START_DATA.to_bytes()]
    s.clock.advance(1)
    assert s.replies() == [replies.TIMEOUT.to_bytes()]
    assert s.closed
    s.lose()
    assert s.hop.delivered == []
    assert s.hop.commands == [f"MAIL {SENDER}", f"RCPT {RECIPIENT}", "QUIT"]


def test_regression_idle_timer_paused_while_processing(session: Session) -> None:
    """While the message is with a next hop that has not answered, no idle or data timeout cuts the session."""
    settings = session.factory.settings
    session.hop.hold = True
    session.send(transaction())
    while "DATA" not in session.hop.commands:  # answer MAIL and RCPT; hold the message
        release_next(session.hop)
    session.replies()
    session.clock.advance(settings.command_timeout + settings.data_timeout + 1)
    assert session.replies() == []
    assert not session.closed
    session.hop.release()
    assert session.replies() == [QUEUED.to_bytes()]
    assert not session.closed


def test_idle_timer_restarts_after_processing(session: Session) -> None:
    """After the end-of-data reply, the command timeout counts again from that reply."""
    timeout = session.factory.settings.command_timeout
    session.hop.hold = True
    session.send(transaction())
    session.clock.advance(timeout * 0.9)
    session.hop.release()
    session.replies()
    session.clock.advance(timeout - 1)
    assert session.replies() == []
    session.clock.advance(1)
    assert session.replies() == [replies.TIMEOUT.to_bytes()]


def test_regression_session_deadline_despite_activity() -> None:
    """A session that stays busy with commands is still cut at session_timeout with 421 4.4.2."""
    s = ready(session_timeout=1000.0, command_timeout=300.0)
    for _ in range(3):
        s.clock.advance(250)
        s.send(b"NOOP\r\n")
    assert s.replies() == [replies.OK.to_bytes()] * 3
    s.clock.advance(249)
    assert not s.closed
    s.clock.advance(1)
    assert s.replies() == [replies.SESSION_TOO_LONG.to_bytes()]
    assert s.closed


def test_session_deadline_while_processing_waits_for_outcome() -> None:
    """When the session deadline passes while the next hop holds the message, the
    client hears the outcome first, then 421 4.4.2, then the connection closes."""
    s = ready(session_timeout=1000.0)
    s.hop.hold = True
    s.send(transaction())
    while "DATA" not in s.hop.commands:  # answer MAIL and RCPT; hold the message
        release_next(s.hop)
    s.replies()
    s.clock.advance(1000)
    assert s.replies() == []
    assert not s.closed
    s.hop.release()
    assert s.replies() == [QUEUED.to_bytes(), replies.SESSION_TOO_LONG.to_bytes()]
    assert s.closed


def test_nothing_written_after_quit(session: Session) -> None:
    """After 221, no timer writes anything more, even if the connection is slow to go away."""
    session.send(b"QUIT\r\n")
    session.clock.advance(session.factory.settings.session_timeout + 1)
    assert session.replies() == [replies.CLOSING.to_bytes()]


def test_nothing_written_after_timeout(session: Session) -> None:
    """After the 421 of the idle timeout, the session deadline writes no second 421."""
    session.clock.advance(session.factory.settings.session_timeout + 1)
    assert session.replies() == [replies.TIMEOUT.to_bytes()]


def test_timers_cancelled_on_disconnect(session: Session) -> None:
    """After the connection is lost, no timer is left on the clock."""
    session.lose()
    assert [call for call in session.clock.getDelayedCalls() if call.active()] == []


# -- BDAT -------------------------------------------------------------------------------------

# -- STARTTLS ---------------------------------------------------------------------------------


def tls_session(**settings: Any) -> Session:
    s = Session.open(transport_class=TLSRecordingTransport, tls=TLS_CONTEXT, **settings)
    return s.hello()


def test_starttls_not_offered_without_tls(session: Session) -> None:
    """STARTTLS without TLS configured gets 502 5.5.1."""
    session.send(b"STARTTLS\r\n")
    assert session.replies() == [replies.NOT_IMPLEMENTED.to_bytes()]


def test_starttls_starts_tls_after_220() -> None:
    """STARTTLS gets 220 2.0.0, and TLS starts with the configured context after that reply is written."""
    s = tls_session()
    s.send(b"STARTTLS\r\n")
    assert s.replies() == [replies.READY_FOR_TLS.to_bytes()]
    transport = s.transport
    assert isinstance(transport, TLSRecordingTransport)
    assert transport.tls_started == [(TLS_CONTEXT, replies.READY_FOR_TLS.to_bytes())]


def test_regression_starttls_discards_pipelined_commands() -> None:
    """Commands pipelined after STARTTLS in the same packet are discarded, not executed after the handshake."""
    s = tls_session()
    s.send(f"STARTTLS\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nNOOP\r\n".encode())
    assert s.replies() == [replies.READY_FOR_TLS.to_bytes()]
    assert s.hop.commands == []


def test_regression_starttls_resets_session_state() -> None:
    """After STARTTLS, HELO and the transaction are forgotten (RFC 3207 4.2) and the next hop session is closed."""
    s = tls_session()
    s.send(f"MAIL FROM:<{SENDER}>\r\n".encode())
    s.replies()
    s.send(b"STARTTLS\r\n")
    s.send(f"RCPT TO:<{RECIPIENT}>\r\nMAIL FROM:<{SENDER}>\r\n".encode())
    assert s.replies() == [replies.READY_FOR_TLS.to_bytes(), replies.NEED_MAIL.to_bytes(), replies.NEED_HELO.to_bytes()]
    assert s.hop.commands == [f"MAIL {SENDER}", "QUIT"]


def test_ehlo_after_starttls_omits_starttls() -> None:
    """After STARTTLS, EHLO no longer offers STARTTLS, and a second STARTTLS gets 503 5.5.1."""
    s = tls_session()
    s.send(b"STARTTLS\r\n")
    s.replies()
    s.send(f"EHLO {CLIENT_NAME}\r\n".encode())
    [reply] = s.replies()
    assert sorted(ehlo_keywords(reply)) == sorted(esmtp_extensions())
    s.send(b"STARTTLS\r\n")
    assert s.replies() == [replies.TLS_ALREADY_ACTIVE.to_bytes()]


def test_received_header_says_esmtps_after_starttls() -> None:
    """A message received after STARTTLS is traced "with ESMTPS"."""
    s = tls_session()
    s.send(b"STARTTLS\r\n")
    s.hello()
    s.send(transaction())
    assert s.replies() == transaction_replies()
    [delivery] = s.hop.delivered
    assert delivery.data == trace_headers(transaction_id(delivery.data), protocol="ESMTPS") + MESSAGE


def test_require_tls_refuses_mail_before_starttls() -> None:
    """With require_tls, MAIL before STARTTLS gets 530 5.7.0; after STARTTLS and EHLO it is accepted."""
    s = tls_session(require_tls=True)
    s.send(f"MAIL FROM:<{SENDER}>\r\n".encode())
    assert s.replies() == [replies.TLS_REQUIRED.to_bytes()]
    s.send(b"STARTTLS\r\n")
    s.hello()
    s.send(f"MAIL FROM:<{SENDER}>\r\n".encode())
    assert s.replies() == [replies.SENDER_OK.to_bytes()]


def test_regression_ehlo_offers_no_auth() -> None:
    """EHLO never offers AUTH, before or after TLS (smtpguard relays, it does not authenticate)."""
    s = tls_session()
    s.send(f"EHLO {CLIENT_NAME}\r\n".encode())
    before = ehlo_keywords(s.replies()[0])
    s.send(b"STARTTLS\r\n")
    s.hello()
    s.send(f"EHLO {CLIENT_NAME}\r\n".encode())
    after = ehlo_keywords(s.replies()[0])
    assert not [keyword for keyword in before + after if keyword.upper().startswith("AUTH")]


def test_regression_ehlo_advertises_esmtp_extensions() -> None:
    """EHLO advertises SIZE, PIPELINING, 8BITMIME, DSN, SMTPUTF8 and ENHANCEDSTATUSCODES, which twisted.mail lacks."""
    s = Session.open()
    s.replies()
    s.send(f"EHLO {CLIENT_NAME}\r\n".encode())
    keywords = {keyword.split()[0] for keyword in ehlo_keywords(s.replies()[0])}
    assert {"SIZE", "PIPELINING", "8BITMIME", "DSN", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING"} <= keywords
