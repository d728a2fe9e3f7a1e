"""``twistd smtpguard``: command-line options and the service they build.

:func:`build_service` is also the embedding API: give it a :class:`Config` and a
reactor and add the returned service to your application.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application import service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from smtpguard import config as configuration
from smtpguard.config import Config, ConfigError, Listener
from smtpguard.events import ignore
from smtpguard.interfaces import IPolicy, IScanner
from smtpguard.listening import Listening
from smtpguard.metrics import Metrics, Watched
from smtpguard.monitoring import monitoring_service
from smtpguard.notifiers import Notifier, NotifierService, build_notifier
from smtpguard.pipeline import Pipeline
from smtpguard.policies.default import DefaultPolicy
from smtpguard.proxyprotocol import ProxyProtocolFactory
from smtpguard.quarantine import Quarantine, build_quarantine
from smtpguard.registry import build_policy, build_scanner
from smtpguard.reload import Generation, ReloadOnSignal, restart_needed
from smtpguard.scanners.chain import AllScanners
from smtpguard.scanners.optional import close, release, size_limit
from smtpguard.sdnotify import NotifyReady
from smtpguard.server import GuardFactory, Setup
from smtpguard.tls import ServerTLS, TLSFileError
from smtpguard.transactionlog import TransactionLogFile, check_writable, log_transaction
from smtpguard.upstream import Upstream

log = Logger()


def scanner_table(spec: str) -> dict[str, str]:
    """``--scanner`` value -> a ``[[scanners]]`` table: ``builtin``,
    ``clamd:unix:/run/clamav/clamd.ctl`` (NAME:ENDPOINT) or ``icap://host:port/service``."""
    if spec.startswith("icap://"):
        return {"type": "icap", "url": spec}
    name, _, endpoint = spec.partition(":")
    return {"type": name, "endpoint": endpoint} if endpoint else {"type": name}


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run smtpguard, the SMTP antivirus-scanning proxy. Settings come from the TOML file "
        "given with --config; --listen, --upstream and --scanner replace the file's values "
        "(and are enough on their own for a quick start). SIGHUP reads the file again."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file."],
        ["upstream", "u", None, "Next hop as a client endpoint, e.g. tcp:127.0.0.1:10026."],
        ["hostname", None, None, "Our name in the greeting, EHLO and Received: headers."],
        ["workers", None, None, "Worker processes sharing the listening sockets ([server] workers).", int],
        ["worker-number", None, None, "Set by the supervisor in the workers it starts.", int],
        ["worker-directory", None, None, "Set by the supervisor: where a worker serves its metrics."],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["listen"] = []
        self["scanners"] = []
        self["adopt"] = []
        self.arguments: list[str] = []

    def parseOptions(self, options: list[str] | None = None) -> None:
        # Kept for the workers, which the supervisor starts with the same options.
        self.arguments = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)  # type: ignore[no-untyped-call]

    def opt_listen(self, endpoint: str) -> None:
        """Listen on a server endpoint, e.g. tcp:10025:interface=127.0.0.1 (repeatable)."""
        self["listen"].append(endpoint)

    def opt_scanner(self, spec: str) -> None:
        """Scan with: builtin, clamd:ENDPOINT, icap://HOST:PORT/SERVICE or a plugin's name (repeatable)."""
        self["scanners"].append(scanner_table(spec))

    def opt_adopt(self, fd: str) -> None:
        """Set by the supervisor: listen on this inherited socket (repeatable, one per listener)."""
        self["adopt"].append(int(fd))

    opt_l = opt_listen
    opt_s = opt_scanner

    def postOptions(self) -> None:
        try:
            self["loaded"] = self.load()
        except ConfigError as error:
            raise usage.UsageError(str(error)) from None

    def load(self) -> Config:
        data: dict[str, Any] = {}
        if self["config"]:
            data = configuration.read_toml(self["config"])
        server = data.setdefault("server", {})
        if self["listen"]:
            server["listen"] = self["listen"]
        if self["hostname"]:
            server["hostname"] = self["hostname"]
        if self["workers"] is not None:
            server["workers"] = self["workers"]
        if self["upstream"]:
            data.setdefault("upstream", {})["endpoint"] = self["upstream"]
        if self["scanners"]:
            data["scanners"] = self["scanners"]
        return configuration.parse(data, self["config"] or "command line")


