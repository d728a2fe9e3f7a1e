"""Attacks from the outside on a real smtpguard on loopback (as twistd builds it, or
from its parts with the session timers on a Clock), in front of a next hop as
strict as Postfix's smtpd (tests/strict_hop.py): careless clients, spammers and
hostile ones.

Each test states what the attacker does, what goes wrong, and what smtpguard's
documentation promises (README.md, docs/protocol.md).
"""

from __future__ import annotations

import select
import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.task import Clock

from smtpguard import config, replies, tap
from smtpguard.pipeline import Pipeline
from smtpguard.policies.default import DefaultPolicy
from smtpguard.results import ScanResult
from smtpguard.server import GuardFactory
from smtpguard.settings import ServerSettings, UpstreamSettings
from smtpguard.testing import FixedScanner
from smtpguard.upstream import Upstream
from tests.conftest import listen
from tests.strict_hop import StrictHop
from tests.test_abandonment import ENVELOPE, commands, connect
from tests.test_fuzz import parse_replies

SETTLE = 30.0  # the longest any test waits for something that must happen
KEEP_TIME = 1.0  # [upstream] keep_time


async def guard(listening: list[Any], hop: StrictHop, **upstream: Any) -> tuple[int, GuardFactory]:
    """smtpguard with the built-in scanner in front of ``hop``; its port."""
    settings = config.parse(
        {
            "server": {"hostname": "guard.test"},
            "upstream": {"endpoint": hop.endpoint, "keep_time": KEEP_TIME, "timeout": SETTLE, **upstream},
            "scanners": [{"type": "builtin"}],
        }
    )
    factory = tap.build_factory(settings, reactor)
    return await listen(listening, factory), factory


async def guard_on_clock(listening: list[Any], hop: StrictHop, clock: Clock, **server: Any) -> int:
    """smtpguard whose session timers run on ``clock`` (its sockets, the next hop's
    connections and the scanner on the reactor); its port."""
    upstream = Upstream(
        reactor, UpstreamSettings(hop.endpoint, hostname="guard.test", keep_time=KEEP_TIME, timeout=SETTLE)
    )
    pipeline = Pipeline(reactor, FixedScanner(ScanResult.clean()), DefaultPolicy())
    factory = GuardFactory(clock, upstream, pipeline.process, ServerSettings(hostname="guard.test", **server))
    return await listen(listening, factory)


def resident_memory() -> int:
    """This process's resident set size in bytes (smtpguard runs in it)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


# -- a client that never reads its replies --------------------------------------------------

FLOOD = 24 * 1024 * 1024  # bytes of pipelined commands the attacker offers
MEMORY_BOUND = 64 * 1024 * 1024  # what smtpguard may grow by for one such client
STALL = 5.0  # seconds without progress after which the attacker gives up


def flood_without_reading(port: int, command: bytes, total: int) -> tuple[int, int]:
    """Connect, then write ``command`` over and over, never reading a reply, until
    ``total`` bytes are written or smtpguard stops taking them for STALL seconds;
    the bytes smtpguard took, and this process's memory then (before leaving)."""
    with socket.create_connection(("127.0.0.1", port), timeout=SETTLE) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.setblocking(False)
        block = command * (65536 // len(command))
        sent = 0
        while sent < total:
            _, writable, _ = select.select([], [client], [], STALL)
            if not writable:
                break  # smtpguard stopped reading: the replies are not being taken
            try:
                sent += client.send(block)
            except BlockingIOError:
                continue
        return sent, resident_memory()


@pytest_twisted.ensureDeferred
async def test_client_that_never_reads_its_replies_does_not_grow_memory(
    listening: list[Any], strict_hop: StrictHop
) -> None:
    """The attacker pipelines 24 MiB of ``EHLO`` (each answered with ten reply
    lines, ten times its size) and never reads a reply. smtpguard keeps reading
    and answering, so every reply the client does not take piles up in
    smtpguard's memory: about 250 MB for this one connection, and without end for
    a longer flood (many such clients exhaust the host). The README promises that
    memory stays bounded: smtpguard must stop reading from a client whose replies
    it cannot deliver, as it stops reading a client with 256 KiB of pipelined
    input waiting."""
    port, _ = await guard(listening, strict_hop)
    before = resident_memory()
    taken, during = await threads.deferToThread(flood_without_reading, port, b"EHLO client.test\r\n", FLOOD)
    assert during - before < MEMORY_BOUND, f"{during - before} bytes more after the client sent {taken} bytes"


# -- the session deadline while the next hop is slow ------------------------------------------

SESSION_TIMEOUT = 60.0


@pytest.mark.parametrize("gate", ["mail", "rcpt"])
@pytest_twisted.ensureDeferred
async def test_session_deadline_while_the_next_hop_answers_ends_with_421(
    listening: list[Any], strict_hop: StrictHop, gate: str
) -> None:
    """The attacker (or a slow next hop) pipelines EHLO, MAIL, RCPT and DATA, and
    the next hop holds its reply to MAIL (or RCPT) until the session is older than
    session_timeout. When the held reply comes, smtpguard passes it on and then
    closes the connection without a word: no 421 4.4.2, and the commands still
    pipelined behind it (RCPT, DATA) are never answered, so the client cannot tell
    a deadline from a broken connection. docs/protocol.md ("Limits and
    timeouts"): a session older than session_timeout gets 421 4.4.2, then close."""
    clock = Clock()
    port = await guard_on_clock(listening, strict_hop, clock, session_timeout=SESSION_TIMEOUT)
    held = getattr(strict_hop.gates, gate)
    held.close()
    client = await connect(port, ENVELOPE + commands("DATA"))
    await held.wait(1).addTimeout(SETTLE, reactor)
    clock.advance(SESSION_TIMEOUT + 1)
    held.open()
    await client.gone.addTimeout(SETTLE, reactor)

    assert parse_replies(client.heard)[-1] == replies.SESSION_TOO_LONG
