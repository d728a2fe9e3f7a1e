"""The metrics endpoint of a real smtpguard (tap.build_service on the global
reactor, clamd and smtp-sink behind it), scraped over HTTP while smtplib sends
clean, infected and refused mail; /healthz and /readyz as a load balancer sees
them while clamd and the next hop come and go."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from smtpguard import config as configuration
from smtpguard import replies, tap
from tests.conftest import SinkStarter, free_port, http_get
from tests.engines import EICAR, EICAR_SIGNATURE, Clamd
from tests.test_integration import attempt, in_thread, wire

LOOPBACK = "tcp:0:interface=127.0.0.1"
CLEAN = b"Subject: clean\r\n\r\nNothing to see.\r\n"
INFECTED = b"Subject: infected\r\n\r\n" + EICAR + b"\r\n"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Guard:
    """A started smtpguard: its SMTP port and its metrics port."""

    def __init__(self, service: MultiService, smtp: int, http: int) -> None:
        self.service = service
        self.smtp = smtp
        self.http = http
        self.listener = LOOPBACK

    def get(self, path: str) -> Deferred[tuple[int, str]]:
        return in_thread(lambda: http_get(self.http, path))

    async def scrape(self) -> Samples:
        status, text = await self.get("/metrics")
        assert status == 200
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _port(listening: Any) -> Deferred[int]:
    bound: Deferred[int] = Deferred()

    def seen(port: Any) -> Any:
        bound.callback(port.getHost().port)
        return port

    listening._waitingForPort.addCallback(seen)
    return bound


async def start(upstream: str, *scanners: dict[str, Any], **policy: Any) -> Guard:
    data = {
        "server": {"hostname": "guard.test", "listen": [LOOPBACK]},
        "upstream": {"endpoint": upstream},
        "scanners": list(scanners),
        "policy": policy,
        "metrics": {"listen": LOOPBACK},
    }
    service = tap.build_service(configuration.parse(data, "metrics-test"), reactor)
    service.startService()
    monitoring, smtp = [child for child in service if isinstance(child, StreamServerEndpointService)]
    return Guard(service, await _port(smtp), await _port(monitoring))


@pytest.fixture
def guards() -> Iterator[list[Guard]]:
    """The smtpguards a test starts; stopped at teardown."""
    started: list[Guard] = []
    yield started
    for guard in started:
        pytest_twisted.blockon(guard.service.stopService())


def delta(before: Samples, after: Samples) -> Callable[..., float]:
    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    return moved


@pytest_twisted.ensureDeferred
async def test_clean_and_infected_mail_move_exactly_their_counters(
    guards: list[Guard], smtp_sinks: SinkStarter, clamd: Clamd
) -> None:
    """A clean message (relayed) and an EICAR message (rejected, found by clamd and
    the built-in scanner): messages, replies, sizes and transaction counts move by
    exactly one each, nothing else under messages."""
    sink = smtp_sinks("sink")
    guard = await start(
        sink.endpoint, {"type": "clamd", "endpoint": clamd.unix_endpoint}, {"type": "builtin"}, on_virus="reject"
    )
    guards.append(guard)
    before = await guard.scrape()

    clean = await in_thread(attempt, guard.smtp, CLEAN)
    infected = await in_thread(attempt, guard.smtp, INFECTED)
    after = await guard.scrape()

    assert clean[-1][0] == 250
    found = f"{replies.VIRUS_REJECTED.text} ({EICAR_SIGNATURE}.UNOFFICIAL, Eicar-Test-Signature)"
    assert infected[-1] == wire(replies.VIRUS_REJECTED.with_text(found))
    moved = delta(before, after)
    listener = guard.listener
    assert moved("smtpguard_messages_total", listener=listener, verdict="clean", action="deliver") == 1
    assert moved("smtpguard_messages_total", listener=listener, verdict="infected", action="reject") == 1
    assert moved("smtpguard_replies_total", listener=listener, **{"class": "2xx"}) == 1
    assert moved("smtpguard_replies_total", listener=listener, **{"class": "5xx"}) == 1
    assert moved("smtpguard_message_size_bytes_count", listener=listener) == 2
    assert moved("smtpguard_message_size_bytes_sum", listener=listener) == len(CLEAN) + len(INFECTED)
    assert moved("smtpguard_transaction_seconds_count", listener=listener) == 2
    assert sample(after, "smtpguard_scanner_up", scanner="clamd", endpoint=clamd.unix_endpoint) == 1
    assert sample(after, "smtpguard_config_generation") == 1


@pytest_twisted.ensureDeferred
async def test_a_next_hop_4xx_is_counted_as_a_4xx_reply_of_a_delivered_message(
    guards: list[Guard], smtp_sinks: SinkStarter
) -> None:
    """smtp-sink refuses the end of data with 450 (-r .): the client hears 450, and
    the scrape shows one clean message to deliver and one 4xx reply."""
    sink = smtp_sinks("sink", "-r", ".")
    guard = await start(sink.endpoint, {"type": "builtin"})
    guards.append(guard)
    before = await guard.scrape()

    answers = await in_thread(attempt, guard.smtp, CLEAN)
    after = await guard.scrape()

    assert answers[-1] == (450, b"4.3.0 Error: command failed")
    moved = delta(before, after)
    assert moved("smtpguard_messages_total", listener=guard.listener, verdict="clean", action="deliver") == 1
    assert moved("smtpguard_replies_total", listener=guard.listener, **{"class": "4xx"}) == 1
    assert moved("smtpguard_replies_total", listener=guard.listener, **{"class": "2xx"}) == 0


@pytest_twisted.ensureDeferred
async def test_healthz_says_ok(guards: list[Guard], smtp_sinks: SinkStarter) -> None:
    """/healthz: 200 "ok" while the process serves."""
    guard = await start(smtp_sinks("sink").endpoint, {"type": "builtin"})
    guards.append(guard)
    assert await guard.get("/healthz") == (200, "ok\n")


@pytest_twisted.ensureDeferred
async def test_readyz_follows_clamd_going_and_coming_back(
    guards: list[Guard], smtp_sinks: SinkStarter, tmp_path: Path
) -> None:
    """/readyz: 200 with clamd running, 503 naming clamd once it is stopped, 200
    again once it is back (each answer after a PING of its own)."""
    engine = Clamd(tmp_path / "clamd")
    engine.start()
    try:
        guard = await start(smtp_sinks("sink").endpoint, {"type": "clamd", "endpoint": engine.unix_endpoint})
        guards.append(guard)
        assert await guard.get("/readyz") == (200, "ready\n")

        await in_thread(engine.stop)
        status, reason = await guard.get("/readyz")
        assert status == 503
        assert reason.startswith(f"no working scanner: clamd: {engine.unix_endpoint}: ")

        await in_thread(engine.start)
        assert await guard.get("/readyz") == (200, "ready\n")
    finally:
        engine.stop()


@pytest_twisted.ensureDeferred
async def test_readyz_is_503_while_the_next_hop_is_unreachable(guards: list[Guard]) -> None:
    """A next hop where nothing listens: the probe is refused, /readyz 503 naming it."""
    guard = await start(f"tcp:127.0.0.1:{free_port()}", {"type": "builtin"})
    guards.append(guard)
    status, reason = await guard.get("/readyz")
    assert status == 503
    assert reason.startswith("next hop unreachable: ")
