"""The transaction record and its log: the Transaction the pipeline hands its
observers (timings driven by a Clock), the next hop's queue id read from its
reply, the event's fields and text, the [logging] table, and a real ``twistd
smtpguard`` writing JSON lines that twisted.logger reads back."""

from __future__ import annotations

import email
import json
import smtplib
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogPublisher, capturedLogs, eventsFromJSONLogFile, formatEvent
from zope.interface import implementer

from smtpguard import config, replies
from smtpguard.envelope import Client, Envelope, Forwarding, Hop, Recipient
from smtpguard.interfaces import IScanner
from smtpguard.pipeline import Pipeline
from smtpguard.policies.default import DefaultPolicy
from smtpguard.replies import Reply
from smtpguard.results import Action, ErrorKind, ScanResult, Threat, Verdict
from smtpguard.scanners.chain import AllScanners, FailoverScanners
from smtpguard.spool import Message
from smtpguard.testing import FixedScanner, MemoryNextHop
from smtpguard.transaction import ScannerRun, Timings, Transaction, queue_id
from smtpguard.transactionlog import NAMESPACE, TransactionLogFile, log_transaction, transaction_fields
from tests.conftest import StrictHops, free_port
from tests.faults import Guard
from tests.strict_hop import stored_size
from tests.test_integration import Certificate, in_thread
from tests.test_integration import certificate as tls_files  # noqa: F401 -- the fixture, by this name

TID = "0A1B2C3D4E5F"
CIPHER = "TLS_AES_256_GCM_SHA384"
QUEUED = "Ok: queued as 4XkQ2T1LzCz9rxN"
MESSAGE = b"From: <alice@example.org>\r\nSubject: hello\r\n\r\nHello.\r\n"
ENVELOPE = Envelope(
    Client(
        "192.0.2.1", 40000, helo="client.example", tls=True, tls_version="TLSv1.3", tls_cipher="TLS_AES_256_GCM_SHA384"
    ),
    "alice@example.org",
    recipients=(Recipient("bob@example.net"), Recipient("carol@example.net")),
)


# -- the queue id in the next hop's reply ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Ok: queued as 4XkQ2T1LzCz9rxN", "4XkQ2T1LzCz9rxN"),  # Postfix
        ("Ok: 1234 bytes queued as 4XkQ2T1LzCz9rxN", "4XkQ2T1LzCz9rxN"),  # Postfix, after BDAT
        ("OK id=1rXyZa-000ABC-Q1", "1rXyZa-000ABC-Q1"),  # Exim
        ("x8KJ3vXq012345 Message accepted for delivery", "x8KJ3vXq012345"),  # sendmail
        ("2.0.0: 5a2b3c4d Message accepted for delivery", "5a2b3c4d"),  # OpenSMTPD
        ("Message Queued (7E9A1B2C-3D4E.1)", "7E9A1B2C-3D4E.1"),  # Haraka
        ("<a1@mx.example> [InternalId=81604378625] Queued mail for delivery", "81604378625"),  # Exchange
        ("Ok", ""),  # smtp-sink
        ("Ok: queued", ""),
    ],
)
def test_queue_id_is_read_from_the_forms_mtas_use(text: str, expected: str) -> None:
    """The queue id a next hop names in its reply text, in Postfix's, Exim's,
    sendmail's, OpenSMTPD's, Haraka's and Exchange's forms; "" when none."""
    assert queue_id(text) == expected


def test_a_refusal_names_no_queue_id() -> None:
    """A negative reply is no queueing, whatever its text says."""
    transaction = Transaction(
        TID, "", ENVELOPE, 1, ScanResult.clean(), None, replies.OK, next_hop=Reply(451, "", "not queued as X")
    )
    assert transaction.queued_as == ""


# -- the record the pipeline makes -------------------------------------------------------


