"""``[server] workers = N``: one supervisor process and N worker processes that
share its listening sockets.

The supervisor opens every listener's socket, starts the workers with the
sockets as inherited file descriptors (``spawnProcess`` with ``childFDs``), and
each worker, an ordinary ``twistd smtpguard`` of the same options, adopts them
(``adoptStreamPort``) instead of listening itself: the kernel hands each new
connection to whichever worker accepts it first.  The supervisor restarts a
worker that dies (backing off while they keep dying), passes SIGHUP on, stops
the workers with SIGTERM (each drains as a single process does) and logs what
they log, tagged with their number.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.application import service
from twisted.internet import tcp, unix
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import (
    CannotListenError,
    ConnectionDone,
    ProcessDone,
    ProcessExitedAlready,
    ProcessTerminated,
)
from twisted.internet.interfaces import IListeningPort, IReadDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import ILogObserver, Logger, LogLevel, eventFromJSON, globalLogPublisher, jsonFileLogObserver
from twisted.python.failure import Failure
from twisted.python.lockfile import FilesystemLock
from zope.interface import implementer

from smtpguard.config import Config, ConfigError, Listener, LogSettings
from smtpguard.reload import restart_needed
from smtpguard.transactionlog import TransactionLogFile
from smtpguard.workermetrics import WorkerMetrics, metrics_endpoint, metrics_socket, supervisor_monitoring

log = Logger()

FIRST_FD = 3  # the listeners' sockets are a worker's file descriptors 3, 4, ...
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
LOGGER = "smtpguard.workers.log_to_supervisor"
SHAREABLE = ("tcp", "tcp6", "unix", "systemd")  # endpoint types whose sockets workers can adopt


@attrs.frozen
class Backoff:
    """How long the supervisor waits before it starts a dead worker again: ``first``
    seconds, ``factor`` times longer for each further death in a row (at most
    ``longest``); a worker that ran ``stable`` seconds or more ends the row."""

    first: float = 0.5
    factor: float = 2.0
    longest: float = 30.0
    stable: float = 30.0

    def delay(self, deaths: int) -> float:
        """The wait after the ``deaths``-th quick death in a row (1 for the first)."""
        return float(min(self.longest, self.first * self.factor ** (deaths - 1)))


@attrs.frozen
class WorkerCommand:
    """How a worker is started: ``twistd smtpguard`` with the supervisor's own
    smtpguard ``arguments``, in its working ``directory``, with its environment."""

    executable: str
    arguments: tuple[str, ...]
    directory: str
    environment: Mapping[str, str]

    def argv(self, number: int, sockets: int, private: str | None = None) -> list[str]:
        adopt = [f"--adopt={fd}" for fd in range(FIRST_FD, FIRST_FD + sockets)]
        twistd = [self.executable, "-c", TWISTD, "--nodaemon", "--pidfile=", f"--logger={LOGGER}"]
        where = [] if private is None else [f"--worker-directory={private}"]
        return [*twistd, "smtpguard", *self.arguments, f"--worker-number={number}", *where, *adopt]


# -- the supervisor's side --------------------------------------------------------------------


class SharedSocket:
    """A listening socket the supervisor opened for its workers and never accepts on."""

    def __init__(self, sock: socket.socket, path: str | None = None, lock: FilesystemLock | None = None) -> None:
        sock.setblocking(False)  # what adoptStreamPort requires of it
        self._socket = sock
        self._path = path
        self._lock = lock

    def fileno(self) -> int:
        return self._socket.fileno()

    def close(self) -> None:
        self._socket.close()
        if self._path is not None and os.path.exists(self._path):
            os.unlink(self._path)
        if self._lock is not None:
            self._lock.unlock()


class _SocketOpener:
    """Stands in for the reactor when a listener's endpoint string is turned into a
    socket: the endpoint binds and listens as it would, but nothing accepts here."""

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> SharedSocket:
        sock = socket.socket(socket.AF_INET6 if ":" in interface else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted's own ports do
        sock.bind((interface, port))
        sock.listen(backlog)
        return SharedSocket(sock)

    def listenUNIX(
        self, address: str, factory: Any, backlog: int = 50, mode: int = 0o666, wantPID: bool = False
    ) -> SharedSocket:
        lock = None
        if wantPID:  # as Twisted's unix ports do: a stale socket of a dead process is removed
            lock = FilesystemLock(address + ".lock")
            if not lock.lock():
                raise CannotListenError(None, address, "Cannot acquire lock")
            if not lock.clean and os.path.exists(address):
                os.unlink(address)
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(address)
        os.chmod(address, mode)
        sock.listen(backlog)
        return SharedSocket(sock, address, lock)

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: int, factory: Any) -> SharedSocket:
        # The endpoint closes its descriptor (systemd's) once adopted.
        return SharedSocket(socket.socket(addressFamily, socket.SOCK_STREAM, fileno=os.dup(fileDescriptor)))


def open_sockets(config: Config) -> list[SharedSocket]:
    """A listening socket for each of the configured listeners, in their order."""
    opener = _SocketOpener()
    opened: list[SharedSocket] = []
    try:
        for listener in config.listeners:
            opened.append(_open(opener, config, listener))
    except BaseException:
        for sock in opened:
            sock.close()
        raise
    return opened


def _open(opener: _SocketOpener, config: Config, listener: Listener) -> SharedSocket:
    if listener.endpoint.partition(":")[0].lower() not in SHAREABLE:
        raise ConfigError(
            f"{config.source}: server.workers: {listener.endpoint!r} cannot be shared by workers:"
            " use tcp:, tcp6:, unix: or systemd: endpoints (STARTTLS rather than ssl:)"
        )
    try:
        endpoint = serverFromString(opener, listener.endpoint)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{config.source}: bad endpoint {listener.endpoint!r}: {error}") from None
    results: list[Any] = []
    endpoint.listen(None).addBoth(results.append)  # type: ignore[no-untyped-call]  # at once, with these
    [result] = results
    if isinstance(result, Failure):
        result.raiseException()
    assert isinstance(result, SharedSocket)
    return result


class WorkerProtocol(ProcessProtocol):
    """One worker as the supervisor sees it: what it logs (JSON events on its
    stdout, plain lines on its stderr) is logged again here tagged ``worker N``,
    and ``ended`` is told when it is gone."""

    def __init__(
        self, number: int, ended: Callable[[WorkerProtocol, Failure], None], publish: ILogObserver
    ) -> None:
        self.number = number
        self._ended = ended
        self._publish = publish
        self._pending: dict[int, bytes] = {}
        self.ready = False  # listening, its SIGHUP handler in place
        # A SIGHUP came while it was starting: it may have read the file before the
        # change, so it gets the SIGHUP as soon as it can take one.
        self.reload_pending = False

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        *lines, self._pending[childFD] = (self._pending.get(childFD, b"") + data).split(b"\n")
        for line in lines:
            self._line(childFD, line)

    def _line(self, childFD: int, line: bytes) -> None:
        text = line.decode("utf-8", "replace").strip("\x1e\r")
        if not text:
            return
        event = _event(text) if childFD == 1 else None
        if event is None:
            event = {
                "log_format": "{line}",
                "line": text,
                "log_level": LogLevel.warn if childFD == 2 else LogLevel.info,
                "log_namespace": "smtpguard.workers",
                "log_time": _now(),
            }
        namespace, level = event.get("log_namespace", "-"), event.get("log_level")
        system = event.get("log_system") or f"{namespace}#{getattr(level, 'name', '-')}"
        event["log_system"] = f"worker {self.number} {system}"
        event["smtpguard_worker"] = self.number
        starting = not self.ready
        self.ready = self.ready or event.get("smtpguard_worker_ready") is True
        self._publish(event)
        if starting and self.ready and self.reload_pending:
            self.reload_pending = False
            log.info("worker {number} ready: passing on the SIGHUP that came while it started", number=self.number)
            try:
                self.transport.signalProcess("HUP")  # type: ignore[union-attr]
            except ProcessExitedAlready:
                pass

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in sorted(self._pending.items()):
            self._line(fd, rest)
        self._pending.clear()
        self._ended(self, reason)


def _event(text: str) -> dict[str, Any] | None:
    try:
        event = eventFromJSON(text)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "log_time" in event else None


def _now() -> float:
    import time

    return time.time()


@attrs.define
class _Worker:
    protocol: WorkerProtocol
    process: Any  # IProcessTransport
    pid: int
    started: float


class Supervisor(service.Service):
    """Opens the shared sockets (``open_sockets``, before privileges are dropped),
    keeps ``count`` workers running, passes SIGHUP on (:meth:`reload`) and, when
    stopped, closes its copies of the sockets, sends each worker SIGTERM and
    waits for them all, sending SIGKILL to those still there after
    ``stop_timeout`` seconds.

    With ``private_directory``, it makes a directory only its user can enter
    (in ``$RUNTIME_DIRECTORY`` when systemd gives one, else the temporary
    directory) where each worker serves its metrics (:attr:`metrics_sockets`),
    and removes it once the workers are gone."""

    def __init__(
        self,
        reactor: Any,
        count: int,
        command: WorkerCommand,
        open_sockets: Callable[[], Sequence[SharedSocket]],
        backoff: Backoff = Backoff(),
        stop_timeout: float = 60.0,
        publish: ILogObserver = globalLogPublisher,
        private_directory: bool = False,
    ) -> None:
        self._reactor = reactor
        self._count = count
        self._command = command
        self._open_sockets = open_sockets
        self._backoff = backoff
        self._stop_timeout = stop_timeout
        self._publish = publish
        self._sockets: Sequence[SharedSocket] = ()
        self._workers: dict[int, _Worker] = {}
        self._deaths: dict[int, int] = {}  # quick deaths in a row, per worker number
        self._restarts: dict[int, Any] = {}  # pending restarts (delayed calls)
        self._stopped: Deferred[None] | None = None
        self._private_directory = private_directory
        self.directory: str | None = None  # the private directory, while running
        self._starts: dict[int, int] = {}  # processes started, per worker number

    @property
    def pids(self) -> dict[int, int]:
        """The running workers' process ids, by worker number."""
        return {number: worker.pid for number, worker in sorted(self._workers.items())}

    @property
    def restarts(self) -> dict[int, int]:
        """How many times each worker was started again, by worker number."""
        return {number: starts - 1 for number, starts in sorted(self._starts.items())}

    @property
    def metrics_sockets(self) -> dict[int, str]:
        """The metrics sockets of the workers that are ready, by worker number."""
        directory = self.directory
        if directory is None:
            return {}
        ready = [number for number, worker in sorted(self._workers.items()) if worker.protocol.ready]
        return {number: metrics_socket(directory, number) for number in ready}

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        self._sockets = self._open_sockets()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if not self._sockets:
            self._sockets = self._open_sockets()
        if self._private_directory:
            # Made here, after twistd dropped privileges: the workers' user owns it.
            self.directory = tempfile.mkdtemp(
                prefix="smtpguard-workers-", dir=self._command.environment.get("RUNTIME_DIRECTORY")
            )
        for number in range(1, self._count + 1):
            self._start(number)

    def _start(self, number: int) -> None:
        self._restarts.pop(number, None)
        fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        # A worker's stdin stays open: it ends when the supervisor does, which
        # tells an orphaned worker to stop.
        fds.update({FIRST_FD + index: sock.fileno() for index, sock in enumerate(self._sockets)})
        protocol = WorkerProtocol(number, self._ended, self._publish)
        argv = self._command.argv(number, len(self._sockets), self.directory)
        try:
            process = self._reactor.spawnProcess(
                protocol,
                self._command.executable,
                argv,
                env=dict(self._command.environment),
                path=self._command.directory,
                childFDs=fds,
            )
        except Exception:
            log.failure("worker {number}: cannot start", number=number)
            self._schedule(number, self._reactor.seconds())
            return
        self._workers[number] = _Worker(protocol, process, process.pid, self._reactor.seconds())
        self._starts[number] = self._starts.get(number, 0) + 1
        log.info("worker {number} started, pid {pid}", number=number, pid=process.pid)

    def _ended(self, protocol: WorkerProtocol, reason: Failure) -> None:
        number = protocol.number
        worker = self._workers.get(number)
        if worker is None or worker.protocol is not protocol:
            return
        del self._workers[number]
        if not self.running:
            log.info("worker {number} (pid {pid}) {how}", number=number, pid=worker.pid, how=_how(reason))
            if not self._workers and self._stopped is not None:
                self._stopped.callback(None)
            return
        log.error("worker {number} (pid {pid}) {how}", number=number, pid=worker.pid, how=_how(reason))
        self._schedule(number, worker.started)

    def _schedule(self, number: int, started: float) -> None:
        quick = self._reactor.seconds() - started < self._backoff.stable
        self._deaths[number] = self._deaths.get(number, 0) + 1 if quick else 1
        delay = self._backoff.delay(self._deaths[number])
        log.info("worker {number}: starting it again in {delay:.1f} s", number=number, delay=delay)
        self._restarts[number] = self._reactor.callLater(delay, self._start, number)

    def reload(self) -> None:
        """Pass SIGHUP on to every worker that is ready, and to each one still
        starting once it is (before, SIGHUP would kill it; and it may have read
        the configuration before the change)."""
        ready = [worker for worker in self._workers.values() if worker.protocol.ready]
        for worker in self._workers.values():
            worker.protocol.reload_pending = not worker.protocol.ready
        log.info("SIGHUP: passing it on to {count} worker(s)", count=len(ready))
        self._signal("HUP", ready)

    def _signal(self, name: str, workers: Sequence[_Worker] | None = None) -> None:
        for worker in list(self._workers.values()) if workers is None else workers:
            try:
                worker.process.signalProcess(name)
            except ProcessExitedAlready:
                pass  # its end is on its way to _ended

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        for call in self._restarts.values():
            call.cancel()
        self._restarts.clear()
        # The workers stop listening at SIGTERM; with the supervisor's copies
        # closed too, new connections are refused at once instead of waiting.
        for sock in self._sockets:
            sock.close()
        self._sockets = ()
        if not self._workers:
            self._remove_directory()
            return succeed(None)
        stopped: Deferred[None] = Deferred()
        self._stopped = stopped
        self._signal("TERM")
        deadline = self._reactor.callLater(self._stop_timeout, self._kill)

        def done(result: None) -> None:
            if deadline.active():
                deadline.cancel()
            self._remove_directory()

        return stopped.addCallback(done)

    def _remove_directory(self) -> None:
        directory, self.directory = self.directory, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def _kill(self) -> None:
        for number, worker in sorted(self._workers.items()):
            log.warn(
                "worker {number} (pid {pid}) did not stop within {timeout:g} s: killing it",
                number=number,
                pid=worker.pid,
                timeout=self._stop_timeout,
            )
        self._signal("KILL")


