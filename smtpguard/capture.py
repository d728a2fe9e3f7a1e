"""A capture target: an SMTP server that writes every message it accepts to a
folder, for trying smtpguard out and for tests.  Each message is stored as
``<id>.eml`` (the bytes exactly as received) beside ``<id>.json`` (the envelope).
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from smtpguard import replies
from smtpguard.envelope import Envelope, Recipient
from smtpguard.interfaces import INextHop, IRelaySession
from smtpguard.replies import Reply
from smtpguard.server import GuardFactory
from smtpguard.settings import ServerSettings
from smtpguard.spool import Message


@implementer(IRelaySession)
class _FolderSession:
    def __init__(self, directory: str) -> None:
        self._directory = directory
        self._envelope: Envelope | None = None

    def mail(self, envelope: Envelope) -> Deferred[Reply]:
        self._envelope = envelope
        return defer.succeed(replies.SENDER_OK)

    def rcpt(self, recipient: Recipient) -> Deferred[Reply]:
        if self._envelope is None:
            return defer.succeed(replies.NEED_MAIL)
        self._envelope = self._envelope.with_recipient(recipient)
        return defer.succeed(replies.RECIPIENT_OK)

    def data(self, message: Message, prefix: bytes) -> Deferred[Reply]:
        envelope, self._envelope = self._envelope, None
        assert envelope is not None
        name = secrets.token_hex(8)
        path = os.path.join(self._directory, name)
        with open(path + ".eml.tmp", "wb") as eml:
            eml.write(prefix)
            for chunk in message.chunks():
                eml.write(chunk)
        with open(path + ".json", "w", encoding="utf-8") as meta:
            json.dump(
                {
                    "sender": envelope.sender,
                    "recipients": [recipient.address for recipient in envelope.recipients],
                    "client": envelope.client.address,
                    "helo": envelope.client.helo,
                },
                meta,
            )
        os.rename(path + ".eml.tmp", path + ".eml")
        return defer.succeed(replies.OK.with_text(f"Ok: queued as {name}"))

    def reset(self) -> Deferred[None]:
        self._envelope = None
        return defer.succeed(None)

    def close(self) -> None:
        self._envelope = None


@implementer(INextHop)
class Folder:
    """A next hop that stores messages in ``directory``."""

    def __init__(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory = directory

    def session(self) -> _FolderSession:
        return _FolderSession(self.directory)


def deliver_unchanged(
    envelope: Envelope, message: Message, relay: IRelaySession, transaction_id: str, receiving: float
) -> Deferred[Reply]:
    """A processor that relays without scanning: for the capture target only."""
    return relay.data(message, b"")


def capture_factory(reactor: Any, directory: str, hostname: str = "capture.localhost") -> GuardFactory:
    return GuardFactory(reactor, Folder(directory), deliver_unchanged, ServerSettings(hostname=hostname))
