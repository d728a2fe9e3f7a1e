"""The quarantine: a directory holding a copy of each quarantined message (``<id>.eml``)
beside what was known about it (``<id>.json``), and the release of a copy to its
original recipients."""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, Protocol, TypeVar

import attrs
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from smtpguard import headers, tables
from smtpguard.envelope import (
    BodyType,
    Client,
    Envelope,
    MailParameters,
    Notify,
    Recipient,
    RecipientParameters,
    Return,
)
from smtpguard.events import Event, Report, ignore
from smtpguard.incident import Incident
from smtpguard.interfaces import INextHop, IQuarantine
from smtpguard.replies import Reply
from smtpguard.spool import Message

log = Logger()

T = TypeVar("T")
FORMAT = 1  # of the metadata files; bumped when a key changes meaning
RELEASED_HEADER = "X-Quarantine-Released"
_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{8}")


class QuarantineError(Exception):
    """An entry that cannot be used; the message names it and says why."""


class InvalidId(QuarantineError):
    """Not the shape of a quarantine id (which keeps paths inside the directory)."""


class NoSuchEntry(QuarantineError):
    """No entry has this id."""


class InThread(Protocol):
    def __call__(self, work: Callable[[], T]) -> Deferred[T]: ...


@attrs.frozen
class Entry:
    """One line of :meth:`Quarantine.list`."""

    id: str
    time: str
    sender: str
    recipients: tuple[str, ...]
    status: str


def check_id(entry_id: str) -> str:
    """``entry_id`` if it has the shape of an id; raises InvalidId otherwise."""
    if not isinstance(entry_id, str) or _ID.fullmatch(entry_id) is None:
        raise InvalidId(f"{entry_id!r} is not a quarantine id (like 20261129T224501Z-0123abcd)")
    return entry_id


def _iso_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _notify_text(notify: frozenset[Notify] | None) -> str | None:
    if notify is None:
        return None
    return ",".join(item.value for item in Notify if item in notify) or "NEVER"


def _notify_value(text: str | None) -> frozenset[Notify] | None:
    if text is None:
        return None
    return frozenset() if text == "NEVER" else frozenset(Notify(word) for word in text.split(","))


def metadata(incident: Incident, size: int) -> dict[str, Any]:
    """Everything kept about a message beside its bytes (the id is added when stored)."""
    envelope, result, decision = incident.envelope, incident.result, incident.decision
    client, parameters = envelope.client, envelope.parameters
    return {
        "format": FORMAT,
        "time": _iso_time(incident.time),
        "transaction_id": incident.transaction_id,
        "client": attrs.asdict(client),
        "sender": envelope.sender,
        "mail_parameters": {
            "size": parameters.size,
            "body": parameters.body.value if parameters.body else None,
            "smtputf8": parameters.smtputf8,
            "envid": parameters.envid,
            "ret": parameters.ret.value if parameters.ret else None,
        },
        "recipients": [
            {
                "address": recipient.address,
                "notify": _notify_text(recipient.parameters.notify),
                "orcpt": recipient.parameters.orcpt,
            }
            for recipient in envelope.recipients
        ],
        "scanner": result.scanner,
        "verdict": result.verdict.value,
        "status": result.status(),
        "threats": [{"name": threat.name, "file": threat.file} for threat in result.threats],
        "error": result.error.value if result.error else None,
        "detail": result.detail,
        "decision": {"action": decision.action.value, "reason": decision.reason},
        "subject": incident.subject,
        "size": size,
    }


