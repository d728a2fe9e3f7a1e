"""Deadlines that are real for the built-in scanner: scan slots in total and per
client, a scan abandoned at its deadline told to stop (its slot free only once it
has), every scan stopped when the reactor shuts down, after the drain; on a Clock,
with real threads, and through a real smtpguard to smtp-sink."""

from __future__ import annotations

import io
import os
import queue
import smtplib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock

from smtpguard import replies
from smtpguard.config import ConfigError
from smtpguard.envelope import Client, Envelope
from smtpguard.pipeline import Pipeline
from smtpguard.plugins.bundled import builtin as builtin_plugin
from smtpguard.policies.default import DefaultPolicy
from smtpguard.results import ErrorKind, ScanResult
from smtpguard.scanners.builtin import BuiltinScanner
from smtpguard.scanners.signatures import Pattern, Signatures
from smtpguard.scanners.workers import MAX_SCANS, MAX_SCANS_PER_CLIENT, Slots, Workers
from smtpguard.server import GuardFactory, ServerSettings
from smtpguard.spool import Message
from smtpguard.tap import Drain
from smtpguard.upstream import Upstream, UpstreamSettings
from tests.conftest import SmtpSink, listen
from tests.test_builtin import attachment, mail, multipart, spooled, text
from tests.test_server import Session

ScanJob = Callable[[], ScanResult]


def envelope(address: str) -> Envelope:
    return Envelope(Client(address, 4321, helo="client.example"), "alice@example.org")


SMALL = spooled(mail(multipart(text())))


# -- slots ------------------------------------------------------------------------------------


def test_a_client_at_its_cap_waits() -> None:
    """Two slots per client: a client's third request waits, and starts when one of
    its slots is released."""
    slots = Slots(total=4, per_client=2)
    first, second, third = (slots.acquire("192.0.2.1") for _ in range(3))
    assert (first.called, second.called, third.called) == (True, True, False)
    slots.release("192.0.2.1")
    assert third.called and slots.held == 2


def test_other_clients_pass_a_client_at_its_cap() -> None:
    """A client waiting at its own cap does not hold up another client behind it."""
    slots = Slots(total=4, per_client=2)
    held = [slots.acquire("192.0.2.1") for _ in range(3)]
    other = slots.acquire("192.0.2.2")
    assert other.called and not held[2].called and slots.waiting == 1


def test_every_client_waits_when_all_slots_are_held() -> None:
    """With all slots held, a new client waits; a released slot goes to the first
    waiter that is below its own cap."""
    slots = Slots(total=2, per_client=2)
    slots.acquire("192.0.2.1"), slots.acquire("192.0.2.1")
    capped, other = slots.acquire("192.0.2.1"), slots.acquire("192.0.2.2")
    assert not capped.called and not other.called
    slots.release("192.0.2.1")
    assert capped.called and not other.called


def test_a_cancelled_wait_gives_up_its_place() -> None:
    """Cancelling a waiting request removes it: the next release goes to the one behind."""
    slots = Slots(total=1, per_client=1)
    slots.acquire("192.0.2.1")
    gave_up, next_one = slots.acquire("192.0.2.2"), slots.acquire("192.0.2.3")
    gave_up.addErrback(lambda failure: None)
    gave_up.cancel()
    slots.release("192.0.2.1")
    assert next_one.called and slots.waiting == 0


def test_slot_counts_must_be_positive() -> None:
    """Zero slots would stop every scan: refused."""
    with pytest.raises(ValueError, match="at least 1"):
        Slots(total=0, per_client=1)


# -- the scanner within its slots, on a Clock -------------------------------------------------


class Held:
    """A runner that holds every job: ``jobs`` are the jobs started, ``finish(i)``
    runs the i-th and fires its Deferred, as its thread ending would."""

    def __init__(self) -> None:
        self.jobs: list[tuple[ScanJob, Deferred[ScanResult]]] = []

    def __call__(self, job: ScanJob) -> Deferred[ScanResult]:
        done: Deferred[ScanResult] = Deferred()
        self.jobs.append((job, done))
        return done

    def finish(self, index: int) -> ScanResult:
        job, done = self.jobs[index]
        result = job()
        done.callback(result)
        return result


def held_scanner(clock: Clock, **options: Any) -> tuple[BuiltinScanner, Held]:
    runner = Held()
    return BuiltinScanner(clock, run_in_thread=runner, **options), runner


def test_defaults_are_four_scans_and_two_per_client() -> None:
    """The defaults the documentation states."""
    assert (MAX_SCANS, MAX_SCANS_PER_CLIENT) == (4, 2)


