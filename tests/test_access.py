"""Access control (allowed networks, per-client connection and message limits)
and the PROXY protocol, with the real client address behind a proxy."""

from __future__ import annotations

import json
import re
import smtplib
import socket
import struct
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from smtpguard import config as configuration
from smtpguard import replies, tap
from smtpguard.access import AccessRules, ClientCounters, networks
from smtpguard.capture import capture_factory
from smtpguard.config import ConfigError
from smtpguard.proxyprotocol import ProxyProtocolFactory
from smtpguard.replies import Reply
from smtpguard.server import ESMTPServer
from tests.conftest import listen
from tests.test_hostile import FOLLOW_UP, GREETING, RawClient, open_silent
from tests.test_integration import guard_config, lf
from tests.test_server import HOST, HOSTNAME, Session

# -- unit: admission and limits -------------------------------------------------------


def opened(**access) -> Session:
    return Session.open(access=AccessRules(**access))


def test_client_outside_allowed_networks_is_refused_at_connect():
    """A client outside allowed_clients gets 554 5.7.1 instead of the greeting, and is closed."""
    session = opened(allowed_clients=networks(["192.0.2.0/24"]))
    assert session.replies() == [replies.ACCESS_DENIED.to_bytes()]
    assert session.closed


def test_client_inside_allowed_networks_is_greeted():
    """A client inside allowed_clients is greeted."""
    session = opened(allowed_clients=networks(["127.0.0.0/8"]))
    assert session.replies() == [replies.SERVICE_READY.with_text(f"{HOSTNAME} ESMTP smtpguard").to_bytes()]


def test_connections_per_client_are_limited():
    """Beyond max_connections_per_client from one address: 421 4.7.0; a slot frees when one closes."""
    first = opened(max_connections_per_client=1)
    first.replies()
    second = first.another()
    assert second.replies() == [replies.TOO_MANY_CLIENT_CONNECTIONS.to_bytes()]
    second.lose()
    first.lose()
    third = first.another()
    assert third.replies()[0].startswith(b"220 ")


def test_messages_per_client_are_rate_limited():
    """Beyond max_messages_per_client within the window, MAIL gets 450 4.7.1 until the window moves on."""
    session = opened(max_messages_per_client=2, rate_window=60.0).hello()
    for _ in range(2):
        session.send(b"MAIL FROM:<a@example.com>\r\nRSET\r\n")
    session.replies()
    session.send(b"MAIL FROM:<a@example.com>\r\n")
    assert session.replies() == [replies.RATE_LIMITED.to_bytes()]
    session.clock.advance(60.0)
    session.send(b"MAIL FROM:<a@example.com>\r\n")
    assert session.replies() == [replies.SENDER_OK.to_bytes()]


def test_rate_counters_forget_idle_addresses():
    """Addresses without recent messages are forgotten: memory stays bounded."""
    counters = ClientCounters(AccessRules(max_messages_per_client=5, rate_window=10.0))
    for number in range(10_001):
        counters.message(f"10.0.{number // 256}.{number % 256}", now=0.0)
    counters.message("192.0.2.1", now=100.0)
    assert list(counters._messages) == ["192.0.2.1"]  # the sweep forgot every address idle past the window


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ({"allowed_clients": ["10.0.0.300"]}, "server.allowed_clients:"),
        ({"max_connections_per_client": -1}, "server.max_connections_per_client: must be 0"),
        ({"proxy_protocol": True}, "server.trusted_proxies: proxy_protocol needs"),
        ({"trusted_proxies": ["x"]}, "server.trusted_proxies:"),
    ],
)
def test_access_settings_errors_name_the_key(server, message):
    """Bad access and PROXY settings stop the start with the key."""
    data = {"server": server, "upstream": {"endpoint": "tcp:127.0.0.1:1"}, "scanners": [{"type": "builtin"}]}
    with pytest.raises(ConfigError) as raised:
        configuration.parse(data, "f.toml")
    assert str(raised.value).startswith(f"f.toml: {message}")


def test_listeners_inherit_and_override():
    """[[listeners]] inherit the [server] access rules and set their own, with their own policy keys."""
    loaded = configuration.parse(
        {
            "server": {"listen": ["tcp:25"], "allowed_clients": ["192.0.2.0/24"]},
            "listeners": [
                {
                    "endpoint": "tcp:10587",
                    "proxy_protocol": True,
                    "trusted_proxies": ["127.0.0.1"],
                    "policy": {"on_virus": "discard"},
                }
            ],
            "upstream": {"endpoint": "tcp:127.0.0.1:1"},
            "scanners": [{"type": "builtin"}],
        },
        "f.toml",
    )
    inbound, submission = loaded.listeners
    assert inbound.access.allowed_clients == submission.access.allowed_clients == networks(["192.0.2.0/24"])
    assert (inbound.proxy_protocol, submission.proxy_protocol) == (False, True)
    assert submission.policy == {"on_virus": "discard"}
    from twisted.application.internet import StreamServerEndpointService

    listening = [
        child for child in tap.build_service(loaded, reactor) if isinstance(child, StreamServerEndpointService)
    ]
    assert [isinstance(child.factory, ProxyProtocolFactory) for child in listening] == [False, True]


