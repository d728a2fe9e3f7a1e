"""The supervisor's ``/metrics`` and ``/readyz`` with workers: each worker's
samples labelled with its number, a worker that does not answer left out and
counted, readiness when one worker is ready; on a Clock with fake workers as
strict as the real fetch (whose contract is checked against a real worker
site on a real unix socket)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectError, ConnectionDone, getConnectError
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from smtpguard.metrics import Metrics
from smtpguard.monitoring import registry_page, site
from smtpguard.workermetrics import (
    ANSWER_WITHIN,
    Answer,
    WorkerMetrics,
    merge,
    metrics_endpoint,
    parse,
    unix_fetch,
)
from tests.test_metrics import LISTENER, transaction

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
CLEAN = {"listener": LISTENER, "verdict": "clean", "action": "deliver"}


class FakeWorker:
    """A worker's monitoring site as the real fetch reaches it: ``/metrics`` is
    its ``metrics`` registry in Prometheus's text format, ``/readyz`` 200
    "ready" or 503 with ``problem``; ``silent`` it accepts and never answers.
    ``body``, when set, is what ``/metrics`` answers instead."""

    def __init__(self, metrics: Metrics, problem: str = "", silent: bool = False) -> None:
        self.metrics = metrics
        self.problem = problem
        self.silent = silent
        self.aborted = 0  # requests cancelled, their connection aborted
        self.body: bytes | None = None

    def get(self, path: bytes) -> Deferred[Answer]:
        if self.silent:

            def abort(waiting: Deferred[Answer]) -> None:
                self.aborted += 1  # and the Deferred fails with CancelledError, as the real one does

            return Deferred(abort)
        if path == b"/metrics":
            return succeed(Answer(200, generate_latest(self.metrics.registry) if self.body is None else self.body))
        if path == b"/readyz":
            return succeed(Answer(503, f"{self.problem}\n".encode()) if self.problem else Answer(200, b"ready\n"))
        return succeed(Answer(404, b"No Such Resource"))


class FakeWorkers:
    """The fetch over unix sockets, to fake workers by socket path: a path
    nothing listens on fails as connecting to a missing socket does."""

    def __init__(self) -> None:
        self.sockets: dict[str, FakeWorker] = {}
        self.asked: list[tuple[str, bytes]] = []

    def __call__(self, socket_path: str, path: bytes) -> Deferred[Answer]:
        assert isinstance(socket_path, str) and isinstance(path, bytes) and path.startswith(b"/")
        self.asked.append((socket_path, path))
        worker = self.sockets.get(socket_path)
        if worker is None:
            return fail(getConnectError((errno.ENOENT, os.strerror(errno.ENOENT))))
        return worker.get(path)


def supervising(
    *workers: FakeWorker, restarts: dict[int, int] | None = None
) -> tuple[Clock, FakeWorkers, WorkerMetrics]:
    """Workers 1, 2 ... ready, their sockets in /run/test."""
    clock, fetch = Clock(), FakeWorkers()
    for number, worker in enumerate(workers, 1):
        fetch.sockets[f"/run/test/worker-{number}.sock"] = worker
    sockets = {number: f"/run/test/worker-{number}.sock" for number in range(1, len(workers) + 1)}
    merged = WorkerMetrics(clock, lambda: sockets, lambda: len(sockets), lambda: restarts or {}, fetch)
    return clock, fetch, merged


def counted(*clean: int) -> list[FakeWorker]:
    """A worker per number given, that counted that many clean messages."""
    workers = []
    for messages in clean:
        metrics = Metrics(Clock())
        for _ in range(messages):
            metrics.observe(transaction())
        workers.append(FakeWorker(metrics))
    return workers


def parsed(text: bytes) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


def result(deferred: Deferred[Any]) -> Any:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert len(results) == 1, "not fired"
    return results[0]


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


def test_each_workers_samples_carry_its_number_as_the_worker_label() -> None:
    """Worker 1 counted 3 clean messages, worker 2 counted 2: the supervisor's
    scrape has smtpguard_messages_total 3 with worker="1" and 2 with worker="2",
    and no sample without a worker label but the supervisor's own."""
    _, fetch, merged = supervising(*counted(3, 2))

    samples = parsed(result(merged.scrape()))

    assert samples[key("smtpguard_messages_total", **CLEAN, worker="1")] == 3
    assert samples[key("smtpguard_messages_total", **CLEAN, worker="2")] == 2
    assert samples[key("smtpguard_message_size_bytes_bucket", listener=LISTENER, le="4096.0", worker="1")] == 3
    unlabelled = {name for name, labels in samples if "worker" not in dict(labels)}
    assert unlabelled == {"smtpguard_workers"}
    assert fetch.asked == [("/run/test/worker-1.sock", b"/metrics"), ("/run/test/worker-2.sock", b"/metrics")]