def _how(reason: Failure) -> str:
    """How a process ended, for the log."""
    if isinstance(reason.value, ProcessDone):
        return "exited with status 0"
    if isinstance(reason.value, ProcessTerminated):
        if reason.value.signal is not None:
            return f"was killed by signal {reason.value.signal}"
        return f"exited with status {reason.value.exitCode}"
    return f"ended: {reason.getErrorMessage()}"


def hang_up_on(reactor: Any, receiver: Callable[[], None]) -> None:
    """Call ``receiver`` in the reactor thread at each SIGHUP."""
    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(receiver))


class _HangUp(service.Service):
    def __init__(self, reactor: Any, receiver: Callable[[], None]) -> None:
        self._reactor = reactor
        self._receiver = receiver

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        hang_up_on(self._reactor, self._receiver)


def supervisor_service(options: Any, reactor: Any) -> service.MultiService:
    """The supervisor of ``options["loaded"].workers`` workers.  It alone writes
    ``[logging] file`` (the workers' transaction events come to it with the
    rest of their log) and serves ``[metrics] listen``, asking the workers."""
    from smtpguard.tap import build_service

    config: Config = options["loaded"]
    # Everything a worker would refuse at start is refused here, once.
    build_service(config, reactor, listen=lambda listener, factory: service.Service())
    # The supervisor alone speaks to systemd (sd_notify): the workers are not its main process.
    environment = {name: value for name, value in os.environ.items() if name != "NOTIFY_SOCKET"}
    command = WorkerCommand(sys.executable, tuple(options.arguments), os.getcwd(), environment)
    top = service.MultiService()
    log_file = None
    if config.logging.file is not None:
        log_file = TransactionLogFile(config.logging)
        log_file.setServiceParent(top)  # type: ignore[no-untyped-call]
    monitored = config.metrics_listen is not None
    supervisor = Supervisor(reactor, config.workers, command, lambda: open_sockets(config), private_directory=monitored)
    supervisor.setServiceParent(top)  # type: ignore[no-untyped-call]
    if config.metrics_listen is not None:
        metrics = WorkerMetrics(
            reactor, lambda: supervisor.metrics_sockets, lambda: len(supervisor.pids), lambda: supervisor.restarts
        )
        supervisor_monitoring(config.metrics_listen, reactor, metrics).setServiceParent(top)  # type: ignore[no-untyped-call]

    def hang_up() -> None:
        if log_file is not None:
            log_file.reopen()  # as log rotation expects of a SIGHUP
        name_restart_needed(config, options.load)
        supervisor.reload()

    _HangUp(reactor, hang_up).setServiceParent(top)  # type: ignore[no-untyped-call]
    return top


