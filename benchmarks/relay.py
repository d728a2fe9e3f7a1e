#!/usr/bin/env python3
"""Message throughput of smtpguard, side by side with what bounds it and with ClamSMTP.

Up to five configurations, all on 127.0.0.1, driven by Postfix's smtp-source:

* ``direct``: smtp-source -> smtp-sink (the ceiling: two C programs);

with ``--engine builtin``:

* ``smtpguard builtin``: smtp-source -> smtpguard (built-in scanner) -> smtp-sink;
* ``twisted.mail``: smtp-source -> a bare twisted.mail ESMTP server that collects
  each message line by line and throws it away at the end of data (receive only,
  no relay): what a naive Twisted server costs;

with ``--engine clamd`` (a private clamd, one EICAR signature, its cache off):

* ``ClamSMTP clamd``: smtp-source -> clamsmtpd -> smtp-sink, clamsmtpd scanning
  each message with that clamd (it writes the message to a file and sends SCAN);
* ``smtpguard clamd``: smtp-source -> smtpguard (``--scanner clamd:unix:SOCKET``)
  -> smtp-sink, scanning with the same clamd (INSTREAM).

The default is both engines: all five configurations, ``direct`` shared.  Before
measuring, an EICAR message is sent through each proxy: it must be refused or
dropped, never reach smtp-sink.  At the end, each proxy's log must show every
benchmark message scanned clean and relayed.

The machine is assumed to be shared and noisy, so the configurations are
interleaved in rounds (their order rotating from round to round), and the table
shows medians over the rounds.  Every run must deliver every message: a failed
smtp-source or a short count at the receiving end stops the benchmark.

Run ``python benchmarks/relay.py --help`` for the options; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.mail import smtp
from zope.interface import implementer

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SENDER = "from@example.com"
RECIPIENT = "to@example.com"
SBIN = ("/usr/sbin", "/usr/lib/postfix/sbin", "/usr/local/sbin")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BACKLOG = 4096

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"

# Configurations: (name, scanner), as in the table's first two columns.
DIRECT = ("direct", "-")
GUARD = ("smtpguard", "builtin")
REFERENCE = ("twisted.mail", "none")
CLAMSMTP = ("ClamSMTP", "clamd")
GUARD_CLAMD = ("smtpguard", "clamd")
BUILTIN, CLAMD = "builtin", "clamd"
ENGINES = {BUILTIN: (GUARD, REFERENCE), CLAMD: (CLAMSMTP, GUARD_CLAMD)}
Configuration = tuple[str, str]


def label(configuration: Configuration) -> str:
    return configuration[0] if configuration == DIRECT else " ".join(configuration)


class BenchmarkError(Exception):
    """A run went wrong: the benchmark stops and says why."""


# -- the twisted.mail reference server (runs in its own process) ------------------------


@implementer(smtp.IMessage)
class DiscardingMessage:
    """Collects the message's lines, as a naive server would, and drops them at the end."""

    def __init__(self, delivered: DeliveryCounter) -> None:
        self.lines: list[bytes] = []
        self._delivered = delivered

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)

    def eomReceived(self) -> Deferred[None]:
        self.lines = []
        self._delivered.add()
        return defer.succeed(None)

    def connectionLost(self) -> None:
        self.lines = []


@implementer(smtp.IMessageDelivery)
class DiscardingDelivery:
    def __init__(self, delivered: DeliveryCounter) -> None:
        self._delivered = delivered

    def receivedHeader(self, helo: tuple[bytes, bytes], origin: smtp.Address, recipients: list[smtp.User]) -> None:
        return None

    def validateFrom(self, helo: tuple[bytes, bytes], origin: smtp.Address) -> smtp.Address:
        return origin

    def validateTo(self, user: smtp.User) -> DiscardingMessageFactory:
        return DiscardingMessageFactory(self._delivered)


@dataclass
class DiscardingMessageFactory:
    delivered: DeliveryCounter

    def __call__(self) -> DiscardingMessage:
        return DiscardingMessage(self.delivered)