def test_one_client_cannot_take_every_scan_slot() -> None:
    """max_scans 4, 2 per client: a client's third and fourth scans wait, another
    client's scan starts at once."""
    clock = Clock()
    scanner, runner = held_scanner(clock)
    for _ in range(4):
        scanner.scan(SMALL, envelope("192.0.2.1"))
    scanner.scan(SMALL, envelope("192.0.2.2"))
    assert len(runner.jobs) == 3 and scanner.slots.waiting == 2


def test_a_scan_that_waited_past_its_deadline_is_too_many_requests() -> None:
    """A scan still waiting for a slot at its deadline: too-many-requests (not a
    timeout), and it never starts."""
    clock = Clock()
    scanner, runner = held_scanner(clock, max_scans_per_client=1)
    results: list[ScanResult] = []
    scanner.scan(SMALL, envelope("192.0.2.1")).addCallback(results.append)
    scanner.scan(SMALL, envelope("192.0.2.1")).addCallback(results.append)
    clock.advance(60)
    assert results == [
        ScanResult.failed(ErrorKind.TIMEOUT, "no verdict within 60 s", "builtin"),
        ScanResult.failed(ErrorKind.TOO_MANY_REQUESTS, "no scan slot free before the deadline", "builtin"),
    ]
    runner.finish(0)
    assert len(runner.jobs) == 1 and scanner.slots.held == 0


def test_an_abandoned_scan_keeps_its_slot_until_its_job_returns() -> None:
    """At the deadline the result is a timeout and the job is told to stop, but the
    slot stays held until the job has returned: a client's abandoned scans still
    count against its cap."""
    clock = Clock()
    scanner, runner = held_scanner(clock, max_scans_per_client=1)
    results: list[ScanResult] = []
    scanner.scan(SMALL, envelope("192.0.2.1")).addCallback(results.append)
    clock.advance(60)
    assert results == [ScanResult.failed(ErrorKind.TIMEOUT, "no verdict within 60 s", "builtin")]
    later = scanner.scan(SMALL, envelope("192.0.2.1"))
    assert scanner.slots.held == 1 and len(runner.jobs) == 1
    assert runner.finish(0) == ScanResult.failed(ErrorKind.TIMEOUT, "stopped at the deadline", "builtin")
    assert len(runner.jobs) == 2 and not later.called


# -- real threads, and stopping ---------------------------------------------------------------


