"""Reloading the configuration: the generation in force (a value monitoring reads),
what only a restart can change, and SIGHUP under twistd."""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

import attrs
from twisted.application import service

from smtpguard.config import Config


@attrs.frozen
class Generation:
    """The configuration in force: ``number`` 1 at the start and one more for each
    reload that took, ``loaded_at`` (the reactor's seconds) when it did, and how
    the last reload went (``last_error`` says why it was refused)."""

    number: int
    loaded_at: float
    last_reload_ok: bool = True
    last_error: str | None = None


def restart_needed(running: Config, new: Config) -> list[str]:
    """The keys of ``new`` whose change only a restart applies (the listening
    sockets), each as it is named in the log."""
    changes = []
    if running.listen != new.listen:
        changes.append("server.listen")
    if _extra_endpoints(running) != _extra_endpoints(new):
        changes.append("listeners.endpoint")
    if running.metrics_listen != new.metrics_listen:
        changes.append("metrics.listen")
    if running.logging != new.logging:
        changes.append("logging")
    by_endpoint = {listener.endpoint: listener for listener in new.listeners}
    for listener in running.listeners:
        other = by_endpoint.get(listener.endpoint)
        for key in ("proxy_protocol", "trusted_proxies"):
            if other is not None and getattr(listener, key) != getattr(other, key):
                changes.append(f"{key} of {listener.endpoint}")
    return changes


def _extra_endpoints(config: Config) -> list[str]:
    """The endpoints of the ``[[listeners]]`` tables (they follow server.listen's)."""
    return [listener.endpoint for listener in config.listeners[len(config.listen) :]]


class ReloadOnSignal(service.Service):
    """While running, SIGHUP calls ``reload`` from the reactor's loop (never inside
    the signal handler, which may interrupt any code).  twistd installs no SIGHUP
    handler of its own, in the foreground or daemonised; started with the
    application, this one is installed after twistd has daemonised.  Once stopped,
    SIGHUP is ignored: the default action would end the process while it drains."""

    name = "reload-on-SIGHUP"

    def __init__(self, reactor: Any, reload: Callable[[], object]) -> None:
        self._reactor = reactor
        self._reload = reload

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        signal.signal(signal.SIGHUP, self._received)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def _received(self, number: int, frame: FrameType | None) -> None:
        self._reactor.callFromThread(self._reload)
