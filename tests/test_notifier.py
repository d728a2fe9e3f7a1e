"""The notifier: which notices an incident gets, that they are on disk before
notify() fires, that notify() never fails; its builder from [notifications];
and end to end through the upstream client to real next hops (smtp-sink and the
capture target), one of them down at first."""

from __future__ import annotations

import email
import email.policy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from zope.interface.verify import verifyObject

from smtpguard.capture import capture_factory
from smtpguard.config import ConfigError
from smtpguard.envelope import Client, Envelope, MailParameters, Notify, Recipient, RecipientParameters
from smtpguard.incident import Incident, Relayed
from smtpguard.interfaces import INotifier, IRelayedNotifier
from smtpguard.notifiers import NotifierService, Outcome, build_notifier
from smtpguard.notifiers.notifier import Notifier
from smtpguard.replies import Reply
from smtpguard.results import Action, Decision, Notice, ScanResult, Threat
from smtpguard.testing import MemoryNextHop
from smtpguard.upstream import Upstream, UpstreamSettings
from tests.conftest import SmtpSink, free_port

SENDER = "alice@example.org"
ADMIN = "security@example.com"
HEADERS = (
    b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: invoice\r\nMessage-ID: <i.1@example.org>\r\n"
)
BOTH = frozenset({Notice.SENDER, Notice.ADMIN})


def incident(
    notices: frozenset[Notice] = BOTH,
    sender: str = SENDER,
    recipients: tuple[Recipient, ...] = (Recipient("bob@example.net"),),
    envid: str | None = "ENV-42",
) -> Incident:
    """An incident as the pipeline builds it, by hand: a virus, the body replaced."""
    client = Client("192.0.2.7", 40001, "192.0.2.1", 25, helo="client.example", hostname="guard.test")
    envelope = Envelope(client, sender, MailParameters(envid=envid), recipients)
    result = ScanResult.infected((Threat("Eicar-Test-Signature", "eicar.com"),), "builtin")
    decision = Decision(Action.REPLACE, reason="virus Eicar-Test-Signature", notices=notices)
    return Incident("0A1B2C3D4E5F", envelope, result, decision, HEADERS, 1700000000.0, "invoice")


def table(directory: Path, **keys: Any) -> dict[str, Any]:
    return {"from": "postmaster@example.com", "admin": ADMIN, "outbox": str(directory), **keys}


def notifier_on_clock(directory: Path, **keys: Any) -> tuple[Notifier, MemoryNextHop, Clock]:
    clock = Clock()
    hop = MemoryNextHop()
    notifier = build_notifier(table(directory, **keys), hop, "guard.test", clock)
    notifier.start()
    return notifier, hop, clock


def queued(directory: Path) -> list[tuple[str, bytes]]:
    """(recipient, message) of every notice file in the outbox, sorted by recipient."""
    found = []
    for path in directory.glob("*.notice"):
        head, _, message = path.read_bytes().partition(b"\n")
        found.append((json.loads(head)["recipient"], message))
    return sorted(found)


# -- which notices, queued before notify() fires ---------------------------------------


def test_notifier_provides_inotifier(tmp_path: Path) -> None:
    """The notifier provides INotifier and IRelayedNotifier."""
    notifier, _, _ = notifier_on_clock(tmp_path)

    assert verifyObject(INotifier, notifier)
    assert verifyObject(IRelayedNotifier, notifier)


def test_relayed_queues_the_relayed_dsn_on_disk_before_firing(tmp_path: Path) -> None:
    """relayed() has written the relayed DSN to the sender into the outbox, as a
    notice of kind "relayed", when its Deferred fires."""
    notifier, hop, _ = notifier_on_clock(tmp_path)
    owed = (Recipient("bob@example.net", RecipientParameters(notify=frozenset({Notify.SUCCESS}))),)

    done = notifier.relayed(incident(recipients=owed), Relayed(owed, Reply(250, "2.0.0", "Ok"), "192.0.2.25"))

    assert done.called and done.result is None
    assert hop.commands == []
    [(recipient, dsn)] = queued(tmp_path)
    assert recipient == SENDER
    status = email.message_from_bytes(dsn).get_payload()[1].get_payload()[1]
    assert (status["Action"], status["Status"], status["Remote-MTA"]) == ("relayed", "2.0.0", "dns; 192.0.2.25")
    [path] = tmp_path.glob("*.notice")
    assert json.loads(path.read_bytes().partition(b"\n")[0])["kind"] == "relayed"


