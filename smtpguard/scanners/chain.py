"""Several scanners as one: ``all`` (every scanner must pass) and ``failover``
(a backup runs only when the one before it fails), as amavisd-new offers."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from smtpguard.envelope import Envelope
from smtpguard.interfaces import IScanner
from smtpguard.results import ScanResult, Verdict
from smtpguard.scanners.deadline import scan_safely
from smtpguard.spool import Message


def combine(results: Sequence[ScanResult], name: str) -> ScanResult:
    """Any infection wins (all threats named); otherwise the first error; else clean."""
    threats = tuple(threat for result in results for threat in result.threats)
    if threats:
        return ScanResult.infected(threats, name)
    for result in results:
        if result.verdict is Verdict.ERROR:
            return result
    return ScanResult.clean(name)


def _checked(scanners: Sequence[IScanner]) -> tuple[IScanner, ...]:
    if not scanners:
        raise ValueError("at least one scanner is needed")
    return tuple(scanners)


@implementer(IScanner)
class AllScanners:
    """Every scanner looks at the message, side by side; it is clean only if all
    say so."""

    def __init__(self, scanners: Sequence[IScanner]) -> None:
        self._scanners = _checked(scanners)
        self.name = "+".join(scanner.name for scanner in self._scanners)

    def scan(self, message: Message, envelope: Envelope) -> Deferred[ScanResult]:
        if len(self._scanners) == 1:
            return scan_safely(self._scanners[0], message, envelope)
        scans = [scan_safely(scanner, message, envelope) for scanner in self._scanners]
        return defer.gatherResults(scans, consumeErrors=True).addCallback(combine, self.name)


@implementer(IScanner)
class FailoverScanners:
    """The first scanner decides; the next one is asked only when it could not
    (an error result), and so on.  When all fail, the last error stands."""

    def __init__(self, scanners: Sequence[IScanner]) -> None:
        self._scanners = _checked(scanners)
        self.name = "|".join(scanner.name for scanner in self._scanners)

    def scan(self, message: Message, envelope: Envelope) -> Deferred[ScanResult]:
        return Deferred.fromCoroutine(self._scan(message, envelope))

    async def _scan(self, message: Message, envelope: Envelope) -> ScanResult:
        result = ScanResult.clean(self.name)  # replaced: there is at least one scanner
        for scanner in self._scanners:
            result = await scan_safely(scanner, message, envelope)
            if result.verdict is not Verdict.ERROR:
                return result
        return result
