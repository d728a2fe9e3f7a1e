#!/usr/bin/env python3
"""Peak memory of the whole smtpguard process while it scans and relays one large
message, against its memory when idle.

For each scanner and message size a fresh smtpguard runs under twistd (this
checkout), relaying to Postfix's smtp-sink.  One small message warms it up; its
resident set is then read as ``idle`` (VmRSS in /proc/PID/status), its peak is
reset (``5`` written to /proc/PID/clear_refs), one large message goes through it,
and the peak (VmHWM) is read once the client has smtpguard's 250, which comes only
after the scan and the relay.  The message is a multipart with a short text part
and one base64 attachment of random bytes; it must be scanned clean and reach
smtp-sink.  The clamd scanner uses a private clamd (one signature) whose
StreamMaxLength takes the largest message.

Run ``python benchmarks/memory.py --help`` for the options; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import base64
import os
import platform
import random
import shlex
import smtplib
import socket
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from relay import (
    BUILTIN,
    CLAMD,
    HOST,
    RECIPIENT,
    REPO,
    SENDER,
    BenchmarkError,
    Server,
    clamd_socket,
    start_clamd,
    start_guard,
    start_sink,
    work_directory,
)

MB = 1_000_000
WARM_UP = 20_000
READ_SIZE = 1024 * 1024
TEXT = b"The figures are attached.\r\n"


@dataclass(frozen=True)
class Row:
    size: int
    scanner: str
    idle: int  # bytes
    peak: int
    seconds: float
    peak_reset: bool


def write_message(path: Path, size: int, seed: int = 1) -> None:
    """A message of about ``size`` bytes: headers, a text part and a base64
    attachment of random bytes in 76-character lines."""
    head = (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: figures\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\n"
    ).encode() + TEXT
    attachment = (
        b'--b\r\nContent-Type: application/octet-stream; name="figures.bin"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n"
    )
    tail = b"--b--\r\n"
    line_bytes = 57  # 76 base64 characters
    lines = max(1, (size - len(head) - len(attachment) - len(tail)) // 78)
    generator = random.Random(seed)
    with path.open("wb") as out:
        out.write(head + attachment)
        for start in range(0, lines, 10_000):
            block = generator.randbytes(line_bytes * min(10_000, lines - start))
            encoded = base64.b64encode(block)
            out.write(b"".join(encoded[i : i + 76] + b"\r\n" for i in range(0, len(encoded), 76)))
        out.write(tail)


def send(port: int, path: Path) -> tuple[int, bytes]:
    """Sends the message in ``path`` (CRLF lines, none starting with a dot) with
    DATA, streamed from the file; smtpguard's reply to its end."""
    with smtplib.SMTP(HOST, port, local_hostname="bench.example", timeout=900) as client:
        client.ehlo()
        client.mail(SENDER)
        client.rcpt(RECIPIENT)
        code, text = client.docmd("DATA")
        if code != 354:
            return code, text
        assert client.sock is not None
        with path.open("rb") as message:
            while block := message.read(READ_SIZE):
                client.sock.sendall(block)
        client.sock.sendall(b".\r\n")
        return client.getreply()


def status(pid: int) -> dict[str, int]:
    """The memory lines of /proc/PID/status, in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name.startswith("Vm") and value.strip().endswith("kB"):
            values[name] = int(value.split()[0]) * 1024
    return values


def reset_peak(pid: int) -> bool:
    """Resets VmHWM to the current VmRSS (Linux 4.0 and later)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def configuration(workdir: Path, scanner: str, largest: int, clamd_path: Path | None) -> Path:
    """A TOML file that takes ``largest`` bytes with ``scanner``, deadlines generous."""
    limit = largest + MB
    table = f'type = "{scanner}"\ntimeout = 900\n'
    if scanner == CLAMD:
        table += f'endpoint = "unix:{clamd_path}"\nstream_max_length = {limit}\n'
    path = workdir / f"smtpguard-{scanner}.toml"
    path.write_text(
        f"[server]\nmax_message_size = {limit}\nmessage_timeout = 900\n\n"
        f"[scanning]\ntimeout = 900\n\n[[scanners]]\n{table}"
    )
    return path