def test_no_relayed_dsn_to_the_null_sender(tmp_path: Path) -> None:
    """relayed() for the null sender queues nothing."""
    notifier, _, _ = notifier_on_clock(tmp_path)
    owed = (Recipient("bob@example.net", RecipientParameters(notify=frozenset({Notify.SUCCESS}))),)

    notifier.relayed(incident(sender="", recipients=owed), Relayed(owed, Reply(250, "2.0.0", "Ok")))

    assert queued(tmp_path) == []


def test_notify_queues_both_notices_on_disk_before_firing(tmp_path: Path) -> None:
    """notify() for a decision with SENDER and ADMIN has written a DSN to the sender
    and a notice to the admin into the outbox when its Deferred fires, before any
    delivery."""
    notifier, hop, _ = notifier_on_clock(tmp_path)

    done = notifier.notify(incident())

    assert done.called and done.result is None
    assert hop.commands == []
    [(sender, dsn), (admin, notice)] = queued(tmp_path)
    assert (sender, admin) == (SENDER, ADMIN)
    assert email.message_from_bytes(dsn).get_content_type() == "multipart/report"
    assert email.message_from_bytes(notice).get_content_type() == "text/plain"


def test_notify_sends_only_what_the_decision_asks_for(tmp_path: Path) -> None:
    """A decision with only ADMIN gets the admin notice and no DSN."""
    notifier, _, _ = notifier_on_clock(tmp_path)

    notifier.notify(incident(frozenset({Notice.ADMIN})))

    assert [recipient for recipient, _ in queued(tmp_path)] == [ADMIN]


def test_no_admin_notice_without_admin_address(tmp_path: Path) -> None:
    """Without an admin address, ADMIN in the decision queues nothing."""
    notifier = build_notifier({"outbox": str(tmp_path)}, MemoryNextHop(), "guard.test", Clock())

    notifier.notify(incident(frozenset({Notice.ADMIN})))

    assert queued(tmp_path) == []


def test_no_notice_to_the_null_sender(tmp_path: Path) -> None:
    """A message from <> gets no DSN even when the decision asks for one."""
    notifier, _, _ = notifier_on_clock(tmp_path)

    notifier.notify(incident(frozenset({Notice.SENDER}), sender=""))

    assert queued(tmp_path) == []


def test_no_dsn_when_every_recipient_refused_failure_notices(tmp_path: Path) -> None:
    """Recipients with NOTIFY=NEVER and NOTIFY=SUCCESS only: no DSN at all."""
    notifier, _, _ = notifier_on_clock(tmp_path)
    recipients = (
        Recipient("never@example.net", RecipientParameters(notify=frozenset())),
        Recipient("success@example.net", RecipientParameters(notify=frozenset({Notify.SUCCESS}))),
    )

    notifier.notify(incident(frozenset({Notice.SENDER}), recipients=recipients))

    assert queued(tmp_path) == []


def test_notify_never_fails_on_a_disk_error(tmp_path: Path) -> None:
    """When the outbox cannot be written, notify() still fires with None and the
    loss is logged as critical."""
    notifier, _, _ = notifier_on_clock(tmp_path / "outbox")
    (tmp_path / "outbox").rmdir()
    (tmp_path / "outbox").write_bytes(b"not a directory")

    with capturedLogs() as events:
        done = notifier.notify(incident())

    assert done.called and done.result is None
    critical = [event for event in events if event["log_level"] is LogLevel.critical]
    assert len(critical) == 2
    assert all("notice LOST" in event["log_format"] for event in critical)


def test_notify_then_delivery_loop_sends_with_null_sender(tmp_path: Path) -> None:
    """The queued notices go out on the next turn of the clock, each with MAIL
    FROM:<>, and leave the outbox."""
    notifier, hop, clock = notifier_on_clock(tmp_path)
    notifier.notify(incident())

    clock.advance(0)
    clock.advance(0)

    assert sorted((d.envelope.sender, d.envelope.recipients[0].address) for d in hop.delivered) == [
        ("", SENDER),
        ("", ADMIN),
    ]
    assert queued(tmp_path) == []


# -- the builder ------------------------------------------------------------------------


def test_build_defaults(tmp_path: Path) -> None:
    """With only the outbox given: From postmaster@<server hostname>, no admin, the
    server hostname as Reporting-MTA, 60 s / 1 h / 5 days of retries."""
    notifier = build_notifier({"outbox": str(tmp_path)}, MemoryNextHop(), "guard.test", Clock())

    settings = notifier.settings
    assert (settings.from_address, settings.from_name, settings.admin, settings.hostname) == (
        "postmaster@guard.test",
        "Mail Delivery System",
        None,
        "guard.test",
    )
    assert attrs.astuple(notifier.outbox._retry) == (60.0, 3600.0, 432000.0)


