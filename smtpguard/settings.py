"""The settings of the listening server and of the next hop: values that
:mod:`smtpguard.config` builds and :mod:`smtpguard.server` and
:mod:`smtpguard.upstream` use.

Kept apart from the protocols so that reading a configuration file does not
import them; only the access rules (values too) are imported here.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import attrs

from smtpguard.access import AccessRules


@attrs.frozen
class ServerSettings:
    hostname: str = "localhost"
    max_message_size: int = 52_428_800
    max_recipients: int = 1000
    max_connections: int = 1000
    max_line_length: int = 2048
    command_timeout: float = 300.0  # RFC 5321 4.5.3.2.7
    data_timeout: float = 180.0  # RFC 5321 4.5.3.2.5, per block of data
    session_timeout: float = 3600.0
    # The whole of one message (DATA, or every BDAT chunk): a client trickling a
    # byte at a time resets data_timeout forever, this one it cannot.
    message_timeout: float = 600.0
    spool_memory: int = 1024 * 1024
    spool_directory: str | None = None
    tls: Any = None  # an IOpenSSLServerConnectionCreator enables STARTTLS
    require_tls: bool = False
    access: AccessRules = AccessRules()


class UpstreamTLS(Enum):
    NONE = "none"
    OPPORTUNISTIC = "opportunistic"
    REQUIRED = "required"


@attrs.frozen
class UpstreamSettings:
    endpoint: str
    hostname: str = "localhost"  # our name in EHLO
    tls: UpstreamTLS = UpstreamTLS.NONE
    tls_hostname: str | None = None  # the name its certificate must carry (required)
    tls_ca: str | None = None  # PEM bundle to trust instead of the system's
    xforward: bool = True
    timeout: float = 300.0
    connect_timeout: float = 30.0
    keep_connections: int = 10  # idle connections kept for the next client sessions
    keep_time: float = 5.0
