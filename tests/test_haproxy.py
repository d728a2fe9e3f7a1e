"""Scale-out on loopback: HAProxy (mode tcp, PROXY protocol v2, SMTP health
checks) in front of two ``twistd -n smtpguard`` processes, both relaying to one
strict next hop that offers XFORWARD.  Clients are smtplib sessions bound to
127.0.0.x addresses of their own, so the address that reaches the next hop can
only have come through the PROXY header."""

from __future__ import annotations

import csv
import signal
import smtplib
import socket
import subprocess
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor

from smtpguard import replies
from tests.conftest import StrictHops, free_port, require_program, wait_for_port
from tests.engines import EICAR_SIGNATURE
from tests.strict_hop import HopMessage, Postfix, StrictHop, fill, stored_size
from tests.test_integration import CLIENT_HELO, EICAR, RECIPIENT, SENDER, in_thread, sleep, text_message, wire
from tests.test_twistd import LAUNCHERS, Running, Starter

GUARDS = ("guard-a", "guard-b")  # HAProxy's server names, and each instance's hostname (.test)
CHECK_INTERVAL_MS = 100
CLIENT_TIMEOUT = 20.0
# Bounds on polling, so that a broken setup fails instead of hanging.
POLLS = 200
POLL_SECONDS = 0.05
GATE_SECONDS = 20.0


class HAProxy:
    """A private haproxy in the foreground (-db) with one SMTP frontend on loopback
    and a backend of smtpguard instances, each reached with the PROXY protocol v2
    and checked with ``option smtpchk`` (the check's own PROXY header too), and an
    admin socket to read the servers' states from."""

    def __init__(self, directory: Path, servers: dict[str, int]) -> None:
        self.binary = require_program("haproxy")
        self.port = free_port()
        self.admin = directory / "haproxy.sock"
        self.config = directory / "haproxy.cfg"
        self.log = directory / "haproxy.log"
        lines = [
            "global",
            f"    stats socket {self.admin} level admin",
            "defaults",
            "    mode tcp",
            "    timeout connect 5s",
            "    timeout client 60s",
            "    timeout server 60s",
            "    retries 3",
            "    option redispatch",
            "frontend smtp",
            f"    bind 127.0.0.1:{self.port}",
            "    default_backend smtpguard",
            "backend smtpguard",
            "    balance roundrobin",
            "    option smtpchk EHLO haproxy.test",
            f"    default-server send-proxy-v2 check check-send-proxy inter {CHECK_INTERVAL_MS} fall 2 rise 2",
            *[f"    server {name} 127.0.0.1:{port}" for name, port in servers.items()],
        ]
        self.config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as output:
            self.process = subprocess.Popen(
                [self.binary, "-db", "-f", str(self.config)], stdout=output, stderr=subprocess.STDOUT
            )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def states(self) -> dict[str, str]:
        """Each server's status as HAProxy's ``show stat`` gives it: UP, DOWN ..."""
        with socket.socket(socket.AF_UNIX) as admin:
            admin.settimeout(5)
            admin.connect(str(self.admin))
            admin.sendall(b"show stat\n")
            chunks = []
            while chunk := admin.recv(65536):
                chunks.append(chunk)
        rows = csv.DictReader(b"".join(chunks).decode().lstrip("# ").splitlines())
        return {
            row["svname"]: row["status"] for row in rows if row["pxname"] == "smtpguard" and row["svname"] in GUARDS
        }

    async def wait_for(self, expected: dict[str, str]) -> None:
        for _ in range(POLLS):
            if self.states() == expected:
                return
            await sleep(POLL_SECONDS)
        pytest.fail(f"HAProxy's servers are {self.states()}, not {expected}:\n{self.log.read_text(errors='replace')}")


@attrs.frozen
class Farm:
    """HAProxy, the two smtpguard instances behind it (by server name) and their next hop."""

    haproxy: HAProxy
    guards: dict[str, Running]
    hop: StrictHop


def guard_config(directory: Path, name: str, port: int, hop: StrictHop, scanners: str) -> Path:
    config = directory / f"{name}.toml"
    config.write_text(
        "[server]\n"
        f'listen = ["tcp:{port}:interface=127.0.0.1"]\n'
        f'hostname = "{name}.test"\n'
        "proxy_protocol = true\n"
        'trusted_proxies = ["127.0.0.1"]\n'
        "[upstream]\n"
        f'endpoint = "{hop.endpoint}"\n'
        "[policy]\n"
        'on_virus = "reject"\n' + scanners,
        encoding="utf-8",
    )
    return config


