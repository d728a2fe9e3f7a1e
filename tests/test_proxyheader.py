"""The PROXY protocol header parser, against headers built byte by byte from
HAProxy's proxy-protocol.txt (section 2.1 for v1, 2.2 for v2); and the wrapper
that puts it in front of a listener, driven with StringTransport and a Clock."""

from __future__ import annotations

import socket
import struct

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from smtpguard.access import networks
from smtpguard.proxyheader import Endpoint, ProxyHeader, ProxyHeaderError, parse
from smtpguard.proxyprotocol import ProxyProtocolFactory

SIGNATURE = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"  # 2.2: the 12-byte block
LOCAL, PROXY = 0x20, 0x21  # version 2 in the high nibble, command in the low one
UNSPEC, TCP4, UDP4, TCP6, UNIX_STREAM = 0x00, 0x11, 0x12, 0x21, 0x31
CLIENT_DATA = b"EHLO client.example\r\n"


def v2(command: int, family: int, block: bytes) -> bytes:
    """A v2 header: signature, version and command, family and protocol, length, block."""
    return SIGNATURE + bytes([command, family]) + struct.pack("!H", len(block)) + block


def inet4(source: str, destination: str, source_port: int, destination_port: int) -> bytes:
    return (
        socket.inet_pton(socket.AF_INET, source)
        + socket.inet_pton(socket.AF_INET, destination)
        + struct.pack("!HH", source_port, destination_port)
    )


def inet6(source: str, destination: str, source_port: int, destination_port: int) -> bytes:
    return (
        socket.inet_pton(socket.AF_INET6, source)
        + socket.inet_pton(socket.AF_INET6, destination)
        + struct.pack("!HH", source_port, destination_port)
    )


# A PP2_TYPE_AUTHORITY (0x02) TLV after the addresses: part of the header, ignored.
AUTHORITY_TLV = b"\x02" + struct.pack("!H", 14) + b"mx.example.com"
V1_TCP4 = b"PROXY TCP4 203.0.113.5 198.51.100.1 40000 25\r\n"

