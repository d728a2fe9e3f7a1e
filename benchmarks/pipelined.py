#!/usr/bin/env python3
"""CPU time of the ESMTP server for commands pipelined behind a MAIL whose next-hop
reply is held back, optionally side by side with another checkout of the code.

A client sends ``MAIL`` and then N ``NOOP`` lines in one go; the next hop holds its
reply to MAIL, so the server buffers the NOOPs (and pauses reading) until it comes.
The time measured runs from the client's bytes to the last of the N + 1 replies:
receiving, buffering, then working through the backlog.  Every reply is checked.
The server runs on a StringTransport with a Clock, in this process; no network.

If the work is linear in the bytes received, 5 times the commands cost 5 times the
CPU.  ``--baseline DIR`` runs the same script against the checkout in DIR
(``git archive HEAD~1 | tar -x -C DIR`` makes one) in a child process, alternating
with the code here round by round.

Run ``python benchmarks/pipelined.py --help`` for the options; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sidebyside import alternate, child, speed_up, spread, table

HERE = Path(__file__).resolve()
DEFAULT_REPO = HERE.parent.parent
DEFAULT_COUNTS = (10_000, 50_000)
MAIL = b"MAIL FROM:<alice@example.org>\r\n"
NOOP = b"NOOP\r\n"


def measure(repo: Path, rounds: int, counts: Sequence[int]) -> dict[str, list[float]]:
    """CPU ms for each count, one value per round, with the code in ``repo``."""
    sys.path.insert(0, str(repo))
    from twisted.internet import defer
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from zope.interface import implementer

    from smtpguard import replies
    from smtpguard.interfaces import INextHop, IRelaySession
    from smtpguard.server import GuardFactory, ServerSettings

    @implementer(IRelaySession)
    class HeldSession:
        """Holds its reply to MAIL until ``release``."""

        def __init__(self) -> None:
            self.held: defer.Deferred[Any] | None = None

        def mail(self, envelope: Any) -> defer.Deferred[Any]:
            self.held = defer.Deferred()
            return self.held

        def release(self) -> None:
            assert self.held is not None
            self.held.callback(replies.SENDER_OK)

        def rcpt(self, recipient: Any) -> defer.Deferred[Any]:
            return defer.succeed(replies.RECIPIENT_OK)

        def data(self, message: Any, prefix: bytes) -> defer.Deferred[Any]:
            raise AssertionError("no DATA in this benchmark")

        def reset(self) -> defer.Deferred[None]:
            return defer.succeed(None)

        def close(self) -> None:
            pass

    @implementer(INextHop)
    class HeldNextHop:
        def __init__(self) -> None:
            self.sessions: list[HeldSession] = []

        def session(self) -> HeldSession:
            self.sessions.append(HeldSession())
            return self.sessions[-1]

    def unused(*args: Any) -> Any:
        raise AssertionError("no message in this benchmark")

    def run(count: int) -> float:
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        hop = HeldNextHop()
        factory = GuardFactory(Clock(), hop, unused, ServerSettings(hostname="guard.test"))
        transport = StringTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", "127.0.0.1", 25))
        server = factory.buildProtocol(peer)
        assert server is not None
        server.makeConnection(transport)
        server.dataReceived(b"EHLO client.example\r\n")
        transport.clear()
        stream = MAIL + NOOP * count
        started = time.process_time()
        server.dataReceived(stream)
        hop.sessions[0].release()
        elapsed = time.process_time() - started
        expected = replies.SENDER_OK.to_bytes() + replies.OK.to_bytes() * count
        if transport.value() != expected:
            raise SystemExit(f"{count} commands: the replies are not {count + 1} in order")
        server.connectionLost()
        return elapsed * 1000

    run(min(counts))  # warm-up
    results: dict[str, list[float]] = {str(count): [] for count in counts}
    for _ in range(rounds):
        for count in counts:
            results[str(count)].append(run(count))
    return results


def growth(values: dict[str, list[float]], count: int, smallest: int) -> str:
    return f"{statistics.median(values[str(count)]) / statistics.median(values[str(smallest)]):.1f}x"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="rounds per count (default 5)")
    parser.add_argument(
        "--counts",
        default=",".join(str(count) for count in DEFAULT_COUNTS),
        help="comma-separated numbers of pipelined NOOPs (default 10000,50000)",
    )
    parser.add_argument("--baseline", type=Path, help="another checkout to measure side by side (the 'before')")
    parser.add_argument("--repo", type=Path, default=DEFAULT_REPO, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    counts = sorted({int(count) for count in arguments.counts.split(",") if count.strip()})
    if arguments.json:
        print(json.dumps(measure(arguments.repo, arguments.rounds, counts)))
        return 0
    smallest = counts[0]
    size = {count: len(MAIL + NOOP * count) for count in counts}
    options = ("--counts", ",".join(str(count) for count in counts))
    if arguments.baseline is None:
        after = child(HERE, arguments.repo, arguments.rounds, *options)
        rows = [
            [f"{count:,}", f"{size[count]:,}", spread(after[str(count)], 1), growth(after, count, smallest)]
            for count in counts
        ]
        print(table(["commands", "bytes", "CPU ms", f"vs {smallest:,}"], rows))
        return 0
    before, after = alternate(HERE, arguments.baseline, arguments.repo, arguments.rounds, *options)
    rows = [
        [
            f"{count:,}",
            f"{size[count]:,}",
            spread(before[str(count)], 1),
            growth(before, count, smallest),
            spread(after[str(count)], 1),
            growth(after, count, smallest),
            f"{speed_up(before[str(count)], after[str(count)]):.1f}x",
        ]
        for count in counts
    ]
    header = ["commands", "bytes", "before CPU ms", f"vs {smallest:,}", "after CPU ms", f"vs {smallest:,}", "speed-up"]
    print(table(header, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
