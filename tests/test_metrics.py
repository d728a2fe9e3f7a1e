"""The metrics, one by one: counted from Transaction values built here, from the
events the parts report, and read from live state at scrape time; and
readiness, on a Clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from smtpguard import replies
from smtpguard.envelope import Client, Envelope
from smtpguard.metrics import Metrics, Watched
from smtpguard.notifiers.outbox import Outbox
from smtpguard.quarantine import Quarantine
from smtpguard.readiness import Readiness
from smtpguard.results import Action, ErrorKind, ScanResult, Threat
from smtpguard.scanners.chain import AllScanners, FailoverScanners
from smtpguard.scanners.clamd import ClamdScanner, ClamdSettings
from smtpguard.scanners.optional import EndpointHealth, Health
from smtpguard.settings import UpstreamSettings
from smtpguard.spool import Message
from smtpguard.testing import FixedScanner, MemoryNextHop
from smtpguard.transaction import ScannerRun, Timings, Transaction
from smtpguard.upstream import Reachability, Upstream
from tests.test_server import Session

LISTENER = "tcp:10025:interface=127.0.0.1"
ENVELOPE = Envelope(Client("192.0.2.1", 4000), "alice@example.org")
CLEAN = ScanResult.clean("clamd")


def value(metrics: Metrics, name: str, **labels: str) -> float:
    """A sample's value; 0 for one never counted."""
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def transaction(**fields: Any) -> Transaction:
    given: dict[str, Any] = {
        "id": "T1",
        "listener": LISTENER,
        "envelope": ENVELOPE,
        "size": 2048,
        "result": CLEAN,
        "action": Action.DELIVER,
        "reply": replies.OK,
        **fields,
    }
    return Transaction(**given)


# -- per transaction ---------------------------------------------------------------


def test_a_delivered_message_is_counted_by_listener_verdict_and_action() -> None:
    """One clean, delivered message: messages{listener, clean, deliver} 1, one 2xx reply."""
    metrics = Metrics(Clock())
    metrics.observe(transaction())
    assert value(metrics, "smtpguard_messages_total", listener=LISTENER, verdict="clean", action="deliver") == 1
    assert value(metrics, "smtpguard_replies_total", listener=LISTENER, **{"class": "2xx"}) == 1


def test_a_message_without_decision_is_counted_with_action_none() -> None:
    """A local error (no decision reached) counts under action "none"."""
    metrics = Metrics(Clock())
    error = ScanResult.failed(ErrorKind.OTHER, "bug", "clamd")
    metrics.observe(transaction(result=error, action=None, reply=replies.LOCAL_ERROR))
    assert value(metrics, "smtpguard_messages_total", listener=LISTENER, verdict="error", action="none") == 1
    assert value(metrics, "smtpguard_replies_total", listener=LISTENER, **{"class": "4xx"}) == 1


def test_message_size_is_observed_in_bytes() -> None:
    """The size goes into smtpguard_message_size_bytes: count 1, sum the size, in the 4 KiB bucket."""
    metrics = Metrics(Clock())
    metrics.observe(transaction(size=3000))
    assert value(metrics, "smtpguard_message_size_bytes_count", listener=LISTENER) == 1
    assert value(metrics, "smtpguard_message_size_bytes_sum", listener=LISTENER) == 3000
    assert value(metrics, "smtpguard_message_size_bytes_bucket", listener=LISTENER, le="1024.0") == 0
    assert value(metrics, "smtpguard_message_size_bytes_bucket", listener=LISTENER, le="4096.0") == 1


def test_transaction_time_is_receiving_plus_scanning_plus_relaying() -> None:
    """smtpguard_transaction_seconds observes the sum of the three timings."""
    metrics = Metrics(Clock())
    metrics.observe(transaction(timings=Timings(receiving=0.5, scanning=0.25, relaying=2.0)))
    assert value(metrics, "smtpguard_transaction_seconds_sum", listener=LISTENER) == 2.75
    assert value(metrics, "smtpguard_transaction_seconds_count", listener=LISTENER) == 1


def test_scan_time_is_observed_per_scanner() -> None:
    """Each ScannerRun's seconds go under its scanner's label."""
    metrics = Metrics(Clock())
    runs = (ScannerRun("clamd", CLEAN, 0.125), ScannerRun("builtin", ScanResult.clean("builtin"), 0.5))
    metrics.observe(transaction(scans=runs))
    assert value(metrics, "smtpguard_scan_seconds_sum", scanner="clamd") == 0.125
    assert value(metrics, "smtpguard_scan_seconds_sum", scanner="builtin") == 0.5


