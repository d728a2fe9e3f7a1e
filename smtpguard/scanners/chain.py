"""Several scanners as one."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from smtpguard.envelope import Envelope
from smtpguard.interfaces import IScanner
from smtpguard.results import ScanResult, Verdict
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


@implementer(IScanner)
class AllScanners:
    """Every scanner looks at the message; it is clean only if all say so."""

    def __init__(self, scanners: Sequence[IScanner]) -> None:
        if not scanners:
            raise ValueError("at least one scanner is needed")
        self._scanners = tuple(scanners)
        self.name = "+".join(scanner.name for scanner in scanners)

    def scan(self, message: Message, envelope: Envelope) -> Deferred[ScanResult]:
        if len(self._scanners) == 1:
            return self._scanners[0].scan(message, envelope)
        scans = [scanner.scan(message, envelope) for scanner in self._scanners]
        return defer.gatherResults(scans).addCallback(combine, self.name)
