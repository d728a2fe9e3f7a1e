"""The next-hop session's lifecycle: what a client that leaves at any moment does
to the next hop (nothing it would deliver, nothing left open, no connection
handed on half set up), opportunistic TLS, and the keep-alive pool's checks.

Each test named ``test_regression_*`` reproduces a defect of an earlier version.
"""

from __future__ import annotations

import pytest
from OpenSSL import SSL
from twisted.internet import error
from twisted.python.failure import Failure

from smtpguard import replies
from smtpguard.envelope import Envelope, Recipient
from smtpguard.replies import Reply
from smtpguard.smtpclient import SMTPClientProtocol, WhileProducing
from smtpguard.upstream import HopState, IllegalTransition, UpstreamTLS
from tests.test_smtpclient import (
    CLIENT,
    EHLO_PLAIN,
    FakeEndpoint,
    NextHop,
    TLSStringTransport,
    greet,
    message,
    pooled,
    produce,
    result_of,
    session,
)

EHLO_TLS = b"250-mx.example\r\n250-PIPELINING\r\n250 STARTTLS\r\n"
EHLO_8BIT = b"250-mx.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"


def in_transaction(relay, hop: NextHop, ehlo: bytes = EHLO_PLAIN) -> None:
    mail = relay.mail(Envelope(CLIENT, "a@example.com"))
    greet(hop, ehlo)
    hop.expect(b"MAIL FROM:<a@example.com>\r\n", b"250 2.1.0 Ok\r\n")
    rcpt = relay.rcpt(Recipient("b@example.com"))
    hop.expect(b"RCPT TO:<b@example.com>\r\n", b"250 2.1.5 Ok\r\n")
    assert (result_of(mail).code, result_of(rcpt).code) == (250, 250)


# -- a client that leaves before the connection is set up ------------------------------


def test_regression_leaving_before_the_greeting_never_pools_the_connection():
    """A client that leaves while the next hop has not greeted yet: that
    connection is cut, not kept, and the next session opens its own, whose MAIL
    follows its own EHLO (no "503 send HELO/EHLO first")."""
    new_session, hop, pool, _ = pooled()
    first = new_session()
    first.mail(Envelope(CLIENT, "a@example.com"))
    first.close()
    assert (hop.transport.disconnected, len(pool), first.state) == (True, 0, HopState.IDLE)
    second = new_session()
    mail = second.mail(Envelope(CLIENT, "c@example.com"))
    assert len(hop.endpoint.protocols) == 2
    greet(hop, EHLO_PLAIN)
    hop.expect(b"MAIL FROM:<c@example.com>\r\n", b"250 2.1.0 Ok\r\n")
    assert result_of(mail) == Reply(250, "2.1.0", "Ok")


def test_regression_leaving_during_ehlo_never_pools_the_connection():
    """A client that leaves while EHLO is unanswered: the connection is cut and
    a late EHLO reply changes nothing."""
    new_session, hop, pool, _ = pooled()
    first = new_session()
    first.mail(Envelope(CLIENT, "a@example.com"))
    hop.expect(b"", b"220 mx.example ESMTP\r\n")
    hop.expect(b"EHLO guard.example\r\n", None)
    first.close()
    assert (hop.transport.disconnected, len(pool)) == (True, 0)


def test_regression_leaving_while_connecting_cancels_the_connect():
    """A client that leaves before the TCP connection to the next hop is made:
    the attempt is cancelled."""
    endpoint = FakeEndpoint(hang=True)
    relay, _, _ = session(endpoint)
    relay.mail(Envelope(CLIENT, "a@example.com"))
    assert relay.state is HopState.CONNECTING
    relay.close()
    assert (relay.state, endpoint.protocols) == (HopState.IDLE, [])


def test_regression_tls_required_session_never_takes_a_plain_connection():
    """With tls = required, a session leaving during the slow EHLO after
    STARTTLS leaves nothing in the pool, so the next session's message never
    goes out in clear text."""
    new_session, hop, pool, _ = pooled(tls=UpstreamTLS.REQUIRED, tls_hostname="mx.example")
    hop.endpoint.transport_class = TLSStringTransport
    first = new_session()
    first.mail(Envelope(CLIENT, "a@example.com"))
    greet(hop, EHLO_TLS)
    hop.expect(b"STARTTLS\r\n", b"220 2.0.0 Ready\r\n")
    hop.expect(b"EHLO guard.example\r\n", None)
    first.close()
    assert (hop.transport.disconnected, len(pool)) == (True, 0)


def test_pool_refuses_a_plain_connection_to_a_tls_required_session():
    """A kept connection without TLS is not handed to a session that requires TLS."""
    new_session, hop, pool, _ = pooled()
    first = new_session()
    in_transaction(first, hop)
    first.reset()
    hop.expect(b"RSET\r\n", b"250 2.0.0 Ok\r\n")
    first.close()
    assert len(pool) == 1
    from smtpguard.upstream import UpstreamSettings

    assert pool.take(UpstreamSettings("tcp:127.0.0.1:1", tls=UpstreamTLS.REQUIRED)) is None
    assert (hop.transport.value(), len(pool)) == (b"QUIT\r\n", 0)


