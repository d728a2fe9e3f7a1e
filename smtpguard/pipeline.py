"""What happens to one received message: scan, decide, act, relay, notify."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface.verify import verifyObject

from smtpguard import crlf, headers, replies, rewrite, templates
from smtpguard.domains import ascii_form
from smtpguard.envelope import (
    BodyType,
    Envelope,
    Forwarding,
    Recipient,
    downgrade_refusal,
    relayed_dsn_recipients,
)
from smtpguard.incident import Incident, Relayed
from smtpguard.interfaces import (
    INotifier,
    IPolicy,
    IQuarantine,
    IRecipientPolicy,
    IRelayedNotifier,
    IRelaySession,
    IScanner,
)
from smtpguard.replies import Reply
from smtpguard.results import Action, Decision, ErrorKind, ScanResult, Verdict
from smtpguard.scanners.chain import Scanned, combine, scan_timed
from smtpguard.scanners.deadline import within
from smtpguard.spool import Message
from smtpguard.transaction import ScannerRun, Timings, Transaction, TransactionObserver

log = Logger()

# The longest header section smtpguard reads (and edits).
HEADER_LIMIT = 1024 * 1024


def received_header(envelope: Envelope, transaction_id: str, now: float) -> bytes:
    """The Received: trace header of RFC 5321 section 4.4 for this transaction.

    It traces the connection the message came on: after XCLIENT, the client the
    proxy named (the proxy passes the session on); after XFORWARD, the MTA in
    front that connected, whose own Received: names the original client (as in
    Postfix, whose smtpd uses XFORWARD for its logs only)."""
    client, hop = envelope.client, envelope.client.hop
    if hop is not None and hop.command is Forwarding.XFORWARD:
        helo, name, address = hop.helo, "", hop.address
    else:
        helo, name, address = client.helo, client.name, client.address
    # Only an SMTPUTF8 transaction may carry UTF-8 in its header section.
    if not envelope.parameters.smtputf8:
        helo = ascii_form(helo) or ""
    literal = f"[IPv6:{address}]" if ":" in address else f"[{address}]" if address else ""
    # RFC 5321's TCP-info: the address literal, after the client's name if known.
    info = " ".join(part for part in (name, literal) if part) or "unknown"
    lines = [
        f"from {helo or 'unknown'} ({info})",
        f"by {client.hostname or 'localhost'} (smtpguard) with {envelope.protocol} id {transaction_id}",
    ]
    if len(envelope.recipients) == 1:
        lines.append(f"for <{envelope.recipients[0].address}>")
    lines[-1] += f"; {format_datetime(datetime.fromtimestamp(now, UTC))}"
    return headers.field("Received", *lines)


def status_headers(result: ScanResult, hostname: str) -> bytes:
    scanner = result.scanner or "none"
    scanned = headers.field("X-Virus-Scanned", f"smtpguard ({scanner}) on {hostname or 'localhost'}", text=True)
    return scanned + headers.field("X-Virus-Status", result.status(), text=True)


# Assumed of a next hop whose extensions are not known: what comes goes on.
_ANY: Mapping[str, str] = {"SMTPUTF8": "", "DSN": ""}


def _extensions(relay: IRelaySession) -> Mapping[str, str] | None:
    """The next hop's EHLO keywords, when the relay session tells them (the
    optional ``extensions`` of IRelaySession)."""
    extensions = getattr(relay, "extensions", None)
    return extensions if isinstance(extensions, Mapping) else None


class _Progress:
    """What is known of a transaction so far, while the pipeline handles it."""

    def __init__(self, clock: Any, receiving: float) -> None:
        self._clock = clock
        self._started = clock.seconds()
        self._receiving = receiving
        self._scanning = self._relaying = 0.0
        # Should processing fail before the scan ends, the message counts as unscanned.
        self.result = ScanResult.failed(ErrorKind.OTHER, "not scanned")
        self.scans: tuple[ScannerRun, ...] = ()
        self.action: Action | None = None
        self.reason = ""
        self.next_hop: Reply | None = None

    def scanned(self, scanned: Scanned) -> None:
        self.result, self.scans = scanned.result, scanned.runs
        self._scanning = self._clock.seconds() - self._started

    def decided(self, decision: Decision) -> None:
        self.action, self.reason = decision.action, decision.reason

    def relayed(self, reply: Reply, seconds: float) -> None:
        self.next_hop, self._relaying = reply, seconds

    def transaction(
        self, transaction_id: str, listener: str, envelope: Envelope, size: int, reply: Reply
    ) -> Transaction:
        timings = Timings(self._receiving, self._scanning, self._relaying)
        return Transaction(
            transaction_id,
            listener,
            envelope,
            size,
            self.result,
            self.action,
            reply,
            self.scans,
            self.next_hop,
            timings,
            self.reason,
        )


class Pipeline:
    """Scans with ``scanner`` under a hard deadline, asks ``policy``, and relays,
    replaces or answers accordingly; keeps a copy in ``quarantine`` and tells
    ``notifier`` when the decision asks for it."""

    def __init__(
        self,
        reactor: Any,
        scanner: IScanner,
        policy: IPolicy,
        scan_timeout: float = 120.0,
        quarantine: IQuarantine | None = None,
        notifier: INotifier | None = None,
        listener: str = "",
        observers: Sequence[TransactionObserver] = (),
    ) -> None:
        verifyObject(IScanner, scanner)
        verifyObject(IPolicy, policy)
        self._recipient_policy: IRecipientPolicy | None = IRecipientPolicy(policy, None)
        if self._recipient_policy is not None:
            verifyObject(IRecipientPolicy, self._recipient_policy)
        self._reactor = reactor
        self._scanner = scanner
        self._policy = policy
        self._scan_timeout = scan_timeout
        self._quarantine = quarantine
        self._notifier = notifier
        self._listener = listener
        self._observers = tuple(observers)

    def accepts(self, envelope: Envelope, recipient: Recipient) -> bool:
        """Whether ``recipient`` may join ``envelope``'s transaction (give this to
        L{smtpguard.server.GuardFactory}): the policy's answer when it decides per
        recipient (L{IRecipientPolicy}); any other policy takes every recipient."""
        if self._recipient_policy is None:
            return True
        return self._recipient_policy.accepts(envelope, recipient)

    def scan(self, message: Message, envelope: Envelope) -> Deferred[ScanResult]:
        return self.scan_timed(message, envelope).addCallback(lambda scanned: scanned.result)

    def scan_timed(self, message: Message, envelope: Envelope) -> Deferred[Scanned]:
        """The scan of ``message`` under the deadline, with each scanner's run; a
        scan cut by the deadline is one run of the whole chain, its timeout."""
        started = self._reactor.seconds()
        scanning = Deferred.fromCoroutine(self._scan_readings(message, envelope))

        def cut(result: ScanResult) -> Scanned:
            run = ScannerRun(self._scanner.name, result, self._reactor.seconds() - started)
            return Scanned(result, (run,))

        return within(scanning, self._scan_timeout, self._reactor, self._scanner.name, cut)

    async def _scan_readings(self, message: Message, envelope: Envelope) -> Scanned:
        """The scan of ``message`` as sent, and of the same with CRLF line endings when
        that differs (a BINARYMIME message with bare CR or LF): mail readers take
        those for line ends in its header sections and text, while the bytes of its
        binary parts are what they save.  A threat or an error in either counts;
        the runs of both scans are kept."""
        scanned = await scan_timed(self._scanner, message, envelope, self._reactor)
        if scanned.result.verdict is Verdict.INFECTED or envelope.parameters.body is not BodyType.BINARYMIME:
            return scanned
        read = crlf.with_crlf(message)
        if read is message:
            return scanned
        again = await scan_timed(self._scanner, read, envelope, self._reactor)
        return Scanned(combine([scanned.result, again.result], self._scanner.name), scanned.runs + again.runs)

    def process(
        self, envelope: Envelope, message: Message, relay: IRelaySession, transaction_id: str, receiving: float = 0.0
    ) -> Deferred[Reply]:
        """Fires with the reply for the client's end of data; never fails.
        ``receiving`` is the seconds the message took to arrive, for the
        transaction's observers."""
        return Deferred.fromCoroutine(self._process(envelope, message, relay, transaction_id, receiving))

    async def _process(
        self, envelope: Envelope, message: Message, relay: IRelaySession, transaction_id: str, receiving: float
    ) -> Reply:
        progress = _Progress(self._reactor, receiving)
        try:
            reply = await self._handle(envelope, message, relay, transaction_id, progress)
        except Exception:
            log.failure("processing {id} failed", id=transaction_id)
            progress.action = None
            await relay.reset()
            reply = replies.LOCAL_ERROR
        self._observe(progress.transaction(transaction_id, self._listener, envelope, message.size, reply))
        return reply

    async def _handle(
        self, envelope: Envelope, message: Message, relay: IRelaySession, transaction_id: str, progress: _Progress
    ) -> Reply:
        progress.scanned(await self.scan_timed(message, envelope))
        result = progress.result
        decision = self._policy.decide(envelope, result)
        progress.decided(decision)
        section, body_at = message.split_headers(HEADER_LIMIT)
        if body_at == 0 and message.size > HEADER_LIMIT:
            # Its header section could not be read whole, so forged status
            # headers could not be removed: refused, as Exim and sendmail do.
            progress.action = None
            await relay.reset()
            return replies.HEADER_TOO_BIG
        incident = Incident(
            transaction_id, envelope, result, decision, section, self._reactor.seconds(), rewrite.subject(section)
        )
        refusal = downgrade_refusal(envelope, section, _extensions(relay) or _ANY) if decision.relays else None
        if refusal is not None:
            # Received whole, so the refusal is for the message (RFC 6531 3.2).
            log.warn("{id}: refused: {why}", id=transaction_id, why=refusal.text)
            progress.action = None
            await relay.reset()
            return refusal
        if decision.quarantine and self._quarantine is not None:
            # Without its copy the decision cannot be carried out: the client retries.
            await self._quarantine.store(incident, message)
        if decision.relays:
            relaying = self._reactor.seconds()
            reply: Reply = await self._relay(incident, message, body_at, relay)
            progress.relayed(reply, self._reactor.seconds() - relaying)
            if reply.positive and decision.action is Action.DELIVER:
                self._report_relayed(incident, reply, relay)
        else:
            await relay.reset()
            reply = decision.reply or replies.LOCAL_ERROR
        if decision.notices and self._notifier is not None and not reply.transient:
            self._notify(incident)
        return reply

    def _observe(self, transaction: Transaction) -> None:
        for observer in self._observers:
            try:
                observer(transaction)
            except Exception:
                log.failure("{id}: transaction observer {observer!r} failed", id=transaction.id, observer=observer)

    def _relay(self, incident: Incident, message: Message, body_at: int, relay: IRelaySession) -> Deferred[Reply]:
        envelope, decision = incident.envelope, incident.decision
        trace = received_header(envelope, incident.transaction_id, incident.time)
        trace += status_headers(incident.result, envelope.client.hostname)
        # Status headers from the client are dropped: nobody forges a verdict.
        section = rewrite.without(incident.headers, rewrite.STATUS_HEADERS)
        if decision.action is Action.REPLACE:
            text = self._replacement(incident)
            notice = rewrite.notice_headers(section, text)
            return relay.data(Message.from_bytes(text.encode("utf-8")), trace + notice + b"\r\n")
        if decision.subject_tag:
            section = rewrite.tag_subject(section, decision.subject_tag)
        # A message without the empty line after its header section stays so.
        separator = b"\r\n" if body_at > len(incident.headers) else b""
        return relay.data(message.tail(body_at), trace + section + separator)

    def _replacement(self, incident: Incident) -> str:
        """The text that replaces the body: the decision's template, filled in,
        one line per line of the template, with CRLF endings."""
        decision: Decision = incident.decision
        template = decision.notice or (templates.VIRUS_NOTICE if incident.result.threats else templates.ERROR_NOTICE)
        values = templates.values(
            incident.envelope, incident.result, decision.reason, incident.subject, incident.transaction_id
        )
        text = templates.render(template, values)
        return "".join(line + "\r\n" for line in text.splitlines())

    def _report_relayed(self, incident: Incident, reply: Reply, relay: IRelaySession) -> None:
        """Queue the "relayed" DSN owed when the next hop, which has just taken the
        message, offers no DSN (RFC 3461 section 4.1)."""
        extensions = _extensions(relay)
        recipients = relayed_dsn_recipients(incident.envelope, extensions) if extensions is not None else ()
        if not recipients:
            return
        notifier = IRelayedNotifier(self._notifier, None)
        if notifier is None:
            log.warn(
                "{id}: next hop offers no DSN; the relayed DSN {n} recipient(s) asked for (NOTIFY=SUCCESS)"
                " is not sent: no [notifications] configured",
                id=incident.transaction_id,
                n=len(recipients),
            )
            return
        relayed = Relayed(recipients, reply, getattr(relay, "remote_mta", None))
        notifying = notifier.relayed(incident, relayed)
        notifying.addErrback(
            lambda failure: log.failure("relayed DSN for {id} failed", failure, id=incident.transaction_id)
        )

    def _notify(self, incident: Incident) -> None:
        assert self._notifier is not None
        notifying = self._notifier.notify(incident)
        notifying.addErrback(lambda failure: log.failure("notice for {id} failed", failure, id=incident.transaction_id))
