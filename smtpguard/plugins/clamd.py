"""The ``clamd`` scanner plugin: ClamAV's clamd over one or more client endpoints."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IStreamClientEndpoint

from smtpguard.registry import ScannerPlugin
from smtpguard.scanners.clamd import ClamdScanner, ClamdSettings
from smtpguard.scanners.clamd_protocol import DEFAULT_STREAM_MAX_LENGTH, parse_size
from smtpguard.tables import options

DEFAULT_ENDPOINT = "unix:/run/clamav/clamd.ctl"  # Debian's clamav-daemon
_DEFAULTS = ClamdSettings()


def _build(config: Mapping[str, Any], reactor: Any) -> ClamdScanner:
    table = options(config)
    if "endpoint" in table.data and "endpoints" in table.data:
        raise table.error("endpoints", "give either endpoint or endpoints, not both")
    if "endpoints" in table.data:
        key = "endpoints"
        descriptions = table.strings(key, ())
    else:
        key = "endpoint"
        descriptions = (table.get(key, str, DEFAULT_ENDPOINT),)
    if not descriptions:
        raise table.error(key, "at least one endpoint is needed")
    if len(set(descriptions)) != len(descriptions):
        raise table.error(key, "an endpoint is listed twice")
    endpoints: list[tuple[str, IStreamClientEndpoint]] = []
    for description in descriptions:
        try:
            endpoints.append((description, clientFromString(reactor, description)))
        except Exception as error:
            raise table.error(key, f"bad client endpoint {description!r}: {error}") from None
    size: object = table.get("stream_max_length", object, DEFAULT_STREAM_MAX_LENGTH)
    try:
        if not isinstance(size, int | str):
            raise TypeError(size)
        stream_max_length = parse_size(size)
    except (TypeError, ValueError):
        problem = f"expected a size in bytes (26214400, or 25M as in clamd.conf), got {size!r}"
        raise table.error("stream_max_length", problem) from None
    if stream_max_length <= 0:
        raise table.error("stream_max_length", f"must be greater than 0, got {stream_max_length}")
    settings = ClamdSettings(
        timeout=table.positive("timeout", float, _DEFAULTS.timeout),
        stream_max_length=stream_max_length,
        health_check_interval=table.positive("health_check_interval", float, _DEFAULTS.health_check_interval),
        keep_connections=table.get("keep_connections", int, _DEFAULTS.keep_connections),
        keep_time=table.positive("keep_time", float, _DEFAULTS.keep_time),
    )
    if settings.keep_connections < 0:
        raise table.error("keep_connections", f"must be 0 or more, got {settings.keep_connections}")
    table.check_unknown()
    return ClamdScanner(reactor, endpoints, settings)


clamd = ScannerPlugin("clamd", "ClamAV's clamd (INSTREAM) over unix or TCP endpoints, with failover", _build)
