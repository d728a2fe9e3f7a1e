"""The ``example-subject`` scanner: a message whose Subject matches a configured
regular expression is reported as infected, every other message as clean."""

from __future__ import annotations

import re
from collections.abc import Mapping
from email import policy
from email.parser import BytesHeaderParser
from typing import Any

from smtpguard.config import options
from smtpguard.envelope import Envelope
from smtpguard.interfaces import IScanner
from smtpguard.results import ErrorKind, ScanResult, Threat
from smtpguard.spool import Message
from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

# How much of the message we read to find the header block.
HEADER_LIMIT = 256 * 1024


@implementer(IScanner)
class SubjectScanner:
    """Flags a message when any of its Subject headers (decoded, RFC 2047)
    matches ``pattern``; the threat is reported as ``threat``."""

    def __init__(
        self, pattern: re.Pattern[str], threat: str = "Example.Subject", name: str = "example-subject"
    ) -> None:
        self.name = name
        self._pattern = pattern
        self._threat = threat

    def scan(self, message: Message, envelope: Envelope) -> Deferred[ScanResult]:
        # The work is quick and local, so the answer is ready at once; a scanner
        # that waits on I/O returns a Deferred and applies its own deadline.
        return defer.succeed(self.check(message))

    def check(self, message: Message) -> ScanResult:
        """The verdict for ``message``; never raises (IScanner's contract)."""
        head = message.headers(HEADER_LIMIT)
        if message.size > len(head) and not head.endswith(b"\r\n\r\n") and head != b"\r\n":
            # The header block goes on past what we read: a Subject we have not
            # seen could match, so we cannot say "clean".
            return ScanResult.failed(ErrorKind.CONTENT_SIZE, f"header block over {HEADER_LIMIT} bytes", self.name)
        try:
            headers = BytesHeaderParser(policy=policy.default).parsebytes(head)
            subjects = [str(subject) for subject in headers.get_all("Subject", [])]
        except Exception as error:  # a header the parser chokes on: unreadable, not clean
            return ScanResult.failed(ErrorKind.CORRUPT_FILE, f"unreadable Subject: {error}", self.name)
        if any(self._pattern.search(subject) for subject in subjects):
            return ScanResult.infected((Threat(self._threat),), self.name)
        return ScanResult.clean(self.name)


def build(config: Mapping[str, Any], reactor: Any) -> SubjectScanner:
    """Build the scanner from its ``[[scanners]]`` table (``type`` already removed).

    Raises smtpguard.config.ConfigError naming the key for a bad table; smtpguard
    adds the file and the table's position.
    """
    table = options(config)
    source = table.get("pattern", str, "")
    if not source:
        raise table.error("pattern", 'is required, e.g. "invoice.*overdue"')
    flags = re.IGNORECASE if table.get("ignore_case", bool, True) else 0
    try:
        pattern = re.compile(source, flags)
    except re.error as error:
        raise table.error("pattern", f"not a valid regular expression: {error}") from None
    threat = table.get("threat", str, "Example.Subject")
    if not threat:
        raise table.error("threat", "must not be empty")
    name = table.get("name", str, "example-subject")
    table.check_unknown()
    return SubjectScanner(pattern, threat, name)
