"""The ``icap`` scanner plugin: an RFC 3507 ICAP server (c-icap, Kaspersky, ...)
given by ``url`` or by ``endpoint`` and ``service``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.endpoints import clientFromString

from smtpguard.registry import ScannerPlugin
from smtpguard.scanners.icap import KEEP_TIME, IcapScanner
from smtpguard.scanners.icap_protocol import Service, endpoint_service, parse_url
from smtpguard.scanners.optional import largest_message
from smtpguard.tables import options

DEFAULT_SERVICE = "avscan"
DEFAULT_TIMEOUT = 60.0


def _build(config: Mapping[str, Any], reactor: Any) -> IcapScanner:
    table = options(config)
    if "url" in table.data and ("endpoint" in table.data or "service" in table.data):
        key = "endpoint" if "endpoint" in table.data else "service"
        raise table.error(key, "give either url or endpoint and service, not both")
    service: Service
    if "url" in table.data or "endpoint" not in table.data:
        key = "url"
        if "url" not in table.data:
            raise table.error("url", 'is required (e.g. "icap://127.0.0.1:1344/avscan"), or endpoint and service')
        try:
            description, service = parse_url(table.get("url", str, ""))
        except ValueError as error:
            raise table.error("url", str(error)) from None
    else:
        key = "endpoint"
        description = table.get("endpoint", str, "")
        try:
            service = endpoint_service(description, table.get("service", str, DEFAULT_SERVICE))
        except ValueError as error:
            raise table.error("service", str(error)) from None
    try:
        endpoint = clientFromString(reactor, description)
    except Exception as error:
        raise table.error(key, f"bad client endpoint {description!r}: {error}") from None
    timeout = table.positive("timeout", float, DEFAULT_TIMEOUT)
    keep_time = table.positive("keep_time", float, KEEP_TIME)
    # preview: absent = the server's Preview size, a number = that size, false = none.
    preview: object = table.get("preview", object, None)
    size = preview if isinstance(preview, int) and not isinstance(preview, bool) and preview >= 0 else None
    if preview is not None and preview is not False and size is None:
        raise table.error("preview", f"expected a number of bytes (0 or more) or false, got {preview!r}")
    largest = largest_message(table)
    table.check_unknown()
    return IcapScanner(
        reactor,
        endpoint,
        service,
        timeout=timeout,
        preview=size,
        use_preview=preview is not False,
        keep_time=keep_time,
        largest_message=largest,
    )


icap = ScannerPlugin(
    "icap", "An RFC 3507 ICAP server (RESPMOD with preview, persistent connections), e.g. c-icap", _build
)
