"""Reloading the configuration: sessions under way keep the setup they started
with, new ones get the new one; what the old one shared is closed after its last
session; a configuration that cannot be built is refused and the one in force
stays; a change only a restart applies is named in the log."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs

from smtpguard import config as configuration
from smtpguard import replies, tap
from smtpguard.access import AccessRules
from smtpguard.pipeline import Pipeline
from smtpguard.policies.default import DefaultPolicy, OnVirus, PolicySettings
from smtpguard.reload import Generation, ReloadOnSignal, restart_needed
from smtpguard.scanners.builtin import EICAR_NAME, BuiltinScanner
from smtpguard.server import ESMTPServer, ServerSettings, Setup
from smtpguard.tap import Drain
from tests.test_server import EICAR_MESSAGE, HOSTNAME, PEER, SCAN_TIMEOUT, Session, ready, transaction

VIRUS_FOUND = replies.VIRUS_REJECTED.with_text(f"Message rejected: virus found ({EICAR_NAME})").to_bytes()
SOURCE = "reload-test.toml"
QUEUED = replies.OK.with_text("Ok: queued").to_bytes()


def setup_for(session: Session, on_virus: OnVirus, **settings: Any) -> Setup:
    """A setup on ``session``'s next hop with a policy doing ``on_virus``."""
    policy = DefaultPolicy(PolicySettings(on_virus=on_virus))
    pipeline = Pipeline(session.clock, BuiltinScanner(), policy, scan_timeout=SCAN_TIMEOUT)
    return Setup(session.hop, pipeline.process, ServerSettings(**{"hostname": HOSTNAME, **settings}), pipeline.accepts)


def final_reply(session: Session) -> bytes:
    return session.replies()[-1]


# -- sessions and setups --------------------------------------------------------------


def test_session_under_way_keeps_the_policy_it_started_with() -> None:
    """A session connected before the factory is reconfigured rejects EICAR with
    554 5.7.1 as its first policy says, though the new one passes it."""
    before = ready()
    before.factory.reconfigure(setup_for(before, OnVirus.PASS))
    before.send(transaction(data=EICAR_MESSAGE))
    assert final_reply(before) == VIRUS_FOUND
    assert before.hop.delivered == []


def test_session_after_the_reload_gets_the_new_policy() -> None:
    """A session connected after the factory is reconfigured with a policy that
    passes viruses gets 250 for EICAR, and the next hop has it."""
    first = ready()
    first.factory.reconfigure(setup_for(first, OnVirus.PASS))
    after = first.another().hello()
    after.send(transaction(data=EICAR_MESSAGE))
    assert final_reply(after) == QUEUED
    assert len(after.hop.delivered) == 1


def test_new_sessions_get_the_new_server_settings() -> None:
    """The greeting of a session made after the reload names the new host name;
    the one before keeps the old one in its EHLO reply."""
    before = ready()
    before.factory.reconfigure(setup_for(before, OnVirus.REJECT, hostname="new.example"))
    after = before.another()
    assert after.replies() == [replies.SERVICE_READY.with_text("new.example ESMTP smtpguard").to_bytes()]
    before.send(b"EHLO again.example\r\n")
    assert before.replies()[0].startswith(f"250-{HOSTNAME} Hello again.example".encode())


def test_previous_setup_is_retired_when_its_last_session_ends() -> None:
    """reconfigure() fires once the session that used the previous setup is gone,
    not before."""
    session = ready()
    retired: list[None] = []
    session.factory.reconfigure(setup_for(session, OnVirus.REJECT)).addCallback(retired.append)
    assert retired == []
    session.lose()
    assert retired == [None]


