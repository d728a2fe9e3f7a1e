"""The contracts between smtpguard and its plugins."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from smtpguard.envelope import Envelope, Recipient
    from smtpguard.incident import Incident, Relayed
    from smtpguard.results import Decision, ScanResult
    from smtpguard.scanners.optional import Health
    from smtpguard.spool import Message


class IScanner(Interface):
    """Something that looks at a message and says whether it is clean.

    A scanner that cannot take messages above some size says so with an optional
    ``max_size`` attribute, a L{smtpguard.results.SizeLimit} (absent or None: no
    limit): smtpguard then never advertises or accepts a bigger message.  One that
    holds connections or timers between scans also provides L{IClosable}.
    """

    name = Attribute("A short name for logs and status headers, e.g. ``clamd``.")

    def scan(message: Message, envelope: Envelope) -> Deferred[ScanResult]:
        """Scan ``message``.

        @return: a Deferred firing with a L{ScanResult}.  A scan failure is an error
            result with an L{ErrorKind}; the Deferred never fails.
        """


class IClosable(Interface):
    """Something that holds connections or timers between uses, and lets go of
    them when smtpguard stops."""

    def close() -> Deferred[None]:
        """Cancel timers and close idle connections; work still in progress keeps
        what it uses and lets go of it when it ends.

        @return: a Deferred firing with None once everything is released; it
            never fails.
        """


class IHealthReporting(Interface):
    """A scanner that knows whether the engines behind it answer: the metrics
    show each endpoint, and smtpguard is not ready (``/readyz``) while a
    scanner cannot scan."""

    def health() -> Health:
        """What is known now of each endpoint, from its last use or check
        (L{smtpguard.scanners.optional.Health}); asks nobody, never raises."""

    def check() -> Deferred[None]:
        """Ask every endpoint now (clamd's PING, ICAP's OPTIONS), so that
        L{health} then tells how they are, not how they were.

        @return: a Deferred firing with None once every endpoint has answered
            or failed to; it never fails.
        """


class IPolicy(Interface):
    """Turns a scan result into a decision: pure, synchronous, free of I/O."""

    def decide(envelope: Envelope, result: ScanResult) -> Decision:
        """@return: the L{Decision} for this message; never raises."""


class IRecipientPolicy(IPolicy):
    """A policy whose decision can depend on the recipient (policy banks chosen by
    recipient domain): asked at each RCPT, so that no transaction carries
    recipients it would decide for differently."""

    def accepts(envelope: Envelope, recipient: Recipient) -> bool:
        """Whether ``recipient`` may join ``envelope``'s transaction: True when
        L{decide} decides for it as for ``envelope.recipients`` (always True
        while there are none).  Pure and synchronous; never raises.

        A recipient refused here hears ``452 4.5.3`` and is sent again by the
        client in a transaction of its own.
        """


class INotifier(Interface):
    """Sends notices about what happened to a message."""

    def notify(incident: Incident) -> Deferred[None]:
        """Tell whoever this notifier tells about ``incident`` (an L{Incident}),
        as far as its decision's ``notices`` ask for it.

        @return: a Deferred firing with None once the notice is safely queued.
            Sending failures are retried by the notifier, never turned into a
            client reply.
        """


class IRelayedNotifier(INotifier):
    """A notifier that also sends the "relayed" delivery status notifications
    of RFC 3461 section 4.1."""

    def relayed(incident: Incident, relayed: Relayed) -> Deferred[None]:
        """Tell ``incident``'s sender that its message went to a next hop that
        reports no delivery, for the recipients in ``relayed`` (an L{Relayed}).

        @return: a Deferred firing with None once the notice is safely queued;
            it never fails.
        """


class IQuarantine(Interface):
    """Keeps copies of messages."""

    def store(incident: Incident, message: Message) -> Deferred[str]:
        """Keep ``message`` with what is known about it.

        @return: a Deferred firing with the copy's id once it is safely stored;
            it fails when the copy could not be stored.
        """


class IPluginFactory(Interface):
    """Common shape of the plugin factories found in L{smtpguard.plugins}."""

    name = Attribute("The name used in configuration, e.g. ``builtin``.")
    description = Attribute("One line for ``--help`` and documentation.")


class IScannerFactory(IPluginFactory):
    def build(config: dict[str, Any], reactor: Any) -> IScanner:
        """Build a scanner from its configuration table.

        @raise smtpguard.config.ConfigError: when the table is not valid.
        """


class IPolicyFactory(IPluginFactory):
    def build(config: dict[str, Any]) -> IPolicy:
        """Build a policy from the ``[policy]`` table.

        @raise smtpguard.config.ConfigError: when the table is not valid.
        """


class INotifierFactory(IPluginFactory):
    def build(config: dict[str, Any], reactor: Any) -> INotifier:
        """Build a notifier from its configuration table."""


class IRelaySession(Interface):
    """One client session's conversation with the next hop.

    Every method fires with the L{Reply} the client should see; none fails.

    Optional attributes, read when present: ``extensions``, the next hop's EHLO
    keywords (upper case) mapped to their parameters, known once ``mail`` has
    answered (without it smtpguard assumes the next hop takes DSN and SMTPUTF8
    as they come); ``remote_mta``, the next hop's host name or address for the
    Remote-MTA field of a "relayed" DSN (None when it has none).
    """

    def mail(envelope: Envelope) -> Deferred[Any]:
        """Start a transaction (``MAIL``) for ``envelope``'s client, sender and
        parameters; fires with the next hop's reply."""

    def rcpt(recipient: Any) -> Deferred[Any]:
        """Add a recipient (``RCPT``); fires with the next hop's reply."""

    def data(message: Message, prefix: bytes) -> Deferred[Any]:
        """Send ``prefix`` (header lines) and then ``message``; fires with the final
        reply.  A positive reply means the next hop took responsibility."""

    def reset() -> Deferred[None]:
        """Abandon the current transaction, if any."""

    def close() -> None:
        """The client session is over.

        A transaction whose end of data has not reached the next hop is abandoned
        (nothing is delivered); one whose end of data went out waits for its final
        reply; then the connection is closed or kept for reuse.  After close(),
        mail/rcpt/data fire with L{smtpguard.replies.UPSTREAM_UNAVAILABLE} without
        reaching the next hop.
        """


class INextHop(Interface):
    """Where accepted mail goes."""

    def session() -> IRelaySession:
        """A new relay session, for one client session."""
