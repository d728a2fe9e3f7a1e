"""The ESMTP client protocol (smtpclient) and the next-hop session built on it (upstream),
driven over StringTransport with a Clock: no network, no real time."""

from __future__ import annotations

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smtpguard import replies
from smtpguard.envelope import (
    BodyType,
    Client,
    Envelope,
    MailParameters,
    Notify,
    Recipient,
    RecipientParameters,
    Return,
)
from smtpguard.interfaces import IRelaySession
from smtpguard.replies import Reply
from smtpguard.smtpclient import MAX_REPLY_LINE, ProtocolViolation, SMTPClientProtocol, parse_extensions
from smtpguard.spool import Spool
from smtpguard.upstream import KeptConnections, UpstreamSession, UpstreamSettings, UpstreamTLS
from smtpguard.wire import dot_stuff

# -- helpers --------------------------------------------------------------------------


def result_of(deferred: Deferred):
    """The result of a Deferred that has fired successfully."""
    box: list = []
    deferred.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def failure_of(deferred: Deferred) -> Failure:
    """The Failure of a Deferred that has failed."""
    box: list = []
    deferred.addBoth(box.append)
    assert box, "the Deferred has not fired"
    assert isinstance(box[0], Failure), box[0]
    return box[0]


def connected() -> tuple[SMTPClientProtocol, StringTransport]:
    protocol = SMTPClientProtocol()
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def greeted() -> tuple[SMTPClientProtocol, StringTransport]:
    protocol, transport = connected()
    protocol.dataReceived(b"220 mx.example ESMTP\r\n")
    result_of(protocol.greeting)
    return protocol, transport


def produce(transport: StringTransport, limit: int = 1000) -> int:
    """Pull from the registered producer until it unregisters; the number of pulls."""
    pulls = 0
    while transport.producer is not None:
        assert pulls < limit, "the producer never finished"
        transport.producer.resumeProducing()
        pulls += 1
    return pulls


class TLSStringTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.tls_contexts: list = []

    def startTLS(self, context) -> None:
        self.tls_contexts.append(context)


# -- SMTPClientProtocol ---------------------------------------------------------------


def test_greeting():
    """The first reply fires ``greeting``."""
    protocol, _ = connected()
    protocol.dataReceived(b"220 mx.example ESMTP Postfix\r\n")
    assert result_of(protocol.greeting) == Reply(220, "", "mx.example ESMTP Postfix")


def test_command_written_with_crlf():
    """A command goes out as one line with CRLF and waits for its reply."""
    protocol, transport = greeted()
    waiting = protocol.command("EHLO guard.example")
    assert transport.value() == b"EHLO guard.example\r\n"
    assert waiting.called is False


def test_multi_line_reply_in_pieces():
    """A multi-line reply split anywhere fires once, when its last line arrives."""
    protocol, _ = greeted()
    waiting = protocol.command("EHLO guard.example")
    for piece in [b"250-mx.exa", b"mple\r\n250-PIPE", b"LINING\r", b"\n250-SIZE 1000\r\n"]:
        protocol.dataReceived(piece)
        assert waiting.called is False
    protocol.dataReceived(b"250 XFORWARD NAME ADDR\r\n")
    assert result_of(waiting) == Reply(250, "", "mx.example\nPIPELINING\nSIZE 1000\nXFORWARD NAME ADDR")


def test_multi_line_reply_with_enhanced_code():
    """Enhanced codes on every line are taken off the text."""
    protocol, _ = greeted()
    waiting = protocol.command("RCPT TO:<a@example.com>")
    protocol.dataReceived(b"550-5.1.1 No such user\r\n550 5.1.1 Try again\r\n")
    assert result_of(waiting) == Reply(550, "5.1.1", "No such user\nTry again")


def test_lf_only_line_endings_accepted():
    """Replies ending in a bare LF are read too."""
    protocol, _ = greeted()
    waiting = protocol.command("NOOP")
    protocol.dataReceived(b"250-2.0.0 a\n250 2.0.0 b\n")
    assert result_of(waiting) == Reply(250, "2.0.0", "a\nb")


def test_reply_with_code_only():
    """A reply line with just the code (valid in RFC 5321) is a reply with empty text."""
    protocol, transport = greeted()
    waiting = protocol.command("NOOP")
    protocol.dataReceived(b"250\r\n")
    assert result_of(waiting) == Reply(250, "", "")
    assert transport.disconnecting is False


def test_parse_extensions():
    """EHLO lines after the greeting become upper-cased keywords with their parameters."""
    reply = Reply(250, "", "mx.example Hello\nPIPELINING\nsize 1000\nAUTH PLAIN LOGIN\n8BITMIME")
    assert parse_extensions(reply) == {"PIPELINING": "", "SIZE": "1000", "AUTH": "PLAIN LOGIN", "8BITMIME": ""}


def test_pipelined_replies_matched_in_order():
    """Commands sent together get their replies in order, even when the replies arrive together."""
    protocol, transport = greeted()
    waiting = [
        protocol.command("MAIL FROM:<a@example.com>"),
        protocol.command("RCPT TO:<b@example.com>"),
        protocol.command("RCPT TO:<c@example.com>"),
        protocol.command("DATA"),
    ]
    assert (
        transport.value()
        == b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n"
    )
    protocol.dataReceived(b"250 2.1.0 Ok\r\n550-5.1.1 No\r\n550 5.1.1 such user\r\n250 2.1.5 Ok\r\n354 Go")
    assert [result_of(each) for each in waiting[:3]] == [
        Reply(250, "2.1.0", "Ok"),
        Reply(550, "5.1.1", "No\nsuch user"),
        Reply(250, "2.1.5", "Ok"),
    ]
    assert waiting[3].called is False
    protocol.dataReceived(b" ahead\r\n")
    assert result_of(waiting[3]) == Reply(354, "", "Go ahead")