@pytest.fixture
def farm_starter(tmp_path: Path, strict_hops: StrictHops) -> Iterator[Any]:
    """``farm_starter(scanners)`` starts the next hop, both instances (with this
    ``[[scanners]]`` TOML) and HAProxy, and waits until HAProxy's checks find both
    up; everything is stopped at teardown."""
    guards = Starter(tmp_path)
    started: list[HAProxy] = []

    async def start(scanners: str = '[[scanners]]\ntype = "builtin"\n') -> Farm:
        hop = strict_hops(xforward=True)
        running = {}
        for name in GUARDS:
            port = free_port()
            config = guard_config(tmp_path, name, port, hop, scanners)
            # A PROXY-protocol listener closes a bare connection: wait for the port only.
            running[name] = await in_thread(guards.spawn, LAUNCHERS["twistd"], "--config", str(config), port=port)
            await in_thread(wait_for_port, port, 15.0)
        haproxy = HAProxy(tmp_path, {name: guard.port for name, guard in running.items()})
        started.append(haproxy)
        await in_thread(haproxy.start)
        await haproxy.wait_for(dict.fromkeys(GUARDS, "UP"))
        return Farm(haproxy, running, hop)

    yield start
    for haproxy in started:
        haproxy.stop()
    for guard in guards.started:
        guard.stop()


def session(port: int, source: str) -> smtplib.SMTP:
    client = smtplib.SMTP(
        "127.0.0.1", port, local_hostname=CLIENT_HELO, timeout=CLIENT_TIMEOUT, source_address=(source, 0)
    )
    client.ehlo()
    return client


def send(client: smtplib.SMTP, message: bytes) -> tuple[int, bytes]:
    """One transaction on an open session: the first reply that is not positive, or
    the reply to the end of data."""
    reply = client.mail(SENDER)
    if reply[0] == 250:
        reply = client.rcpt(RECIPIENT)
    if reply[0] != 250:
        return reply
    try:
        return client.data(message)
    except smtplib.SMTPDataError as refused:
        return refused.smtp_code, refused.smtp_error  # type: ignore[return-value]


def send_from(port: int, source: str, message: bytes) -> tuple[tuple[int, bytes], int]:
    """One session from ``source`` with one message: the final reply and the client's port."""
    with session(port, source) as client:
        return send(client, message), client.sock.getsockname()[1]  # type: ignore[union-attr]


def subject(message: HopMessage) -> str:
    return message.data.split(b"\r\nSubject: ", 1)[1].split(b"\r\n", 1)[0].decode()


def relayed_by(message: HopMessage) -> str:
    """The server name of the instance whose Received: header the message carries."""
    received = message.data.split(b"\r\n\tby ", 1)[1].split(b" ", 1)[0].decode()
    return received.removesuffix(".test")


def queued_reply(message: HopMessage) -> tuple[int, bytes]:
    """The next hop's reply to a message it queued (sent with BDAT), as the client hears it."""
    return wire(fill(Postfix.CHUNKS_QUEUED, stored_size(message.data), message.queue_id))


@pytest_twisted.ensureDeferred
async def test_both_instances_carry_the_load(farm_starter: Any) -> None:
    """Six sessions one after another through HAProxy (roundrobin): each instance
    relays three, every client hears the next hop's own 250 for its message."""
    farm = await farm_starter()

    answers = [
        await in_thread(send_from, farm.haproxy.port, "127.0.0.2", text_message(f"load {number}"))
        for number in range(6)
    ]

    assert [reply for reply, _ in answers] == [queued_reply(message) for message in farm.hop.queued]
    assert [subject(message) for message in farm.hop.queued] == [f"load {number}" for number in range(6)]
    assert Counter(relayed_by(message) for message in farm.hop.queued) == dict.fromkeys(GUARDS, 3)


@pytest_twisted.ensureDeferred
async def test_the_real_client_address_reaches_the_next_hop_through_xforward(farm_starter: Any) -> None:
    """Clients bound to 127.0.0.2 and 127.0.0.3 reach both instances through
    HAProxy; the next hop's XFORWARD names each client's own address and port, and
    the instance's Received: header its address."""
    farm = await farm_starter()
    sources = ("127.0.0.2", "127.0.0.3", "127.0.0.3", "127.0.0.2")  # roundrobin: each meets both instances

    answers = [
        await in_thread(send_from, farm.haproxy.port, source, text_message(f"from {source} {number}"))
        for number, source in enumerate(sources)
    ]

    assert [reply for reply, _ in answers] == [queued_reply(message) for message in farm.hop.queued]
    assert {(source, relayed_by(message)) for source, message in zip(sources, farm.hop.queued, strict=True)} == {
        (source, name) for source in sources for name in GUARDS
    }
    for source, (_, client_port), message in zip(sources, answers, farm.hop.queued, strict=True):
        assert message.xforward == (
            f"XFORWARD NAME=[UNAVAILABLE] ADDR={source} PORT={client_port} PROTO=ESMTP HELO={CLIENT_HELO}"
            " IDENT=[UNAVAILABLE] SOURCE=REMOTE",
        )
        received = (
            f"Received: from {CLIENT_HELO} ([{source}])\r\n\tby {relayed_by(message)}.test (smtpguard) with ESMTP id "
        )
        assert message.data.startswith(received.encode())


