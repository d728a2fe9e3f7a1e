"""Prometheus metrics, in a registry of their own (so smtpguard embeds in a
program that has its own, and tests read exact values): counters and histograms
counted per transaction and per event, gauges read from live state at scrape
time."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred
from zope.interface import implementer

from smtpguard.events import Event, Report
from smtpguard.interfaces import IClosable, IHealthReporting, IScanner
from smtpguard.reload import Generation
from smtpguard.results import ScanResult, SizeLimit, Verdict
from smtpguard.scanners.chain import Scanned, scan_timed
from smtpguard.scanners.deadline import scan_safely
from smtpguard.scanners.optional import Health, check, close, health, size_limit
from smtpguard.transaction import Transaction

_T = TypeVar("_T")

if TYPE_CHECKING:
    from smtpguard.envelope import Envelope
    from smtpguard.notifiers.outbox import Outbox
    from smtpguard.quarantine import Quarantine
    from smtpguard.server import GuardFactory
    from smtpguard.spool import Message
    from smtpguard.upstream import Upstream

# From a few milliseconds (a clean text message) to the longest scan timeout.
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# From a one-line message to the largest a next hop usually takes.
BYTES = tuple(float(4**power * 1024) for power in range(10))  # 1 KiB ... 256 MiB


@attrs.define
class Watched:
    """The live parts the gauges and ``/readyz`` look at; replaced whole when a
    reload builds new ones."""

    listeners: Mapping[str, GuardFactory] = attrs.Factory(dict)
    scanner: IScanner | None = None
    upstream: Upstream | None = None
    outbox: Outbox | None = None
    quarantine: Quarantine | None = None


class Metrics:
    """Every metric of one smtpguard.  Give :meth:`observe` to the pipeline (a
    TransactionObserver), :meth:`report` (or :meth:`for_listener`) to the parts
    that report events, :meth:`counted` the scanner to count scans in flight,
    and set :attr:`watched` and :attr:`config`."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.registry = CollectorRegistry()
        self.config = Generation(1, reactor.seconds())  # the configuration in force
        self.watched = Watched()
        self.scans_in_flight = 0
        registry = self.registry

        def counter(name: str, text: str, *labels: str) -> Counter:
            return Counter(f"smtpguard_{name}", text, labels, registry=registry)

        def histogram(name: str, text: str, buckets: tuple[float, ...], *labels: str) -> Histogram:
            return Histogram(f"smtpguard_{name}", text, labels, registry=registry, buckets=buckets)

        self.sessions = counter("sessions", "Client sessions ended, by listener and outcome.", "listener", "outcome")
        self.messages = counter(
            "messages",
            "Messages at their end of data, by listener, verdict and action.",
            "listener",
            "verdict",
            "action",
        )
        self.replies = counter(
            "replies",
            "Replies to the client's end of data, by listener and class (2xx, 4xx, 5xx).",
            "listener",
            "class",
        )
        self.scan_errors = counter(
            "scan_errors", "Scans that ended in an error, by scanner and kind.", "scanner", "kind"
        )
        self.next_hop_replies = counter("next_hop_replies", "The next hop's replies to messages, by class.", "class")
        self.notices_queued = counter("notices_queued", "Notices written to the outbox, by kind.", "kind")
        self.notices_sent = counter("notices_sent", "Notices the next hop accepted, by kind.", "kind")
        self.notices_failed = counter(
            "notices_failed", "Notices given up (dropped, expired, lost), by kind and outcome.", "kind", "outcome"
        )
        self.quarantine_stored = counter("quarantine_stored", "Copies stored in the quarantine.")
        self.quarantine_released = counter(
            "quarantine_released", "Copies released from the quarantine by this process."
        )
        self.refusals = counter("refusals", "Clients refused, by listener and reason.", "listener", "reason")
        self.rate_limited = counter(
            "rate_limit_refusals", "Clients refused for a limit, by listener and limit.", "listener", "limit"
        )
        self.scan_seconds = histogram("scan_seconds", "Seconds each scanner took per message.", SECONDS, "scanner")
        self.relay_seconds = histogram(
            "relay_seconds", "Seconds from the scan's end to the next hop's reply.", SECONDS, "listener"
        )
        self.transaction_seconds = histogram(
            "transaction_seconds", "Seconds receiving, scanning and relaying one message.", SECONDS, "listener"
        )
        self.message_size = histogram("message_size_bytes", "Sizes of messages received.", BYTES, "listener")
        self._events: dict[Event, Any] = {
            Event.SESSION: self.sessions,
            Event.REFUSED: self.refusals,
            Event.RATE_LIMITED: self.rate_limited,
            Event.NOTICE_QUEUED: self.notices_queued,
            Event.NOTICE_SENT: self.notices_sent,
            Event.NOTICE_FAILED: self.notices_failed,
            Event.QUARANTINE_STORED: self.quarantine_stored,
            Event.QUARANTINE_RELEASED: self.quarantine_released,
            Event.MESSAGE_REFUSED: self.replies,
        }
        registry.register(_Live(self))

    # -- what the parts give

    def observe(self, transaction: Transaction) -> None:
        """Count one finished transaction (a TransactionObserver)."""
        listener = transaction.listener
        action = transaction.action.value if transaction.action is not None else "none"
        self.messages.labels(listener, transaction.result.verdict.value, action).inc()
        self.replies.labels(listener, _reply_class(transaction.reply.code)).inc()
        self.message_size.labels(listener).observe(transaction.size)
        timings = transaction.timings
        self.transaction_seconds.labels(listener).observe(timings.receiving + timings.scanning + timings.relaying)
        for run in transaction.scans:
            self.scan_seconds.labels(run.scanner).observe(run.seconds)
        # Each scanner's own error when its runs are known, else the one result.
        results = [run.result for run in transaction.scans] or [transaction.result]
        for result in results:
            if result.verdict is Verdict.ERROR and result.error is not None:
                self.scan_errors.labels(result.scanner or "unknown", result.error.value).inc()
        if transaction.next_hop is not None:
            self.relay_seconds.labels(listener).observe(timings.relaying)
            self.next_hop_replies.labels(_reply_class(transaction.next_hop.code)).inc()

    def report(self, event: Event, *labels: str) -> None:
        """Count ``event`` (a :class:`smtpguard.events.Report`)."""
        counter = self._events[event]
        (counter.labels(*labels) if labels else counter).inc()

    def for_listener(self, listener: str) -> Report:
        """The report for the parts of one listener: its events carry its endpoint."""

        def report(event: Event, *labels: str) -> None:
            self.report(event, listener, *labels)

        return report

    def counted(self, scanner: IScanner) -> IScanner:
        """``scanner``, its scans counted in ``smtpguard_scans_in_flight``."""
        return CountedScanner(scanner, self)


