"""The notifier's outbox as a Twisted service: delivering starts and stops with the
application."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred

from smtpguard.notifiers.notifier import Notifier


class NotifierService(Service):
    """Starts ``notifier`` (loads its outbox, delivers) and stops it, waiting for
    the delivery attempt under way."""

    name = "notifications"

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier

    def startService(self) -> None:
        Service.startService(self)  # type: ignore[no-untyped-call]
        self.notifier.start()

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        Service.stopService(self)  # type: ignore[no-untyped-call]
        return self.notifier.stop()
