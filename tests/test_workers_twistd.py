"""``twistd -n smtpguard --workers 2`` for real: a supervisor and two worker
processes sharing one listening socket, relaying smtplib's mail to Postfix's
smtp-sink or to a strict next hop that holds its replies.

Which worker takes a connection is the kernel's choice; to make it the test's,
the other worker is stopped (SIGSTOP) while the connection is made."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import threads
from twisted.internet.task import Clock
from twisted.logger import eventsFromJSONLogFile

from smtpguard.notifiers.outbox import Outbox
from smtpguard.replies import SHUTTING_DOWN, Reply
from smtpguard.testing import MemoryNextHop
from tests.conftest import SmtpSink, free_port, http_get
from tests.strict_hop import StrictHop
from tests.test_twistd import LAUNCHERS, RECIPIENT, SENDER, Running, Starter, send
from tests.test_twistd import smtpguard as smtpguard  # the fixture

STARTED = re.compile(r"\[smtpguard\.workers#info\] worker (\d) started, pid (\d+)")


def start(smtpguard: Starter, upstream: str, *options: str) -> tuple[Running, dict[int, int]]:
    """smtpguard with two workers and the built-in scanner; the workers' pids by number."""
    port = free_port()
    listen = ["--listen", f"tcp:{port}:interface=127.0.0.1"]
    running = smtpguard(
        LAUNCHERS["twistd"],
        *listen,
        "--upstream",
        upstream,
        "--scanner",
        "builtin",
        "--workers",
        "2",
        *options,
        port=port,
    )
    text = wait_for(running, lambda text: all(ready(text, n) for n in (1, 2)), "two workers ready")
    return running, workers(text)


def ready(text: str, number: int) -> bool:
    return f"[worker {number} smtpguard.workers#info] worker {number} ready" in text


def workers(text: str) -> dict[int, int]:
    """The latest pid of each worker the supervisor logged as started."""
    return {int(number): int(pid) for number, pid in STARTED.findall(text)}


def wait_for(running: Running, condition: Callable[[str], bool], what: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = running.text()
        if condition(text):
            return text
        time.sleep(0.05)
    pytest.fail(f"no {what} within {timeout} s:\n{running.text()}")


@contextmanager
def only(pids: dict[int, int], number: int) -> Iterator[None]:
    """Every worker but ``number`` stopped (SIGSTOP), so that it takes the connections."""
    others = [pid for other, pid in pids.items() if other != number]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


def relayed(text: str, number: int) -> int:
    return len(
        re.findall(rf"\[worker {number} smtpguard\.transaction#info\] .* action=deliver reply=\(250 ", text)
    )


def test_both_workers_take_sessions_and_every_message_is_delivered(smtpguard: Starter, smtp_sink: SmtpSink) -> None:
    """40 messages from 8 concurrent smtplib clients all reach smtp-sink; with the
    other worker stopped, worker 1 relays a message, then worker 2 another: each
    process accepts on the shared socket and relays."""
    running, pids = start(smtpguard, smtp_sink.endpoint)

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda i: send(running.port, f"load {i}")[1], range(40)))
    assert outcomes == [{}] * 40
    assert len(smtp_sink.messages(40, timeout=20)) == 40

    total = lambda text: relayed(text, 1) + relayed(text, 2)  # noqa: E731
    text = wait_for(running, lambda text: total(text) == 40, "40 relays logged")
    for number in (1, 2):
        before = relayed(text, number)
        with only(pids, number):
            assert send(running.port, f"to worker {number}")[1] == {}
        text = wait_for(running, lambda text, n=number: total(text) == 40 + n, f"worker {number}'s relay")
        assert relayed(text, number) == before + 1
    assert len(smtp_sink.messages(42, timeout=20)) == 42
    assert workers(running.text()) == pids


def test_a_killed_worker_is_started_again_and_mail_keeps_flowing(smtpguard: Starter, smtp_sink: SmtpSink) -> None:
    """Worker 1 killed with SIGKILL: the supervisor logs it and starts a new worker 1;
    meanwhile worker 2 relays, and then the new worker 1 relays too."""
    running, pids = start(smtpguard, smtp_sink.endpoint)

    os.kill(pids[1], signal.SIGKILL)
    assert send(running.port, "while worker 1 is down")[1] == {}
    text = wait_for(running, lambda text: workers(text)[1] != pids[1], "new worker 1")
    assert f"[smtpguard.workers#error] worker 1 (pid {pids[1]}) was killed by signal 9" in text
    new = workers(text)
    wait_for(running, lambda text: ready(text.split(f"pid {new[1]}")[-1], 1), "the new worker 1 ready")

    with only(new, 1):
        assert send(running.port, "to the new worker 1")[1] == {}
    assert len(smtp_sink.messages(2, timeout=20)) == 2
    wait_for(running, lambda text: relayed(text.split(f"pid {new[1]}")[-1], 1) == 1, "the new worker 1's relay")


