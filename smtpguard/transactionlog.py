"""The transaction log: one twisted.logger event per finished transaction, its
fields plain JSON values under stable names (docs/logging.md), its text a
Postfix-like line.

The text is never built here: the event's format refers to its fields, so
only an observer that writes text formats it."""

from __future__ import annotations

import os
import sys
from typing import IO, Any

from twisted.application import service
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    globalLogPublisher,
    jsonFileLogObserver,
    textFileLogObserver,
)
from zope.interface import implementer

from smtpguard.config import ConfigError, LogSettings
from smtpguard.envelope import Client, Hop, namaddr
from smtpguard.headers import printable
from smtpguard.replies import Reply
from smtpguard.results import ScanResult
from smtpguard.transaction import ScannerRun, Transaction

NAMESPACE = "smtpguard.transaction"
_STDOUT: IO[str] = sys.__stdout__ or sys.stdout
log = Logger(namespace=NAMESPACE)

# The line, in pieces: those in brackets only when the transaction has them.
# client=... [via=... [ident=...] [login=...]] [tls=...] from=<...> rcpts=N
# size=N status=... action=... reply=... [relay=...] [queued_as=...] delays=r/s/t
_HEAD = "{transaction_id}: client={client[namaddr]}"
_VIA = " via={client[hop][command]}{client[hop][namaddr]}"
_IDENT = " ident={client[ident]}"
_LOGIN = " login={client[login]!a}"
_TLS = " tls={client[tls_version]}:{client[tls_cipher]}"
_MIDDLE = " from=<{sender}> rcpts={rcpt_count} size={size} status={result[status]} action={action}"
_REPLY = " reply=({reply[line]})"
_RELAY = " relay=({next_hop[line]})"
_QUEUED = " queued_as={queued_as}"
_TAIL = " delays={timings[receiving]}/{timings[scanning]}/{timings[relaying]}"


def log_transaction(transaction: Transaction) -> None:
    """A :data:`~smtpguard.transaction.TransactionObserver`: logs ``transaction``
    as one event in the ``smtpguard.transaction`` namespace."""
    fields = transaction_fields(transaction)
    # Formatted here, by str.format in C: twisted.logger's own formatter, in
    # Python, cost more than the rest of the logging (and every text observer,
    # as twistd's log is, formats each event).
    log.info("{line}", line=_format(fields).format_map(fields), **fields)


def _format(fields: dict[str, Any]) -> str:
    client = fields["client"]
    pieces = [_HEAD]
    if client["hop"] is not None:
        pieces += [_VIA, _IDENT if client["ident"] else "", _LOGIN if client["login"] else ""]
    pieces += [_TLS if client["tls_version"] else "", _MIDDLE, _REPLY]
    pieces += [_RELAY if fields["next_hop"] is not None else "", _QUEUED if fields["queued_as"] else "", _TAIL]
    return "".join(pieces)


def transaction_fields(transaction: Transaction) -> dict[str, Any]:
    """The event's fields for ``transaction``: JSON values only."""
    envelope = transaction.envelope
    return {
        "transaction_id": transaction.id,
        "listener": transaction.listener,
        "client": _client(envelope.client),
        "sender": envelope.sender,
        "recipients": [recipient.address for recipient in envelope.recipients],
        "rcpt_count": len(envelope.recipients),
        "size": transaction.size,
        "result": _result(transaction.result),
        "scans": [_run(run) for run in transaction.scans],
        "action": transaction.action.value if transaction.action is not None else None,
        "reason": transaction.reason,
        "reply": _reply(transaction.reply),
        "next_hop": _reply(transaction.next_hop) if transaction.next_hop is not None else None,
        "queued_as": transaction.queued_as,
        # Milliseconds are what a reader wants, and the text keeps no format
        # specification once the event went through JSON (as a worker's does).
        "timings": {
            "receiving": round(transaction.timings.receiving, 3),
            "scanning": round(transaction.timings.scanning, 3),
            "relaying": round(transaction.timings.relaying, 3),
        },
    }


def _client(client: Client) -> dict[str, Any]:
    return {
        "address": client.address,
        "port": client.port,
        "name": client.name,
        "helo": client.helo,
        "namaddr": client.namaddr,
        "protocol": client.protocol,
        "tls": client.tls,
        "tls_version": client.tls_version,
        "tls_cipher": client.tls_cipher,
        "ident": client.ident,
        "login": client.login,
        "hop": _hop(client.hop) if client.hop is not None else None,
    }


def _hop(hop: Hop) -> dict[str, Any]:
    return {
        "command": hop.command.value,
        "address": hop.address,
        "port": hop.port,
        "helo": hop.helo,
        "namaddr": namaddr("", hop.address, hop.port),
    }


def _result(result: ScanResult) -> dict[str, Any]:
    return {
        "verdict": result.verdict.value,
        "status": result.status(),
        "scanner": result.scanner,
        "threats": [{"name": threat.name, "file": threat.file} for threat in result.threats],
        "error": result.error.value if result.error is not None else None,
        "detail": result.detail,
    }


def _run(run: ScannerRun) -> dict[str, Any]:
    return {"scanner": run.scanner, "seconds": run.seconds, **_result(run.result)}


def _reply(reply: Reply) -> dict[str, Any]:
    # One line of the text log, however many lines the reply has.
    words = [str(reply.code), reply.enhanced, printable(reply.text.replace("\n", " / "))]
    return {"code": reply.code, "enhanced": reply.enhanced, "text": reply.text, "line": " ".join(w for w in words if w)}


@implementer(ILogObserver)
class TransactionLogFile(service.Service):
    """Writes the transaction log to ``settings.file`` ("-": standard output) as
    text or JSON lines, from start to stop; :meth:`reopen` starts a new file
    after the old one was moved away (log rotation)."""

    name = "transaction-log"

    def __init__(self, settings: LogSettings, publisher: Any = globalLogPublisher) -> None:
        assert settings.file is not None
        self._settings = settings
        self._publisher = publisher
        self._file: IO[str] | None = None
        self._write: ILogObserver | None = None

    def __call__(self, event: LogEvent) -> None:
        if self._write is not None and event.get("log_namespace") == NAMESPACE:
            self._write(event)

    def startService(self) -> None:
        self.reopen()
        self._publisher.addObserver(self)
        super().startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        self._publisher.removeObserver(self)
        self._close()

    def reopen(self) -> None:
        """Write to the file at the configured path from now on: a new one if
        the old one was renamed or removed (send SIGHUP after rotating)."""
        path = self._settings.file
        assert path is not None
        # The real standard output: twistd makes sys.stdout a log of its own.
        file = _STDOUT if path == "-" else open(path, "a", encoding="utf-8")
        self._close()
        self._file = file
        if self._settings.format == "json":
            # One JSON object per line, without twisted's RS (0x1E) before each:
            # what `json.loads` per line and most log shippers read.
            self._write = jsonFileLogObserver(file, recordSeparator="")
        else:
            self._write = textFileLogObserver(file)

    def _close(self) -> None:
        file, self._file, self._write = self._file, None, None
        if file is not None and file is not _STDOUT:
            file.close()


def check_writable(settings: LogSettings, source: str) -> None:
    """Refuse, before the start, a log file that could not be written."""
    path = settings.file
    if path is None or path == "-":
        return
    where = path if os.path.exists(path) else os.path.dirname(os.path.abspath(path))
    if not os.access(where, os.W_OK):
        raise ConfigError(f"{source}: logging.file: cannot write {path!r}")