@implementer(IScanner)
class HeldScanner:
    """A scanner whose verdict comes when the test fires it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.waiting: list[Deferred[ScanResult]] = []

    def scan(self, message: Message, envelope: Envelope) -> Deferred[ScanResult]:
        self.waiting.append(Deferred())
        return self.waiting[-1]


def run(
    scanner: IScanner, hop: MemoryNextHop, clock: Clock, receiving: float = 0.0
) -> tuple[list[Transaction], list[Reply]]:
    seen: list[Transaction] = []
    pipeline = Pipeline(clock, scanner, DefaultPolicy(), scan_timeout=60, listener="tcp:10025", observers=[seen.append])
    session = hop.session()
    session.mail(ENVELOPE)
    for recipient in ENVELOPE.recipients:
        session.rcpt(recipient)
    got: list[Reply] = []
    pipeline.process(ENVELOPE, Message.from_bytes(MESSAGE), session, TID, receiving).addCallback(got.append)
    return seen, got


def test_timings_and_scanner_runs_follow_the_clock() -> None:
    """Two scanners side by side answering after 2 s and 3 s, a next hop after
    4 s more: each run has its own seconds, scanning took 3 s, relaying 4 s,
    and the receiving time the server gave is kept."""
    clock = Clock()
    first, second = HeldScanner("one"), HeldScanner("two")
    hop = MemoryNextHop()
    hop.hold = True
    hop.data_reply = Reply(250, "2.0.0", "Ok: queued as 4XkQ2T1LzCz9rxN")
    seen, got = run(AllScanners([first, second]), hop, clock, receiving=1.5)
    hop.release()  # MAIL, RCPT, RCPT
    clock.advance(2)
    first.waiting[0].callback(ScanResult.clean("one"))
    clock.advance(1)
    second.waiting[0].callback(ScanResult.clean("two"))
    clock.advance(4)
    hop.release()

    assert got == [hop.data_reply]
    [transaction] = seen
    assert transaction.scans == (
        ScannerRun("one", ScanResult.clean("one"), 2.0),
        ScannerRun("two", ScanResult.clean("two"), 3.0),
    )
    assert transaction.timings == Timings(receiving=1.5, scanning=3.0, relaying=4.0)
    assert (transaction.action, transaction.next_hop, transaction.queued_as) == (
        Action.DELIVER,
        hop.data_reply,
        "4XkQ2T1LzCz9rxN",
    )
    assert (transaction.id, transaction.listener, transaction.size) == (TID, "tcp:10025", len(MESSAGE))


def test_failover_runs_name_each_scanner_asked() -> None:
    """A failover chain whose first scanner fails: both runs are recorded, the
    backup's verdict stands."""
    error = ScanResult.failed(ErrorKind.ENGINE_NOT_READY, "down", "main")
    clock = Clock()
    seen, _ = run(
        FailoverScanners([FixedScanner(error, "main"), FixedScanner(ScanResult.clean("backup"), "backup")]),
        MemoryNextHop(),
        clock,
    )
    [transaction] = seen
    assert transaction.scans == (ScannerRun("main", error, 0.0), ScannerRun("backup", ScanResult.clean("backup"), 0.0))
    assert transaction.result == ScanResult.clean("backup")


def test_infected_message_is_recorded_with_its_decision_and_no_relay() -> None:
    """An infected message the default policy rejects: the threat, the action
    and reason, the reply the client got, and no next hop reply."""
    threat = ScanResult.infected((Threat("Eicar-Test-Signature", "eicar.com"),), "fixed")
    seen, got = run(FixedScanner(threat), MemoryNextHop(), Clock())
    [transaction] = seen
    assert (transaction.result, transaction.action, transaction.reply, transaction.next_hop) == (
        threat,
        Action.REJECT,
        got[0],
        None,
    )
    assert transaction.reason != ""


def test_scan_deadline_is_one_run_of_the_chain() -> None:
    """A scan cut by the deadline: one run, the chain's timeout, of the
    deadline's length; the message deferred."""
    clock = Clock()
    seen, got = run(HeldScanner("slow"), MemoryNextHop(), clock)
    clock.advance(60)
    [transaction] = seen
    [run_] = transaction.scans
    assert (run_.scanner, run_.result.error, run_.seconds) == ("slow", ErrorKind.TIMEOUT, 60.0)
    assert transaction.timings.scanning == 60.0
    assert got[0].code == 451


def test_local_error_is_recorded_once_without_action() -> None:
    """A policy that raises: the client gets LOCAL_ERROR and the observers one
    Transaction with no action."""

    class Broken(DefaultPolicy):
        def decide(self, envelope: Envelope, result: ScanResult) -> Any:
            raise RuntimeError("policy exploded")

    seen: list[Transaction] = []
    hop = MemoryNextHop()
    pipeline = Pipeline(Clock(), FixedScanner(ScanResult.clean()), Broken(), observers=[seen.append])
    session = hop.session()
    session.mail(ENVELOPE)
    got: list[Reply] = []
    pipeline.process(ENVELOPE, Message.from_bytes(MESSAGE), session, TID).addCallback(got.append)
    assert got == [replies.LOCAL_ERROR]
    assert [(t.action, t.reply, t.result.verdict) for t in seen] == [(None, replies.LOCAL_ERROR, Verdict.CLEAN)]


