"""What one finished transaction was: the value the transaction log writes and
the metrics count, handed to every observer the pipeline is given."""

from __future__ import annotations

import re
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

    ``action`` is None when no decision was carried out: a local error, or a
    message refused after its scan (a header section too big to read, content
    the next hop could not take); ``reason`` is the decision's reason in words;
    ``next_hop`` is the relay's reply to the message, None when nothing was
    relayed."""

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
    reason: str = ""

    @property
    def queued_as(self) -> str:
        """The next hop's queue id for the message, "" when its reply names none."""
        if self.next_hop is None or not self.next_hop.positive:
            return ""
        return queue_id(self.next_hop.text)


TransactionObserver = Callable[[Transaction], None]


# The forms MTAs name their queue id in: Postfix (and smtp-sink, Haraka's
# "queued as"), Exim's "id=", sendmail's and OpenSMTPD's "<id> Message accepted
# for delivery", Haraka's "Message Queued (<id>)", Exchange's "InternalId=".
_QUEUE_ID = (
    re.compile(r"\bqueued as <?([\w.@-]+?)>?(?:\s|$|[),;])", re.I),
    re.compile(r"\bid=([\w.-]+)", re.I),
    re.compile(r"(?:^|[\s:])([\w.-]+) Message accepted for delivery", re.I),
    re.compile(r"\bMessage Queued \(([\w.@-]+)\)", re.I),
    re.compile(r"\bInternalId=(\d+)", re.I),
)


def queue_id(text: str) -> str:
    """The queue id a next hop names in the text of its reply to a message, ""
    when it names none in a form known here."""
    for pattern in _QUEUE_ID:
        match = pattern.search(text)
        if match is not None:
            return match.group(1)
    return ""
