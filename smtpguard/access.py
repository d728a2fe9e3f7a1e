"""Who may connect and how much: allowed client networks, connections and
messages per client address, and who may say who the client is (XFORWARD,
XCLIENT)."""

from __future__ import annotations

import ipaddress
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence

import attrs

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_SWEEP_AT = 10_000


def networks(values: Iterable[str]) -> tuple[Network, ...]:
    """Parse ``192.0.2.0/24``, ``::1`` ...; raises ValueError naming the bad one."""
    return tuple(ipaddress.ip_network(value, strict=False) for value in values)


def address_in(address: str, allowed: Sequence[Network]) -> bool:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    return any(parsed in network for network in allowed)


@attrs.frozen
class AccessRules:
    """``allowed_clients`` empty: everybody.  Limits of 0: none."""

    allowed_clients: tuple[Network, ...] = ()
    # As Postfix's smtpd_client_connection_count_limit: one address cannot take
    # every slot of max_connections.
    max_connections_per_client: int = 50
    max_messages_per_client: int = 0  # within ``rate_window`` seconds
    rate_window: float = 60.0
    # Hosts whose XFORWARD or XCLIENT is accepted (and offered): Postfix's
    # smtpd_authorized_xforward_hosts and smtpd_authorized_xclient_hosts.  Empty:
    # nobody can claim another address.
    xforward_hosts: tuple[Network, ...] = ()
    xclient_hosts: tuple[Network, ...] = ()

    def allows(self, address: str) -> bool:
        return not self.allowed_clients or address_in(address, self.allowed_clients)

    def may_xforward(self, address: str) -> bool:
        return address_in(address, self.xforward_hosts)

    def may_xclient(self, address: str) -> bool:
        return address_in(address, self.xclient_hosts)


class ClientCounters:
    """Open connections and recent messages per client address.

    ``refused_connections`` counts the connections refused for
    ``max_connections_per_client`` since the start, for metrics.  ``rules`` may
    be replaced (a reload): the counts stay, the new limits apply from then on.
    """

    def __init__(self, rules: AccessRules) -> None:
        self.rules = rules
        self._connections: dict[str, int] = defaultdict(int)
        self._messages: dict[str, deque[float]] = defaultdict(deque)
        self.refused_connections = 0

    def connect(self, address: str) -> bool:
        """Count a new connection; False (and not counted) when over the limit."""
        limit = self.rules.max_connections_per_client
        if limit and self._connections.get(address, 0) >= limit:
            self.refused_connections += 1
            return False
        self._connections[address] += 1
        return True

    def disconnect(self, address: str) -> None:
        self._connections[address] -= 1
        if self._connections[address] <= 0:
            del self._connections[address]

    def message(self, address: str, now: float) -> bool:
        """Count a message started now; False (and not counted) when over the rate."""
        limit = self.rules.max_messages_per_client
        if not limit:
            return True
        if len(self._messages) > _SWEEP_AT:
            self._sweep(now)
        recent = self._messages[address]
        while recent and recent[0] <= now - self.rules.rate_window:
            recent.popleft()
        if len(recent) >= limit:
            return False
        recent.append(now)
        return True

    def _sweep(self, now: float) -> None:
        """Forget addresses with no message inside the window: memory stays bounded."""
        horizon = now - self.rules.rate_window
        for address in [address for address, recent in self._messages.items() if not recent or recent[-1] <= horizon]:
            del self._messages[address]