def test_pool_refuses_a_connection_with_a_reply_outstanding():
    """A connection waiting for a reply is never taken into the pool."""
    new_session, hop, pool, _ = pooled()
    relay = new_session()
    in_transaction(relay, hop)
    protocol = hop.endpoint.protocols[-1]
    protocol.command("NOOP")
    pool.give(protocol)
    assert (len(pool), hop.transport.disconnected) == (0, True)


# -- a client that leaves inside a transaction -------------------------------------------


def test_regression_leaving_after_mail_ends_the_transaction_without_a_pool():
    """EHLO + MAIL and gone, no pool: the next hop hears QUIT, the connection
    closes; no next-hop session stays inside a transaction."""
    relay, hop, _ = session()
    relay.mail(Envelope(CLIENT, "a@example.com"))
    greet(hop, EHLO_PLAIN)
    hop.expect(b"MAIL FROM:<a@example.com>\r\n", b"250 2.1.0 Ok\r\n")
    relay.close()
    assert (hop.transport.value(), hop.transport.disconnecting) == (b"QUIT\r\n", True)


def test_leaving_with_mail_unanswered_waits_for_the_reply_then_resets():
    """A client that leaves while MAIL is unanswered: nothing is written until
    that reply is in (no command behind an outstanding reply), then RSET, and
    the connection is kept."""
    new_session, hop, pool, _ = pooled()
    relay = new_session()
    relay.mail(Envelope(CLIENT, "a@example.com"))
    greet(hop, EHLO_PLAIN)
    hop.expect(b"MAIL FROM:<a@example.com>\r\n", None)
    relay.close()
    assert hop.transport.value() == b""
    hop.reply(b"250 2.1.0 Ok\r\n")
    hop.expect(b"RSET\r\n", b"250 2.0.0 Ok\r\n")
    assert (hop.transport.value(), len(pool)) == (b"", 1)


def test_leaving_when_rset_is_refused_quits():
    """A kept-to-be connection whose RSET is refused is not kept: it is cut."""
    new_session, hop, pool, _ = pooled()
    relay = new_session()
    in_transaction(relay, hop)
    relay.close()
    hop.expect(b"RSET\r\n", b"421 4.3.0 going away\r\n")
    assert (len(pool), hop.transport.disconnected) == (0, True)


def test_regression_leaving_while_data_streams_never_writes_quit_into_the_message():
    """A client gone while its message streams to the next hop: the connection
    is cut; no QUIT (or anything) follows the partial data, and no end of data."""
    for ehlo in (EHLO_PLAIN, b"250-mx.example\r\n250 CHUNKING\r\n"):
        relay, hop, _ = session()
        in_transaction(relay, hop, ehlo)
        data = relay.data(message(b"line one\r\n" * 40000), b"")
        if b"CHUNKING" not in ehlo:
            hop.expect(b"DATA\r\n", b"354 go ahead\r\n")
        hop.transport.producer.resumeProducing()
        sent = hop.transport.value()
        assert relay.state is HopState.STREAMING
        relay.close()
        assert hop.transport.value() == sent
        assert hop.transport.disconnected is True
        assert b"QUIT" not in sent and not sent.endswith(b"\r\n.\r\n")
        hop.endpoint.protocols[-1].connectionLost(Failure(error.ConnectionAborted()))
        assert result_of(data) == replies.UPSTREAM_UNAVAILABLE


def test_regression_leaving_while_data_is_unanswered_sends_no_message():
    """A client gone while DATA waits for its 354: after the 354 nothing of the
    message is sent and the connection is cut, so the next hop queues nothing."""
    relay, hop, _ = session()
    in_transaction(relay, hop)
    data = relay.data(message(b"x\r\n"), b"")
    hop.expect(b"DATA\r\n", None)
    relay.close()
    hop.reply(b"354 go ahead\r\n")
    assert (hop.transport.value(), hop.transport.disconnected) == (b"", True)
    assert result_of(data) == replies.UPSTREAM_UNAVAILABLE


def test_regression_data_after_the_client_left_reaches_no_next_hop():
    """The scan ends after the client left: data() answers 451 4.4.1 without
    writing anything; the transaction was ended when the client left."""
    relay, hop, _ = session()
    in_transaction(relay, hop)
    relay.close()
    hop.expect(b"QUIT\r\n", None)
    assert result_of(relay.data(message(b"x\r\n"), b"")) == replies.UPSTREAM_UNAVAILABLE
    assert hop.transport.value() == b""


