"""One outbox directory shared by several processes (smtpguard's workers), driven
with a Clock: each attempt holds the notice's flock, reads its state again, and a
notice another process ended is forgotten quietly; the directory is looked
through again every ``rescan`` seconds.

Two :class:`Outbox` instances stand for two processes: flock locks belong to open
files, so two instances in one process exclude each other as two processes do."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from smtpguard import replies
from smtpguard.notifiers.outbox import Outbox, Outcome, RetrySettings
from tests.test_outbox import MESSAGE, RETRY, TRY_LATER, Hop, files, header

RESCAN = 30.0


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1000)
    return clock


def process(clock: Clock, directory: Path, retry: RetrySettings = RETRY) -> tuple[Outbox, Hop]:
    """An outbox on ``directory`` as one process has it, with its own next hop."""
    hop = Hop(clock)
    return Outbox(clock, str(directory), hop, retry, hostname="guard.example.com", rescan=RESCAN), hop


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """``path`` held with an exclusive flock, as a process attempting it holds it."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def sent_once_at(when: float, clock: Clock, hop: Hop, directory: Path) -> None:
    """Nothing reaches ``hop`` until the Clock says ``when``; then the notice is
    sent, once, and its file removed."""
    clock.advance(when - 1 - clock.seconds())
    assert hop.commands == []
    clock.advance(1)
    assert hop.attempts == [when]
    assert [d.data for d in hop.delivered] == [MESSAGE]
    assert files(directory) == []


def test_a_notice_another_process_is_attempting_is_not_sent_and_is_forgotten_once_sent(
    clock: Clock, tmp_path: Path
) -> None:
    """While A waits for the next hop's reply to a notice, B (which loaded it at its
    rescan) does not send it; once A has delivered it, B forgets it with an info
    line and its watcher hears GONE: one delivery, by A."""
    a, hop_a = process(clock, tmp_path)
    b, hop_b = process(clock, tmp_path)
    a.start()
    b.start()
    hop_a.hold = True
    notice = a.add("alice@example.org", MESSAGE, "sender", "T1")
    clock.advance(0)
    assert hop_a.commands == ["MAIL "]

    clock.advance(RESCAN)
    assert [n.id for n in b.pending()] == [notice.id]
    outcome = b.watch(notice.id)
    clock.advance(0)
    assert hop_b.commands == []
    hop_a.release()
    with capturedLogs() as events:
        clock.advance(RESCAN)

    assert [d.data for d in hop_a.delivered] == [MESSAGE]
    assert hop_b.commands == []
    assert outcome.result == Outcome.GONE
    assert b.pending() == []
    assert [event["log_level"] for event in events] == [LogLevel.info]
    assert "no longer in the outbox (ended by another process); forgotten" in events[0]["log_format"]
    assert files(tmp_path) == []


def test_a_notice_locked_elsewhere_is_tried_again_rescan_seconds_later(clock: Clock, tmp_path: Path) -> None:
    """A due notice whose file another process holds is not attempted; once that
    process lets go (it ended, or died: the kernel releases its locks) the notice
    is sent ``rescan`` seconds after the attempt that found it held."""
    queued, _ = process(clock, tmp_path)
    notice = queued.add("alice@example.org", MESSAGE, "sender", "T1")
    b, hop_b = process(clock, tmp_path)

    with locked(tmp_path / f"{notice.id}.notice"):
        b.start()
        clock.advance(0)
        assert hop_b.commands == []
        assert b.pending()[0].next_attempt == 1000 + RESCAN

    sent_once_at(1000 + RESCAN, clock, hop_b, tmp_path)


