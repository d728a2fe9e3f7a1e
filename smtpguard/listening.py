"""Listening on an endpoint a configuration names, failing in one line."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.error import CannotListenError


class Listening(StreamServerEndpointService):
    """Listens on the endpoint ``description`` names.  When it cannot, starting
    stops with one line naming the endpoint and the reason, not a traceback."""

    def __init__(self, description: str, endpoint: Any, factory: Any) -> None:
        super().__init__(endpoint, factory)  # type: ignore[no-untyped-call]
        self.description = description
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()  # type: ignore[no-untyped-call]
        except (CannotListenError, OSError) as error:
            raise SystemExit(f"smtpguard: {cannot_listen(self.description, error)}") from None


def cannot_listen(description: str, error: Exception) -> str:
    """``cannot listen on ENDPOINT: REASON``, the reason as the system says it
    (``address already in use``, ``permission denied``)."""
    cause = error.socketError if isinstance(error, CannotListenError) else error
    reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
    return f"cannot listen on {description}: {reason[:1].lower()}{reason[1:]}"