def test_relay_time_and_next_hop_reply_class_are_counted_when_relayed() -> None:
    """A relayed message: relay seconds observed, the next hop's 451 counted as 4xx."""
    metrics = Metrics(Clock())
    metrics.observe(
        transaction(
            reply=replies.UPSTREAM_UNAVAILABLE, next_hop=replies.UPSTREAM_UNAVAILABLE, timings=Timings(relaying=1.5)
        )
    )
    assert value(metrics, "smtpguard_relay_seconds_sum", listener=LISTENER) == 1.5
    assert value(metrics, "smtpguard_next_hop_replies_total", **{"class": "4xx"}) == 1


def test_nothing_relayed_counts_no_relay_time_and_no_next_hop_reply() -> None:
    """A rejected message (next_hop None): no relay observation, no next-hop reply."""
    metrics = Metrics(Clock())
    infected = ScanResult.infected((Threat("Eicar"),), "clamd")
    metrics.observe(transaction(result=infected, action=Action.REJECT, reply=replies.OK))
    assert value(metrics, "smtpguard_relay_seconds_count", listener=LISTENER) == 0
    assert value(metrics, "smtpguard_next_hop_replies_total", **{"class": "2xx"}) == 0


def test_scan_errors_are_counted_per_scanner_run() -> None:
    """Two runs, one a timeout of clamd: scan_errors{clamd, timeout} 1, nothing for the other."""
    metrics = Metrics(Clock())
    timeout = ScanResult.failed(ErrorKind.TIMEOUT, "slow", "clamd")
    runs = (ScannerRun("clamd", timeout, 60.0), ScannerRun("builtin", ScanResult.clean("builtin"), 0.1))
    metrics.observe(transaction(result=timeout, action=Action.DEFER, scans=runs))
    assert value(metrics, "smtpguard_scan_errors_total", scanner="clamd", kind="timeout") == 1
    assert value(metrics, "smtpguard_scan_errors_total", scanner="builtin", kind="timeout") == 0


def test_scan_error_without_scanner_runs_is_counted_from_the_result() -> None:
    """No ScannerRun known: the result's own error is counted once."""
    metrics = Metrics(Clock())
    error = ScanResult.failed(ErrorKind.ENGINE_NOT_READY, "down", "clamd")
    metrics.observe(transaction(result=error, action=Action.DEFER))
    assert value(metrics, "smtpguard_scan_errors_total", scanner="clamd", kind="engine-not-ready") == 1


# -- events ---------------------------------------------------------------------------


def session_metrics(**settings: Any) -> tuple[Metrics, Session]:
    """A session (already greeted) whose factory reports to new metrics."""
    metrics = Metrics(Clock())
    session = Session.open(**settings)
    session.factory.report = metrics.for_listener(LISTENER)
    return metrics, session


def test_a_session_ended_with_quit_is_counted_as_quit() -> None:
    """QUIT, then the connection goes: sessions{listener, quit} 1."""
    metrics, session = session_metrics()
    session.hello()
    session.send(b"QUIT\r\n")
    session.lose()
    assert value(metrics, "smtpguard_sessions_total", listener=LISTENER, outcome="quit") == 1


def test_a_client_that_goes_without_quit_is_counted_as_disconnected() -> None:
    """No QUIT: the session counts as disconnected."""
    metrics, session = session_metrics()
    session.hello()
    session.lose()
    assert value(metrics, "smtpguard_sessions_total", listener=LISTENER, outcome="disconnected") == 1


def test_an_idle_client_timed_out_is_counted_as_timeout() -> None:
    """The command timeout ends the session: outcome timeout."""
    metrics, session = session_metrics(command_timeout=10.0)
    session.hello()
    session.clock.advance(10.0)
    session.lose()
    assert value(metrics, "smtpguard_sessions_total", listener=LISTENER, outcome="timeout") == 1


def test_a_client_outside_allowed_clients_is_counted_as_an_access_refusal() -> None:
    """allowed_clients without the client: refusals{access} 1, sessions{refused} 1."""
    from smtpguard.access import AccessRules, networks

    metrics, first = session_metrics(access=AccessRules(allowed_clients=networks(["198.51.100.0/24"])))
    session = first.another()  # the first connected before the metrics were given
    session.lose()
    assert value(metrics, "smtpguard_refusals_total", listener=LISTENER, reason="access") == 1
    assert value(metrics, "smtpguard_sessions_total", listener=LISTENER, outcome="refused") == 1


def test_a_connection_over_max_connections_is_counted_as_a_rate_limit_refusal() -> None:
    """max_connections 1, a second connection: rate_limit_refusals{max_connections} 1."""
    metrics, session = session_metrics(max_connections=1)
    session.another()
    assert value(metrics, "smtpguard_rate_limit_refusals_total", listener=LISTENER, limit="max_connections") == 1


