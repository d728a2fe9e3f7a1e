"""Shared fixtures: real programs on loopback, and the rule that a missing real
program fails under CI=true instead of skipping."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.strict_hop import HopSettings, StrictHop

if TYPE_CHECKING:
    from tests.postfix import PrivatePostfix

IN_CI = os.environ.get("CI", "").lower() == "true"
SBIN = ("/usr/sbin", "/usr/lib/postfix/sbin")


def require_program(name: str) -> str:
    """The path of ``name``; fails in CI and skips elsewhere when it is missing."""
    path = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))
    if path is None:
        message = f"{name} is not installed (scripts/test installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def require_postfix() -> None:
    """A private Postfix instance needs the postfix program and root (its daemons
    run as the postfix user); without either, fails in CI and skips elsewhere."""
    require_program("postfix")
    if os.geteuid() != 0:
        message = "a private Postfix instance needs root"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


class SmtpSink:
    """Postfix's smtp-sink on loopback, dumping each message it receives into a
    folder (``-d``), with the envelope in X-* headers it prepends."""

    def __init__(self, directory: Path, port: int, process: subprocess.Popen[bytes]) -> None:
        self.directory = directory
        self.port = port
        self.endpoint = f"tcp:127.0.0.1:{port}"
        self.process = process

    def messages(self, expected: int = 1, timeout: float = 5.0) -> list[bytes]:
        """The dumped messages, oldest first, once ``expected`` have arrived."""
        deadline = time.monotonic() + timeout
        while True:
            files = sorted(self.directory.iterdir(), key=lambda path: path.stat().st_mtime_ns)
            if len(files) >= expected or time.monotonic() > deadline:
                return [path.read_bytes() for path in files]
            time.sleep(0.02)


def start_smtp_sink(directory: Path, *options: str) -> SmtpSink:
    binary = require_program("smtp-sink")
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [binary, "-u", "root", *options, "-d", str(directory / "%Y%m%d%H%M%S."), f"127.0.0.1:{port}", "64"],
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port)
    return SmtpSink(directory, port, process)


@pytest.fixture
def smtp_sink(tmp_path: Path) -> Iterator[SmtpSink]:
    sink = start_smtp_sink(tmp_path / "sink")
    yield sink
    sink.process.terminate()
    sink.process.wait(5)


# -- added for the integration tests ------------------------------------------------


class LoggingSmtpSink(SmtpSink):
    """An smtp-sink started with ``-v``: its stderr, kept in ``log``, shows every
    command it received (XFORWARD included, which the dump files do not record)."""

    def __init__(self, directory: Path, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
        super().__init__(directory, port, process)
        self.log = log

    def commands(self) -> list[str]:
        """The logged command lines, in order, without the program-name prefix."""
        lines = self.log.read_text(encoding="utf-8", errors="replace").splitlines()
        return [line.split(": ", 1)[1] for line in lines if ": " in line]


def start_logging_smtp_sink(directory: Path, *options: str) -> LoggingSmtpSink:
    binary = require_program("smtp-sink")
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    log = directory.parent / (directory.name + ".log")
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [binary, "-v", "-u", "root", *options, "-d", str(directory / "%Y%m%d%H%M%S."), f"127.0.0.1:{port}", "64"],
            cwd=directory,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    wait_for_port(port)
    return LoggingSmtpSink(directory, port, process, log)


class SinkStarter:
    """Starts logging smtp-sinks in subfolders of one directory and stops them all."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[LoggingSmtpSink] = []

    def __call__(self, name: str, *options: str) -> LoggingSmtpSink:
        sink = start_logging_smtp_sink(self.directory / name, *options)
        self.started.append(sink)
        return sink

    def stop(self) -> None:
        for sink in self.started:
            sink.process.terminate()
            sink.process.wait(5)


@pytest.fixture
def smtp_sinks(tmp_path: Path) -> Iterator[SinkStarter]:
    """``smtp_sinks(NAME, *options)`` starts an smtp-sink with extra options
    (``-f RCPT``, ``-B reply`` ...) dumping to tmp_path/NAME and logging its
    commands; all are stopped at teardown."""
    starter = SinkStarter(tmp_path)
    yield starter
    starter.stop()


