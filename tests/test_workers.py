"""The supervisor of ``[server] workers = N`` with a MemoryReactorClock and fake
processes as strict as Twisted's own: which workers it starts with which sockets,
how it starts a dead one again, what it passes on and how it stops them; the
worker's SIGHUP; the key and the option; the shared sockets, for real."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.application import service
from twisted.internet import error
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import (
    Logger,
    LogLevel,
    LogPublisher,
    capturedLogs,
    eventAsJSON,
    eventsFromJSONLogFile,
    formatEvent,
)
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smtpguard import config as configuration
from smtpguard.config import ConfigError
from smtpguard.reload import restart_needed
from smtpguard.tap import Options
from smtpguard.transactionlog import TransactionLogFile, log_transaction, transaction_fields
from smtpguard.workers import (
    Backoff,
    Supervisor,
    WorkerCommand,
    WorkerProtocol,
    WorkerRole,
    as_worker,
    name_restart_needed,
    open_sockets,
)
from tests.test_transactionlog import transaction

SIGNALS = {"HUP": 1, "INT": 2, "KILL": 9, "TERM": 15, "STOP": 19}


@implementer(IProcessTransport)
class FakeProcess:
    """A child process as twisted.internet.process.Process behaves toward its
    protocol: its pid is None once it has exited, and signalling it then raises
    ProcessExitedAlready; it ends with processExited, then processEnded."""

    def __init__(self, protocol: Any, pid: int) -> None:
        self.protocol = protocol
        self.pid: int | None = pid
        self.signals: list[int] = []

    def signalProcess(self, signalID: str | int) -> None:
        number = SIGNALS[signalID] if isinstance(signalID, str) and signalID in SIGNALS else signalID
        if not isinstance(number, int):
            raise TypeError(f"not a signal: {signalID!r}")  # what os.kill does with it
        if self.pid is None:
            raise error.ProcessExitedAlready()
        self.signals.append(number)

    def exit(self, status: int | None = None, signal: int | None = None) -> None:
        assert self.pid is not None, "a process exits once"
        self.pid = None
        reason = Failure(error.ProcessDone(0) if status == 0 else error.ProcessTerminated(status, signal))
        self.protocol.processExited(reason)
        self.protocol.processEnded(reason)

    # The rest of IProcessTransport; the supervisor uses none of it.
    def closeStdin(self) -> None: ...
    def closeStdout(self) -> None: ...
    def closeStderr(self) -> None: ...
    def closeChildFD(self, descriptor: int) -> None: ...
    def writeToChild(self, childFD: int, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def write(self, data: bytes) -> None: ...
    def writeSequence(self, data: Any) -> None: ...
    def getPeer(self) -> Any: ...
    def getHost(self) -> Any: ...


class ProcessReactor(MemoryReactorClock):
    """A MemoryReactorClock that spawns FakeProcesses, checking the arguments as
    spawnProcess does."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []
        self.failing = False
        self._next_pid = 1000

    def spawnProcess(
        self,
        processProtocol: Any,
        executable: str,
        args: list[str],
        env: dict[str, str] | None = None,
        path: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: dict[int, Any] | None = None,
    ) -> FakeProcess:
        assert all(isinstance(arg, str) for arg in [executable, *args])
        assert env is None or all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
        assert childFDs is None or all(v in ("r", "w") or isinstance(v, int) for v in childFDs.values())
        if self.failing:
            raise OSError(2, "No such file or directory")
        self._next_pid += 1
        process = FakeProcess(processProtocol, self._next_pid)
        self.spawned.append(
            {"args": args, "env": env, "path": path, "childFDs": childFDs, "process": process, "at": self.seconds()}
        )
        processProtocol.makeConnection(process)
        return process

    def process(self, number: int) -> FakeProcess:
        """The latest process of worker ``number``."""
        spawned = [s for s in self.spawned if f"--worker-number={number}" in s["args"]]
        process: FakeProcess = spawned[-1]["process"]
        return process


class FakeSocket:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.closed = False

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        self.closed = True


