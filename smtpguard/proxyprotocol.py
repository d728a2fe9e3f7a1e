"""The PROXY protocol (v1 and v2) in front of a listener, accepted only from
trusted proxies.

Unlike Twisted's own wrapper, the wrapped protocol is connected only once the
header is complete, so its ``connectionMade`` (the greeting, access checks,
logs) already sees the real client's address; a header that arrives in pieces
is waited for, within a deadline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IProtocol, ITransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols import policies
from zope.interface import directlyProvides, providedBy

from smtpguard.access import Network, address_in
from smtpguard.events import Event, Report, ignore
from smtpguard.proxyheader import Endpoint, ProxyHeaderError, parse

log = Logger()


def _address(endpoint: Endpoint | None) -> IAddress | None:
    if endpoint is None:
        return None
    if ":" in endpoint.host:
        return IPv6Address("TCP", endpoint.host, endpoint.port)
    return IPv4Address("TCP", endpoint.host, endpoint.port)


class ProxyProtocolWrapper(policies.ProtocolWrapper):
    factory: ProxyProtocolFactory

    def __init__(self, factory: Any, wrappedProtocol: IProtocol) -> None:
        super().__init__(factory, wrappedProtocol)
        self._buffer = b""
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
        self._buffer += data
        try:
            header = parse(self._buffer)
        except ProxyHeaderError as error:
            return self._give_up(str(error))
        if header is None:
            return None  # the start of a header: wait for the rest
        rest, self._buffer = self._buffer[header.length :], b""
        self._source, self._destination = _address(header.source), _address(header.destination)
        self._ready = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]
        if rest:
            self.wrappedProtocol.dataReceived(rest)

    def _give_up(self, why: str) -> None:
        log.info("PROXY protocol from {peer}: {why}; closing", peer=self.transport.getPeer(), why=why)  # type: ignore[union-attr]
        self.factory.report(Event.REFUSED, "proxy")
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
    with a PROXY header; any other connection is closed at once (and ``report``
    hears of it, as of a header that is not valid or late)."""

    protocol = ProxyProtocolWrapper  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        wrapped: Any,
        trusted: Sequence[Network],
        reactor: Any,
        header_timeout: float = 10.0,
        report: Report = ignore,
    ) -> None:
        super().__init__(wrapped)  # type: ignore[no-untyped-call]
        self.report = report
        self.trusted = tuple(trusted)
        self.reactor = reactor
        self.header_timeout = header_timeout

    def buildProtocol(self, addr: IAddress | None) -> Any:
        host = addr.host if isinstance(addr, IPv4Address | IPv6Address) else None
        if host is None or not address_in(host, self.trusted):
            log.warn("PROXY protocol: connection from untrusted {addr} refused", addr=addr)
            self.report(Event.REFUSED, "proxy")
            return None
        return super().buildProtocol(addr)
