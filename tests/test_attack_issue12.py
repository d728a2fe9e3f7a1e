"""A careless administrator, a hostile HTTP client and a reload at the wrong moment
against the metrics endpoint, /readyz, the transaction log, SIGHUP and ``workers``
of a real ``twistd -n smtpguard`` (smtp-sink or clamd behind it)."""

from __future__ import annotations

import json
import signal
import smtplib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from smtpguard.replies import MESSAGE_TOO_BIG
from smtpguard.scanners import clamd_protocol as wire
from tests.conftest import SmtpSink, free_port, http_get
from tests.engines import Clamd
from tests.test_reload_twistd import wait_for_line, wait_until
from tests.test_twistd import LAUNCHERS, RECIPIENT, Starter
from tests.test_twistd import smtpguard as smtpguard  # the fixture

# What systemd gives a service that sets no LimitNOFILE (DefaultLimitNOFILE=1024:524288),
# as contrib/systemd/smtpguard.service does.
SYSTEMD_SOFT_NOFILE = 1024


def write_config(
    path: Path, port: int, metrics: int, upstream: str, server: str = "", scanner: str = "", tail: str = ""
) -> None:
    """smtpguard on ``port``, metrics on ``metrics``; ``server`` lines go into
    [server], ``tail`` (whole tables) at the end."""
    path.write_text(
        f'[server]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\nhostname = "guard.test"\n{server}\n'
        f'[upstream]\nendpoint = "{upstream}"\ntimeout = 30\n'
        + (scanner or '[[scanners]]\ntype = "builtin"\n')
        + f'[metrics]\nlisten = "tcp:{metrics}:interface=127.0.0.1"\n{tail}',
        encoding="utf-8",
    )


def sample(port: int, name: str, **labels: str) -> float:
    status, text = http_get(port, "/metrics")
    assert status == 200
    values = [
        found.value
        for family in text_string_to_metric_families(text)
        for found in family.samples
        if found.name == name and found.labels == labels
    ]
    return values[0] if values else 0.0


def relay(port: int, sender: str) -> dict[str, tuple[int, bytes]]:
    message = f"From: <{sender}>\r\nTo: <{RECIPIENT}>\r\nSubject: hello\r\n\r\nHello.\r\n".encode()
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=20) as client:
        return client.sendmail(sender, [RECIPIENT], message)


def test_two_workers_with_a_metrics_endpoint_both_serve(
    tmp_path: Path, smtpguard: Starter, smtp_sink: SmtpSink
) -> None:
    """``workers = 2`` with ``[metrics] listen`` (the contrib example turns metrics
    on; scaling.md says nothing against it, check-config passes): both workers get
    ready and neither exits.  Today every worker but the first dies with "cannot
    listen on tcp:...: address already in use" for the metrics port and is started
    again forever, so the service runs one worker while configured for two."""
    port, metrics = free_port(), free_port()
    config = tmp_path / "smtpguard.toml"
    write_config(config, port, metrics, smtp_sink.endpoint, server="workers = 2")
    running = smtpguard(LAUNCHERS["twistd"], "--config", str(config), port=port)

    wait_for_line(running, "worker 1 ready")
    wait_for_line(running, "worker 2 ready")
    assert "exited with status" not in running.text()
    assert "address already in use" not in running.text()


def idle_http_connections(port: int, count: int) -> Iterator[socket.socket]:
    """``count`` connections to ``port``, each with an unfinished request (slowloris)."""
    for _ in range(count):
        connection = socket.create_connection(("127.0.0.1", port), timeout=5)
        connection.sendall(b"GET /metrics HTTP/1.1\r\nHost: guard.test\r\n")
        yield connection