COMMAND = WorkerCommand("/usr/bin/python3", ("--config", "guard.toml", "--workers", "2"), "/srv", {"LANG": "C"})
BACKOFF = Backoff(first=0.5, factor=2.0, longest=30.0, stable=30.0)


def running(count: int = 2, reactor: ProcessReactor | None = None) -> tuple[ProcessReactor, Supervisor, list[Any]]:
    reactor = reactor or ProcessReactor()
    sockets = [FakeSocket(7), FakeSocket(9)]
    published: list[Any] = []
    supervisor = Supervisor(
        reactor, count, COMMAND, lambda: sockets, BACKOFF, stop_timeout=60.0, publish=published.append
    )
    supervisor.privilegedStartService()
    supervisor.startService()
    return reactor, supervisor, sockets


def fired(deferred: Any) -> list[Any]:
    results: list[Any] = []
    deferred.addBoth(results.append)
    return results


def test_fake_process_provides_iprocesstransport() -> None:
    """The fake process transport provides the whole of IProcessTransport."""
    assert verifyObject(IProcessTransport, FakeProcess(None, 1))


def test_starts_each_worker_with_the_shared_sockets_as_descriptors_3_and_up() -> None:
    """Two workers: twistd smtpguard with the supervisor's options, its number and
    --adopt=3 --adopt=4, the sockets mapped to 3 and 4, stdin a pipe from the
    supervisor and stdout and stderr pipes to it, in its directory and environment."""
    reactor, supervisor, _ = running()

    assert [spawned["args"] for spawned in reactor.spawned] == [
        [
            "/usr/bin/python3",
            "-c",
            "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
            "--nodaemon",
            "--pidfile=",
            "--logger=smtpguard.workers.log_to_supervisor",
            "smtpguard",
            "--config",
            "guard.toml",
            "--workers",
            "2",
            f"--worker-number={number}",
            "--adopt=3",
            "--adopt=4",
        ]
        for number in (1, 2)
    ]
    assert [spawned["childFDs"] for spawned in reactor.spawned] == [{0: "w", 1: "r", 2: "r", 3: 7, 4: 9}] * 2
    assert [(spawned["path"], spawned["env"]) for spawned in reactor.spawned] == [("/srv", {"LANG": "C"})] * 2
    assert supervisor.pids == {1: 1001, 2: 1002}


def test_a_dead_worker_is_started_again_after_the_first_delay() -> None:
    """Worker 1 dying (status 1) after running 100 s is started again 0.5 s later,
    with the same number; worker 2 is left alone."""
    reactor, supervisor, _ = running()
    reactor.advance(100)
    reactor.process(1).exit(1)

    reactor.advance(0.49)
    assert len(reactor.spawned) == 2 and supervisor.pids == {2: 1002}
    reactor.advance(0.01)
    assert len(reactor.spawned) == 3
    assert "--worker-number=1" in reactor.spawned[2]["args"]
    assert supervisor.pids == {1: 1003, 2: 1002}


def test_quick_deaths_in_a_row_double_the_delay_up_to_the_longest() -> None:
    """A worker that dies as soon as it starts is started again after 0.5, 1, 2, 4,
    8, 16, 30 and 30 s."""
    reactor, _, _ = running(count=1)
    delays = []
    for _ in range(8):
        died = reactor.seconds()
        reactor.process(1).exit(1)
        while len(reactor.spawned) == len(delays) + 1:
            reactor.advance(0.25)
        delays.append(reactor.spawned[-1]["at"] - died)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_a_worker_that_ran_stable_seconds_ends_the_row_of_quick_deaths() -> None:
    """After three quick deaths, a worker that ran 30 s is started again after the
    first delay, 0.5 s."""
    reactor, _, _ = running(count=1)
    for delay in (0.5, 1.0, 2.0):
        reactor.process(1).exit(1)
        reactor.advance(delay)
    reactor.advance(30)
    reactor.process(1).exit(1, None)
    reactor.advance(0.5)
    assert len(reactor.spawned) == 5