def test_malformed_reply_fails_waiters():
    """A line that is not a reply fails every waiting command with ProtocolViolation."""
    protocol, _ = greeted()
    first, second = protocol.command("MAIL FROM:<a@example.com>"), protocol.command("RCPT TO:<b@example.com>")
    protocol.dataReceived(b"hello there\r\n")
    assert failure_of(first).check(ProtocolViolation) is ProtocolViolation
    assert failure_of(second).check(ProtocolViolation) is ProtocolViolation


def test_malformed_reply_aborts_connection():
    """A malformed reply aborts the connection."""
    protocol, transport = greeted()
    protocol.command("NOOP").addErrback(lambda _: None)
    protocol.dataReceived(b"25O Ok\r\n")
    assert (transport.disconnected, protocol.connected_) == (True, False)


def test_malformed_reply_stops_reading():
    """Lines after a malformed one are not taken as replies to later commands."""
    protocol, transport = greeted()
    protocol.command("NOOP").addErrback(lambda _: None)
    protocol.dataReceived(b"garbage\r\n250 Ok\r\n")
    later = protocol.command("NOOP")
    assert failure_of(later).check(error.ConnectionDone) is error.ConnectionDone
    assert transport.value() == b"NOOP\r\n"


def test_inconsistent_multi_line_codes():
    """A multi-line reply whose lines have different codes is a protocol violation."""
    protocol, transport = greeted()
    waiting = protocol.command("EHLO guard.example")
    protocol.dataReceived(b"250-mx.example\r\n220 PIPELINING\r\n")
    assert failure_of(waiting).value.args == ("inconsistent multi-line reply",)
    assert transport.disconnected is True


def test_unexpected_reply():
    """A reply nobody waits for is a protocol violation."""
    protocol, transport = greeted()
    protocol.dataReceived(b"250 Ok\r\n")
    assert (transport.disconnected, protocol.connected_) == (True, False)


def test_reply_line_too_long():
    """A reply line longer than MAX_REPLY_LINE without a newline is a protocol violation."""
    protocol, transport = greeted()
    waiting = protocol.command("NOOP")
    protocol.dataReceived(b"250 " + b"x" * MAX_REPLY_LINE)
    assert failure_of(waiting).value.args == ("reply line too long",)
    assert transport.disconnected is True


def test_reply_with_too_many_lines():
    """More than 200 continuation lines is a protocol violation."""
    protocol, transport = greeted()
    waiting = protocol.command("EHLO guard.example")
    protocol.dataReceived(b"250-x\r\n" * 201)
    assert failure_of(waiting).value.args == ("reply too long",)
    assert transport.disconnected is True


def test_connection_lost_fails_waiters():
    """Losing the connection fails every waiting command with the reason."""
    protocol, _ = greeted()
    first, second = protocol.command("MAIL FROM:<a@example.com>"), protocol.command("RCPT TO:<b@example.com>")
    protocol.connectionLost(Failure(error.ConnectionLost("gone")))
    assert failure_of(first).check(error.ConnectionLost) is error.ConnectionLost
    assert failure_of(second).check(error.ConnectionLost) is error.ConnectionLost


def test_connection_lost_before_greeting():
    """Losing the connection before the greeting fails ``greeting`` and fires ``lost``."""
    protocol, _ = connected()
    protocol.connectionLost(Failure(error.ConnectionRefusedError()))
    assert failure_of(protocol.greeting).check(error.ConnectionRefusedError) is error.ConnectionRefusedError
    assert result_of(protocol.lost) is None


def test_command_after_connection_lost():
    """A command after the connection is gone fails at once and writes nothing."""
    protocol, transport = greeted()
    protocol.connectionLost(Failure(error.ConnectionDone()))
    waiting = protocol.command("NOOP")
    assert failure_of(waiting).check(error.ConnectionDone) is error.ConnectionDone
    assert transport.value() == b""


def test_send_data_dot_stuffs_with_backpressure():
    """The message goes out dot-stuffed one chunk per pull, then the final dot."""
    protocol, transport = greeted()
    chunks = [b"Subject: x\r\n\r\n", b".hidden\r\n", b".", b"\r\n", b"line\r\n..two\r\n"]
    sent, reply = protocol.send_data(iter(chunks))
    assert transport.producer is not None
    assert transport.streaming is False
    assert transport.value() == b""
    transport.producer.resumeProducing()
    assert transport.value() == b"Subject: x\r\n\r\n"
    assert sent.called is False
    produce(transport)
    assert transport.value() == b"".join(dot_stuff(chunks))
    assert transport.value() == b"Subject: x\r\n\r\n..hidden\r\n..\r\nline\r\n...two\r\n" + b".\r\n"
    assert result_of(sent) is None
    assert reply.called is False
    protocol.dataReceived(b"250 2.0.0 Ok: queued as 4AB\r\n")
    assert result_of(reply) == Reply(250, "2.0.0", "Ok: queued as 4AB")