def test_build_reads_every_key(tmp_path: Path) -> None:
    """Every documented key is read into the notifier's settings."""
    keys = {
        "from": "Mail Guard <guard@example.com>",
        "admin": ADMIN,
        "hostname": "reports.example.com",
        "outbox": str(tmp_path),
        "sender_subject": "S {subject}",
        "sender_text": "T {reason}",
        "admin_subject": "AS {threat}",
        "admin_text": "AT {queue_id}",
        "relayed_subject": "RS {subject}",
        "relayed_text": "RT {recipients}",
        "retry_initial": 5,
        "retry_max": 50.5,
        "max_age": 3600,
    }
    notifier = build_notifier(keys, MemoryNextHop(), "guard.test", Clock())

    settings = notifier.settings
    assert (settings.from_name, settings.from_address, settings.admin, settings.hostname) == (
        "Mail Guard",
        "guard@example.com",
        ADMIN,
        "reports.example.com",
    )
    assert (settings.sender_subject, settings.sender_text, settings.admin_subject, settings.admin_text) == (
        "S {subject}",
        "T {reason}",
        "AS {threat}",
        "AT {queue_id}",
    )
    assert (settings.relayed_subject, settings.relayed_text) == ("RS {subject}", "RT {recipients}")
    assert attrs.astuple(notifier.outbox._retry) == (5.0, 50.5, 3600.0)
    assert notifier.outbox.directory == str(tmp_path)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"outbox": None}, "outbox: is required"),
        ({"outbox": 3}, "outbox: expected a string, got 3"),
        ({"from": "not an address"}, "from: must be an address"),
        ({"from": "j\u00f6rg@example.com"}, "from: must be an ASCII address"),
        ({"admin": "admin"}, "admin: must be an address"),
        ({"admin": "a@example.com\r\nBcc: x@example.com"}, "admin: must be an address"),
        ({"hostname": "two words"}, "hostname: must be a host name"),
        ({"retry_initial": 0}, "retry_initial: must be greater than 0"),
        ({"retry_initial": 120, "retry_max": 60}, "retry_max: must be at least retry_initial (120)"),
        ({"max_age": -1}, "max_age: must be greater than 0"),
        ({"sender_text": "Dear {sender"}, "sender_text: is not a valid template"),
        ({"admin_subject": "{threat.name}"}, "admin_subject: is not a valid template"),
        ({"sender_subject": "{}"}, "sender_subject: is not a valid template"),
        ({"relayed_text": "Dear {sender"}, "relayed_text: is not a valid template"),
        ({"admni": ADMIN}, "admni: unknown key"),
    ],
)
def test_build_errors_name_the_key(tmp_path: Path, keys: dict[str, Any], message: str) -> None:
    """A bad [notifications] table stops the start with an error naming the key."""
    config = {**table(tmp_path), **keys}
    config = {key: value for key, value in config.items() if value is not None}

    with pytest.raises(ConfigError) as raised:
        build_notifier(config, MemoryNextHop(), "guard.test", Clock())

    assert str(raised.value).startswith(message)


def test_build_does_not_touch_the_disk(tmp_path: Path) -> None:
    """Building (as check-config does) creates no directory; start does."""
    directory = tmp_path / "outbox"
    notifier = build_notifier({"outbox": str(directory)}, MemoryNextHop(), "guard.test", Clock())
    assert not directory.exists()

    notifier.start()

    assert directory.is_dir()


def test_service_starts_and_stops_the_outbox(tmp_path: Path) -> None:
    """NotifierService loads the outbox when started and stops delivering when
    stopped."""
    clock = Clock()
    hop = MemoryNextHop()
    notifier = build_notifier(table(tmp_path), hop, "guard.test", clock)
    notifier.notify(incident(frozenset({Notice.ADMIN})))
    service = NotifierService(notifier)

    service.startService()
    clock.advance(0)
    stopped = service.stopService()
    notifier.notify(incident(frozenset({Notice.ADMIN})))
    clock.advance(3600)

    assert stopped.called
    assert [d.envelope.recipients[0].address for d in hop.delivered] == [ADMIN]
    assert len(queued(tmp_path)) == 1


# -- end to end with real next hops -------------------------------------------------------


@pytest.fixture
def stopping() -> Iterator[list[Any]]:
    """Notifiers and listening ports a test started; stopped at teardown."""
    started: list[Any] = []
    yield started
    for thing in reversed(started):
        stop = thing.stop if isinstance(thing, Notifier) else thing.stopListening
        pytest_twisted.blockon(defer.maybeDeferred(stop))