SUPERVISORS = ("metrics.listen", "logging")  # the keys only the supervisor uses


def name_restart_needed(started: Config, load: Callable[[], Config]) -> None:
    """Log the changes to the supervisor's own keys in the file read again (the
    workers name theirs, and a file they refuse)."""
    try:
        changes = restart_needed(started, load())
    except Exception:
        return
    for change in changes:
        if change in SUPERVISORS:
            log.warn("{source}: {change} changed: needs a restart; not applied", source=started.source, change=change)


# -- the worker's side -------------------------------------------------------------------------


def log_to_supervisor() -> ILogObserver:
    """A worker's log observer (``twistd --logger``): events as JSON lines on its
    stdout, which the supervisor reads."""
    return jsonFileLogObserver(sys.__stdout__)  # type: ignore[arg-type]


class _SharedUnixPort(unix.Port):
    """An adopted unix socket whose path other workers still share: removing
    it is the supervisor's business, not this worker's as it stops."""

    def connectionLost(self, reason: Failure) -> None:
        tcp.Port.connectionLost(self, reason)


class AdoptedPort(service.Service):
    """Listens with ``factory`` on the inherited listening socket ``fd`` while running."""

    def __init__(self, reactor: Any, fd: int, factory: Any) -> None:
        self._reactor = reactor
        self._fd = fd
        self._factory = factory
        self._port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        probe = socket.socket(fileno=self._fd)
        family = probe.family
        probe.detach()
        if family == socket.AF_UNIX:
            port = _SharedUnixPort._fromListeningDescriptor(self._reactor, self._fd, self._factory)  # type: ignore[no-untyped-call]
            port.startListening()
        else:
            port = self._reactor.adoptStreamPort(self._fd, family, self._factory)
        # The port holds a copy: without this one, the socket closes for this
        # worker as soon as the port stops listening.
        os.close(self._fd)
        self._port = port

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        port, self._port = self._port, None
        return None if port is None else port.stopListening()


