"""What notifiers and the quarantine learn about one message that was scanned."""

from __future__ import annotations

import attrs

from smtpguard.envelope import Envelope, Recipient
from smtpguard.replies import Reply
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


@attrs.frozen
class Relayed:
    """A message a next hop without DSN has taken: ``recipients`` asked to hear of
    its delivery (NOTIFY=SUCCESS) and get a "relayed" DSN instead (RFC 3461
    section 4.1), quoting ``reply``, the next hop's to the end of data, and naming
    it ``remote_mta`` when its name is known."""

    recipients: tuple[Recipient, ...]
    reply: Reply
    remote_mta: str | None = None
