"""What the parts of smtpguard report as it happens, for the metrics: a part is
given a :class:`Report` and calls it with an :class:`Event` and the event's
labels.  The default, :func:`ignore`, reports nothing, so a part embedded
without metrics costs nothing."""

from __future__ import annotations

from enum import Enum
from typing import Protocol


class Event(Enum):
    """Each event, with the labels it is reported with (after the listener, for
    the reports a listener's parts make)."""

    SESSION = "session"  # a client session ended: (outcome)
    REFUSED = "refused"  # a client refused: (reason: access, proxy, xforward, xclient)
    RATE_LIMITED = "rate-limited"  # (limit: max_connections, max_connections_per_client, ...)
    NOTICE_QUEUED = "notice-queued"  # (kind)
    NOTICE_SENT = "notice-sent"  # (kind)
    NOTICE_FAILED = "notice-failed"  # given up: (kind, outcome: dropped, expired, lost)
    QUARANTINE_STORED = "quarantine-stored"  # ()
    QUARANTINE_RELEASED = "quarantine-released"  # ()
    # An end of data answered before the scan (too big, the spool failed): (reply class)
    MESSAGE_REFUSED = "message-refused"


class Report(Protocol):
    def __call__(self, event: Event, *labels: str) -> None: ...


def ignore(event: Event, *labels: str) -> None:
    """Report nothing."""