def test_sighup_reaches_both_workers(smtpguard: Starter, smtp_sink: SmtpSink) -> None:
    """SIGHUP to the supervisor is passed on: each worker logs it and keeps running."""
    running, pids = start(smtpguard, smtp_sink.endpoint)

    running.process.send_signal(signal.SIGHUP)
    text = wait_for(
        running,
        lambda text: all(re.search(rf"\[worker {n} smtpguard\.workers#\w+\] SIGHUP received", text) for n in (1, 2)),
        "SIGHUP in both workers",
    )
    assert "[smtpguard.workers#info] SIGHUP: passing it on to 2 worker(s)" in text
    assert send(running.port, "after SIGHUP")[1] == {}
    assert workers(running.text()) == pids
    assert all(os.path.exists(f"/proc/{pid}") for pid in pids.values())


def test_workers_stop_when_the_supervisor_is_gone(smtpguard: Starter, smtp_sink: SmtpSink) -> None:
    """Killing the supervisor with SIGKILL leaves no worker behind: each sees the end
    of its stdin and stops, and the port is closed."""
    running, pids = start(smtpguard, smtp_sink.endpoint)

    running.process.kill()
    running.process.wait(10)
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [_alive(pid) for pid in pids.values()] == [False, False]
    with pytest.raises(ConnectionRefusedError):
        smtplib.SMTP("127.0.0.1", running.port, timeout=5)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped by init, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def relay_then_quit(port: int, subject: str) -> tuple[dict[str, tuple[int, bytes]], tuple[int, bytes]]:
    """The recipients refused at the end of data, and the reply to QUIT."""
    message = f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: {subject}\r\n\r\nHello.\r\n".encode()
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=60)
    try:
        refused = client.sendmail(SENDER, [RECIPIENT], message)
        return refused, client.docmd("QUIT")
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_sigterm_drains_both_workers(smtpguard: Starter, strict_hop: StrictHop) -> None:
    """SIGTERM to the supervisor while each worker has a message with the next hop,
    which holds its final reply: both clients still get 250 once the hop says 250
    (then 421 4.3.2), both workers then stop without being killed, and so does the
    supervisor."""
    strict_hop.gates.end_of_data.close()
    running, pids = await threads.deferToThread(start, smtpguard, strict_hop.endpoint)
    replies = []
    for number in (1, 2):
        with only(pids, number):
            replies.append(threads.deferToThread(relay_then_quit, running.port, f"held in worker {number}"))
            await strict_hop.gates.end_of_data.wait(number)

    running.process.terminate()
    await threads.deferToThread(
        wait_for,
        running,
        lambda text: all(f"[worker {n} twisted.internet.base#info] Received SIGTERM" in text for n in (1, 2)),
        "SIGTERM in both workers",
    )
    assert running.process.poll() is None
    strict_hop.gates.end_of_data.release()

    shutting_down = (
        SHUTTING_DOWN.code,
        f"{SHUTTING_DOWN.enhanced} {SHUTTING_DOWN.text}".encode(),
    )
    assert [await reply for reply in replies] == [({}, shutting_down)] * 2
    assert len(strict_hop.queued) == 2
    status = await threads.deferToThread(running.process.wait, 30)
    text = running.text()
    assert status == -signal.SIGTERM  # twistd ends by the signal it was stopped with
    for number in (1, 2):
        assert f"[smtpguard.workers#info] worker {number} (pid {pids[number]}) was killed by signal 15" in text
    assert "did not stop" not in text


def monitored(tmp_path: Path, smtpguard: Starter, smtp_sink: SmtpSink) -> tuple[Running, dict[int, int], int, Path]:
    """Two workers with [metrics] listen on a free loopback port and the JSON
    transaction log in a file: the metrics port and the file."""
    metrics = free_port()
    log = tmp_path / "transactions.json"
    config = tmp_path / "monitored.toml"
    config.write_text(
        f'[metrics]\nlisten = "tcp:{metrics}:interface=127.0.0.1"\n[logging]\nformat = "json"\nfile = "{log}"\n',
        encoding="utf-8",
    )
    running, pids = start(smtpguard, smtp_sink.endpoint, "--config", str(config))
    return running, pids, metrics, log


def transactions(log: Path) -> list[dict[str, Any]]:
    with log.open(encoding="utf-8") as handle:
        return list(eventsFromJSONLogFile(handle))


def test_supervisor_serves_each_workers_metrics_and_writes_every_transaction_once(
    tmp_path: Path, smtpguard: Starter, smtp_sink: SmtpSink
) -> None:
    """3 messages through worker 1 and 2 through worker 2: the supervisor's /metrics
    has smtpguard_messages_total 3 with worker="1" and 2 with worker="2" (their
    sum, 5, the messages sent), smtpguard_workers 2; its JSON transaction log has
    one event per message, each with its worker's number."""
    running, pids, metrics, log = monitored(tmp_path, smtpguard, smtp_sink)
    sent = {1: 3, 2: 2}

    for number, count in sent.items():
        with only(pids, number):
            for index in range(count):
                assert send(running.port, f"worker {number} message {index}")[1] == {}
    assert len(smtp_sink.messages(5, timeout=20)) == 5
    wait_for(running, lambda text: len(transactions(log)) >= 5, "5 events in the transaction log")

    events = transactions(log)
    assert len(events) == 5
    assert sorted(event["smtpguard_worker"] for event in events) == [1, 1, 1, 2, 2]
    assert [event["action"] for event in events] == ["deliver"] * 5
    status, text = http_get(metrics, "/metrics")
    assert status == 200
    families = {family.name: family for family in text_string_to_metric_families(text)}
    messages = {
        (sample.labels["worker"], sample.labels["verdict"], sample.labels["action"]): sample.value
        for sample in families["smtpguard_messages"].samples
        if sample.name == "smtpguard_messages_total"
    }
    assert messages == {("1", "clean", "deliver"): 3.0, ("2", "clean", "deliver"): 2.0}
    assert sum(messages.values()) == 5
    assert [sample.value for sample in families["smtpguard_workers"].samples] == [2.0]
    assert workers(running.text()) == pids


