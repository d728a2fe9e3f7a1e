"""The real ``twistd smtpguard`` (and ``twist smtpguard``) as a subprocess, finding
the checkout's twisted/plugins/smtpguard_plugin.py through PYTHONPATH, relaying
smtplib's mail to Postfix's smtp-sink."""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SmtpSink, free_port

REPO = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]
# ``python -m twisted`` is ``twist``: always in the foreground, no pidfile.
TWIST = [sys.executable, "-m", "twisted"]
LAUNCHERS = {"twistd": [*TWISTD, "-n", "--pidfile="], "twist": TWIST}
SENDER = "alice@example.org"
RECIPIENT = "bob@example.net"


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def run(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(arguments, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=30)


class Running:
    """A started smtpguard process and its combined output."""

    def __init__(self, process: subprocess.Popen[bytes], output: Path, port: int) -> None:
        self.process = process
        self.output = output
        self.port = port

    def text(self) -> str:
        return self.output.read_text(encoding="utf-8", errors="replace")

    def wait_until_listening(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"smtpguard exited with {self.process.returncode}:\n{self.text()}")
            try:
                smtplib.SMTP("127.0.0.1", self.port, timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"smtpguard did not listen on {self.port} within {timeout} s:\n{self.text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


class Starter:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Running] = []

    def __call__(self, launcher: list[str], *options: str, port: int) -> Running:
        running = self.spawn(launcher, *options, port=port)
        running.wait_until_listening()
        return running

    def spawn(self, launcher: list[str], *options: str, port: int) -> Running:
        """Started, without waiting for it to listen."""
        output = self.directory / f"smtpguard-{len(self.started)}.log"
        with output.open("wb") as sink:
            process = subprocess.Popen(
                [*launcher, "smtpguard", *options],
                cwd=self.directory,
                env=environment(),
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        running = Running(process, output, port)
        self.started.append(running)
        return running


@pytest.fixture
def smtpguard(tmp_path: Path) -> Iterator[Starter]:
    starter = Starter(tmp_path)
    yield starter
    for running in starter.started:
        running.stop()


def send(port: int, subject: str) -> tuple[bytes, dict[str, tuple[int, bytes]]]:
    message = f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: {subject}\r\n\r\nHello.\r\n".encode()
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=20) as client:
        return message, client.sendmail(SENDER, [RECIPIENT], message)


def assert_relayed(sink: SmtpSink, message: bytes) -> None:
    [dump] = sink.messages(1)
    head, _, body = dump.partition(b"\nX-Virus-Status: clean\n")
    assert body == message.replace(b"\r\n", b"\n") + b"\n"
    assert b"\nReceived: from client.example ([127.0.0.1])\n" in head
    assert b"\nX-Virus-Scanned: smtpguard (builtin) on " in head


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_command_line_options_relay_a_message(launcher: str, smtpguard: Starter, smtp_sink: SmtpSink) -> None:
    """--listen, --upstream and --scanner builtin alone make a working proxy: smtp-sink
    gets the message with smtpguard's headers."""
    port = free_port()
    smtpguard(
        LAUNCHERS[launcher],
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--upstream",
        smtp_sink.endpoint,
        "--scanner",
        "builtin",
        port=port,
    )

    message, refused = send(port, f"via {launcher}")

    assert refused == {}
    assert_relayed(smtp_sink, message)


def test_config_file_relays_a_message(tmp_path: Path, smtpguard: Starter, smtp_sink: SmtpSink) -> None:
    """The same proxy configured by a TOML file given with --config."""
    port = free_port()
    config = tmp_path / "smtpguard.toml"
    config.write_text(
        "[server]\n"
        f'listen = ["tcp:{port}:interface=127.0.0.1"]\n'
        'hostname = "guard.test"\n'
        "[upstream]\n"
        f'endpoint = "{smtp_sink.endpoint}"\n'
        "timeout = 30\n"
        "[[scanners]]\n"
        'type = "builtin"\n',
        encoding="utf-8",
    )
    smtpguard(LAUNCHERS["twistd"], "--config", str(config), port=port)

    message, refused = send(port, "via --config")

    assert refused == {}
    assert_relayed(smtp_sink, message)
    [dump] = smtp_sink.messages(1)
    assert b"\n\tby guard.test (smtpguard) with ESMTP id " in dump
    assert b"\nX-Helo-Args: guard.test\n" in dump


def test_subprocesses_find_the_checkout(tmp_path: Path) -> None:
    """With PYTHONPATH at the repository root, the checkout's twisted/plugins folder is
    searched for plugins and the smtpguard service maker runs the checkout's smtpguard.tap."""
    probe = (
        "import smtpguard.tap, twisted.plugins\n"
        "from twisted.application.service import IServiceMaker\n"
        "from twisted.plugin import getPlugins\n"
        "print(smtpguard.tap.__file__)\n"
        "print(sorted({m.module for m in getPlugins(IServiceMaker) if m.tapname == 'smtpguard'}))\n"
        "print(twisted.plugins.__path__)\n"
    )

    result = run([sys.executable, "-c", probe], tmp_path)

    assert result.returncode == 0, result.stderr
    tap, makers, plugin_path = result.stdout.splitlines()
    assert tap == str(REPO / "smtpguard" / "tap.py")
    assert makers == "['smtpguard.tap']"
    assert repr(str(REPO / "twisted" / "plugins")) in plugin_path


def test_help_lists_the_options(tmp_path: Path) -> None:
    """``twistd smtpguard --help`` exits 0 and lists --config, --listen, --upstream and --scanner."""
    result = run([*TWISTD, "smtpguard", "--help"], tmp_path)

    assert result.returncode == 0, result.stderr
    flags = {word.rstrip("=,") for line in result.stdout.splitlines() for word in line.split() if word.startswith("--")}
    assert {"--config", "--listen", "--upstream", "--scanner"} <= flags


def refused(tmp_path: Path, server: str, scanner: str) -> tuple[Path, str]:
    """Start twistd with a file of these [server] and [[scanners]] lines; it must
    exit non-zero.  The file and what twistd said."""
    config = tmp_path / "smtpguard.toml"
    config.write_text(
        f'[server]\n{server}\n[upstream]\nendpoint = "tcp:127.0.0.1:10026"\n[[scanners]]\n{scanner}\n',
        encoding="utf-8",
    )
    result = run([*LAUNCHERS["twistd"], "smtpguard", "--config", str(config)], tmp_path)
    assert result.returncode != 0
    return config, result.stdout + result.stderr


def test_bad_config_file_stops_twistd_naming_the_key(tmp_path: Path) -> None:
    """max_message_size = "big" makes twistd exit non-zero with a message naming the
    file and server.max_message_size."""
    config, said = refused(tmp_path, 'max_message_size = "big"', 'type = "builtin"')
    assert f"{config}: server.max_message_size: expected an integer, got 'big'" in said


def test_max_message_size_above_clamds_limit_stops_twistd(tmp_path: Path) -> None:
    """max_message_size = 52428800 with a clamd scanner (25 MiB by default) makes
    twistd exit non-zero, naming both keys, both numbers and the fix."""
    config, said = refused(
        tmp_path, "max_message_size = 52428800", 'type = "clamd"\nendpoint = "unix:/nonexistent/clamd.ctl"'
    )
    assert (
        f"{config}: server.max_message_size: 52428800 bytes is more than scanners[0].stream_max_length"
        " (26214400 bytes), the largest message the scanners take: set max_message_size to 26214400 or less,"
        " or raise scanners[0].stream_max_length together with StreamMaxLength in clamd.conf"
    ) in said