def real_notifier(stopping: list[Any], directory: Path, endpoint: str, **keys: Any) -> Notifier:
    settings = UpstreamSettings(endpoint=endpoint, hostname="guard.test", keep_connections=0, connect_timeout=5.0)
    notifier = build_notifier(table(directory, **keys), Upstream(reactor, settings), "guard.test", reactor)
    notifier.start()
    stopping.append(notifier)
    return notifier


async def settle(notifier: Notifier) -> list[Outcome]:
    """The outcomes of the next attempt at every queued notice (bounded)."""
    watching = [notifier.outbox.watch(notice.id) for notice in notifier.outbox.pending()]
    gathered = defer.gatherResults(watching, consumeErrors=True).addTimeout(15, reactor)
    return list(await gathered)


@pytest_twisted.ensureDeferred
async def test_notices_arrive_at_smtp_sink_with_null_sender(
    smtp_sink: SmtpSink, stopping: list[Any], tmp_path: Path
) -> None:
    """Through the upstream client to smtp-sink: the DSN reaches the sender and the
    admin notice the admin address, both sent as MAIL FROM:<>; the outbox is empty."""
    notifier = real_notifier(stopping, tmp_path / "outbox", smtp_sink.endpoint)

    await notifier.notify(incident())
    outcomes = await settle(notifier)
    dumps = await threads.deferToThread(smtp_sink.messages, 2)

    assert outcomes == [Outcome.DELIVERED, Outcome.DELIVERED]
    assert list((tmp_path / "outbox").iterdir()) == []
    by_recipient = {}
    for dump in dumps:
        assert re.search(rb"^X-Mail-Args: <>$", dump, re.M) is not None
        [rcpt] = re.findall(rb"^X-Rcpt-Args: <(.*)>$", dump, re.M)
        by_recipient[rcpt.decode()] = email.message_from_bytes(dump, policy=email.policy.default)
    assert sorted(by_recipient) == [SENDER, ADMIN]
    dsn = by_recipient[SENDER]
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_payload()[1].get_payload()[0]["Original-Envelope-Id"] == "ENV-42"
    assert dsn.get_payload()[2].get_payload(decode=True) == HEADERS.replace(b"\r\n", b"\n")
    admin = by_recipient[ADMIN]
    assert admin["Subject"] == "[smtpguard] virus Eicar-Test-Signature from alice@example.org"
    assert "Queue id:    0A1B2C3D4E5F" in admin.get_content()


@pytest_twisted.ensureDeferred
async def test_notice_waits_while_next_hop_is_down_and_goes_once_it_is_up(stopping: list[Any], tmp_path: Path) -> None:
    """With nothing listening at the next hop, the notice stays in the outbox; once
    the capture target listens there, the next retry delivers it with sender <>."""
    port = free_port()
    outbox = tmp_path / "outbox"
    notifier = real_notifier(stopping, outbox, f"tcp:127.0.0.1:{port}", retry_initial=0.2, retry_max=0.4, max_age=60)

    await notifier.notify(incident(frozenset({Notice.ADMIN})))
    first = await settle(notifier)

    assert first == [Outcome.RETRY]
    [(recipient, _)] = queued(outbox)
    assert recipient == ADMIN
    assert json.loads(next(outbox.glob("*.notice")).read_bytes().split(b"\n", 1)[0])["attempts"] >= 1

    [notice] = notifier.outbox.pending()
    # Watched before the listener starts, so that no attempt goes unseen.
    attempt = notifier.outbox.watch(notice.id)
    capture = tmp_path / "capture"
    factory = capture_factory(reactor, str(capture))
    listening: IListeningPort = await serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1").listen(factory)
    stopping.insert(0, listening)
    outcomes = [await attempt.addTimeout(15, reactor)]
    while outcomes[-1] is Outcome.RETRY:  # attempts that came before the listener; bounded by max_age
        outcomes.append(await notifier.outbox.watch(notice.id).addTimeout(15, reactor))

    assert outcomes == [Outcome.RETRY] * (len(outcomes) - 1) + [Outcome.DELIVERED]
    assert queued(outbox) == []
    [meta] = capture.glob("*.json")
    assert json.loads(meta.read_text()) == {
        "sender": "",
        "recipients": [ADMIN],
        "client": "127.0.0.1",
        "helo": "guard.test",
    }
    stored = email.message_from_bytes(meta.with_suffix(".eml").read_bytes(), policy=email.policy.default)
    assert stored["To"] == ADMIN
    assert stored["Auto-Submitted"] == "auto-generated"
