"""The quarantine: durable, private, atomic copies with their metadata; list, get,
open, delete; release through a real next hop; ``smtpguard quarantine`` as a real
command."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from smtpguard import quarantine as quarantine_module
from smtpguard import replies
from smtpguard.capture import capture_factory
from smtpguard.config import ConfigError
from smtpguard.envelope import (
    BodyType,
    Client,
    Envelope,
    MailParameters,
    Notify,
    Recipient,
    RecipientParameters,
    Return,
)
from smtpguard.incident import Incident
from smtpguard.interfaces import IQuarantine
from smtpguard.quarantine import (
    Entry,
    InvalidId,
    NoSuchEntry,
    Quarantine,
    QuarantineError,
    build_quarantine,
    envelope_of,
)
from smtpguard.replies import Reply
from smtpguard.results import Action, Decision, ScanResult, Threat
from smtpguard.spool import Message, Spool
from smtpguard.testing import MemoryNextHop
from smtpguard.upstream import Upstream, UpstreamSettings
from tests.conftest import SmtpSink, free_port

REPO = Path(__file__).resolve().parent.parent
WHEN = datetime(2026, 11, 29, 22, 45, 1, tzinfo=UTC).timestamp()
RELEASED_AT = datetime(2026, 11, 30, 8, 0, 0, tzinfo=UTC).timestamp()
ID_SHAPE = re.compile(r"20261129T224501Z-[0-9a-f]{8}")
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
MESSAGE = (
    b"Received: from client.example\r\n\tby guard.test; Sun, 29 Nov 2026 22:45:00 +0000\r\n"
    b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.net>\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    b"X-Virus-Status: clean\r\n\r\n"
    b"Hello Bob,\r\n.a line with a leading dot\r\n\xc3\xa4 8-bit text\r\n" + EICAR + b"\r\nno final line break"
)
ENVELOPE = Envelope(
    client=Client("203.0.113.7", 41000, "192.0.2.1", 25, "client.example", tls=True, hostname="guard.test"),
    sender="alice@example.org",
    parameters=MailParameters(
        size=4096, body=BodyType.EIGHT_BIT_MIME, smtputf8=False, envid="QQ314159 x", ret=Return.HEADERS
    ),
    recipients=(
        Recipient(
            "bob@example.net",
            RecipientParameters(frozenset({Notify.SUCCESS, Notify.FAILURE}), "rfc822;bob@example.net"),
        ),
        Recipient("carol@example.net", RecipientParameters(frozenset())),
        Recipient("dave@example.net"),
    ),
)
INFECTED = ScanResult.infected((Threat("Eicar-Test-Signature", "eicar.com"),), "builtin")
REPLACED = Decision(Action.REPLACE, reason="virus found", quarantine=True)


def incident(time: float = WHEN, envelope: Envelope = ENVELOPE) -> Incident:
    return Incident("0123456789AB", envelope, INFECTED, REPLACED, MESSAGE.split(b"\r\n\r\n")[0], time, "Grüße")


def synchronous(work: Callable[[], Any]) -> Deferred[Any]:
    """Runs the store's blocking part at once, on this thread."""
    return defer.maybeDeferred(work)


def fired(deferred: Deferred[Any]) -> Any:
    """The result of a Deferred that has already fired with one."""
    outcome: list[Any] = []
    deferred.addBoth(outcome.append)
    assert outcome, "the Deferred has not fired"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def failure_of(deferred: Deferred[Any]) -> Failure:
    outcome: list[Any] = []
    deferred.addBoth(outcome.append)
    assert outcome and isinstance(outcome[0], Failure), f"expected a failure, got {outcome!r}"
    return outcome[0]


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(RELEASED_AT)
    return clock


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Quarantine:
    return Quarantine(str(tmp_path / "quarantine"), clock, synchronous)


def keep(store: Quarantine, data: bytes = MESSAGE, time: float = WHEN, envelope: Envelope = ENVELOPE) -> str:
    message = Message.from_bytes(data)
    try:
        return str(fired(store.store(incident(time, envelope), message)))
    finally:
        message.close()


# -- store ------------------------------------------------------------------------


def test_quarantine_provides_iquarantine(store: Quarantine) -> None:
    """Quarantine provides IQuarantine, so the pipeline can be given one."""
    assert verifyObject(IQuarantine, store)


