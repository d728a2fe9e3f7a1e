"""``twistd smtpguard``: command-line options and the service they build.

:func:`build_service` is also the embedding API: give it a :class:`Config` and a
reactor and add the returned service to your application.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from smtpguard import config as configuration
from smtpguard.config import Config, ConfigError, Listener
from smtpguard.interfaces import IPolicy, IScanner
from smtpguard.notifiers import Notifier, NotifierService, build_notifier
from smtpguard.pipeline import Pipeline
from smtpguard.policies.default import DefaultPolicy
from smtpguard.proxyprotocol import ProxyProtocolFactory
from smtpguard.quarantine import Quarantine, build_quarantine
from smtpguard.registry import build_policy, build_scanner
from smtpguard.scanners.chain import AllScanners
from smtpguard.scanners.optional import close, release, size_limit
from smtpguard.server import GuardFactory
from smtpguard.tls import ServerTLS
from smtpguard.upstream import Upstream


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
        "(and are enough on their own for a quick start)."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file."],
        ["upstream", "u", None, "Next hop as a client endpoint, e.g. tcp:127.0.0.1:10026."],
        ["hostname", None, None, "Our name in the greeting, EHLO and Received: headers."],
        ["workers", None, None, "Worker processes sharing the listening sockets ([server] workers).", int],
        ["worker-number", None, None, "Set by the supervisor in the workers it starts.", int],
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
    except Exception as error:
        raise ConfigError(f"{config.source}: server.tls_certificate: cannot load: {error}") from None


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
    def build(cls, config: Config, reactor: Any) -> Shared:
        quarantine = notifier = None
        if config.quarantine is not None:
            try:
                quarantine = build_quarantine(config.quarantine, reactor)
            except ConfigError as error:
                raise ConfigError(f"{config.source}: quarantine.{error}") from None
        if config.notifications is not None:
            # A next-hop client of its own, keeping no connections: notices are rare.
            hop = Upstream(reactor, attrs.evolve(config.upstream, keep_connections=0))
            try:
                notifier = build_notifier(config.notifications, hop, config.server.hostname, reactor)
            except ConfigError as error:
                raise ConfigError(f"{config.source}: notifications.{error}") from None
        return cls(build_scanners(config, reactor), Upstream(reactor, config.upstream), quarantine, notifier)

    def close(self) -> Deferred[None]:
        """Let go of what stays open between sessions: the scanners' connections
        and timers, and the connections kept to the next hop; never fails."""
        closing = [close(self.scanner), release("the next hop's kept connections", self.upstream.close)]
        return gatherResults(closing).addCallback(lambda _: None)


def build_factory(
    config: Config, reactor: Any, listener: Listener | None = None, shared: Shared | None = None
) -> GuardFactory:
    """The listening factory for ``config`` (and one of its ``listener``s):
    scanners, policy and next hop wired."""
    shared = shared or Shared.build(config, reactor)
    listener = listener or config.listeners[0]
    policy = build_policy(config.policy_for(listener), f"{config.source}: policy")
    if shared.quarantine is None and _any_setting(policy, "quarantine", "quarantine_dropped"):
        raise ConfigError(f"{config.source}: policy.quarantine: needs a [quarantine] directory")
    if shared.notifier is None and _any_setting(policy, "notify_sender_on_virus", "notify_sender_on_error_drop"):
        raise ConfigError(f"{config.source}: policy.notify_sender_on_virus: needs a [notifications] table")
    pipeline = Pipeline(
        reactor,
        shared.scanner,
        policy,
        config.scan_timeout,
        quarantine=shared.quarantine,
        notifier=shared.notifier,
        listener=listener.endpoint,
    )
    spool = config.server.spool_directory
    if spool is not None and not (os.path.isdir(spool) and os.access(spool, os.W_OK | os.X_OK)):
        raise ConfigError(f"{config.source}: server.spool_directory: {spool!r} is not a writable directory")
    size = configuration.message_size(config, size_limit(shared.scanner))
    settings = attrs.evolve(config.server, tls=server_tls(config), access=listener.access, max_message_size=size)
    return GuardFactory(reactor, shared.upstream, pipeline.process, settings, pipeline.accepts)


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
        listening = StreamServerEndpointService(endpoint, factory)
        listening._raiseSynchronously = True
        return listening

    return listen


def build_service(config: Config, reactor: Any, listen: Listen | None = None) -> service.MultiService:
    """A service listening on every configured endpoint (or as ``listen`` has it:
    a worker adopts its supervisor's sockets)."""
    listen = listen or listen_on_endpoint(config, reactor)
    shared = Shared.build(config, reactor)
    top = service.MultiService()
    # Services stop in the reverse order: the listeners first, then the draining
    # sessions (and what they shared, once they are done), then the notifier
    # (whose notices those sessions may still queue).
    if shared.notifier is not None:
        NotifierService(shared.notifier).setServiceParent(top)  # type: ignore[no-untyped-call]
    factories: list[GuardFactory] = []
    Drain(reactor, factories, release=shared.close).setServiceParent(top)  # type: ignore[no-untyped-call]
    for listener in config.listeners:
        guard = build_factory(config, reactor, listener, shared)
        factories.append(guard)
        factory: Any = guard
        if listener.proxy_protocol:
            factory = ProxyProtocolFactory(guard, listener.trusted_proxies, reactor)
        listen(listener, factory).setServiceParent(top)  # type: ignore[attr-defined]
    return top


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    try:
        if options["worker-number"] is not None or options["loaded"].workers > 1:
            from smtpguard import workers

            return workers.make_service(options, reactor)
        return build_service(options["loaded"], reactor)
    except ConfigError as error:
        raise SystemExit(f"smtpguard: {error}") from None
