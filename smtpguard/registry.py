"""Plugin factories: how bundled and third-party parts are declared and found.

A factory is a module-level object in any module of the :mod:`smtpguard.plugins`
package (ours or one installed by another distribution), found with
:func:`twisted.plugin.getPlugins` and checked with ``verifyObject``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.plugin import IPlugin, getPlugins
from zope.interface import Interface, implementer
from zope.interface.verify import verifyObject

from smtpguard.interfaces import IPolicy, IPolicyFactory, IScanner, IScannerFactory
from smtpguard.tables import ConfigError


@implementer(IPlugin, IScannerFactory)
@attrs.frozen
class ScannerPlugin:
    """Declare a scanner: ``build(config, reactor)`` returns an IScanner and raises
    ConfigError (naming the key) for a bad configuration table."""

    name: str
    description: str
    builder: Callable[[Mapping[str, Any], Any], IScanner]

    def build(self, config: Mapping[str, Any], reactor: Any) -> IScanner:
        return self.builder(config, reactor)


@implementer(IPlugin, IPolicyFactory)
@attrs.frozen
class PolicyPlugin:
    """Declare a policy: ``build(config)`` returns an IPolicy."""

    name: str
    description: str
    builder: Callable[[Mapping[str, Any]], IPolicy]

    def build(self, config: Mapping[str, Any]) -> IPolicy:
        return self.builder(config)


def factories(interface: type[Interface]) -> dict[str, Any]:
    """All plugin factories providing ``interface``, by name."""
    from smtpguard import plugins

    found: dict[str, Any] = {}
    for factory in getPlugins(interface, plugins):
        verifyObject(interface, factory)
        found.setdefault(factory.name, factory)  # type: ignore[attr-defined]
    return found


def build_scanner(table: Mapping[str, Any], reactor: Any, where: str) -> IScanner:
    """Build the scanner a ``[[scanners]]`` table names; errors name ``where``."""
    available = factories(IScannerFactory)
    kind = table.get("type")
    if kind not in available:
        known = ", ".join(sorted(available))
        raise ConfigError(f"{where}.type: unknown scanner {kind!r} (available: {known})")
    options = {key: value for key, value in table.items() if key != "type"}
    try:
        scanner = available[kind].build(options, reactor)
    except ConfigError as error:
        raise ConfigError(f"{where}.{error}") from None
    verifyObject(IScanner, scanner)
    return scanner  # type: ignore[no-any-return]


def build_policy(table: Mapping[str, Any], where: str) -> IPolicy:
    available = factories(IPolicyFactory)
    kind = table.get("type", "default")
    if kind not in available:
        raise ConfigError(f"{where}.type: unknown policy {kind!r} (available: {', '.join(sorted(available))})")
    options = {key: value for key, value in table.items() if key != "type"}
    try:
        policy = available[kind].build(options)
    except ConfigError as error:
        raise ConfigError(f"{where}.{error}") from None
    verifyObject(IPolicy, policy)
    return policy  # type: ignore[no-any-return]