def test_store_keeps_the_message_bytes_exactly(store: Quarantine, tmp_path: Path) -> None:
    """The .eml holds the message byte for byte (8-bit text, leading dots and a
    missing final line break included), under an id of the incident's time."""
    entry_id = keep(store)
    assert ID_SHAPE.fullmatch(entry_id)
    assert (tmp_path / "quarantine" / f"{entry_id}.eml").read_bytes() == MESSAGE


def test_store_writes_the_metadata(store: Quarantine, tmp_path: Path) -> None:
    """The .json holds the id, time, transaction, client, sender and recipients with
    every MAIL and RCPT parameter, the verdict, the decision, the subject and the size."""
    entry_id = keep(store)
    data = json.loads((tmp_path / "quarantine" / f"{entry_id}.json").read_text())
    assert data == {
        "id": entry_id,
        "format": 1,
        "time": "2026-11-29T22:45:01Z",
        "transaction_id": "0123456789AB",
        "client": {
            "address": "203.0.113.7",
            "port": 41000,
            "server_address": "192.0.2.1",
            "server_port": 25,
            "helo": "client.example",
            "esmtp": True,
            "tls": True,
            "hostname": "guard.test",
            "tls_version": "",
            "tls_cipher": "",
            "name": "",
            "login": "",
            "forwarded_protocol": None,
            "ident": "",
            "source": "REMOTE",
            "hop": None,
        },
        "sender": "alice@example.org",
        "mail_parameters": {"size": 4096, "body": "8BITMIME", "smtputf8": False, "envid": "QQ314159 x", "ret": "HDRS"},
        "recipients": [
            {"address": "bob@example.net", "notify": "SUCCESS,FAILURE", "orcpt": "rfc822;bob@example.net"},
            {"address": "carol@example.net", "notify": "NEVER", "orcpt": None},
            {"address": "dave@example.net", "notify": None, "orcpt": None},
        ],
        "scanner": "builtin",
        "verdict": "infected",
        "status": "infected (Eicar-Test-Signature)",
        "threats": [{"name": "Eicar-Test-Signature", "file": "eicar.com"}],
        "error": None,
        "detail": "",
        "decision": {"action": "replace", "reason": "virus found"},
        "subject": "Grüße",
        "size": len(MESSAGE),
    }


def test_metadata_gives_back_the_original_envelope(store: Quarantine) -> None:
    """envelope_of(get(id)) is the envelope the message came with, parameters and all."""
    assert envelope_of(store.get(keep(store))) == ENVELOPE


