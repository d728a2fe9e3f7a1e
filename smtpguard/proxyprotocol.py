"""The PROXY protocol (v1 and v2) in front of a listener, accepted only from
trusted proxies.

Unlike Twisted's own wrapper, the wrapped protocol is connected only once the
header is complete, so its ``connectionMade`` (the greeting, access checks,
logs) already sees the real client's address; a header that arrives in pieces
is waited for, within a deadline.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IProtocol, ITransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from zope.interface import directlyProvides, providedBy

from smtpguard.access import Network, address_in

log = Logger()

_V1_PREFIX = b"PROXY "
_V2_PREFIX = V2Parser.PREFIX


def _is_ip(address: IAddress) -> bool:
    try:
        ipaddress.ip_address(getattr(address, "host", ""))
    except ValueError:
        return False
    return True


class ProxyProtocolWrapper(policies.ProtocolWrapper):
    factory: ProxyProtocolFactory

    def __init__(self, factory: Any, wrappedProtocol: IProtocol) -> None:
        super().__init__(factory, wrappedProtocol)
        self._buffer = b""
        self._parser: V1Parser | V2Parser | None = None
        self._source: IAddress | None = None
        self._destination: IAddress | None = None
        self._ready = False
        self._deadline: Any = None

    def makeConnection(self, transport: ITransport) -> None:
        # ProtocolWrapper would connect the wrapped protocol here, before the
        # header told who the client is.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        self.factory.registerProtocol(self)  # type: ignore[no-untyped-call]
        self._deadline = self.factory.reactor.callLater(self.factory.header_timeout, self._give_up, "no header in time")

    def dataReceived(self, data: bytes) -> None:
        if self._ready:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._parser is None:
            self._buffer += data
            if self._buffer.startswith(_V1_PREFIX):
                self._parser = V1Parser()
            elif self._buffer.startswith(_V2_PREFIX):
                self._parser = V2Parser()
            elif _V1_PREFIX.startswith(self._buffer) or _V2_PREFIX.startswith(self._buffer):
                return None  # the start of either: wait for more
            else:
                return self._give_up("not a PROXY header")
            data, self._buffer = self._buffer, b""
        try:
            info, rest = self._parser.feed(data)
        except InvalidProxyHeader:
            return self._give_up("malformed PROXY header")
        if info is None:
            return None
        if not all(_is_ip(address) for address in (info.source, info.destination) if address is not None):
            return self._give_up("malformed PROXY header")
        self._source, self._destination = info.source, info.destination
        self._ready = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]
        if rest:
            self.wrappedProtocol.dataReceived(rest)

    def _give_up(self, why: str) -> None:
        log.info("PROXY protocol from {peer}: {why}; closing", peer=self.transport.getPeer(), why=why)  # type: ignore[union-attr]
        self.transport.abortConnection()  # type: ignore[union-attr]

    def getPeer(self) -> IAddress:
        return self._source or self.transport.getPeer()  # type: ignore[union-attr]

    def getHost(self) -> IAddress:
        return self._destination or self.transport.getHost()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        if self._ready:
            super().connectionLost(reason)  # type: ignore[no-untyped-call]
        else:
            self.factory.unregisterProtocol(self)  # type: ignore[no-untyped-call]


class ProxyProtocolFactory(policies.WrappingFactory):
    """Wraps a listening factory: connections from ``trusted`` networks must start
    with a PROXY header; any other connection is closed at once."""

    protocol = ProxyProtocolWrapper  # type: ignore[assignment]
    noisy = False

    def __init__(self, wrapped: Any, trusted: Sequence[Network], reactor: Any, header_timeout: float = 10.0) -> None:
        super().__init__(wrapped)  # type: ignore[no-untyped-call]
        self.trusted = tuple(trusted)
        self.reactor = reactor
        self.header_timeout = header_timeout

    def buildProtocol(self, addr: IAddress | None) -> Any:
        host = addr.host if isinstance(addr, IPv4Address | IPv6Address) else None
        if host is None or not address_in(host, self.trusted):
            log.warn("PROXY protocol: connection from untrusted {addr} refused", addr=addr)
            return None
        return super().buildProtocol(addr)
