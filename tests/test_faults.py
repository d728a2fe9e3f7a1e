"""Nothing lost, nothing unscanned by accident: a load of numbered messages through a
real ``twistd smtpguard`` to Postfix's smtp-sink, scanned by a real clamd, while
clamd, the next hop and smtpguard itself are stopped, killed and started again.

The client retries every 4xx and every lost connection with the same message; at
the end, what it was told is compared with what smtp-sink dumped.  Size the load
with SMTPGUARD_FAULT_MESSAGES and SMTPGUARD_FAULT_CONCURRENCY.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from smtpguard import replies
from smtpguard.envelope import Client, Envelope
from smtpguard.replies import Reply
from smtpguard.smtpclient import SMTPClientProtocol
from smtpguard.upstream import UpstreamSession, UpstreamSettings
from tests.conftest import free_port
from tests.engines import Clamd
from tests.faults import GUARD, Fault, Guard, Load, Sink, first_near, guard_config, inject, read_dumps, summary

pytestmark = pytest.mark.faults

MESSAGES = int(os.environ.get("SMTPGUARD_FAULT_MESSAGES", "3000"))
CONCURRENCY = int(os.environ.get("SMTPGUARD_FAULT_CONCURRENCY", "8"))
# Retrying one message stops after this long: far more than the longest outage.
BUDGET = 90.0
# The whole load must be over by then, faults included.
LOAD_TIMEOUT = 600.0
# A message delivered twice was dumped the first time just before smtpguard or the
# next hop died (or while the next hop was too slow): seconds before the fault
# began and after it ended.
WINDOW = (5.0, 2.0)
# A dump cut off by a killed next hop was opened at MAIL, which may precede the
# kill by a scan deadline and a next-hop timeout.
CUT_WINDOW = (20.0, 2.0)


class Parts:
    """clamd, the next hop and smtpguard, each started and ready."""

    def __init__(self, directory: Path) -> None:
        self.clamd = Clamd(directory / "clamd")
        self.sink = Sink(directory / "sink", free_port())
        port = free_port()
        self.guard = Guard(directory, port, guard_config(port, self.sink.endpoint, self.clamd.unix_endpoint))

    def start(self) -> None:
        self.clamd.start()
        self.sink.start()
        self.guard.start()

    def stop(self) -> None:
        for stalled in (self.sink.process, self.clamd.process):
            if stalled is not None and stalled.poll() is None:
                stalled.send_signal(signal.SIGCONT)  # a stopped process would ignore SIGTERM
        for stop in (self.guard.stop, self.sink.stop, self.clamd.stop):
            try:
                stop()
            except Exception:  # the others must still be stopped
                pass
        if self.clamd.process is not None:
            self.clamd.process.kill()

    # -- the faults -------------------------------------------------------------------

    def clamd_down(self, seconds: float, how: signal.Signals = signal.SIGTERM) -> None:
        assert self.clamd.process is not None
        self.clamd.process.send_signal(how)
        self.clamd.process.wait(10)
        self.clamd.process = None
        time.sleep(seconds)
        self.clamd.start()

    def clamd_stalled(self, seconds: float) -> None:
        self.clamd.pause()
        time.sleep(seconds)
        self.clamd.resume()

    def sink_down(self, seconds: float, how: signal.Signals) -> None:
        self.sink.stop(how)
        time.sleep(seconds)
        self.sink.start()

    def sink_stalled(self, seconds: float) -> None:
        assert self.sink.process is not None
        self.sink.process.send_signal(signal.SIGSTOP)
        time.sleep(seconds)
        self.sink.process.send_signal(signal.SIGCONT)

    def guard_down(self, seconds: float, how: signal.Signals) -> None:
        self.guard.stop(how)
        time.sleep(seconds)
        self.guard.start()

    def all_down(self, seconds: float) -> None:
        self.guard.stop(signal.SIGKILL)
        self.sink.stop(signal.SIGKILL)
        assert self.clamd.process is not None
        self.clamd.process.kill()
        self.clamd.process.wait(10)
        self.clamd.process = None
        time.sleep(seconds)
        self.clamd.start()
        self.sink.start()
        self.guard.start()

    def faults(self) -> list[Fault]:
        kill, term = signal.SIGKILL, signal.SIGTERM
        return [
            Fault("clamd stopped, 3 s", 0.05, lambda: self.clamd_down(3.0)),
            Fault("clamd stalled 7 s", 0.14, lambda: self.clamd_stalled(7.0)),
            Fault("next hop SIGKILL, 2 s", 0.23, lambda: self.sink_down(2.0, kill), window=True, cuts=True),
            Fault("smtpguard SIGTERM, 1 s", 0.32, lambda: self.guard_down(1.0, term), window=True),
            Fault("clamd SIGKILL, 2 s", 0.41, lambda: self.clamd_down(2.0, kill)),
            Fault("next hop stalled 7 s", 0.50, lambda: self.sink_stalled(7.0), window=True),
            Fault("next hop SIGTERM, 2 s", 0.59, lambda: self.sink_down(2.0, term), window=True, cuts=True),
            Fault("smtpguard SIGKILL, 1 s", 0.68, lambda: self.guard_down(1.0, kill), window=True),
            Fault("smtpguard SIGTERM, at once", 0.75, lambda: self.guard_down(0.0, term), window=True),
            Fault("all three SIGKILL, 2 s", 0.82, lambda: self.all_down(2.0), window=True, cuts=True),
        ]


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    started = Parts(tmp_path)
    try:
        started.start()
        yield started
    finally:
        started.stop()


def _listed(ids: list[str], limit: int = 10) -> str:
    shown = ", ".join(sorted(ids)[:limit])
    return f"{len(ids)}: {shown}" + (" ..." if len(ids) > limit else "")


def test_no_message_is_lost_or_unscanned_while_the_parts_fail(parts: Parts) -> None:
    """While clamd, smtp-sink and smtpguard are stopped and restarted under load,
    every message the client got 250 for reaches the next hop, scanned and intact;
    every clean message is eventually accepted after its retries; no infected one
    arrives; and a message arrives twice only in the window SMTP cannot close: the
    next hop accepted it, then smtpguard or the next hop died (or the next hop
    answered too late) before the client heard 250."""
    load = Load(parts.guard.port, MESSAGES, CONCURRENCY, BUDGET, secrets.token_hex(4))
    faults = parts.faults()

    load.start()
    try:
        injected = inject(load, faults, MESSAGES, timeout=LOAD_TIMEOUT / len(faults))
        finished = load.wait(LOAD_TIMEOUT)
    finally:
        load.stop()

    dumps = read_dumps(parts.sink.directory, load.messages)
    complete = [dump for dump in dumps if dump.complete]
    arrived = Counter(dump.test_id for dump in complete if dump.test_id is not None)
    duplicates = {test_id: n - 1 for test_id, n in arrived.items() if n > 1}
    blamed: Counter[str] = Counter()
    unexplained = []
    for test_id, extra in duplicates.items():
        first = min(dump.mtime for dump in complete if dump.test_id == test_id)
        fault = first_near(first, (done for done in injected if done.fault.window), *WINDOW)
        if fault is None:
            unexplained.append(test_id)
        else:
            blamed[fault.fault.name] += extra
    print(summary(load, dumps, injected, duplicates, blamed))
    assert finished, f"the load was still running after {LOAD_TIMEOUT} s"
    heard = Counter(key for outcome in load.outcomes.values() for key in outcome.transient)
    dropped = sum(sum(outcome.connection_errors.values()) for outcome in load.outcomes.values())
    felt = {
        "clamd down or stalled (451 4.7.1)": heard["451 4.7.1"],
        "next hop down (451 4.4.1)": heard["451 4.4.1"],
        "next hop stalled (451 4.4.2)": heard["451 4.4.2"],
        "smtpguard down (connection refused or lost)": dropped,
    }
    unfelt = [kind for kind, times in felt.items() if not times]
    assert not unfelt, f"faults the client never noticed (is the load too small?): {unfelt}"

    outcomes = load.outcomes
    accepted = [test_id for test_id, outcome in outcomes.items() if outcome.final == 250]
    lost = [test_id for test_id in accepted if not arrived[test_id]]
    assert not lost, f"got 250 but never reached the next hop: {_listed(lost)}"

    clean_not_accepted = [
        f"{test_id} ({outcome.final} {outcome.final_text!r}, {outcome.attempts} attempts)"
        for test_id, outcome in outcomes.items()
        if not outcome.infected and outcome.final != 250
    ]
    assert not clean_not_accepted, f"clean messages never accepted: {_listed(clean_not_accepted)}"

    infected_not_rejected = [
        f"{test_id} ({outcome.final})"
        for test_id, outcome in outcomes.items()
        if outcome.infected and outcome.final != 554
    ]
    assert not infected_not_rejected, f"infected messages not rejected with 554: {_listed(infected_not_rejected)}"
    infected_arrived = [test_id for test_id in arrived if test_id in outcomes and outcomes[test_id].infected]
    assert not infected_arrived, f"infected messages reached the next hop: {_listed(infected_arrived)}"

    unknown = [dump.path.name for dump in complete if dump.test_id not in outcomes]
    assert not unknown, f"dumps of no message the client sent: {_listed(unknown)}"
    unscanned = [
        f"{dump.test_id} (status {dump.status}, scanned {dump.scanned})"
        for dump in complete
        if dump.status != ("clean",) or dump.scanned != (f"smtpguard (clamd) on {GUARD}",)
    ]
    assert not unscanned, f"messages relayed without exactly one clean verdict: {_listed(unscanned)}"
    altered = [dump.path.name for dump in complete if not dump.intact]
    assert not altered, f"messages that did not arrive as sent: {_listed(altered)}"

    cutters = [done for done in injected if done.fault.cuts]
    cut_off = [
        dump.path.name for dump in dumps if not dump.complete and first_near(dump.mtime, cutters, *CUT_WINDOW) is None
    ]
    assert not cut_off, f"unfinished dumps while the next hop was not killed: {_listed(cut_off)}"

    windows = sum(done.fault.window for done in injected)
    assert sum(duplicates.values()) <= windows * CONCURRENCY, (
        f"{sum(duplicates.values())} duplicates, more than {CONCURRENCY} for each of {windows} faults that allow them"
    )
    assert not unexplained, f"duplicates first delivered while no fault allowed it: {_listed(unexplained)}"


# -- one fault, exactly: the next hop gone between pipelined commands ---------------------


class _RecordingEndpoint:
    """A client endpoint whose one connection is a StringTransport, keeping the
    Deferred of every command smtpguard sends on it."""

    def __init__(self) -> None:
        self.protocol: SMTPClientProtocol | None = None
        self.commands: list[tuple[str, Deferred[Reply]]] = []

    def connect(self, factory: Factory) -> Deferred[Protocol]:
        protocol = factory.buildProtocol(None)
        assert isinstance(protocol, SMTPClientProtocol)
        protocol.makeConnection(StringTransport())  # type: ignore[no-untyped-call]
        send = protocol.command

        def recorded(line: str) -> Deferred[Reply]:
            waiting = send(line)
            self.commands.append((line.split()[0], waiting))
            return waiting

        protocol.command = recorded  # type: ignore[method-assign]
        self.protocol = protocol
        return defer.succeed(protocol)


def test_next_hop_lost_after_pipelined_xforward_and_mail_leaves_no_failure_unhandled() -> None:
    """A next hop that offers PIPELINING and XFORWARD and drops the connection once
    XFORWARD and MAIL are sent: the client hears 451 4.4.1, and every command's
    failure is consumed, none left for Twisted to log as "Unhandled error in
    Deferred" (which smtpguard logged at critical level each time the load above
    killed the next hop)."""
    endpoint = _RecordingEndpoint()
    session = UpstreamSession(Clock(), endpoint, UpstreamSettings("tcp:127.0.0.1:25"))  # type: ignore[arg-type]
    envelope = Envelope(Client(address="192.0.2.1", port=1234, helo="client.example"), "alice@example.org")
    heard: list[Reply] = []

    session.mail(envelope).addCallback(heard.append)
    protocol = endpoint.protocol
    assert protocol is not None
    protocol.dataReceived(b"220 hop ESMTP\r\n")
    protocol.dataReceived(b"250-hop\r\n250-PIPELINING\r\n250 XFORWARD NAME ADDR PROTO HELO\r\n")
    sent = [line for line, _ in endpoint.commands]
    protocol.connectionLost(Failure(ConnectionLost()))

    unhandled = [line for line, waiting in endpoint.commands if isinstance(waiting.result, Failure)]
    for _, waiting in endpoint.commands:
        waiting.addErrback(lambda _: None)  # keep the test run's log clean either way
    assert sent == ["EHLO", "XFORWARD", "MAIL"]
    assert heard == [replies.UPSTREAM_UNAVAILABLE]
    assert unhandled == []