def test_idle_connections_to_the_metrics_endpoint_do_not_stop_mail(
    tmp_path: Path, smtpguard: Starter, smtp_sink: SmtpSink
) -> None:
    """With the 1024 file descriptors systemd gives the shipped unit, 1100 HTTP
    connections left idle on the metrics endpoint in mid-request must not take
    the SMTP listener down: a client still gets its message relayed (SMTP itself
    is bounded by max_connections = 20 here).  Today the metrics endpoint accepts
    every connection and keeps it (twisted.web's 12-hour idle timeout), the
    process runs out of descriptors and the SMTP client's connection is closed
    without a greeting."""
    port, metrics = free_port(), free_port()
    config = tmp_path / "smtpguard.toml"
    write_config(config, port, metrics, smtp_sink.endpoint, server="max_connections = 20")
    launcher = ["prlimit", f"--nofile={SYSTEMD_SOFT_NOFILE}:{SYSTEMD_SOFT_NOFILE}", *LAUNCHERS["twistd"]]
    smtpguard(launcher, "--config", str(config), port=port)

    hostile = list(idle_http_connections(metrics, SYSTEMD_SOFT_NOFILE + 76))
    try:
        assert relay(port, "alice@example.org") == {}
    finally:
        for connection in hostile:
            connection.close()
    [dump] = smtp_sink.messages(1)
    assert b"\nX-Virus-Status: clean\n" in dump


def transaction_senders(path: Path) -> list[str]:
    if not path.exists():
        return []
    *complete, _ = path.read_text(encoding="utf-8").split("\n")  # a line being written is left out
    return [json.loads(line.lstrip("\x1e"))["sender"] for line in complete]


def test_sighup_with_a_refused_file_still_reopens_the_transaction_log(
    tmp_path: Path, smtpguard: Starter, smtp_sink: SmtpSink
) -> None:
    """logrotate renames transactions.json and sends SIGHUP (logging.md's
    postrotate) while the configuration file is being edited and cannot be read:
    the reload is refused, but the log must still be reopened, so the next event
    goes to a new transactions.json.  Today the reopen is skipped with the refused
    reload and the event goes on into the rotated file (which logrotate compresses
    next: the events written after that are lost)."""
    port, metrics = free_port(), free_port()
    config, log = tmp_path / "smtpguard.toml", tmp_path / "transactions.json"
    write_config(config, port, metrics, smtp_sink.endpoint, tail=f'[logging]\nformat = "json"\nfile = "{log}"\n')
    running = smtpguard(LAUNCHERS["twistd"], "--config", str(config), port=port)
    assert relay(port, "before@example.org") == {}
    wait_until(lambda: transaction_senders(log) == ["before@example.org"])

    rotated = log.rename(tmp_path / "transactions.json.1")
    good = config.read_text(encoding="utf-8")
    config.write_text(good[: good.index('listen = "tcp:')] + "listen = ", encoding="utf-8")
    running.process.send_signal(signal.SIGHUP)
    wait_for_line(running, "configuration not reloaded")
    assert relay(port, "after@example.org") == {}
    wait_for_line(running, "from=<after@example.org>")

    assert transaction_senders(rotated) == ["before@example.org"]
    assert transaction_senders(log) == ["after@example.org"]


def test_a_message_over_max_message_size_counts_as_a_5xx_reply(
    tmp_path: Path, smtpguard: Starter, smtp_sink: SmtpSink
) -> None:
    """metrics.md: smtpguard_replies_total counts "the replies to the client's end
    of data".  A message larger than max_message_size sent without SIZE gets
    ``552 5.3.4`` at its end of data and must count once under class 5xx (the
    deferral and refusal ratios of the documented alerts are computed from it).
    Today it is not counted at all."""
    port, metrics = free_port(), free_port()
    config = tmp_path / "smtpguard.toml"
    write_config(config, port, metrics, smtp_sink.endpoint, server="max_message_size = 1000")
    smtpguard(LAUNCHERS["twistd"], "--config", str(config), port=port)
    listener = f"tcp:{port}:interface=127.0.0.1"

    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=20) as client:
        client.ehlo()
        assert client.mail("alice@example.org")[0] == 250
        assert client.rcpt(RECIPIENT)[0] == 250
        code, text = client.data(b"Subject: big\r\n\r\n" + b"x" * 3000 + b"\r\n")
    assert (code, text) == (MESSAGE_TOO_BIG.code, f"{MESSAGE_TOO_BIG.enhanced} {MESSAGE_TOO_BIG.text}".encode())

    assert sample(metrics, "smtpguard_replies_total", listener=listener, **{"class": "5xx"}) == 1.0
    assert smtp_sink.messages(0) == []