def test_backoff_delays() -> None:
    """Backoff.delay: first * factor ** (deaths - 1), at most longest."""
    assert [Backoff(1.0, 3.0, 20.0).delay(deaths) for deaths in (1, 2, 3, 4)] == [1.0, 3.0, 9.0, 20.0]


def test_a_worker_killed_by_a_signal_is_logged_with_the_signal() -> None:
    """A worker killed by SIGKILL is logged as an error naming its number, pid and
    the signal, then the restart with its delay."""
    reactor, _, _ = running()
    with capturedLogs() as events:
        reactor.process(2).exit(None, 9)
    assert [(event["log_level"], formatEvent(event)) for event in events] == [
        (LogLevel.error, "worker 2 (pid 1002) was killed by signal 9"),
        (LogLevel.info, "worker 2: starting it again in 0.5 s"),
    ]


def test_a_worker_that_cannot_be_started_is_tried_again() -> None:
    """spawnProcess raising (no such executable) is logged, and tried again after
    the back-off."""
    reactor = ProcessReactor()
    reactor.failing = True
    with capturedLogs() as events:
        running(count=1, reactor=reactor)
    assert [formatEvent(event) for event in events] == [
        "worker 1: cannot start",
        "worker 1: starting it again in 0.5 s",
    ]
    reactor.failing = False
    reactor.advance(0.5)
    assert len(reactor.spawned) == 1


def ready_line(number: int) -> bytes:
    """What WorkerRole logs, as the worker's log observer writes it, once it listens."""
    with capturedLogs() as events:
        WorkerRole(MemoryReactorClock(), number, service.MultiService()).say_ready()
    return ("\x1e" + eventAsJSON(events[0]) + "\n").encode()


def test_reload_passes_sighup_to_every_worker_that_is_ready() -> None:
    """reload() sends SIGHUP to each worker that said it is ready; one still
    starting (SIGHUP would kill it before its handler is in place, and it may
    have read the file before the change) gets it as soon as it is ready."""
    reactor, supervisor, _ = running()
    reactor.process(1).protocol.childDataReceived(1, ready_line(1))
    supervisor.reload()
    assert [reactor.process(number).signals for number in (1, 2)] == [[1], []]
    reactor.process(2).protocol.childDataReceived(1, ready_line(2))
    assert [reactor.process(number).signals for number in (1, 2)] == [[1], [1]]
    supervisor.reload()
    assert [reactor.process(number).signals for number in (1, 2)] == [[1, 1], [1, 1]]


def test_a_worker_ready_after_the_sighup_that_it_already_had_gets_no_other() -> None:
    """A worker that was ready at the SIGHUP is not signalled again by a later
    ready line; one started ready without a SIGHUP gets none."""
    reactor, supervisor, _ = running()
    for number in (1, 2):
        reactor.process(number).protocol.childDataReceived(1, ready_line(number))
    supervisor.reload()
    reactor.process(1).protocol.childDataReceived(1, ready_line(1))
    assert [reactor.process(number).signals for number in (1, 2)] == [[1], [1]]


def test_stop_closes_the_sockets_and_waits_for_every_worker_after_sigterm() -> None:
    """Stopping closes the supervisor's sockets at once, sends SIGTERM to each worker
    and fires only when both have exited; no timer is left."""
    reactor, supervisor, sockets = running()
    stopped = fired(supervisor.stopService())

    assert [s.closed for s in sockets] == [True, True]
    assert [reactor.process(number).signals for number in (1, 2)] == [[15], [15]]
    reactor.process(1).exit(None, 15)
    reactor.advance(10)
    assert stopped == []
    reactor.process(2).exit(None, 15)
    assert stopped == [None]
    assert reactor.getDelayedCalls() == []
    assert len(reactor.spawned) == 2


