"""``[metrics] listen`` with ``[server] workers = N``: the supervisor serves it
alone.  Each worker serves its own ``/metrics`` and ``/readyz`` on a unix
socket in the supervisor's private directory; at each scrape the supervisor
asks every ready worker, labels each worker's samples ``worker="K"`` and
exposes their union with its own metrics."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol, serverFromString
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from smtpguard.listening import Listening
from smtpguard.monitoring import MetricsPage, limited, site

# A worker that takes longer is left out of the scrape: one stuck worker must
# not make every scrape (or health check) of the machine time out.
ANSWER_WITHIN = 2.0


def metrics_socket(directory: str, number: int) -> str:
    """Where worker ``number`` serves its metrics, in the supervisor's ``directory``."""
    return os.path.join(directory, f"worker-{number}.sock")


def metrics_endpoint(directory: str, number: int) -> str:
    """The server endpoint string of :func:`metrics_socket`."""
    path = metrics_socket(directory, number).replace("\\", "\\\\").replace(":", "\\:")
    return f"unix:{path}:mode=600:lockfile=1"


@attrs.frozen
class Answer:
    """An HTTP response from a worker: its status code and body."""

    code: int
    body: bytes


Fetch = Callable[[str, bytes], "Deferred[Answer]"]
"""``fetch(socket_path, path)``: GET ``path`` from the HTTP server on the unix
socket; fails when nothing answers there, and stops (aborting the connection)
when cancelled."""


class _Get(Protocol):
    """One HTTP/1.0 GET of ``path``: the request once connected, the answer
    when the server closes the connection (as HTTP/1.0 has it).  Cancelling
    ``answered`` aborts the connection."""

    def __init__(self, path: bytes) -> None:
        self._path = path
        self._received: list[bytes] = []
        self.answered: Deferred[Answer] = Deferred(self._abort)

    def connectionMade(self) -> None:
        self.transport.write(b"GET " + self._path + b" HTTP/1.0\r\nHost: worker\r\n\r\n")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self._received.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.answered.called:
            return
        head, separator, body = b"".join(self._received).partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].split(b" ")
        if not separator or len(status) < 2 or not status[0].startswith(b"HTTP/") or not status[1].isdigit():
            self.answered.errback(ConnectionLost(f"no HTTP answer: {reason.getErrorMessage()}"))
            return
        self.answered.callback(Answer(int(status[1]), body))

    def _abort(self, answered: Deferred[Answer]) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


def unix_fetch(reactor: Any) -> Fetch:
    """The :data:`Fetch` over unix sockets, through the reactor."""

    def fetch(socket_path: str, path: bytes) -> Deferred[Answer]:
        get = _Get(path)
        connecting: Deferred[Any] = connectProtocol(UNIXClientEndpoint(reactor, socket_path), get)
        return connecting.addCallback(lambda _: get.answered)

    return fetch


def parse(answer: Answer | str) -> list[Metric] | None:
    """The families of a worker's answer to ``/metrics``; None unless it is 200
    with Prometheus's text format."""
    if not isinstance(answer, Answer) or answer.code != 200:
        return None
    try:
        return list(text_string_to_metric_families(answer.body.decode("utf-8")))
    except ValueError:  # UnicodeDecodeError too
        return None


def merge(families: Mapping[int, Sequence[Metric]]) -> list[Metric]:
    """Each worker's families (by worker number) as one family per name, each
    sample labelled ``worker`` with its worker's number."""
    merged: dict[str, Metric] = {}
    for number, parsed in sorted(families.items()):
        for family in parsed:
            into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
            for sample in family.samples:
                into.samples.append(sample._replace(labels={**sample.labels, "worker": str(number)}))
    return list(merged.values())


