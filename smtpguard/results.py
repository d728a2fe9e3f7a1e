"""What scanners find and what policies decide: values only."""

from __future__ import annotations

from enum import Enum

import attrs

from smtpguard.replies import Reply


class Verdict(Enum):
    CLEAN = "clean"
    INFECTED = "infected"
    ERROR = "error"


class ErrorKind(Enum):
    """Why a scan failed: the fallback classes of security appliances."""

    ENGINE_NOT_READY = "engine-not-ready"
    TIMEOUT = "timeout"
    TOO_MANY_REQUESTS = "too-many-requests"
    OUT_OF_RESOURCES = "out-of-resources"
    CONTENT_SIZE = "content-size"
    DECOMPRESS_LAYER = "decompress-layer"
    CORRUPT_FILE = "corrupt-file"
    PASSWORD_PROTECTED = "password-protected"
    OTHER = "other"


@attrs.frozen
class Threat:
    name: str
    file: str = ""


@attrs.frozen
class SizeLimit:
    """The largest message a scanner takes, in bytes, and where that is set:
    ``setting`` is the key in the scanner's table (``stream_max_length``), and
    ``advice`` says what must change with it outside smtpguard, if anything."""

    size: int
    setting: str = ""
    advice: str = ""


@attrs.frozen
class ScanResult:
    """The outcome of scanning one message.  ``scanner`` names who produced it."""

    verdict: Verdict
    scanner: str = ""
    threats: tuple[Threat, ...] = ()
    error: ErrorKind | None = None
    detail: str = ""

    @classmethod
    def clean(cls, scanner: str = "") -> ScanResult:
        return cls(Verdict.CLEAN, scanner)

    @classmethod
    def infected(cls, threats: tuple[Threat, ...], scanner: str = "") -> ScanResult:
        if not threats:
            raise ValueError("an infected result names at least one threat")
        return cls(Verdict.INFECTED, scanner, threats=threats)

    @classmethod
    def failed(cls, kind: ErrorKind, detail: str = "", scanner: str = "") -> ScanResult:
        return cls(Verdict.ERROR, scanner, error=kind, detail=detail)

    def status(self) -> str:
        """The value of the X-Virus-Status header for this result."""
        if self.verdict is Verdict.CLEAN:
            return "clean"
        if self.verdict is Verdict.INFECTED:
            return "infected (" + ", ".join(t.name for t in self.threats) + ")"
        assert self.error is not None
        return f"unchecked ({self.error.value})"


class Action(Enum):
    DELIVER = "deliver"  # relay the message (status headers added, subject maybe tagged)
    REPLACE = "replace"  # relay the original headers with the body replaced by a notice
    REJECT = "reject"  # 5xx to the client, nothing relayed
    DEFER = "defer"  # 4xx to the client, nothing relayed: it retries later
    DISCARD = "discard"  # 250 to the client, nothing relayed


class Notice(Enum):
    """Who is told about a message that was not delivered as sent."""

    SENDER = "sender"
    ADMIN = "admin"


@attrs.frozen
class Decision:
    """What to do with a message.

    ``reply`` is what the client hears when nothing is relayed (when something is,
    the client hears the next hop's reply); ``reason`` says why in words for
    notices and logs; ``subject_tag`` is appended to the Subject of a delivered
    message; ``quarantine`` keeps a copy of the original.
    """

    action: Action
    reply: Reply | None = None
    reason: str = ""
    subject_tag: str | None = None
    quarantine: bool = False
    notices: frozenset[Notice] = frozenset()
    notice: str | None = None  # REPLACE: the template of the text that replaces the body

    @property
    def relays(self) -> bool:
        """Whether something goes to the next hop."""
        return self.action in (Action.DELIVER, Action.REPLACE)