def test_stop_kills_a_worker_still_there_after_the_timeout() -> None:
    """A worker that has not exited 60 s after SIGTERM gets SIGKILL; stopping fires
    once it is gone."""
    reactor, supervisor, _ = running()
    stopped = fired(supervisor.stopService())
    reactor.process(1).exit(None, 15)
    reactor.advance(59.9)
    assert reactor.process(2).signals == [15]
    reactor.advance(0.1)
    assert reactor.process(2).signals == [15, 9]
    assert stopped == []
    reactor.process(2).exit(None, 9)
    assert stopped == [None]


def test_stop_cancels_a_pending_restart() -> None:
    """A worker that died just before the stop is not started again."""
    reactor, supervisor, _ = running()
    reactor.process(1).exit(1)
    stopped = fired(supervisor.stopService())
    reactor.process(2).exit(None, 15)
    reactor.advance(100)
    assert stopped == [None]
    assert len(reactor.spawned) == 2
    assert reactor.getDelayedCalls() == []


def test_worker_events_are_logged_again_tagged_with_its_number() -> None:
    """A JSON event on a worker's stdout, arriving in pieces, is published with
    its own time and text and the system ``worker N NAMESPACE#LEVEL``; a line on
    its stderr is published as a warning of that worker."""
    published: list[Any] = []
    protocol = WorkerProtocol(2, lambda protocol, reason: None, published.append)
    with capturedLogs() as events:
        Logger(namespace="smtpguard.pipeline").info("{queue}: relayed", queue="Q1")
    line = ("\x1e" + eventAsJSON(events[0]) + "\n").encode()

    protocol.childDataReceived(1, line[:10])
    protocol.childDataReceived(1, line[10:])
    protocol.childDataReceived(2, b"Traceback (most recent call last):\n")

    assert [(formatEvent(event), event["log_system"], event["log_level"]) for event in published] == [
        ("Q1: relayed", "worker 2 smtpguard.pipeline#info", LogLevel.info),
        ("Traceback (most recent call last):", "worker 2 smtpguard.workers#warn", LogLevel.warn),
    ]
    assert published[0]["log_time"] == events[0]["log_time"]


def test_a_workers_transaction_events_go_into_the_supervisors_log_file(tmp_path: Path) -> None:
    """A transaction event on a worker's stdout reaches the supervisor's transaction
    log file once, its fields intact and the worker's number added; the worker's
    other events do not."""
    path = tmp_path / "transactions.json"
    publisher = LogPublisher()
    log_file = TransactionLogFile(configuration.LogSettings("json", str(path)), publisher)
    log_file.startService()
    protocol = WorkerProtocol(2, lambda protocol, reason: None, publisher)
    record = transaction()
    with capturedLogs() as events:
        log_transaction(record)
        Logger(namespace="smtpguard.pipeline").info("{queue}: relayed", queue="Q1")
    for event in events:
        protocol.childDataReceived(1, ("\x1e" + eventAsJSON(event) + "\n").encode())
    log_file.stopService()

    with path.open(encoding="utf-8") as handle:
        [written] = list(eventsFromJSONLogFile(handle))
    fields = transaction_fields(record)
    assert {name: written[name] for name in fields} == fields
    assert written["smtpguard_worker"] == 2


MONITORED: dict[str, Any] = {
    "server": {"listen": ["tcp:10025"], "workers": 2},
    "upstream": {"endpoint": "tcp:127.0.0.1:10026"},
    "scanners": [{"type": "builtin"}],
    "logging": {"format": "json", "file": "/var/log/smtpguard/transactions.json"},
    "metrics": {"listen": "tcp:9125:interface=127.0.0.1"},
}


def test_workers_write_no_log_file_and_serve_metrics_on_their_socket() -> None:
    """As worker 2 runs it, the configuration has no [logging] file (the supervisor
    writes it) and [metrics] listen is its unix socket in the private directory."""
    worker = as_worker(configuration.parse(MONITORED, "guard.toml"), 2, "/run/smtpguard/w")
    assert worker.logging == configuration.LogSettings("text", None)
    assert worker.metrics_listen == "unix:/run/smtpguard/w/worker-2.sock:mode=600:lockfile=1"
    assert as_worker(configuration.parse({**MONITORED, "metrics": {}}, "guard.toml"), 2, None).metrics_listen is None