def test_xforward_from_an_unauthorized_host_is_counted_as_a_refusal() -> None:
    """XFORWARD from a host not in xforward_hosts: refusals{xforward} 1."""
    metrics, session = session_metrics()
    session.hello()
    session.send(b"XFORWARD ADDR=192.0.2.9\r\n")
    assert session.replies() == [replies.NOT_AUTHORIZED.to_bytes()]
    assert value(metrics, "smtpguard_refusals_total", listener=LISTENER, reason="xforward") == 1


def test_outbox_reports_notices_queued_and_sent(tmp_path: Path) -> None:
    """A notice queued and accepted by the next hop: queued{sender} 1, sent{sender} 1."""
    clock = Clock()
    metrics = Metrics(clock)
    outbox = Outbox(clock, str(tmp_path), MemoryNextHop(), report=metrics.report)
    outbox.start()
    outbox.add("alice@example.org", b"Subject: notice\r\n\r\ntext\r\n", "sender", "T1")
    clock.advance(0)
    assert value(metrics, "smtpguard_notices_queued_total", kind="sender") == 1
    assert value(metrics, "smtpguard_notices_sent_total", kind="sender") == 1


def test_outbox_reports_a_refused_notice_as_failed_dropped(tmp_path: Path) -> None:
    """A 5xx for a notice: notices_failed{sender, dropped} 1."""
    clock = Clock()
    metrics = Metrics(clock)
    hop = MemoryNextHop()
    hop.data_reply = replies.MESSAGE_TOO_BIG
    outbox = Outbox(clock, str(tmp_path), hop, report=metrics.report)
    outbox.start()
    outbox.add("alice@example.org", b"Subject: notice\r\n\r\ntext\r\n", "sender", "T1")
    clock.advance(0)
    assert value(metrics, "smtpguard_notices_failed_total", kind="sender", outcome="dropped") == 1


# -- gauges ---------------------------------------------------------------------------


class Held:
    """A scanner whose scans wait until released."""

    name = "held"

    def __init__(self) -> None:
        self.waiting: list[Deferred[ScanResult]] = []

    def scan(self, message: Message, envelope: Envelope) -> Deferred[ScanResult]:
        self.waiting.append(Deferred())
        return self.waiting[-1]


def test_scans_in_flight_counts_scans_until_they_end() -> None:
    """Two scans under way: 2; one ends: 1."""
    metrics = Metrics(Clock())
    held = Held()
    counted = metrics.counted(held)  # type: ignore[arg-type]
    for _ in range(2):
        counted.scan(Message.from_bytes(b"x\r\n"), ENVELOPE)
    assert value(metrics, "smtpguard_scans_in_flight") == 2
    held.waiting[0].callback(CLEAN)
    assert value(metrics, "smtpguard_scans_in_flight") == 1


def test_active_sessions_are_read_from_each_listener() -> None:
    """Two open sessions on the listener: active_sessions 2."""
    metrics, session = session_metrics()
    session.another()
    metrics.watched = Watched({LISTENER: session.factory})
    assert value(metrics, "smtpguard_active_sessions", listener=LISTENER) == 2


def test_outbox_depth_and_oldest_notice_age_are_read_at_scrape_time(tmp_path: Path) -> None:
    """Two notices waiting (not started), the first queued 90 s ago: depth 2, age 90."""
    clock = Clock()
    metrics = Metrics(clock)
    outbox = Outbox(clock, str(tmp_path), MemoryNextHop())
    outbox.add("a@example.org", b"x\r\n", "sender", "T1")
    clock.advance(60)
    outbox.add("b@example.org", b"x\r\n", "sender", "T2")
    clock.advance(30)
    metrics.watched = Watched(outbox=outbox)
    assert value(metrics, "smtpguard_outbox_notices") == 2
    assert value(metrics, "smtpguard_outbox_oldest_notice_age_seconds") == 90


def test_quarantine_size_counts_the_entries(tmp_path: Path) -> None:
    """Two entries (and a temporary file) in the directory: quarantine_messages 2."""
    for name in ("20261129T224501Z-0123abcd", "20261129T224502Z-0123abce"):
        (tmp_path / f"{name}.json").write_text("{}")
        (tmp_path / f"{name}.eml").write_text("")
    (tmp_path / ".20261129T224503Z-0123abcf.json.tmp").write_text("")
    metrics = Metrics(Clock())
    metrics.watched = Watched(quarantine=Quarantine(str(tmp_path), Clock()))
    assert value(metrics, "smtpguard_quarantine_messages") == 2