def test_the_supervisor_adds_running_workers_and_restarts() -> None:
    """smtpguard_workers is the number of workers running; smtpguard_worker_restarts_total
    how many times each was started again."""
    _, _, merged = supervising(*counted(0, 0), restarts={1: 0, 2: 3})

    samples = parsed(result(merged.scrape()))

    assert samples[key("smtpguard_workers")] == 2
    assert samples[key("smtpguard_worker_restarts_total", worker="1")] == 0
    assert samples[key("smtpguard_worker_restarts_total", worker="2")] == 3


def test_a_worker_that_does_not_answer_in_time_is_left_out_and_counted() -> None:
    """Worker 2 never answers: the scrape waits ANSWER_WITHIN seconds, cancels
    its request, and then has worker 1's samples, none of worker 2's but
    smtpguard_worker_scrape_errors_total{worker="2"} 1."""
    clock, _, merged = supervising(*counted(1), FakeWorker(Metrics(Clock()), silent=True))
    silent = merged_worker(merged, 2)

    scraping = merged.scrape()
    clock.advance(ANSWER_WITHIN - 0.001)
    assert not scraping.called
    clock.advance(0.001)
    samples = parsed(result(scraping))

    assert silent.aborted == 1
    assert samples[key("smtpguard_messages_total", **CLEAN, worker="1")] == 1
    assert {name for name, labels in samples if dict(labels).get("worker") == "2"} == {
        "smtpguard_worker_scrape_errors_total",
        "smtpguard_worker_scrape_errors_created",
    }
    assert samples[key("smtpguard_worker_scrape_errors_total", worker="2")] == 1


def merged_worker(merged: WorkerMetrics, number: int) -> FakeWorker:
    fetch: FakeWorkers = merged._fetch  # type: ignore[assignment]
    return fetch.sockets[f"/run/test/worker-{number}.sock"]


def test_a_worker_whose_socket_is_gone_is_left_out_and_counted() -> None:
    """A worker said ready but nothing listens on its socket (it just died): left
    out at once, and counted in smtpguard_worker_scrape_errors_total."""
    _, fetch, merged = supervising(*counted(1, 1))
    del fetch.sockets["/run/test/worker-2.sock"]

    samples = parsed(result(merged.scrape()))

    assert key("smtpguard_messages_total", **CLEAN, worker="2") not in samples
    assert samples[key("smtpguard_messages_total", **CLEAN, worker="1")] == 1
    assert samples[key("smtpguard_worker_scrape_errors_total", worker="2")] == 1
    assert key("smtpguard_worker_scrape_errors_total", worker="1") not in samples


def test_a_worker_answering_what_is_not_metrics_is_left_out_and_counted() -> None:
    """A worker's /metrics answering 200 with bytes that are not Prometheus's text
    format: the scrape still answers, without that worker, and counts it."""
    workers = counted(1, 1)
    workers[1].body = b"\xff not metrics {"
    _, _, merged = supervising(*workers)

    samples = parsed(result(merged.scrape()))

    assert key("smtpguard_messages_total", **CLEAN, worker="2") not in samples
    assert samples[key("smtpguard_messages_total", **CLEAN, worker="1")] == 1
    assert samples[key("smtpguard_worker_scrape_errors_total", worker="2")] == 1


def test_ready_when_one_worker_is_ready() -> None:
    """Worker 1 unready (its clamd is down), worker 2 ready: the supervisor is ready."""
    workers = counted(0, 0)
    workers[0].problem = "no working scanner: clamd: unix:/run/clamav/clamd.ctl: Connection refused"
    _, fetch, merged = supervising(*workers)

    assert result(merged.check()) == ""
    assert [path for _, path in fetch.asked] == [b"/readyz", b"/readyz"]


def test_unready_when_no_worker_is_ready_with_each_workers_reason() -> None:
    """Worker 1 unready, worker 2 silent past the timeout: unready, naming both reasons."""
    workers = counted(0)
    workers[0].problem = "next hop unreachable: Connection refused"
    clock, _, merged = supervising(*workers, FakeWorker(Metrics(Clock()), silent=True))

    checking = merged.check()
    clock.advance(ANSWER_WITHIN)

    assert result(checking) == (
        "no worker ready: worker 1: next hop unreachable: Connection refused; worker 2: no answer within 2 s"
    )


