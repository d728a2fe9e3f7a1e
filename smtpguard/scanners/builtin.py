"""The built-in scanner: pure Python, needs no daemon.  It decodes the message down to
its files (see :mod:`~smtpguard.scanners.mimewalk`) and looks for the EICAR test
file and the user's digests and byte patterns (see :mod:`~smtpguard.scanners.signatures`),
in a thread so the reactor keeps serving."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpguard.envelope import Envelope
from smtpguard.interfaces import IScanner
from smtpguard.results import ErrorKind, ScanResult, Threat
from smtpguard.scanners.deadline import with_deadline
from smtpguard.scanners.mimewalk import Limits, Stopped, Walker
from smtpguard.scanners.signatures import EICAR, EICAR_NAME, Inspection, Matcher, Signatures
from smtpguard.spool import Message

__all__ = ["EICAR", "EICAR_NAME", "BuiltinScanner", "Limits", "Signatures"]

RAW = "(message)"
DEFAULT_TIMEOUT = 60.0

Job = Callable[[], ScanResult]
# How a scan job gets run: given the job, a Deferred that fires with its result.
RunInThread = Callable[[Job], "Deferred[ScanResult]"]

_EICAR_ONLY = Signatures()


def distinct(threats: list[Threat]) -> tuple[Threat, ...]:
    return tuple(dict.fromkeys(threats))


@implementer(IScanner)
class BuiltinScanner:
    """Scans in ``reactor``'s thread pool under a ``timeout`` deadline; with no reactor
    (tests, embedding) it scans synchronously, at once.  ``run_in_thread`` replaces
    the thread pool (tests run the job synchronously or hold it)."""

    name = "builtin"

    def __init__(
        self,
        reactor: Any = None,
        signatures: Signatures = _EICAR_ONLY,
        limits: Limits = Limits(),
        timeout: float = DEFAULT_TIMEOUT,
        run_in_thread: RunInThread | None = None,
    ) -> None:
        self._reactor = reactor
        self._signatures = signatures
        self._limits = limits
        self._timeout = timeout
        self._run_in_thread = run_in_thread

    def scan(self, message: Message, envelope: Envelope) -> Deferred[ScanResult]:
        stop = threading.Event()

        def job() -> ScanResult:
            return self.scan_now(message, stop.is_set)

        if self._reactor is None and self._run_in_thread is None:
            return defer.succeed(job())
        try:
            scanning = (self._run_in_thread or self._in_thread_pool)(job)
        except Exception:
            scanning = defer.fail()

        def abandoned(failure: Failure) -> Failure:
            stop.set()  # past the deadline (or cancelled): let the thread give up early
            return failure

        scanning.addErrback(abandoned)
        if self._reactor is not None:
            return with_deadline(scanning, self._timeout, self._reactor, self.name)

        def failed(failure: Failure) -> ScanResult:
            return ScanResult.failed(ErrorKind.OTHER, failure.getErrorMessage(), self.name)

        return scanning.addErrback(failed)

    def _in_thread_pool(self, job: Job) -> Deferred[ScanResult]:
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), job)

    def scan_now(self, message: Message, stopped: Callable[[], bool] = lambda: False) -> ScanResult:
        """Scan ``message`` in the calling thread; never raises.  ``stopped`` is polled:
        when it turns true the scan ends with a timeout error."""
        try:
            inspection = Inspection(self._signatures)
            problems = Walker(self._limits, inspection, stopped).walk(message.chunks())
            threats = distinct(inspection.threats)
            if not any(threat.name == EICAR_NAME for threat in threats) and self._raw_eicar(message):
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

    def _raw_eicar(self, message: Message) -> bool:
        found: list[Threat] = []
        matcher = Matcher(_EICAR_ONLY, RAW, found, digest=False)
        for chunk in message.chunks():
            matcher.update(chunk)
            if found:
                return True
        return False
