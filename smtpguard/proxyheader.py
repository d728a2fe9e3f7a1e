"""The PROXY protocol header (HAProxy's proxy-protocol.txt, version 1 text and
version 2 binary): parsing only, no I/O.

Only what a TCP listener can use is accepted: TCP over IPv4 or IPv6, or a header
that says to keep the connection's own addresses (v1 ``UNKNOWN``, v2 ``LOCAL``
or ``UNSPEC``).  Anything else, or anything that does not match the
specification exactly, is an error: the connection is then closed.
"""

from __future__ import annotations

import ipaddress
import re
import struct

import attrs

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX_LENGTH = 107  # CRLF included
_V2_FIXED = 16  # signature, version and command, family and protocol, length
_V1_TCP = re.compile(rb"PROXY (TCP4|TCP6) (\S+) (\S+) (0|[1-9][0-9]{0,4}) (0|[1-9][0-9]{0,4})")
_V1_UNKNOWN = re.compile(rb"PROXY UNKNOWN(?: [^\r\n]*)?")
_V2_LOCAL, _V2_PROXY = 0x20, 0x21
_V2_UNSPEC, _V2_TCP4, _V2_TCP6 = 0x00, 0x11, 0x21
_V2_ADDRESSES = {_V2_TCP4: ("!4s4sHH", "TCP over IPv4"), _V2_TCP6: ("!16s16sHH", "TCP over IPv6")}


class ProxyHeaderError(ValueError):
    """Not a PROXY header smtpguard accepts; the message says why."""


@attrs.frozen
class Endpoint:
    host: str  # canonical text form: 192.0.2.1, 2001:db8::1
    port: int


@attrs.frozen
class ProxyHeader:
    """A complete header: the client and the address it connected to, both None
    when the connection's own addresses stand (a proxy's health check)."""

    source: Endpoint | None
    destination: Endpoint | None
    length: int  # bytes the header took; the client's data follows


def parse(data: bytes) -> ProxyHeader | None:
    """The header ``data`` starts with, or None while ``data`` is the start of one.

    @raise ProxyHeaderError: ``data`` cannot start a header this module accepts.
    """
    if data.startswith(V1_SIGNATURE):
        return _v1(data)
    if data.startswith(V2_SIGNATURE):
        return _v2(data)
    if V1_SIGNATURE.startswith(data) or V2_SIGNATURE.startswith(data):
        return None
    raise ProxyHeaderError("not a PROXY header")


def _v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyHeaderError("v1 header without CRLF within 107 bytes")
        return None
    if data[end - 1 : end] != b"\r":
        raise ProxyHeaderError("v1 header ends with a bare LF")
    line = data[: end - 1]
    if _V1_UNKNOWN.fullmatch(line):
        return ProxyHeader(None, None, end + 1)
    match = _V1_TCP.fullmatch(line)
    if match is None:
        raise ProxyHeaderError(f"malformed v1 header {line!r}")
    family, source, destination, source_port, destination_port = match.groups()
    version = 4 if family == b"TCP4" else 6
    return ProxyHeader(
        Endpoint(_text_address(source, version), _port(source_port)),
        Endpoint(_text_address(destination, version), _port(destination_port)),
        end + 1,
    )


def _text_address(text: bytes, version: int) -> str:
    try:
        # "%" would let a zone index through; IPv4Address already refuses leading zeros.
        if b"%" in text:
            raise ValueError(text)
        address = ipaddress.ip_address(text.decode("ascii"))
    except ValueError:
        raise ProxyHeaderError(f"v1 header: {text!r} is not an IPv{version} address") from None
    if address.version != version:
        raise ProxyHeaderError(f"v1 header: {text!r} is not an IPv{version} address")
    return str(address)


def _port(text: bytes) -> int:
    number = int(text)
    if number > 65535:
        raise ProxyHeaderError(f"v1 header: port {number} is out of range")
    return number


def _v2(data: bytes) -> ProxyHeader | None:
    if len(data) < _V2_FIXED:
        return None
    command, family = data[12], data[13]
    (length,) = struct.unpack_from("!H", data, 14)
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyHeaderError(f"v2 header: version and command 0x{command:02x}, not 0x20 or 0x21")
    total = _V2_FIXED + length
    if len(data) < total:
        return None
    if command == _V2_LOCAL or family == _V2_UNSPEC:
        return ProxyHeader(None, None, total)
    if family not in _V2_ADDRESSES:
        raise ProxyHeaderError(f"v2 header: family and protocol 0x{family:02x}, not TCP over IPv4 or IPv6")
    layout, name = _V2_ADDRESSES[family]
    if length < struct.calcsize(layout):
        raise ProxyHeaderError(f"v2 header: {length} address bytes, fewer than {name} takes")
    source, destination, source_port, destination_port = struct.unpack_from(layout, data, _V2_FIXED)
    # Type-length-value fields may follow the addresses, within ``length``: skipped.
    return ProxyHeader(
        Endpoint(str(ipaddress.ip_address(source)), source_port),
        Endpoint(str(ipaddress.ip_address(destination)), destination_port),
        total,
    )
