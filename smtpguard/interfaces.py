"""The contracts between smtpguard and its plugins."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from smtpguard.envelope import Envelope
    from smtpguard.incident import Incident
    from smtpguard.results import Decision, ScanResult
    from smtpguard.spool import Message


class IScanner(Interface):
    """Something that looks at a message and says whether it is clean."""

    name = Attribute("A short name for logs and status headers, e.g. ``clamd``.")

    def scan(message: Message, envelope: Envelope) -> Deferred[ScanResult]:
        """Scan ``message``.

        @return: a Deferred firing with a L{ScanResult}.  A scan failure is an error
            result with an L{ErrorKind}; the Deferred never fails.
        """


class IPolicy(Interface):
    """Turns a scan result into a decision: pure, synchronous, free of I/O."""

    def decide(envelope: Envelope, result: ScanResult) -> Decision:
        """@return: the L{Decision} for this message; never raises."""


class INotifier(Interface):
    """Sends notices about what happened to a message."""

    def notify(incident: Incident) -> Deferred[None]:
        """Tell whoever this notifier tells about ``incident`` (an L{Incident}),
        as far as its decision's ``notices`` ask for it.

        @return: a Deferred firing with None once the notice is safely queued.
            Sending failures are retried by the notifier, never turned into a
            client reply.
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
