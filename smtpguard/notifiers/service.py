"""The notifier's outbox as a Twisted service: delivering starts and stops with the
application."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed

from smtpguard.notifiers.notifier import Notifier


class NotifierService(Service):
    """Starts ``notifier`` (loads its outbox, delivers) and stops it, waiting for
    the delivery attempt under way."""

    name = "notifications"

    def __init__(self, notifier: Notifier | None = None) -> None:
        self.notifier = notifier

    def use(self, notifier: Notifier) -> None:
        """From now on ``notifier`` is the one (a reload); its outbox is started
        here when the service runs and it is not the outbox already delivering.
        Raises OSError when the outbox directory cannot be used."""
        if self.running and (self.notifier is None or self.notifier.outbox is not notifier.outbox):
            notifier.start()
        self.notifier = notifier

    def startService(self) -> None:
        Service.startService(self)  # type: ignore[no-untyped-call]
        if self.notifier is not None:
            self.notifier.start()

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        Service.stopService(self)  # type: ignore[no-untyped-call]
        return succeed(None) if self.notifier is None else self.notifier.stop()