# -- PROXY protocol over real sockets ---------------------------------------------------


def v2_header(source: str, port: int) -> bytes:
    addresses = socket.inet_aton(source) + socket.inet_aton("198.51.100.1") + struct.pack("!HH", port, 25)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


async def proxied_guard(listening, tmp_path: Path, trusted: str = "127.0.0.1", **server) -> tuple[int, Path]:
    captured = tmp_path / "captured"
    hop = await listen(listening, capture_factory(reactor, str(captured)))
    data = {"server": server, "upstream": {"endpoint": f"tcp:127.0.0.1:{hop}"}, "scanners": [{"type": "builtin"}]}
    guard = tap.build_factory(configuration.parse(data, "test"), reactor)
    port = await listen(listening, ProxyProtocolFactory(guard, networks([trusted]), reactor, header_timeout=2.0))
    return port, captured


def converse(port: int, header: bytes, piecewise: bool = False) -> bytes:
    """Send ``header`` then a whole SMTP transaction; everything the server said."""
    session = (
        b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
        b"Subject: proxied\r\n\r\nhello\r\n.\r\nQUIT\r\n"
    )
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        try:
            if piecewise:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a segment per byte
                for byte in header:
                    client.sendall(bytes([byte]))
            else:
                client.sendall(header)
            client.sendall(session)
            while chunk := client.recv(65536):
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass  # closed by an abort: what came before is the answer
    return received


@pytest.mark.parametrize(
    ("header", "piecewise"),
    [
        (b"PROXY TCP4 203.0.113.5 198.51.100.1 40000 25\r\n", False),
        (b"PROXY TCP4 203.0.113.5 198.51.100.1 40000 25\r\n", True),
        (v2_header("203.0.113.5", 40000), False),
        (v2_header("203.0.113.5", 40000), True),
    ],
    ids=["v1", "v1-byte-by-byte", "v2", "v2-byte-by-byte"],
)
@pytest_twisted.ensureDeferred
async def test_proxied_client_address_is_the_real_one(listening, tmp_path, header, piecewise):
    """Behind a trusted proxy, the client's real address is what the session sees and passes on."""
    port, captured = await proxied_guard(listening, tmp_path)
    said = await threads.deferToThread(converse, port, header, piecewise)
    after_ehlo = said.split(b"\r\n250 ", 1)[1].split(b"\r\n", 1)[1]
    envelope = (replies.SENDER_OK, replies.RECIPIENT_OK, replies.START_DATA)
    assert re.fullmatch(
        re.escape(b"".join(reply.to_bytes() for reply in envelope))
        + rb"250 2\.0\.0 Ok: queued as [0-9a-f]{16}\r\n"
        + re.escape(replies.CLOSING.to_bytes()),
        after_ehlo,
    ), said
    (meta,) = [json.loads(path.read_text()) for path in captured.glob("*.json")]
    (eml,) = [path.read_bytes() for path in captured.glob("*.eml")]
    assert eml.startswith(b"Received: from client.example ([203.0.113.5])")
    assert meta["sender"] == "a@example.org"


@pytest_twisted.ensureDeferred
async def test_untrusted_proxy_source_is_closed(listening, tmp_path):
    """A connection from outside trusted_proxies is closed before any greeting."""
    port, captured = await proxied_guard(listening, tmp_path, trusted="192.0.2.0/24")
    said = await threads.deferToThread(converse, port, b"PROXY TCP4 203.0.113.5 198.51.100.1 40000 25\r\n")
    assert said == b""
    assert not captured.exists() or not list(captured.glob("*.eml"))


@pytest.mark.parametrize("header", [b"EHLO client.example\r\n", b"PROXY TCP4 not-an-address x 1 2\r\n"])
@pytest_twisted.ensureDeferred
async def test_malformed_proxy_header_is_closed(listening, tmp_path, header):
    """No PROXY header, or a malformed one, closes the connection without a greeting."""
    port, _ = await proxied_guard(listening, tmp_path)
    said = await threads.deferToThread(converse, port, header)
    assert said == b""


@pytest_twisted.ensureDeferred
async def test_allowed_clients_apply_to_the_proxied_address(listening, tmp_path):
    """allowed_clients judge the real client behind the proxy, not the proxy."""
    port, _ = await proxied_guard(listening, tmp_path, allowed_clients=["127.0.0.0/8"])
    said = await threads.deferToThread(converse, port, b"PROXY TCP4 203.0.113.5 198.51.100.1 40000 25\r\n")
    assert said == replies.ACCESS_DENIED.to_bytes()


# -- crowds: one address cannot take every slot ------------------------------------------


