"""Whether smtpguard is ready for mail (``/readyz``): every listener listening,
every scanner able to scan, and the next hop reachable recently."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed

from smtpguard.metrics import Watched
from smtpguard.scanners.optional import check, health

# A next hop that nothing tried to reach for this long is probed rather than
# assumed to be as it was.
RECENT = 30.0
# How many scanners one answer asks at most, while reloads replace them.
_CHECKS = 3


class Readiness:
    """Looks at ``watched()`` (the parts in force) when asked."""

    def __init__(self, reactor: Any, watched: Any, recent: float = RECENT) -> None:
        self._reactor = reactor
        self._watched = watched
        self._recent = recent

    def check(self) -> Deferred[str]:
        """Fires with "" when ready, else with why not (one line); never fails.
        The scanners ask their engines first (clamd's PING, ICAP's OPTIONS)."""
        parts: Watched = self._watched()
        if parts.scanner is None:
            return self._ready(parts)
        return check(parts.scanner).addCallback(self._checked, parts.scanner, 1)

    def _checked(self, _: object, scanner: Any, checks: int) -> Deferred[str]:
        parts: Watched = self._watched()
        # A reload while the engines were asked closes the scanner they were
        # asked for (its PINGs cancelled): the answer is the new scanner's.
        if parts.scanner is not None and parts.scanner is not scanner and checks < _CHECKS:
            return check(parts.scanner).addCallback(self._checked, parts.scanner, checks + 1)
        return self._ready(parts)

    def _ready(self, parts: Watched) -> Deferred[str]:
        idle = [listener for listener, factory in parts.listeners.items() if factory.numPorts < 1]
        if not parts.listeners:
            return succeed("no listener")
        if idle:
            return succeed(f"not listening on {', '.join(idle)}")
        if parts.scanner is not None:
            scanners = health(parts.scanner)
            if not scanners.working:
                return succeed(f"no working scanner: {scanners.problem}")
        if parts.upstream is None:
            return succeed("")
        upstream = parts.upstream
        reachability = upstream.reachability
        last = reachability.last_attempt
        if last is None or self._reactor.seconds() - last > self._recent:
            return upstream.probe().addCallback(lambda _: _next_hop(upstream))
        return succeed(_next_hop(upstream))


def _next_hop(upstream: Any) -> str:
    reachability = upstream.reachability
    return "" if reachability.reachable else f"next hop unreachable: {reachability.problem}"