def _reply_class(code: int) -> str:
    return f"{code // 100}xx"


@implementer(IScanner, IClosable, IHealthReporting)
class CountedScanner:
    """A scanner whose scans under way are counted in ``metrics.scans_in_flight``;
    everything else is ``scanner``'s."""

    def __init__(self, scanner: IScanner, metrics: Metrics) -> None:
        self._scanner = scanner
        self._metrics = metrics
        self.name = scanner.name

    def scan(self, message: Message, envelope: Envelope) -> Deferred[ScanResult]:
        return self._counting(scan_safely(self._scanner, message, envelope))

    def scan_timed(self, message: Message, envelope: Envelope, clock: Any) -> Deferred[Scanned]:
        """As :func:`smtpguard.scanners.chain.scan_timed`: each scanner's own run."""
        return self._counting(scan_timed(self._scanner, message, envelope, clock))

    def _counting(self, scanning: Deferred[_T]) -> Deferred[_T]:
        self._metrics.scans_in_flight += 1

        def done(result: Any) -> Any:
            self._metrics.scans_in_flight -= 1
            return result

        return scanning.addBoth(done)

    @property
    def max_size(self) -> SizeLimit | None:
        return size_limit(self._scanner)

    def close(self) -> Deferred[None]:
        return close(self._scanner)

    def health(self) -> Health:
        return health(self._scanner)

    def check(self) -> Deferred[None]:
        return check(self._scanner)


class _Live(Collector):
    """The gauges, read from the watched parts at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        watched = metrics.watched
        sessions = GaugeMetricFamily(
            "smtpguard_active_sessions", "Client sessions open, by listener.", labels=["listener"]
        )
        for listener, factory in watched.listeners.items():
            sessions.add_metric([listener], len(factory.sessions))
        yield sessions
        yield GaugeMetricFamily("smtpguard_scans_in_flight", "Messages being scanned.", value=metrics.scans_in_flight)
        if watched.upstream is not None:
            yield GaugeMetricFamily(
                "smtpguard_next_hop_kept_connections",
                "Idle next-hop connections kept for later sessions.",
                value=len(watched.upstream.kept),
            )
        if watched.outbox is not None:
            pending = watched.outbox.pending()
            oldest = self._metrics._reactor.seconds() - pending[0].created if pending else 0.0
            yield GaugeMetricFamily("smtpguard_outbox_notices", "Notices waiting in the outbox.", value=len(pending))
            yield GaugeMetricFamily(
                "smtpguard_outbox_oldest_notice_age_seconds",
                "Age of the oldest notice in the outbox (0 when empty).",
                value=max(oldest, 0.0),
            )
        if watched.quarantine is not None:
            yield GaugeMetricFamily(
                "smtpguard_quarantine_messages", "Copies in the quarantine.", value=watched.quarantine.count()
            )
        up = GaugeMetricFamily(
            "smtpguard_scanner_up",
            "1 if a scanner's endpoint answered when last used or checked.",
            labels=["scanner", "endpoint"],
        )
        if watched.scanner is not None:
            for endpoint in health(watched.scanner).endpoints:
                up.add_metric([endpoint.scanner, endpoint.endpoint], float(endpoint.up))
        yield up
        yield GaugeMetricFamily(
            "smtpguard_config_generation",
            "The configuration in force: 1 at start, +1 per reload.",
            value=metrics.config.number,
        )
        yield GaugeMetricFamily(
            "smtpguard_config_last_reload_success",
            "1 if the last reload took (or there was none), 0 if the old configuration stayed.",
            value=float(metrics.config.last_reload_ok),
        )