def test_supervisor_answers_healthz_and_readyz_for_its_workers(
    tmp_path: Path, smtpguard: Starter, smtp_sink: SmtpSink
) -> None:
    """With both workers ready and smtp-sink up, the supervisor answers /healthz
    200 ok and /readyz 200 ready; no worker restarted for want of the metrics port."""
    running, pids, metrics, _ = monitored(tmp_path, smtpguard, smtp_sink)

    assert http_get(metrics, "/healthz") == (200, "ok\n")
    assert http_get(metrics, "/readyz") == (200, "ready\n")
    assert "address already in use" not in running.text()
    assert workers(running.text()) == pids


def test_sighup_to_the_supervisor_reopens_the_transaction_log_after_rotation(
    tmp_path: Path, smtpguard: Starter, smtp_sink: SmtpSink
) -> None:
    """The file moved away (as logrotate does) and SIGHUP sent to the supervisor:
    the next message's event goes into a new file at the configured path, the
    earlier one stays in the moved file."""
    running, _, _, log = monitored(tmp_path, smtpguard, smtp_sink)
    assert send(running.port, "before rotation")[1] == {}
    wait_for(running, lambda text: log.exists() and len(transactions(log)) == 1, "the first event in the file")

    log.rename(tmp_path / "transactions.json.1")
    running.process.send_signal(signal.SIGHUP)
    wait_for(running, lambda text: log.exists(), "the file reopened")
    assert send(running.port, "after rotation")[1] == {}
    wait_for(running, lambda text: len(transactions(log)) == 1, "the second event in the new file")

    assert len(transactions(tmp_path / "transactions.json.1")) == 1
    assert len(smtp_sink.messages(2, timeout=20)) == 2


def queue_notices(directory: Path, recipients: list[str]) -> None:
    """A notice to each of ``recipients`` written into the outbox ``directory``, due
    now, as a smtpguard that stopped before sending them leaves them."""
    directory.mkdir(mode=0o700)
    clock = Clock()
    clock.advance(time.time())
    outbox = Outbox(clock, str(directory), MemoryNextHop())
    for index, recipient in enumerate(recipients):
        message = f"From: <postmaster@example.com>\r\nTo: <{recipient}>\r\nSubject: notice {index}\r\n\r\nx\r\n"
        outbox.add(recipient, message.encode(), "admin", f"T{index}")


def wait_until_empty(directory: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while any(directory.glob("*.notice")):
        if time.monotonic() > deadline:
            pytest.fail(f"notices still in {directory} after {timeout} s: {sorted(directory.iterdir())}")
        time.sleep(0.05)


@pytest_twisted.ensureDeferred
async def test_two_workers_send_each_queued_notice_once(
    tmp_path: Path, smtpguard: Starter, strict_hop: StrictHop
) -> None:
    """Ten notices wait in the outbox both workers load at start.  The strict next
    hop holds its final reply until two notices are at that point at once (one
    per worker: each sends one at a time), then answers the first with 451 and
    every other with 250.  Each notice is queued by the hop exactly once, the
    refused one too, which one of the workers tried again after retry_initial;
    the outbox is left empty."""
    outbox = tmp_path / "outbox"
    recipients = [f"n{index}@example.org" for index in range(10)]
    queue_notices(outbox, recipients)
    config = tmp_path / "notices.toml"
    config.write_text(f'[notifications]\noutbox = "{outbox}"\nretry_initial = 1\n', encoding="utf-8")
    strict_hop.gates.end_of_data.close()

    await threads.deferToThread(start, smtpguard, strict_hop.endpoint, "--config", str(config))
    await strict_hop.gates.end_of_data.wait(2)
    strict_hop.final_reply = Reply(451, "4.3.0", "Try again later")
    strict_hop.gates.end_of_data.release(1)
    strict_hop.final_reply = None
    strict_hop.gates.end_of_data.open()
    # A notice's file is removed after the hop's 250: once none is left, no
    # delivery is under way.
    await threads.deferToThread(wait_until_empty, outbox)

    assert sorted(message.recipients for message in strict_hop.queued) == [(r,) for r in recipients]
    assert [message.sender for message in strict_hop.queued] == [""] * len(recipients)
    [refused] = strict_hop.refused
    assert refused.recipients[0] in recipients