class DeliveryCounter:
    """Counts messages and writes ``mesg=N`` after each one, as ``smtp-sink -c`` does."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "wb", buffering=0)  # open for the process's life
        self.count = 0

    def add(self) -> None:
        self.count += 1
        self._file.write(b"mesg=%d\r" % self.count)


class ReferenceFactory(smtp.SMTPFactory):
    protocol = smtp.ESMTP
    domain = b"localhost"

    def __init__(self, delivery: DiscardingDelivery) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.delivery = delivery

    def buildProtocol(self, addr: object) -> smtp.SMTP:
        server: smtp.SMTP = super().buildProtocol(addr)  # type: ignore[no-untyped-call]
        server.delivery = self.delivery
        server.noisy = False  # no log line per message
        return server


def serve_reference(port: int, counter_path: str) -> None:
    """The ``twisted.mail`` configuration's server; stops on SIGTERM."""
    from twisted.internet import reactor

    factory = ReferenceFactory(DiscardingDelivery(DeliveryCounter(counter_path)))
    reactor.listenTCP(port, factory, backlog=BACKLOG, interface=HOST)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


# -- processes ------------------------------------------------------------------------------


def program(name: str, package: str = "postfix") -> str:
    path = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))
    if path is None:
        raise BenchmarkError(f"{name} is not installed (Debian package {package})")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path | None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchmarkError(f"{shlex.join(map(str, process.args))} exited with {process.returncode}" + _tail(log))  # type: ignore[arg-type]
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchmarkError(f"nothing listens on {HOST}:{port} after {timeout:.0f}s" + _tail(log))


