#!/usr/bin/env python3
"""Message throughput of smtpguard, side by side with what bounds it.

Three configurations, all on 127.0.0.1, driven by Postfix's smtp-source:

* ``direct``: smtp-source -> smtp-sink (the ceiling: two C programs);
* ``smtpguard``: smtp-source -> smtpguard (built-in scanner) -> smtp-sink;
* ``twisted.mail``: smtp-source -> a bare twisted.mail ESMTP server that collects
  each message line by line and throws it away at the end of data (receive only,
  no relay): what a naive Twisted server costs.

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
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
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

DIRECT = "direct"
GUARD = "smtpguard"
REFERENCE = "twisted.mail"
CONFIGURATIONS = (DIRECT, GUARD, REFERENCE)


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


def program(name: str) -> str:
    path = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))
    if path is None:
        raise BenchmarkError(f"{name} is not installed (Debian package postfix)")
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
) -> Iterator[Server]:
    counter_path = workdir / f"{name}.counter" if counter else None
    output = open(counter_path or workdir / f"{name}.out", "wb")  # closed in finally
    process = subprocess.Popen(
        command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir, env=env
    )
    server = Server(name, port, process, counter_path, log or workdir / f"{name}.out", command)
    try:
        wait_for_port(port, process, server.log)
        yield server
    finally:
        server.stop()
        output.close()


def start_sink(stack: ExitStack, workdir: Path) -> Server:
    port = free_port()
    command = [program("smtp-sink"), "-c"]
    if os.geteuid() == 0:
        command += ["-u", "root"]  # required as root; it drops to that user
    command += [f"{HOST}:{port}", str(BACKLOG)]
    return stack.enter_context(running("smtp-sink", command, port, workdir, counter=True))


def start_guard(stack: ExitStack, workdir: Path, sink: Server, profile: Path | None) -> Server:
    port = free_port()
    log = workdir / "smtpguard.log"
    twistd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    command = [*twistd, "-n", "--pidfile=", "-l", str(log)]
    if profile is not None:
        command += ["--profiler=cprofile", f"--profile={profile}", "--savestats"]
    command += [
        "smtpguard",
        "--listen", f"tcp:{port}:interface={HOST}",
        "--upstream", f"tcp:{HOST}:{sink.port}",
        "--scanner", "builtin",
    ]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return stack.enter_context(running("smtpguard", command, port, workdir, counter=False, log=log, env=env))


def start_reference(stack: ExitStack, workdir: Path) -> Server:
    port = free_port()
    counter = workdir / "twisted.mail.counter"
    command = [sys.executable, str(Path(__file__).resolve()), "--reference-server", str(port), str(counter)]
    return stack.enter_context(running("twisted.mail", command, port, workdir, counter=True))


# -- measuring ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    receiver: Server  # whose counter proves delivery
    worker: Server  # whose CPU time is charged


@dataclass(frozen=True)
class Case:
    size: int
    sessions: int
    messages: int


@dataclass(frozen=True)
class Sample:
    seconds: float
    cpu: float  # CPU seconds of the target's worker process


def source_command(port: object, size: object, messages: object, sessions: object, reuse: bool) -> list[str]:
    """The smtp-source command line for one run."""
    command = [program("smtp-source"), "-c", "-l", str(size), "-m", str(messages), "-s", str(sessions)]
    if reuse:
        command.append("-d")
    return [*command, "-f", SENDER, "-t", RECIPIENT, f"{HOST}:{port}"]


def measure(target: Target, case: Case, reuse: bool, timeout: float) -> Sample:
    for server in {target.receiver.name: target.receiver, target.worker.name: target.worker}.values():
        server.check_alive()
    before = target.receiver.delivered()
    cpu_before = target.worker.cpu()
    command = source_command(target.port, case.size, case.messages, case.sessions, reuse)
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"{target.name}: {shlex.join(command)} took more than {timeout:.0f}s") from None
    seconds = time.perf_counter() - started
    cpu = target.worker.cpu() - cpu_before
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
    return Sample(seconds, cpu)


_TROUBLE = re.compile(r"Traceback|Unhandled|internal error|next hop:|#(?:warn|error|critical)\]")


def check_guard_log(guard: Server, expected: int) -> None:
    """After smtpguard has stopped: every message logged as relayed, no errors."""
    assert guard.log is not None
    text = guard.log.read_text(errors="replace")
    relayed = len(re.findall(r"action=deliver reply=250 ", text))
    trouble = [line for line in text.splitlines() if _TROUBLE.search(line)]
    if trouble:
        raise BenchmarkError(f"smtpguard logged {len(trouble)} problem line(s), e.g.:\n" + "\n".join(trouble[:10]))
    if relayed != expected:
        raise BenchmarkError(f"smtpguard logged {relayed} relayed messages, expected {expected}")


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


def table(cases: Sequence[Case], samples: dict[tuple[str, Case], list[Sample]]) -> str:
    header = [
        "configuration",
        "size",
        "sess",
        "msgs",
        "seconds",
        "min-max",
        "msgs/s",
        "MB/s",
        "CPU ms/msg",
        "vs direct",
        "vs twisted.mail",
    ]
    rows = [header]
    for case in cases:
        direct = samples[(DIRECT, case)]
        reference = samples[(REFERENCE, case)]
        for name in CONFIGURATIONS:
            runs = samples[(name, case)]
            seconds = statistics.median(sample.seconds for sample in runs)
            cpu = statistics.median(sample.cpu for sample in runs) / case.messages * 1000
            rows.append([
                name,
                human_size(case.size),
                str(case.sessions),
                str(case.messages),
                f"{seconds:.3f}",
                f"{min(s.seconds for s in runs):.2f}-{max(s.seconds for s in runs):.2f}",
                f"{case.messages / seconds:.1f}",
                f"{case.messages * case.size / seconds / 1e6:.2f}",
                f"{cpu:.2f}",
                "1" if name == DIRECT else f"{paired_ratio(runs, direct):.3f}",
                f"{paired_ratio(runs, reference):.2f}" if name == GUARD else "",
            ])  # fmt: skip
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = []
    for index, row in enumerate(rows):
        cells = [
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


NOTES = """\
seconds: median wall time of one smtp-source run over the rounds (min-max beside it).
msgs/s, MB/s: from the median; MB/s counts payload bytes (smtp-source -l), 1 MB = 10^6 bytes.
CPU ms/msg: CPU time (user+system, /proc/PID/stat) of the receiving server process per message:
  smtp-sink for direct, the smtpguard process (not the sink behind it), the twisted.mail server.
