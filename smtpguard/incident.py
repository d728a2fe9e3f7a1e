"""What notifiers and the quarantine learn about one message that was scanned."""

from __future__ import annotations

import attrs

from smtpguard.envelope import Envelope
from smtpguard.results import Decision, ScanResult


@attrs.frozen
class Incident:
    transaction_id: str
    envelope: Envelope
    result: ScanResult
    decision: Decision
    headers: bytes  # the original header section, without the empty line
    time: float  # seconds since the epoch
    subject: str = ""
