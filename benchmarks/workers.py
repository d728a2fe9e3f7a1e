#!/usr/bin/env python3
"""Message throughput of smtpguard (built-in scanner) with 1 worker process and
with more (``[server] workers``), side by side: smtp-source -> smtpguard -> smtp-sink
on 127.0.0.1, the configurations interleaved in rounds, their order rotating.

Run ``python benchmarks/workers.py --help`` for the options; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from relay import (
    DIRECT,
    GUARD,
    GUARD_INFECTED,
    REPO,
    BenchmarkError,
    Case,
    Sample,
    Server,
    Target,
    check_guard_log,
    cpu_seconds,
    measure,
    send_eicar,
    source_command,
    start_guard,
    start_sink,
    work_directory,
)
from sidebyside import table


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its live descendants (the supervisor and its workers)."""
    total = cpu_seconds(pid)
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += tree_cpu(int(child))
    return total


class Supervised(Server):
    def cpu(self) -> float:
        return tree_cpu(self.process.pid)


def start(stack: ExitStack, workdir: Path, sink: Server, workers: int) -> Server:
    config = workdir / f"workers-{workers}.toml"
    config.write_text(f"[server]\nworkers = {workers}\n")
    guard = start_guard(stack, workdir, sink, "builtin", None, f"smtpguard-{workers}w", config)
    guard.__class__ = Supervised
    return guard


def run(arguments: argparse.Namespace) -> int:
    counts = sorted({1, *arguments.workers})
    case = Case(arguments.size, arguments.sessions, arguments.messages)
    samples: dict[int, list[Sample]] = {count: [] for count in [0, *counts]}  # 0: smtp-sink directly
    with ExitStack() as stack:
        workdir = work_directory(stack, arguments.workdir, "smtpguard-workers-")
        sink = start_sink(stack, workdir)
        guards = {count: start(stack, workdir, sink, count) for count in counts}
        targets = {count: Target(GUARD, guard.port, sink, guard) for count, guard in guards.items()}
        scanned = dict.fromkeys(counts, 0)
        for count, target in targets.items():
            send_eicar(target, GUARD_INFECTED)
            warm = Case(case.size, case.sessions, 2 * case.sessions)  # every worker up, not counted
            measure(target, warm, False, arguments.timeout)
            scanned[count] += warm.messages
        targets[0] = Target(DIRECT, sink.port, sink, sink)
        order = [0, *counts]
        for round_number in range(arguments.rounds):
            shift = round_number % len(order)
            for count in order[shift:] + order[:shift]:
                samples[count].append(measure(targets[count], case, False, arguments.timeout))
                scanned[count] = scanned.get(count, 0) + case.messages
            print(f"round {round_number + 1}/{arguments.rounds} done", file=sys.stderr, flush=True)
        del scanned[0]
        for count, guard in guards.items():
            guard.stop()
            check_guard_log(guard, scanned[count])
        commands = {count: f"PYTHONPATH={REPO} {shlex.join(guard.command)}" for count, guard in guards.items()}

    def ratio(runs: list[Sample], base: list[Sample]) -> str:
        return f"{statistics.median(b.seconds / a.seconds for a, b in zip(runs, base, strict=True)):.2f}"

    rows = []
    for count in [0, *counts]:
        runs = samples[count]
        rates = [case.messages / sample.seconds for sample in runs]
        name = f"smtpguard builtin, {count} worker{'s' if count > 1 else ''}" if count else "smtp-sink directly"
        rows.append(
            [
                name,
                f"{statistics.median(rates):.0f}",
                " ".join(f"{rate:.0f}" for rate in rates),
                f"{statistics.median(sample.cpu for sample in runs) / case.messages * 1000:.2f}" if count else "-",
                ratio(runs, samples[1]) if count else "-",
                ratio(runs, samples[0]),
            ]
        )
    header = ["configuration", "msg/s (median)", "msg/s each round", "CPU ms/msg (all processes)"]
    header += ["vs 1 worker", "vs direct"]
    print(table(header, rows))
    print()
    print(
        f"{case.sessions} sessions x {case.size} bytes, {case.messages} messages a run, {arguments.rounds} rounds "
        "interleaved in rotating order; vs 1 worker, vs direct: the median of the per-round ratios; every message "
        "logged as scanned clean and relayed, an EICAR message rejected by each"
    )
    print(f"machine: {os.cpu_count()} CPUs")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"client: {shlex.join(source_command('PORT', case.size, case.messages, case.sessions, False))}")
    for count, command in commands.items():
        print(f"{count} worker(s): {command}  # {workdir}/workers-{count}.toml: [server] workers = {count}")
    return 0


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workers",
        type=lambda text: [int(item) for item in text.split(",")],
        default=[2],
        help="worker counts to compare with 1, comma-separated (default 2; e.g. 2,4,8 on a bigger machine)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--messages", type=int, default=1000, help="messages per run (default 1000)")
    parser.add_argument("--sessions", type=int, default=20, help="concurrent sessions (default 20)")
    parser.add_argument("--size", type=int, default=20_000, help="message size in bytes (default 20000)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed for one smtp-source run")
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs here (default: a temporary directory)")
    arguments = parser.parse_args(argv)
    if min(arguments.rounds, arguments.messages, arguments.sessions, arguments.size, *arguments.workers) < 1:
        parser.error("every number must be positive")
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    try:
        return run(arguments)
    except BenchmarkError as error:
        print(f"workers benchmark FAILED: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