def test_previous_setup_waits_for_the_outcome_of_a_client_that_left() -> None:
    """A client that leaves while its message is with the next hop still uses the
    previous setup until the outcome is in: only then is it retired."""
    session = ready()
    session.begin()
    session.hop.hold = True
    session.send(b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    retired: list[None] = []
    session.factory.reconfigure(setup_for(session, OnVirus.REJECT)).addCallback(retired.append)
    session.lose()
    assert retired == []
    session.hop.release()
    assert retired == [None]


def test_unused_setup_is_retired_at_once() -> None:
    """With no session connected, the previous setup is retired as it is replaced."""
    session = ready()
    session.lose()
    retired: list[None] = []
    session.factory.reconfigure(setup_for(session, OnVirus.REJECT)).addCallback(retired.append)
    assert retired == [None]


def test_per_client_connections_stay_counted_across_a_reload() -> None:
    """max_connections_per_client = 1 before and after: a second connection from
    the address of one made before the reload is refused with 421 4.7.0; once that
    one is gone, the next is greeted."""
    rules = AccessRules(max_connections_per_client=1)
    first = Session.open(access=rules)
    first.factory.reconfigure(setup_for(first, OnVirus.REJECT, access=rules))
    assert final_reply(first.another()) == replies.TOO_MANY_CLIENT_CONNECTIONS.to_bytes()
    first.lose()
    assert final_reply(first.another()) == replies.SERVICE_READY.with_text(f"{HOSTNAME} ESMTP smtpguard").to_bytes()


def test_raised_per_client_limit_applies_to_the_next_connection() -> None:
    """max_connections_per_client raised from 1 to 2 by a reload: a second
    connection from the same address is greeted."""
    first = Session.open(access=AccessRules(max_connections_per_client=1))
    first.factory.reconfigure(setup_for(first, OnVirus.REJECT, access=AccessRules(max_connections_per_client=2)))
    assert final_reply(first.another()) == replies.SERVICE_READY.with_text(f"{HOSTNAME} ESMTP smtpguard").to_bytes()


def test_drain_waits_for_sessions_of_both_setups() -> None:
    """Stopping after a reload: a busy session of the old setup and one of the new
    both get their outcome, then 421 4.3.2, and the Drain service stops once both
    connections are gone."""
    old = ready()
    old.begin()
    old.factory.reconfigure(setup_for(old, OnVirus.REJECT))
    new = old.another().hello()
    new.begin()
    old.hop.hold = True
    old.send(b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    new.send(b"DATA\r\nSubject: y\r\n\r\nbody\r\n.\r\n")
    old.replies(), new.replies()
    drain = Drain(old.clock, [old.factory], timeout=30.0)
    drain.startService()
    stopped = drain.stopService()
    old.hop.release()
    old.clock.advance(0.1)
    assert old.replies() == [QUEUED, replies.SHUTTING_DOWN.to_bytes()]
    assert new.replies() == [QUEUED, replies.SHUTTING_DOWN.to_bytes()]
    old.lose()
    old.clock.advance(0.1)
    assert not stopped.called  # the new setup's connection is not gone yet
    new.lose()
    old.clock.advance(0.1)
    assert stopped.called


# -- the service ----------------------------------------------------------------------


def toml_config(
    tmp_path: Path, on_virus: str = "reject", listen: str = "tcp:10025", server: str = "", extra: str = ""
) -> str:
    path = tmp_path / "smtpguard.toml"
    path.write_text(
        f'[server]\nlisten = ["{listen}"]\n{server}[upstream]\nendpoint = "tcp:127.0.0.1:10026"\n'
        f'[[scanners]]\ntype = "builtin"\n[policy]\non_virus = "{on_virus}"\n{extra}',
        encoding="utf-8",
    )
    return str(path)


class Service:
    """A GuardService built from a file, with its Shared.close calls recorded."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **file: str) -> None:
        self.tmp_path = tmp_path
        self.reactor = MemoryReactorClock()
        self.path = toml_config(tmp_path, **file)
        self.closed: list[tap.Shared] = []
        closed = self.closed

        def close(shared: tap.Shared) -> Deferred[None]:
            closed.append(shared)
            return succeed(None)

        monkeypatch.setattr(tap.Shared, "close", close)
        self.service = tap.build_service(configuration.load(self.path), self.reactor, self.load)

    def load(self) -> configuration.Config:
        return configuration.load(self.path)

    def rewrite(self, **file: str) -> None:
        toml_config(self.tmp_path, **file)

    def reload(self) -> tuple[Generation, list[Any]]:
        with capturedLogs() as events:
            generation = self.service.reload()
        return generation, [event for event in events if event["log_level"] >= LogLevel.warn]

    @property
    def factory(self) -> Any:
        [factory] = self.service.factories
        return factory

    def connect(self) -> ESMTPServer:
        protocol: ESMTPServer = self.factory.buildProtocol(PEER)
        protocol.makeConnection(StringTransport(peerAddress=PEER))
        return protocol


def messages(events: list[Any]) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(event) for event in events]


def test_reload_puts_the_file_in_force_for_new_sessions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the file says on_virus = "pass", reload() makes generation 2, logs no
    warning, and the factory's new setup passes viruses."""
    built = Service(tmp_path, monkeypatch)
    before = built.factory.setup
    built.rewrite(on_virus="pass")
    generation, warnings = built.reload()
    assert (generation.number, generation.last_reload_ok, generation.last_error) == (2, True, None)
    assert warnings == []
    assert built.factory.setup is not before
    assert built.service.generation == generation


def test_old_shared_resources_are_closed_after_the_last_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scanners and next hop of the configuration a session started with are
    closed once that session ends, not at the reload."""
    built = Service(tmp_path, monkeypatch)
    first = built.service._loaded.shared
    session = built.connect()
    built.reload()
    assert built.closed == []
    session.connectionLost(None)  # type: ignore[arg-type]
    assert built.closed == [first]


def test_stopping_closes_what_every_configuration_still_shares(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopping with a session of the first configuration still connected closes
    both configurations' shared resources, each once."""
    built = Service(tmp_path, monkeypatch)
    first = built.service._loaded.shared
    built.connect()
    built.reload()
    second = built.service._loaded.shared
    built.service.startService()
    built.service.stopService()
    built.reactor.advance(30.1)
    assert sorted(map(id, built.closed)) == sorted(map(id, [first, second]))


def test_invalid_file_is_refused_and_the_old_configuration_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file with on_virus = "explode" is refused: one error naming the file, the
    key and the problem; the setup in force stays; the generation records it."""
    built = Service(tmp_path, monkeypatch)
    before = built.factory.setup
    built.rewrite(on_virus="explode")
    generation, logged = built.reload()
    [error] = messages(logged)
    assert error.startswith(f"configuration not reloaded, the one in force stays: {built.path}: policy.on_virus: ")
    assert (generation.number, generation.last_reload_ok) == (1, False)
    assert generation.last_error == error.split("stays: ", 1)[1]
    assert built.factory.setup is before


def test_unparsable_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that is not TOML is refused naming the file; generation 1 stays."""
    built = Service(tmp_path, monkeypatch)
    Path(built.path).write_text("[server\n", encoding="utf-8")
    generation, logged = built.reload()
    [error] = messages(logged)
    assert f"{built.path}: not valid TOML: " in error
    assert (generation.number, generation.last_reload_ok) == (1, False)


def test_unreadable_tls_files_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file naming TLS files that do not exist is refused naming server.tls_certificate."""
    built = Service(tmp_path, monkeypatch)
    missing = tmp_path / "missing.pem"
    built.rewrite(server=f'tls_certificate = "{missing}"\ntls_key = "{missing}"\n')
    generation, logged = built.reload()
    [error] = messages(logged)
    assert error.endswith(f"{built.path}: server.tls_certificate: cannot read '{missing}': No such file or directory")
    assert generation.last_reload_ok is False


def test_a_good_reload_after_a_refused_one_clears_the_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused, then a valid file: generation 2, last_reload_ok again, no error."""
    built = Service(tmp_path, monkeypatch)
    built.rewrite(on_virus="explode")
    built.reload()
    built.rewrite(on_virus="pass")
    generation, _ = built.reload()
    assert generation == Generation(2, built.reactor.seconds())


def test_listener_change_is_named_and_the_rest_applied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """server.listen changed: one warning says it needs a restart; the policy
    change of the same file is applied (generation 2, a new setup)."""
    built = Service(tmp_path, monkeypatch)
    before = built.factory.setup
    built.rewrite(listen="tcp:10099", on_virus="pass")
    generation, logged = built.reload()
    assert messages(logged) == [f"{built.path}: server.listen changed: needs a restart; not applied"]
    assert generation.number == 2 and built.factory.setup is not before


def test_restart_needed_names_proxy_protocol_changes() -> None:
    """proxy_protocol turned on for a listener that stays is named with its endpoint."""
    base = {"upstream": {"endpoint": "tcp:127.0.0.1:10026"}, "scanners": [{"type": "builtin"}]}
    running = configuration.parse({**base, "server": {"listen": ["tcp:10025"]}}, SOURCE)
    proxied = {"listen": ["tcp:10025"], "proxy_protocol": True, "trusted_proxies": ["10.0.0.0/8"]}
    new = configuration.parse({**base, "server": proxied}, SOURCE)
    assert restart_needed(running, new) == ["proxy_protocol of tcp:10025", "trusted_proxies of tcp:10025"]


def test_outbox_and_its_notices_are_kept_across_a_reload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The outbox in use goes on delivering after a reload, its queued notice
    still queued; the new notifier queues into it."""
    outbox = tmp_path / "outbox"
    notifications = f'[notifications]\noutbox = "{outbox}"\n'
    built = Service(tmp_path, monkeypatch, extra=notifications)
    running = built.service.notifications.notifier
    assert running is not None
    built.service.startService()
    queued = running.outbox.add("alice@example.org", b"Subject: notice\r\n\r\nx\r\n", "sender", "T1")
    built.rewrite(extra=notifications.replace('"\n', '"\nretry_initial = 7\n'))
    built.reload()
    notifier = built.service.notifications.notifier
    assert notifier is not None and notifier is not running
    assert notifier.outbox is running.outbox
    assert [notice.id for notice in notifier.outbox.pending()] == [queued.id]
    built.service.stopService()


def test_moved_outbox_needs_a_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """notifications.outbox changed: named as needing a restart; the outbox in use stays."""
    built = Service(tmp_path, monkeypatch, extra=f'[notifications]\noutbox = "{tmp_path / "a"}"\n')
    built.rewrite(extra=f'[notifications]\noutbox = "{tmp_path / "b"}"\n')
    _, logged = built.reload()
    assert messages(logged) == [f"{built.path}: notifications.outbox changed: needs a restart; not applied"]
    notifier = built.service.notifications.notifier
    assert notifier is not None and notifier.outbox.directory == str(tmp_path / "a")


# -- SIGHUP -----------------------------------------------------------------------------


class Loop:
    """Stands for the reactor's callFromThread: records what is to run in the loop."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], object]] = []

    def callFromThread(self, call: Callable[[], object]) -> None:
        self.calls.append(call)


def test_sighup_asks_for_a_reload_from_the_loop() -> None:
    """While ReloadOnSignal runs, SIGHUP schedules reload in the reactor's loop
    (it does not run inside the handler); once stopped, SIGHUP is ignored."""
    reloads: list[None] = []
    loop = Loop()
    previous = signal.getsignal(signal.SIGHUP)
    hup = ReloadOnSignal(loop, lambda: reloads.append(None))
    hup.startService()
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        assert reloads == [] and len(loop.calls) == 1
        loop.calls[0]()
        assert reloads == [None]
    finally:
        hup.stopService()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        signal.signal(signal.SIGHUP, previous)