def test_a_notice_deferred_by_another_process_keeps_that_schedule(clock: Clock, tmp_path: Path) -> None:
    """A and B both load a due notice at start; A tries first and gets 451, so B,
    reading the file again once it holds it, finds the attempt counted and the next
    one 60 s away and sends nothing; at that time A (whose timer came first)
    delivers it and B forgets it: two attempts in all, one delivery."""
    queued, _ = process(clock, tmp_path)
    notice = queued.add("alice@example.org", MESSAGE, "sender", "T1")
    a, hop_a = process(clock, tmp_path)
    b, hop_b = process(clock, tmp_path)
    hop_a.answer = TRY_LATER
    a.start()
    b.start()

    clock.advance(0)
    assert hop_a.attempts == [1000.0]
    assert hop_b.attempts == []
    [known] = b.pending()
    assert (known.attempts, known.next_attempt, known.last_reply) == (1, 1060.0, "451 4.3.0 Try again later")
    hop_a.answer = replies.SENDER_OK
    outcome = b.watch(notice.id)
    clock.advance(60)

    assert hop_a.attempts == [1000.0, 1060.0]
    assert [d.data for d in hop_a.delivered] == [MESSAGE]
    assert hop_b.attempts == []
    assert outcome.result == Outcome.GONE
    assert files(tmp_path) == []


def test_a_notice_queued_by_another_process_is_sent_at_the_next_rescan(clock: Clock, tmp_path: Path) -> None:
    """A notice written by a process that never sends it (it died right after) is
    loaded by a running process at its next rescan and sent then."""
    b, hop_b = process(clock, tmp_path)
    b.start()
    dead, _ = process(clock, tmp_path)
    dead.add("alice@example.org", MESSAGE, "admin", "T1")

    sent_once_at(1000 + RESCAN, clock, hop_b, tmp_path)


def test_the_notices_of_three_processes_are_each_sent_once_by_the_one_started_after_them(
    clock: Clock, tmp_path: Path
) -> None:
    """Fewer processes after a restart: the notices that three processes queued
    and never sent (one of them deferred once) are all sent, each once, by the
    one process started afterwards."""
    recipients = []
    for number in range(3):
        earlier, hop = process(clock, tmp_path)
        hop.answer = TRY_LATER
        earlier.start()
        recipients.append(f"n{number}@example.org")
        earlier.add(recipients[-1], MESSAGE, "sender", f"T{number}")
        if number == 0:
            clock.advance(0)  # deferred once, to 1060
        earlier.stop()
    later, hop_later = process(clock, tmp_path)
    later.start()

    clock.advance(0)
    clock.advance(60)

    assert sorted(d.envelope.recipients[0].address for d in hop_later.delivered) == recipients
    assert hop_later.attempts == [1000.0, 1000.0, 1060.0]
    assert files(tmp_path) == []


def test_a_temporary_file_another_process_is_writing_is_left_alone(clock: Clock, tmp_path: Path) -> None:
    """A ``.tmp`` file whose writer holds its lock is not removed at start (it is a
    write under way, not one a crash interrupted); once let go, the next rescan
    removes it."""
    temporary = tmp_path / ".abc.tmp"
    temporary.write_bytes(b'{"format": 1')
    b, _ = process(clock, tmp_path)

    with locked(temporary):
        b.start()
        assert files(tmp_path) == [".abc.tmp"]
    clock.advance(RESCAN)

    assert files(tmp_path) == []


def test_a_retry_written_elsewhere_keeps_the_file_and_schedule_on_disk(clock: Clock, tmp_path: Path) -> None:
    """B, told of a notice at a rescan while A holds it and then defers it, leaves
    A's record alone: the file says one attempt, the next at A's time."""
    a, hop_a = process(clock, tmp_path)
    b, hop_b = process(clock, tmp_path)
    a.start()
    b.start()
    hop_a.hold = True
    hop_a.answer = TRY_LATER
    notice = a.add("alice@example.org", MESSAGE, "sender", "T1")
    clock.advance(0)
    clock.advance(RESCAN)  # B loads it (due) and finds it held
    hop_a.release()

    assert hop_b.commands == []
    saved = header(tmp_path, notice.id)
    assert (saved["attempts"], saved["next_attempt"]) == (1, 1000 + RESCAN + 60)