class HeldClamd(threading.Thread):
    """A clamd stand-in on loopback that answers ``PING`` with ``PONG`` only once
    ``release`` is set; ``pinged`` is set when a PING has arrived."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.pinged, self.release = threading.Event(), threading.Event()

    def run(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection:
            request = b""
            while b"\0" not in request:
                chunk = connection.recv(64)
                if not chunk:
                    return
                request += chunk
            assert request == wire.PING
            self.pinged.set()
            self.release.wait(20)
            try:
                connection.sendall(wire.PONG + b"\0")
            except OSError:
                pass

    def stop(self) -> None:
        self.release.set()
        self.server.close()


def clamd_scanner(endpoint: str) -> str:
    return f'[[scanners]]\ntype = "clamd"\nendpoint = "{endpoint}"\nstream_max_length = 10485760\n'


def test_readyz_asked_during_a_reload_does_not_report_the_scanner_down(
    tmp_path: Path, smtpguard: Starter, smtp_sink: SmtpSink, clamd: Clamd
) -> None:
    """A /readyz request whose PING is under way when SIGHUP puts a new
    configuration in force (both clamds answer PONG) must answer ``200 ready``.
    Today the reload closes the old scanner, which cancels the PING, and the
    probe is told ``503 no working scanner: clamd: ...: PING failed:
    CancelledError()``: a load balancer takes a working smtpguard out at each
    reload (seen with 50 SIGHUPs while scraping, without any held clamd)."""
    held = HeldClamd()
    held.start()
    try:
        port, metrics = free_port(), free_port()
        config = tmp_path / "smtpguard.toml"
        write_config(config, port, metrics, smtp_sink.endpoint, scanner=clamd_scanner(f"tcp:127.0.0.1:{held.port}"))
        running = smtpguard(LAUNCHERS["twistd"], "--config", str(config), port=port)
        answers: list[tuple[int, str]] = []
        probe = threading.Thread(target=lambda: answers.append(http_get(metrics, "/readyz")), daemon=True)
        probe.start()
        assert held.pinged.wait(20)

        write_config(config, port, metrics, smtp_sink.endpoint, scanner=clamd_scanner(clamd.unix_endpoint))
        running.process.send_signal(signal.SIGHUP)
        wait_for_line(running, "configuration reloaded (generation 2)")
        held.release.set()
        probe.join(20)
    finally:
        held.stop()

    assert answers == [(200, "ready\n")]
    assert http_get(metrics, "/readyz") == (200, "ready\n")


def resident_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    return int(status.split("VmRSS:")[1].split()[0])


def settled_resident_kib(pid: int) -> int:
    """The process's resident size once two readings half a second apart agree
    within 1 MiB (it has done what it was given)."""
    last = resident_kib(pid)
    for _ in range(60):
        time.sleep(0.5)
        now = resident_kib(pid)
        if abs(now - last) < 1024:
            return now
        last = now
    return last


def test_pipelined_scrapes_that_are_never_read_do_not_grow_memory(
    tmp_path: Path, smtpguard: Starter, smtp_sink: SmtpSink
) -> None:
    """One HTTP client pipelines ``GET /metrics`` requests on one connection as
    fast as smtpguard takes them and never reads an answer: smtpguard must stop
    taking requests once its answers wait unread, so its resident memory grows by
    less than 64 MiB.  Today it renders an answer (3.6 KB) for every request it
    has buffered, in the reactor that serves mail, and keeps them all: 2 MB of
    requests hold about 200 MB, and nothing limits the connections."""
    port, metrics = free_port(), free_port()
    config = tmp_path / "smtpguard.toml"
    write_config(config, port, metrics, smtp_sink.endpoint)
    running = smtpguard(LAUNCHERS["twistd"], "--config", str(config), port=port)
    assert http_get(metrics, "/metrics")[0] == 200
    before = settled_resident_kib(running.process.pid)

    requests = b"GET /metrics HTTP/1.1\r\nHost: guard.test\r\n\r\n" * 1000
    with socket.socket() as connection:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        connection.connect(("127.0.0.1", metrics))
        connection.settimeout(2)
        sent = 0
        try:
            while sent < 2 * 1024 * 1024:
                sent += connection.send(requests)
        except TimeoutError:
            pass  # smtpguard stopped reading
        after = settled_resident_kib(running.process.pid)

    assert after - before < 64 * 1024