def connect_from(session: Session, host: str) -> tuple[ESMTPServer, StringTransport]:
    """A further connection to ``session``'s factory from ``host``."""
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000), hostAddress=HOST)
    proto: ESMTPServer = session.factory.buildProtocol(transport.getPeer())  # type: ignore[assignment]
    proto.makeConnection(transport)
    return proto, transport


def test_a_thousand_idle_connections_from_one_address_leave_room_for_others() -> None:
    """With the default settings, 1,000 idle connections from one address: 50 are
    greeted, 950 hear 421 4.7.0 and are closed, and a client from another address
    is still greeted; the factory counts the 950 refusals."""
    session = Session.open()
    session.replies()
    greeted = refused = 0
    for _ in range(1000):
        proto, transport = connect_from(session, "192.0.2.66")
        if transport.value() == replies.TOO_MANY_CLIENT_CONNECTIONS.to_bytes() and transport.disconnecting:
            refused += 1
            proto.connectionLost(Failure(ConnectionDone()))
        elif transport.value().startswith(b"220 "):
            greeted += 1
    _, other = connect_from(session, "198.51.100.7")

    assert (greeted, refused) == (50, 950)
    assert other.value() == replies.SERVICE_READY.with_text(f"{HOSTNAME} ESMTP smtpguard").to_bytes()
    assert session.factory.refused_client_connections == 950


def test_per_client_limit_is_50_by_default_and_0_turns_it_off() -> None:
    """max_connections_per_client is 50 unless set; 0 means no limit."""
    base = {"upstream": {"endpoint": "tcp:127.0.0.1:1"}, "scanners": [{"type": "builtin"}]}
    assert configuration.parse(base, "f.toml").server.access.max_connections_per_client == 50
    unlimited = configuration.parse({**base, "server": {"max_connections_per_client": 0}}, "f.toml")
    session = Session.open(access=unlimited.server.access)
    transports = [connect_from(session, "192.0.2.66")[1] for _ in range(60)]
    assert all(transport.value().startswith(b"220 ") for transport in transports)
    assert session.factory.refused_client_connections == 0


@pytest_twisted.ensureDeferred
async def test_crowd_from_one_address_on_real_sockets(listening, smtp_sink) -> None:
    """Over real sockets with the default settings: of 60 silent connections from
    127.0.0.1, 50 are greeted and 10 hear 421 4.7.0 and are closed; meanwhile a
    client from 127.0.0.2 sends a message that reaches smtp-sink."""
    factory = tap.build_factory(guard_config(smtp_sink.endpoint), reactor)
    port = await listen(listening, factory, "tcp:0:interface=127.0.0.1:backlog=128")
    opened = await threads.deferToThread(open_silent, port, 60)
    try:
        answers = [reply for _, reply in opened]
        assert answers == [GREETING] * 50 + [replies.TOO_MANY_CLIENT_CONNECTIONS] * 10
        closed = await threads.deferToThread(lambda: [client.closed_by_server() for client, _ in opened[50:]])
        assert closed == [True] * 10
        sent = await threads.deferToThread(send_from, "127.0.0.2", port, FOLLOW_UP)
        assert sent == [(250, b"2.1.0 Ok"), (250, b"2.1.5 Ok"), (250, b"2.0.0 Ok")]
        [dump] = await threads.deferToThread(smtp_sink.messages, 1)
        assert dump.endswith(lf(FOLLOW_UP) + b"\n")
        assert factory.refused_client_connections == 10
    finally:
        for client, _ in opened:
            client.close()


def send_from(source: str, port: int, message: bytes) -> list[tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", source_address=(source, 0)) as client:
        client.ehlo()
        return [client.mail("alice@example.org"), client.rcpt("bob@example.net"), client.data(message)]


def proxied_greeting(port: int, source: str) -> tuple[RawClient, Reply]:
    """A connection through the proxy for the real client ``source``, left open, and its first reply."""
    client = RawClient(port, timeout=10.0)
    client.send(f"PROXY TCP4 {source} 198.51.100.1 40000 25\r\n".encode())
    return client, client.reply()


@pytest_twisted.ensureDeferred
async def test_proxy_protocol_listener_counts_the_real_client(listening, tmp_path) -> None:
    """Behind a PROXY-protocol proxy (every connection from 127.0.0.1), the limit
    applies to the real client: a second connection of 203.0.113.5 hears 421
    4.7.0 while 203.0.113.6, through the same proxy, is greeted."""
    port, _ = await proxied_guard(listening, tmp_path, max_connections_per_client=1)
    first, first_reply = await threads.deferToThread(proxied_greeting, port, "203.0.113.5")
    second, second_reply = await threads.deferToThread(proxied_greeting, port, "203.0.113.5")
    other, other_reply = await threads.deferToThread(proxied_greeting, port, "203.0.113.6")
    for client in (first, second, other):
        client.close()

    greeting = replies.SERVICE_READY.with_text("localhost ESMTP smtpguard")
    assert (first_reply, second_reply, other_reply) == (greeting, replies.TOO_MANY_CLIENT_CONNECTIONS, greeting)