@implementer(IReadDescriptor)
class _SupervisorWatch:
    """Reads the worker's stdin, the supervisor's end of which stays open while it
    lives: at end of file, the supervisor is gone and the worker stops too."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def fileno(self) -> int:
        return 0

    def logPrefix(self) -> str:
        return "supervisor"

    def doRead(self) -> Failure | None:
        try:
            data = os.read(0, 512)
        except BlockingIOError:
            return None
        return None if data else Failure(ConnectionDone())

    def connectionLost(self, reason: Failure) -> None:
        log.warn("the supervisor is gone: stopping")
        if self._reactor.running:
            self._reactor.stop()


class WorkerRole(service.Service):
    """What makes a smtpguard process a worker: SIGHUP reloads ``top`` (when it can
    reload), and the worker stops when its supervisor is gone."""

    def __init__(self, reactor: Any, number: int, top: service.IService) -> None:
        self._reactor = reactor
        self.number = number
        self._top = top
        self._watch = _SupervisorWatch(reactor)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        hang_up_on(self._reactor, self.hang_up)
        os.set_blocking(0, False)
        self._reactor.addReader(self._watch)
        self.say_ready()

    def say_ready(self) -> None:
        """Tell the supervisor (in the log it reads) that SIGHUP is safe now."""
        log.info("worker {number} ready", number=self.number, smtpguard_worker_ready=True)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        self._reactor.removeReader(self._watch)

    def hang_up(self) -> None:
        reload = getattr(self._top, "reload", None)
        if reload is None:
            log.warn("SIGHUP received; reloading is not available: restart smtpguard to apply a new configuration")
            return
        log.info("SIGHUP received: reloading the configuration")
        reload()


def as_worker(config: Config, number: int, private: str | None) -> Config:
    """``config`` as worker ``number`` runs it: no transaction log file (the
    supervisor writes it) and, when the supervisor serves metrics (and so gave
    it a ``private`` directory), its own metrics on a unix socket there.  The
    supervisor's keys read the same in every file a worker reads again, so only
    the supervisor names their changes."""
    metrics = None if private is None else metrics_endpoint(private, number)
    return attrs.evolve(config, logging=LogSettings(), metrics_listen=metrics)


def worker_service(
    config: Config,
    reactor: Any,
    number: int,
    fds: Sequence[int],
    load: Callable[[], Config] | None = None,
    private: str | None = None,
) -> service.MultiService:
    """Worker ``number``: the service of ``config`` (:func:`as_worker`), each of
    its listeners adopting the socket at the same place in ``fds``."""
    from smtpguard.tap import build_service

    config = as_worker(config, number, private)
    if load is not None:
        load = _loading_as_worker(load, number, private)
    if len(fds) != len(config.listeners):
        raise ConfigError(
            f"{config.source}: server.listen: {len(config.listeners)} listeners now, {len(fds)} when smtpguard"
            " started: restart smtpguard to listen elsewhere"
        )
    sockets = dict(zip((id(listener) for listener in config.listeners), fds, strict=True))
    top = build_service(
        config, reactor, load, listen=lambda listener, factory: AdoptedPort(reactor, sockets[id(listener)], factory)
    )
    WorkerRole(reactor, number, top).setServiceParent(top)  # type: ignore[no-untyped-call]
    return top


def _loading_as_worker(load: Callable[[], Config], number: int, private: str | None) -> Callable[[], Config]:
    return lambda: as_worker(load(), number, private)


def make_service(options: Any, reactor: Any) -> service.MultiService:
    """A worker when the supervisor started this process, else the supervisor."""
    if options["worker-number"] is not None:
        number = int(options["worker-number"])
        private = options["worker-directory"]
        return worker_service(options["loaded"], reactor, number, options["adopt"], options.load, private)
    return supervisor_service(options, reactor)