def test_unready_while_no_worker_is_ready_to_ask() -> None:
    """No worker has said it is ready yet (all starting): unready, asking no one."""
    _, fetch, merged = supervising()

    assert result(merged.check()) == "no worker has started"
    assert fetch.asked == []


def test_merge_keeps_each_familys_type_and_adds_the_label_to_every_sample() -> None:
    """A histogram of two workers stays one histogram family, its bucket labels kept."""
    workers = counted(1, 2)
    families = {number: parse(result(w.get(b"/metrics"))) or [] for number, w in enumerate(workers, 1)}

    [family] = [family for family in merge(families) if family.name == "smtpguard_transaction_seconds"]

    assert family.type == "histogram"
    counts = [(s.labels["worker"], s.value) for s in family.samples if s.name == "smtpguard_transaction_seconds_count"]
    assert counts == [("1", 1.0), ("2", 2.0)]
    assert all(s.labels["listener"] == LISTENER for s in family.samples)


def test_the_metrics_socket_endpoint_escapes_colons() -> None:
    """A directory with a colon in its name still makes one unix endpoint."""
    assert metrics_endpoint("/run/a:b", 2) == "unix:/run/a\\:b/worker-2.sock:mode=600:lockfile=1"


# -- the real fetch, against which the fake is held ---------------------------------


@pytest_twisted.ensureDeferred
async def test_real_fetch_gets_a_worker_sites_metrics_and_readiness(tmp_path: Path) -> None:
    """unix_fetch over a real unix socket to a worker's real monitoring site:
    /metrics answers 200 with the registry's text, as the fake's does."""
    metrics = Metrics(reactor)
    metrics.observe(transaction())
    ready = Ready("")
    port = await serverFromString(reactor, metrics_endpoint(str(tmp_path), 1)).listen(
        site(registry_page(metrics), ready)
    )
    try:
        fetch = unix_fetch(reactor)
        path = str(tmp_path / "worker-1.sock")
        answer = await fetch(path, b"/metrics")
        fake = await FakeWorker(metrics).get(b"/metrics")
        assert answer == fake
        assert await fetch(path, b"/readyz") == Answer(200, b"ready\n") == await FakeWorker(metrics).get(b"/readyz")
        ready.problem = "no listener"
        assert await fetch(path, b"/readyz") == Answer(503, b"no listener\n")
        assert await FakeWorker(metrics, problem="no listener").get(b"/readyz") == Answer(503, b"no listener\n")
    finally:
        await port.stopListening()


class Ready:
    def __init__(self, problem: str) -> None:
        self.problem = problem

    def check(self) -> Deferred[str]:
        return succeed(self.problem)


@pytest_twisted.ensureDeferred
async def test_real_fetch_to_a_missing_socket_fails_with_connect_error(tmp_path: Path) -> None:
    """Nothing at the path: the real fetch fails with ConnectError (ENOENT), as the fake does."""
    path = str(tmp_path / "worker-9.sock")
    errors = []
    for fetch in (unix_fetch(reactor), FakeWorkers()):
        with pytest.raises(ConnectError) as raised:
            await fetch(path, b"/metrics")
        errors.append((type(raised.value), raised.value.osError, str(raised.value)))
    message = "An error occurred while connecting: 2: No such file or directory."
    assert errors == [(ConnectError, errno.ENOENT, message)] * 2


class Silent(Protocol):
    """Accepts, reads the request and never answers."""

    factory: SilentFactory

    def connectionMade(self) -> None:
        self.factory.accepted.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.lost.callback(reason.type)


class SilentFactory(Factory):
    protocol = Silent

    def __init__(self) -> None:
        self.accepted: Deferred[None] = Deferred()
        self.lost: Deferred[type] = Deferred()


@pytest_twisted.ensureDeferred
async def test_real_fetch_cancelled_aborts_the_connection_as_the_fake_records(tmp_path: Path) -> None:
    """A worker that never answers: after ANSWER_WITHIN seconds (on a Clock),
    the real fetch's request is cancelled, the worker sees its connection
    closed, and the scrape leaves it out and counts it, as with the fake."""
    silent = SilentFactory()
    port = await serverFromString(reactor, metrics_endpoint(str(tmp_path), 1)).listen(silent)
    try:
        clock = Clock()
        sockets = {1: str(tmp_path / "worker-1.sock")}
        merged = WorkerMetrics(clock, lambda: sockets, lambda: 1, dict, unix_fetch(reactor))
        scraping = merged.scrape()
        await silent.accepted
        clock.advance(ANSWER_WITHIN)
        samples = parsed(await scraping)
        assert await silent.lost is ConnectionDone
        assert samples[key("smtpguard_worker_scrape_errors_total", worker="1")] == 1
    finally:
        await port.stopListening()
