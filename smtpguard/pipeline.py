"""What happens to one received message: scan, decide, act, relay."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface.verify import verifyObject

from smtpguard import replies
from smtpguard.envelope import Envelope
from smtpguard.interfaces import IPolicy, IRelaySession, IScanner
from smtpguard.replies import Reply
from smtpguard.results import Action, ScanResult
from smtpguard.scanners.deadline import scan_safely, with_deadline
from smtpguard.spool import Message

log = Logger()


def received_header(envelope: Envelope, transaction_id: str, now: float) -> bytes:
    """The Received: trace header of RFC 5321 section 4.4 for this transaction."""
    client = envelope.client
    literal = f"IPv6:{client.address}" if ":" in client.address else client.address
    lines = [
        f"Received: from {client.helo or 'unknown'} ([{literal}])",
        f"\tby {client.hostname or 'localhost'} (smtpguard) with {client.protocol} id {transaction_id}",
    ]
    if len(envelope.recipients) == 1:
        lines.append(f"\tfor <{envelope.recipients[0].address}>")
    lines[-1] += f"; {format_datetime(datetime.fromtimestamp(now, UTC))}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def status_headers(result: ScanResult, hostname: str) -> bytes:
    scanned = f"X-Virus-Scanned: smtpguard ({result.scanner or 'none'}) on {hostname}"
    return f"{scanned}\r\nX-Virus-Status: {result.status()}\r\n".encode()


class Pipeline:
    """Scans with ``scanner`` under a hard deadline, asks ``policy``, and relays or
    answers accordingly."""

    def __init__(self, reactor: Any, scanner: IScanner, policy: IPolicy, scan_timeout: float = 120.0) -> None:
        verifyObject(IScanner, scanner)
        verifyObject(IPolicy, policy)
        self._reactor = reactor
        self._scanner = scanner
        self._policy = policy
        self._scan_timeout = scan_timeout

    def scan(self, message: Message, envelope: Envelope) -> Deferred[ScanResult]:
        scanning = scan_safely(self._scanner, message, envelope)
        return with_deadline(scanning, self._scan_timeout, self._reactor, self._scanner.name)

    def process(
        self, envelope: Envelope, message: Message, relay: IRelaySession, transaction_id: str
    ) -> Deferred[Reply]:
        """Fires with the reply for the client's end of data; never fails."""
        return Deferred.fromCoroutine(self._process(envelope, message, relay, transaction_id))

    async def _process(self, envelope: Envelope, message: Message, relay: IRelaySession, transaction_id: str) -> Reply:
        started = time.monotonic()
        try:
            result = await self.scan(message, envelope)
            decision = self._policy.decide(envelope, result)
            if decision.action is Action.DELIVER:
                prefix = received_header(envelope, transaction_id, self._reactor.seconds())
                prefix += status_headers(result, envelope.client.hostname)
                reply: Reply = await relay.data(message, prefix)
            else:
                await relay.reset()
                reply = decision.reply or (
                    replies.DISCARDED if decision.action is Action.DISCARD else replies.LOCAL_ERROR
                )
        except Exception:
            log.failure("processing {id} failed", id=transaction_id)
            await relay.reset()
            return replies.LOCAL_ERROR
        log.info(
            "{id}: from=<{sender}> rcpts={rcpts} size={size} status={status} action={action} reply={code}"
            " ({ms:.1f} ms)",
            id=transaction_id,
            sender=envelope.sender,
            rcpts=len(envelope.recipients),
            size=message.size,
            status=result.status(),
            action=decision.action.value,
            code=reply.code,
            ms=(time.monotonic() - started) * 1000,
        )
        return reply