def test_kept_next_hop_connections_are_read_from_the_upstream() -> None:
    """No connection kept yet: the gauge is 0 (and present)."""
    reactor = MemoryReactorClock()
    metrics = Metrics(reactor)
    metrics.watched = Watched(upstream=Upstream(reactor, UpstreamSettings(endpoint="tcp:127.0.0.1:10026")))
    assert metrics.registry.get_sample_value("smtpguard_next_hop_kept_connections") == 0


def clamd_scanner(reactor: Any, *descriptions: str) -> ClamdScanner:
    from twisted.internet.endpoints import clientFromString

    endpoints = [(description, clientFromString(reactor, description)) for description in descriptions]
    return ClamdScanner(reactor, endpoints, ClamdSettings())


def test_scanner_up_is_reported_per_clamd_endpoint() -> None:
    """Two clamd endpoints, the second marked down: scanner_up 1 and 0."""
    reactor = MemoryReactorClock()
    scanner = clamd_scanner(reactor, "tcp:127.0.0.1:3310", "tcp:127.0.0.1:3311")
    scanner.endpoints[1].up = False
    metrics = Metrics(reactor)
    metrics.watched = Watched(scanner=scanner)
    assert value(metrics, "smtpguard_scanner_up", scanner="clamd", endpoint="tcp:127.0.0.1:3310") == 1
    assert (
        metrics.registry.get_sample_value(
            "smtpguard_scanner_up", {"scanner": "clamd", "endpoint": "tcp:127.0.0.1:3311"}
        )
        == 0
    )


def test_config_generation_and_last_reload_success_follow_the_holder() -> None:
    """Generation 1 and success 1 at start; after a refused reload: still 1 and 0."""
    metrics = Metrics(Clock())
    assert value(metrics, "smtpguard_config_generation") == 1
    assert value(metrics, "smtpguard_config_last_reload_success") == 1
    metrics.config = attrs.evolve(metrics.config, last_reload_ok=False, last_error="policy.on_virus: bad")
    assert value(metrics, "smtpguard_config_generation") == 1
    assert value(metrics, "smtpguard_config_last_reload_success") == 0


# -- health of chains ----------------------------------------------------------------


class Reporting(FixedScanner):
    def __init__(self, name: str, working: bool) -> None:
        super().__init__(CLEAN, name)
        self._health = Health(working, (EndpointHealth(name, f"{name}:1", working),), "" if working else f"{name} down")

    def health(self) -> Health:
        return self._health

    def check(self) -> Deferred[None]:
        return succeed(None)


def test_an_all_chain_works_only_when_every_member_does() -> None:
    """all: one member down makes the chain not working, naming that member."""
    from zope.interface import directlyProvides

    from smtpguard.interfaces import IHealthReporting

    members = [Reporting("a", True), Reporting("b", False)]
    for member in members:
        directlyProvides(member, IHealthReporting)
    assert AllScanners(members).health() == Health(
        False, (members[0]._health.endpoints[0], members[1]._health.endpoints[0]), "b down"
    )
    assert FailoverScanners(members).health().working is True


# -- readiness -------------------------------------------------------------------------


class Listening:
    """A listener's factory as readiness sees it."""

    def __init__(self, ports: int) -> None:
        self.numPorts = ports


def ready(readiness: Readiness) -> str:
    answers: list[str] = []
    readiness.check().addCallback(answers.append)
    assert len(answers) == 1
    return answers[0]


def test_not_ready_while_a_listener_does_not_listen() -> None:
    """One listener with no port: "not listening on" it."""
    watched = Watched({LISTENER: Listening(0)})  # type: ignore[dict-item]
    assert ready(Readiness(Clock(), lambda: watched)) == f"not listening on {LISTENER}"


def test_not_ready_while_the_scanner_cannot_scan() -> None:
    """clamd's only endpoint down (and its PING refused): not ready, naming clamd's problem."""
    reactor = MemoryReactorClock()
    scanner = clamd_scanner(reactor, "tcp:127.0.0.1:3310")
    scanner.close()  # no PING goes out: the endpoint stays as marked
    scanner.endpoints[0].up = False
    scanner.endpoints[0].last_error = "Connection refused"
    watched = Watched({LISTENER: Listening(1)}, scanner)  # type: ignore[dict-item]
    assert (
        ready(Readiness(reactor, lambda: watched))
        == "no working scanner: clamd: tcp:127.0.0.1:3310: Connection refused"
    )