def deliver(guard: Server, sink: Server, path: Path) -> None:
    """Sends ``path`` through ``guard``: it must be scanned clean, relayed and counted
    by smtp-sink."""
    counted = sink.delivered()
    code, text = send(guard.port, path)
    if code != 250:
        raise BenchmarkError(f"{guard.name}, {path.name}: smtpguard answered {code} {text!r}")
    if sink.wait_delivered(counted + 1) <= counted:
        raise BenchmarkError(f"{guard.name}, {path.name}: smtp-sink did not count the message")
    assert guard.log is not None
    size = f" size={path.stat().st_size} status=clean action=deliver reply=(250 "
    if not any(size in line for line in guard.log.read_text(errors="replace").splitlines()):
        raise BenchmarkError(f"{guard.name}, {path.name}: its log does not show it scanned clean and relayed")


def measure(workdir: Path, sink: Server, scanner: str, config: Path, size: int, message: Path) -> Row:
    """One fresh smtpguard: warmed up, idle read, peak reset, ``message`` sent."""
    with ExitStack() as stack:
        guard = start_guard(stack, workdir, sink, None, None, f"smtpguard-{scanner}-{size}", config=config)
        pid = guard.process.pid
        deliver(guard, sink, workdir / "warm-up.eml")
        time.sleep(1)  # the warm-up's connections closed, its buffers freed
        idle = status(pid)["VmRSS"]
        peak_reset = reset_peak(pid)
        started = time.monotonic()
        deliver(guard, sink, message)
        seconds = time.monotonic() - started
        peak = status(pid)["VmHWM"]
        return Row(size, scanner, idle, peak, seconds, peak_reset)


def hold_idle_sessions(port: int, count: int) -> list[socket.socket]:
    """``count`` connections that read the greeting, say EHLO, read its reply and
    then stay silent: what idle (or slow) clients cost."""
    sessions = []
    for _ in range(count):
        connection = socket.create_connection((HOST, port), timeout=60)
        sessions.append(connection)
        connection.makefile("rb").readline()
        connection.sendall(b"EHLO idle.example\r\n")
        reply = connection.makefile("rb")
        while (line := reply.readline())[3:4] == b"-":
            pass
        if not line.startswith(b"250 "):
            raise BenchmarkError(f"idle session {len(sessions)}: EHLO answered {line!r}")
    return sessions


def measure_idle(workdir: Path, sink: Server, count: int) -> tuple[int, int]:
    """A fresh smtpguard (built-in scanner): its VmRSS when idle, and with ``count``
    idle sessions open."""
    config = workdir / "smtpguard-idle.toml"
    config.write_text(
        f"[server]\nmax_connections = {count + 10}\nmax_connections_per_client = 0\n\n"
        f'[[scanners]]\ntype = "{BUILTIN}"\n'
    )
    with ExitStack() as stack:
        guard = start_guard(stack, workdir, sink, None, None, "smtpguard-idle", config=config)
        deliver(guard, sink, workdir / "warm-up.eml")
        time.sleep(1)
        idle = status(guard.process.pid)["VmRSS"]
        sessions = hold_idle_sessions(guard.port, count)
        time.sleep(1)
        held = status(guard.process.pid)["VmRSS"]
        for connection in sessions:
            connection.close()
        return idle, held


def megabytes(size: int) -> str:
    return f"{size / MB:.1f}"


