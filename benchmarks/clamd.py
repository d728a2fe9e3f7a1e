#!/usr/bin/env python3
"""Scans per second of smtpguard's clamd client, side by side with ClamAV's own
``clamdscan --stream``, against the same clamd and the same message files.

Both clients stream every message with INSTREAM, one connection per scan, over
clamd's unix socket. smtpguard's client runs in this process on the real reactor
(N scans at a time); clamdscan runs as N processes, each given its share of the
files. The machine is assumed to be shared and noisy, so the two are interleaved
in rounds (the order alternating) and the table shows medians over the rounds.
Every scan must come back clean: anything else stops the benchmark.

Run ``python benchmarks/clamd.py --help`` for the options; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import resource
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
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from twisted.internet import defer, task  # noqa: E402
from twisted.internet.utils import getProcessOutputAndValue  # noqa: E402

from smtpguard.envelope import Client, Envelope  # noqa: E402
from smtpguard.plugins.clamd import clamd as clamd_plugin  # noqa: E402
from smtpguard.results import Verdict  # noqa: E402
from smtpguard.spool import Message, Spool  # noqa: E402

SBIN = ("/usr/sbin", "/usr/local/sbin")
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
ENVELOPE = Envelope(Client("127.0.0.1", 1025, helo="bench.example"), "bench@example.org")
GUARD = "smtpguard"
CLAMDSCAN = "clamdscan"


class BenchmarkError(Exception):
    """A run went wrong: the benchmark stops and says why."""


def find(program: str) -> str:
    path = shutil.which(program, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))
    if path is None:
        raise BenchmarkError(f"{program} is not installed (Debian packages clamav-daemon and clamdscan)")
    return path


# -- clamd and the message files --------------------------------------------------------


@dataclass
class Clamd:
    socket_path: Path
    config: Path
    process: subprocess.Popen[bytes] | None = None


@contextmanager
def running_clamd(workdir: Path, threads: int) -> Iterator[Clamd]:
    """A clamd on a private unix socket with one signature (EICAR), its result
    cache off so that every scan really scans."""
    database = workdir / "db"
    database.mkdir(parents=True, exist_ok=True)
    (database / "bench.ndb").write_text(f"Bench.EICAR:0:*:{EICAR.hex()}\n")
    engine = Clamd(workdir / "clamd.sock", workdir / "clamd.conf")
    engine.config.write_text(
        "Foreground yes\n"
        f"LocalSocket {engine.socket_path}\n"
        f"DatabaseDirectory {database}\n"
        f"LogFile {workdir / 'clamd.log'}\n"
        + ("User root\n" if os.getuid() == 0 else "")
        + "StreamMaxLength 30M\n"
        + f"MaxThreads {threads}\n"
        + "DisableCache yes\n"
    )
    engine.process = subprocess.Popen(
        [find("clamd"), "-c", str(engine.config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_pong(engine)
        yield engine
    finally:
        engine.process.send_signal(signal.SIGTERM)
        engine.process.wait(10)


def wait_for_pong(engine: Clamd, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert engine.process is not None
        if engine.process.poll() is not None:
            raise BenchmarkError(f"clamd exited with {engine.process.returncode}; see {engine.config.parent}")
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.settimeout(1)
                probe.connect(str(engine.socket_path))
                probe.sendall(b"zPING\0")
                if probe.recv(16) == b"PONG\0":
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchmarkError("clamd did not answer PING")


def message_bytes(size: int, seed: int) -> bytes:
    """A mail of about ``size`` bytes: a short text part and a base64 attachment of
    random bytes (so clamd has MIME to decode and nothing repeats)."""
    head = (
        "From: Alice <alice@example.org>\r\nTo: Bob <bob@example.net>\r\n"
        f"Subject: benchmark {seed}\r\nMessage-ID: <{seed}@example.org>\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nThe report is attached.\r\n\r\n"
        '--b\r\nContent-Type: application/octet-stream; name="report.bin"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    tail = b"\r\n--b--\r\n"
    lines = max(1, (size - len(head) - len(tail)) // 78)
    payload = random.Random(seed).randbytes(lines * 57)
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return head + encoded + tail


def write_messages(directory: Path, size: int, count: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = directory / f"{size}-{index:04d}.eml"
        path.write_bytes(message_bytes(size, size * 100_000 + index))
        paths.append(path)
    return paths


def spooled(path: Path) -> Message:
    """The file as the proxy would hold it: in memory up to 1 MiB, else on disk."""
    spool = Spool(0, memory_limit=1024 * 1024)
    with path.open("rb") as file:
        while chunk := file.read(256 * 1024):
            spool.write(chunk)
    return spool.finish()


# -- the two clients --------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    cpu: float  # client CPU seconds (smtpguard: this process; clamdscan: its processes)


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


async def run_guard(reactor: Any, endpoint: str, messages: Sequence[Message], concurrency: int) -> Run:
    scanner = clamd_plugin.build({"endpoint": endpoint, "timeout": 300, "stream_max_length": "30M"}, reactor)
    queue = iter(messages)
    problems: list[str] = []

    async def worker() -> None:
        for message in queue:
            result = await scanner.scan(message, ENVELOPE)
            if result.verdict is not Verdict.CLEAN:
                problems.append(result.status() + " " + result.detail)

    cpu = cpu_seconds(resource.RUSAGE_SELF)
    started = time.perf_counter()
    await defer.gatherResults([defer.Deferred.fromCoroutine(worker()) for _ in range(concurrency)])
    seconds = time.perf_counter() - started
    scanner.stop()
    if problems:
        raise BenchmarkError(f"smtpguard: {len(problems)} scans not clean, e.g. {problems[0]}")
    return Run(seconds, cpu_seconds(resource.RUSAGE_SELF) - cpu)


async def run_clamdscan(config: Path, paths: Sequence[Path], concurrency: int) -> Run:
    binary = find(CLAMDSCAN)
    shares = [paths[start::concurrency] for start in range(concurrency)]
    cpu = cpu_seconds(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    outcomes = await defer.gatherResults(
        [
            getProcessOutputAndValue(
                binary, ["--stream", "--no-summary", f"--config-file={config}", *map(str, share)], env=os.environ
            )
            for share in shares
            if share
        ]
    )
    seconds = time.perf_counter() - started
    for out, err, code in outcomes:
        if code != 0:
            raise BenchmarkError(f"clamdscan exited with {code}: {(out + err).decode(errors='replace')[-500:]}")
    return Run(seconds, cpu_seconds(resource.RUSAGE_CHILDREN) - cpu)


# -- rounds and the table ---------------------------------------------------------------


@dataclass
class Cell:
    size: int
    concurrency: int
    scans: int
    runs: dict[str, list[Run]] = field(default_factory=lambda: {GUARD: [], CLAMDSCAN: []})


async def benchmark(reactor: Any, options: argparse.Namespace) -> None:
    with ExitStack() as stack:
        if options.workdir:
            workdir = Path(options.workdir)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="smtpguard-bench-")))
        engine = stack.enter_context(running_clamd(workdir, options.threads))
        scan_config = workdir / "clamdscan.conf"
        scan_config.write_text(f"LocalSocket {engine.socket_path}\n")
        endpoint = f"unix:{engine.socket_path}"

        cells: list[Cell] = []
        files: dict[int, list[Path]] = {}
        messages: dict[int, list[Message]] = {}
        for size in options.sizes:
            count = options.scans_small if size < 1_000_000 else options.scans_large
            files[size] = write_messages(workdir / "messages", size, count)
            messages[size] = [spooled(path) for path in files[size]]
            cells += [Cell(size, concurrency, count) for concurrency in options.concurrency]
        log(f"clamd ready ({options.threads} threads); {sum(len(v) for v in files.values())} message files written")

        # Warm-up: the first scans of a fresh clamd and a fresh process are slower.
        await run_guard(reactor, endpoint, messages[options.sizes[0]][:5], 1)
        await run_clamdscan(scan_config, files[options.sizes[0]][:5], 1)

        for number in range(options.rounds):
            for cell in cells:
                order = (GUARD, CLAMDSCAN) if (number + cell.concurrency) % 2 == 0 else (CLAMDSCAN, GUARD)
                for client in order:
                    if client == GUARD:
                        run = await run_guard(reactor, endpoint, messages[cell.size], cell.concurrency)
                    else:
                        run = await run_clamdscan(scan_config, files[cell.size], cell.concurrency)
                    cell.runs[client].append(run)
                    log(
                        f"round {number + 1}: {cell.size:>8} B x{cell.concurrency} {client:<9} "
                        f"{cell.scans / run.seconds:8.1f} scans/s"
                    )
        for size_messages in messages.values():
            for message in size_messages:
                message.close()
        print_table(cells, options)


def print_table(cells: Sequence[Cell], options: argparse.Namespace) -> None:
    print()
    print(
        f"clamd INSTREAM, unix socket, one connection per scan; {options.rounds} rounds, medians; "
        f"clamd MaxThreads {options.threads}, result cache off; {os.cpu_count()} CPUs"
    )
    print()
    header = (
        "| size | concurrent | scans/run | smtpguard scans/s | clamdscan scans/s | smtpguard / clamdscan "
        "| client CPU ms/scan: smtpguard | clamdscan |"
    )
    print(header)
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for cell in cells:
        guard, other = cell.runs[GUARD], cell.runs[CLAMDSCAN]
        ratio = statistics.median(c.seconds / g.seconds for g, c in zip(guard, other, strict=True))
        print(
            f"| {human(cell.size)} | {cell.concurrency} | {cell.scans} "
            f"| {rate(cell.scans, guard)} | {rate(cell.scans, other)} | {ratio:.2f} "
            f"| {statistics.median(r.cpu for r in guard) * 1000 / cell.scans:.2f} "
            f"| {statistics.median(r.cpu for r in other) * 1000 / cell.scans:.2f} |"
        )
    print()


def rate(scans: int, runs: Sequence[Run]) -> str:
    seconds = [run.seconds for run in runs]
    median = statistics.median(seconds)
    return f"{scans / median:.1f} ({scans / max(seconds):.0f}-{scans / min(seconds):.0f})"


def human(size: int) -> str:
    return f"{size / 1_000_000:g} MB" if size >= 1_000_000 else f"{size / 1000:g} KB"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="20000,5000000", help="message sizes in bytes (default: 20 KB and 5 MB)")
    parser.add_argument("--concurrency", default="1,4", help="scans at a time (default: 1,4)")
    parser.add_argument("--scans-small", type=int, default=300, help="scans per run below 1 MB (default 300)")
    parser.add_argument("--scans-large", type=int, default=30, help="scans per run from 1 MB (default 30)")
    parser.add_argument("--threads", type=int, default=4, help="clamd MaxThreads (default 4)")
    parser.add_argument("--workdir", help="keep clamd's log, configuration and the message files here")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, a fifth of the scans")
    options = parser.parse_args(argv)
    options.sizes = [int(size) for size in options.sizes.split(",")]
    options.concurrency = [int(number) for number in options.concurrency.split(",")]
    if options.quick:
        options.rounds = 1
        options.scans_small = max(options.scans_small // 5, 1)
        options.scans_large = max(options.scans_large // 5, 1)
    return options


def main(argv: Sequence[str]) -> int:
    options = parse(argv)

    async def guarded(reactor: Any) -> None:
        try:
            await benchmark(reactor, options)
        except BenchmarkError as error:
            raise SystemExit(f"benchmark failed: {error}") from None

    def run(reactor: Any) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(guarded(reactor))

    task.react(run)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
