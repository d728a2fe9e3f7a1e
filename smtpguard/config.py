"""The configuration file: TOML in, validated settings out.

Every error names the file, the key and the problem, and stops the start.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from typing import Any, TypeVar

import attrs

from smtpguard.access import AccessRules, Network, networks
from smtpguard.headers import has_control
from smtpguard.server import ServerSettings
from smtpguard.upstream import UpstreamSettings, UpstreamTLS

T = TypeVar("T")
_SERVER_DEFAULTS = ServerSettings()


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why."""


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


@attrs.frozen
class Listener:
    """One listening endpoint and what is particular to it."""

    endpoint: str
    access: AccessRules = AccessRules()
    proxy_protocol: bool = False
    trusted_proxies: tuple[Network, ...] = ()
    policy: Mapping[str, Any] | None = None  # keys of [policy] this listener sets otherwise


class Table:
    """One TOML table being read: typed look-ups that report the full key, and a
    check that nothing unknown was left over."""

    def __init__(self, source: str, path: str, data: Any) -> None:
        if not isinstance(data, dict):
            where = f"{source}: {path}" if source else path
            raise ConfigError(f"{where}: must be a table")
        self.source = source
        self.path = path
        self.data: dict[str, Any] = data
        self._read: set[str] = set()

    def error(self, key: str, problem: str) -> ConfigError:
        where = f"{self.path}.{key}" if self.path else key
        return ConfigError(f"{self.source}: {where}: {problem}" if self.source else f"{where}: {problem}")

    def get(self, key: str, kind: type[T], default: T) -> T:
        self._read.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(key, f"expected {_kind_name(kind)}, got {value!r}")
        return value  # type: ignore[no-any-return]

    def positive(self, key: str, kind: type[T], default: T) -> T:
        value = self.get(key, kind, default)
        if not value > 0:  # type: ignore[operator]  # also refuses nan
            raise self.error(key, f"must be greater than 0, got {value!r}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        self._read.add(key)
        value = self.data.get(key, list(default))
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.error(key, f"expected a list of strings, got {value!r}")
        return tuple(value)

    def raw(self, key: str, default: Any = None) -> Any:
        """The value as TOML gave it, for the caller to check."""
        self._read.add(key)
        return self.data.get(key, default)

    def table(self, key: str) -> Table:
        self._read.add(key)
        return Table(self.source, f"{self.path}.{key}" if self.path else key, self.data.get(key, {}))

    def check_unknown(self) -> None:
        for key in self.data:
            if key not in self._read:
                raise self.error(key, "unknown key")


def options(config: Mapping[str, Any]) -> Table:
    """A plugin's configuration table, for its builder: errors name the key only,
    and the registry adds the file and the table."""
    return Table("", "", dict(config))


def _kind_name(kind: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(kind, kind.__name__)


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
        spool_memory=server.positive("spool_memory", int, _SERVER_DEFAULTS.spool_memory),
        spool_directory=server.get("spool_directory", str, None),  # type: ignore[arg-type]
        require_tls=server.get("require_tls", bool, False),
        access=_access(server, AccessRules()),
    )
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

    root._read.add("scanners")
    scanners = data.get("scanners", [])
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
    )


def _access(table: Table, base: AccessRules) -> AccessRules:
    allowed = base.allowed_clients
    if "allowed_clients" in table.data:
        try:
            allowed = networks(table.strings("allowed_clients", ()))
        except ValueError as error:
            raise table.error("allowed_clients", str(error)) from None
    return AccessRules(
        allowed_clients=allowed,
        max_connections_per_client=_count(table, "max_connections_per_client", base.max_connections_per_client),
        max_messages_per_client=_count(table, "max_messages_per_client", base.max_messages_per_client),
        rate_window=table.positive("message_rate_window", float, base.rate_window),
    )


def _count(table: Table, key: str, default: int) -> int:
    value = table.get(key, int, default)
    if value < 0:
        raise table.error(key, f"must be 0 (no limit) or more, got {value}")
    return value


def _proxy(table: Table, enabled: bool, trusted: tuple[Network, ...]) -> tuple[bool, tuple[Network, ...]]:
    enabled = table.get("proxy_protocol", bool, enabled)
    if "trusted_proxies" in table.data:
        try:
            trusted = networks(table.strings("trusted_proxies", ()))
        except ValueError as error:
            raise table.error("trusted_proxies", str(error)) from None
    if enabled and not trusted:
        raise table.error("trusted_proxies", "proxy_protocol needs the networks of the trusted proxies")
    return enabled, trusted
