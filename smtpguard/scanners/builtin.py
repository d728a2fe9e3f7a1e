"""The built-in scanner: pure Python, needs no daemon.  It decodes the message down to
its files (see :mod:`~smtpguard.scanners.mimewalk`) and looks for the EICAR test
file and the user's digests and byte patterns (see :mod:`~smtpguard.scanners.signatures`),
in a thread so the reactor keeps serving."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpguard.envelope import Envelope
from smtpguard.interfaces import IScanner
from smtpguard.results import ErrorKind, ScanResult, Threat
from smtpguard.scanners.deadline import with_deadline
from smtpguard.scanners.mapped import Mapped, message_data
from smtpguard.scanners.mimewalk import Limits, Stopped, Walker
from smtpguard.scanners.signatures import EICAR, EICAR_NAME, Inspection, Matcher, Signatures
from smtpguard.scanners.workers import MAX_SCANS, MAX_SCANS_PER_CLIENT, Slots, Starter, Workers
from smtpguard.spool import Message

__all__ = ["EICAR", "EICAR_NAME", "BuiltinScanner", "Limits", "Signatures"]

RAW = "(message)"
DEFAULT_TIMEOUT = 60.0

Job = Callable[[], ScanResult]
# How a scan job gets run: given the job, a Deferred that fires with its result.
RunInThread = Starter

_EICAR_ONLY = Signatures()


def distinct(threats: list[Threat]) -> tuple[Threat, ...]:
    return tuple(dict.fromkeys(threats))


@implementer(IScanner)
class BuiltinScanner:
    """Scans in threads of its own under a ``timeout`` deadline, ``max_scans`` at once
    and ``max_scans_per_client`` for one client address (see
    :mod:`~smtpguard.scanners.workers`); with no reactor (tests, embedding) it scans
    synchronously, at once.  ``run_in_thread`` replaces the threads (tests run the
    job synchronously or hold it)."""

    name = "builtin"

    def __init__(
        self,
        reactor: Any = None,
        signatures: Signatures = _EICAR_ONLY,
        limits: Limits = Limits(),
        timeout: float = DEFAULT_TIMEOUT,
        run_in_thread: RunInThread | None = None,
        max_scans: int = MAX_SCANS,
        max_scans_per_client: int = MAX_SCANS_PER_CLIENT,
    ) -> None:
        self._reactor = reactor
        self._signatures = signatures
        self._limits = limits
        self._timeout = timeout
        self._synchronous = reactor is None and run_in_thread is None
        self.slots = Slots(max_scans, max_scans_per_client)
        self._workers = Workers(reactor, self.slots, run_in_thread)

    def scan(self, message: Message, envelope: Envelope) -> Deferred[ScanResult]:
        if self._synchronous:
            return defer.succeed(self.scan_now(message))

        def job(stopped: Callable[[], bool]) -> ScanResult:
            return self.scan_now(message, stopped)

        def busy() -> ScanResult:
            return ScanResult.failed(ErrorKind.TOO_MANY_REQUESTS, "no scan slot free before the deadline", self.name)

        scanning = self._workers.run(envelope.client.address, job, busy)
        if self._reactor is not None:
            return with_deadline(scanning, self._timeout, self._reactor, self.name)

        def failed(failure: Failure) -> ScanResult:
            return ScanResult.failed(ErrorKind.OTHER, failure.getErrorMessage(), self.name)

        return scanning.addErrback(failed)

    def stop(self) -> None:
        """Stop every scan still running (each ends as a timeout) and wait briefly for
        their threads: done when the reactor shuts down."""
        self._workers.stop()

    def scan_now(self, message: Message, stopped: Callable[[], bool] = lambda: False) -> ScanResult:
        """Scan ``message`` in the calling thread; never raises.  ``stopped`` is polled:
        when it turns true the scan ends with a timeout error."""
        try:
            inspection = Inspection(self._signatures)
            with message_data(message) as data:
                problems = Walker(self._limits, inspection, stopped).walk(data if isinstance(data, Mapped) else [data])
            threats = distinct(inspection.threats)
            if not any(threat.name == EICAR_NAME for threat in threats) and self._raw_eicar(message, stopped):
                # A MIME structure mangled past our reading cannot hide the test file.
                threats += (Threat(EICAR_NAME, RAW),)
        except Stopped:
            return ScanResult.failed(ErrorKind.TIMEOUT, "stopped at the deadline", self.name)
        except Exception as error:
            return ScanResult.failed(ErrorKind.OTHER, f"{type(error).__name__}: {error}", self.name)
        if threats:
            return ScanResult.infected(threats, self.name)
        if problems:
            return ScanResult.failed(problems[0].kind, problems[0].detail, self.name)
        return ScanResult.clean(self.name)

    def _raw_eicar(self, message: Message, stopped: Callable[[], bool]) -> bool:
        found: list[Threat] = []
        matcher = Matcher(_EICAR_ONLY, RAW, found, digest=False)
        for chunk in message.chunks():
            if stopped():
                raise Stopped()
            matcher.update(chunk)
            if found:
                return True
        return False