def test_header_section_too_big_is_recorded_once_without_action() -> None:
    """A message refused after its scan (a header section too big to read) is
    one Transaction with no action and the refusal as its reply."""
    seen: list[Transaction] = []
    hop = MemoryNextHop()
    pipeline = Pipeline(Clock(), FixedScanner(ScanResult.clean()), DefaultPolicy(), observers=[seen.append])
    session = hop.session()
    session.mail(ENVELOPE)
    session.rcpt(ENVELOPE.recipients[0])
    huge = Message.from_bytes(b"X-Long: " + b"a" * (1024 * 1024 + 10) + b"\r\n\r\nbody\r\n")
    pipeline.process(ENVELOPE, huge, session, TID)
    assert [(t.action, t.reply, t.next_hop) for t in seen] == [(None, replies.HEADER_TOO_BIG, None)]


# -- the event --------------------------------------------------------------------------


def transaction(**changes: Any) -> Transaction:
    base = Transaction(
        TID,
        "tcp:10025",
        ENVELOPE,
        1234,
        ScanResult.clean("builtin"),
        Action.DELIVER,
        Reply(250, "2.0.0", "Ok: queued as 4XkQ2T1LzCz9rxN"),
        (ScannerRun("builtin", ScanResult.clean("builtin"), 0.25),),
        Reply(250, "2.0.0", "Ok: queued as 4XkQ2T1LzCz9rxN"),
        Timings(0.5, 0.25, 0.125),
        "",
    )
    return attrs.evolve(base, **changes)


def logged(record: Transaction) -> Any:
    with capturedLogs() as events:
        log_transaction(record)
    [event] = [event for event in events if event["log_namespace"] == NAMESPACE]
    return event


def test_event_carries_the_fields_under_stable_names() -> None:
    """One event in the smtpguard.transaction namespace with every field, JSON values."""
    event = logged(transaction())
    fields = transaction_fields(transaction())
    assert {key: event[key] for key in fields} == fields
    assert event["log_namespace"] == NAMESPACE
    assert fields == {
        "transaction_id": TID,
        "listener": "tcp:10025",
        "client": {
            "address": "192.0.2.1",
            "port": 40000,
            "name": "",
            "helo": "client.example",
            "namaddr": "[192.0.2.1]:40000",
            "protocol": "ESMTPS",
            "tls": True,
            "tls_version": "TLSv1.3",
            "tls_cipher": "TLS_AES_256_GCM_SHA384",
            "ident": "",
            "login": "",
            "hop": None,
        },
        "sender": "alice@example.org",
        "recipients": ["bob@example.net", "carol@example.net"],
        "rcpt_count": 2,
        "size": 1234,
        "result": {
            "verdict": "clean",
            "status": "clean",
            "scanner": "builtin",
            "threats": [],
            "error": None,
            "detail": "",
        },
        "scans": [
            {
                "scanner": "builtin",
                "seconds": 0.25,
                "verdict": "clean",
                "status": "clean",
                "threats": [],
                "error": None,
                "detail": "",
            }
        ],
        "action": "deliver",
        "reason": "",
        "reply": {
            "code": 250,
            "enhanced": "2.0.0",
            "text": "Ok: queued as 4XkQ2T1LzCz9rxN",
            "line": "250 2.0.0 Ok: queued as 4XkQ2T1LzCz9rxN",
        },
        "next_hop": {
            "code": 250,
            "enhanced": "2.0.0",
            "text": "Ok: queued as 4XkQ2T1LzCz9rxN",
            "line": "250 2.0.0 Ok: queued as 4XkQ2T1LzCz9rxN",
        },
        "queued_as": "4XkQ2T1LzCz9rxN",
        "timings": {"receiving": 0.5, "scanning": 0.25, "relaying": 0.125},
    }


def test_text_is_the_postfix_like_line_with_tls_relay_and_queue_id() -> None:
    """The event's text: client, TLS, envelope, verdict, replies, queue id, delays."""
    assert formatEvent(logged(transaction())) == (
        f"{TID}: client=[192.0.2.1]:40000 tls=TLSv1.3:TLS_AES_256_GCM_SHA384 from=<alice@example.org> rcpts=2"
        " size=1234 status=clean action=deliver reply=(250 2.0.0 Ok: queued as 4XkQ2T1LzCz9rxN)"
        " relay=(250 2.0.0 Ok: queued as 4XkQ2T1LzCz9rxN) queued_as=4XkQ2T1LzCz9rxN delays=0.5/0.25/0.125"
    )