def test_only_the_supervisor_names_a_change_to_its_keys_on_reload() -> None:
    """A file read again with another [metrics] listen and [logging] file: the
    supervisor warns that each needs a restart; as workers read it, it has no
    change that needs one."""
    started = configuration.parse(MONITORED, "guard.toml")
    changed = configuration.parse(
        {**MONITORED, "logging": {"format": "text", "file": "-"}, "metrics": {"listen": "tcp:9126"}}, "guard.toml"
    )

    with capturedLogs() as events:
        name_restart_needed(started, lambda: changed)

    assert [(event["log_level"], formatEvent(event)) for event in events] == [
        (LogLevel.warn, "guard.toml: metrics.listen changed: needs a restart; not applied"),
        (LogLevel.warn, "guard.toml: logging changed: needs a restart; not applied"),
    ]
    assert restart_needed(as_worker(started, 1, "/run/w"), as_worker(changed, 1, "/run/w")) == []


def test_private_directory_is_made_for_the_workers_and_removed_after_them(tmp_path: Path) -> None:
    """With private_directory, the supervisor makes a directory of mode 0700 in
    $RUNTIME_DIRECTORY, gives it to each worker (--worker-directory) and removes
    it once the workers are gone."""
    reactor = ProcessReactor()
    command = attrs.evolve(COMMAND, environment={"LANG": "C", "RUNTIME_DIRECTORY": str(tmp_path)})
    supervisor = Supervisor(reactor, 2, command, lambda: [FakeSocket(7)], BACKOFF, private_directory=True)
    supervisor.privilegedStartService()
    supervisor.startService()

    [directory] = tmp_path.iterdir()
    assert directory.stat().st_mode & 0o777 == 0o700
    assert [spawned["args"][-2] for spawned in reactor.spawned] == [f"--worker-directory={directory}"] * 2
    stopped = fired(supervisor.stopService())
    reactor.process(1).exit(None, 15)
    assert directory.exists()
    reactor.process(2).exit(None, 15)
    assert stopped == [None]
    assert list(tmp_path.iterdir()) == []


def test_metrics_sockets_are_those_of_the_ready_workers(tmp_path: Path) -> None:
    """Only a worker that said it is ready is asked for its metrics."""
    reactor = ProcessReactor()
    command = attrs.evolve(COMMAND, environment={"RUNTIME_DIRECTORY": str(tmp_path)})
    supervisor = Supervisor(reactor, 2, command, lambda: [FakeSocket(7)], BACKOFF, private_directory=True)
    supervisor.startService()
    assert supervisor.metrics_sockets == {}
    reactor.process(2).protocol.childDataReceived(1, ready_line(2))
    assert supervisor.metrics_sockets == {2: f"{supervisor.directory}/worker-2.sock"}
    fired(supervisor.stopService())
    for number in (1, 2):
        reactor.process(number).exit(None, 15)


def test_restarts_count_each_worker_started_again() -> None:
    """Worker 1 dying twice and started again each time: restarts {1: 2, 2: 0}."""
    reactor, supervisor, _ = running()
    assert supervisor.restarts == {1: 0, 2: 0}
    for _ in range(2):
        reactor.process(1).exit(1)
        reactor.advance(30)
    assert supervisor.restarts == {1: 2, 2: 0}


class Reloadable(service.MultiService):
    def __init__(self) -> None:
        super().__init__()
        self.reloads = 0

    def reload(self) -> None:
        self.reloads += 1


def test_worker_sighup_reloads_a_service_that_can() -> None:
    """A worker's SIGHUP calls the service's reload()."""
    top = Reloadable()
    role = WorkerRole(MemoryReactorClock(), 1, top)
    with capturedLogs() as events:
        role.hang_up()
    assert top.reloads == 1
    assert [formatEvent(event) for event in events] == ["SIGHUP received: reloading the configuration"]


