"""The default policy: the SMTP antivirus of security appliances, and the choices
mail administrators add to it (reject instead of backscatter, defer on scanner
outage, quarantine, policy banks chosen by recipient, sender or client network).

Everything here is pure: an envelope and a scan result in, a decision out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from enum import Enum
from fnmatch import fnmatchcase

import attrs
from zope.interface import implementer

from smtpguard import replies, templates
from smtpguard.envelope import Envelope, Recipient
from smtpguard.interfaces import IRecipientPolicy
from smtpguard.results import Action, Decision, ErrorKind, Notice, ScanResult, Verdict

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class OnVirus(Enum):
    REPLACE = "replace"
    REJECT = "reject"
    DISCARD = "discard"
    PASS = "pass"


class OnError(Enum):
    DROP = "drop"
    PASS = "pass"
    DEFER = "defer"
    REJECT = "reject"


@attrs.frozen
class PolicySettings:
    # In line with the client, rejecting in the session is the cleanest default:
    # the sending system keeps the message and tells its sender; no backscatter.
    on_virus: OnVirus = OnVirus.REJECT
    fail_mode: OnError = OnError.DEFER
    fallback: Mapping[ErrorKind, OnError] = attrs.field(factory=dict)
    quarantine: bool = False
    quarantine_dropped: bool = False
    notify_sender_on_virus: bool = False
    notify_sender_on_error_drop: bool = False
    notify_recipient_on_error_pass: bool = True
    notify_admin: bool = True
    subject_tag: str = "(No virus check due to scan error)"
    # The texts that replace a dropped message's body (placeholders: smtpguard.templates).
    virus_notice: str = templates.VIRUS_NOTICE
    error_notice: str = templates.ERROR_NOTICE
    # Threat names (shell patterns) of malware known to forge its sender: its
    # "sender" is never notified (no backscatter).
    forged_sender_threats: tuple[str, ...] = ()

    def on_error(self, kind: ErrorKind) -> OnError:
        action = self.fallback.get(kind, self.fail_mode)
        if action is OnError.DEFER and kind is ErrorKind.CONTENT_SIZE and kind not in self.fallback:
            # Retrying does not make a message smaller: deferring it would only
            # bounce it days later.  Deferred only when asked for by name.
            return OnError.REJECT
        return action


@attrs.frozen
class Rule:
    """A policy bank: when every given criterion matches, ``settings`` apply.

    ``recipient_domains`` matches when any recipient is in one of the domains
    (or their subdomains); with L{DefaultPolicy.accepts} asked at each RCPT, the
    rule chosen has the settings of every recipient's own bank.  ``senders`` are
    shell patterns on the sender address; ``client_networks`` hold the client's
    address.
    """

    settings: PolicySettings
    recipient_domains: tuple[str, ...] = ()
    senders: tuple[str, ...] = ()
    client_networks: tuple[Network, ...] = ()

    def matches(self, envelope: Envelope) -> bool:
        if self.recipient_domains and not any(
            _in_domains(recipient.address, self.recipient_domains) for recipient in envelope.recipients
        ):
            return False
        if self.senders and not any(fnmatchcase(envelope.sender.lower(), p.lower()) for p in self.senders):
            return False
        if self.client_networks:
            try:
                address = ipaddress.ip_address(envelope.client.address)
            except ValueError:
                return False
            if not any(address in network for network in self.client_networks):
                return False
        return True


def _in_domains(address: str, domains: Sequence[str]) -> bool:
    domain = address.rpartition("@")[2].lower()
    return any(domain == wanted or domain.endswith("." + wanted) for wanted in domains)


def _names(result: ScanResult) -> str:
    """The threat names, each once (the same virus in two attachments is one name)."""
    return ", ".join(dict.fromkeys(threat.name for threat in result.threats))


@implementer(IRecipientPolicy)
class DefaultPolicy:
    """Decides by ``settings``, or by the first of ``rules`` that matches.

    A transaction carries one bank: a recipient whose bank differs from that of
    the recipients already accepted is refused (see L{accepts}).
    """

    def __init__(self, settings: PolicySettings = PolicySettings(), rules: Sequence[Rule] = ()) -> None:
        self.settings = settings
        self.rules = tuple(rules)

    def settings_for(self, envelope: Envelope) -> PolicySettings:
        for rule in self.rules:
            if rule.matches(envelope):
                return rule.settings
        return self.settings

    def accepts(self, envelope: Envelope, recipient: Recipient) -> bool:
        """Whether ``recipient`` gets the settings of ``envelope``'s recipients.

        The sender and the client are the transaction's own, so only the
        recipient criteria can set two recipients apart.  Two banks with equal
        settings decide alike, so their recipients may share a transaction.
        """
        if not envelope.recipients:
            return True
        return self._bank(envelope, recipient) == self._bank(envelope, envelope.recipients[0])

    def _bank(self, envelope: Envelope, recipient: Recipient) -> PolicySettings:
        return self.settings_for(attrs.evolve(envelope, recipients=(recipient,)))

    def decide(self, envelope: Envelope, result: ScanResult) -> Decision:
        settings = self.settings_for(envelope)
        if result.verdict is Verdict.CLEAN:
            return Decision(Action.DELIVER)
        if result.verdict is Verdict.INFECTED:
            return self._infected(envelope, result, settings)
        assert result.error is not None
        return self._failed(envelope, result.error, settings)

    def _infected(self, envelope: Envelope, result: ScanResult, settings: PolicySettings) -> Decision:
        names = _names(result)
        reason = f"virus {names}"
        notices = {Notice.ADMIN} if settings.notify_admin else set()
        forged = any(fnmatchcase(t.name, pattern) for t in result.threats for pattern in settings.forged_sender_threats)
        tell_sender = settings.notify_sender_on_virus and envelope.sender != "" and not forged
        action = settings.on_virus
        if action is OnVirus.REJECT:
            # The client hears a 5xx: the sending system tells its sender itself.
            rejected = replies.VIRUS_REJECTED.with_text(f"Message rejected: virus found ({names})")
            return Decision(Action.REJECT, rejected, reason, quarantine=settings.quarantine, notices=frozenset(notices))
        if tell_sender and action is not OnVirus.PASS:
            notices.add(Notice.SENDER)
        kind = {OnVirus.REPLACE: Action.REPLACE, OnVirus.DISCARD: Action.DISCARD, OnVirus.PASS: Action.DELIVER}[action]
        reply = replies.DISCARDED if kind is Action.DISCARD else None
        notice = settings.virus_notice if kind is Action.REPLACE else None
        return Decision(kind, reply, reason, quarantine=settings.quarantine, notices=frozenset(notices), notice=notice)

    def _failed(self, envelope: Envelope, kind: ErrorKind, settings: PolicySettings) -> Decision:
        reason = f"scan error ({kind.value})"
        action = settings.on_error(kind)
        if action is OnError.DEFER:
            return Decision(Action.DEFER, replies.SCAN_DEFERRED, reason)
        if action is OnError.REJECT:
            refused = replies.SCAN_TOO_BIG if kind is ErrorKind.CONTENT_SIZE else replies.SCAN_REJECTED
            return Decision(Action.REJECT, refused, reason)
        if action is OnError.PASS:
            tag = settings.subject_tag if settings.notify_recipient_on_error_pass else None
            return Decision(Action.DELIVER, reason=reason, subject_tag=tag)
        notices = (
            frozenset({Notice.SENDER}) if settings.notify_sender_on_error_drop and envelope.sender else frozenset()
        )
        return Decision(
            Action.REPLACE,
            reason=reason,
            quarantine=settings.quarantine_dropped,
            notices=notices,
            notice=settings.error_notice,
        )
