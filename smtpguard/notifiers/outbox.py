"""The durable outbox: each notice is on disk before anyone hears it is queued, and
is sent from there to the next hop with MAIL FROM:<>, one at a time, retried
with exponential backoff until it is accepted, refused for good, or too old.

A notice is one file, ``<id>.notice``: a line of JSON (recipient, attempts, times)
then the message bytes.  Every write goes to a hidden temporary file that is
synced and renamed over the old one, so a crash leaves the old file or the new.

Several processes (smtpguard's workers) may share one directory: an attempt holds
an exclusive ``flock`` on the notice's file from before it reads it until after it
has rewritten or removed it, and reads the file's state again once it holds it, so
each attempt is one process's and none repeats one that another has made.  The
kernel lets go of a dead process's locks, and every process looks through the
directory again now and then, so no notice depends on the process that queued it.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from collections.abc import Callable
from enum import Enum
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from smtpguard import replies
from smtpguard.envelope import BodyType, Client, Envelope, MailParameters, Recipient
from smtpguard.events import Event, Report, ignore
from smtpguard.interfaces import INextHop
from smtpguard.replies import Reply
from smtpguard.spool import Message

log = Logger()

SUFFIX = ".notice"
_FORMAT = 1


class Outcome(Enum):
    """How one attempt at a notice ended."""

    DELIVERED = "delivered"  # 2xx: gone from the outbox
    RETRY = "retry"  # 4xx or no connection: stays, tried again later
    DROPPED = "dropped"  # 5xx: gone, logged
    EXPIRED = "expired"  # older than max_age: gone, logged
    LOST = "lost"  # its file cannot be read: forgotten, logged
    GONE = "gone"  # its file went away (another process sent it or gave it up): forgotten


@attrs.frozen
class RetrySettings:
    """Backoff: ``initial`` seconds after the first failure, doubling up to
    ``maximum``; a notice older than ``max_age`` seconds is given up."""

    initial: float = 60.0
    maximum: float = 3600.0
    max_age: float = 5 * 24 * 3600.0

    def delay(self, failures: int) -> float:
        return float(min(self.initial * 2 ** min(max(failures - 1, 0), 64), self.maximum))


@attrs.frozen
class QueuedNotice:
    """What the outbox knows of one notice besides its message bytes."""

    id: str
    recipient: str
    kind: str  # "sender" or "admin": for logs
    transaction_id: str  # the message the notice is about
    created: float  # seconds since the epoch
    attempts: int = 0
    next_attempt: float = 0.0
    last_reply: str = ""

    def header(self) -> bytes:
        fields = attrs.asdict(self)
        fields["format"] = _FORMAT
        return json.dumps(fields, sort_keys=True).encode("ascii") + b"\n"

    @classmethod
    def parse(cls, header: bytes) -> QueuedNotice:
        fields = json.loads(header)
        if not isinstance(fields, dict) or fields.pop("format", None) != _FORMAT:
            raise ValueError("not an outbox notice")
        notice = cls(**fields)
        if not isinstance(notice.recipient, str) or not isinstance(notice.attempts, int):
            raise ValueError("malformed outbox notice")
        return notice


def _open_locked(path: str) -> int | None:
    """A read-only descriptor of ``path`` holding its exclusive flock; None when
    another process holds it.  Raises FileNotFoundError when ``path`` is gone."""
    while True:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The holder may have replaced or removed the file before letting go:
            # the lock is then on a file no longer at ``path``.
            if os.path.samestat(os.fstat(descriptor), os.stat(path)):
                return descriptor
        except BlockingIOError:
            os.close(descriptor)
            return None
        except BaseException:
            os.close(descriptor)
            raise
        os.close(descriptor)


def _create_locked(path: str) -> int:
    """``path`` created (or truncated) for writing, holding its exclusive flock."""
    while True:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            # Held at most for an instant, by a process removing it as abandoned;
            # if that process removed it, it is created again.
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            if os.fstat(descriptor).st_nlink:
                return descriptor
        except BaseException:
            os.close(descriptor)
            raise
        os.close(descriptor)


def _fsync_directory(directory: str) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class Outbox:
    """Notices in ``directory``, delivered through ``next_hop`` (an INextHop whose
    sessions never fail: every outcome is a reply).

    ``add`` writes synchronously and raises OSError when it cannot; delivery runs
    between :meth:`start` and :meth:`stop`, driven by ``reactor.callLater``.
    ``report`` hears of each notice queued, sent and given up.  Every ``rescan``
    seconds the directory is looked through again for the notices other
    processes queued and for those they have ended.
    """

    def __init__(
        self,
        reactor: Any,
        directory: str,
        next_hop: INextHop,
        retry: RetrySettings = RetrySettings(),
        hostname: str = "localhost",
        report: Report = ignore,
        rescan: float = 60.0,
    ) -> None:
        verifyObject(INextHop, next_hop)
        self._report = report
        self._reactor = reactor
        self.directory = directory
        self._next_hop = next_hop
        self._retry = retry
        self._rescan = rescan
        # Who the next hop hears about (XFORWARD): this host, which wrote the notice,
        # so SOURCE=LOCAL (XFORWARD_README).
        self._client = Client("127.0.0.1", 0, helo=hostname, hostname=hostname, source="LOCAL")
        self._queued: dict[str, QueuedNotice] = {}
        self._started = False
        self._timer: IDelayedCall | None = None
        self._rescanning: IDelayedCall | None = None
        # Files this process ended but could not remove or set aside: not loaded again.
        self._left: set[str] = set()
        self._busy: Deferred[None] | None = None
        self._stopping: list[Deferred[None]] = []
        self._watchers: dict[str, list[Deferred[Outcome]]] = {}

    def follow(self, other: Outbox) -> None:
        """Deliver from now on as ``other`` would (its next hop, retry settings and
        host name: a reloaded configuration's), keeping this outbox's directory and
        the notices queued in it."""
        self._next_hop, self._retry, self._client = other._next_hop, other._retry, other._client

    # -- queueing --------------------------------------------------------------------

    def add(self, recipient: str, message: bytes, kind: str, transaction_id: str) -> QueuedNotice:
        """Write a notice for ``recipient`` to disk (synced) and queue it for
        delivery now; raises OSError when it could not be written."""
        notice = QueuedNotice(
            id=secrets.token_hex(10),
            recipient=recipient,
            kind=kind,
            transaction_id=transaction_id,
            created=self._reactor.seconds(),
            next_attempt=self._reactor.seconds(),
        )
        self._write(notice, message)
        self._queued[notice.id] = notice
        self._report(Event.NOTICE_QUEUED, kind)
        log.info(
            "{tid}: {kind} notice {id} to <{rcpt}> queued", tid=transaction_id, kind=kind, id=notice.id, rcpt=recipient
        )
        self._schedule()
        return notice

    def pending(self) -> list[QueuedNotice]:
        """The notices waiting, oldest first."""
        return sorted(self._queued.values(), key=lambda notice: (notice.created, notice.id))

    def watch(self, notice_id: str) -> Deferred[Outcome]:
        """Fires with the outcome of the next attempt at ``notice_id`` (for tests
        and monitoring).  Raises KeyError when no such notice is queued."""
        if notice_id not in self._queued:
            raise KeyError(notice_id)
        waiting: Deferred[Outcome] = Deferred()
        self._watchers.setdefault(notice_id, []).append(waiting)
        return waiting

    # -- running ---------------------------------------------------------------------

    def start(self) -> None:
        """Create the directory if needed, load every notice in it and start
        delivering.  Raises OSError when the directory is unusable."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self._scan()
        self._started = True
        log.info("outbox {dir}: {n} notice(s) waiting", dir=self.directory, n=len(self._queued))
        self._rescanning = self._reactor.callLater(self._rescan, self._rescan_now)
        self._schedule()

    def stop(self) -> Deferred[None]:
        """Stop delivering; fires once the attempt under way, if any, has ended.
        Notices stay on disk for the next start."""
        self._started = False
        self._cancel_timer()
        if self._rescanning is not None and self._rescanning.active():
            self._rescanning.cancel()
        self._rescanning = None
        if self._busy is None:
            return defer.succeed(None)
        waiting: Deferred[None] = Deferred()
        self._stopping.append(waiting)
        return waiting

    def _rescan_now(self) -> None:
        self._rescanning = self._reactor.callLater(self._rescan, self._rescan_now)
        try:
            self._scan()
        except OSError as error:
            log.error("outbox {dir}: cannot look through it: {error}", dir=self.directory, error=error)
        self._schedule()

    def _scan(self) -> None:
        """Load the notices not known yet, forget those whose file is gone, and
        remove the temporary files of writes a crash interrupted."""
        names = sorted(os.listdir(self.directory))
        for name in names:
            path = os.path.join(self.directory, name)
            if name.startswith(".") and name.endswith(".tmp"):
                self._remove_abandoned(path)
            elif name.endswith(SUFFIX) and name[: -len(SUFFIX)] not in self._queued and name not in self._left:
                self._load(path)
        present = set(names)
        for notice in list(self._queued.values()):
            if notice.id + SUFFIX not in present:
                self._forget(notice)

    def _remove_abandoned(self, path: str) -> None:
        # A write under way holds its temporary file's lock; one that a crash
        # interrupted holds none, and its notice was never reported queued.
        try:
            descriptor = _open_locked(path)
        except FileNotFoundError:
            return
        except OSError as error:
            log.critical("outbox: cannot remove {path}: {error}", path=path, error=error)
            return
        if descriptor is not None:
            try:
                self._remove_path(path)
            finally:
                os.close(descriptor)

    def _load(self, path: str) -> None:
        try:
            with open(path, "rb") as file:
                notice = QueuedNotice.parse(file.readline())
        except FileNotFoundError:
            return  # ended by another process since the directory was listed
        except OSError as error:
            log.critical("outbox: cannot read {path}: {error}", path=path, error=error)
            return
        except (ValueError, TypeError) as error:
            log.error("outbox: {path} is not a notice ({error}); renamed to .corrupt", path=path, error=error)
            self._rename_corrupt(path)
            return
        if self._path(notice.id) != path:
            log.error("outbox: {path} does not carry its own id; renamed to .corrupt", path=path)
            self._rename_corrupt(path)
            return
        self._queued[notice.id] = notice

    def _forget(self, notice: QueuedNotice) -> None:
        """``notice``'s file is gone: another process sent it or gave it up (and
        logged it), or someone removed it."""
        self._queued.pop(notice.id, None)
        log.info(
            "{tid}: {kind} notice {id} to <{rcpt}> is no longer in the outbox (ended by another process); forgotten",
            tid=notice.transaction_id,
            kind=notice.kind,
            id=notice.id,
            rcpt=notice.recipient,
        )
        self._tell(notice.id, Outcome.GONE)

    def _rename_corrupt(self, path: str) -> None:
        try:
            os.replace(path, path + ".corrupt")
        except FileNotFoundError:
            pass  # another process set it aside first
        except OSError as error:
            self._left.add(os.path.basename(path))
            log.critical("outbox: cannot rename {path}: {error}", path=path, error=error)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _schedule(self) -> None:
        """Wake up when the next notice is due (one attempt at a time)."""
        if not self._started or self._busy is not None:
            return
        self._cancel_timer()
        if not self._queued:
            return
        due = min(notice.next_attempt for notice in self._queued.values())
        self._timer = self._reactor.callLater(max(0.0, due - self._reactor.seconds()), self._wake)

    def _wake(self) -> None:
        self._timer = None
        now = self._reactor.seconds()
        due = [notice for notice in self._queued.values() if notice.next_attempt <= now]
        if not due:
            self._schedule()
            return
        notice = min(due, key=lambda notice: (notice.next_attempt, notice.created, notice.id))
        attempt = Deferred.fromCoroutine(self._attempt(notice))
        self._busy = attempt
        attempt.addErrback(self._attempt_failed, notice)
        attempt.addBoth(self._attempt_done)

    def _attempt_failed(self, failure: Failure, notice: QueuedNotice) -> None:
        # Only a bug gets here; the notice stays queued with its old schedule
        # pushed back, so a bug cannot spin.
        log.failure("outbox: attempt at notice {id} failed", failure, id=notice.id)
        if notice.id in self._queued:
            self._queued[notice.id] = attrs.evolve(notice, next_attempt=self._reactor.seconds() + self._retry.initial)
        self._tell(notice.id, Outcome.RETRY)

    def _attempt_done(self, _: object) -> None:
        self._busy = None
        stopping, self._stopping = self._stopping, []
        for waiting in stopping:
            waiting.callback(None)
        self._schedule()

    async def _attempt(self, notice: QueuedNotice) -> None:
        claimed = self._claim(notice)
        if claimed is None:
            return
        descriptor, notice, message = claimed
        try:
            await self._deliver(notice, message)
        finally:
            os.close(descriptor)  # after the file was rewritten or removed

    def _claim(self, notice: QueuedNotice) -> tuple[int, QueuedNotice, bytes] | None:
        """The locked file of ``notice``, its state as on disk and its message;
        None when this process is not to attempt it now: another holds it (it is
        tried again after ``rescan`` seconds), ended it, or deferred it."""
        path = self._path(notice.id)
        try:
            descriptor = _open_locked(path)
        except FileNotFoundError:
            self._forget(notice)
            return None
        except OSError as error:
            self._lost(notice, error)
            return None
        if descriptor is None:
            self._queued[notice.id] = attrs.evolve(notice, next_attempt=self._reactor.seconds() + self._rescan)
            return None
        try:
            with open(descriptor, "rb", closefd=False) as file:
                saved = QueuedNotice.parse(file.readline())
                message = file.read()
        except (OSError, ValueError, TypeError) as error:
            os.close(descriptor)
            self._lost(notice, error)
            return None
        if saved.attempts > notice.attempts:
            # Attempted by another process since this one read it.
            notice = self._queued[notice.id] = saved
        if notice.next_attempt > self._reactor.seconds():
            os.close(descriptor)
            return None
        return descriptor, notice, message

    def _lost(self, notice: QueuedNotice, error: Exception) -> None:
        log.critical("outbox: notice {id} unreadable: {error}; forgotten", id=notice.id, error=error)
        self._finish(notice, Outcome.LOST, str(error), notice.attempts, remove=False)

    async def _deliver(self, notice: QueuedNotice, message: bytes) -> None:
        # Past its age already (loaded after a long stop): not even one more try.
        if self._reactor.seconds() > notice.created + self._retry.max_age:
            self._finish(notice, Outcome.EXPIRED, "older than max_age", notice.attempts)
            return
        reply = await self._send(notice, message)
        said = f"{reply.code} {reply.enhanced} {reply.text}".replace("  ", " ").strip()
        attempts = notice.attempts + 1
        if 200 <= reply.code < 300:
            self._finish(notice, Outcome.DELIVERED, said, attempts)
            return
        if reply.permanent:
            self._finish(notice, Outcome.DROPPED, said, attempts)
            return
        now = self._reactor.seconds()
        expiry = notice.created + self._retry.max_age
        if now >= expiry:
            self._finish(notice, Outcome.EXPIRED, said, attempts)
            return
        later = attrs.evolve(
            notice,
            attempts=attempts,
            next_attempt=min(now + self._retry.delay(attempts), expiry),
            last_reply=said,
        )
        self._queued[notice.id] = later
        try:
            self._write(later, message)
        except OSError as error:
            # The schedule lives on in memory; the file keeps the old one.
            log.critical("outbox: cannot update notice {id}: {error}", id=notice.id, error=error)
        log.info(
            "outbox: notice {id} to <{rcpt}> deferred ({said}); attempt {n} in {delay:.0f}s",
            id=notice.id,
            rcpt=notice.recipient,
            said=said,
            n=attempts + 1,
            delay=later.next_attempt - now,
        )
        self._tell(notice.id, Outcome.RETRY)

    async def _send(self, notice: QueuedNotice, message: bytes) -> Reply:
        """MAIL FROM:<>, RCPT, DATA through a new session; the reply that ended it."""
        recipient = Recipient(notice.recipient)
        parameters = MailParameters(
            size=len(message),
            body=None if message.isascii() else BodyType.EIGHT_BIT_MIME,
            smtputf8=not notice.recipient.isascii(),
        )
        envelope = Envelope(self._client, "", parameters)
        session = self._next_hop.session()
        try:
            reply: Reply = await session.mail(envelope)
            if 200 <= reply.code < 300:
                reply = await session.rcpt(recipient)
                if 200 <= reply.code < 300:
                    reply = await session.data(Message.from_bytes(message), b"")
                    return reply
            await session.reset()
            return reply
        except Exception:
            log.failure("outbox: sending notice {id} failed", id=notice.id)
            return replies.LOCAL_ERROR
        finally:
            session.close()

    def _finish(self, notice: QueuedNotice, outcome: Outcome, said: str, attempts: int, remove: bool = True) -> None:
        self._queued.pop(notice.id, None)
        if not (remove and self._remove_path(self._path(notice.id))):
            self._left.add(notice.id + SUFFIX)
        emit: Callable[..., None] = log.info if outcome is Outcome.DELIVERED else log.error
        emit(
            "{tid}: {kind} notice {id} to <{rcpt}> {outcome} after {n} attempt(s): {said}",
            tid=notice.transaction_id,
            kind=notice.kind,
            id=notice.id,
            rcpt=notice.recipient,
            outcome=outcome.value,
            n=attempts,
            said=said,
        )
        if outcome is Outcome.DELIVERED:
            self._report(Event.NOTICE_SENT, notice.kind)
        else:
            self._report(Event.NOTICE_FAILED, notice.kind, outcome.value)
        self._tell(notice.id, outcome)

    def _tell(self, notice_id: str, outcome: Outcome) -> None:
        for waiting in self._watchers.pop(notice_id, []):
            waiting.callback(outcome)

    # -- files -----------------------------------------------------------------------

    def _path(self, notice_id: str) -> str:
        return os.path.join(self.directory, notice_id + SUFFIX)

    def _write(self, notice: QueuedNotice, message: bytes) -> None:
        temporary = os.path.join(self.directory, f".{notice.id}.tmp")
        descriptor = _create_locked(temporary)
        try:
            # Renamed while still locked, so that no other process takes it for
            # an abandoned write.
            with os.fdopen(descriptor, "wb") as file:
                file.write(notice.header())
                file.write(message)
                file.flush()
                os.fsync(file.fileno())
                os.replace(temporary, self._path(notice.id))
        except BaseException:
            self._remove_path(temporary)
            raise
        _fsync_directory(self.directory)

    @staticmethod
    def _remove_path(path: str) -> bool:
        """Whether ``path`` is gone now."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as error:
            log.critical("outbox: cannot remove {path}: {error}", path=path, error=error)
            return False
        return True