def table(rows: Sequence[Row]) -> str:
    header = ["message MB", "scanner", "idle RSS MB", "peak RSS MB", "peak-idle MB", "seconds"]
    cells = [
        [f"{row.size / MB:g}", row.scanner, megabytes(row.idle), megabytes(row.peak), megabytes(row.peak - row.idle)]
        for row in rows
    ]
    for cell, row in zip(cells, rows, strict=True):
        cell.append(f"{row.seconds:.1f}")
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    lines = [
        "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)) for line in [header, *cells]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes", default="100", help="message sizes in MB (10^6 bytes), comma-separated (default: 100)"
    )
    parser.add_argument(
        "--scanners", default=f"{BUILTIN},{CLAMD}", help=f"{BUILTIN}, {CLAMD} or both, comma-separated (default both)"
    )
    parser.add_argument(
        "--idle-sessions",
        type=int,
        default=2000,
        help="also measure this many concurrent idle sessions with the built-in scanner (0: skip; default 2000)",
    )
    parser.add_argument("--workdir", type=Path, help="keep logs, configurations and message files here")
    arguments = parser.parse_args(argv)
    arguments.sizes = [int(float(size) * MB) for size in arguments.sizes.split(",")]
    arguments.scanners = arguments.scanners.split(",")
    if not set(arguments.scanners) <= {BUILTIN, CLAMD}:
        parser.error(f"--scanners: {BUILTIN} or {CLAMD}")
    return arguments


def run(arguments: argparse.Namespace) -> int:
    rows: list[Row] = []
    largest = max(arguments.sizes)
    with ExitStack() as stack:
        workdir = work_directory(stack, arguments.workdir, "smtpguard-memory-")
        write_message(workdir / "warm-up.eml", WARM_UP)
        messages = {}
        for size in arguments.sizes:
            messages[size] = workdir / f"message-{size}.eml"
            write_message(messages[size], size)
        sink = start_sink(stack, workdir)
        clamd_path = None
        if CLAMD in arguments.scanners:
            clamd = start_clamd(stack, workdir, 2, f"StreamMaxLength {largest + MB}\n")
            clamd_path = clamd_socket(clamd)
        for scanner in arguments.scanners:
            config = configuration(workdir, scanner, largest, clamd_path)
            for size in arguments.sizes:
                print(f"{scanner}, {size / MB:g} MB ...", file=sys.stderr, flush=True)
                rows.append(measure(workdir, sink, scanner, config, size, messages[size]))
        configs = {scanner: (workdir / f"smtpguard-{scanner}.toml").read_text() for scanner in arguments.scanners}
        idle_sessions = None
        if arguments.idle_sessions:
            print(f"{arguments.idle_sessions} idle sessions ...", file=sys.stderr, flush=True)
            idle_sessions = measure_idle(workdir, sink, arguments.idle_sessions)
    print(table(rows))
    if idle_sessions is not None:
        idle, held = idle_sessions
        print()
        print(
            f"{arguments.idle_sessions} idle sessions (greeting and EHLO read, then silent), built-in scanner: "
            f"VmRSS {megabytes(held)} MB in all, {megabytes(held - idle)} MB above idle "
            f"({(held - idle) / arguments.idle_sessions / 1000:.1f} KB per session)"
        )
    print()
    print(
        "idle: VmRSS after one 20 KB message; peak: VmHWM after the large message was scanned and relayed"
        + ("" if all(row.peak_reset for row in rows) else " (VmHWM could not be reset: peak since start)")
        + "; MB = 10^6 bytes"
    )
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"smtpguard: PYTHONPATH={REPO} {sys.executable} -c 'from twisted.scripts.twistd import run; run()' "
        "-n --pidfile= -l LOG smtpguard --listen tcp:PORT:interface=127.0.0.1 --upstream tcp:127.0.0.1:SINKPORT "
        "--config FILE"
    )
    for scanner, text in configs.items():
        print(f"FILE for {scanner}: " + "; ".join(line for line in text.splitlines() if line))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(parse_arguments(sys.argv[1:] if argv is None else argv))
    except BenchmarkError as error:
        print(f"memory benchmark FAILED: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