VALID = {
    "v1-tcp4": (V1_TCP4, Endpoint("203.0.113.5", 40000), Endpoint("198.51.100.1", 25)),
    "v1-tcp6": (
        b"PROXY TCP6 2001:DB8::5 2001:db8:0:0:0:0:0:1 65535 0\r\n",
        Endpoint("2001:db8::5", 65535),
        Endpoint("2001:db8::1", 0),
    ),
    "v1-longest": (
        b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
        Endpoint("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
        Endpoint("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
    ),
    "v1-unknown": (b"PROXY UNKNOWN\r\n", None, None),
    "v1-unknown-with-addresses": (b"PROXY UNKNOWN ::1 ::1 1 2\r\n", None, None),
    "v2-tcp4": (
        v2(PROXY, TCP4, inet4("203.0.113.5", "198.51.100.1", 40000, 25)),
        Endpoint("203.0.113.5", 40000),
        Endpoint("198.51.100.1", 25),
    ),
    "v2-tcp4-with-tlv": (
        v2(PROXY, TCP4, inet4("192.0.2.7", "192.0.2.1", 1, 587) + AUTHORITY_TLV),
        Endpoint("192.0.2.7", 1),
        Endpoint("192.0.2.1", 587),
    ),
    "v2-tcp6": (
        v2(PROXY, TCP6, inet6("2001:db8::5", "2001:db8::1", 40000, 25)),
        Endpoint("2001:db8::5", 40000),
        Endpoint("2001:db8::1", 25),
    ),
    "v2-local": (v2(LOCAL, UNSPEC, b""), None, None),
    "v2-local-with-addresses": (v2(LOCAL, TCP4, inet4("192.0.2.7", "192.0.2.1", 1, 25)), None, None),
    "v2-unspec": (v2(PROXY, UNSPEC, b""), None, None),
}


@pytest.mark.parametrize(("header", "source", "destination"), VALID.values(), ids=VALID.keys())
def test_a_valid_header_gives_its_addresses_and_length(
    header: bytes, source: Endpoint | None, destination: Endpoint | None
) -> None:
    """A header as the specification writes it gives the client's and the
    destination's address and port (None when the connection's own stand), and
    its exact length: what follows it is the client's."""
    assert parse(header + CLIENT_DATA) == ProxyHeader(source, destination, len(header))


@pytest.mark.parametrize("header", [header for header, _, _ in VALID.values()], ids=VALID.keys())
def test_every_start_of_a_valid_header_waits_for_more(header: bytes) -> None:
    """However a header is cut (one byte, the v2 signature alone, the fixed 16
    bytes without the addresses), each start of it asks for more bytes."""
    assert [parse(header[:end]) for end in range(len(header))] == [None] * len(header)


MALFORMED = {
    "smtp": (b"EHLO client.example\r\n", "not a PROXY header"),
    "lowercase": (b"proxy TCP4 203.0.113.5 198.51.100.1 40000 25\r\n", "not a PROXY header"),
    "port-not-a-number": (
        b"PROXY TCP4 203.0.113.5 198.51.100.1 abc 25\r\n",
        "malformed v1 header b'PROXY TCP4 203.0.113.5 198.51.100.1 abc 25'",
    ),
    "port-with-leading-zero": (
        b"PROXY TCP4 203.0.113.5 198.51.100.1 040000 25\r\n",
        "malformed v1 header b'PROXY TCP4 203.0.113.5 198.51.100.1 040000 25'",
    ),
    "port-out-of-range": (b"PROXY TCP4 203.0.113.5 198.51.100.1 65536 25\r\n", "v1 header: port 65536 is out of range"),
    "address-with-leading-zero": (
        b"PROXY TCP4 203.0.113.05 198.51.100.1 40000 25\r\n",
        "v1 header: b'203.0.113.05' is not an IPv4 address",
    ),
    "ipv6-in-tcp4": (
        b"PROXY TCP4 2001:db8::5 198.51.100.1 40000 25\r\n",
        "v1 header: b'2001:db8::5' is not an IPv4 address",
    ),
    "ipv4-in-tcp6": (
        b"PROXY TCP6 203.0.113.5 2001:db8::1 40000 25\r\n",
        "v1 header: b'203.0.113.5' is not an IPv6 address",
    ),
    "zone-index": (
        b"PROXY TCP6 fe80::1%eth0 2001:db8::1 40000 25\r\n",
        "v1 header: b'fe80::1%eth0' is not an IPv6 address",
    ),
    "hostname": (
        b"PROXY TCP4 client.example 198.51.100.1 40000 25\r\n",
        "v1 header: b'client.example' is not an IPv4 address",
    ),
    "two-spaces": (
        b"PROXY TCP4  203.0.113.5 198.51.100.1 40000 25\r\n",
        "malformed v1 header b'PROXY TCP4  203.0.113.5 198.51.100.1 40000 25'",
    ),
    "trailing-field": (
        b"PROXY TCP4 203.0.113.5 198.51.100.1 40000 25 x\r\n",
        "malformed v1 header b'PROXY TCP4 203.0.113.5 198.51.100.1 40000 25 x'",
    ),
    "udp4": (
        b"PROXY UDP4 203.0.113.5 198.51.100.1 40000 25\r\n",
        "malformed v1 header b'PROXY UDP4 203.0.113.5 198.51.100.1 40000 25'",
    ),
    "bare-lf": (b"PROXY TCP4 203.0.113.5 198.51.100.1 40000 25\n", "v1 header ends with a bare LF"),
    "no-crlf-in-107-bytes": (b"PROXY UNKNOWN " + b"x" * 93, "v1 header without CRLF within 107 bytes"),
    "v2-version-1": (
        SIGNATURE + bytes([0x11, TCP4]) + struct.pack("!H", 12) + inet4("192.0.2.7", "192.0.2.1", 1, 25),
        "v2 header: version and command 0x11, not 0x20 or 0x21",
    ),
    "v2-command-2": (
        v2(0x22, TCP4, inet4("192.0.2.7", "192.0.2.1", 1, 25)),
        "v2 header: version and command 0x22, not 0x20 or 0x21",
    ),
    "v2-udp": (
        v2(PROXY, UDP4, inet4("192.0.2.7", "192.0.2.1", 1, 25)),
        "v2 header: family and protocol 0x12, not TCP over IPv4 or IPv6",
    ),
    "v2-unix": (
        v2(PROXY, UNIX_STREAM, b"/a".ljust(108, b"\0") + b"/b".ljust(108, b"\0")),
        "v2 header: family and protocol 0x31, not TCP over IPv4 or IPv6",
    ),
    "v2-short-addresses": (
        v2(PROXY, TCP4, b"\xc0\x00\x02\x07\xc0\x00\x02\x01"),
        "v2 header: 8 address bytes, fewer than TCP over IPv4 takes",
    ),
}


@pytest.mark.parametrize(("data", "problem"), MALFORMED.values(), ids=MALFORMED.keys())
def test_anything_but_an_exact_header_is_refused(data: bytes, problem: str) -> None:
    """What does not match the specification exactly, or is not TCP, is refused
    with the reason (the connection is then closed)."""
    with pytest.raises(ProxyHeaderError) as raised:
        parse(data + CLIENT_DATA)
    assert str(raised.value) == problem


def test_a_v1_line_is_refused_as_soon_as_107_bytes_hold_no_crlf() -> None:
    """The specification's limit: 107 bytes without CRLF are refused without waiting for more."""
    assert parse(b"PROXY UNKNOWN " + b"x" * 92) is None
    with pytest.raises(ProxyHeaderError):
        parse(b"PROXY UNKNOWN " + b"x" * 93)


# -- the wrapper ------------------------------------------------------------------------


class Recorder(Protocol):
    def __init__(self) -> None:
        self.peers: list[object] = []
        self.received = b""

    def connectionMade(self) -> None:
        self.peers.append((self.transport.getPeer(), self.transport.getHost()))  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def wrapped(clock: Clock) -> tuple[Recorder, StringTransport, object]:
    recorder = Recorder()
    factory = ProxyProtocolFactory(Factory.forProtocol(lambda: recorder), networks(["127.0.0.1"]), clock, 10.0)
    proxy = IPv4Address("TCP", "127.0.0.1", 50000)
    protocol = factory.buildProtocol(proxy)
    transport = StringTransport(peerAddress=proxy, hostAddress=IPv4Address("TCP", "127.0.0.1", 10025))
    protocol.makeConnection(transport)
    return recorder, transport, protocol


@pytest.mark.parametrize("header", [V1_TCP4, VALID["v2-tcp4"][0]], ids=["v1", "v2"])
def test_the_session_starts_after_the_last_byte_of_the_header_with_the_real_client(header: bytes) -> None:
    """Fed one byte at a time, the wrapped session is connected only once the
    header is complete, sees the client's address and port and the proxied
    destination, and receives exactly the bytes after the header."""
    recorder, transport, protocol = wrapped(Clock())
    for index in range(len(header)):
        assert recorder.peers == []
        protocol.dataReceived(header[index : index + 1])  # type: ignore[attr-defined]
    protocol.dataReceived(CLIENT_DATA)  # type: ignore[attr-defined]
    assert recorder.peers == [(IPv4Address("TCP", "203.0.113.5", 40000), IPv4Address("TCP", "198.51.100.1", 25))]
    assert recorder.received == CLIENT_DATA
    assert not transport.disconnecting


def test_a_local_header_keeps_the_connection_addresses() -> None:
    """A v2 LOCAL header (a proxy's health check): the session sees the proxy's own connection."""
    recorder, _, protocol = wrapped(Clock())
    protocol.dataReceived(VALID["v2-local"][0])  # type: ignore[attr-defined]
    assert recorder.peers == [(IPv4Address("TCP", "127.0.0.1", 50000), IPv4Address("TCP", "127.0.0.1", 10025))]


def test_an_ipv6_client_is_an_ipv6_address() -> None:
    """The client of a TCP6 header is an IPv6Address."""
    recorder, _, protocol = wrapped(Clock())
    protocol.dataReceived(VALID["v1-tcp6"][0])  # type: ignore[attr-defined]
    assert recorder.peers == [(IPv6Address("TCP", "2001:db8::5", 65535), IPv6Address("TCP", "2001:db8::1", 0))]


def test_a_malformed_header_aborts_without_a_session() -> None:
    """A malformed header aborts the connection; the wrapped session never starts."""
    recorder, transport, protocol = wrapped(Clock())
    protocol.dataReceived(MALFORMED["port-not-a-number"][0])  # type: ignore[attr-defined]
    assert (recorder.peers, transport.value(), transport.disconnecting) == ([], b"", True)


def test_a_header_that_does_not_come_in_time_aborts() -> None:
    """The start of a header and then silence: aborted at the header deadline, not before."""
    clock = Clock()
    recorder, transport, protocol = wrapped(clock)
    protocol.dataReceived(V1_TCP4[:10])  # type: ignore[attr-defined]
    clock.advance(9.999)
    assert transport.disconnecting is False
    clock.advance(0.001)
    assert (recorder.peers, transport.disconnecting) == ([], True)
