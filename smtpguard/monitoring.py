"""The HTTP endpoint of ``[metrics] listen``, served by twisted.web from the
reactor that runs smtpguard: ``/metrics`` for Prometheus, ``/healthz`` and
``/readyz`` for load balancers and orchestrators."""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from smtpguard.listening import Listening
from smtpguard.metrics import Metrics
from smtpguard.readiness import Readiness

log = Logger()


class MetricsPage(Resource):
    """The registry in Prometheus's text format.  Written in the reactor's
    thread (not prometheus_client's WSGI app, which runs in a thread pool), as
    the gauges read live state that only that thread may touch."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._metrics.registry)


def _text(request: Request, code: int, text: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return (text + "\n").encode("utf-8")


class HealthPage(Resource):
    """200 "ok" for as long as the process serves."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return _text(request, 200, "ok")


class ReadyPage(Resource):
    """200 "ready" or 503 with the reason, as ``readiness`` finds."""

    isLeaf = True

    def __init__(self, readiness: Readiness) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._readiness = readiness

    def render_GET(self, request: Request) -> Any:
        finished: list[object] = []

        def gone(outcome: object) -> None:
            finished.append(outcome)

        request.notifyFinish().addBoth(gone)

        def answer(problem: str) -> None:
            if finished:
                return  # the prober went away meanwhile
            request.write(_text(request, 503, problem) if problem else _text(request, 200, "ready"))
            request.finish()

        def failed(failure: Failure) -> None:
            log.failure("readiness check failed", failure)
            answer(f"readiness check failed: {failure.getErrorMessage()}")

        self._readiness.check().addCallbacks(answer, failed)
        return NOT_DONE_YET


class _QuietSite(Site):
    """A scrape every few seconds is no news: no access log line each."""

    noisy = False

    def log(self, request: http.Request) -> None:
        pass


def site(metrics: Metrics, readiness: Readiness) -> Site:
    root = Resource()
    root.putChild(b"metrics", MetricsPage(metrics))
    root.putChild(b"healthz", HealthPage())  # type: ignore[no-untyped-call]
    root.putChild(b"readyz", ReadyPage(readiness))
    return _QuietSite(root)  # type: ignore[no-untyped-call]


def monitoring_service(description: str, reactor: Any, metrics: Metrics) -> Listening:
    """The service serving ``site`` on the server endpoint ``description``
    (already checked by the configuration)."""
    readiness = Readiness(reactor, lambda: metrics.watched)
    return Listening(description, serverFromString(reactor, description), site(metrics, readiness))
