"""What the in-process benchmarks share: measuring in a child process against a
checkout, alternating a baseline checkout with this one round by round, and the
plain-text table they print."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

Results = dict[str, list[float]]  # row name -> one value per round


def child(script: Path, repo: Path, rounds: int, *options: str) -> Results:
    """Run ``script --json`` against the code in ``repo``; the results it prints."""
    command = [sys.executable, str(script), "--repo", str(repo), "--rounds", str(rounds), "--json", *options]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    results: Results = json.loads(done.stdout)
    return results


def alternate(script: Path, baseline: Path, repo: Path, rounds: int, *options: str) -> tuple[Results, Results]:
    """One round at a time of ``baseline`` and ``repo``: (before, after)."""
    before: Results = {}
    after: Results = {}
    for round_number in range(rounds):
        # Alternate which code goes first, so that a noisy neighbour weighs on both alike.
        order = [(baseline, before), (repo, after)]
        for checkout, into in order if round_number % 2 == 0 else reversed(order):
            for name, values in child(script, checkout, 1, *options).items():
                into.setdefault(name, []).extend(values)
        print(f"round {round_number + 1}/{rounds} done", file=sys.stderr)
    return before, after


def speed_up(before: list[float], after: list[float]) -> float:
    """The median over the rounds of before / after."""
    return statistics.median(b / a for b, a in zip(before, after, strict=True))


def spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.rjust(width) if i else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, ["-" * width for width in widths], *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)
