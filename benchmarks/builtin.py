#!/usr/bin/env python3
"""CPU time per message of the built-in scanner (``BuiltinScanner.scan_now``) for a
few message shapes, optionally side by side with another checkout of the code.

Each message is spooled once the way the proxy holds it (in memory up to 1 MiB, else
in a temporary file) and scanned over and over in this process; every scan must come
back clean.  ``--baseline DIR`` runs this same script against the checkout in DIR
(``git archive HEAD | tar -x -C DIR`` makes one) in a child process, alternating
with the code here round by round, and shows both with their ratio.

Run ``python benchmarks/builtin.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sidebyside import alternate, child, speed_up, spread, table

HERE = Path(__file__).resolve()
DEFAULT_REPO = HERE.parent.parent

HEADERS = (
    b"Received: from client.example ([127.0.0.1])\r\n\tby guard.test with SMTP;\r\n"
    b"\tMon, 30 Nov 2026 10:00:00 +0000\r\n"
    b"From: <foo@client.example>\r\nTo: <bar@guard.test>\r\n"
    b"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\nMessage-Id: <1.2.3@client.example>\r\n"
)
PROSE = (
    b"Dear Bob, the quarterly figures are attached; the totals in the second table\r\n"
    b"include the adjustments we discussed on Tuesday. Let me know what you think.\r\n"
)


def source_body(size: int) -> bytes:
    """A body like Postfix smtp-source's ``-l size``: lines of a digit and 78 X."""
    lines = []
    length = 0
    number = 1
    while length < size:
        line = b"%d" % (number % 10) + b"X" * 78 + b"\r\n"
        lines.append(line)
        length += len(line)
        number += 1
    return b"".join(lines)


def wrapped(data: bytes) -> bytes:
    encoded = base64.b64encode(data)
    return b"".join(encoded[i : i + 76] + b"\r\n" for i in range(0, len(encoded), 76))


def text_message(size: int) -> bytes:
    return HEADERS + b"Subject: plain\r\n\r\n" + source_body(size)


def multipart_message(size: int, encoded_attachment: int) -> bytes:
    """A text part of prose and a base64 attachment of random bytes (``encoded_attachment``
    bytes of base64), the whole about ``size`` bytes."""
    attachment = wrapped(random.Random(size).randbytes(encoded_attachment * 3 // 4))
    head = HEADERS + b'Subject: report\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="=_b1"\r\n\r\n'
    text_part = b"--=_b1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    file_part = (
        b'--=_b1\r\nContent-Type: application/pdf; name="report.pdf"\r\n'
        b'Content-Disposition: attachment; filename="report.pdf"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
    )
    fixed = len(head) + len(text_part) + len(file_part) + len(attachment) + len(b"--=_b1--\r\n")
    prose = PROSE * max(1, (size - fixed) // len(PROSE))
    return head + text_part + prose + file_part + attachment + b"--=_b1--\r\n"


def odd_header_message(size: int, encoded_attachment: int) -> bytes:
    """:func:`multipart_message` with a line without a colon in the attachment's
    header section, which the mail clients' readings read otherwise."""
    return multipart_message(size, encoded_attachment).replace(
        b"Content-Transfer-Encoding: base64", b"X-Line-Without-Colon\r\nContent-Transfer-Encoding: base64"
    )


SHAPES: dict[str, Callable[[], bytes]] = {
    "20 KB text": lambda: text_message(20_000),
    "1 MB text": lambda: text_message(1_000_000),
    "1 MB multipart": lambda: multipart_message(1_000_000, 700_000),
    "5 MB multipart": lambda: multipart_message(5_000_000, 4_900_000),
    "1 MB odd header": lambda: odd_header_message(1_000_000, 700_000),
}
DESCRIPTIONS = {
    "20 KB text": "smtp-source -l 20000: digit + 78 X a line, no MIME",
    "1 MB text": "smtp-source -l 1000000: digit + 78 X a line, no MIME",
    "1 MB multipart": "300 KB text part + 700 KB base64 attachment",
    "5 MB multipart": "100 KB text part + 4.9 MB base64 attachment",
    "1 MB odd header": "1 MB multipart, a line without a colon in the attachment's header (3 readings)",
}


def scans_per_round(data: bytes, budget: float) -> int:
    return max(3, int(budget / max(len(data), 1) * 1_000_000))


def measure(repo: Path, rounds: int, shapes: Sequence[str]) -> dict[str, list[float]]:
    """CPU ms per scan for each shape, one median per round, with the code in ``repo``."""
    sys.path.insert(0, str(repo))
    from smtpguard.results import Verdict
    from smtpguard.scanners.builtin import BuiltinScanner
    from smtpguard.spool import Spool

    scanner = BuiltinScanner()
    results: dict[str, list[float]] = {shape: [] for shape in shapes}
    messages = {}
    for shape in shapes:
        data = SHAPES[shape]()
        spool = Spool(0)
        spool.write(data)
        messages[shape] = (spool.finish(), scans_per_round(data, 40.0))
        # Warm-up, and the check that the message is clean.
        result = scanner.scan_now(messages[shape][0])
        if result.verdict is not Verdict.CLEAN:
            raise SystemExit(f"{shape}: expected clean, got {result}")
    for _ in range(rounds):
        for shape in shapes:
            message, count = messages[shape]
            times = []
            for _ in range(count):
                started = time.process_time()
                scanner.scan_now(message)
                times.append((time.process_time() - started) * 1000)
            results[shape].append(statistics.median(times))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of scans per shape (default 5)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of: {', '.join(SHAPES)}")
    parser.add_argument("--baseline", type=Path, help="another checkout to measure side by side (the 'before')")
    parser.add_argument("--repo", type=Path, default=DEFAULT_REPO, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    shapes = [shape.strip() for shape in arguments.shapes.split(",") if shape.strip()]
    unknown = [shape for shape in shapes if shape not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes: {', '.join(unknown)}")
    if arguments.json:
        print(json.dumps(measure(arguments.repo, arguments.rounds, shapes)))
        return 0
    sizes = {shape: len(SHAPES[shape]()) for shape in shapes}
    options = ("--shapes", ",".join(shapes))
    if arguments.baseline is None:
        current = child(HERE, arguments.repo, arguments.rounds, *options)
        rows = [[shape, f"{sizes[shape]:,}", spread(current[shape]), DESCRIPTIONS[shape]] for shape in shapes]
        print(table(["message", "bytes", "CPU ms/msg", "shape"], rows))
        return 0
    before, after = alternate(HERE, arguments.baseline, arguments.repo, arguments.rounds, *options)
    rows = [
        [
            shape,
            f"{sizes[shape]:,}",
            spread(before[shape]),
            spread(after[shape]),
            f"{speed_up(before[shape], after[shape]):.2f}x",
            DESCRIPTIONS[shape],
        ]
        for shape in shapes
    ]
    print(table(["message", "bytes", "before CPU ms/msg", "after CPU ms/msg", "speed-up", "shape"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