def server_tls(config: Config) -> Any:
    """The STARTTLS context from the configured PEM files, or None."""
    if config.tls_certificate is None or config.tls_key is None:
        return None
    try:
        return ServerTLS(config.tls_certificate, config.tls_key)
    except TLSFileError as error:
        raise ConfigError(f"{config.source}: server.{error.setting}: {error}") from None


def build_scanners(config: Config, reactor: Any) -> AllScanners:
    """The configured ``[[scanners]]``, all of which scan every message."""
    where = f"{config.source}: scanners"
    return AllScanners([build_scanner(table, reactor, f"{where}[{i}]") for i, table in enumerate(config.scanners)])


@attrs.frozen
class Shared:
    """What every listener of one configuration shares."""

    scanner: IScanner
    upstream: Upstream
    quarantine: Quarantine | None = None
    notifier: Notifier | None = None

    @classmethod
    def build(cls, config: Config, reactor: Any, metrics: Metrics | None = None) -> Shared:
        quarantine = notifier = None
        report = metrics.report if metrics is not None else ignore
        if config.quarantine is not None:
            try:
                quarantine = build_quarantine(config.quarantine, reactor, report)
            except ConfigError as error:
                raise ConfigError(f"{config.source}: quarantine.{error}") from None
        if config.notifications is not None:
            # A next-hop client of its own, keeping no connections: notices are rare.
            hop = Upstream(reactor, attrs.evolve(config.upstream, keep_connections=0))
            try:
                notifier = build_notifier(config.notifications, hop, config.server.hostname, reactor, report)
            except ConfigError as error:
                raise ConfigError(f"{config.source}: notifications.{error}") from None
        return cls(build_scanners(config, reactor), Upstream(reactor, config.upstream), quarantine, notifier)

    def close(self) -> Deferred[None]:
        """Let go of what stays open between sessions: the scanners' connections
        and timers, and the connections kept to the next hop; never fails."""
        closing = [close(self.scanner), release("the next hop's kept connections", self.upstream.close)]
        return gatherResults(closing).addCallback(lambda _: None)


def build_setup(
    config: Config, reactor: Any, listener: Listener, shared: Shared, metrics: Metrics | None = None
) -> Setup:
    """What a session on ``listener`` runs with under ``config``: scanners,
    policy and next hop wired, counted in ``metrics`` if given."""
    policy = build_policy(config.policy_for(listener), f"{config.source}: policy")
    if shared.quarantine is None and _any_setting(policy, "quarantine", "quarantine_dropped"):
        raise ConfigError(f"{config.source}: policy.quarantine: needs a [quarantine] directory")
    if shared.notifier is None and _any_setting(policy, "notify_sender_on_virus", "notify_sender_on_error_drop"):
        raise ConfigError(f"{config.source}: policy.notify_sender_on_virus: needs a [notifications] table")
    pipeline = Pipeline(
        reactor,
        shared.scanner if metrics is None else metrics.counted(shared.scanner),
        policy,
        config.scan_timeout,
        quarantine=shared.quarantine,
        notifier=shared.notifier,
        listener=listener.endpoint,
        observers=[log_transaction] if metrics is None else [log_transaction, metrics.observe],
    )
    spool = config.server.spool_directory
    if spool is not None and not (os.path.isdir(spool) and os.access(spool, os.W_OK | os.X_OK)):
        raise ConfigError(f"{config.source}: server.spool_directory: {spool!r} is not a writable directory")
    size = configuration.message_size(config, size_limit(shared.scanner))
    settings = attrs.evolve(config.server, tls=server_tls(config), access=listener.access, max_message_size=size)
    return Setup(shared.upstream, pipeline.process, settings, pipeline.accepts)