def test_worker_sighup_without_reload_says_so() -> None:
    """A worker's SIGHUP on a service without reload() is logged as a warning."""
    role = WorkerRole(MemoryReactorClock(), 1, service.MultiService())
    with capturedLogs() as events:
        role.hang_up()
    assert [(event["log_level"], formatEvent(event)) for event in events] == [
        (
            LogLevel.warn,
            "SIGHUP received; reloading is not available: restart smtpguard to apply a new configuration",
        )
    ]


# -- the key, the option and the sockets -----------------------------------------------------


def parsed(server: str, tmp_path: Path, *options: str) -> Any:
    path = tmp_path / "guard.toml"
    path.write_text(
        f'[server]\n{server}\n[upstream]\nendpoint = "tcp:127.0.0.1:10026"\n[[scanners]]\ntype = "builtin"\n'
    )
    parsing = Options()
    parsing.parseOptions(["--config", str(path), *options])
    return parsing


def test_workers_is_1_by_default(tmp_path: Path) -> None:
    """Without [server] workers, one process."""
    assert parsed("", tmp_path)["loaded"].workers == 1


def test_workers_key_and_option(tmp_path: Path) -> None:
    """[server] workers = 4 gives 4; --workers 2 replaces it; the options are kept
    for the workers."""
    assert parsed("workers = 4", tmp_path)["loaded"].workers == 4
    options = parsed("workers = 4", tmp_path, "--workers", "2")
    assert options["loaded"].workers == 2
    assert options.arguments[-2:] == ["--workers", "2"]


def test_workers_must_be_positive() -> None:
    """workers = 0 stops the start, naming server.workers."""
    data = {"server": {"workers": 0}, "upstream": {"endpoint": "tcp:127.0.0.1:10026"}, "scanners": [{"type": "x"}]}
    with pytest.raises(ConfigError) as raised:
        configuration.parse(data, "guard.toml")
    assert str(raised.value) == "guard.toml: server.workers: must be greater than 0, got 0"


def config_listening(*endpoints: str) -> configuration.Config:
    data = {
        "server": {"listen": list(endpoints), "workers": 2},
        "upstream": {"endpoint": "tcp:127.0.0.1:10026"},
        "scanners": [{"type": "builtin"}],
    }
    return configuration.parse(data, "guard.toml")


def test_shared_tcp_socket_listens_and_does_not_block() -> None:
    """A tcp: listener becomes a bound, listening, non-blocking socket that a client
    can connect to (the kernel queues it for a worker to accept)."""
    [shared] = open_sockets(config_listening("tcp:0:interface=127.0.0.1"))
    probe = socket.socket(fileno=os.dup(shared.fileno()))
    try:
        assert probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert os.get_blocking(shared.fileno()) is False
        socket.create_connection(probe.getsockname(), timeout=5).close()
    finally:
        probe.close()
        shared.close()


def test_shared_unix_socket_is_removed_when_closed(tmp_path: Path) -> None:
    """A unix: listener's path exists with the given mode while the socket is open,
    and is gone once the supervisor closes it."""
    path = tmp_path / "guard.sock"
    [shared] = open_sockets(config_listening(f"unix:{path}:mode=660"))
    assert path.is_socket() and path.stat().st_mode & 0o777 == 0o660
    assert Path(f"{path}.lock").is_symlink()  # Twisted's lockfile=1, the default for unix:
    shared.close()
    assert not path.exists() and not Path(f"{path}.lock").exists()


def test_ssl_listener_cannot_be_shared() -> None:
    """An ssl: listener with workers stops the start, naming server.workers and
    what can be shared."""
    with pytest.raises(ConfigError) as raised:
        open_sockets(config_listening("ssl:0:privateKey=key.pem"))
    assert str(raised.value) == (
        "guard.toml: server.workers: 'ssl:0:privateKey=key.pem' cannot be shared by workers:"
        " use tcp:, tcp6:, unix: or systemd: endpoints (STARTTLS rather than ssl:)"
    )
