"""The scanners and policies that ship with smtpguard."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from smtpguard.config import ConfigError
from smtpguard.policies.default import DefaultPolicy
from smtpguard.registry import PolicyPlugin, ScannerPlugin
from smtpguard.scanners.builtin import BuiltinScanner


def _no_options(kind: str, config: Mapping[str, Any]) -> None:
    for key in config:
        raise ConfigError(f"{key}: unknown key for the {kind}")


def _builtin(config: Mapping[str, Any], reactor: Any) -> BuiltinScanner:
    _no_options("builtin scanner", config)
    return BuiltinScanner()


def _default_policy(config: Mapping[str, Any]) -> DefaultPolicy:
    supported = {"on_virus": "reject", "fail_mode": "defer"}
    for key, value in config.items():
        if key not in supported:
            raise ConfigError(f"{key}: unknown key for the default policy")
        if value != supported[key]:
            raise ConfigError(f"{key}: only {supported[key]!r} is supported, got {value!r}")
    return DefaultPolicy()


builtin = ScannerPlugin("builtin", "Pure-Python scanner, needs no daemon (EICAR test file)", _builtin)
default = PolicyPlugin("default", "Infected: reject (554 5.7.1); scan error: defer (451 4.7.1)", _default_policy)