class WorkerMetrics:
    """The supervisor's side.  ``workers()`` gives the ready workers' metrics
    sockets by number, ``running()`` how many worker processes run and
    ``restarts()`` how many times each was started again; :meth:`scrape` and
    :meth:`check` ask the workers through ``fetch``, leaving out those that do
    not answer within ``timeout`` seconds."""

    def __init__(
        self,
        reactor: Any,
        workers: Callable[[], Mapping[int, str]],
        running: Callable[[], int],
        restarts: Callable[[], Mapping[int, int]],
        fetch: Fetch | None = None,
        timeout: float = ANSWER_WITHIN,
    ) -> None:
        self._reactor = reactor
        self._workers = workers
        self._fetch = fetch or unix_fetch(reactor)
        self._timeout = timeout
        self.registry = CollectorRegistry()
        self.scrape_errors = Counter(
            "smtpguard_worker_scrape_errors",
            "Scrapes that left a worker out: it did not answer in time, or not with 200 and metrics.",
            ["worker"],
            registry=self.registry,
        )
        self._collector = _Merged(running, restarts)
        self.registry.register(self._collector)

    def scrape(self) -> Deferred[bytes]:
        """Every ready worker's metrics, labelled, and the supervisor's own, in
        Prometheus's text format; never fails."""

        def expose(answers: Mapping[int, Answer | str]) -> bytes:
            families = {}
            for number, answer in answers.items():
                parsed = parse(answer)
                if parsed is None:
                    self.scrape_errors.labels(str(number)).inc()
                else:
                    families[number] = parsed
            # Set and read in one go: no other scrape can come in between.
            self._collector.families = merge(families)
            try:
                return generate_latest(self.registry)
            finally:
                self._collector.families = []

        return self._ask(b"/metrics").addCallback(expose)

    def check(self) -> Deferred[str]:
        """"" when at least one worker is ready, else why none is (the readiness
        of ``/readyz``); never fails."""

        def decide(answers: Mapping[int, Answer | str]) -> str:
            if not answers:
                return "no worker has started"
            if any(isinstance(answer, Answer) and answer.code == 200 for answer in answers.values()):
                return ""
            reasons = [f"worker {number}: {_reason(answer)}" for number, answer in sorted(answers.items())]
            return f"no worker ready: {'; '.join(reasons)}"

        return self._ask(b"/readyz").addCallback(decide)

    def _ask(self, path: bytes) -> Deferred[dict[int, Answer | str]]:
        """Each ready worker's answer to ``path``, or why there is none."""
        workers = sorted(self._workers().items())

        def ask(socket_path: str) -> Deferred[Answer | str]:
            asking: Deferred[Answer | str] = self._fetch(socket_path, path)  # type: ignore[assignment]
            asking.addTimeout(self._timeout, self._reactor, onTimeoutCancel=_late)
            return asking.addErrback(lambda failure: failure.getErrorMessage() or repr(failure.value))

        asked = [ask(socket_path) for _, socket_path in workers]
        return gatherResults(asked).addCallback(
            lambda answers: dict(zip((number for number, _ in workers), answers, strict=True))
        )

def _late(result: object, timeout: float) -> str:
    return f"no answer within {timeout:g} s"


def _reason(answer: Answer | str) -> str:
    if isinstance(answer, str):
        return answer
    return answer.body.decode("utf-8", "replace").strip() or f"HTTP {answer.code}"


class _Merged(Collector):
    """The workers' families of the scrape under way, and the supervisor's gauges."""

    def __init__(self, running: Callable[[], int], restarts: Callable[[], Mapping[int, int]]) -> None:
        self._running = running
        self._restarts = restarts
        self.families: Sequence[Metric] = []

    def collect(self) -> Iterator[Metric]:
        yield from self.families
        yield GaugeMetricFamily("smtpguard_workers", "Worker processes running.", value=self._running())
        restarts = CounterMetricFamily(
            "smtpguard_worker_restarts", "Times a worker was started again after it ended.", labels=["worker"]
        )
        for number, count in sorted(self._restarts().items()):
            restarts.add_metric([str(number)], count)
        yield restarts


def supervisor_monitoring(description: str, reactor: Any, metrics: WorkerMetrics) -> Listening:
    """The service serving the workers' merged ``/metrics``, the supervisor's
    ``/healthz`` and the workers' ``/readyz`` on ``description``."""
    served = limited(site(MetricsPage(metrics.scrape), metrics))
    return Listening(description, serverFromString(reactor, description), served)
