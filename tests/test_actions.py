"""What reaches the next hop for each decision, end to end: smtplib -> smtpguard
(built-in scanner, a configured policy) -> smtpguard's capture target, the result
parsed with Python's email package."""

from __future__ import annotations

import json
import smtplib
from email import message_from_bytes
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from smtpguard import config as configuration
from smtpguard import tap
from smtpguard.capture import capture_factory
from tests.conftest import listen
from tests.engines import EICAR

SENDER = "alice@example.org"
RECIPIENT = "bob@example.net"


def message(body: bytes, subject: str = "Quarterly report", extra: bytes = b"") -> bytes:
    return (
        b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: "
        + subject.encode()
        + b"\r\n"
        + extra
        + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
        b"--B\r\nContent-Type: text/plain\r\n\r\nSee attachment.\r\n"
        b"--B\r\nContent-Type: application/octet-stream; name=eicar.com\r\n"
        b"Content-Disposition: attachment; filename=eicar.com\r\n\r\n" + body + b"\r\n--B--\r\n"
    )


async def run(
    listening,
    tmp_path: Path,
    policy: dict[str, Any],
    body: bytes,
    scanners: list[dict[str, Any]] | None = None,
    **sections: Any,
) -> tuple[Any, list[tuple[bytes, dict[str, Any]]], int]:
    """Send one message through a guard with ``policy``; (the client's final reply,
    the captured messages, the guard's port)."""
    captured = tmp_path / "captured"
    hop = await listen(listening, capture_factory(reactor, str(captured)))
    data = {
        "server": {"hostname": "guard.test"},
        "upstream": {"endpoint": f"tcp:127.0.0.1:{hop}"},
        "scanners": scanners or [{"type": "builtin"}],
        "policy": policy,
        **sections,
    }
    guard = await listen(listening, tap.build_factory(configuration.parse(data, "test"), reactor))

    def send() -> Any:
        with smtplib.SMTP("127.0.0.1", guard, local_hostname="client.example", timeout=20) as client:
            client.ehlo()
            assert client.mail(SENDER)[0] == 250
            assert client.rcpt(RECIPIENT)[0] == 250
            return client.data(message(body, extra=b"X-Virus-Status: clean\r\n"))

    reply = await threads.deferToThread(send)
    stored = []
    for eml in sorted(captured.glob("*.eml")) if captured.exists() else []:
        stored.append((eml.read_bytes(), json.loads(eml.with_suffix(".json").read_text())))
    return reply, stored, guard


@pytest_twisted.ensureDeferred
async def test_replace_delivers_the_headers_with_a_notice(listening, tmp_path):
    """on_virus = "replace": the recipients get the original headers and a text/plain
    notice naming the endpoints, the file and the virus; the body is gone."""
    reply, stored, guard = await run(listening, tmp_path, {"on_virus": "replace"}, EICAR)
    assert reply[0] == 250
    ((raw, envelope),) = stored
    assert envelope["sender"] == SENDER and envelope["recipients"] == [RECIPIENT]
    parsed = message_from_bytes(raw, policy=default_policy)
    assert parsed["Subject"] == "Quarterly report"
    assert parsed.get_content_type() == "text/plain"
    assert parsed.get_all("X-Virus-Status") == ["infected (Eicar-Test-Signature)"]
    text = parsed.get_content()
    assert text.startswith("Your mail 127.0.0.1:")
    assert f"-127.0.0.1:{guard} contains contaminated file" in text
    assert text.rstrip().endswith("with virus Eicar-Test-Signature, so it is dropped.")
    assert EICAR not in raw and b"See attachment" not in raw


@pytest_twisted.ensureDeferred
async def test_discard_answers_250_and_relays_nothing(listening, tmp_path):
    """on_virus = "discard": the client hears 250, nothing reaches the next hop."""
    reply, stored, _ = await run(listening, tmp_path, {"on_virus": "discard"}, EICAR)
    assert reply == (250, b"2.0.0 Ok: message discarded")
    assert stored == []


@pytest_twisted.ensureDeferred
async def test_pass_delivers_with_status_headers_only(listening, tmp_path):
    """on_virus = "pass" (monitoring): delivered unchanged but for the status headers."""
    reply, stored, _ = await run(listening, tmp_path, {"on_virus": "pass"}, EICAR)
    assert reply[0] == 250
    ((raw, _),) = stored
    parsed = message_from_bytes(raw, policy=default_policy)
    assert parsed.get_all("X-Virus-Status") == ["infected (Eicar-Test-Signature)"]
    assert EICAR in raw


@pytest_twisted.ensureDeferred
async def test_forged_status_header_is_replaced(listening, tmp_path):
    """A clean message's own X-Virus-Status from the client is removed; only ours remains."""
    reply, stored, _ = await run(listening, tmp_path, {}, b"harmless")
    assert reply[0] == 250
    ((raw, _),) = stored
    assert message_from_bytes(raw, policy=default_policy).get_all("X-Virus-Status") == ["clean"]


BROKEN_SCANNER = [{"type": "clamd", "endpoint": "unix:/nonexistent/clamd.sock", "timeout": 5}]


@pytest_twisted.ensureDeferred
async def test_error_pass_tags_the_subject(listening, tmp_path):
    """fail_mode = "pass": delivered with the subject tag appended and the status unchecked."""
    policy = {"fail_mode": "pass", "subject_tag": "(No virus check due to scan error)"}
    reply, stored, _ = await run(listening, tmp_path, policy, b"harmless", BROKEN_SCANNER)
    assert reply[0] == 250
    ((raw, _),) = stored
    parsed = message_from_bytes(raw, policy=default_policy)
    assert parsed["Subject"] == "Quarterly report (No virus check due to scan error)"
    assert parsed.get_all("X-Virus-Status") == ["unchecked (engine-not-ready)"]


