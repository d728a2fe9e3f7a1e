"""Starting smtpguard as a real process: each start-up failure is one line that
names what failed (no traceback), a clamd that is down does not stop start-up,
and a socket handed over by systemd (through systemd-socket-activate) is served."""

from __future__ import annotations

import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpguard import config as configuration
from smtpguard import replies
from smtpguard.sdnotify import notify
from tests.certificates import throwaway_certificate
from tests.conftest import SmtpSink, free_port, require_program
from tests.test_twistd import LAUNCHERS, REPO, TWISTD, Running, Starter, assert_relayed, environment, run, send

SYSTEMD_LISTENER = "systemd:domain=INET:index=0"
CONTRIB = REPO / "contrib" / "systemd"
NOWHERE = ["--upstream", "tcp:127.0.0.1:1", "--scanner", "builtin"]  # never reached: start-up fails first
CAPTURE = [sys.executable, "-m", "smtpguard.cli", "capture"]
# twistd's log lines start with a time and the logging system: "2026-... [stderr#error] ".
LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\dT\S+ \[[^\]]*\] ")


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port on 127.0.0.1 that something else listens on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


def said(result: subprocess.CompletedProcess[str]) -> list[str]:
    """What the process said, twistd's log prefixes taken off, without twistd's
    own start-up lines."""
    lines = [LOG_PREFIX.sub("", line) for line in (result.stdout + result.stderr).splitlines()]
    return [line for line in lines if not line.startswith(("twistd ", "reactor class:", "Main loop terminated"))]


