#!/usr/bin/env python3
"""Scale-out: message throughput through HAProxy to 1, 2 ... smtpguard instances,
side by side with HAProxy straight to smtp-sink.

All on 127.0.0.1, driven by Postfix's smtp-source:

* ``haproxy -> smtp-sink``: the ceiling of the path without smtpguard;
* ``haproxy -> N x smtpguard``: HAProxy (mode tcp, ``balance leastconn``,
  ``send-proxy-v2``, ``option smtpchk`` health checks) in front of N smtpguard
  processes (``proxy_protocol = true``), each relaying to the same smtp-sink.

One haproxy process serves every configuration, one frontend each; the
configurations run interleaved in rounds, their order rotating, and the table
shows medians and per-round ratios.  Every run must deliver every message (see
relay.py's ``measure``), and at the end the instances' logs must show every
message scanned clean and relayed, and nothing wrong.

Run ``python benchmarks/scaleout.py --help`` for the options; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from relay import (
    _TROUBLE,
    HOST,
    REPO,
    BenchmarkError,
    Case,
    Sample,
    Server,
    Target,
    _checkout,
    _twisted_version,
    clamd_socket,
    free_port,
    human_size,
    log_text,
    measure,
    parse_list,
    program,
    running,
    source_command,
    start_clamd,
    start_guard,
    start_sink,
    work_directory,
)
from sidebyside import table

BASELINE = "haproxy -> smtp-sink"
CHECK_INTERVAL = "2s"  # health checks are a background cost: keep them rare


def instances_label(count: int) -> str:
    return BASELINE if count == 0 else f"haproxy -> {count} x smtpguard"


def haproxy_config(sink: Server, ports: dict[int, int], guards: Sequence[Server]) -> str:
    """One proxy per configuration (``ports``: instance count -> port): with 0
    instances straight to smtp-sink, else to the first N instances."""
    lines = [
        "global",
        "    maxconn 4096",
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 60s",
        "    timeout server 60s",
        "    retries 3",
        "    option redispatch",
    ]
    for count, port in ports.items():
        lines += [f"listen instances-{count}", f"    bind {HOST}:{port}"]
        if count == 0:
            lines.append(f"    server sink {HOST}:{sink.port}")
            continue
        lines += [
            "    balance leastconn",
            "    option smtpchk EHLO haproxy.bench",
            f"    default-server send-proxy-v2 check check-send-proxy inter {CHECK_INTERVAL}",
        ]
        lines += [f"    server {guard.name} {HOST}:{guard.port}" for guard in guards[:count]]
    return "\n".join(lines) + "\n"


def guard_config(workdir: Path, name: str) -> Path:
    """What the instances' command lines do not say: PROXY protocol from HAProxy."""
    config = workdir / f"{name}.toml"
    config.write_text(
        f'[server]\nhostname = "{name}.bench"\nproxy_protocol = true\ntrusted_proxies = ["{HOST}"]\n',
        encoding="utf-8",
    )
    return config


def measure_instances(target: Target, case: Case, guards: Sequence[Server], timeout: float) -> tuple[Sample, float]:
    """One smtp-source run (relay.py's ``measure``, charging haproxy's CPU time)
    and the CPU seconds all smtpguard instances used meanwhile."""
    before = sum(guard.cpu() for guard in guards)
    sample = measure(target, case, reuse=False, timeout=timeout)
    return sample, sum(guard.cpu() for guard in guards) - before


def check_logs(guards: Sequence[Server], expected: int) -> list[int]:
    """After the instances have stopped: together they logged ``expected`` messages
    scanned clean and relayed, nothing else and nothing wrong.  Each one's count."""
    counts = []
    for guard in guards:
        text = log_text(guard)
        trouble = [line for line in text.splitlines() if _TROUBLE.search(line)]
        if trouble:
            raise BenchmarkError(
                f"{guard.name} logged {len(trouble)} problem line(s), e.g.:\n" + "\n".join(trouble[:10])
            )
        if len(re.findall(r" status=", text)) != len(re.findall(r" status=clean action=deliver reply=\(250 ", text)):
            raise BenchmarkError(f"{guard.name} logged an outcome other than clean and relayed")
        counts.append(len(re.findall(r" status=clean action=deliver reply=\(250 ", text)))
    if sum(counts) != expected:
        raise BenchmarkError(f"the instances logged {sum(counts)} messages relayed, expected {expected}")
    return counts


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Throughput: smtp-source -> haproxy -> {smtp-sink | N smtpguard instances -> smtp-sink}, "
        "interleaved in rounds on 127.0.0.1.",
    )
    parser.add_argument(
        "--instances", type=parse_list, default=[1, 2], help="smtpguard instance counts to compare (default 1,2)"
    )
    parser.add_argument("--engine", choices=("builtin", "clamd"), default="builtin", help="the instances' scanner")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of interleaved runs (default 5)")
    parser.add_argument("--messages", type=int, default=2000, help="messages per run (default 2000)")
    parser.add_argument("--size", type=int, default=20_000, help="payload bytes, smtp-source -l (default 20000)")
    parser.add_argument("--sessions", type=int, default=20, help="concurrent sessions, smtp-source -s (default 20)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed for one smtp-source run")
    parser.add_argument("--clamd-threads", type=int, default=10, help="clamd's MaxThreads with --engine clamd")
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs and configurations here")
    arguments = parser.parse_args(argv)
    if min(arguments.rounds, arguments.messages, arguments.size, arguments.sessions) < 1:
        parser.error("--rounds, --messages, --size and --sessions must be positive")
    return arguments