def test_send_data_empty_message():
    """An empty message is just the final dot."""
    protocol, transport = greeted()
    sent, _ = protocol.send_data(iter([]))
    produce(transport)
    assert (transport.value(), result_of(sent)) == (b".\r\n", None)


def test_send_data_unterminated_message():
    """A message without a final CRLF gets one before the dot."""
    protocol, transport = greeted()
    protocol.send_data(iter([b"no newline"]))
    produce(transport)
    assert transport.value() == b"no newline\r\n.\r\n"


def test_send_data_source_error():
    """An error reading the message fails ``sent`` and unregisters the producer."""
    protocol, transport = greeted()

    def chunks():
        yield b"first\r\n"
        raise OSError("disk gone")

    sent, _ = protocol.send_data(chunks())
    produce(transport)
    assert transport.value() == b""  # the first chunk waits to go out with the next
    assert failure_of(sent).value.args == ("disk gone",)


def test_send_data_stop_producing():
    """stopProducing (the connection going away) fails ``sent``."""
    protocol, transport = greeted()
    sent, _ = protocol.send_data(iter([b"a\r\n", b"b\r\n"]))
    transport.producer.stopProducing()
    assert transport.producer is None
    assert failure_of(sent).check(error.ConnectionDone) is error.ConnectionDone


def test_start_tls():
    """start_tls hands the context to the transport and records TLS."""
    protocol = SMTPClientProtocol()
    transport = TLSStringTransport()
    protocol.makeConnection(transport)
    context = object()
    protocol.start_tls(context)
    assert (transport.tls_contexts, protocol.tls) == ([context], True)


# -- UpstreamSession --------------------------------------------------------------------


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Connects the factory's protocol to a StringTransport, or fails, or never answers."""

    def __init__(self, failure: Exception | None = None, hang: bool = False) -> None:
        self.failure = failure
        self.hang = hang
        self.protocols: list[SMTPClientProtocol] = []
        self.transports: list[StringTransport] = []
        self.transport_class = StringTransport

    def connect(self, factory):
        if self.failure is not None:
            return fail(self.failure)
        if self.hang:
            return Deferred()
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 10026))
        transport = self.transport_class()
        protocol.makeConnection(transport)
        self.protocols.append(protocol)
        self.transports.append(transport)
        return succeed(protocol)


class NextHop:
    """The far side of the fake connection: checks what was sent and answers."""

    def __init__(self, endpoint: FakeEndpoint) -> None:
        self.endpoint = endpoint

    @property
    def transport(self) -> StringTransport:
        return self.endpoint.transports[-1]

    def expect(self, line: bytes, reply: bytes | None) -> None:
        assert self.transport.value() == line
        self.transport.clear()
        if reply is not None:
            self.endpoint.protocols[-1].dataReceived(reply)

    def reply(self, reply: bytes) -> None:
        self.endpoint.protocols[-1].dataReceived(reply)


EHLO_ALL = (
    b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n250-DSN\r\n250-XFORWARD NAME ADDR PORT PROTO HELO\r\n250 ENHANCEDSTATUSCODES\r\n"
)
EHLO_PLAIN = b"250-mx.example\r\n250 PIPELINING\r\n"
CLIENT = Client("192.0.2.1", 4321, helo="client.example")
ENVELOPE = Envelope(
    CLIENT,
    "a@example.com",
    MailParameters(size=100, body=BodyType.EIGHT_BIT_MIME, envid="ID1", ret=Return.HEADERS),
)
RECIPIENT = Recipient("b@example.com", RecipientParameters(notify=frozenset({Notify.FAILURE})))


def session(endpoint: FakeEndpoint | None = None, **settings) -> tuple[UpstreamSession, NextHop, Clock]:
    endpoint = endpoint or FakeEndpoint()
    clock = Clock()
    options = {"endpoint": "tcp:127.0.0.1:10026", "hostname": "guard.example", "timeout": 10.0, "connect_timeout": 5.0}
    options.update(settings)
    return UpstreamSession(clock, endpoint, UpstreamSettings(**options)), NextHop(endpoint), clock


def greet(hop: NextHop, ehlo: bytes = EHLO_ALL) -> None:
    hop.expect(b"", b"220 mx.example ESMTP\r\n")
    hop.expect(b"EHLO guard.example\r\n", ehlo)


def started(ehlo: bytes = EHLO_PLAIN, **settings) -> tuple[UpstreamSession, NextHop, Clock]:
    """A session with MAIL accepted."""
    relay, hop, clock = session(**settings)
    mail = relay.mail(Envelope(CLIENT, "a@example.com"))
    greet(hop, ehlo)
    hop.expect(b"MAIL FROM:<a@example.com>\r\n", b"250 2.1.0 Ok\r\n")
    assert result_of(mail) == Reply(250, "2.1.0", "Ok")
    return relay, hop, clock


def message(body: bytes):
    spool = Spool(0)
    spool.write(body)
    return spool.finish()


def test_session_provides_relay_session():
    """UpstreamSession provides IRelaySession."""
    relay, _, _ = session()
    assert verifyObject(IRelaySession, relay)


