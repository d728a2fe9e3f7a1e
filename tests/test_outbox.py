"""The durable outbox, driven with a Clock and the in-memory next hop: atomic
writes, delivery with MAIL FROM:<>, backoff, drops, and restarts."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from smtpguard import replies
from smtpguard.envelope import BodyType
from smtpguard.notifiers.outbox import Outbox, Outcome, QueuedNotice, RetrySettings
from smtpguard.replies import Reply
from smtpguard.testing import MemoryNextHop

MESSAGE = b"From: postmaster@example.com\r\nTo: <alice@example.org>\r\nSubject: notice\r\n\r\nBody.\r\n"
TRY_LATER = Reply(451, "4.3.0", "Try again later")
NO_SUCH_USER = Reply(550, "5.1.1", "No such user")
RETRY = RetrySettings(initial=60.0, maximum=240.0, max_age=3600.0)


class Hop(MemoryNextHop):
    """The in-memory next hop, noting the Clock's time of every MAIL."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.attempts: list[float] = []
        self.answer = replies.SENDER_OK

        def mail(envelope: object) -> Reply:
            self.attempts.append(clock.seconds())
            return self.answer

        self.mail_reply = mail


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1000)
    return clock


@pytest.fixture
def hop(clock: Clock) -> Hop:
    return Hop(clock)


def outbox(clock: Clock, hop: Hop, directory: Path, retry: RetrySettings = RETRY) -> Outbox:
    return Outbox(clock, str(directory), hop, retry, hostname="guard.example.com")


def files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def header(directory: Path, notice_id: str) -> dict[str, object]:
    with (directory / f"{notice_id}.notice").open("rb") as file:
        return json.loads(file.readline())  # type: ignore[no-any-return]


def test_add_writes_one_file_with_header_and_message(clock: Clock, hop: Hop, tmp_path: Path) -> None:
    """A queued notice is one file, readable by its owner only: a JSON line with the
    recipient and schedule, then the message bytes; no temporary file is left."""
    box = outbox(clock, hop, tmp_path)
    box.start()
    notice = box.add("alice@example.org", MESSAGE, "sender", "0A1B2C3D4E5F")

    assert files(tmp_path) == [f"{notice.id}.notice"]
    path = tmp_path / f"{notice.id}.notice"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    head, _, message = path.read_bytes().partition(b"\n")
    assert json.loads(head) == {
        "format": 1,
        "id": notice.id,
        "recipient": "alice@example.org",
        "kind": "sender",
        "transaction_id": "0A1B2C3D4E5F",
        "created": 1000.0,
        "attempts": 0,
        "next_attempt": 1000.0,
        "last_reply": "",
    }
    assert message == MESSAGE


def test_add_that_cannot_rename_leaves_nothing_and_raises(
    clock: Clock, hop: Hop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write is temporary file + fsync + rename: when the rename fails, add
    raises, no notice file exists and the temporary file is gone."""
    box = outbox(clock, hop, tmp_path)
    box.start()

    def refuse(source: str, target: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="No space left"):
        box.add("alice@example.org", MESSAGE, "sender", "T1")

    assert files(tmp_path) == []
    assert box.pending() == []


def test_add_syncs_the_file_before_renaming_it(
    clock: Clock, hop: Hop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The notice's bytes are fsynced under the temporary name, then renamed, then
    the directory is fsynced."""
    box = outbox(clock, hop, tmp_path)
    box.start()
    steps: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor: int) -> None:
        steps.append("fsync " + ("directory" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "file"))
        real_fsync(descriptor)

    def replace(source: str, target: str) -> None:
        steps.append(f"rename {Path(source).name} -> {Path(target).name}")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    notice = box.add("alice@example.org", MESSAGE, "sender", "T1")

    assert steps == ["fsync file", f"rename .{notice.id}.tmp -> {notice.id}.notice", "fsync directory"]


