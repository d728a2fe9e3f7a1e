"""A hard deadline for a scan: past it the result is a ``timeout`` error, whatever
the engine is doing."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from smtpguard.results import ErrorKind, ScanResult

log = Logger()


def with_deadline(scanning: Deferred[ScanResult], seconds: float, reactor: Any, scanner: str) -> Deferred[ScanResult]:
    """``scanning``, cancelled after ``seconds``; never fails.

    A timeout becomes ``ScanResult.failed(ErrorKind.TIMEOUT)``; any other failure
    (a bug in a scanner) is logged and becomes ``ErrorKind.OTHER``, so a broken
    scanner can never let a message through as clean.
    """

    def failed(failure: Failure) -> ScanResult:
        if failure.check(defer.TimeoutError, defer.CancelledError):
            return ScanResult.failed(ErrorKind.TIMEOUT, f"no verdict within {seconds:g} s", scanner)
        log.failure("scanner {name} failed", failure, name=scanner)
        return ScanResult.failed(ErrorKind.OTHER, failure.getErrorMessage(), scanner)

    return scanning.addTimeout(seconds, reactor).addErrback(failed)


def start_scan(scan: Any, *arguments: Any) -> Deferred[ScanResult]:
    """Call ``scan(*arguments)``; a synchronous exception becomes a failed Deferred."""
    try:
        result: Deferred[ScanResult] = scan(*arguments)
    except Exception:
        return defer.fail()
    return result