@pytest_twisted.ensureDeferred
async def test_error_drop_replaces_with_the_reason(listening, tmp_path):
    """fail_mode = "drop": the body is replaced by a notice saying why."""
    reply, stored, _ = await run(listening, tmp_path, {"fail_mode": "drop"}, b"harmless", BROKEN_SCANNER)
    assert reply[0] == 250
    ((raw, _),) = stored
    text = message_from_bytes(raw, policy=default_policy).get_content()
    assert text.rstrip().endswith("is dropped for scan error (engine-not-ready).")
    assert b"harmless" not in raw


@pytest_twisted.ensureDeferred
async def test_error_defer_answers_451(listening, tmp_path):
    """fail_mode = "defer" (the default): 451 4.7.1, nothing relayed."""
    reply, stored, _ = await run(listening, tmp_path, {}, b"harmless", BROKEN_SCANNER)
    assert (reply[0], reply[1][:5], stored) == (451, b"4.7.1", [])


@pytest_twisted.ensureDeferred
async def test_quarantine_keeps_the_original_and_releases_it(listening, tmp_path):
    """With quarantine = true the infected original is kept while a notice is delivered;
    a release re-injects the original to the original recipient."""
    from smtpguard.quarantine import Quarantine
    from smtpguard.upstream import Upstream, UpstreamSettings

    vault = tmp_path / "quarantine"
    policy = {"on_virus": "replace", "quarantine": True}
    reply, stored, _ = await run(listening, tmp_path, policy, EICAR, quarantine={"directory": str(vault)})
    assert reply[0] == 250 and len(stored) == 1 and EICAR not in stored[0][0]
    quarantine = Quarantine(str(vault), reactor)
    (entry,) = quarantine.list()
    assert EICAR in (vault / f"{entry.id}.eml").read_bytes()
    hop = await listen(listening, capture_factory(reactor, str(tmp_path / "released")))
    released = await quarantine.release(entry.id, Upstream(reactor, UpstreamSettings(f"tcp:127.0.0.1:{hop}")))
    assert released.code == 250
    ((raw, meta),) = [
        (path.read_bytes(), json.loads(path.with_suffix(".json").read_text()))
        for path in (tmp_path / "released").glob("*.eml")
    ]
    assert EICAR in raw and meta["recipients"] == [RECIPIENT] and meta["sender"] == SENDER
    assert quarantine.list() == []


@pytest_twisted.ensureDeferred
async def test_quarantine_without_a_directory_is_a_configuration_error(listening, tmp_path):
    """quarantine = true without a [quarantine] directory stops the start, naming the key."""
    from smtpguard.config import ConfigError

    with pytest.raises(ConfigError, match=r"policy\.quarantine: needs a \[quarantine\] directory"):
        await run(listening, tmp_path, {"quarantine": True}, EICAR)


@pytest_twisted.ensureDeferred
async def test_notices_reach_sender_and_admin_through_the_proxy(listening, tmp_path):
    """With notify_sender_on_virus and an admin, the twistd-built service sends a DSN
    (with the ENVID and ORCPT) to the sender and a notice to the admin, both with
    MAIL FROM:<>, through the next hop, after the client's reply."""
    from email.message import EmailMessage

    from twisted.internet import task

    captured = tmp_path / "captured"
    hop = await listen(listening, capture_factory(reactor, str(captured)))
    data = {
        "server": {"hostname": "guard.test", "listen": ["tcp:0:interface=127.0.0.1"]},
        "upstream": {"endpoint": f"tcp:127.0.0.1:{hop}"},
        "scanners": [{"type": "builtin"}],
        "policy": {"on_virus": "replace", "notify_sender_on_virus": True},
        "notifications": {"outbox": str(tmp_path / "outbox"), "admin": "security@example.net"},
    }
    service = tap.build_service(configuration.parse(data, "test"), reactor)
    service.startService()
    try:
        listener = list(service)[-1]
        port = (await listener._waitingForPort).getHost().port

        def send() -> Any:
            with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=20) as client:
                client.ehlo()
                assert client.mail(SENDER, ["ENVID=QQ314159"])[0] == 250
                assert client.rcpt(RECIPIENT, ["NOTIFY=FAILURE", "ORCPT=rfc822;bob@example.net"])[0] == 250
                return client.data(message(EICAR))

        assert (await threads.deferToThread(send))[0] == 250
        for _ in range(100):
            if len(list(captured.glob("*.eml"))) >= 3:
                break
            await task.deferLater(reactor, 0.05, lambda: None)
    finally:
        await service.stopService()
    stored = {}
    for eml in captured.glob("*.eml"):
        meta = json.loads(eml.with_suffix(".json").read_text())
        stored[tuple(meta["recipients"])] = (
            meta["sender"],
            message_from_bytes(eml.read_bytes(), policy=default_policy),
        )
    assert set(stored) == {(RECIPIENT,), (SENDER,), ("security@example.net",)}
    dsn_sender, dsn = stored[(SENDER,)]
    assert dsn_sender == "" and dsn.get_content_type() == "multipart/report"
    status = next(part for part in dsn.walk() if part.get_content_type() == "message/delivery-status")
    text = status.as_string()
    assert "Original-Envelope-Id: QQ314159" in text
    assert "Original-Recipient: rfc822;bob@example.net" in text
    assert "Action: failed" in text and "Status: 5.7.1" in text
    assert EICAR not in dsn.as_bytes()
    admin_sender, admin = stored[("security@example.net",)]
    assert admin_sender == "" and "Eicar-Test-Signature" in admin.get_content()
    assert isinstance(admin, EmailMessage)