def run(arguments: argparse.Namespace) -> int:
    started = time.monotonic()
    case = Case(arguments.size, arguments.sessions, arguments.messages)
    counts = [0, *sorted(set(arguments.instances))]
    names = [instances_label(count) for count in counts]
    samples: dict[str, list[tuple[Sample, float]]] = {name: [] for name in names}
    with ExitStack() as stack:
        workdir = work_directory(stack, arguments.workdir, "smtpguard-scaleout-")
        sink = start_sink(stack, workdir)
        scanner = "builtin"
        if arguments.engine == "clamd":
            scanner = f"clamd:unix:{clamd_socket(start_clamd(stack, workdir, arguments.clamd_threads))}"
        guards = []
        for number in range(1, max(arguments.instances) + 1):
            name = f"guard-{number}"
            for old in workdir.glob(f"{name}.log*"):  # twistd appends: a kept --workdir must not count twice
                old.unlink()
            guards.append(start_guard(stack, workdir, sink, scanner, None, name, guard_config(workdir, name)))
        ports = {count: free_port() for count in counts}
        config = workdir / "haproxy.cfg"
        config.write_text(haproxy_config(sink, ports, guards), encoding="utf-8")
        haproxy_command = [program("haproxy", "haproxy"), "-db", "-f", str(config)]
        haproxy = stack.enter_context(running("haproxy", haproxy_command, ports[0], workdir, counter=False))
        targets = {
            instances_label(count): Target((instances_label(count), arguments.engine), port, sink, haproxy)
            for count, port in ports.items()
        }
        # Warm up (and fail early): a few messages through each configuration, not counted.
        warm = Case(case.size, case.sessions, 2 * case.sessions)
        relayed = 0
        for name, target in targets.items():
            measure_instances(target, warm, guards, arguments.timeout)
            relayed += warm.messages if name != BASELINE else 0
        for round_number in range(arguments.rounds):
            shift = round_number % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(measure_instances(targets[name], case, guards, arguments.timeout))
                relayed += case.messages if name != BASELINE else 0
            print(
                f"round {round_number + 1}/{arguments.rounds} done ({time.monotonic() - started:.0f}s)", file=sys.stderr
            )
        for guard in guards:
            guard.stop()
        shares = check_logs(guards, relayed)
        commands = [shlex.join(server.command) for server in (sink, *guards, haproxy)]
        haproxy_text = config.read_text()
    elapsed = time.monotonic() - started

    print(report(names, samples, case))
    print()
    print(NOTES)
    print()
    print(f"rounds: {arguments.rounds}, configurations interleaved in rotating order; total {elapsed:.0f}s")
    relayed_by = ", ".join(f"guard-{number} {count}" for number, count in enumerate(shares, 1))
    print(f"messages each instance relayed, warm-up included (guard-1 serves every configuration): {relayed_by}")
    print(f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, Twisted {_twisted_version()}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"checkout: {REPO} at {_checkout()}")
    print(f"client: {shlex.join(source_command('PORT', case.size, case.messages, case.sessions, False))}")
    print("servers (smtpguard with PYTHONPATH at the checkout):\n  " + "\n  ".join(commands))
    print("haproxy.cfg:\n  " + "\n  ".join(haproxy_text.splitlines()))
    return 0


def report(names: Sequence[str], samples: dict[str, list[tuple[Sample, float]]], case: Case) -> str:
    def ratio(name: str, other: str) -> str:
        pairs = zip(samples[name], samples[other], strict=True)
        return f"{statistics.median(theirs.seconds / ours.seconds for (ours, _), (theirs, _) in pairs):.2f}"

    one = instances_label(1)
    header = ["configuration", "msgs", "seconds (min-max)", "msgs/s", "vs 1 instance", "vs baseline"]
    header += ["smtpguard CPU ms/msg", "haproxy CPU ms/msg"]
    rows = []
    for name in names:
        runs = samples[name]
        seconds = [sample.seconds for sample, _ in runs]
        median = statistics.median(seconds)
        rows.append(
            [
                name,
                str(case.messages),
                f"{median:.3f} ({min(seconds):.2f}-{max(seconds):.2f})",
                f"{case.messages / median:.1f}",
                ratio(name, one) if one in samples and name != BASELINE else "",
                ratio(name, BASELINE),
                "" if name == BASELINE else f"{statistics.median(cpu for _, cpu in runs) / case.messages * 1000:.2f}",
                f"{statistics.median(sample.cpu for sample, _ in runs) / case.messages * 1000:.2f}",
            ]
        )
    title = f"{human_size(case.size)} messages, {case.sessions} sessions, a new connection per message"
    return title + "\n\n" + table(header, rows)


NOTES = """\
seconds: median wall time of one smtp-source run over the rounds (min-max beside it); msgs/s from the median.
vs 1 instance, vs baseline: throughput relative to that configuration (>1 is faster), the median
  of the per-round ratios of paired runs.
smtpguard CPU ms/msg: CPU time (user+system, /proc/PID/stat) of all smtpguard instances together,
  per message; haproxy CPU ms/msg: the same for haproxy."""


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    try:
        return run(arguments)
    except BenchmarkError as error:
        print(f"scale-out benchmark FAILED: {error}", file=sys.stderr)
        if arguments.workdir is None:
            print("(run again with --workdir DIR to keep the logs)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