class ThreadedClock(Clock):
    """A Clock that also takes calls from other threads (run when the test says) and
    records system event triggers, as a reactor does."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: queue.Queue[tuple[Callable[..., object], tuple[object, ...]]] = queue.Queue()
        self.triggers: list[tuple[str, str, Callable[[], object]]] = []

    def callFromThread(self, function: Callable[..., object], *args: object) -> None:
        self.from_threads.put((function, args))

    def addSystemEventTrigger(self, phase: str, event: str, function: Callable[[], object]) -> int:
        self.triggers.append((phase, event, function))
        return len(self.triggers)

    def run_one_from_a_thread(self) -> None:
        """Wait for the next call from a thread (a safety limit, not a measure) and run it."""
        function, args = self.from_threads.get(timeout=30)
        function(*args)

    def shut_down(self) -> None:
        """The shutdown triggers, phase by phase, as the reactor runs them."""
        for phase in ("before", "during", "after"):
            for when, event, function in self.triggers:
                if (when, event) == (phase, "shutdown"):
                    function()


def scan_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "smtpguard-scan"]


@pytest.fixture(autouse=True)
def no_scan_threads_left() -> None:
    """Each test starts with no scan thread of an earlier one still ending."""
    for thread in scan_threads():
        thread.join(30)


# 10,000 patterns: matching costs about 3 s a megabyte, a scan too long to end by itself.
MANY_PATTERNS = Signatures.build(patterns=[Pattern(f"Test.{n}", b"never-%06d" % n) for n in range(10_000)])


def slow_message() -> Message:
    return spooled(mail(multipart(text(), attachment(os.urandom(2 * 1024 * 1024), b"noise.bin"))), 16 * 1024 * 1024)


class ThreadNoting(Message):
    """A message that notes the threads its chunks are read from."""

    def __init__(self, message: Message) -> None:
        data = b"".join(message.chunks())
        super().__init__(io.BytesIO(data), len(data))
        self.threads: list[threading.Thread] = []

    def chunks(self, chunk_size: int = 256 * 1024) -> Iterator[bytes]:
        self.threads.append(threading.current_thread())
        return super().chunks(chunk_size)


def test_scan_runs_in_a_daemon_thread_of_its_own() -> None:
    """With a reactor the scan reads the message in a daemon thread named
    smtpguard-scan, and its result comes back through callFromThread."""
    clock = ThreadedClock()
    message = ThreadNoting(SMALL)
    results: list[ScanResult] = []
    BuiltinScanner(clock).scan(message, envelope("192.0.2.1")).addCallback(results.append)
    clock.run_one_from_a_thread()
    assert results == [ScanResult.clean("builtin")]
    assert {(thread.name, thread.daemon) for thread in message.threads} == {("smtpguard-scan", True)}


def test_a_scan_thread_takes_the_next_scan() -> None:
    """Scans one after another run in one thread: a thread that has finished a scan
    takes the next, none is started per message."""
    clock = ThreadedClock()
    scanner = BuiltinScanner(clock)
    messages = [ThreadNoting(SMALL) for _ in range(3)]
    results: list[ScanResult] = []
    for message in messages:
        scanner.scan(message, envelope("192.0.2.1")).addCallback(results.append)
        clock.run_one_from_a_thread()
    assert results == [ScanResult.clean("builtin")] * 3
    assert len({thread for message in messages for thread in message.threads}) == 1
    assert len(scan_threads()) == 1
    clock.shut_down()
    assert scan_threads() == []


def test_shutdown_stops_a_running_scan_and_waits_for_its_thread() -> None:
    """A scan with seconds of work left when the reactor shuts down: the shutdown
    trigger tells it to stop and returns once its thread has ended; the scan ends
    as a timeout."""
    clock = ThreadedClock()
    results: list[ScanResult] = []
    BuiltinScanner(clock, MANY_PATTERNS).scan(slow_message(), envelope("192.0.2.1")).addCallback(results.append)
    assert len(scan_threads()) == 1
    clock.shut_down()
    assert scan_threads() == []
    clock.run_one_from_a_thread()
    assert results == [ScanResult.failed(ErrorKind.TIMEOUT, "stopped at the deadline", "builtin")]


def test_stopping_the_service_during_a_slow_scan_ends_at_the_drain_timeout() -> None:
    """A session whose message is being scanned (for seconds more) when the service
    stops: the drain waits for it until its 30 s timeout on the Clock, not a moment
    longer; the shutdown that follows stops the scan's thread; the session then
    hears 451 4.7.1 (the scan timed out) and 421 4.3.2."""
    scanner_clock = ThreadedClock()
    scanner = BuiltinScanner(scanner_clock, MANY_PATTERNS)
    session = Session.open(scanner=scanner).hello()
    session.begin()
    session.send(b"DATA\r\n")
    session.replies()
    session.send(b"".join(slow_message().chunks()).replace(b"\r\n.", b"\r\n..") + b".\r\n")
    assert session.factory.busy and len(scan_threads()) == 1
    drain = Drain(session.clock, [session.factory], timeout=30.0)
    drain.startService()
    stopped = drain.stopService()
    session.clock.advance(29.9)
    assert not stopped.called
    session.clock.advance(0.1)
    assert stopped.called
    scanner_clock.shut_down()
    assert scan_threads() == []
    scanner_clock.run_one_from_a_thread()
    assert session.replies() == [replies.SCAN_DEFERRED.to_bytes(), replies.SHUTTING_DOWN.to_bytes()]


def test_configured_scan_slots_apply() -> None:
    """max_scans = 3 and max_scans_per_client = 1 from the [[scanners]] table: a
    client's second scan waits; two other clients' start; a fourth client waits."""
    clock = ThreadedClock()
    scanner = builtin_plugin.build({"max_scans": 3, "max_scans_per_client": 1}, clock)
    assert isinstance(scanner, BuiltinScanner)
    for address in ("192.0.2.1", "192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"):
        scanner.scan(SMALL, envelope(address))
    assert (scanner.slots.held, scanner.slots.waiting) == (3, 2)
    for _ in range(5):
        clock.run_one_from_a_thread()
    assert (scanner.slots.held, scanner.slots.waiting) == (0, 0)


@pytest.mark.parametrize("key", ["max_scans", "max_scans_per_client"])
def test_scan_slot_counts_must_be_positive_in_the_configuration(key: str) -> None:
    """0 for either is refused, naming the key."""
    with pytest.raises(ConfigError) as raised:
        builtin_plugin.build({key: 0}, Clock())
    assert str(raised.value) == f"{key}: must be greater than 0, got 0"


def test_workers_stop_waits_no_longer_than_asked() -> None:
    """A job that never polls: stop() gives up on its thread after the wait it was
    given (the thread is a daemon, so it cannot keep the process up)."""
    release = threading.Event()
    clock = ThreadedClock()
    workers = Workers(clock, Slots(1, 1))
    workers.run("192.0.2.1", lambda stopped: release.wait(30) and ScanResult.clean(), ScanResult.clean)
    workers.stop(wait=0.05)
    [thread] = scan_threads()
    assert thread.is_alive() and thread.daemon
    release.set()
    thread.join(30)
    clock.run_one_from_a_thread()


# -- through a real smtpguard ----------------------------------------------------------------


async def guard(listening: list[IListeningPort], sink: SmtpSink, scanner: BuiltinScanner) -> int:
    """smtpguard on loopback: ``scanner``, the default policy, smtp-sink next."""
    pipeline = Pipeline(reactor, scanner, DefaultPolicy())
    upstream = Upstream(reactor, UpstreamSettings(sink.endpoint, keep_connections=0))
    factory = GuardFactory(reactor, upstream, pipeline.process, ServerSettings(hostname="guard.test"))
    return await listen(listening, factory)


def send_from(address: str, port: int, message: bytes) -> tuple[int, bytes]:
    """One message from loopback ``address`` (127.0.0.0/8 is all ours): the reply to
    its end of data."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", source_address=(address, 0)) as client:
        assert client.ehlo()[0] == 250
        assert client.mail("alice@example.org") == reply_of(replies.SENDER_OK)
        assert client.rcpt("bob@example.net")[0] == 250
        return client.data(message)