def test_leaving_while_the_final_reply_is_awaited_waits_for_it():
    """The end of data is out when the client leaves: the session waits for the
    next hop's reply (the message is the next hop's now) and then keeps the
    connection; nothing else is written before that reply."""
    new_session, hop, pool, _ = pooled()
    relay = new_session()
    in_transaction(relay, hop)
    data = relay.data(message(b"x\r\n"), b"")
    hop.expect(b"DATA\r\n", b"354 go ahead\r\n")
    produce(hop.transport)
    hop.expect(b"x\r\n.\r\n", None)
    assert relay.state is HopState.AWAITING_REPLY
    relay.close()
    assert (hop.transport.value(), len(pool)) == (b"", 0)
    hop.reply(b"250 2.0.0 Ok: queued as 1234\r\n")
    assert result_of(data).text == "Ok: queued as 1234"
    assert (hop.transport.value(), len(pool)) == (b"", 1)


# -- states ----------------------------------------------------------------------------


def test_mail_after_a_refused_data_resets_first():
    """A transaction whose DATA was refused is ended with RSET before the next
    MAIL, so a strict next hop never answers "nested MAIL"."""
    relay, hop, _ = session()
    in_transaction(relay, hop)
    data = relay.data(message(b"x\r\n"), b"")
    hop.expect(b"DATA\r\n", b"554 5.5.1 Error: no valid recipients\r\n")
    assert result_of(data) == Reply(554, "5.5.1", "Error: no valid recipients")
    mail = relay.mail(Envelope(CLIENT, "c@example.com"))
    hop.expect(b"RSET\r\n", b"250 2.0.0 Ok\r\n")
    hop.expect(b"MAIL FROM:<c@example.com>\r\n", b"250 2.1.0 Ok\r\n")
    assert result_of(mail).code == 250


def test_rcpt_outside_a_transaction_is_a_local_error():
    """RCPT in state READY is a bug of the caller: 451 4.3.0, nothing sent."""
    relay, hop, _ = session()
    mail = relay.mail(Envelope(CLIENT, "a@example.com"))
    greet(hop, EHLO_PLAIN)
    hop.expect(b"MAIL FROM:<a@example.com>\r\n", b"550 5.1.0 no\r\n")
    assert result_of(mail).code == 550
    assert result_of(relay.rcpt(Recipient("b@example.com"))) == replies.LOCAL_ERROR
    assert hop.transport.value() == b""


def test_illegal_transition_raises():
    """The transition table refuses a jump from READY to STREAMING."""
    relay, _, _ = session()
    relay.state = HopState.READY
    with pytest.raises(IllegalTransition):
        relay._enter(HopState.STREAMING)


def test_no_command_while_data_is_written():
    """The client protocol refuses to write a command into message data."""
    protocol = SMTPClientProtocol()
    from twisted.internet.testing import StringTransport

    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.send_data(iter([b"x\r\n"]))
    with pytest.raises(WhileProducing):
        protocol.command("QUIT")
    assert transport.value() == b""


def test_calls_after_close_reach_no_next_hop():
    """After close(), mail() answers 451 4.4.1 and opens no connection."""
    endpoint = FakeEndpoint()
    relay, _, _ = session(endpoint)
    relay.close()
    assert result_of(relay.mail(Envelope(CLIENT, "a@example.com"))) == replies.UPSTREAM_UNAVAILABLE
    assert endpoint.protocols == []


# -- opportunistic TLS -------------------------------------------------------------------


def test_opportunistic_tls_handshake_failure_reconnects_in_plain_text():
    """tls = opportunistic: when the handshake fails (the connection is lost
    after STARTTLS), a new connection carries the transaction without TLS."""
    relay, hop, _ = session(tls=UpstreamTLS.OPPORTUNISTIC)
    hop.endpoint.transport_class = TLSStringTransport
    mail = relay.mail(Envelope(CLIENT, "a@example.com"))
    greet(hop, EHLO_TLS)
    hop.expect(b"STARTTLS\r\n", b"220 2.0.0 Ready\r\n")
    hop.expect(b"EHLO guard.example\r\n", None)
    hop.endpoint.protocols[-1].connectionLost(Failure(SSL.Error("handshake failure")))
    assert len(hop.endpoint.protocols) == 2
    greet(hop, EHLO_TLS)
    hop.expect(b"MAIL FROM:<a@example.com>\r\n", b"250 2.1.0 Ok\r\n")
    assert result_of(mail).code == 250


def test_required_tls_handshake_failure_is_451():
    """tls = required: a failed handshake is 451 4.4.1, and no plain-text retry."""
    relay, hop, _ = session(tls=UpstreamTLS.REQUIRED, tls_hostname="mx.example")
    hop.endpoint.transport_class = TLSStringTransport
    mail = relay.mail(Envelope(CLIENT, "a@example.com"))
    greet(hop, EHLO_TLS)
    hop.expect(b"STARTTLS\r\n", b"220 2.0.0 Ready\r\n")
    hop.endpoint.protocols[-1].connectionLost(Failure(error.ConnectionLost("handshake failure")))
    assert result_of(mail) == replies.UPSTREAM_UNAVAILABLE
    assert len(hop.endpoint.protocols) == 1
