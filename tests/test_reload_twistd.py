"""SIGHUP to a real ``twistd -n smtpguard`` while smtplib clients send without a
pause to Postfix's smtp-sink: no session is dropped, every message told 250
arrives, sessions under way keep their policy and the next session gets the new
one; a file that cannot be built is refused and the policy in force stays."""

from __future__ import annotations

import re
import signal
import smtplib
import threading
import time
from pathlib import Path

import pytest

from smtpguard.scanners.builtin import EICAR
from tests.conftest import SmtpSink, free_port
from tests.test_twistd import LAUNCHERS, RECIPIENT, SENDER, Running, Starter, smtpguard  # noqa: F401 (the fixture)

CLIENTS = 3
VIRUS_REJECTED = 554


def write_config(path: Path, port: int, sink: SmtpSink, on_virus: str) -> None:
    path.write_text(
        f'[server]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\nhostname = "guard.test"\n'
        f'[upstream]\nendpoint = "{sink.endpoint}"\ntimeout = 30\n'
        f'[[scanners]]\ntype = "builtin"\n[policy]\non_virus = "{on_virus}"\n',
        encoding="utf-8",
    )


def message(subject: str, body: bytes = b"Hello.") -> bytes:
    return f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: {subject}\r\n\r\n".encode() + body + b"\r\n"


def wait_for_line(running: Running, text: str, timeout: float = 15.0) -> str:
    """The first line of smtpguard's output containing ``text``, once it is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in running.text().splitlines():
            if text in line:
                return line
        time.sleep(0.02)
    pytest.fail(f"no {text!r} in smtpguard's output:\n{running.text()}")


def send_virus(port: int, subject: str) -> int:
    """EICAR in a new session: the code of the reply to its end of data."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=20) as client:
        try:
            client.sendmail(SENDER, [RECIPIENT], message(subject, EICAR))
        except smtplib.SMTPDataError as error:
            return error.smtp_code
        return 250


class Client(threading.Thread):
    """One SMTP session kept open, sending one message after another until told
    to stop; once ``reloaded`` is set it sends EICAR once in that same session."""

    def __init__(self, number: int, port: int, reloaded: threading.Event, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.number, self.port, self.reloaded, self.stop = number, port, reloaded, stop
        self.accepted: list[str] = []  # subjects told 250
        self.virus_reply: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.example", timeout=20) as client:
                sent = 0
                while not self.stop.is_set():
                    if self.reloaded.is_set() and self.virus_reply is None:
                        try:
                            client.sendmail(SENDER, [RECIPIENT], message(f"virus-{self.number}", EICAR))
                            self.virus_reply = 250
                            self.accepted.append(f"virus-{self.number}")
                        except smtplib.SMTPDataError as error:
                            self.virus_reply = error.smtp_code
                    subject = f"c{self.number}-{sent}"
                    assert client.sendmail(SENDER, [RECIPIENT], message(subject)) == {}
                    self.accepted.append(subject)
                    sent += 1
        except BaseException as error:
            self.error = error


def subjects(sink: SmtpSink, expected: int) -> list[str]:
    dumps = sink.messages(expected, timeout=20.0)
    return sorted(match.decode() for dump in dumps for match in re.findall(rb"\nSubject: (\S+)\n", dump))


def wait_until(condition: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.02)


def test_sighup_reloads_while_mail_flows(tmp_path: Path, smtpguard: Starter, smtp_sink: SmtpSink) -> None:  # noqa: F811
    """Three clients send continuously; on_virus turns from reject to pass and
    twistd gets SIGHUP: no session drops, each client's open session still
    rejects EICAR with 554 (its policy), a new session gets 250 for EICAR, and
    smtp-sink has exactly the messages told 250.  Then on_virus = "explode" and
    SIGHUP: one error names the file and policy.on_virus, and a new session still
    gets 250 for EICAR."""
    port = free_port()
    config = tmp_path / "smtpguard.toml"
    write_config(config, port, smtp_sink, "reject")
    running = smtpguard(LAUNCHERS["twistd"], "--config", str(config), port=port)
    reloaded, stop = threading.Event(), threading.Event()
    clients = [Client(number, port, reloaded, stop) for number in range(CLIENTS)]
    for client in clients:
        client.start()
    wait_until(lambda: all(len(client.accepted) >= 3 for client in clients))

    write_config(config, port, smtp_sink, "pass")
    running.process.send_signal(signal.SIGHUP)
    wait_for_line(running, "configuration reloaded (generation 2)")
    reloaded.set()
    new_session_virus = send_virus(port, "virus-new")
    wait_until(lambda: all(client.virus_reply is not None for client in clients))
    counts = [len(client.accepted) for client in clients]
    wait_until(lambda: all(len(client.accepted) >= count + 3 for client, count in zip(clients, counts, strict=True)))
    stop.set()
    for client in clients:
        client.join(30)

    assert [client.error for client in clients] == [None] * CLIENTS
    assert [client.virus_reply for client in clients] == [VIRUS_REJECTED] * CLIENTS
    assert new_session_virus == 250
    told_250 = sorted([subject for client in clients for subject in client.accepted] + ["virus-new"])
    assert subjects(smtp_sink, len(told_250)) == told_250

    write_config(config, port, smtp_sink, "explode")
    running.process.send_signal(signal.SIGHUP)
    refused = wait_for_line(running, "configuration not reloaded")
    assert f"the one in force stays: {config}: policy.on_virus: " in refused
    assert send_virus(port, "virus-after-refusal") == 250
    assert running.text().count("configuration not reloaded") == 1
