"""Scans that always end in a verdict: a hard deadline, and no exception that
could let a message through unscanned."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from smtpguard.envelope import Envelope
from smtpguard.interfaces import IScanner
from smtpguard.results import ErrorKind, ScanResult
from smtpguard.spool import Message

log = Logger()

T = TypeVar("T")


def _as_error(failure: Failure, scanner: str) -> ScanResult:
    if failure.check(defer.TimeoutError, defer.CancelledError):
        failure.raiseException()  # cancelled by a deadline further out, which reports it
    log.failure("scanner {name} failed", failure, name=scanner)
    return ScanResult.failed(ErrorKind.OTHER, failure.getErrorMessage(), scanner)


def _timed_out(failure: Failure, scanner: str, seconds: float) -> ScanResult:
    if failure.check(defer.TimeoutError, defer.CancelledError):
        return ScanResult.failed(ErrorKind.TIMEOUT, f"no verdict within {seconds:g} s", scanner)
    return _as_error(failure, scanner)


def with_deadline(scanning: Deferred[ScanResult], seconds: float, reactor: Any, scanner: str) -> Deferred[ScanResult]:
    """``scanning``, cancelled after ``seconds``; never fails.

    A timeout becomes ``ScanResult.failed(ErrorKind.TIMEOUT)``; any other failure
    (a bug in a scanner) is logged and becomes ``ErrorKind.OTHER``, so a broken
    scanner can never let a message through as clean.
    """
    return within(scanning, seconds, reactor, scanner, _same)


def within(
    scanning: Deferred[T], seconds: float, reactor: Any, scanner: str, cut: Callable[[ScanResult], T]
) -> Deferred[T]:
    """As :func:`with_deadline`, for a scan that fires with something else than
    a ScanResult: ``cut`` makes that of the timeout or failure result."""
    return scanning.addTimeout(seconds, reactor).addErrback(lambda failure: cut(_timed_out(failure, scanner, seconds)))


def _same(result: ScanResult) -> ScanResult:
    return result


def scan_safely(scanner: IScanner, message: Message, envelope: Envelope) -> Deferred[ScanResult]:
    """``scanner.scan(message, envelope)``, with any exception, raised or in the
    Deferred, turned into an ``ErrorKind.OTHER`` result."""
    try:
        scanning: Deferred[ScanResult] = scanner.scan(message, envelope)
    except Exception:
        return defer.succeed(_as_error(Failure(), scanner.name))
    return scanning.addErrback(_as_error, scanner.name)