def test_full_transaction_command_sequence():
    """EHLO, XFORWARD, MAIL with parameters, RCPT, DATA, the dot-stuffed message; the final reply is relayed."""
    relay, hop, _ = session()
    mail = relay.mail(ENVELOPE)
    greet(hop)
    hop.expect(
        b"XFORWARD NAME=[UNAVAILABLE] ADDR=192.0.2.1 PORT=4321 PROTO=ESMTP HELO=client.example\r\n"
        b"MAIL FROM:<a@example.com> SIZE=100 BODY=8BITMIME RET=HDRS ENVID=ID1\r\n",
        b"250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n",
    )
    assert result_of(mail) == Reply(250, "2.1.0", "Ok")
    rcpt = relay.rcpt(RECIPIENT)
    hop.expect(b"RCPT TO:<b@example.com> NOTIFY=FAILURE\r\n", b"250 2.1.5 Ok\r\n")
    assert result_of(rcpt) == Reply(250, "2.1.5", "Ok")
    body = b"Subject: test\r\n\r\n.leading dot\r\n..\r\nend\r\n"
    data = relay.data(message(body), b"Received: from client.example\r\n")
    hop.expect(b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n")
    produce(hop.transport)
    hop.expect(
        b"Received: from client.example\r\nSubject: test\r\n\r\n..leading dot\r\n...\r\nend\r\n.\r\n",
        b"250 2.0.0 Ok: queued as 4AB\r\n",
    )
    assert result_of(data) == Reply(250, "2.0.0", "Ok: queued as 4AB")


def test_new_header_fields_go_out_with_the_message_in_one_write():
    """The fields the proxy adds, a small message and the final dot leave in one
    write (one pull of the producer): no separate write, and reactor turn, for the
    added fields."""
    relay, hop, _ = started()
    relay.rcpt(Recipient("b@example.com"))
    hop.expect(b"RCPT TO:<b@example.com>\r\n", b"250 2.1.5 Ok\r\n")
    relay.data(message(b"Subject: test\r\n\r\nbody\r\n"), b"Received: from client.example\r\n")
    hop.expect(b"DATA\r\n", b"354 Go ahead\r\n")
    hop.transport.producer.resumeProducing()
    hop.expect(b"Received: from client.example\r\nSubject: test\r\n\r\nbody\r\n.\r\n", None)


def test_no_timers_left_after_transaction():
    """Every reply timeout is cancelled once its reply is in."""
    _, _, clock = started()
    assert clock.getDelayedCalls() == []


def test_xforward_only_advertised_attributes():
    """XFORWARD carries only the attributes the next hop names."""
    relay, hop, _ = session()
    relay.mail(Envelope(CLIENT, "a@example.com"))
    greet(hop, b"250-mx.example\r\n250 XFORWARD ADDR HELO\r\n")
    hop.expect(b"XFORWARD ADDR=192.0.2.1 HELO=client.example\r\n", None)


def test_xforward_ipv6_and_xtext():
    """An IPv6 client is sent as IPV6:..., HELO is xtext-encoded (a general address
    literal may hold "+" and "=")."""
    relay, hop, _ = session()
    relay.mail(Envelope(Client("2001:db8::1", 25, helo="[x-tag:a+b=c]", esmtp=True, tls=True), ""))
    greet(hop, b"250-mx.example\r\n250 XFORWARD NAME ADDR PORT PROTO HELO\r\n")
    hop.expect(
        b"XFORWARD NAME=[UNAVAILABLE] ADDR=IPV6:2001:db8::1 PORT=25 PROTO=ESMTPS HELO=[x-tag:a+2Bb+3Dc]\r\n",
        None,
    )


def test_xforward_helo_goes_as_its_a_label():
    """An internationalised HELO name goes to the next hop in its ASCII (A-label) form."""
    relay, hop, _ = session()
    relay.mail(Envelope(Client("192.0.2.1", 25, helo="bücher.example"), ""))
    greet(hop, b"250-mx.example\r\n250 XFORWARD HELO\r\n")
    hop.expect(b"XFORWARD HELO=xn--bcher-kva.example\r\n", None)


def test_xforward_disabled():
    """With xforward = false no XFORWARD is sent even when offered."""
    relay, hop, _ = session(xforward=False)
    relay.mail(Envelope(CLIENT, "a@example.com"))
    greet(hop)
    hop.expect(b"MAIL FROM:<a@example.com>\r\n", None)


def test_xforward_refused_then_mail_sent():
    """After a refused XFORWARD the MAIL command is sent and its reply relayed."""
    relay, hop, _ = session()
    mail = relay.mail(Envelope(CLIENT, "a@example.com"))
    greet(hop)
    hop.expect(
        b"XFORWARD NAME=[UNAVAILABLE] ADDR=192.0.2.1 PORT=4321 PROTO=ESMTP HELO=client.example\r\n"
        b"MAIL FROM:<a@example.com>\r\n",
        b"550 5.7.1 XFORWARD not permitted\r\n250 2.1.0 Ok\r\n",
    )
    assert result_of(mail) == Reply(250, "2.1.0", "Ok")


def test_xforward_waits_for_its_reply_without_pipelining():
    """Without PIPELINING, MAIL goes out only after the reply to XFORWARD."""
    relay, hop, _ = session()
    mail = relay.mail(Envelope(CLIENT, "a@example.com"))
    greet(hop, b"250-mx.example\r\n250 XFORWARD ADDR\r\n")
    hop.expect(b"XFORWARD ADDR=192.0.2.1\r\n", b"250 2.0.0 Ok\r\n")
    hop.expect(b"MAIL FROM:<a@example.com>\r\n", b"250 2.1.0 Ok\r\n")
    assert result_of(mail) == Reply(250, "2.1.0", "Ok")


def test_mail_parameters_only_for_advertised_extensions():
    """A next hop advertising nothing gets MAIL and RCPT without parameters."""
    relay, hop, _ = session()
    mail = relay.mail(ENVELOPE)
    greet(hop, EHLO_PLAIN)
    hop.expect(b"MAIL FROM:<a@example.com>\r\n", b"250 2.1.0 Ok\r\n")
    assert result_of(mail) == Reply(250, "2.1.0", "Ok")
    relay.rcpt(RECIPIENT)
    hop.expect(b"RCPT TO:<b@example.com>\r\n", None)


def test_ehlo_refused_falls_back_to_helo():
    """EHLO refused: HELO, and no extensions are used."""
    relay, hop, _ = session()
    mail = relay.mail(ENVELOPE)
    hop.expect(b"", b"220 mx.example SMTP\r\n")
    hop.expect(b"EHLO guard.example\r\n", b"502 5.5.1 Command not implemented\r\n")
    hop.expect(b"HELO guard.example\r\n", b"250 mx.example\r\n")
    hop.expect(b"MAIL FROM:<a@example.com>\r\n", b"250 Ok\r\n")
    assert result_of(mail) == Reply(250, "", "Ok")
    assert relay.extensions == {}


def test_helo_refused_relayed():
    """EHLO and HELO both refused: the HELO refusal is relayed and the connection dropped."""
    relay, hop, _ = session()
    mail = relay.mail(ENVELOPE)
    hop.expect(b"", b"220 mx.example SMTP\r\n")
    hop.expect(b"EHLO guard.example\r\n", b"502 5.5.1 Command not implemented\r\n")
    hop.expect(b"HELO guard.example\r\n", b"550 5.7.1 Go away\r\n")
    assert result_of(mail) == Reply(550, "5.7.1", "Go away")
    assert hop.transport.disconnected is True


def test_greeting_refusal_relayed():
    """A 554 greeting is relayed as is."""
    relay, hop, _ = session()
    mail = relay.mail(ENVELOPE)
    hop.expect(b"", b"554 5.3.2 Not accepting mail\r\n")
    assert result_of(mail) == Reply(554, "5.3.2", "Not accepting mail")


def test_connection_refused():
    """A refused connection is 451 4.4.1."""
    relay, _, _ = session(FakeEndpoint(failure=error.ConnectionRefusedError()))
    assert result_of(relay.mail(ENVELOPE)) == replies.UPSTREAM_UNAVAILABLE


def test_connect_timeout():
    """A connection attempt that never completes is 451 4.4.2 after connect_timeout."""
    relay, _, clock = session(FakeEndpoint(hang=True))
    mail = relay.mail(ENVELOPE)
    clock.advance(4.9)
    assert mail.called is False
    clock.advance(0.1)
    assert result_of(mail) == replies.UPSTREAM_TIMEOUT


def test_no_greeting_within_timeout():
    """No greeting within the reply timeout is 451 4.4.2."""
    relay, _, clock = session()
    mail = relay.mail(ENVELOPE)
    clock.advance(10)
    assert result_of(mail) == replies.UPSTREAM_TIMEOUT


def test_no_reply_to_mail_within_timeout():
    """No reply to MAIL within the timeout is 451 4.4.2."""
    relay, hop, clock = session()
    mail = relay.mail(Envelope(CLIENT, "a@example.com"))
    greet(hop, EHLO_PLAIN)
    hop.expect(b"MAIL FROM:<a@example.com>\r\n", None)
    clock.advance(9.9)
    assert mail.called is False
    clock.advance(0.1)
    assert result_of(mail) == replies.UPSTREAM_TIMEOUT


def test_timeout_aborts_connection():
    """A reply timeout aborts the connection to the next hop."""
    relay, hop, clock = session()
    mail = relay.mail(Envelope(CLIENT, "a@example.com"))
    greet(hop, EHLO_PLAIN)
    clock.advance(10)
    mail.addErrback(lambda _: None)
    assert hop.transport.disconnected is True


def test_no_final_reply_within_timeout():
    """No reply after the final dot within the timeout is 451 4.4.2."""
    relay, hop, clock = started()
    relay.rcpt(RECIPIENT)
    hop.expect(b"RCPT TO:<b@example.com>\r\n", b"250 2.1.5 Ok\r\n")
    data = relay.data(message(b"x\r\n"), b"")
    hop.expect(b"DATA\r\n", b"354 Go ahead\r\n")
    produce(hop.transport)
    clock.advance(10)
    assert result_of(data) == replies.UPSTREAM_TIMEOUT


def test_mail_refusals_relayed():
    """4xx and 5xx replies to MAIL reach the client as the next hop sent them."""
    relay, hop, _ = session()
    mail = relay.mail(Envelope(CLIENT, "a@example.com"))
    greet(hop, EHLO_PLAIN)
    hop.expect(b"MAIL FROM:<a@example.com>\r\n", b"452 4.3.1 Insufficient system storage\r\n")
    assert result_of(mail) == Reply(452, "4.3.1", "Insufficient system storage")
    mail = relay.mail(Envelope(CLIENT, "a@example.com"))
    hop.expect(b"MAIL FROM:<a@example.com>\r\n", b"550-5.7.1 Sender\r\n550 5.7.1 rejected\r\n")
    assert result_of(mail) == Reply(550, "5.7.1", "Sender\nrejected")


def test_connection_reused_for_next_transaction():
    """A second transaction uses the same connection, without a new EHLO."""
    relay, hop, _ = started()
    relay.reset()
    hop.expect(b"RSET\r\n", b"250 2.0.0 Ok\r\n")
    mail = relay.mail(Envelope(CLIENT, "c@example.com"))
    hop.expect(b"MAIL FROM:<c@example.com>\r\n", b"250 2.1.0 Ok\r\n")
    assert result_of(mail) == Reply(250, "2.1.0", "Ok")
    assert len(hop.endpoint.protocols) == 1


def test_rcpt_refusal_relayed():
    """A refused recipient is relayed as is."""
    relay, hop, _ = started()
    rcpt = relay.rcpt(RECIPIENT)
    hop.expect(b"RCPT TO:<b@example.com>\r\n", b"550 5.1.1 No such user\r\n")
    assert result_of(rcpt) == Reply(550, "5.1.1", "No such user")


def test_rcpt_without_connection():
    """RCPT before any MAIL (no connection) is 451 4.4.1."""
    relay, _, _ = session()
    assert result_of(relay.rcpt(RECIPIENT)) == replies.UPSTREAM_UNAVAILABLE


def test_data_refused_relayed():
    """A refused DATA command is relayed and nothing is sent."""
    relay, hop, _ = started()
    data = relay.data(message(b"x\r\n"), b"")
    hop.expect(b"DATA\r\n", b"554 5.5.1 No valid recipients\r\n")
    assert result_of(data) == Reply(554, "5.5.1", "No valid recipients")
    assert hop.transport.producer is None


def test_data_positive_non_354_is_protocol_error():
    """A 250 to DATA makes no sense: 451 4.5.0."""
    relay, hop, _ = started()
    data = relay.data(message(b"x\r\n"), b"")
    hop.expect(b"DATA\r\n", b"250 Ok\r\n")
    assert result_of(data) == replies.UPSTREAM_PROTOCOL


def test_final_refusal_relayed():
    """A 5xx after the final dot is relayed as is."""
    relay, hop, _ = started()
    data = relay.data(message(b"x\r\n"), b"")
    hop.expect(b"DATA\r\n", b"354 Go ahead\r\n")
    produce(hop.transport)
    hop.expect(b"x\r\n.\r\n", b"554 5.7.1 Spam\r\n")
    assert result_of(data) == Reply(554, "5.7.1", "Spam")


def test_protocol_violation_is_upstream_protocol():
    """Garbage from the next hop is 451 4.5.0 and the connection is dropped."""
    relay, hop, _ = started()
    rcpt = relay.rcpt(RECIPIENT)
    hop.expect(b"RCPT TO:<b@example.com>\r\n", b"HTTP/1.1 400 Bad Request\r\n")
    assert result_of(rcpt) == replies.UPSTREAM_PROTOCOL
    assert hop.transport.disconnected is True


def test_connection_lost_is_upstream_unavailable():
    """The next hop dropping the connection mid-command is 451 4.4.1."""
    relay, hop, _ = started()
    rcpt = relay.rcpt(RECIPIENT)
    hop.endpoint.protocols[-1].connectionLost(Failure(error.ConnectionLost()))
    assert result_of(rcpt) == replies.UPSTREAM_UNAVAILABLE


def test_tls_required_without_starttls():
    """tls = required and no STARTTLS offered: 451 4.4.1, no MAIL, connection dropped."""
    relay, hop, _ = session(tls=UpstreamTLS.REQUIRED)
    mail = relay.mail(ENVELOPE)
    greet(hop, EHLO_PLAIN)
    assert result_of(mail) == replies.UPSTREAM_UNAVAILABLE
    assert hop.transport.value() == b""
    assert hop.transport.disconnected is True


def test_tls_opportunistic_without_starttls():
    """tls = opportunistic and no STARTTLS offered: the transaction goes on in plain text."""
    relay, hop, _ = session(tls=UpstreamTLS.OPPORTUNISTIC)
    mail = relay.mail(Envelope(CLIENT, "a@example.com"))
    greet(hop, EHLO_PLAIN)
    hop.expect(b"MAIL FROM:<a@example.com>\r\n", b"250 2.1.0 Ok\r\n")
    assert result_of(mail) == Reply(250, "2.1.0", "Ok")


def test_starttls_refused_opportunistic_goes_on_in_plain_text():
    """tls = opportunistic and STARTTLS answered 454: MAIL goes out on the same
    connection in plain text, as Postfix's "may" level does."""
    relay, hop, _ = session(tls=UpstreamTLS.OPPORTUNISTIC)
    mail = relay.mail(Envelope(CLIENT, "a@example.com"))
    greet(hop, b"250-mx.example\r\n250 STARTTLS\r\n")
    hop.expect(b"STARTTLS\r\n", b"454 4.7.0 TLS not available\r\n")
    hop.expect(b"MAIL FROM:<a@example.com>\r\n", b"250 2.1.0 Ok\r\n")
    assert (result_of(mail), len(hop.endpoint.protocols)) == (Reply(250, "2.1.0", "Ok"), 1)


def test_starttls_refused_required():
    """tls = required and STARTTLS answered 454: 451 4.4.1, no MAIL."""
    relay, hop, _ = session(tls=UpstreamTLS.REQUIRED)
    mail = relay.mail(ENVELOPE)
    greet(hop, b"250-mx.example\r\n250 STARTTLS\r\n")
    hop.expect(b"STARTTLS\r\n", b"454 4.7.0 TLS not available\r\n")
    assert result_of(mail) == replies.UPSTREAM_UNAVAILABLE
    assert hop.transport.value() == b""


def test_reset_outside_transaction_sends_nothing():
    """reset() without an open transaction sends no RSET."""
    relay, hop, _ = session()
    assert result_of(relay.reset()) is None
    assert hop.endpoint.transports == []


def test_close_sends_quit_and_closes():
    """close() without a pool sends QUIT and closes the connection."""
    relay, hop, _ = started()
    relay.close()
    assert hop.transport.value() == b"QUIT\r\n"
    assert hop.transport.disconnecting is True


# -- kept connections -------------------------------------------------------------------


def pooled(size: int = 2, keep_time: float = 5.0, **options):
    endpoint = FakeEndpoint()
    clock = Clock()
    settings = UpstreamSettings("tcp:127.0.0.1:10026", hostname="guard.example", timeout=10.0, **options)
    pool = KeptConnections(clock, size, keep_time)
    return (lambda: UpstreamSession(clock, endpoint, settings, pool)), NextHop(endpoint), pool, clock


def finish_transaction(relay: UpstreamSession, hop: NextHop) -> None:
    relay.rcpt(Recipient("b@example.com"))
    hop.expect(b"RCPT TO:<b@example.com>\r\n", b"250 2.1.5 Ok\r\n")
    data = relay.data(message(b"x\r\n"), b"")
    hop.expect(b"DATA\r\n", b"354 go ahead\r\n")
    produce(hop.transport)
    hop.expect(b"x\r\n.\r\n", b"250 2.0.0 Ok\r\n")
    assert result_of(data).positive


def test_kept_connection_serves_the_next_session():
    """A finished session's connection is kept, and the next session sends MAIL on it at once."""
    new_session, hop, pool, _ = pooled()
    first = new_session()
    first.mail(Envelope(CLIENT, "a@example.com"))
    greet(hop, EHLO_PLAIN)
    hop.expect(b"MAIL FROM:<a@example.com>\r\n", b"250 2.1.0 Ok\r\n")
    finish_transaction(first, hop)
    first.close()
    assert (hop.transport.value(), len(pool)) == (b"", 1)
    second = new_session()
    mail = second.mail(Envelope(CLIENT, "c@example.com"))
    hop.expect(b"MAIL FROM:<c@example.com>\r\n", b"250 2.1.0 Ok\r\n")
    assert result_of(mail).positive
    assert len(hop.endpoint.protocols) == 1


def test_kept_connection_expires():
    """A kept connection is closed with QUIT after keep_time."""
    new_session, hop, pool, clock = pooled(keep_time=5.0)
    relay = new_session()
    relay.mail(Envelope(CLIENT, "a@example.com"))
    greet(hop, EHLO_PLAIN)
    hop.expect(b"MAIL FROM:<a@example.com>\r\n", b"250 2.1.0 Ok\r\n")
    finish_transaction(relay, hop)
    relay.close()
    clock.advance(5.0)
    assert (hop.transport.value(), hop.transport.disconnecting, len(pool)) == (b"QUIT\r\n", True, 0)


def test_connection_in_a_transaction_is_reset_and_kept():
    """A session closed in the middle of a transaction ends it with RSET and,
    once the next hop said 250, keeps the connection."""
    new_session, hop, pool, _ = pooled()
    relay = new_session()
    relay.mail(Envelope(CLIENT, "a@example.com"))
    greet(hop, EHLO_PLAIN)
    hop.expect(b"MAIL FROM:<a@example.com>\r\n", b"250 2.1.0 Ok\r\n")
    relay.close()
    hop.expect(b"RSET\r\n", b"250 2.0.0 Ok\r\n")
    assert (hop.transport.value(), len(pool)) == (b"", 1)


def test_kept_connection_closed_by_the_next_hop_is_replaced():
    """When the next hop closes a kept connection as MAIL goes out, MAIL is tried once more on a new one."""
    new_session, hop, _, _ = pooled()
    first = new_session()
    first.mail(Envelope(CLIENT, "a@example.com"))
    greet(hop, EHLO_PLAIN)
    hop.expect(b"MAIL FROM:<a@example.com>\r\n", b"250 2.1.0 Ok\r\n")
    finish_transaction(first, hop)
    first.close()
    second = new_session()
    mail = second.mail(Envelope(CLIENT, "c@example.com"))
    hop.expect(b"MAIL FROM:<c@example.com>\r\n", None)
    hop.endpoint.protocols[-1].connectionLost(Failure(error.ConnectionDone()))
    assert len(hop.endpoint.protocols) == 2
    greet(hop, EHLO_PLAIN)
    hop.expect(b"MAIL FROM:<c@example.com>\r\n", b"250 2.1.0 Ok\r\n")
    assert result_of(mail).positive


# -- regressions: the twisted.mail client defects of the project notes ------------------


def _relayed_bytes(body: bytes) -> bytes:
    """What the next hop receives after 354 for ``body``, up to the final dot."""
    relay, hop, _ = started()
    hop.expect(b"", None)
    relay.rcpt(Recipient("b@example.com"))
    hop.expect(b"RCPT TO:<b@example.com>\r\n", b"250 2.1.5 Ok\r\n")
    relay.data(message(body), b"")
    hop.expect(b"DATA\r\n", b"354 go ahead\r\n")
    produce(hop.transport)
    return hop.transport.value()


def test_regression_client_dot_at_chunk_boundary_is_stuffed():
    """A dot that starts a line exactly at a 256 KiB spool chunk boundary is stuffed."""
    from smtpguard.spool import CHUNK_SIZE

    head = b"x" * (CHUNK_SIZE - 2) + b"\r\n"
    sent = _relayed_bytes(head + b".\r\nQUIT\r\n")
    assert sent == head + b"..\r\nQUIT\r\n.\r\n"


def test_regression_client_dot_on_first_line_is_stuffed():
    """A dot on the very first line is stuffed."""
    assert _relayed_bytes(b".first\r\n") == b"..first\r\n.\r\n"


def test_regression_client_crlf_is_not_doubled():
    """CRLF line endings go out as CRLF, never CR CR LF."""
    sent = _relayed_bytes(b"a\r\nb\r\n")
    assert sent == b"a\r\nb\r\n.\r\n"
    assert b"\r\r\n" not in sent


def test_regression_client_final_reply_text_is_kept():
    """The next hop's final reply text (its queue id) reaches the caller."""
    relay, hop, _ = started()
    hop.expect(b"", None)
    relay.rcpt(Recipient("b@example.com"))
    hop.expect(b"RCPT TO:<b@example.com>\r\n", b"250 2.1.5 Ok\r\n")
    data = relay.data(message(b"x\r\n"), b"")
    hop.expect(b"DATA\r\n", b"354 go ahead\r\n")
    produce(hop.transport)
    hop.expect(b"x\r\n.\r\n", b"250 2.0.0 Ok: queued as 3FA9C\r\n")
    assert result_of(data) == Reply(250, "2.0.0", "Ok: queued as 3FA9C")


def test_regression_client_no_immediate_retries():
    """A refused connection is tried once and reported: the SMTP client retries later."""
    endpoint = FakeEndpoint(failure=error.ConnectionRefusedError())
    attempts = []
    connect = endpoint.connect
    endpoint.connect = lambda factory: attempts.append(factory) or connect(factory)  # type: ignore[method-assign]
    relay, _, clock = session(endpoint)
    assert result_of(relay.mail(ENVELOPE)) == replies.UPSTREAM_UNAVAILABLE
    clock.advance(60)
    assert len(attempts) == 1


def test_regression_client_needs_neither_auth_nor_tls_by_default():
    """With default settings the client relays over a plain connection without AUTH."""
    relay, hop, _ = session()
    mail = relay.mail(Envelope(CLIENT, "a@example.com"))
    greet(hop, EHLO_PLAIN)
    hop.expect(b"MAIL FROM:<a@example.com>\r\n", b"250 2.1.0 Ok\r\n")
    assert result_of(mail).positive


# -- CHUNKING toward the next hop -----------------------------------------------------------

EHLO_CHUNKING = b"250-mx.example\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 BINARYMIME\r\n"


def test_next_hop_with_chunking_gets_one_bdat():
    """A next hop offering CHUNKING gets ``BDAT n LAST`` and the raw bytes in one go: no DATA, no dot-stuffing."""
    relay, hop, _ = started(EHLO_CHUNKING)
    relay.rcpt(Recipient("b@example.com"))
    hop.expect(b"RCPT TO:<b@example.com>\r\n", b"250 2.1.5 Ok\r\n")
    body = b".starts with a dot\r\n.\r\n"
    data = relay.data(message(body), b"X-Trace: 1\r\n")
    produce(hop.transport)
    size = len(b"X-Trace: 1\r\n") + len(body)
    hop.expect(f"BDAT {size} LAST\r\n".encode() + b"X-Trace: 1\r\n" + body, b"250 2.0.0 Ok: queued\r\n")
    assert result_of(data) == Reply(250, "2.0.0", "Ok: queued")


def test_binarymime_refused_toward_a_next_hop_without_it():
    """BODY=BINARYMIME is refused (554 5.6.3) when the next hop lacks BINARYMIME or CHUNKING."""
    relay, hop, _ = session()
    mail = relay.mail(Envelope(CLIENT, "a@example.com", MailParameters(body=BodyType.BINARYMIME)))
    greet(hop, EHLO_PLAIN)
    assert result_of(mail) == replies.NEXT_HOP_NO_BINARYMIME
    assert hop.transport.value() == b""


def test_binarymime_passed_on_to_a_next_hop_with_it():
    """BODY=BINARYMIME goes on to a next hop that offers BINARYMIME and CHUNKING."""
    relay, hop, _ = session()
    mail = relay.mail(Envelope(CLIENT, "a@example.com", MailParameters(body=BodyType.BINARYMIME)))
    greet(hop, EHLO_CHUNKING)
    hop.expect(b"MAIL FROM:<a@example.com> BODY=BINARYMIME\r\n", b"250 2.1.0 Ok\r\n")
    assert result_of(mail).positive
