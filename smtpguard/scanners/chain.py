"""Several scanners as one: ``all`` (every scanner must pass) and ``failover``
(a backup runs only when the one before it fails), as amavisd-new offers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from smtpguard.envelope import Envelope
from smtpguard.interfaces import IClosable, IHealthReporting, IScanner
from smtpguard.results import ScanResult, SizeLimit, Verdict
from smtpguard.scanners.deadline import scan_safely
from smtpguard.scanners.optional import Health, check, close_all, health, size_limit
from smtpguard.spool import Message
from smtpguard.transaction import ScannerRun


def combine(results: Sequence[ScanResult], name: str) -> ScanResult:
    """Any infection wins (all threats named); otherwise the first error; else clean."""
    threats = tuple(threat for result in results for threat in result.threats)
    if threats:
        return ScanResult.infected(threats, name)
    for result in results:
        if result.verdict is Verdict.ERROR:
            return result
    return ScanResult.clean(name)


@attrs.frozen
class Scanned:
    """A scan's result, and the result and time of each scanner that took part."""

    result: ScanResult
    runs: tuple[ScannerRun, ...]


class _Untimed:
    """The clock of a scan whose times nobody reads."""

    def seconds(self) -> float:
        return 0.0


def scan_timed(scanner: IScanner, message: Message, envelope: Envelope, clock: Any) -> Deferred[Scanned]:
    """``scanner``'s scan of ``message`` (never failing, as :func:`scan_safely`),
    with each scanner's own run when ``scanner`` is a chain, timed by ``clock``."""
    timed = getattr(scanner, "scan_timed", None)
    if timed is not None:
        scanning: Deferred[Scanned] = timed(message, envelope, clock)
        return scanning
    started = clock.seconds()

    def ran(result: ScanResult) -> Scanned:
        return Scanned(result, (ScannerRun(scanner.name, result, clock.seconds() - started),))

    return scan_safely(scanner, message, envelope).addCallback(ran)


def _runs(scans: Sequence[Scanned]) -> tuple[ScannerRun, ...]:
    return tuple(run for scanned in scans for run in scanned.runs)


def _result(scanned: Scanned) -> ScanResult:
    return scanned.result


def _checked(scanners: Sequence[IScanner]) -> tuple[IScanner, ...]:
    if not scanners:
        raise ValueError("at least one scanner is needed")
    return tuple(scanners)


def _limits(scanners: Sequence[IScanner]) -> list[SizeLimit | None]:
    """Each scanner's limit, its setting named as seen from the chain's table
    (``scanners[1].stream_max_length``)."""
    limits: list[SizeLimit | None] = []
    for index, scanner in enumerate(scanners):
        limit = size_limit(scanner)
        if limit is not None:
            where = f"scanners[{index}]"
            limit = attrs.evolve(limit, setting=f"{where}.{limit.setting}" if limit.setting else where)
        limits.append(limit)
    return limits


def _size(limit: SizeLimit) -> int:
    return limit.size


def _health(scanners: Sequence[IScanner], needs_all: bool) -> Health:
    """The chain's health: it works when all its members do (``needs_all``), or
    any one of them."""
    members = [health(scanner) for scanner in scanners]
    working = all(member.working for member in members) if needs_all else any(m.working for m in members)
    endpoints = tuple(endpoint for member in members for endpoint in member.endpoints)
    problem = "" if working else "; ".join(member.problem for member in members if not member.working)
    return Health(working, endpoints, problem)


def _check(scanners: Sequence[IScanner]) -> Deferred[None]:
    return defer.gatherResults([check(scanner) for scanner in scanners]).addCallback(lambda _: None)


@implementer(IScanner, IClosable, IHealthReporting)
class AllScanners:
    """Every scanner looks at the message, side by side; it is clean only if all
    say so.  So the largest message it takes is the smallest any of them takes."""

    def __init__(self, scanners: Sequence[IScanner]) -> None:
        self._scanners = _checked(scanners)
        self.name = "+".join(scanner.name for scanner in self._scanners)

    def scan(self, message: Message, envelope: Envelope) -> Deferred[ScanResult]:
        return self.scan_timed(message, envelope, _Untimed()).addCallback(_result)

    def scan_timed(self, message: Message, envelope: Envelope, clock: Any) -> Deferred[Scanned]:
        if len(self._scanners) == 1:
            return scan_timed(self._scanners[0], message, envelope, clock)
        scans = [scan_timed(scanner, message, envelope, clock) for scanner in self._scanners]
        return defer.gatherResults(scans, consumeErrors=True).addCallback(self._combined)

    def _combined(self, scans: list[Scanned]) -> Scanned:
        return Scanned(combine([scanned.result for scanned in scans], self.name), _runs(scans))

    @property
    def max_size(self) -> SizeLimit | None:
        limits = [limit for limit in _limits(self._scanners) if limit is not None]
        return min(limits, key=_size, default=None)

    def close(self) -> Deferred[None]:
        return close_all(self._scanners)

    def health(self) -> Health:
        return _health(self._scanners, needs_all=True)

    def check(self) -> Deferred[None]:
        return _check(self._scanners)


@implementer(IScanner, IClosable, IHealthReporting)
class FailoverScanners:
    """The first scanner decides; the next one is asked only when it could not
    (an error result), and so on.  When all fail, the last error stands.  A
    message too big for one goes on to the next, so the largest message it takes
    is the largest any of them takes."""

    def __init__(self, scanners: Sequence[IScanner]) -> None:
        self._scanners = _checked(scanners)
        self.name = "|".join(scanner.name for scanner in self._scanners)

    def scan(self, message: Message, envelope: Envelope) -> Deferred[ScanResult]:
        return self.scan_timed(message, envelope, _Untimed()).addCallback(_result)

    def scan_timed(self, message: Message, envelope: Envelope, clock: Any) -> Deferred[Scanned]:
        return Deferred.fromCoroutine(self._scan(message, envelope, clock))

    async def _scan(self, message: Message, envelope: Envelope, clock: Any) -> Scanned:
        scans: list[Scanned] = []
        for scanner in self._scanners:
            scans.append(await scan_timed(scanner, message, envelope, clock))
            if scans[-1].result.verdict is not Verdict.ERROR:
                break
        # There is at least one scanner; when all failed, the last error stands.
        return Scanned(scans[-1].result, _runs(scans))

    @property
    def max_size(self) -> SizeLimit | None:
        limits = _limits(self._scanners)
        known = [limit for limit in limits if limit is not None]
        return max(known, key=_size) if len(known) == len(limits) else None

    def close(self) -> Deferred[None]:
        return close_all(self._scanners)

    def health(self) -> Health:
        return _health(self._scanners, needs_all=False)

    def check(self) -> Deferred[None]:
        return _check(self._scanners)