def test_delivers_with_null_sender_and_removes_on_250(clock: Clock, hop: Hop, tmp_path: Path) -> None:
    """A due notice goes out as MAIL FROM:<>, RCPT TO the notice's recipient, DATA
    with the stored bytes; after the 250 its file is removed."""
    box = outbox(clock, hop, tmp_path)
    box.start()
    notice = box.add("alice@example.org", MESSAGE, "sender", "T1")
    outcome = box.watch(notice.id)

    clock.advance(0)

    assert hop.commands == ["MAIL ", "RCPT alice@example.org", "DATA", "QUIT"]
    [delivery] = hop.delivered
    assert delivery.envelope.sender == ""
    assert [r.address for r in delivery.envelope.recipients] == ["alice@example.org"]
    assert delivery.envelope.parameters.size == len(MESSAGE)
    assert delivery.envelope.parameters.body is None
    assert delivery.data == MESSAGE
    assert outcome.result == Outcome.DELIVERED
    assert files(tmp_path) == []
    assert box.pending() == []


def test_8bit_notice_is_sent_with_body_8bitmime(clock: Clock, hop: Hop, tmp_path: Path) -> None:
    """A notice that is not 7-bit declares BODY=8BITMIME."""
    box = outbox(clock, hop, tmp_path)
    box.start()
    box.add("j\u00f6rg@example.org", "Subject: \u00e9\r\n\r\n".encode(), "admin", "T1")

    clock.advance(0)

    [delivery] = hop.delivered
    assert delivery.envelope.parameters.body is BodyType.EIGHT_BIT_MIME
    assert delivery.envelope.parameters.smtputf8 is True


def test_nothing_is_sent_before_start(clock: Clock, hop: Hop, tmp_path: Path) -> None:
    """Notices added before start wait on disk; start sends them."""
    box = outbox(clock, hop, tmp_path)
    box.add("alice@example.org", MESSAGE, "sender", "T1")
    clock.advance(100)
    assert hop.commands == []

    box.start()
    clock.advance(0)

    assert len(hop.delivered) == 1


def test_backoff_doubles_up_to_the_maximum(clock: Clock, hop: Hop, tmp_path: Path) -> None:
    """While the next hop answers 4xx, attempts come 60 s after the first, then
    doubling (120, 240) and capped at retry_max (240)."""
    hop.answer = TRY_LATER
    box = outbox(clock, hop, tmp_path)
    box.start()
    box.add("alice@example.org", MESSAGE, "sender", "T1")

    clock.advance(0)
    for _ in range(6 * 240):
        clock.advance(1)

    assert [t - 1000 for t in hop.attempts] == [0, 60, 180, 420, 660, 900, 1140, 1380]
    assert len(box.pending()) == 1


def test_retry_state_is_persisted(clock: Clock, hop: Hop, tmp_path: Path) -> None:
    """After a 4xx the file records the attempt count, the next attempt's time and
    the reply."""
    hop.answer = TRY_LATER
    box = outbox(clock, hop, tmp_path)
    box.start()
    notice = box.add("alice@example.org", MESSAGE, "sender", "T1")
    outcome = box.watch(notice.id)
    clock.advance(0)
    clock.advance(60)

    assert outcome.result == Outcome.RETRY
    saved = header(tmp_path, notice.id)
    assert (saved["attempts"], saved["next_attempt"], saved["last_reply"]) == (2, 1180.0, "451 4.3.0 Try again later")
    assert (tmp_path / f"{notice.id}.notice").read_bytes().endswith(b"\n" + MESSAGE)


def test_connection_failure_is_retried(clock: Clock, hop: Hop, tmp_path: Path) -> None:
    """An unreachable next hop (the upstream's 451 4.4.1) keeps the notice for later."""
    hop.answer = replies.UPSTREAM_UNAVAILABLE
    box = outbox(clock, hop, tmp_path)
    box.start()
    notice = box.add("alice@example.org", MESSAGE, "sender", "T1")
    outcome = box.watch(notice.id)

    clock.advance(0)

    assert outcome.result == Outcome.RETRY
    assert [n.id for n in box.pending()] == [notice.id]
    assert box.pending()[0].next_attempt == 1060.0


