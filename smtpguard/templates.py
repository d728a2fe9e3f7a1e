"""Texts with placeholders: the notices that replace a dropped message, and the
texts of notifications.  Placeholders are ``{name}``; an unknown name stays as
written, so a typo shows instead of failing.  Values are made printable before
they go in: a decoded subject or a client's HELO cannot add a line to a notice."""

from __future__ import annotations

import string
from collections.abc import Mapping

from smtpguard.envelope import Envelope
from smtpguard.headers import printable
from smtpguard.results import ScanResult

VIRUS_NOTICE = "Your mail {client}-{server} contains contaminated file {file} with virus {threat}, so it is dropped."
ERROR_NOTICE = "Your mail {client}-{server} is dropped for {reason}."

PLACEHOLDERS = ("threat", "file", "client", "server", "sender", "recipients", "subject", "reason", "queue_id")


class _Lenient(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def render(template: str, values: Mapping[str, str]) -> str:
    """``template`` filled in with ``values``, each on one line: a tab becomes a
    space, every other control character (a CR, an LF) a visible escape."""
    safe = {name: printable(value.replace("\t", " ")) for name, value in values.items()}
    return string.Formatter().vformat(template, (), _Lenient(safe))


def values(envelope: Envelope, result: ScanResult, reason: str, subject: str, queue_id: str) -> dict[str, str]:
    """The placeholder values for one message."""
    client = envelope.client
    threats = result.threats
    return {
        "threat": ", ".join(threat.name for threat in threats) or "-",
        "file": ", ".join(threat.file for threat in threats if threat.file) or "(message)",
        "client": f"{client.address or 'unknown'}:{client.port}",
        "server": f"{client.server_address}:{client.server_port}",
        "sender": envelope.sender or "<>",
        "recipients": ", ".join(recipient.address for recipient in envelope.recipients),
        "subject": subject,
        "reason": reason,
        "queue_id": queue_id,
    }