def test_text_of_a_forwarded_refused_message_names_the_hop_and_no_relay() -> None:
    """Behind XFORWARD, without TLS, nothing relayed: via=, ident= and login=, no
    tls=, relay= or queued_as=; a multi-line reply stays one line."""
    client = Client("198.51.100.7", 0, helo="a.example", name="a.example", ident="QID1", login="u\nx")
    client = attrs.evolve(client, hop=Hop(Forwarding.XFORWARD, "127.0.0.1", 5000))
    record = transaction(
        envelope=attrs.evolve(ENVELOPE, client=client, recipients=(Recipient("bob@example.net"),)),
        action=Action.REJECT,
        reply=Reply(554, "5.7.1", "Virus found\nsecond line"),
        next_hop=None,
        timings=Timings(),
    )
    assert formatEvent(logged(record)) == (
        f"{TID}: client=a.example[198.51.100.7] via=XFORWARD[127.0.0.1]:5000 ident=QID1 login='u\\nx'"
        " from=<alice@example.org> rcpts=1 size=1234 status=clean action=reject"
        " reply=(554 5.7.1 Virus found / second line) delays=0.0/0.0/0.0"
    )


# -- [logging] ---------------------------------------------------------------------------

BASE = {"upstream": {"endpoint": "tcp:127.0.0.1:10026"}, "scanners": [{"type": "builtin"}]}


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ({"format": "xml"}, "guard.toml: logging.format: must be one of text, json, got 'xml'"),
        ({"format": "json"}, 'guard.toml: logging.format: json needs a file (a path, or "-" for standard output)'),
        ({"file": ""}, 'guard.toml: logging.file: must be a path, or "-" for standard output'),
        ({"file": 7}, "guard.toml: logging.file: expected a string, got 7"),
        ({"rotate": True}, "guard.toml: logging.rotate: unknown key"),
    ],
)
def test_logging_table_errors_name_file_key_and_problem(table: dict[str, Any], error: str) -> None:
    """Each wrong [logging] setting stops the start with the file, key and problem."""
    with pytest.raises(config.ConfigError) as raised:
        config.parse({**BASE, "logging": table}, "guard.toml")
    assert str(raised.value) == error


def test_logging_defaults_to_text_in_the_main_log_only() -> None:
    """Without [logging]: text, no file of its own."""
    assert config.parse(BASE, "guard.toml").logging == config.LogSettings("text", None)


def test_log_file_writes_transactions_only_and_reopens_after_rotation(tmp_path: Path) -> None:
    """The service writes the transaction events (no others) as JSON lines; after
    the file is moved away, reopen() starts a new one; stopping closes it."""
    path = tmp_path / "transactions.json"
    publisher = LogPublisher()
    service = TransactionLogFile(config.LogSettings("json", str(path)), publisher)
    service.startService()
    event = logged(transaction())
    publisher(event)
    publisher({"log_namespace": "other", "log_format": "not this", "log_level": None})
    path.rename(tmp_path / "transactions.json.1")
    service.reopen()
    publisher(logged(transaction(id="SECOND")))
    service.stopService()
    publisher(logged(transaction(id="THIRD")))

    def ids(file: Path) -> list[str]:
        with file.open(encoding="utf-8") as handle:
            return [event["transaction_id"] for event in eventsFromJSONLogFile(handle)]

    assert (ids(tmp_path / "transactions.json.1"), ids(path)) == ([TID], ["SECOND"])


# -- a real twistd smtpguard -------------------------------------------------------------


def config_text(port: int, hop: str, log: Path, certificate: Certificate) -> str:
    return (
        "[server]\n"
        f'listen = ["tcp:{port}:interface=127.0.0.1"]\n'
        'hostname = "guard.test"\n'
        f'tls_certificate = "{certificate.certificate}"\n'
        f'tls_key = "{certificate.key}"\n'
        "[upstream]\n"
        f'endpoint = "{hop}"\n'
        "[[scanners]]\n"
        'type = "builtin"\n'
        "[policy]\n"
        'on_virus = "reject"\n'
        'fail_mode = "defer"\n'
        "[logging]\n"
        'format = "json"\n'
        f'file = "{log}"\n'
    )


EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
SENDER, RECIPIENT = "alice@example.org", "bob@example.net"


def send(port: int, message: bytes, certificate: Certificate | None = None) -> tuple[int, bytes]:
    """The reply to the end of data; over STARTTLS when given a certificate."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=20) as client:
        if certificate is not None:
            client.starttls(context=certificate.client_context())
        client.ehlo("client.example")
        client.mail(SENDER)
        client.rcpt(RECIPIENT)
        return client.data(message)


def lines(log: Path) -> list[dict[str, Any]]:
    """The events in ``log``, read back by twisted.logger; each line is also one
    plain JSON object (no record separator), as ``json.loads`` per line takes it."""
    plain = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    with log.open(encoding="utf-8") as handle:
        events = list(eventsFromJSONLogFile(handle))
    assert [event["transaction_id"] for event in plain] == [event["transaction_id"] for event in events]
    return events


def received_id(message: bytes) -> str:
    """The id in the Received header smtpguard added."""
    received = email.message_from_bytes(message)["Received"]
    return received.split(" id ", 1)[1].split()[0]


@pytest_twisted.ensureDeferred
async def test_twistd_writes_json_transactions_read_back_by_twisted_logger(
    tmp_path: Path, strict_hops: StrictHops, request: pytest.FixtureRequest
) -> None:
    """Through a real twistd smtpguard to a next hop answering as Postfix: a clean
    message over STARTTLS, an EICAR message and one the next hop defers each give
    one JSON line; its transaction id is the Received header's, its queued_as the
    next hop's queue id, its TLS fields those of the session."""
    tls: Certificate = request.getfixturevalue("tls_files")
    hop = strict_hops()
    port = free_port()
    log = tmp_path / "transactions.json"
    guard = Guard(tmp_path, port, config_text(port, hop.endpoint, log, tls))
    await in_thread(guard.start)
    try:
        clean = b"From: <alice@example.org>\r\nSubject: clean\r\n\r\nHello.\r\n"
        clean_reply = await in_thread(send, port, clean, tls)
        infected_reply = await in_thread(send, port, b"Subject: eicar\r\n\r\n" + EICAR + b"\r\n")
        hop.final_reply = Reply(451, "4.3.0", "Error: queue file write error")
        deferred_reply = await in_thread(send, port, b"Subject: later\r\n\r\nLater.\r\n")
    finally:
        await in_thread(guard.stop)

    [queued] = hop.queued
    # Relayed with BDAT: Postfix names the bytes it stored too.
    queued_text = f"Ok: {stored_size(queued.data)} bytes queued as {queued.queue_id}"
    assert clean_reply == (250, f"2.0.0 {queued_text}".encode())
    assert deferred_reply == (451, b"4.3.0 Error: queue file write error")
    first, second, third = lines(log)
    assert first["transaction_id"] == received_id(queued.data)
    assert (first["queued_as"], first["action"], first["result"]["verdict"]) == (queued.queue_id, "deliver", "clean")
    assert first["next_hop"]["line"] == f"250 2.0.0 {queued_text}"
    assert (first["client"]["tls"], first["client"]["tls_version"]) == (True, "TLSv1.3")
    assert first["client"]["tls_cipher"].startswith("TLS_")
    assert (first["client"]["helo"], first["client"]["address"]) == ("client.example", "127.0.0.1")
    assert (first["sender"], first["recipients"], first["size"]) == (SENDER, [RECIPIENT], len(clean))
    assert [scan["scanner"] for scan in first["scans"]] == ["builtin"]
    assert first["listener"] == f"tcp:{port}:interface=127.0.0.1"

    assert infected_reply[0] == 554
    assert (second["action"], second["next_hop"], second["queued_as"]) == ("reject", None, "")
    assert second["reply"]["code"] == 554
    assert [threat["name"] for threat in second["result"]["threats"]] == ["Eicar-Test-Signature"]
    assert (second["client"]["tls"], second["client"]["tls_version"]) == (False, "")

    assert (third["action"], third["queued_as"]) == ("deliver", "")
    assert third["next_hop"] == {
        "code": 451,
        "enhanced": "4.3.0",
        "text": "Error: queue file write error",
        "line": "451 4.3.0 Error: queue file write error",
    }
    assert len({first["transaction_id"], second["transaction_id"], third["transaction_id"]}) == 3