def envelope_of(data: Mapping[str, Any]) -> Envelope:
    """The original envelope, from an entry's metadata; raises QuarantineError when
    the metadata does not hold one."""
    try:
        parameters = data["mail_parameters"]
        return Envelope(
            client=Client(**data["client"]),
            sender=data["sender"],
            parameters=MailParameters(
                size=parameters["size"],
                body=BodyType(parameters["body"]) if parameters["body"] else None,
                smtputf8=parameters["smtputf8"],
                envid=parameters["envid"],
                ret=Return(parameters["ret"]) if parameters["ret"] else None,
            ),
            recipients=tuple(
                Recipient(
                    item["address"],
                    RecipientParameters(notify=_notify_value(item["notify"]), orcpt=item["orcpt"]),
                )
                for item in data["recipients"]
            ),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise QuarantineError(f"{data.get('id', '?')}: metadata has no usable envelope ({error!r})") from None


def released_header(entry_id: str, now: float) -> bytes:
    """The header line prepended to a released message."""
    return headers.field(RELEASED_HEADER, f"{entry_id}; {format_datetime(datetime.fromtimestamp(now, UTC))}")


def _suffix() -> str:
    return secrets.token_hex(4)


@attrs.frozen
class _Paths:
    directory: str
    id: str

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    @property
    def eml(self) -> str:
        return self._path(f"{self.id}.eml")

    @property
    def json(self) -> str:
        return self._path(f"{self.id}.json")

    # Temporary names start with a dot and do not have the shape of an id, so
    # neither list() nor an id given by a user ever reaches them.
    @property
    def eml_temp(self) -> str:
        return self._path(f".{self.id}.eml.tmp")

    @property
    def json_temp(self) -> str:
        return self._path(f".{self.id}.json.tmp")


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


def _fsync_directory(directory: str) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _claim(directory: str, stamp: str) -> tuple[_Paths, int]:
    """A fresh id and its open temporary .eml.  O_EXCL on the temporary name keeps
    two writers apart; the look at the final names, made after it, keeps an
    earlier entry with the same id from being overwritten."""
    while True:
        paths = _Paths(directory, f"{stamp}-{_suffix()}")
        try:
            descriptor = os.open(paths.eml_temp, _CREATE, 0o600)
        except FileExistsError:
            continue
        if not (os.path.lexists(paths.eml) or os.path.lexists(paths.json)):
            return paths, descriptor
        os.close(descriptor)
        os.unlink(paths.eml_temp)


def _write_entry(directory: str, stamp: str, data: dict[str, Any], chunks: Iterator[bytes]) -> str:
    """Write one entry durably; return its id.  Runs in a thread.  On any failure
    nothing of the entry is left."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    paths, descriptor = _claim(directory, stamp)
    try:
        with open(descriptor, "wb") as eml:
            for chunk in chunks:
                eml.write(chunk)
            eml.flush()
            os.fsync(eml.fileno())
        encoded = json.dumps({"id": paths.id, **data}, indent=2).encode("ascii") + b"\n"
        with open(os.open(paths.json_temp, _CREATE, 0o600), "wb") as meta:
            meta.write(encoded)
            meta.flush()
            os.fsync(meta.fileno())
        # The .json makes the entry visible, so it comes last: a listed entry
        # always has its message.
        os.rename(paths.eml_temp, paths.eml)
        os.rename(paths.json_temp, paths.json)
        _fsync_directory(directory)
    except BaseException:
        for path in (paths.json, paths.eml, paths.json_temp, paths.eml_temp):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        raise
    return paths.id


@implementer(IQuarantine)
class Quarantine:
    """The quarantine in ``directory`` (created 0700 when missing).

    ``in_thread`` runs the blocking part of :meth:`store`; by default the
    reactor's thread pool.  ``report`` hears of each copy stored and released.
    """

    def __init__(
        self, directory: str, reactor: Any, in_thread: InThread | None = None, report: Report = ignore
    ) -> None:
        self.directory = directory
        self._reactor = reactor
        self._in_thread = in_thread
        self._report = report

    def _run_in_thread(self, work: Callable[[], T]) -> Deferred[T]:
        if self._in_thread is not None:
            return self._in_thread(work)
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), work)

    def store(self, incident: Incident, message: Message) -> Deferred[str]:
        """Keep ``message``: fires with the new id once both files and their names
        are on disk (fsync'd), fails when they could not be written."""
        # Writing happens in a thread rather than in chunks on the reactor: the
        # fsyncs that make the copy durable block for as long as the disk takes
        # (seconds on a busy one), and every other session would wait meanwhile.
        stamp = datetime.fromtimestamp(incident.time, UTC).strftime("%Y%m%dT%H%M%SZ")
        data = metadata(incident, message.size)
        chunks = message.chunks()
        storing = self._run_in_thread(lambda: _write_entry(self.directory, stamp, data, chunks))

        def stored(entry_id: str) -> str:
            log.info("{transaction}: quarantined as {id}", transaction=incident.transaction_id, id=entry_id)
            self._report(Event.QUARANTINE_STORED)
            return entry_id

        return storing.addCallback(stored)

    # The methods below read and delete small files synchronously: they serve
    # the command line and release, not the path of every message.

    def list(self) -> builtins.list[Entry]:
        """Every entry, oldest first (in the order of their ids)."""
        return [self._entry(entry_id) for entry_id in sorted(self._ids())]

    def count(self) -> int:
        """How many entries there are (no file is read)."""
        return len(self._ids())

    def _ids(self) -> builtins.list[str]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return [name[:-5] for name in names if name.endswith(".json") and _ID.fullmatch(name[:-5])]

    def _entry(self, entry_id: str) -> Entry:
        try:
            data = self.get(entry_id)
            return Entry(
                entry_id,
                str(data["time"]),
                str(data["sender"]),
                tuple(str(item["address"]) for item in data["recipients"]),
                str(data["status"]),
            )
        except (QuarantineError, KeyError, TypeError) as error:
            return Entry(entry_id, "", "", (), f"unreadable ({error})")

    def get(self, entry_id: str) -> dict[str, Any]:
        """The metadata of an entry."""
        paths = _Paths(self.directory, check_id(entry_id))
        try:
            with open(paths.json, "rb") as file:
                data = json.load(file)
        except FileNotFoundError:
            raise NoSuchEntry(f"{entry_id}: no such entry in {self.directory}") from None
        except (OSError, ValueError) as error:
            raise QuarantineError(f"{entry_id}: cannot read the metadata: {error}") from None
        if not isinstance(data, dict):
            raise QuarantineError(f"{entry_id}: the metadata is not a JSON object")
        return data

    def open(self, entry_id: str) -> Message:
        """The message of an entry, as it was received; close it when done."""
        paths = _Paths(self.directory, check_id(entry_id))
        if not os.path.exists(paths.json):
            raise NoSuchEntry(f"{entry_id}: no such entry in {self.directory}")
        try:
            file = open(paths.eml, "rb")  # the Message owns and closes it
        except FileNotFoundError:
            raise NoSuchEntry(f"{entry_id}: no such entry in {self.directory}") from None
        except OSError as error:
            raise QuarantineError(f"{entry_id}: cannot read the message: {error.strerror}") from None
        return Message(file, os.fstat(file.fileno()).st_size)

    @contextlib.contextmanager
    def _busy(self, paths: _Paths) -> Iterator[None]:
        """Hold the entry while it is released or deleted.  flock on its metadata
        keeps a second release (or a delete) from another process or this one
        out, and goes with the process that held it, so nothing stale is left."""
        try:
            descriptor = os.open(paths.json, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NoSuchEntry(f"{paths.id}: no such entry in {self.directory}") from None
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise QuarantineError(f"{paths.id}: is being released") from None
            yield
        finally:
            os.close(descriptor)

    def delete(self, entry_id: str) -> None:
        """Remove an entry: its metadata first, so that it is gone at once."""
        paths = _Paths(self.directory, check_id(entry_id))
        with self._busy(paths):
            self._remove(paths)

    def _remove(self, paths: _Paths) -> None:
        try:
            os.unlink(paths.json)
        except FileNotFoundError:
            raise NoSuchEntry(f"{paths.id}: no such entry in {self.directory}") from None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(paths.eml)

    def release(self, entry_id: str, next_hop: INextHop) -> Deferred[Reply]:
        """Send the entry's message, as received and not scanned again, to its
        original recipients from its original sender through ``next_hop``, with
        an X-Quarantine-Released header on top.

        Fires with the next hop's reply: for the data when every step was
        accepted (the entry is then deleted), or the first refusal (the entry
        stays).  Fails with QuarantineError for an unknown or unreadable entry,
        or one that is being released already.
        """
        return Deferred.fromCoroutine(self._release(entry_id, next_hop))

    async def _release(self, entry_id: str, next_hop: INextHop) -> Reply:
        paths = _Paths(self.directory, check_id(entry_id))
        with self._busy(paths):
            # Read after taking the entry: a release that just ended has removed it.
            envelope = envelope_of(self.get(paths.id))
            message = self.open(paths.id)
            try:
                reply = await self._send(paths.id, envelope, message, next_hop)
            finally:
                message.close()
            if reply.code != 250:
                log.info("quarantine: release of {id} refused: {reply}", id=paths.id, reply=reply)
                return reply
            log.info("quarantine: released {id} ({text})", id=paths.id, text=reply.text)
            self._report(Event.QUARANTINE_RELEASED)
            try:
                self._remove(paths)
            except (OSError, QuarantineError):
                log.failure("quarantine: {id} was released but could not be deleted", id=paths.id)
            return reply

    async def _send(self, entry_id: str, envelope: Envelope, message: Message, next_hop: INextHop) -> Reply:
        prefix = released_header(entry_id, self._reactor.seconds())
        # SIZE announces what is sent now: the original plus the header.
        parameters = attrs.evolve(envelope.parameters, size=message.size + len(prefix))
        session = next_hop.session()
        try:
            # As in a client session: MAIL knows no recipients yet, RCPT adds them.
            reply: Reply = await session.mail(attrs.evolve(envelope, parameters=parameters, recipients=()))
            if not reply.positive:
                return reply
            for recipient in envelope.recipients:
                reply = await session.rcpt(recipient)
                if not reply.positive:
                    # All or nothing: a recipient left out now would never get it.
                    await session.reset()
                    return reply
            reply = await session.data(message, prefix)
            return reply
        finally:
            session.close()


def build_quarantine(table: Mapping[str, Any], reactor: Any, report: Report = ignore) -> Quarantine:
    """The quarantine of a ``[quarantine]`` table.  The directory is created (0700)
    here, so that one that cannot be is a start-up error, not a 451 per message."""
    options = tables.options(table)
    directory = options.get("directory", str, "")
    if not directory:
        raise options.error("directory", 'is required (e.g. "/var/spool/smtpguard/quarantine")')
    options.check_unknown()
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as error:
        raise options.error("directory", f"cannot create {directory!r}: {error.strerror}") from None
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
        raise options.error("directory", f"{directory!r} is not a writable directory")
    return Quarantine(directory, reactor, report=report)