def test_a_next_hop_that_raises_is_retried(clock: Clock, hop: Hop, tmp_path: Path) -> None:
    """A next hop breaking its contract (raising instead of replying) counts as a
    temporary failure: the notice stays for the next attempt."""

    def broken(envelope: object) -> Reply:
        raise RuntimeError("bug in a next hop")

    hop.mail_reply = broken
    box = outbox(clock, hop, tmp_path)
    box.start()
    notice = box.add("alice@example.org", MESSAGE, "sender", "T1")
    outcome = box.watch(notice.id)

    clock.advance(0)

    assert outcome.result == Outcome.RETRY
    assert header(tmp_path, notice.id)["last_reply"] == "451 4.3.0 Local error in processing, try again later"


def test_5xx_drops_the_notice(clock: Clock, hop: Hop, tmp_path: Path) -> None:
    """A 5xx to RCPT drops the notice: its file is removed and it is not tried again."""
    hop.rcpt_reply = lambda recipient: NO_SUCH_USER
    box = outbox(clock, hop, tmp_path)
    box.start()
    notice = box.add("alice@example.org", MESSAGE, "sender", "T1")
    outcome = box.watch(notice.id)

    clock.advance(0)
    clock.advance(RETRY.max_age)

    assert outcome.result == Outcome.DROPPED
    assert hop.commands == ["MAIL ", "RCPT alice@example.org", "RSET", "QUIT"]
    assert files(tmp_path) == []


def test_5xx_at_end_of_data_drops_the_notice(clock: Clock, hop: Hop, tmp_path: Path) -> None:
    """A 5xx to the message drops the notice as well."""
    hop.data_reply = Reply(554, "5.6.0", "Content refused")
    box = outbox(clock, hop, tmp_path)
    box.start()
    notice = box.add("alice@example.org", MESSAGE, "sender", "T1")
    outcome = box.watch(notice.id)

    clock.advance(0)

    assert outcome.result == Outcome.DROPPED
    assert files(tmp_path) == []


def test_max_age_drops_the_notice(clock: Clock, hop: Hop, tmp_path: Path) -> None:
    """A notice still deferred when it reaches max_age is dropped after one last
    attempt at that age."""
    hop.answer = TRY_LATER
    retry = RetrySettings(initial=60.0, maximum=240.0, max_age=300.0)
    box = outbox(clock, hop, tmp_path, retry)
    box.start()
    notice = box.add("alice@example.org", MESSAGE, "sender", "T1")
    clock.advance(0)
    for _ in range(180):
        clock.advance(1)
    assert box.pending()[0].next_attempt == 1300.0
    outcome = box.watch(notice.id)
    for _ in range(120):
        clock.advance(1)

    assert [t - 1000 for t in hop.attempts] == [0, 60, 180, 300]
    assert outcome.result == Outcome.EXPIRED
    assert files(tmp_path) == []
    assert box.pending() == []


def test_restart_loads_and_sends(clock: Clock, hop: Hop, tmp_path: Path) -> None:
    """A notice queued by one outbox is delivered by a new outbox on the same
    directory once it starts."""
    first = outbox(clock, hop, tmp_path)
    first.start()
    first.stop()
    notice = first.add("alice@example.org", MESSAGE, "admin", "T1")

    second_hop = Hop(clock)
    second = outbox(clock, second_hop, tmp_path)
    second.start()
    assert [n.id for n in second.pending()] == [notice.id]
    clock.advance(0)

    assert hop.delivered == []
    assert [d.data for d in second_hop.delivered] == [MESSAGE]
    assert files(tmp_path) == []