class Asked(Reporting):
    """A scanner whose engines answer a check when the test says: until then
    the check is under way; a cancelled check leaves it down, as clamd's does."""

    def __init__(self, name: str) -> None:
        super().__init__(name, True)
        self.asking: list[Deferred[None]] = []

    def check(self) -> Deferred[None]:
        self.asking.append(Deferred())
        return self.asking[-1]

    def closed(self) -> None:
        self._health = Health(False, self._health.endpoints, f"{self.name}: PING failed: CancelledError()")
        self.asking[-1].callback(None)


def test_a_check_under_way_at_a_reload_is_answered_for_the_new_scanner() -> None:
    """/readyz asks the scanner in force; a reload replaces it and closes the
    old one, which fails the check under way: the answer is the new scanner's
    (asked in turn), not the closed one's."""
    from zope.interface import directlyProvides

    from smtpguard.interfaces import IHealthReporting

    old, new = Asked("old"), Asked("new")
    for scanner in (old, new):
        directlyProvides(scanner, IHealthReporting)
    watched = Watched({LISTENER: Listening(1)}, old)  # type: ignore[dict-item]
    answers: list[str] = []
    Readiness(MemoryReactorClock(), lambda: watched).check().addCallback(answers.append)
    watched = Watched({LISTENER: Listening(1)}, new)  # type: ignore[dict-item]
    old.closed()
    assert answers == [] and len(new.asking) == 1
    new.asking[0].callback(None)
    assert answers == [""]


def at_1000_s(reachability: Reachability) -> tuple[MemoryReactorClock, Readiness]:
    """A reactor at 1000 s, and readiness for a listening listener and a next hop
    last reached as ``reachability`` says."""
    reactor = MemoryReactorClock()
    reactor.advance(1000)
    upstream = Upstream(reactor, UpstreamSettings(endpoint="tcp:127.0.0.1:10026"))
    upstream.reachability = reachability
    watched = Watched({LISTENER: Listening(1)}, upstream=upstream)  # type: ignore[dict-item]
    return reactor, Readiness(reactor, lambda: watched)


def test_ready_without_probe_when_the_next_hop_greeted_recently() -> None:
    """A greeting 10 s ago, within RECENT: ready, and no connection made to probe."""
    reactor, readiness = at_1000_s(Reachability(succeeded=990.0))
    assert ready(readiness) == ""
    assert reactor.tcpClients == []


def test_not_ready_when_the_last_recent_attempt_at_the_next_hop_failed() -> None:
    """A failure after the last success, within RECENT: not ready, naming the problem."""
    _, readiness = at_1000_s(Reachability(succeeded=900.0, failed=995.0, problem="Connection refused"))
    assert ready(readiness) == "next hop unreachable: Connection refused"


def test_the_next_hop_is_probed_when_nothing_tried_it_lately() -> None:
    """Last success 60 s ago (more than RECENT): readiness waits for a probe connection."""
    reactor, readiness = at_1000_s(Reachability(succeeded=940.0))
    answers: list[str] = []
    readiness.check().addCallback(answers.append)
    assert answers == []
    assert [(host, port) for host, port, *_ in reactor.tcpClients] == [("127.0.0.1", 10026)]


# -- configuration ---------------------------------------------------------------------


def config_with(metrics: dict[str, Any]) -> dict[str, Any]:
    return {"upstream": {"endpoint": "tcp:127.0.0.1:10026"}, "scanners": [{"type": "builtin"}], "metrics": metrics}


def test_metrics_listen_is_read_from_the_metrics_table() -> None:
    """[metrics] listen comes through as Config.metrics_listen; absent, it is None."""
    from smtpguard import config as configuration

    assert configuration.parse(config_with({"listen": "tcp:9125"}), "f.toml").metrics_listen == "tcp:9125"
    assert configuration.parse(config_with({}), "f.toml").metrics_listen is None


def test_an_unknown_metrics_key_is_refused_naming_file_and_key() -> None:
    """A misspelt key in [metrics]: ConfigError naming the file and metrics.<key>."""
    import pytest

    from smtpguard import config as configuration

    with pytest.raises(configuration.ConfigError, match=r"^f\.toml: metrics\.listn: "):
        configuration.parse(config_with({"listn": "tcp:9125"}), "f.toml")


def test_a_bad_metrics_endpoint_stops_the_start_naming_the_key() -> None:
    """listen = "nonsense:1": build_service refuses it naming metrics.listen."""
    import pytest

    from smtpguard import config as configuration
    from smtpguard import tap

    config = configuration.parse(config_with({"listen": "nonsense:1"}), "f.toml")
    with pytest.raises(configuration.ConfigError, match=r"^f\.toml: metrics\.listen: bad endpoint 'nonsense:1'"):
        tap.build_service(config, MemoryReactorClock())
