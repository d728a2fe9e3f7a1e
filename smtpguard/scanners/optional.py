"""What a scanner may offer beyond ``scan``: the largest message it takes
(``max_size``), letting go of what it holds (:class:`IClosable`) and whether
its engines answer (:class:`IHealthReporting`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from smtpguard.interfaces import IClosable, IHealthReporting, IScanner
from smtpguard.results import ErrorKind, ScanResult, SizeLimit

if TYPE_CHECKING:
    from smtpguard.tables import Table

log = Logger()


@attrs.frozen
class EndpointHealth:
    """One engine endpoint of a scanner and whether it answered when last used
    or checked."""

    scanner: str
    endpoint: str
    up: bool


@attrs.frozen
class Health:
    """Whether a scanner can scan now (``working``; else ``problem`` says why) and
    what is known of each of its endpoints."""

    working: bool
    endpoints: tuple[EndpointHealth, ...] = ()
    problem: str = ""


def health(scanner: IScanner) -> Health:
    """``scanner``'s health; one that does not report it (the built-in scanner,
    say) needs no engine and always works."""
    if not IHealthReporting.providedBy(scanner):
        return Health(True)
    return scanner.health()  # type: ignore[attr-defined,no-any-return]


def check(scanner: IScanner) -> Deferred[None]:
    """Have ``scanner`` ask its endpoints how they are now; never fails."""
    if not IHealthReporting.providedBy(scanner):
        return succeed(None)
    return release(f"checking scanner {scanner.name}", scanner.check)  # type: ignore[attr-defined]


def size_limit(scanner: IScanner) -> SizeLimit | None:
    """``scanner``'s ``max_size``, or None when it takes any size.

    @raise TypeError: when ``max_size`` is something else than a SizeLimit (a bug
        in the scanner, reported at start rather than guessed at).
    """
    limit = getattr(scanner, "max_size", None)
    if limit is not None and not isinstance(limit, SizeLimit):
        raise TypeError(f"scanner {scanner.name!r}: max_size must be a SizeLimit or None, got {limit!r}")
    return limit


def largest_message(table: Table) -> int | None:
    """The ``max_size`` key of a scanner's table: the largest message, in bytes,
    that the engine behind it takes; absent or 0 for no limit."""
    size = table.get("max_size", int, 0)
    if size < 0:
        raise table.error("max_size", f"must be 0 (no limit) or more, got {size}")
    return size or None


def oversize(size: int, limit: SizeLimit | None, scanner: str) -> ScanResult | None:
    """The ``content-size`` error for a message of ``size`` bytes over ``limit``,
    or None when it fits."""
    if limit is None or size <= limit.size:
        return None
    return ScanResult.failed(ErrorKind.CONTENT_SIZE, f"{size} bytes, more than {limit.setting} ({limit.size})", scanner)


def release(what: str, close: Callable[[], Any]) -> Deferred[None]:
    """``close()``, waited for when it returns a Deferred; a failure is logged
    (a bug in ``what``), never passed on, so one part cannot keep the rest open."""

    def failed(failure: Failure) -> None:
        log.failure("closing {what} failed", failure, what=what)

    return maybeDeferred(close).addCallbacks(lambda _: None, failed)


def close(scanner: IScanner) -> Deferred[None]:
    """Close ``scanner`` if it is :class:`IClosable`; never fails."""
    if not IClosable.providedBy(scanner):
        return succeed(None)
    return release(f"scanner {scanner.name}", scanner.close)  # type: ignore[attr-defined]


def close_all(scanners: Iterable[IScanner]) -> Deferred[None]:
    """Close every one of ``scanners`` at once; fires when all are closed."""
    return gatherResults([close(scanner) for scanner in scanners]).addCallback(lambda _: None)