def test_restart_keeps_the_schedule(clock: Clock, hop: Hop, tmp_path: Path) -> None:
    """A deferred notice loaded after a restart keeps its attempt count and is not
    tried before its next attempt time."""
    hop.answer = TRY_LATER
    first = outbox(clock, hop, tmp_path)
    first.start()
    notice = first.add("alice@example.org", MESSAGE, "sender", "T1")
    clock.advance(0)
    first.stop()

    second_hop = Hop(clock)
    second_hop.answer = TRY_LATER
    second = outbox(clock, second_hop, tmp_path)
    second.start()
    clock.advance(59)
    assert second_hop.attempts == []
    clock.advance(1)

    assert second_hop.attempts == [1060.0]
    assert header(tmp_path, notice.id)["attempts"] == 2


def test_start_removes_interrupted_writes_and_sets_corrupt_files_aside(clock: Clock, hop: Hop, tmp_path: Path) -> None:
    """At start a leftover temporary file (a crash mid-write) is removed and a file
    that is not a notice is renamed to .corrupt; neither is sent."""
    (tmp_path / ".abc.tmp").write_bytes(b'{"format": 1')
    (tmp_path / "def.notice").write_bytes(b"garbage\n" + MESSAGE)
    box = outbox(clock, hop, tmp_path)

    box.start()
    clock.advance(0)

    assert files(tmp_path) == ["def.notice.corrupt"]
    assert hop.commands == []


def test_start_creates_the_directory(clock: Clock, hop: Hop, tmp_path: Path) -> None:
    """A missing outbox directory is created at start, private to its owner."""
    directory = tmp_path / "spool" / "outbox"
    outbox(clock, hop, directory).start()

    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_one_delivery_at_a_time(clock: Clock, hop: Hop, tmp_path: Path) -> None:
    """With two notices due, the second's MAIL waits until the first is done."""
    hop.hold = True
    box = outbox(clock, hop, tmp_path)
    box.start()
    box.add("alice@example.org", MESSAGE, "sender", "T1")
    clock.advance(1)  # the first now waits for the hop; the second is due
    box.add("security@example.com", MESSAGE, "admin", "T1")

    clock.advance(10)
    assert hop.commands == ["MAIL "]
    hop.release()  # MAIL's reply, then RCPT's and DATA's as they come
    assert hop.commands == ["MAIL ", "RCPT alice@example.org", "DATA", "QUIT"]

    clock.advance(0)
    hop.release()

    assert [d.envelope.recipients[0].address for d in hop.delivered] == ["alice@example.org", "security@example.com"]


def test_stop_waits_for_the_attempt_under_way(clock: Clock, hop: Hop, tmp_path: Path) -> None:
    """stop() fires once the attempt under way has ended, and nothing more is sent."""
    hop.hold = True
    box = outbox(clock, hop, tmp_path)
    box.start()
    box.add("alice@example.org", MESSAGE, "sender", "T1")
    clock.advance(1)  # the first now waits for the hop; the second is due
    box.add("security@example.com", MESSAGE, "admin", "T1")

    stopped = box.stop()
    assert not stopped.called
    hop.release()
    clock.advance(100)

    assert stopped.called
    assert len(hop.delivered) == 1
    assert [n.recipient for n in box.pending()] == ["security@example.com"]


def test_queued_notice_header_round_trips() -> None:
    """The JSON line of a notice parses back to the same notice."""
    notice = QueuedNotice("abc", "alice@example.org", "sender", "T1", 1.5, 3, 99.0, "451 4.4.1 Later")

    assert QueuedNotice.parse(notice.header()) == notice


def test_retry_delay() -> None:
    """The delay after n failures: initial * 2**(n-1), at most maximum."""
    retry = RetrySettings(initial=60.0, maximum=3600.0)

    assert [retry.delay(n) for n in (1, 2, 3, 6, 7, 100, 10**6)] == [60, 120, 240, 1920, 3600, 3600, 3600]
