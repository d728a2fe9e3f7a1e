"""The HTTP endpoint of ``[metrics] listen``, served by twisted.web from the
reactor that runs smtpguard: ``/metrics`` for Prometheus, ``/healthz`` and
``/readyz`` for load balancers and orchestrators."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from smtpguard.listening import Listening
from smtpguard.metrics import Metrics
from smtpguard.readiness import Readiness

log = Logger()


class MetricsPage(Resource):
    """Metrics in Prometheus's text format, as ``exposition()`` fires with them.
    Written in the reactor's thread (not prometheus_client's WSGI app, which
    runs in a thread pool), as the gauges read live state that only that
    thread may touch."""

    isLeaf = True

    def __init__(self, exposition: Callable[[], Deferred[bytes]]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._exposition = exposition

    def render_GET(self, request: Request) -> Any:
        def page(text: bytes) -> bytes:
            request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
            return text

        return answer_later(request, self._exposition().addCallback(page))


def registry_page(metrics: Metrics) -> MetricsPage:
    """The page of ``metrics``'s registry."""
    return MetricsPage(lambda: succeed(generate_latest(metrics.registry)))


def _text(request: Request, code: int, text: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return (text + "\n").encode("utf-8")


class HealthPage(Resource):
    """200 "ok" for as long as the process serves."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return _text(request, 200, "ok")


class ReadinessCheck(Protocol):
    def check(self) -> Deferred[str]:
        """Fires with "" when ready, else with why not (one line); never fails."""


class ReadyPage(Resource):
    """200 "ready" or 503 with the reason, as ``readiness`` finds."""

    isLeaf = True

    def __init__(self, readiness: ReadinessCheck) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._readiness = readiness

    def render_GET(self, request: Request) -> Any:
        def page(problem: str) -> bytes:
            return _text(request, 503, problem) if problem else _text(request, 200, "ready")

        def failed(failure: Failure) -> bytes:
            log.failure("readiness check failed", failure)
            return page(f"readiness check failed: {failure.getErrorMessage()}")

        return answer_later(request, self._readiness.check().addCallbacks(page, failed))


def answer_later(request: Request, answering: Deferred[bytes]) -> Any:
    """Render ``request`` with the body ``answering`` fires with (unless the
    client went away meanwhile): what ``render_GET`` returns for it."""
    finished: list[object] = []
    request.notifyFinish().addBoth(finished.append)

    def answer(body: bytes) -> None:
        if finished:
            return  # the prober went away meanwhile
        request.write(body)
        request.finish()

    def failed(failure: Failure) -> None:
        log.failure("answering {uri} failed", failure, uri=request.uri)
        answer(_text(request, 500, f"failed: {failure.getErrorMessage()}"))

    answering.addCallbacks(answer, failed)
    return NOT_DONE_YET


# Connections at once, and the seconds one may stay quiet: a prober or scraper
# needs one for a moment, and what it does not take is the mail's.
CONNECTIONS = 32
IDLE_TIMEOUT = 30.0


class _OneRequest(Request):
    """Answers one request per connection: a client that pipelines requests and
    never reads the answers holds one answer, not one per request."""

    def process(self) -> None:
        self.channel.persistent = False
        self.setHeader(b"Connection", b"close")  # type: ignore[no-untyped-call]
        super().process()  # type: ignore[no-untyped-call]


class _QuietSite(Site):
    """A scrape every few seconds is no news: no access log line each."""

    noisy = False
    requestFactory = _OneRequest

    def log(self, request: http.Request) -> None:
        pass


class _Limited(policies.WrappingFactory):
    """At most ``limit`` connections at once; more are closed at once."""

    noisy = False

    def __init__(self, factory: Site, limit: int) -> None:
        super().__init__(factory)  # type: ignore[no-untyped-call]
        self._limit = limit

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.protocols) >= self._limit:
            return None
        return super().buildProtocol(addr)


def site(metrics: Resource, readiness: ReadinessCheck) -> Site:
    """``/metrics`` served by ``metrics``, ``/healthz`` and ``/readyz`` asking ``readiness``."""
    root = Resource()
    root.putChild(b"metrics", metrics)
    root.putChild(b"healthz", HealthPage())  # type: ignore[no-untyped-call]
    root.putChild(b"readyz", ReadyPage(readiness))
    return _QuietSite(root, timeout=IDLE_TIMEOUT)  # type: ignore[no-untyped-call]


def limited(site: Site) -> _Limited:
    """``site``, served to at most :data:`CONNECTIONS` clients at once."""
    return _Limited(site, CONNECTIONS)


def monitoring_service(description: str, reactor: Any, metrics: Metrics) -> Listening:
    """The service serving ``site`` on the server endpoint ``description``
    (already checked by the configuration)."""
    readiness = Readiness(reactor, lambda: metrics.watched)
    served = limited(site(registry_page(metrics), readiness))
    return Listening(description, serverFromString(reactor, description), served)
