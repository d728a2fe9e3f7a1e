"""The notifier: turns an incident into the notices its decision asks for (a
delivery status notification to the sender, a notice to the administrator), and
a relayed message into the "relayed" DSN its sender is owed, and puts them in the
durable outbox; and its builder from the ``[notifications]`` table."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from email.utils import parseaddr
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from smtpguard import replies, templates
from smtpguard.envelope import EnvelopeError, parse_address
from smtpguard.events import Report, ignore
from smtpguard.headers import has_control
from smtpguard.incident import Incident, Relayed
from smtpguard.interfaces import INextHop, IRelayedNotifier
from smtpguard.notifiers.dsn import PLACEHOLDERS, NoticeSettings, admin_notice, relayed_notice, sender_notice
from smtpguard.notifiers.outbox import Outbox, RetrySettings
from smtpguard.results import Notice
from smtpguard.tables import Table, options

log = Logger()

_RETRY = RetrySettings()
_Builder = Callable[[Incident, NoticeSettings, float, str], "bytes | None"]


@implementer(IRelayedNotifier)
class Notifier:
    """Queues the notices of each incident in ``outbox``; :meth:`start` and
    :meth:`stop` run the outbox's deliveries."""

    def __init__(self, reactor: Any, outbox: Outbox, settings: NoticeSettings) -> None:
        self._reactor = reactor
        self.outbox = outbox
        self.settings = settings

    def notify(self, incident: Incident) -> Deferred[None]:
        """Queue the notices; fires once they are on disk, and never fails: a notice
        that cannot be built or written is logged as critical and lost."""
        wanted: list[tuple[Notice, _Builder, str | None]] = [
            (Notice.SENDER, sender_notice, incident.envelope.sender or None),
            (Notice.ADMIN, admin_notice, self.settings.admin),
        ]
        for kind, build, recipient in wanted:
            if kind in incident.decision.notices:
                self._queue(incident, kind.value, build, recipient)
        return defer.succeed(None)

    def relayed(self, incident: Incident, relayed: Relayed) -> Deferred[None]:
        """Queue the "relayed" DSN for ``incident``'s sender; fires once it is on
        disk, and never fails (a notice that cannot be written is logged as lost)."""

        def build(incident: Incident, settings: NoticeSettings, now: float, token: str) -> bytes | None:
            return relayed_notice(incident, relayed, settings, now, token)

        self._queue(incident, "relayed", build, incident.envelope.sender or None)
        return defer.succeed(None)

    def _queue(self, incident: Incident, kind: str, build: _Builder, recipient: str | None) -> None:
        tid = incident.transaction_id
        try:
            message = build(incident, self.settings, self._reactor.seconds(), secrets.token_hex(12))
            if message is None or recipient is None:
                log.info("{tid}: no {kind} notice (no one to tell)", tid=tid, kind=kind)
                return
            self.outbox.add(recipient, message, kind, tid)
        except OSError as error:
            log.critical(
                "{tid}: {kind} notice LOST: cannot write to the outbox {dir}: {error}",
                tid=tid,
                kind=kind,
                dir=self.outbox.directory,
                error=error,
            )
        except Exception:
            log.failure("{tid}: {kind} notice LOST: cannot build it", tid=tid, kind=kind)

    def start(self) -> None:
        """Load the outbox and start delivering; raises OSError when the outbox
        directory cannot be used."""
        self.outbox.start()

    def stop(self) -> Deferred[None]:
        """Stop delivering; fires when the attempt under way has ended."""
        return self.outbox.stop()


def build_notifier(
    table: Mapping[str, Any], next_hop: INextHop, hostname: str, reactor: Any, report: Report = ignore
) -> Notifier:
    """The notifier the ``[notifications]`` table describes, sending through
    ``next_hop`` (for instance an :class:`smtpguard.upstream.Upstream`);
    ``hostname`` is the server's, the default Reporting-MTA; ``report`` hears
    of the outbox's notices.

    @raise smtpguard.config.ConfigError: naming the key, when the table is not valid.
    """
    config = options(table)
    from_name, from_address = _mailbox(config, "from", f"postmaster@{hostname}")
    if not from_address.isascii():
        raise config.error("from", f"must be an ASCII address, got {config.data['from']!r}")
    admin = None
    if config.raw("admin") is not None:
        admin = _mailbox(config, "admin", "")[1]
    report_host = config.get("hostname", str, hostname)
    if not report_host or not report_host.isascii() or has_control(report_host) or " " in report_host:
        raise config.error("hostname", f"must be a host name, got {report_host!r}")
    directory = config.get("outbox", str, "")
    if not directory:
        raise config.error("outbox", 'is required: the directory notices wait in (e.g. "/var/spool/smtpguard/outbox")')
    retry = RetrySettings(
        initial=config.positive("retry_initial", float, _RETRY.initial),
        maximum=config.positive("retry_max", float, _RETRY.maximum),
        max_age=config.positive("max_age", float, _RETRY.max_age),
    )
    if retry.maximum < retry.initial:
        raise config.error("retry_max", f"must be at least retry_initial ({retry.initial:g}), got {retry.maximum:g}")
    defaults = NoticeSettings(from_address)
    texts = {
        key: _template(config, key, getattr(defaults, key))
        for key in ("sender_subject", "sender_text", "admin_subject", "admin_text", "relayed_subject", "relayed_text")
    }
    config.check_unknown()
    settings = NoticeSettings(
        from_address=from_address,
        from_name=from_name or defaults.from_name,
        hostname=report_host,
        admin=admin,
        **texts,
    )
    outbox = Outbox(reactor, directory, next_hop, retry, report_host, report)
    return Notifier(reactor, outbox, settings)


def _mailbox(config: Table, key: str, default: str) -> tuple[str, str]:
    """(display name, address) of ``key``: ``addr@domain`` or ``Name <addr@domain>``."""
    raw = config.get(key, str, default)
    name, address = parseaddr(raw)
    try:
        if not address or has_control(raw):
            raise EnvelopeError(replies.BAD_SENDER_SYNTAX)
        parse_address(address, replies.BAD_SENDER_SYNTAX)
    except EnvelopeError:
        raise config.error(key, f'must be an address (e.g. "postmaster@example.com"), got {raw!r}') from None
    return name, address


def _template(config: Table, key: str, default: str) -> str:
    """A template, tried once with every placeholder so a broken one stops the start."""
    template = config.get(key, str, default)
    try:
        templates.render(template, {name: name for name in PLACEHOLDERS})
    except (ValueError, IndexError, AttributeError, KeyError, TypeError) as error:
        raise config.error(key, f"is not a valid template ({error}); placeholders are written {{name}}") from None
    return template
