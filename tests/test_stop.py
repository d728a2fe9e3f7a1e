"""Stopping the service leaves the reactor as it found it: with clamd, c-icap and
a next hop for real, after a message has gone through, no timer and no
connection of smtpguard's is left behind."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from smtpguard import config as configuration
from smtpguard import tap
from tests.conftest import SmtpSink
from tests.engines import Clamd
from tests.icap_engine import CIcap

HEALTH_CHECK_INTERVAL = 600.0
KEEP_TIME = 900.0
CLAMD_KEEP_TIME = 1200.0
ICAP_KEEP_TIME = 1500.0


@pytest.fixture(scope="module")
def cicap(clamd: Clamd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CIcap]:
    server = CIcap(tmp_path_factory.mktemp("c-icap"), clamd.socket_path)
    server.start()
    yield server
    server.kill()


def reactor_state() -> tuple[set[Any], set[Any], set[Any]]:
    """What is scheduled and what is watched: delayed calls, readers, writers."""
    return set(reactor.getDelayedCalls()), set(reactor.getReaders()), set(reactor.getWriters())


def added(before: tuple[set[Any], set[Any], set[Any]]) -> tuple[set[Any], set[Any], set[Any]]:
    """What is in the reactor now and was not ``before``, still live."""
    calls, readers, writers = reactor_state()
    live = {call for call in calls - before[0] if call.active()}
    return live, readers - before[1], writers - before[2]


def relay_one(port: int) -> dict[str, tuple[int, bytes]]:
    """One message through smtplib (which raises unless it is accepted); the
    recipients refused."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=20) as client:
        return client.sendmail("alice@example.org", ["bob@example.net"], b"Subject: hi\r\n\r\nHello Bob.\r\n")


@pytest_twisted.ensureDeferred
async def test_stopping_releases_scanners_and_next_hop_connections(
    clamd: Clamd, cicap: CIcap, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    """After one message relayed (a clamd endpoint found dead, so a health check
    is scheduled; a clamd session, an ICAP connection and a next-hop connection
    kept idle), stopping the service built by build_service leaves no delayed
    call, reader or writer that was not there before it started."""
    data = {
        "server": {"hostname": "guard.test", "listen": ["tcp:0:interface=127.0.0.1"]},
        "upstream": {"endpoint": smtp_sink.endpoint, "keep_time": KEEP_TIME},
        "scanners": [
            {
                "type": "clamd",
                "endpoints": [f"unix:{tmp_path / 'nobody.sock'}", clamd.unix_endpoint],
                "health_check_interval": HEALTH_CHECK_INTERVAL,
                "keep_time": CLAMD_KEEP_TIME,
                "timeout": 20,
            },
            {"type": "icap", "url": cicap.url, "timeout": 20, "keep_time": ICAP_KEEP_TIME},
        ],
    }
    before = reactor_state()
    service = tap.build_service(configuration.parse(data, "stop-test"), reactor)
    service.startService()
    listener = list(service)[-1]
    port = (await listener._waitingForPort).getHost().port

    assert await threads.deferToThread(relay_one, port) == {}
    assert len(listener.factory.next_hop.kept) == 1
    calls, readers, _ = added(before)
    now = reactor.seconds()
    assert {round(call.getTime() - now, -2) for call in calls} == {
        HEALTH_CHECK_INTERVAL,
        KEEP_TIME,
        CLAMD_KEEP_TIME,
        ICAP_KEEP_TIME,
    }
    assert len(readers) == 4  # the listening port, the idle clamd, ICAP and next-hop connections

    await service.stopService()
    assert added(before) == (set(), set(), set())