vs direct / vs twisted.mail: throughput relative to that configuration (>1 is faster),
  the median of the per-round ratios of paired runs."""


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
        description="Message throughput: smtp-source -> {smtp-sink | smtpguard -> smtp-sink | twisted.mail server}, "
        "interleaved in rounds on 127.0.0.1.",
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
        "here at the end; this slows smtpguard down",
    )
    parser.add_argument("--reference-server", nargs=2, metavar=("PORT", "COUNTER"), help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.rounds is None:
        arguments.rounds = 1 if arguments.quick else 3
    if arguments.rounds < 1 or (arguments.messages is not None and arguments.messages < 1):
        parser.error("--rounds and --messages must be positive")
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
    samples: dict[tuple[str, Case], list[Sample]] = {(name, case): [] for name in CONFIGURATIONS for case in cases}
    guard_messages = 0
    checkout = _checkout()
    started = time.monotonic()
    with ExitStack() as stack:
        if arguments.workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="smtpguard-bench-")))
        else:
            workdir = arguments.workdir.resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        profile = arguments.profile.resolve() if arguments.profile else None
        sink = start_sink(stack, workdir)
        guard = start_guard(stack, workdir, sink, profile)
        reference = start_reference(stack, workdir)
        targets = [
            Target(DIRECT, sink.port, sink, sink),
            Target(GUARD, guard.port, sink, guard),
            Target(REFERENCE, reference.port, reference, reference),
        ]
        # Warm up (and fail early): a few messages through each configuration, not counted.
        warm = Case(min(arguments.sizes), max(arguments.sessions), 2 * max(arguments.sessions))
        for target in targets:
            measure(target, warm, arguments.reuse, arguments.timeout)
        guard_messages += warm.messages
        for round_number in range(arguments.rounds):
            for case in cases:
                shift = round_number % len(targets)
                for target in targets[shift:] + targets[:shift]:
                    samples[(target.name, case)].append(measure(target, case, arguments.reuse, arguments.timeout))
                    if target.name == GUARD:
                        guard_messages += case.messages
            print(
                f"round {round_number + 1}/{arguments.rounds} done ({time.monotonic() - started:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
        guard.stop()
        check_guard_log(guard, guard_messages)
        guard_command, sink_command, reference_command = guard.command, sink.command, reference.command
    elapsed = time.monotonic() - started

    print(table(cases, samples))
    print()
    print(NOTES)
    print()
    print(f"rounds: {arguments.rounds}, configurations interleaved in rotating order; total {elapsed:.0f}s")
    print(
        f"machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"Twisted {_twisted_version()}"
    )
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"checkout: {REPO} at {checkout}")
    print(f"client:  {shlex.join(source_command('PORT', 'SIZE', 'MESSAGES', 'SESSIONS', arguments.reuse))}")
    print(f"sink:    {shlex.join(sink_command)}")
    print(f"guard:   PYTHONPATH={REPO} {shlex.join(guard_command)}")
    print(f"ref:     {shlex.join(reference_command)}")
    if profile is not None:
        print(f"profile: {profile} (python -m pstats {profile}); smtpguard ran under cProfile: its numbers are slower")
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