def test_store_streams_a_message_spooled_to_disk(
    store: Quarantine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 5 MB message (spooled to a temporary file) is copied exactly, chunk by
    chunk: the message is never read whole into memory."""
    spool = Spool(0, memory_limit=64 * 1024)
    block = bytes(range(256)) * 4096  # 1 MiB
    for _ in range(5):
        spool.write(block)
    message = spool.finish()

    def whole(self: Message) -> bytes:
        raise AssertionError("the whole message was read into memory")

    monkeypatch.setattr(Message, "read", whole)
    try:
        entry_id = fired(store.store(incident(), message))
    finally:
        message.close()
    copy = (tmp_path / "quarantine" / f"{entry_id}.eml").read_bytes()
    assert (len(copy), hashlib.sha256(copy).hexdigest()) == (5 * len(block), hashlib.sha256(block * 5).hexdigest())


def test_files_are_private_and_the_directory_is_created_0700(tmp_path: Path, clock: Clock) -> None:
    """A missing quarantine directory is created 0700 (parents too); both files are 0600."""
    directory = tmp_path / "spool" / "quarantine"
    entry_id = keep(Quarantine(str(directory), clock, synchronous))
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in directory.iterdir()}
    assert modes == {f"{entry_id}.eml": 0o600, f"{entry_id}.json": 0o600}


def test_store_fsyncs_both_files_and_the_directory(store: Quarantine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the store succeeds, the message, then the metadata (under their
    temporary names) and then the directory holding their final names are fsync'd."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    entry_id = keep(store)
    directory = os.path.realpath(store.directory)
    assert synced == [f"{directory}/.{entry_id}.eml.tmp", f"{directory}/.{entry_id}.json.tmp", directory]


class Broken(Message):
    """A message whose storage fails after the first chunk."""

    def chunks(self, chunk_size: int = 16) -> Iterator[bytes]:
        yield b"Subject: half\r\n"
        raise OSError(5, "Input/output error")


def test_a_failed_write_leaves_nothing(store: Quarantine, tmp_path: Path) -> None:
    """When the message cannot be read to the end, the store fails with that error
    and the directory holds no file at all, not even a temporary one."""
    failure = failure_of(store.store(incident(), Broken.from_bytes(b"x" * 100)))
    assert failure.check(OSError) and failure.value.errno == 5  # type: ignore[union-attr]
    assert list((tmp_path / "quarantine").iterdir()) == []


def test_a_failure_after_the_message_got_its_name_removes_it(
    store: Quarantine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the metadata cannot be renamed into place, the already renamed message
    is removed as well: no entry, no orphan."""
    real_rename = os.rename

    def rename(source: str, destination: str) -> None:
        if destination.endswith(".json"):
            raise OSError(28, "No space left on device")
        real_rename(source, destination)

    monkeypatch.setattr(os, "rename", rename)
    failure = failure_of(store.store(incident(), Message.from_bytes(MESSAGE)))
    assert failure.check(OSError) and failure.value.errno == 28  # type: ignore[union-attr]
    assert list((tmp_path / "quarantine").iterdir()) == []


def test_store_into_an_unusable_directory_fails(tmp_path: Path, clock: Clock) -> None:
    """A quarantine directory that cannot be created (its parent is a file) fails
    the store's Deferred, so the client hears 451 and retries."""
    (tmp_path / "file").write_bytes(b"")
    unusable = Quarantine(str(tmp_path / "file" / "quarantine"), clock, synchronous)
    failure = failure_of(unusable.store(incident(), Message.from_bytes(MESSAGE)))
    assert failure.check(NotADirectoryError)


@pytest_twisted.ensureDeferred
async def test_store_writes_in_a_thread_of_the_reactor_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """By default the writing runs in the reactor's thread pool, never on the
    reactor thread, and the Deferred fires back on the reactor thread."""
    ran_in: list[threading.Thread] = []
    real_write = quarantine_module._write_entry

    def write_entry(*arguments: Any) -> str:
        ran_in.append(threading.current_thread())
        return real_write(*arguments)

    monkeypatch.setattr(quarantine_module, "_write_entry", write_entry)
    store = Quarantine(str(tmp_path / "quarantine"), reactor)
    entry_id = await store.store(incident(), Message.from_bytes(MESSAGE))
    assert threading.current_thread() is threading.main_thread()
    assert len(ran_in) == 1 and ran_in[0] is not threading.main_thread()
    assert (tmp_path / "quarantine" / f"{entry_id}.eml").read_bytes() == MESSAGE


# -- ids --------------------------------------------------------------------------


def test_ids_sort_by_time(store: Quarantine) -> None:
    """Ids start with the UTC time of the message, so list() gives entries oldest first."""
    later = keep(store, time=WHEN + 3600)
    first = keep(store, time=WHEN)
    second = keep(store, time=WHEN + 1)
    assert (first[:16], second[:16], later[:16]) == ("20261129T224501Z", "20261129T224502Z", "20261129T234501Z")
    assert [entry.id for entry in store.list()] == [first, second, later]


def test_ids_of_one_second_do_not_collide(store: Quarantine) -> None:
    """A hundred messages in the same second get a hundred distinct ids."""
    ids = {keep(store) for _ in range(100)}
    assert len(ids) == 100 and all(ID_SHAPE.fullmatch(entry_id) for entry_id in ids)


def test_a_colliding_id_is_drawn_again(store: Quarantine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the random part repeats within a second, the second message gets
    another one and the first entry is left untouched."""
    suffixes = iter(["0badcafe", "0badcafe", "00c0ffee"])
    monkeypatch.setattr(quarantine_module, "_suffix", lambda: next(suffixes))
    first = keep(store, b"Subject: first\r\n\r\n")
    second = keep(store, b"Subject: second\r\n\r\n")
    assert (first, second) == ("20261129T224501Z-0badcafe", "20261129T224501Z-00c0ffee")
    assert (tmp_path / "quarantine" / f"{first}.eml").read_bytes() == b"Subject: first\r\n\r\n"


# -- list, get, open, delete -------------------------------------------------------


def test_list_gives_one_entry_per_message(store: Quarantine) -> None:
    """list() names each entry with its time, sender, recipients and verdict."""
    entry_id = keep(store)
    null_sender = keep(
        store, time=WHEN + 60, envelope=Envelope(ENVELOPE.client, "", recipients=ENVELOPE.recipients[2:])
    )
    assert store.list() == [
        Entry(
            entry_id,
            "2026-11-29T22:45:01Z",
            "alice@example.org",
            ("bob@example.net", "carol@example.net", "dave@example.net"),
            "infected (Eicar-Test-Signature)",
        ),
        Entry(null_sender, "2026-11-29T22:46:01Z", "", ("dave@example.net",), "infected (Eicar-Test-Signature)"),
    ]


def test_list_of_a_missing_directory_is_empty(tmp_path: Path, clock: Clock) -> None:
    """A quarantine whose directory does not exist yet holds nothing."""
    assert Quarantine(str(tmp_path / "nowhere"), clock).list() == []


def test_list_ignores_temporary_files_and_orphans(store: Quarantine, tmp_path: Path) -> None:
    """Temporary files of a write in progress (or cut short by a crash), a message
    without metadata and foreign files are not entries."""
    entry_id = keep(store)
    directory = tmp_path / "quarantine"
    for name in (".20261129T224501Z-00000001.json.tmp", "20261129T224501Z-00000002.eml", "notes.json", "x.json"):
        (directory / name).write_bytes(b"{}")
    assert [entry.id for entry in store.list()] == [entry_id]


def test_unreadable_metadata_is_listed_as_unreadable(store: Quarantine, tmp_path: Path) -> None:
    """An entry whose metadata is not JSON still shows in the list, marked unreadable."""
    entry_id = "20261129T224501Z-0000dead"
    (tmp_path / "quarantine").mkdir()
    (tmp_path / "quarantine" / f"{entry_id}.json").write_bytes(b"{not json")
    [entry] = store.list()
    assert (entry.id, entry.sender, entry.recipients) == (entry_id, "", ())
    assert entry.status.startswith(f"unreadable ({entry_id}: cannot read the metadata: ")


def test_open_gives_the_message_as_received(store: Quarantine) -> None:
    """open(id) is the stored message, to read in chunks and close."""
    message = store.open(keep(store))
    try:
        assert (message.size, message.read()) == (len(MESSAGE), MESSAGE)
    finally:
        message.close()


def test_delete_removes_both_files(store: Quarantine, tmp_path: Path) -> None:
    """delete(id) removes the message and its metadata; the entry is then unknown."""
    entry_id = keep(store)
    store.delete(entry_id)
    assert list((tmp_path / "quarantine").iterdir()) == []
    with pytest.raises(NoSuchEntry, match=f"^{entry_id}: no such entry in "):
        store.get(entry_id)


@pytest.mark.parametrize("method", ["get", "open", "delete"])
def test_unknown_entry(store: Quarantine, method: str) -> None:
    """get, open and delete of an id that is not stored raise NoSuchEntry."""
    with pytest.raises(NoSuchEntry):
        getattr(store, method)("20261129T224501Z-00000000")


TRAVERSALS = [
    "../../etc/passwd",
    "/etc/passwd",
    "20261129T224501Z-0123abcd/../../x",
    "20261129T224501Z-0123abcd\n",
    ".20261129T224501Z-0123abcd.eml.tmp",
    "20261129T224501Z-0123ABCD",
    "",
]


@pytest.mark.parametrize("entry_id", TRAVERSALS)
@pytest.mark.parametrize("method", ["get", "open", "delete"])
def test_anything_but_an_id_is_refused(store: Quarantine, tmp_path: Path, method: str, entry_id: str) -> None:
    """Only the id pattern is accepted, so no path leads out of the directory (or to
    a temporary file); nothing is read or removed."""
    (tmp_path / "x").write_bytes(b"keep me")
    with pytest.raises(InvalidId, match="is not a quarantine id"):
        getattr(store, method)(entry_id)
    assert (tmp_path / "x").read_bytes() == b"keep me"


def test_release_refuses_anything_but_an_id(store: Quarantine) -> None:
    """release() of a path fails with InvalidId and talks to no next hop."""
    hop = MemoryNextHop()
    assert failure_of(store.release("../x", hop)).check(InvalidId)
    assert hop.commands == []


# -- release ----------------------------------------------------------------------


def released(entry_id: str) -> bytes:
    return f"X-Quarantine-Released: {entry_id}; Mon, 30 Nov 2026 08:00:00 +0000\r\n".encode()


def test_release_sends_the_original_to_the_original_recipients(store: Quarantine) -> None:
    """release() sends MAIL with the original sender and parameters, one RCPT per
    original recipient, then the original bytes under an X-Quarantine-Released
    header; on 250 the entry is deleted."""
    entry_id = keep(store)
    hop = MemoryNextHop()
    reply = fired(store.release(entry_id, hop))
    assert reply == replies.OK.with_text("Ok: queued")
    assert hop.commands == [
        "MAIL alice@example.org",
        "RCPT bob@example.net",
        "RCPT carol@example.net",
        "RCPT dave@example.net",
        "DATA",
        "QUIT",
    ]
    [delivery] = hop.delivered
    size = len(released(entry_id)) + len(MESSAGE)
    assert delivery.envelope == Envelope(
        ENVELOPE.client,
        ENVELOPE.sender,
        MailParameters(size=size, body=BodyType.EIGHT_BIT_MIME, envid="QQ314159 x", ret=Return.HEADERS),
        ENVELOPE.recipients,
    )
    assert delivery.data == released(entry_id) + MESSAGE
    assert store.list() == []


def test_a_refused_recipient_stops_the_release(store: Quarantine) -> None:
    """If the next hop refuses any recipient, the transaction is reset, nothing is
    sent, the refusal is the result and the entry stays."""
    entry_id = keep(store)
    hop = MemoryNextHop()
    refusal = Reply(550, "5.1.1", "carol: no such user")
    hop.rcpt_reply = lambda recipient: refusal if recipient.address.startswith("carol") else replies.RECIPIENT_OK
    assert fired(store.release(entry_id, hop)) == refusal
    assert hop.commands == ["MAIL alice@example.org", "RCPT bob@example.net", "RCPT carol@example.net", "RSET", "QUIT"]
    assert (hop.delivered, [entry.id for entry in store.list()]) == ([], [entry_id])


def test_a_refused_sender_stops_the_release(store: Quarantine) -> None:
    """If the next hop refuses MAIL, that reply is the result and the entry stays."""
    entry_id = keep(store)
    hop = MemoryNextHop()
    hop.mail_reply = lambda envelope: replies.UPSTREAM_UNAVAILABLE
    assert fired(store.release(entry_id, hop)) == replies.UPSTREAM_UNAVAILABLE
    assert (hop.commands, [entry.id for entry in store.list()]) == (["MAIL alice@example.org", "QUIT"], [entry_id])


def test_a_refused_message_stays_in_quarantine(store: Quarantine) -> None:
    """If the next hop refuses the data, its reply is the result and the entry stays
    as it was."""
    entry_id = keep(store)
    hop = MemoryNextHop()
    hop.data_reply = Reply(554, "5.7.1", "Rejected by content filter")
    assert fired(store.release(entry_id, hop)) == Reply(554, "5.7.1", "Rejected by content filter")
    assert [entry.id for entry in store.list()] == [entry_id]
    assert envelope_of(store.get(entry_id)) == ENVELOPE


def test_release_of_an_unknown_entry_fails(store: Quarantine) -> None:
    """release() of an id that is not stored fails with NoSuchEntry, before any session."""
    hop = MemoryNextHop()
    assert failure_of(store.release("20261129T224501Z-00000000", hop)).check(NoSuchEntry)
    assert hop.sessions == []


def test_an_entry_being_released_cannot_be_released_or_deleted_again(store: Quarantine) -> None:
    """While a release waits for the next hop, a second release and a delete of the
    same entry are refused; once the first one is accepted the entry is gone."""
    entry_id = keep(store)
    hop = MemoryNextHop()
    hop.hold = True
    first = store.release(entry_id, hop)
    assert str(failure_of(store.release(entry_id, MemoryNextHop())).value) == f"{entry_id}: is being released"
    with pytest.raises(QuarantineError, match=f"^{entry_id}: is being released$"):
        store.delete(entry_id)
    while hop.held:
        hop.release()
    assert fired(first) == replies.OK.with_text("Ok: queued")
    assert len(hop.delivered) == 1 and store.list() == []


def test_a_second_release_after_the_first_finds_nothing(store: Quarantine) -> None:
    """A message released once cannot be released twice: the second attempt fails
    with NoSuchEntry and sends nothing."""
    entry_id = keep(store)
    hop = MemoryNextHop()
    fired(store.release(entry_id, hop))
    assert failure_of(store.release(entry_id, hop)).check(NoSuchEntry)
    assert len(hop.delivered) == 1


@pytest_twisted.ensureDeferred
async def test_release_through_a_real_next_hop(tmp_path: Path) -> None:
    """Released over SMTP on loopback to smtpguard's capture target, the message
    arrives byte for byte under the release header, from the original sender to
    the original recipients, and the entry is gone."""
    captured = tmp_path / "captured"
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(capture_factory(reactor, str(captured)))
    try:
        store = Quarantine(str(tmp_path / "quarantine"), reactor)
        entry_id = await store.store(incident(), Message.from_bytes(MESSAGE))
        hop = Upstream(reactor, UpstreamSettings(f"tcp:127.0.0.1:{port.getHost().port}", keep_connections=0))
        reply = await store.release(entry_id, hop)
    finally:
        await port.stopListening()
    name = reply.text.removeprefix("Ok: queued as ")
    assert (reply.code, reply.enhanced) == (250, "2.0.0")
    header = (captured / f"{name}.eml").read_bytes()[: len(released(entry_id))]
    assert re.fullmatch(rf"X-Quarantine-Released: {entry_id}; .+ \+0000\r\n".encode(), header)
    assert (captured / f"{name}.eml").read_bytes()[len(header) :] == MESSAGE
    envelope = json.loads((captured / f"{name}.json").read_text())
    assert (envelope["sender"], envelope["recipients"]) == (
        "alice@example.org",
        ["bob@example.net", "carol@example.net", "dave@example.net"],
    )
    assert store.list() == []


@pytest_twisted.ensureDeferred
async def test_release_passes_the_dsn_parameters_to_smtp_sink(tmp_path: Path, smtp_sink: SmtpSink) -> None:
    """Released to Postfix's smtp-sink (which offers 8BITMIME and DSN), MAIL carries
    BODY, RET and ENVID and each RCPT its NOTIFY and ORCPT, as the client gave them."""
    store = Quarantine(str(tmp_path / "quarantine"), reactor)
    entry_id = await store.store(incident(), Message.from_bytes(MESSAGE))
    reply = await store.release(entry_id, Upstream(reactor, UpstreamSettings(smtp_sink.endpoint, keep_connections=0)))
    assert reply.code == 250
    [dump] = await threads.deferToThread(smtp_sink.messages, 1)
    lines = dump.split(b"\n")
    assert [line for line in lines if line.startswith((b"X-Mail-Args:", b"X-Rcpt-Args:"))] == [
        b"X-Mail-Args: <alice@example.org> BODY=8BITMIME RET=HDRS ENVID=QQ314159+20x",
        b"X-Rcpt-Args: <bob@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.net",
        b"X-Rcpt-Args: <carol@example.net> NOTIFY=NEVER",
        b"X-Rcpt-Args: <dave@example.net>",
    ]
    assert dump.endswith(MESSAGE.replace(b"\r\n", b"\n") + b"\n\n")
    assert store.list() == []


@pytest_twisted.ensureDeferred
async def test_release_with_the_next_hop_down_keeps_the_entry(tmp_path: Path) -> None:
    """When nothing listens at the next hop, release() gives 451 4.4.1 and the
    entry stays."""
    store = Quarantine(str(tmp_path / "quarantine"), reactor)
    entry_id = await store.store(incident(), Message.from_bytes(MESSAGE))
    hop = Upstream(reactor, UpstreamSettings(f"tcp:127.0.0.1:{free_port()}", keep_connections=0))
    assert await store.release(entry_id, hop) == replies.UPSTREAM_UNAVAILABLE
    assert [entry.id for entry in store.list()] == [entry_id]


# -- build_quarantine -------------------------------------------------------------


def test_build_quarantine_creates_the_directory(tmp_path: Path, clock: Clock) -> None:
    """build_quarantine({"directory": ...}) creates the directory 0700 at once."""
    built = build_quarantine({"directory": str(tmp_path / "q")}, clock)
    assert built.directory == str(tmp_path / "q")
    assert stat.S_IMODE((tmp_path / "q").stat().st_mode) == 0o700


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ({}, 'directory: is required (e.g. "/var/spool/smtpguard/quarantine")'),
        ({"directory": 7}, "directory: expected a string, got 7"),
        ({"directory": "/tmp", "max_size": 1}, "max_size: unknown key"),
    ],
)
def test_build_quarantine_refuses_a_bad_table(table: dict[str, Any], problem: str, clock: Clock) -> None:
    """A [quarantine] table without directory, with a wrong type or an unknown key
    is a ConfigError naming the key."""
    with pytest.raises(ConfigError) as raised:
        build_quarantine(table, clock)
    assert str(raised.value) == problem


def test_build_quarantine_refuses_a_directory_it_cannot_create(tmp_path: Path, clock: Clock) -> None:
    """A directory that cannot be created stops the start instead of costing a 451 per message."""
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^directory: cannot create '.*/file/q': Not a directory$"):
        build_quarantine({"directory": str(tmp_path / "file" / "q")}, clock)


# -- the command ------------------------------------------------------------------

# Until smtpguard/cli.py adds the quarantine commands, they run under a parser
# built the way cli.main builds its own.
_SHIM = (
    "import argparse, sys\n"
    "from smtpguard.quarantine_cli import add_commands\n"
    "parser = argparse.ArgumentParser(prog='smtpguard')\n"
    "add_commands(parser.add_subparsers(dest='command', required=True))\n"
    "arguments = parser.parse_args()\n"
    "sys.exit(int(arguments.run(arguments)))\n"
)


def smtpguard(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    wired = "quarantine_cli" in (REPO / "smtpguard" / "cli.py").read_text()
    program = ["-m", "smtpguard.cli"] if wired else ["-c", _SHIM]
    return subprocess.run(
        [sys.executable, *program, *arguments],
        cwd=cwd,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=60,
    )


@pytest.fixture
def filled(tmp_path: Path, clock: Clock) -> tuple[Path, list[str]]:
    """A quarantine directory with two entries."""
    store = Quarantine(str(tmp_path / "quarantine"), clock, synchronous)
    single = Envelope(ENVELOPE.client, "", recipients=(Recipient("bob@example.net"),))
    return tmp_path / "quarantine", [keep(store), keep(store, b"Subject: two\r\n\r\nx\r\n", WHEN + 60, single)]


def test_command_list(filled: tuple[Path, list[str]], tmp_path: Path) -> None:
    """`quarantine --directory DIR list` prints a table of id, time, sender,
    recipients and verdict, oldest first."""
    directory, (first, second) = filled
    done = smtpguard("quarantine", "--directory", str(directory), "list", cwd=tmp_path)
    assert (done.returncode, done.stderr) == (0, b"")
    assert done.stdout.decode().splitlines() == [
        "ID                         TIME                  SENDER               RECIPIENTS"
        "                                          VERDICT",
        f"{first}  2026-11-29T22:45:01Z  <alice@example.org>  bob@example.net,carol@example.net,dave@example.net"
        "  infected (Eicar-Test-Signature)",
        f"{second}  2026-11-29T22:46:01Z  <>                   bob@example.net"
        "                                     infected (Eicar-Test-Signature)",
    ]


def test_command_show(filled: tuple[Path, list[str]], tmp_path: Path) -> None:
    """`quarantine show ID` prints the metadata, an empty line and the message's
    header section, the tab of a folded line shown as an escape like any control
    character (the options may also follow the action)."""
    directory, (first, _) = filled
    done = smtpguard("quarantine", "show", first, "--directory", str(directory), cwd=tmp_path)
    assert (done.returncode, done.stderr) == (0, b"")
    head = MESSAGE.split(b"\r\n\r\n")[0].replace(b"\r\n", b"\n").replace(b"\t", b"\\x09").decode()
    assert done.stdout.decode() == (
        f"id:          {first}\n"
        "time:        2026-11-29T22:45:01Z\n"
        "transaction: 0123456789AB\n"
        "client:      [203.0.113.7]:41000 helo=client.example ESMTPS\n"
        "mail:        FROM:<alice@example.org> SIZE=4096 BODY=8BITMIME RET=HDRS ENVID=QQ314159+20x\n"
        "rcpt:        TO:<bob@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.net\n"
        "rcpt:        TO:<carol@example.net> NOTIFY=NEVER\n"
        "rcpt:        TO:<dave@example.net>\n"
        "verdict:     infected (Eicar-Test-Signature)\n"
        "scanner:     builtin\n"
        "threat:      Eicar-Test-Signature in eicar.com\n"
        "decision:    replace (virus found)\n"
        "subject:     Grüße\n"
        f"size:        {len(MESSAGE)}\n"
        "\n" + head + "\n\n"
    )


def test_command_show_raw(filled: tuple[Path, list[str]], tmp_path: Path) -> None:
    """`quarantine show --raw ID` prints the message exactly as received."""
    directory, (first, _) = filled
    done = smtpguard("quarantine", "--directory", str(directory), "show", "--raw", first, cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, MESSAGE, b"")


def test_command_delete(filled: tuple[Path, list[str]], tmp_path: Path) -> None:
    """`quarantine delete ID` removes the entry and says so."""
    directory, (first, second) = filled
    done = smtpguard("quarantine", "--directory", str(directory), "delete", first, cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{first}: deleted\n".encode(), b"")
    assert sorted(path.name for path in directory.iterdir()) == [f"{second}.eml", f"{second}.json"]


@pytest.mark.parametrize("action", ["show", "delete", "release"])
def test_command_refuses_a_path(filled: tuple[Path, list[str]], tmp_path: Path, action: str) -> None:
    """An argument that is not an id is refused with exit status 1."""
    directory, _ = filled
    extra = ["--upstream", f"tcp:127.0.0.1:{free_port()}"] if action == "release" else []
    done = smtpguard("quarantine", "--directory", str(directory), action, "../../etc/passwd", *extra, cwd=tmp_path)
    assert (done.returncode, done.stdout) == (1, b"")
    assert done.stderr.decode() == (
        "smtpguard quarantine: '../../etc/passwd' is not a quarantine id (like 20261129T224501Z-0123abcd)\n"
    )


def test_command_unknown_id(filled: tuple[Path, list[str]], tmp_path: Path) -> None:
    """An id that is not stored is an error naming it, exit status 1."""
    directory, _ = filled
    done = smtpguard("quarantine", "--directory", str(directory), "show", "20261129T224501Z-00000000", cwd=tmp_path)
    assert (done.returncode, done.stdout) == (1, b"")
    assert done.stderr.decode() == (f"smtpguard quarantine: 20261129T224501Z-00000000: no such entry in {directory}\n")


def test_command_needs_a_directory(tmp_path: Path) -> None:
    """Without --config or --directory the command says what it needs, exit status 2."""
    done = smtpguard("quarantine", "list", cwd=tmp_path)
    assert (done.returncode, done.stderr) == (2, b"smtpguard quarantine: give --config FILE or --directory DIR\n")


def test_command_missing_directory(tmp_path: Path) -> None:
    """A --directory that does not exist is an error, not an empty list."""
    done = smtpguard("quarantine", "--directory", "nowhere", "list", cwd=tmp_path)
    assert (done.returncode, done.stderr) == (1, b"smtpguard quarantine: nowhere: no such directory\n")


def write_config(tmp_path: Path, directory: Path, upstream: str) -> Path:
    path = tmp_path / "smtpguard.toml"
    path.write_text(
        f'[upstream]\nendpoint = "{upstream}"\n\n[[scanners]]\ntype = "builtin"\n\n'
        f'[quarantine]\ndirectory = "{directory}"\n'
    )
    return path


def test_command_release_through_smtp_sink(filled: tuple[Path, list[str]], tmp_path: Path, smtp_sink: SmtpSink) -> None:
    """`quarantine --config FILE release ID` sends the message to the [upstream]
    next hop, prints its reply, exits 0 and the entry is gone."""
    directory, (first, second) = filled
    config = write_config(tmp_path, directory, smtp_sink.endpoint)
    done = smtpguard("quarantine", "--config", str(config), "release", first, cwd=tmp_path)
    assert (done.returncode, done.stderr) == (0, b"")
    assert re.fullmatch(rb"250 2\.0\.0 Ok\n", done.stdout), done.stdout
    [dump] = smtp_sink.messages(1)
    assert re.search(rf"^X-Quarantine-Released: {first}; ".encode(), dump, re.M)
    assert dump.endswith(MESSAGE.replace(b"\r\n", b"\n") + b"\n\n")
    assert sorted(path.name for path in directory.iterdir()) == [f"{second}.eml", f"{second}.json"]


def test_command_release_with_the_next_hop_down(filled: tuple[Path, list[str]], tmp_path: Path) -> None:
    """With nothing listening at --upstream, release prints 451 4.4.1, exits 1
    and the entry stays."""
    directory, (first, _) = filled
    upstream = f"tcp:127.0.0.1:{free_port()}"
    done = smtpguard(
        "quarantine", "--directory", str(directory), "release", first, "--upstream", upstream, cwd=tmp_path
    )
    assert (done.returncode, done.stdout) == (1, b"451 4.4.1 Next hop unavailable, try again later\n")
    assert (directory / f"{first}.json").exists()


def test_command_release_needs_a_next_hop(filled: tuple[Path, list[str]], tmp_path: Path) -> None:
    """With --directory and no --upstream there is no next hop: exit status 2."""
    directory, (first, _) = filled
    done = smtpguard("quarantine", "--directory", str(directory), "release", first, cwd=tmp_path)
    assert (done.returncode, done.stderr) == (
        2,
        b"smtpguard quarantine: release needs --upstream ENDPOINT, or --config FILE with an [upstream] endpoint\n",
    )