@pytest.fixture(scope="session")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One clamd for the whole run (see tests/engines.py); tests that stop or stall
    it should use their own ``Clamd`` instead."""
    from tests.engines import Clamd

    engine = Clamd(tmp_path_factory.mktemp("clamd"))
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture
def listening() -> Iterator[list[object]]:
    """Ports a test opens on the global reactor; they stop listening at teardown."""
    import pytest_twisted
    from twisted.internet import defer

    opened: list[object] = []
    yield opened
    for port in opened:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))  # type: ignore[attr-defined]


async def listen(listening: list[object], factory: object, description: str = "tcp:0:interface=127.0.0.1") -> int:
    """Listen with ``factory`` on loopback (port 0 by default); the port number."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    port = await serverFromString(reactor, description).listen(factory)
    listening.append(port)
    return int(port.getHost().port)


class StrictHops:
    """Starts strict next hops (tests/strict_hop.py) on loopback, port 0, and stops them all."""

    def __init__(self) -> None:
        self.started: list[tuple[StrictHop, Any]] = []

    def __call__(self, **settings: Any) -> StrictHop:
        """A new StrictHop listening on 127.0.0.1; ``settings`` are HopSettings keys."""
        from twisted.internet import reactor

        hop = StrictHop(reactor, HopSettings(**settings))
        # listenTCP rather than an endpoint: it listens at once, so a running test
        # can start a hop too.
        port = reactor.listenTCP(0, hop, interface="127.0.0.1")  # type: ignore[attr-defined]
        hop.port = port.getHost().port
        self.started.append((hop, port))
        return hop

    def stop(self) -> None:
        import pytest_twisted
        from twisted.internet import defer

        for hop, port in self.started:
            for connection in hop.connections:
                connection.abort()
            stopped = defer.maybeDeferred(port.stopListening)
            pytest_twisted.blockon(defer.gatherResults([stopped, hop.wait_for_open(0)]))


@pytest.fixture
def strict_hops() -> Iterator[StrictHops]:
    """``strict_hops(**settings)`` starts a next hop that answers as Postfix's smtpd
    does (see tests/strict_hop.py for what it records and how to hold it); all are
    stopped at teardown, their connections aborted."""
    starter = StrictHops()
    yield starter
    starter.stop()


@pytest.fixture
def strict_hop(strict_hops: StrictHops) -> StrictHop:
    """One strict next hop with Postfix's defaults (tests/strict_hop.py)."""
    return strict_hops()


class PostfixInstances:
    """Starts private Postfix instances (tests/postfix.py) and stops them all."""

    def __init__(self) -> None:
        self.started: list[PrivatePostfix] = []

    def __call__(self, main_cf: str = "", master_cf: str = "", listening: tuple[int, ...] = ()) -> PrivatePostfix:
        """A started instance with ``main_cf`` and ``master_cf`` added to the common
        settings, once it listens on each of the ``listening`` loopback ports."""
        from tests.postfix import PrivatePostfix

        require_postfix()
        instance = PrivatePostfix(main_cf, master_cf, listening)
        self.started.append(instance)
        instance.start()
        return instance

    def stop(self) -> None:
        for instance in self.started:
            instance.stop()


@pytest.fixture
def private_postfix() -> Iterator[PostfixInstances]:
    """``private_postfix(main_cf, master_cf, listening=(port, ...))`` starts a
    Postfix instance of its own (its configuration, queue and data directories,
    log and Maildir in a temporary directory: tests/postfix.py); all are stopped
    (``postfix stop``) at teardown."""
    instances = PostfixInstances()
    yield instances
    instances.stop()


def http_get(port: int, path: str) -> tuple[int, str]:
    """GET ``path`` from the HTTP server on 127.0.0.1:``port`` (smtpguard's
    metrics endpoint): its status and body, an error status included."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=20) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