def build_factory(
    config: Config,
    reactor: Any,
    listener: Listener | None = None,
    shared: Shared | None = None,
    metrics: Metrics | None = None,
) -> GuardFactory:
    """The listening factory for ``config`` (and one of its ``listener``s):
    scanners, policy and next hop wired, counted in ``metrics`` if given."""
    listener = listener or config.listeners[0]
    setup = build_setup(config, reactor, listener, shared or Shared.build(config, reactor, metrics), metrics)
    report = ignore if metrics is None else metrics.for_listener(listener.endpoint)
    return GuardFactory(reactor, setup.next_hop, setup.process, setup.settings, setup.accepts, report)


def _any_setting(policy: IPolicy, *flags: str) -> bool:
    """Whether the policy or any of its banks turns on one of ``flags``."""
    if not isinstance(policy, DefaultPolicy):
        return False
    every = [policy.settings, *(rule.settings for rule in policy.rules)]
    return any(getattr(settings, flag) for settings in every for flag in flags)


class Drain(service.Service):
    """Stopped last: the listeners have stopped, then every session is told 421 as
    soon as it does not wait for an outcome, and stopping waits (at most
    ``timeout`` seconds) for the outcomes still pending, so a restart costs no
    client the reply to a message the next hop already took.  Then ``release``
    closes what the sessions shared (scanners, kept next-hop connections)."""

    def __init__(
        self,
        reactor: Any,
        factories: list[GuardFactory],
        timeout: float = 30.0,
        release: Callable[[], Deferred[None]] | None = None,
    ) -> None:
        self._reactor = reactor
        self._factories = factories
        self._timeout = timeout
        self._release = release

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        for factory in self._factories:
            factory.drain()
        deadline = self._reactor.seconds() + self._timeout

        def settled() -> bool:
            # Every session closes once it has its outcome; until its connection is
            # gone, that outcome may still sit in the connection's write buffer.
            return not any(factory.sessions for factory in self._factories) or self._reactor.seconds() >= deadline

        drained = _poll(self._reactor, settled, 0.05)
        release = self._release
        return drained if release is None else drained.addCallback(lambda _: release())


def _poll(reactor: Any, done: Any, interval: float) -> Deferred[None]:
    waiting: Deferred[None] = Deferred()

    def check() -> None:
        if done():
            waiting.callback(None)
        else:
            reactor.callLater(interval, check)

    check()
    return waiting


Listen = Callable[[Listener, Any], service.IService]
"""How one listener's factory is listened on: a service that listens while it runs."""


def listen_on_endpoint(config: Config, reactor: Any) -> Listen:
    """Listening on each listener's endpoint string, as a single process does."""

    def listen(listener: Listener, factory: Any) -> service.IService:
        try:
            endpoint = serverFromString(reactor, listener.endpoint)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"{config.source}: bad endpoint {listener.endpoint!r}: {error}") from None
        except (IndexError, KeyError):  # the systemd: parser looks the socket up at once
            raise ConfigError(
                f"cannot listen on {listener.endpoint}: systemd passed no such socket"
                " (start smtpguard through its .socket unit)"
            ) from None
        return Listening(listener.endpoint, endpoint, factory)

    return listen


@attrs.frozen
class _Loaded:
    """One configuration, built: what its sessions share and, per listener, the
    setup they run with."""

    config: Config
    shared: Shared
    setups: tuple[Setup, ...]