def in_order(done: list[str], name: str, send: Callable[[], tuple[int, bytes]]) -> Deferred[tuple[int, bytes]]:
    """``send`` in a thread of its own; ``name`` appended to ``done`` when its reply is in."""
    replied: Deferred[tuple[int, bytes]] = Deferred()

    def sent(reply: tuple[int, bytes]) -> None:
        done.append(name)
        replied.callback(reply)

    def run() -> None:
        try:
            reply = send()
        except Exception as error:
            reactor.callFromThread(replied.errback, error)
        else:
            reactor.callFromThread(sent, reply)

    threading.Thread(target=run, daemon=True).start()
    return replied


async def until(condition: Callable[[], bool]) -> None:
    """Let the reactor run until ``condition`` holds (a safety limit, not a measure)."""
    for _ in range(3000):
        if condition():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    pytest.fail("the condition never held")


def reply_of(reply: replies.Reply) -> tuple[int, bytes]:
    return reply.code, f"{reply.enhanced} {reply.text}".encode()


def hostile_messages() -> list[bytes]:
    """The messages that froze and starved the scanner: a text line "begin 644 a",
    blanks and one character (50 KB), and ten 150 KB quoted name= parameters of ";"."""
    uuencode_trap = b"Subject: uu\r\n\r\nbegin 644 a" + b" " * 50_000 + b"x\r\n"
    name = b'Content-Type: application/octet-stream; name="' + b";" * 150_000 + b'"\r\n'
    semicolons = mail(multipart(name + b"\r\nhi\r\n"))
    return [uuencode_trap] + [semicolons] * 10


def sending(done: list[str], name: str, address: str, port: int, message: bytes) -> Deferred[tuple[int, bytes]]:
    return in_order(done, name, lambda: send_from(address, port, message))


@pytest_twisted.ensureDeferred
async def test_hostile_messages_and_a_normal_one_are_all_delivered(
    listening: list[IListeningPort], smtp_sink: SmtpSink
) -> None:
    """The issue's hostile messages from 127.0.0.1, all at once, and a normal message
    from 127.0.0.2 alongside: every one is scanned clean and reaches smtp-sink."""
    port = await guard(listening, smtp_sink, BuiltinScanner(reactor))
    done: list[str] = []
    hostile = [sending(done, "hostile", "127.0.0.1", port, message) for message in hostile_messages()]
    normal = await sending(done, "normal", "127.0.0.2", port, mail(multipart(text())))
    answers = [await each for each in hostile]
    assert normal == reply_of(replies.OK.with_text("Ok"))
    assert answers == [reply_of(replies.OK.with_text("Ok"))] * 11
    assert len(await threads.deferToThread(smtp_sink.messages, 12)) == 12


@pytest_twisted.ensureDeferred
async def test_a_client_holding_its_scan_slots_does_not_delay_another(
    listening: list[IListeningPort], smtp_sink: SmtpSink
) -> None:
    """Four scans from 127.0.0.1 that would take many seconds (two scan, two wait:
    two per client), then a normal message from 127.0.0.2: the normal one is
    delivered before any of the four is answered, and they get 451 4.7.1 at the
    3 s deadline (timed out, or no slot)."""
    scanner = BuiltinScanner(reactor, MANY_PATTERNS, timeout=3.0)
    port = await guard(listening, smtp_sink, scanner)
    slow = mail(multipart(text(), attachment(os.urandom(4 * 1024 * 1024), b"noise.bin")))
    done: list[str] = []
    hostile = [sending(done, "slow", "127.0.0.1", port, slow) for _ in range(4)]
    await until(lambda: scanner.slots.held == 2 and scanner.slots.waiting == 2)
    normal = await sending(done, "normal", "127.0.0.2", port, mail(multipart(text())))
    answers = [await each for each in hostile]
    assert done == ["normal", "slow", "slow", "slow", "slow"]
    assert normal == reply_of(replies.OK.with_text("Ok")) and answers == [reply_of(replies.SCAN_DEFERRED)] * 4
    assert len(await threads.deferToThread(smtp_sink.messages, 1)) == 1