@attrs.define
class SendingClient:
    """One client that keeps a session open and sends its messages one after the
    other; on a 4xx reply or a lost connection it opens a new session and sends the
    same message again."""

    port: int
    source: str
    messages: Sequence[str]  # subjects
    attempts: int = 5
    acknowledged: dict[str, tuple[int, bytes]] = attrs.Factory(dict)  # subject -> the 250 it heard
    retried: list[tuple[str, object]] = attrs.Factory(list)  # subject, the reply or error that made it retry

    def run(self) -> None:
        client: smtplib.SMTP | None = None
        for name in self.messages:
            for _ in range(self.attempts):
                try:
                    client = client or session(self.port, self.source)
                    reply = send(client, text_message(name))
                except (smtplib.SMTPException, OSError) as error:
                    reply = None
                    self.retried.append((name, f"{type(error).__name__}: {error}"))
                if reply is not None and reply[0] == 250:
                    self.acknowledged[name] = reply
                    break
                if reply is not None:
                    assert reply[0] // 100 == 4, f"{name}: {reply}"
                    self.retried.append((name, reply))
                if client is not None:
                    client.close()
                client = None
            else:
                raise AssertionError(f"{name}: no 250 after {self.attempts} attempts: {self.retried}")
        if client is not None:
            client.quit()


@pytest_twisted.ensureDeferred
async def test_stopping_one_instance_mid_run_loses_no_acknowledged_message(farm_starter: Any) -> None:
    """Four clients keep sending on sessions spread over both instances, in step
    (the next hop holds each round's messages at their end of data until all four
    arrived).  While round 3 is held, guard-a gets SIGTERM: HAProxy's checks mark it
    DOWN, its two sessions still get the next hop's 250, then 421 4.3.2 at their next
    MAIL, and those two clients send that message again through guard-b.  Every
    message is queued exactly once and every client heard the 250 of its own."""
    farm = await farm_starter()
    rounds, stop_at = 6, 2
    clients = [
        SendingClient(farm.haproxy.port, f"127.0.0.{2 + number}", [f"client {number} round {r}" for r in range(rounds)])
        for number in range(4)
    ]
    gate = farm.hop.gates.end_of_data
    gate.close()
    running = [in_thread(client.run) for client in clients]

    for _ in range(stop_at):
        await gate.wait(len(clients)).addTimeout(GATE_SECONDS, reactor)
        gate.release()
    await gate.wait(len(clients)).addTimeout(GATE_SECONDS, reactor)
    stopped = farm.guards["guard-a"]
    stopped.process.terminate()
    await farm.haproxy.wait_for({"guard-a": "DOWN", "guard-b": "UP"})
    gate.open()
    for done in running:
        await done
    exit_status = await in_thread(stopped.process.wait, 15)

    # twistd, once its services have stopped, ends itself with the signal that stopped it.
    assert exit_status == -signal.SIGTERM
    queued = {subject(message): message for message in farm.hop.queued}
    assert Counter(subject(message) for message in farm.hop.queued) == Counter(
        name for client in clients for name in client.messages
    )
    for client in clients:
        assert client.acknowledged == {name: queued_reply(queued[name]) for name in client.messages}
    on_a = [client for client in clients if relayed_by(queued[client.messages[stop_at]]) == "guard-a"]
    assert len(on_a) == 2
    for client in clients:
        after = [relayed_by(queued[name]) for name in client.messages[stop_at + 1 :]]
        assert after == ["guard-b"] * (rounds - stop_at - 1)
        expected = [(client.messages[stop_at + 1], wire(replies.SHUTTING_DOWN))] if client in on_a else []
        assert client.retried == expected


@pytest_twisted.ensureDeferred
async def test_both_instances_scan_with_one_clamd_pool(farm_starter: Any, clamd: Any) -> None:
    """Both instances scan with the same clamd, reached through two endpoints
    (its unix socket and its TCP port: a pool with failover); through HAProxy each
    instance relays one clean message and refuses one EICAR message with
    554 5.7.1."""
    farm = await farm_starter(
        f'[[scanners]]\ntype = "clamd"\nendpoints = ["{clamd.unix_endpoint}", "{clamd.tcp_endpoint}"]\n'
    )
    messages = [text_message("clean 0"), text_message("clean 1"), text_message("virus 0", EICAR + b"\r\n")]
    messages.append(text_message("virus 1", EICAR + b"\r\n"))

    answers = [(await in_thread(send_from, farm.haproxy.port, "127.0.0.2", message))[0] for message in messages]

    rejected = replies.VIRUS_REJECTED.with_text(f"Message rejected: virus found ({EICAR_SIGNATURE}.UNOFFICIAL)")
    assert answers == [*(queued_reply(message) for message in farm.hop.queued), wire(rejected), wire(rejected)]
    assert sorted(relayed_by(message) for message in farm.hop.queued) == list(GUARDS)
    for message in farm.hop.queued:
        assert f"\r\nX-Virus-Scanned: smtpguard (clamd) on {relayed_by(message)}.test\r\n".encode() in message.data
    for guard in farm.guards.values():
        assert guard.text().count(f" status=infected ({EICAR_SIGNATURE}.UNOFFICIAL) action=reject reply=(554 ") == 1
