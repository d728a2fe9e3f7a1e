"""The built-in scanner: needs no daemon.  For now it finds the EICAR test file
anywhere in the raw message."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from smtpguard.envelope import Envelope
from smtpguard.interfaces import IScanner
from smtpguard.results import ScanResult, Threat
from smtpguard.spool import Message

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_NAME = "Eicar-Test-Signature"


def contains(message: Message, pattern: bytes) -> bool:
    """Whether ``pattern`` occurs in ``message``, across chunk boundaries too."""
    overlap = len(pattern) - 1
    tail = b""
    for chunk in message.chunks():
        window = tail + chunk
        if pattern in window:
            return True
        tail = window[-overlap:]
    return False


@implementer(IScanner)
class BuiltinScanner:
    name = "builtin"

    def scan(self, message: Message, envelope: Envelope) -> Deferred[ScanResult]:
        if contains(message, EICAR):
            return defer.succeed(ScanResult.infected((Threat(EICAR_NAME),), self.name))
        return defer.succeed(ScanResult.clean(self.name))