def _tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.exists():
        return ""
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last lines of {path} ---\n" + "\n".join(text)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    # fields[0] is field 3 (state): utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def listen_overflows() -> int:
    """TcpExt ListenOverflows (/proc/net/netstat, the whole network namespace): SYNs
    dropped because a listen queue was full.  The client retries after a second."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split()[1:], values.split()[1:], strict=False)).get("ListenOverflows", 0))
    return 0


_COUNTER = re.compile(rb"mesg=(\d+)")


@dataclass
class Server:
    """A server process of ours; ``counter`` is where it writes ``mesg=N`` as mail arrives."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    counter: Path | None = None
    log: Path | None = None
    command: list[str] = field(default_factory=list)

    def cpu(self) -> float:
        return cpu_seconds(self.process.pid)

    def delivered(self) -> int:
        assert self.counter is not None
        with open(self.counter, "rb") as counter:
            size = counter.seek(0, os.SEEK_END)
            counter.seek(max(0, size - 256))
            found = _COUNTER.findall(counter.read())
        return int(found[-1]) if found else 0

    def wait_delivered(self, expected: int, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while (count := self.delivered()) < expected and time.monotonic() < deadline:
            time.sleep(0.01)
        return count

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise BenchmarkError(f"{self.name} died with exit status {self.process.returncode}" + _tail(self.log))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def running(
    name: str,
    command: list[str],
    port: int,
    workdir: Path,
    counter: bool,
    log: Path | None = None,
    env: dict[str, str] | None = None,
    ready: Callable[[Server], None] | None = None,
) -> Iterator[Server]:
    """Runs ``command`` until the block ends; ``ready`` (default: something listens on
    ``port``) tells when it is up."""
    counter_path = workdir / f"{name}.counter" if counter else None
    output = open(counter_path or workdir / f"{name}.out", "wb")  # closed in finally
    process = subprocess.Popen(
        command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir, env=env
    )
    server = Server(name, port, process, counter_path, log or workdir / f"{name}.out", command)
    try:
        if ready is None:
            wait_for_port(port, process, server.log)
        else:
            ready(server)
        yield server
    finally:
        server.stop()
        output.close()


def work_directory(stack: ExitStack, requested: Path | None, prefix: str) -> Path:
    """``requested`` (created if need be), or a temporary directory removed when
    ``stack`` closes."""
    if requested is None:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
    workdir = requested.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def start_sink(stack: ExitStack, workdir: Path) -> Server:
    port = free_port()
    command = [program("smtp-sink"), "-c"]
    if os.geteuid() == 0:
        command += ["-u", "root"]  # required as root; it drops to that user
    command += [f"{HOST}:{port}", str(BACKLOG)]
    return stack.enter_context(running("smtp-sink", command, port, workdir, counter=True))


def start_guard(
    stack: ExitStack,
    workdir: Path,
    sink: Server,
    scanner: str | None,
    profile: Path | None,
    name: str = "smtpguard",
    config: Path | None = None,
) -> Server:
    """smtpguard under twistd, relaying to ``sink``; ``scanner`` is its --scanner value
    (None: the ``[[scanners]]`` of ``config``, a TOML file)."""
    port = free_port()
    log = workdir / f"{name}.log"
    twistd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    command = [*twistd, "-n", "--pidfile=", "-l", str(log)]
    if profile is not None:
        command += ["--profiler=cprofile", f"--profile={profile}", "--savestats"]
    command += [
        "smtpguard",
        "--listen", f"tcp:{port}:interface={HOST}",
        "--upstream", f"tcp:{HOST}:{sink.port}",
    ]  # fmt: skip
    command += ["--scanner", scanner] if scanner is not None else []
    command += ["--config", str(config)] if config is not None else []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return stack.enter_context(running(name, command, port, workdir, counter=False, log=log, env=env))


def start_reference(stack: ExitStack, workdir: Path) -> Server:
    port = free_port()
    counter = workdir / "twisted.mail.counter"
    command = [sys.executable, str(Path(__file__).resolve()), "--reference-server", str(port), str(counter)]
    return stack.enter_context(running("twisted.mail", command, port, workdir, counter=True))


def clamd_socket(clamd: Server) -> Path:
    return Path(clamd.command[-1]).parent / "clamd.sock"


def start_clamd(stack: ExitStack, workdir: Path, threads: int, extra: str = "") -> Server:
    """A private clamd on a unix socket: one signature (EICAR, as tests/engines.py
    writes it), so it starts in seconds; its cache of clean results off, so that
    every message is really scanned (smtp-source sends the same body every time).
    ``extra``: more clamd.conf lines."""
    directory = workdir / "clamd"
    database = directory / "db"
    database.mkdir(parents=True, exist_ok=True)
    (database / "bench.ndb").write_text(f"Bench.EICAR:0:*:{EICAR.hex()}\n")
    config = directory / "clamd.conf"
    config.write_text(
        "Foreground yes\n"
        f"LocalSocket {directory / 'clamd.sock'}\n"
        f"DatabaseDirectory {database}\n"
        f"LogFile {directory / 'clamd.log'}\n"
        + ("User root\n" if os.geteuid() == 0 else "")
        + f"MaxThreads {threads}\n"
        + "DisableCache yes\n"
        + extra
    )
    command = [program("clamd", "clamav-daemon"), "-c", str(config)]
    ready = lambda server: wait_for_pong(server, directory / "clamd.sock")  # noqa: E731
    return stack.enter_context(
        running("clamd", command, 0, workdir, counter=False, log=directory / "clamd.log", ready=ready)
    )


def wait_for_pong(clamd: Server, path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        clamd.check_alive()
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.settimeout(1)
                probe.connect(str(path))
                probe.sendall(b"zPING\0")
                if probe.recv(16) == b"PONG\0":
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchmarkError(f"clamd did not answer PING within {timeout:.0f}s" + _tail(clamd.log))


def start_clamsmtp(stack: ExitStack, workdir: Path, sink: Server, clamd: Server) -> Server:
    """clamsmtpd in the foreground (-d), relaying to ``sink`` and scanning with ``clamd``.

    Debug level 3 prints one line per connection and one per message
    (``status=CLEAN``), which the end-of-run check counts; level 4 would log the
    whole SMTP conversation.  No ``User:``: clamsmtpd 1.10 started as root with
    ``User: root`` exits at once ("unable to completely drop privileges"), and
    without ``User:`` it stays the user that started it."""
    port = free_port()
    config = workdir / "clamsmtpd.conf"
    config.write_text(
        f"OutAddress: {HOST}:{sink.port}\n"
        f"Listen: {HOST}:{port}\n"
        f"ClamAddress: {clamd_socket(clamd)}\n"
        f"TempDirectory: {workdir}\n"
        f"PidFile: {workdir / 'clamsmtpd.pid'}\n"
    )
    command = [program("clamsmtpd", "clamsmtp"), "-d", "3", "-f", str(config)]
    server = stack.enter_context(running("clamsmtpd", command, port, workdir, counter=False))
    # The CPU time charged is the process started, so it must not have forked away.
    pidfile = workdir / "clamsmtpd.pid"
    deadline = time.monotonic() + 5
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = pidfile.read_text().strip() if pidfile.exists() else "none"
    if pid != str(server.process.pid):
        raise BenchmarkError(f"clamsmtpd wrote pid {pid}, but the process started is {server.process.pid}")
    return server


# -- measuring ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    configuration: Configuration
    port: int
    receiver: Server  # whose counter proves delivery
    worker: Server  # whose CPU time is charged
    engine: Server | None = None  # clamd, whose CPU time is shown separately

    @property
    def name(self) -> str:
        return label(self.configuration)


@dataclass(frozen=True)
class Case:
    size: int
    sessions: int
    messages: int


@dataclass(frozen=True)
class Sample:
    seconds: float
    cpu: float  # CPU seconds of the target's worker process
    engine_cpu: float | None = None  # CPU seconds of clamd, if the target scans with it
    overflows: int = 0  # listen queue overflows during the run


def source_command(port: object, size: object, messages: object, sessions: object, reuse: bool) -> list[str]:
    """The smtp-source command line for one run."""
    command = [program("smtp-source"), "-c", "-l", str(size), "-m", str(messages), "-s", str(sessions)]
    if reuse:
        command.append("-d")
    return [*command, "-f", SENDER, "-t", RECIPIENT, f"{HOST}:{port}"]


def measure(target: Target, case: Case, reuse: bool, timeout: float) -> Sample:
    servers = [target.receiver, target.worker, *([target.engine] if target.engine else [])]
    for server in {server.name: server for server in servers}.values():
        server.check_alive()
    before = target.receiver.delivered()
    cpu_before = target.worker.cpu()
    engine_before = target.engine.cpu() if target.engine else 0.0
    overflows_before = listen_overflows()
    command = source_command(target.port, case.size, case.messages, case.sessions, reuse)
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"{target.name}: {shlex.join(command)} took more than {timeout:.0f}s") from None
    seconds = time.perf_counter() - started
    cpu = target.worker.cpu() - cpu_before
    engine_cpu = target.engine.cpu() - engine_before if target.engine else None
    overflows = listen_overflows() - overflows_before
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip() or done.stdout.decode(errors="replace")[-200:]
        raise BenchmarkError(
            f"{target.name}: {shlex.join(command)} exited with {done.returncode}: {why}" + _tail(target.worker.log)
        )
    shown = re.findall(rb"\d+", done.stdout)
    if not shown or int(shown[-1]) != case.messages:
        raise BenchmarkError(f"{target.name}: smtp-source counted {shown[-1:] or 'nothing'}, expected {case.messages}")
    delivered = target.receiver.wait_delivered(before + case.messages) - before
    if delivered != case.messages:
        raise BenchmarkError(
            f"{target.name}: {target.receiver.name} received {delivered} of {case.messages} messages"
            + _tail(target.worker.log)
        )
    return Sample(seconds, cpu, engine_cpu, overflows)


# -- proof of scanning ----------------------------------------------------------------------


def eicar_message() -> bytes:
    head = f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: EICAR test\r\nMessage-ID: <eicar@bench.example>\r\n"
    return head.encode() + b"\r\n" + EICAR + b"\r\n"


def send_eicar(target: Target, log_line: re.Pattern[str]) -> str:
    """Sends an EICAR message through a proxy: it must be refused or dropped (not
    reach the sink), and the proxy must log ``log_line``.  Returns what happened."""
    before = target.receiver.delivered()
    try:
        with smtplib.SMTP(HOST, target.port, timeout=30) as client:
            try:
                client.sendmail(SENDER, [RECIPIENT], eicar_message())
                outcome = "accepted (250) and dropped"
            except smtplib.SMTPDataError as error:
                outcome = f"refused ({error.smtp_code} {error.smtp_error.decode(errors='replace')})"
    except (OSError, smtplib.SMTPException) as error:
        raise BenchmarkError(f"{target.name}: sending the EICAR message failed: {error}") from None
    if target.receiver.wait_delivered(before + 1, timeout=1.0) != before:
        raise BenchmarkError(f"{target.name} delivered the EICAR message to {target.receiver.name}: not scanning?")
    assert target.worker.log is not None
    deadline = time.monotonic() + 5
    while not log_line.search(target.worker.log.read_text(errors="replace")):
        if time.monotonic() > deadline:
            raise BenchmarkError(
                f"{target.name}: {outcome}, but its log has no line like {log_line.pattern!r}"
                + _tail(target.worker.log)
            )
        time.sleep(0.05)
    return outcome


GUARD_INFECTED = re.compile(r"status=infected \([^)]*eicar[^)]*\) action=reject reply=\(5\d\d ", re.IGNORECASE)
CLAMSMTP_INFECTED = re.compile(r"status=VIRUS:\S*EICAR", re.IGNORECASE)

_TROUBLE = re.compile(r"Traceback|Unhandled|internal error|next hop:|#(?:warn|error|critical)\]")


def log_text(server: Server) -> str:
    """All ``server``'s log, oldest first: twistd rotates its log file every
    megabyte, so LOG.1, LOG.2 ... hold the older lines."""
    assert server.log is not None
    log = server.log
    rotated = sorted(log.parent.glob(log.name + ".*"), key=lambda path: int(path.suffix[1:]), reverse=True)
    return "".join(path.read_text(errors="replace") for path in [*rotated, log])


def check_guard_log(guard: Server, expected: int) -> None:
    """After smtpguard has stopped: every message logged as scanned clean and
    relayed, the EICAR message as rejected, and no errors."""
    text = log_text(guard)
    relayed = len(re.findall(r"status=clean action=deliver reply=\(250 ", text))
    infected = len(GUARD_INFECTED.findall(text))
    outcomes = len(re.findall(r" status=.* action=", text))
    trouble = [line for line in text.splitlines() if _TROUBLE.search(line)]
    if trouble:
        raise BenchmarkError(f"{guard.name} logged {len(trouble)} problem line(s), e.g.:\n" + "\n".join(trouble[:10]))
    if (relayed, infected, outcomes) != (expected, 1, expected + 1):
        raise BenchmarkError(
            f"{guard.name} logged {relayed} messages scanned clean and relayed (expected {expected}), "
            f"{infected} EICAR rejected (expected 1), {outcomes} outcomes in all (expected {expected + 1})"
        )


_CLAMSMTP_TROUBLE = re.compile(r"error|fail|couldn't|can't|unable|timed? ?out", re.IGNORECASE)


def check_clamsmtp_log(clamsmtp: Server, expected: int) -> None:
    """After clamsmtpd has stopped: ``status=CLEAN`` for every message, one
    ``status=VIRUS`` (the EICAR message), nothing else, no errors."""
    assert clamsmtp.log is not None
    text = clamsmtp.log.read_text(errors="replace")
    # Its threads write each line in pieces, so another thread's text can follow
    # "status=CLEAN" on the same line: the status is the capitals only.
    statuses = re.findall(r"status=([A-Z]+)", text)
    clean, virus = statuses.count("CLEAN"), statuses.count("VIRUS")
    trouble = [line for line in text.splitlines() if _CLAMSMTP_TROUBLE.search(line)]
    if trouble:
        raise BenchmarkError(f"clamsmtpd logged {len(trouble)} problem line(s), e.g.:\n" + "\n".join(trouble[:10]))
    if (clean, virus, len(statuses)) != (expected, 1, expected + 1):
        raise BenchmarkError(
            f"clamsmtpd logged {clean} messages status=CLEAN (expected {expected}), {virus} status=VIRUS "
            f"(expected 1), {len(statuses)} statuses in all (expected {expected + 1})"
        )


def check_clamd_log(clamd: Server, found: int) -> None:
    """After clamd has stopped: ``found`` detections (the EICAR messages), no errors."""
    assert clamd.log is not None
    text = clamd.log.read_text(errors="replace")
    errors = [line for line in text.splitlines() if re.search(r"ERROR|WARNING", line)]
    detections = len(re.findall(r"EICAR\S* FOUND", text))
    if errors:
        raise BenchmarkError(f"clamd logged {len(errors)} error line(s), e.g.:\n" + "\n".join(errors[:10]))
    if detections != found:
        raise BenchmarkError(f"clamd logged {detections} EICAR detections, expected {found}")


# -- reporting ------------------------------------------------------------------------------


def human_size(size: int) -> str:
    for unit, scale in (("MB", 1_000_000), ("KB", 1_000)):
        if size >= scale:
            return f"{size / scale:g} {unit}"
    return f"{size} B"


def paired_ratio(numerator: list[Sample], denominator: list[Sample]) -> float:
    """Throughput of ``numerator`` relative to ``denominator``: the median over rounds of
    the per-round ratio (each round's runs were close in time, so noise partly cancels)."""
    return statistics.median(d.seconds / n.seconds for n, d in zip(numerator, denominator, strict=True))


def table(
    cases: Sequence[Case],
    configurations: Sequence[Configuration],
    samples: dict[tuple[Configuration, Case], list[Sample]],
) -> str:
    engines = {configuration[1] for configuration in configurations}
    header = ["configuration", "scanner", "size", "sess", "msgs", "seconds", "min-max", "msgs/s", "MB/s", "CPU ms/msg"]
    if CLAMD in engines:
        header.append("clamd ms/msg")
    header.append("vs direct")
    if BUILTIN in engines:
        header.append("vs twisted.mail")
    if CLAMD in engines:
        header.append("vs ClamSMTP")
    rows = [header]
    for case in cases:
        direct = samples[(DIRECT, case)]
        for configuration in configurations:
            runs = samples[(configuration, case)]
            seconds = statistics.median(sample.seconds for sample in runs)
            cpu = statistics.median(sample.cpu for sample in runs) / case.messages * 1000
            row = [
                configuration[0],
                configuration[1],
                human_size(case.size),
                str(case.sessions),
                str(case.messages),
                f"{seconds:.3f}",
                f"{min(s.seconds for s in runs):.2f}-{max(s.seconds for s in runs):.2f}",
                f"{case.messages / seconds:.1f}",
                f"{case.messages * case.size / seconds / 1e6:.2f}",
                f"{cpu:.2f}",
            ]
            if CLAMD in engines:
                engine = [sample.engine_cpu for sample in runs if sample.engine_cpu is not None]
                row.append(f"{statistics.median(engine) / case.messages * 1000:.2f}" if engine else "")
            row.append("1" if configuration == DIRECT else f"{paired_ratio(runs, direct):.3f}")
            if BUILTIN in engines:
                row.append(f"{paired_ratio(runs, samples[(REFERENCE, case)]):.2f}" if configuration == GUARD else "")
            if CLAMD in engines:
                clamsmtp = samples[(CLAMSMTP, case)]
                row.append(f"{paired_ratio(runs, clamsmtp):.3f}" if configuration == GUARD_CLAMD else "")
            rows.append(row)
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = []
    for index, row in enumerate(rows):
        cells = [
            cell.ljust(width) if column < 2 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def each_round(
    cases: Sequence[Case],
    configurations: Sequence[Configuration],
    samples: dict[tuple[Configuration, Case], list[Sample]],
) -> str:
    """msgs/s of every configuration in every round, and each round's ratio of
    smtpguard with clamd to ClamSMTP: the stalls of one round show here."""
    lines = ["each round, msgs/s (and smtpguard clamd / ClamSMTP):"]
    for case in cases:
        lines.append(f"  {human_size(case.size)} x {case.sessions} sessions:")
        for configuration in configurations:
            runs = samples[(configuration, case)]
            rates = " ".join(f"{case.messages / sample.seconds:8.1f}" for sample in runs)
            lines.append(f"    {label(configuration):<18} {rates}")
        if (GUARD_CLAMD, case) in samples and (CLAMSMTP, case) in samples:
            pairs = zip(samples[(GUARD_CLAMD, case)], samples[(CLAMSMTP, case)], strict=True)
            ratios = " ".join(f"{clamsmtp.seconds / guard.seconds:8.2f}" for guard, clamsmtp in pairs)
            lines.append(f"    {'ratio':<18} {ratios}")
    return "\n".join(lines)


NOTES = """\
seconds: median wall time of one smtp-source run over the rounds (min-max beside it).
msgs/s, MB/s: from the median; MB/s counts payload bytes (smtp-source -l), 1 MB = 10^6 bytes.
CPU ms/msg: CPU time (user+system, /proc/PID/stat) of the receiving server process per message:
  smtp-sink for direct; the proxy process (smtpguard, clamsmtpd), not the sink behind it;
  the twisted.mail server.  clamd ms/msg: the same for clamd, which scans for both proxies.
vs direct / vs twisted.mail / vs ClamSMTP: throughput relative to that configuration
  (>1 is faster), the median of the per-round ratios of paired runs."""


# -- main -----------------------------------------------------------------------------------


def parse_list(text: str) -> list[int]:
    try:
        values = [int(item.replace("_", "")) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Message throughput: smtp-source -> {smtp-sink | smtpguard -> smtp-sink | twisted.mail server "
        "| clamsmtpd -> smtp-sink}, interleaved in rounds on 127.0.0.1.",
    )
    parser.add_argument(
        "--engine",
        choices=(BUILTIN, CLAMD, "both"),
        default="both",
        help="builtin: smtpguard with its built-in scanner, and twisted.mail; clamd: ClamSMTP and smtpguard, "
        "both scanning with a private clamd; both (the default): all of them, as separate rows",
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds of interleaved runs (default 3; --quick: 1)")
    parser.add_argument(
        "--messages",
        type=int,
        default=None,
        help="messages per run (default: 500 below 100 KB, 50 from 100 KB; --quick: a fifth)",
    )
    parser.add_argument(
        "--sizes",
        type=parse_list,
        default=[20_000, 1_000_000],
        help="payload sizes in bytes, for smtp-source -l (default 20000,1000000)",
    )
    parser.add_argument(
        "--sessions", type=parse_list, default=[1, 10], help="concurrent sessions, for smtp-source -s (default 1,10)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round, a fifth of the messages")
    parser.add_argument(
        "--reuse", action="store_true", help="send all of a session's messages over one connection (smtp-source -d)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed for one smtp-source run")
    parser.add_argument(
        "--clamd-threads", type=int, default=10, help="clamd's MaxThreads (default 10, as clamd's own default)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep logs and counters here (default: a temporary directory, removed)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="run smtpguard under cProfile (twistd --profiler=cprofile) and save the pstats "
        "here at the end (with both engines, PATH.builtin and PATH.clamd); this slows smtpguard down",
    )
    parser.add_argument("--reference-server", nargs=2, metavar=("PORT", "COUNTER"), help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.rounds is None:
        arguments.rounds = 1 if arguments.quick else 3
    if min(arguments.rounds, arguments.clamd_threads, arguments.messages or 1) < 1:
        parser.error("--rounds, --messages and --clamd-threads must be positive")
    arguments.engines = [BUILTIN, CLAMD] if arguments.engine == "both" else [arguments.engine]
    return arguments


def messages_for(size: int, arguments: argparse.Namespace) -> int:
    if arguments.messages is not None:
        return int(arguments.messages)
    count = 500 if size < 100_000 else 50
    return max(1, count // 5) if arguments.quick else count


def run(arguments: argparse.Namespace) -> int:
    cases = [
        Case(size, sessions, messages_for(size, arguments))
        for size in arguments.sizes
        for sessions in arguments.sessions
    ]
    configurations = [DIRECT, *(c for engine in arguments.engines for c in ENGINES[engine])]
    samples: dict[tuple[Configuration, Case], list[Sample]] = {
        (configuration, case): [] for configuration in configurations for case in cases
    }
    checkout = _checkout()
    started = time.monotonic()
    commands: list[tuple[str, str]] = []
    eicar: list[tuple[str, str]] = []
    with ExitStack() as stack:
        workdir = work_directory(stack, arguments.workdir, "smtpguard-bench-")
        profile = arguments.profile.resolve() if arguments.profile else None

        def profile_for(engine: str) -> Path | None:
            if profile is None or len(arguments.engines) == 1:
                return profile
            return profile.with_name(f"{profile.name}.{engine}")

        sink = start_sink(stack, workdir)
        commands.append(("sink", shlex.join(sink.command)))
        targets = [Target(DIRECT, sink.port, sink, sink)]
        guards: dict[Configuration, Server] = {}
        clamd = clamsmtp = None
        if BUILTIN in arguments.engines:
            guard = start_guard(stack, workdir, sink, BUILTIN, profile_for(BUILTIN), "smtpguard-builtin")
            reference = start_reference(stack, workdir)
            guards[GUARD] = guard
            targets += [Target(GUARD, guard.port, sink, guard), Target(REFERENCE, reference.port, reference, reference)]
            commands.append(("smtpguard builtin", f"PYTHONPATH={REPO} {shlex.join(guard.command)}"))
            commands.append(("twisted.mail", shlex.join(reference.command)))
        if CLAMD in arguments.engines:
            clamd = start_clamd(stack, workdir, arguments.clamd_threads)
            clamsmtp = start_clamsmtp(stack, workdir, sink, clamd)
            scanner = f"clamd:unix:{clamd_socket(clamd)}"
            guard = start_guard(stack, workdir, sink, scanner, profile_for(CLAMD), "smtpguard-clamd")
            guards[GUARD_CLAMD] = guard
            targets += [
                Target(CLAMSMTP, clamsmtp.port, sink, clamsmtp, clamd),
                Target(GUARD_CLAMD, guard.port, sink, guard, clamd),
            ]
            config = " ".join(line for line in (workdir / "clamd" / "clamd.conf").read_text().splitlines())
            commands.append(("clamd", f"{shlex.join(clamd.command)}  # {config}"))
            config = "; ".join((workdir / "clamsmtpd.conf").read_text().splitlines())
            commands.append(("ClamSMTP", f"{shlex.join(clamsmtp.command)}  # {config}"))
            commands.append(("smtpguard clamd", f"PYTHONPATH={REPO} {shlex.join(guard.command)}"))
        # Proof that the proxies scan: an EICAR message through each must not reach the sink.
        for target in targets:
            if target.configuration in (GUARD, GUARD_CLAMD):
                eicar.append((target.name, send_eicar(target, GUARD_INFECTED)))
            elif target.configuration == CLAMSMTP:
                eicar.append((target.name, send_eicar(target, CLAMSMTP_INFECTED)))
        scanned = dict.fromkeys((target.configuration for target in targets), 0)
        # Warm up (and fail early): a few messages through each configuration, not counted.
        warm = Case(min(arguments.sizes), max(arguments.sessions), 2 * max(arguments.sessions))
        for target in targets:
            measure(target, warm, arguments.reuse, arguments.timeout)
            scanned[target.configuration] += warm.messages
        for round_number in range(arguments.rounds):
            for case in cases:
                shift = round_number % len(targets)
                for target in targets[shift:] + targets[:shift]:
                    samples[(target.configuration, case)].append(
                        measure(target, case, arguments.reuse, arguments.timeout)
                    )
                    scanned[target.configuration] += case.messages
            print(
                f"round {round_number + 1}/{arguments.rounds} done ({time.monotonic() - started:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
        for configuration, guard in guards.items():
            guard.stop()
            check_guard_log(guard, scanned[configuration])
        if clamsmtp is not None and clamd is not None:
            clamsmtp.stop()
            check_clamsmtp_log(clamsmtp, scanned[CLAMSMTP])
            clamd.stop()
            check_clamd_log(clamd, found=2)
    elapsed = time.monotonic() - started

    print(table(cases, configurations, samples))
    print()
    print(each_round(cases, configurations, samples))
    print()
    print(NOTES)
    print()
    print(
        f"rounds: {arguments.rounds}, configurations interleaved in rotating order; total {elapsed:.0f}s; "
        "every proxy's log shows every message scanned clean and relayed"
    )
    for name, outcome in eicar:
        print(f"EICAR through {name}: {outcome}, not delivered")
    overflowed = [
        f"{label(configuration)} {human_size(case.size)} x{case.sessions}: {sum(s.overflows for s in runs)}"
        for (configuration, case), runs in samples.items()
        if any(s.overflows for s in runs)
    ]
    print(
        "listen queue overflows during the runs (TcpExt ListenOverflows, summed over the rounds; "
        "each costs a connection a 1 s SYN retry): " + ("; ".join(overflowed) or "none")
    )
    print(
        f"machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"Twisted {_twisted_version()}"
    )
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"checkout: {REPO} at {checkout}")
    print(f"client: {shlex.join(source_command('PORT', 'SIZE', 'MESSAGES', 'SESSIONS', arguments.reuse))}")
    for name, command in commands:
        print(f"{name}: {command}")
    if profile is not None:
        saved = " ".join(str(profile_for(engine)) for engine in arguments.engines)
        print(f"profile: {saved} (python -m pstats FILE); smtpguard ran under cProfile: its numbers are slower")
    return 0


def _checkout() -> str:
    """The commit measured, and whether smtpguard/ differs from it."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, check=True)
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "smtpguard", "twisted"],
            capture_output=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head.stdout.decode().strip() + (" with uncommitted changes in smtpguard/" if dirty.stdout.strip() else "")


def _twisted_version() -> str:
    import twisted

    return str(twisted.__version__)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    if arguments.reference_server:
        port, counter = arguments.reference_server
        serve_reference(int(port), counter)
        return 0
    try:
        return run(arguments)
    except BenchmarkError as error:
        print(f"relay benchmark FAILED: {error}", file=sys.stderr)
        if arguments.workdir is None:
            print("(run again with --workdir DIR to keep the logs and counters)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
