"""The ``[policy]`` table -> a :class:`DefaultPolicy`, with errors naming the key."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

import attrs

from smtpguard.policies.default import DefaultPolicy, OnError, OnVirus, PolicySettings, Rule
from smtpguard.results import ErrorKind
from smtpguard.tables import Table, options

_DEFAULTS = PolicySettings()
_FLAGS = (
    "quarantine",
    "quarantine_dropped",
    "notify_sender_on_virus",
    "notify_sender_on_error_drop",
    "notify_recipient_on_error_pass",
    "notify_admin",
)


def _settings(table: Table, base: PolicySettings) -> PolicySettings:
    changes: dict[str, Any] = {}
    if "on_virus" in table.data:
        changes["on_virus"] = OnVirus(table.choice("on_virus", tuple(v.value for v in OnVirus), "replace"))
    if "fail_mode" in table.data:
        changes["fail_mode"] = OnError(table.choice("fail_mode", tuple(v.value for v in OnError), "defer"))
    for flag in _FLAGS:
        if flag in table.data:
            changes[flag] = table.get(flag, bool, False)
    for text in ("subject_tag", "virus_notice", "error_notice"):
        if text in table.data:
            changes[text] = table.get(text, str, "")
    if "forged_sender_threats" in table.data:
        changes["forged_sender_threats"] = table.strings("forged_sender_threats", ())
    if "fallback" in table.data:
        changes["fallback"] = {**base.fallback, **_fallback(table.table("fallback"))}
    return attrs.evolve(base, **changes)


def _fallback(table: Table) -> dict[ErrorKind, OnError]:
    choices = tuple(v.value for v in OnError)
    fallback: dict[ErrorKind, OnError] = {}
    for key in list(table.data):
        if key == "default":
            continue
        try:
            kind = ErrorKind(key)
        except ValueError:
            known = ", ".join(kind.value for kind in ErrorKind)
            raise table.error(key, f"unknown scan error kind (one of: {known}, default)") from None
        fallback[kind] = OnError(table.choice(key, choices, "defer"))
    if "default" in table.data:
        default = OnError(table.choice("default", choices, "defer"))
        fallback = {kind: fallback.get(kind, default) for kind in ErrorKind}
    return fallback


def _rule(table: Table, base: PolicySettings) -> Rule:
    domains = tuple(domain.lower().lstrip(".") for domain in table.strings("recipient_domains", ()))
    senders = table.strings("senders", ())
    networks = []
    for network in table.strings("client_networks", ()):
        try:
            networks.append(ipaddress.ip_network(network, strict=False))
        except ValueError as error:
            raise table.error("client_networks", str(error)) from None
    if not (domains or senders or networks):
        raise table.error("recipient_domains", "a rule needs recipient_domains, senders or client_networks")
    settings = _settings(table, base)
    table.check_unknown()
    return Rule(settings, domains, senders, tuple(networks))


def build_policy(config: Mapping[str, Any]) -> DefaultPolicy:
    """The default policy from its ``[policy]`` table (``type`` already removed)."""
    table = options(config)
    settings = _settings(table, _DEFAULTS)
    rules_data = table.raw("rules", [])
    if not isinstance(rules_data, list):
        raise table.error("rules", "expected [[policy.rules]] tables")
    rules = [_rule(Table("", f"rules[{index}]", data), settings) for index, data in enumerate(rules_data)]
    table.check_unknown()
    return DefaultPolicy(settings, rules)
