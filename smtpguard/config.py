"""The configuration file: TOML in, validated settings out.

Every error names the file, the key and the problem, and stops the start.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from typing import Any

import attrs

from smtpguard.access import AccessRules, Network, networks
from smtpguard.headers import has_control
from smtpguard.results import SizeLimit
from smtpguard.settings import ServerSettings, UpstreamSettings, UpstreamTLS
from smtpguard.tables import ConfigError, Table, options

# ConfigError, Table and options live in smtpguard.tables; plugin builders import them from here.
__all__ = ["Config", "ConfigError", "Listener", "LogSettings", "Table", "load", "options", "parse", "read_toml"]

_SERVER_DEFAULTS = ServerSettings()


@attrs.frozen
class LogSettings:
    """The ``[logging]`` table: where the transaction log goes besides the main
    log (``file``, "-" for standard output, None for nowhere else) and as
    what (``format``: "text" lines or "json" lines)."""

    format: str = "text"
    file: str | None = None


@attrs.frozen
class Config:
    source: str
    listen: tuple[str, ...]
    server: ServerSettings
    upstream: UpstreamSettings
    scanners: tuple[Mapping[str, Any], ...]
    policy: Mapping[str, Any]
    tls_certificate: str | None = None
    tls_key: str | None = None
    scan_timeout: float = 120.0
    listeners: tuple[Listener, ...] = ()
    quarantine: Mapping[str, Any] | None = None  # the [quarantine] table, checked by its builder
    notifications: Mapping[str, Any] | None = None  # the [notifications] table, checked by its builder
    max_message_size_set: bool = False  # whether [server] gives max_message_size (else: the default)
    logging: LogSettings = LogSettings()
    metrics_listen: str | None = None  # [metrics] listen: where /metrics, /healthz and /readyz are served
    workers: int = 1  # processes sharing the listening sockets (smtpguard.workers)

    def policy_for(self, listener: Listener) -> Mapping[str, Any]:
        """The ``[policy]`` table as ``listener`` has it: its own keys over the others."""
        return self.policy if listener.policy is None else {**self.policy, **listener.policy}


@attrs.frozen
class Listener:
    """One listening endpoint and what is particular to it."""

    endpoint: str
    access: AccessRules = AccessRules()
    proxy_protocol: bool = False
    trusted_proxies: tuple[Network, ...] = ()
    policy: Mapping[str, Any] | None = None  # keys of [policy] this listener sets otherwise


def read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None


def load(path: str) -> Config:
    return parse(read_toml(path), path)


def parse(data: Mapping[str, Any], source: str = "<config>") -> Config:
    root = Table(source, "", dict(data))
    server = root.table("server")
    upstream = root.table("upstream")
    listen = server.strings("listen", ("tcp:10025:interface=127.0.0.1",))
    if not listen:
        raise server.error("listen", "at least one endpoint is needed")
    hostname = server.get("hostname", str, "localhost")
    # It goes into every greeting and Received: header.
    if not hostname or has_control(hostname) or any(char.isspace() for char in hostname):
        raise server.error("hostname", f"must be a host name, got {hostname!r}")
    settings = ServerSettings(
        hostname=hostname,
        max_message_size=server.positive("max_message_size", int, _SERVER_DEFAULTS.max_message_size),
        max_recipients=server.positive("max_recipients", int, _SERVER_DEFAULTS.max_recipients),
        max_connections=server.positive("max_connections", int, _SERVER_DEFAULTS.max_connections),
        max_line_length=server.positive("max_line_length", int, _SERVER_DEFAULTS.max_line_length),
        command_timeout=server.positive("command_timeout", float, _SERVER_DEFAULTS.command_timeout),
        data_timeout=server.positive("data_timeout", float, _SERVER_DEFAULTS.data_timeout),
        session_timeout=server.positive("session_timeout", float, _SERVER_DEFAULTS.session_timeout),
        message_timeout=server.positive("message_timeout", float, _SERVER_DEFAULTS.message_timeout),
        spool_memory=server.positive("spool_memory", int, _SERVER_DEFAULTS.spool_memory),
        spool_directory=server.get("spool_directory", str, None),  # type: ignore[arg-type]
        require_tls=server.get("require_tls", bool, False),
        access=_access(server, AccessRules()),
    )
    workers = server.positive("workers", int, 1)
    proxy = _proxy(server, False, ())
    certificate = server.get("tls_certificate", str, None)  # type: ignore[arg-type]
    key = server.get("tls_key", str, None)  # type: ignore[arg-type]
    if (certificate is None) != (key is None):
        raise server.error("tls_key" if key is None else "tls_certificate", "tls_certificate and tls_key go together")
    if settings.require_tls and certificate is None:
        raise server.error("require_tls", "needs tls_certificate and tls_key")
    server.check_unknown()

    tls = UpstreamTLS(upstream.choice("tls", tuple(mode.value for mode in UpstreamTLS), "none"))
    if "endpoint" not in upstream.data:
        raise upstream.error("endpoint", 'is required (e.g. "tcp:127.0.0.1:10026")')
    upstream_settings = UpstreamSettings(
        endpoint=upstream.get("endpoint", str, ""),
        hostname=hostname,
        tls=tls,
        tls_hostname=upstream.get("tls_hostname", str, None),  # type: ignore[arg-type]
        tls_ca=upstream.get("tls_ca", str, None),  # type: ignore[arg-type]
        xforward=upstream.get("xforward", bool, True),
        timeout=upstream.positive("timeout", float, 300.0),
        connect_timeout=upstream.positive("connect_timeout", float, 30.0),
        keep_connections=upstream.get("keep_connections", int, 10),
        keep_time=upstream.positive("keep_time", float, 5.0),
    )
    if upstream_settings.keep_connections < 0:
        raise upstream.error("keep_connections", "must be 0 or more")
    upstream.check_unknown()

    listeners = [Listener(endpoint, settings.access, *proxy) for endpoint in listen]
    extra = root.raw("listeners", [])
    if not isinstance(extra, list):
        raise root.error("listeners", "expected [[listeners]] tables")
    for index, data_ in enumerate(extra):
        table = Table(source, f"listeners[{index}]", data_)
        if not isinstance(table.data.get("endpoint"), str):
            raise table.error("endpoint", "is required")
        endpoint = table.get("endpoint", str, "")
        access = _access(table, settings.access)
        overrides = table.raw("policy")
        if overrides is not None and not isinstance(overrides, dict):
            raise table.error("policy", "must be a table")
        listeners.append(Listener(endpoint, access, *_proxy(table, *proxy), policy=overrides))
        table.check_unknown()

    scanners = root.raw("scanners", [])
    if not isinstance(scanners, list) or not scanners:
        raise root.error("scanners", 'at least one [[scanners]] table is needed (e.g. type = "builtin")')
    for index, scanner in enumerate(scanners):
        table = Table(source, f"scanners[{index}]", scanner)
        if not isinstance(table.data.get("type"), str):
            raise table.error("type", "is required (builtin, clamd, icap, command or a plugin's name)")
    policy = root.table("policy")
    scanning = root.table("scanning")
    scan_timeout = scanning.positive("timeout", float, 120.0)
    scanning.check_unknown()
    quarantine = root.table("quarantine").data if "quarantine" in data else None
    notifications = root.table("notifications").data if "notifications" in data else None
    logging = _logging(root.table("logging"))
    metrics = root.table("metrics")
    metrics_listen = metrics.get("listen", str, "")
    if "listen" in metrics.data and not metrics_listen.strip():
        raise metrics.error("listen", 'must be a server endpoint (e.g. "tcp:9125:interface=127.0.0.1")')
    metrics.check_unknown()
    root.check_unknown()
    return Config(
        source=source,
        listen=listen,
        server=settings,
        upstream=upstream_settings,
        scanners=tuple(scanners),
        policy=policy.data,
        tls_certificate=certificate,
        tls_key=key,
        scan_timeout=scan_timeout,
        listeners=tuple(listeners),
        quarantine=quarantine,
        notifications=notifications,
        max_message_size_set="max_message_size" in server.data,
        logging=logging,
        metrics_listen=metrics_listen or None,
        workers=workers,
    )


def message_size(config: Config, limit: SizeLimit | None) -> int:
    """The SIZE to advertise and enforce, given the largest message the scanners
    take (``limit``): a message under SIZE that no scanner would take could only
    ever get a scan error.  When ``[server] max_message_size`` is not set, that is
    the default or ``limit`` if it is smaller; when it is set above ``limit``,
    smtpguard does not start.
    """
    size = config.server.max_message_size
    if limit is None or size <= limit.size:
        return size
    if not config.max_message_size_set:
        return limit.size
    setting = limit.setting or "a scanner's limit"
    advice = f" {limit.advice}" if limit.advice else ""
    raise ConfigError(
        f"{config.source}: server.max_message_size: {size} bytes is more than {setting} ({limit.size} bytes),"
        f" the largest message the scanners take: set max_message_size to {limit.size} or less,"
        f" or raise {setting}{advice}"
    )


def _logging(table: Table) -> LogSettings:
    log_format = table.choice("format", ("text", "json"), "text")
    file = table.get("file", str, None)  # type: ignore[arg-type]
    if file == "":
        raise table.error("file", 'must be a path, or "-" for standard output')
    if log_format == "json" and file is None:
        raise table.error("format", 'json needs a file (a path, or "-" for standard output)')
    table.check_unknown()
    return LogSettings(log_format, file)


def _access(table: Table, base: AccessRules) -> AccessRules:
    return AccessRules(
        allowed_clients=_networks(table, "allowed_clients", base.allowed_clients),
        max_connections_per_client=_count(table, "max_connections_per_client", base.max_connections_per_client),
        max_messages_per_client=_count(table, "max_messages_per_client", base.max_messages_per_client),
        rate_window=table.positive("message_rate_window", float, base.rate_window),
        xforward_hosts=_networks(table, "xforward_hosts", base.xforward_hosts),
        xclient_hosts=_networks(table, "xclient_hosts", base.xclient_hosts),
    )


def _networks(table: Table, key: str, default: tuple[Network, ...]) -> tuple[Network, ...]:
    if key not in table.data:
        return default
    try:
        return networks(table.strings(key, ()))
    except ValueError as error:
        raise table.error(key, str(error)) from None


def _count(table: Table, key: str, default: int) -> int:
    value = table.get(key, int, default)
    if value < 0:
        raise table.error(key, f"must be 0 (no limit) or more, got {value}")
    return value


def _proxy(table: Table, enabled: bool, trusted: tuple[Network, ...]) -> tuple[bool, tuple[Network, ...]]:
    enabled = table.get("proxy_protocol", bool, enabled)
    trusted = _networks(table, "trusted_proxies", trusted)
    if enabled and not trusted:
        raise table.error("trusted_proxies", "proxy_protocol needs the networks of the trusted proxies")
    return enabled, trusted