def wait_for_output(path: Path, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(encoding="utf-8", errors="replace"):
        if time.monotonic() > deadline:
            pytest.fail(f"{text!r} not said within {timeout} s:\n{path.read_text(errors='replace')}")
        time.sleep(0.02)


def write_config(tmp_path: Path, server: str, scanner: str = 'type = "builtin"') -> Path:
    config = tmp_path / "smtpguard.toml"
    config.write_text(
        f'[server]\nlisten = ["tcp:0:interface=127.0.0.1"]\n{server}\n'
        f'[upstream]\nendpoint = "tcp:127.0.0.1:10026"\n[[scanners]]\n{scanner}\n',
        encoding="utf-8",
    )
    return config


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_port_in_use_stops_smtpguard_in_one_line(launcher: str, tmp_path: Path, taken_port: int) -> None:
    """A --listen port that another program holds: smtpguard exits 1 saying
    "smtpguard: cannot listen on ENDPOINT: address already in use", and nothing else."""
    endpoint = f"tcp:{taken_port}:interface=127.0.0.1"

    result = run([*LAUNCHERS[launcher], "smtpguard", "--listen", endpoint, *NOWHERE], tmp_path)

    assert result.returncode == 1
    assert said(result) == [f"smtpguard: cannot listen on {endpoint}: address already in use"]


def test_systemd_listener_without_a_passed_socket_stops_twistd_in_one_line(tmp_path: Path) -> None:
    """A systemd: listener started outside systemd (no LISTEN_FDS): twistd exits 1
    with one line naming the endpoint and what to do."""
    result = run([*LAUNCHERS["twistd"], "smtpguard", "--listen", SYSTEMD_LISTENER, *NOWHERE], tmp_path)

    assert result.returncode == 1
    assert said(result) == [
        f"smtpguard: cannot listen on {SYSTEMD_LISTENER}: systemd passed no such socket"
        " (start smtpguard through its .socket unit)"
    ]


def test_missing_tls_certificate_stops_twistd_naming_the_file(tmp_path: Path) -> None:
    """tls_certificate names a file that does not exist: twistd exits 1 with one
    line naming the configuration file, the key, the certificate file and the reason."""
    key, _ = throwaway_certificate("guard.test")
    (tmp_path / "key.pem").write_bytes(key)
    missing = tmp_path / "missing.pem"
    config = write_config(tmp_path, f'tls_certificate = "{missing}"\ntls_key = "{tmp_path / "key.pem"}"')

    result = run([*LAUNCHERS["twistd"], "smtpguard", "--config", str(config)], tmp_path)

    assert result.returncode == 1
    assert said(result) == [
        f"smtpguard: {config}: server.tls_certificate: cannot read '{missing}': No such file or directory"
    ]


def test_tls_key_of_another_certificate_stops_twistd(tmp_path: Path) -> None:
    """tls_key holds the key of a different certificate: twistd exits 1 with one
    line naming both files."""
    certificate = tmp_path / "cert.pem"
    certificate.write_bytes(throwaway_certificate("guard.test")[1])
    key = tmp_path / "key.pem"
    key.write_bytes(throwaway_certificate("other.test")[0])
    config = write_config(tmp_path, f'tls_certificate = "{certificate}"\ntls_key = "{key}"')

    result = run([*LAUNCHERS["twistd"], "smtpguard", "--config", str(config)], tmp_path)

    assert result.returncode == 1
    assert said(result) == [
        f"smtpguard: {config}: server.tls_key: '{key}' is not the key of the certificate in '{certificate}'"
    ]


def test_clamd_down_at_start_does_not_stop_twistd(tmp_path: Path, smtp_sink: SmtpSink) -> None:
    """A clamd socket that nothing serves when twistd starts: smtpguard listens all
    the same, and a message gets SCAN_DEFERRED (the default fail_mode, defer)."""
    port = free_port()
    starter = Starter(tmp_path)
    clamd = "clamd:unix:/nonexistent/clamd.ctl"
    try:
        starter(LAUNCHERS["twistd"], "--listen", f"tcp:{port}:interface=127.0.0.1", "--upstream", smtp_sink.endpoint,
                "--scanner", clamd, port=port)  # fmt: skip

        with pytest.raises(smtplib.SMTPDataError) as refused:
            send(port, "while clamd is down")
    finally:
        for running in starter.started:
            running.stop()

    assert (refused.value.smtp_code, refused.value.smtp_error) == (
        replies.SCAN_DEFERRED.code,
        f"{replies.SCAN_DEFERRED.enhanced} {replies.SCAN_DEFERRED.text}".encode(),
    )


def test_socket_passed_by_systemd_is_served(tmp_path: Path, smtp_sink: SmtpSink) -> None:
    """systemd-socket-activate holds the port and starts twistd on the first
    connection with --listen systemd:domain=INET:index=0: that first client is
    answered and its message reaches smtp-sink."""
    activate = require_program("systemd-socket-activate")
    port = free_port()
    output = tmp_path / "smtpguard.log"
    with output.open("wb") as sink:
        # --fdname sets LISTEN_FDNAMES, which Twisted requires beside LISTEN_FDS (as
        # systemd itself always sets it); -E passes what the launcher would otherwise drop.
        process = subprocess.Popen(
            [
                *(activate, "-l", f"127.0.0.1:{port}", "--fdname=smtp", "-E", f"PYTHONPATH={REPO}"),
                *(*TWISTD, "-n", "--pidfile=", "smtpguard", "--listen", SYSTEMD_LISTENER),
                *("--upstream", smtp_sink.endpoint, "--scanner", "builtin"),
            ],
            cwd=tmp_path,
            env=environment(),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    running = Running(process, output, port)
    try:
        wait_for_output(output, f"Listening on 127.0.0.1:{port}")
        message, refused = send(port, "socket activation")

        assert refused == {}
        assert_relayed(smtp_sink, message)
    finally:
        running.stop()


def test_capture_on_a_port_in_use_exits_in_one_line(tmp_path: Path, taken_port: int) -> None:
    """``smtpguard capture`` on a port another program holds exits 1 with one line
    on standard error, and no traceback."""
    endpoint = f"tcp:{taken_port}:interface=127.0.0.1"

    result = run([*CAPTURE, "--listen", endpoint, "--directory", str(tmp_path / "capture")], tmp_path)

    assert result.returncode == 1
    assert result.stderr == f"smtpguard capture: cannot listen on {endpoint}: address already in use\n"


def test_capture_stops_on_sigterm_with_status_0(tmp_path: Path) -> None:
    """``smtpguard capture`` serves until SIGTERM, then exits 0."""
    port = free_port()
    endpoint = f"tcp:{port}:interface=127.0.0.1"
    process = subprocess.Popen(
        [*CAPTURE, "--listen", endpoint, "--directory", str(tmp_path / "capture")],
        cwd=tmp_path,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    running = Running(process, tmp_path / "capture.log", port)
    running.wait_until_listening()

    process.terminate()

    assert running.process.wait(10) == 0


def test_example_configuration_is_valid() -> None:
    """contrib/systemd/smtpguard.toml, the unit's example, passes the configuration checks."""
    loaded = configuration.load(str(CONTRIB / "smtpguard.toml"))

    assert [listener.endpoint for listener in loaded.listeners] == [SYSTEMD_LISTENER]


def test_systemd_units_verify(tmp_path: Path) -> None:
    """systemd-analyze verify finds nothing wrong in smtpguard.service and
    smtpguard.socket (with ExecStart's twistd pointed at this environment's)."""
    analyze = require_program("systemd-analyze")
    twistd = Path(sys.executable).parent / "twistd"
    service = (CONTRIB / "smtpguard.service").read_text(encoding="utf-8")
    (tmp_path / "smtpguard.service").write_text(service.replace("/opt/smtpguard/bin/twistd", str(twistd)))
    (tmp_path / "smtpguard.socket").write_text((CONTRIB / "smtpguard.socket").read_text(encoding="utf-8"))

    result = run([analyze, "verify", "--man=no", "smtpguard.service", "smtpguard.socket"], tmp_path)

    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_systemd_hears_ready_once_smtpguard_listens_and_a_sighup_then_reloads(
    tmp_path: Path, smtp_sink: SmtpSink
) -> None:
    """Started with ``$NOTIFY_SOCKET`` (``Type=notify``), twistd sends ``READY=1``
    with its pid once its port accepts connections; a SIGHUP sent as soon as
    systemd hears it (``systemctl reload`` right after the start) reloads the
    configuration instead of ending the process; stopping says ``STOPPING=1``."""
    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(30)
    port = free_port()
    config = tmp_path / "smtpguard.toml"
    config.write_text(f'[server]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n\n[[scanners]]\ntype = "builtin"\n')
    output = tmp_path / "smtpguard.log"
    with output.open("wb") as log:
        process = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "smtpguard", "--config", str(config), "--upstream", smtp_sink.endpoint],
            cwd=tmp_path,
            env={**environment(), "NOTIFY_SOCKET": str(notify_path)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    running = Running(process, output, port)
    try:
        ready = listener.recv(4096).decode("ascii")
        assert ready == f"READY=1\nMAINPID={process.pid}"
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
        process.send_signal(signal.SIGHUP)
        wait_for_output(output, "configuration reloaded (generation 2)")
        message, refused = send(port, "after the reload")
        assert refused == {}
        assert_relayed(smtp_sink, message)
        process.send_signal(signal.SIGTERM)
        assert listener.recv(4096) == b"STOPPING=1"
        assert process.wait(30) == -signal.SIGTERM
    finally:
        listener.close()
        running.stop()


def test_notify_without_a_notify_socket_sends_nothing() -> None:
    """Outside systemd (no ``$NOTIFY_SOCKET``) nothing is sent."""
    assert notify("READY=1", {}) is False


def test_notify_reaches_an_abstract_socket() -> None:
    """``$NOTIFY_SOCKET`` starting with ``@`` names an abstract socket, as systemd
    gives it."""
    name = f"smtpguard-test-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        assert notify("READY=1", {"NOTIFY_SOCKET": "@" + name}) is True
        assert listener.recv(100) == b"READY=1"
