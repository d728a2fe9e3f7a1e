"""What one finished transaction was: the value the transaction log writes and
the metrics count, handed to every observer the pipeline is given."""

from __future__ import annotations

from collections.abc import Callable

import attrs

from smtpguard.envelope import Envelope
from smtpguard.replies import Reply
from smtpguard.results import Action, ScanResult


@attrs.frozen
class ScannerRun:
    """One scanner's result for the message and the seconds it took."""

    scanner: str
    result: ScanResult
    seconds: float


@attrs.frozen
class Timings:
    """Seconds spent on the message: receiving it (from DATA or the first BDAT to
    its end), scanning it, and relaying it (until the next hop's reply)."""

    receiving: float = 0.0
    scanning: float = 0.0
    relaying: float = 0.0


@attrs.frozen
class Transaction:
    """One message's way through smtpguard, from its end of data to the reply.

    ``action`` is None when no decision was reached (a local error);
    ``next_hop`` is the next hop's reply to the end of data, None when nothing
    was relayed."""

    id: str
    listener: str
    envelope: Envelope
    size: int
    result: ScanResult
    action: Action | None
    reply: Reply
    scans: tuple[ScannerRun, ...] = ()
    next_hop: Reply | None = None
    timings: Timings = Timings()


TransactionObserver = Callable[[Transaction], None]