class GuardService(service.MultiService):
    """Every listener of one configuration; :meth:`reload` puts another in force
    for the sessions to come.

    ``generation`` is the :class:`~smtpguard.reload.Generation` in force; each
    callable in ``reloaded`` is called with the new one after every reload,
    refused or not (for monitoring)."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        load: Callable[[], Config] | None = None,
        metrics: Metrics | None = None,
        listen: Listen | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        listen = listen or listen_on_endpoint(config, reactor)
        self._reactor = reactor
        self._load = load
        if metrics is None and config.metrics_listen is not None:
            metrics = Metrics(reactor)
        self.metrics = metrics
        self._started_with = config  # whose listeners listen until a restart
        self._endpoints = [listener.endpoint for listener in config.listeners]
        self.reloaded: list[Callable[[Generation], object]] = []
        if metrics is not None and config.metrics_listen is not None:
            # Added first so it stops last: /readyz says "not listening" while draining.
            try:
                monitoring = monitoring_service(config.metrics_listen, reactor, metrics)
            except (ValueError, TypeError) as error:
                raise ConfigError(
                    f"{config.source}: metrics.listen: bad endpoint {config.metrics_listen!r}: {error}"
                ) from None
            monitoring.setServiceParent(self)  # type: ignore[no-untyped-call]
        if config.logging.file is not None:
            # Started first and stopped last: the transactions of draining sessions are logged.
            check_writable(config.logging, config.source)
            TransactionLogFile(config.logging).setServiceParent(self)  # type: ignore[no-untyped-call]
        # Services stop in the reverse order: the listeners first, then the
        # draining sessions (and what they shared, once they are done), then the
        # notifier (whose notices those sessions may still queue).
        self.notifications = NotifierService()
        self.notifications.setServiceParent(self)  # type: ignore[no-untyped-call]
        self._loaded = self._build(config)
        self._open = [self._loaded.shared]  # what each configuration shares, until closed
        self._use_outbox(self._loaded)
        self.factories = [
            GuardFactory(
                reactor,
                setup.next_hop,
                setup.process,
                setup.settings,
                setup.accepts,
                ignore if metrics is None else metrics.for_listener(listener.endpoint),
            )
            for listener, setup in zip(config.listeners, self._loaded.setups, strict=True)
        ]
        Drain(reactor, self.factories, release=self._close_all).setServiceParent(self)  # type: ignore[no-untyped-call]
        for listener, guard in zip(config.listeners, self.factories, strict=True):
            factory: Any = guard
            if listener.proxy_protocol:
                factory = ProxyProtocolFactory(guard, listener.trusted_proxies, reactor, report=guard.report)
            listen(listener, factory).setServiceParent(self)  # type: ignore[attr-defined]
        self.generation = Generation(1, reactor.seconds())
        self._watch()

    def reload(self, config: Config | None = None) -> Generation:
        """Put ``config`` in force (by default, the configuration read again as at
        the start) for the sessions to come; sessions under way finish with the
        one they started with, whose scanners and kept next-hop connections are
        closed after the last of them.  A configuration that cannot be built is
        refused with one logged error and the one in force stays; a change only
        a restart applies is logged and left out.  Returns the generation then
        in force, which says whether the reload took."""
        if any(factory.draining for factory in self.factories):
            log.info("stopping: the configuration is not reloaded")
            return self.generation
        for child in self:
            # The transaction log's file, reopened as log rotation expects of a
            # SIGHUP, whether or not the configuration can be put in force.
            reopen = getattr(child, "reopen", None)
            if callable(reopen):
                reopen()
        try:
            if config is None:
                if self._load is None:
                    raise ConfigError("no configuration to read again: give reload() one")
                config = self._load()
            loaded = self._build(config)
            changes = self._use_outbox(loaded)
        except Exception as error:
            source = config.source if config is not None else self._started_with.source
            reason = str(error) if isinstance(error, ConfigError) else f"{source}: {error!r}"
            log.error("configuration not reloaded, the one in force stays: {reason}", reason=reason)
            return self._now(attrs.evolve(self.generation, last_reload_ok=False, last_error=reason))
        for change in restart_needed(self._started_with, config) + changes:
            log.warn("{source}: {change} changed: needs a restart; not applied", source=config.source, change=change)
        previous, self._loaded = self._loaded, loaded
        self._open.append(loaded.shared)
        retired = [factory.reconfigure(setup) for factory, setup in zip(self.factories, loaded.setups, strict=True)]
        # Monitoring looks at the new parts before the previous ones are closed:
        # a health check under way on those then asks the new ones.
        generation = self._now(Generation(self.generation.number + 1, self._reactor.seconds()))
        gatherResults(retired).addCallback(lambda _: self._close(previous.shared))
        log.info("{source}: configuration reloaded (generation {n})", source=config.source, n=generation.number)
        return generation

    def _now(self, generation: Generation) -> Generation:
        self.generation = generation
        self._watch()
        for observer in self.reloaded:
            observer(generation)
        return generation

    def _watch(self) -> None:
        """Show the metrics the configuration in force and the parts it uses."""
        if self.metrics is None:
            return
        shared = self._loaded.shared
        self.metrics.config = self.generation
        self.metrics.watched = Watched(
            dict(zip(self._endpoints, self.factories, strict=True)),
            shared.scanner,
            shared.upstream,
            self.notifications.notifier.outbox if self.notifications.notifier is not None else None,
            shared.quarantine,
        )

    def _build(self, config: Config) -> _Loaded:
        # A listener keeps its endpoint until a restart; the file's listener with
        # the same endpoint gives its access rules and policy (if none does, it
        # keeps those it has).
        listeners = {listener.endpoint: listener for listener in config.listeners}
        running = [listeners.get(listener.endpoint, listener) for listener in self._started_with.listeners]
        shared = Shared.build(config, self._reactor, self.metrics)
        try:
            setups = tuple(build_setup(config, self._reactor, listener, shared, self.metrics) for listener in running)
        except BaseException:
            shared.close()
            raise
        return _Loaded(config, shared, setups)

    def _use_outbox(self, loaded: _Loaded) -> list[str]:
        """One outbox delivers across reloads (its notices stay queued): a new
        notifier takes the one in use, with its own retry settings and next hop.
        The restart-only changes this finds."""
        notifier, current = loaded.shared.notifier, self.notifications.notifier
        if notifier is None:
            return []
        if current is None:
            try:
                self.notifications.use(notifier)
            except OSError as error:
                loaded.shared.close()
                where = f"{loaded.config.source}: notifications.outbox"
                raise ConfigError(f"{where}: cannot use {notifier.outbox.directory!r}: {error.strerror}") from None
            return []
        outbox = current.outbox
        moved = os.path.normpath(outbox.directory) != os.path.normpath(notifier.outbox.directory)
        outbox.follow(notifier.outbox)
        notifier.outbox = outbox
        self.notifications.use(notifier)
        return ["notifications.outbox"] if moved else []

    def _close(self, shared: Shared) -> Deferred[None]:
        if shared not in self._open:
            return succeed(None)
        self._open.remove(shared)
        return shared.close()

    def _close_all(self) -> Deferred[None]:
        return gatherResults([self._close(shared) for shared in list(self._open)]).addCallback(lambda _: None)


def build_service(
    config: Config,
    reactor: Any,
    load: Callable[[], Config] | None = None,
    metrics: Metrics | None = None,
    listen: Listen | None = None,
) -> GuardService:
    """A service listening on every configured endpoint (or as ``listen`` has it:
    a worker adopts its supervisor's sockets), and serving ``/metrics`` on
    ``[metrics] listen`` when set (``metrics``, if given, is counted in whether
    or not it is served); ``load`` reads the configuration again for
    :meth:`GuardService.reload`."""
    return GuardService(config, reactor, load, metrics, listen)


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    # Until the reload handler is in place (when the service starts), a SIGHUP
    # (a `systemctl reload` just after the start) must not end the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    try:
        if options["worker-number"] is not None or options["loaded"].workers > 1:
            from smtpguard import workers

            top: service.MultiService = workers.make_service(options, reactor)
            if options["worker-number"] is not None:
                return top  # its supervisor speaks for it to systemd
        else:
            guard = build_service(options["loaded"], reactor, options.load)
            # Under twistd only: a program that embeds the service calls reload() itself.
            ReloadOnSignal(reactor, guard.reload).setServiceParent(guard)  # type: ignore[no-untyped-call]
            top = guard
    except ConfigError as error:
        raise SystemExit(f"smtpguard: {error}") from None
    NotifyReady().setServiceParent(top)  # type: ignore[no-untyped-call]
    return top
