"""systemd's readiness protocol (sd_notify(3)): with ``Type=notify``, systemd
holds back ``systemctl reload`` and the units ordered after smtpguard until it
says READY=1, which it does once it listens."""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.application import service


def notify(state: str, environ: Any = os.environ) -> bool:
    """Send ``state`` (``READY=1``, ``STOPPING=1``) to ``$NOTIFY_SOCKET``; False
    when there is none (not started by systemd) or it cannot be reached."""
    path = environ.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    if path.startswith("@"):  # an abstract socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(state.encode("ascii"), path)
    except OSError:
        return False
    return True


class NotifyReady(service.Service):
    """Started after every listener: says READY=1; stopped first: STOPPING=1."""

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        notify(f"READY=1\nMAINPID={os.getpid()}")

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        notify("STOPPING=1")
