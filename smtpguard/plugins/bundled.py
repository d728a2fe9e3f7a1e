"""The scanners and policies that ship with smtpguard."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from smtpguard.policies.default import DefaultPolicy
from smtpguard.policies.options import build_policy
from smtpguard.registry import PolicyPlugin, ScannerPlugin
from smtpguard.scanners.builtin import DEFAULT_TIMEOUT, BuiltinScanner
from smtpguard.scanners.mimewalk import Limits
from smtpguard.scanners.signatures import Pattern, SignatureError, Signatures, parse_digests, parse_patterns
from smtpguard.scanners.workers import MAX_SCANS, MAX_SCANS_PER_CLIENT
from smtpguard.tables import ConfigError, Table, options


def _no_options(kind: str, config: Mapping[str, Any]) -> None:
    for key in config:
        raise ConfigError(f"{key}: unknown key for the {kind}")


def _builtin(config: Mapping[str, Any], reactor: Any) -> BuiltinScanner:
    table = options(config)
    defaults = Limits()
    limits = Limits(
        max_depth=table.positive("max_depth", int, defaults.max_depth),
        max_parts=table.positive("max_parts", int, defaults.max_parts),
        max_expanded_size=table.positive("max_expanded_size", int, defaults.max_expanded_size),
        max_ratio=table.positive("max_ratio", int, defaults.max_ratio),
    )
    timeout = table.positive("timeout", float, DEFAULT_TIMEOUT)
    max_scans = table.positive("max_scans", int, MAX_SCANS)
    max_scans_per_client = table.positive("max_scans_per_client", int, MAX_SCANS_PER_CLIENT)
    digests: dict[str, str] = {}
    patterns: list[Pattern] = []
    for key, parse, lines in (
        ("sha256_file", parse_digests, _signature_file(table, "sha256_file")),
        ("sha256", parse_digests, table.strings("sha256", ())),
        ("patterns_file", parse_patterns, _signature_file(table, "patterns_file")),
        ("patterns", parse_patterns, table.strings("patterns", ())),
    ):
        try:
            parsed = parse(lines)
        except SignatureError as error:
            where = f"{table.data[key]}: " if key.endswith("_file") else ""
            raise table.error(key, f"{where}{error}") from None
        if isinstance(parsed, dict):
            digests.update(parsed)
        else:
            patterns.extend(parsed)
    table.check_unknown()
    signatures = Signatures.build(digests, patterns)
    return BuiltinScanner(
        reactor, signatures, limits, timeout, max_scans=max_scans, max_scans_per_client=max_scans_per_client
    )


def _signature_file(table: Table, key: str) -> list[str]:
    """The lines of the signature list that ``key`` names (none when it is not set)."""
    path = table.get(key, str, "")
    if not path:
        return []
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise table.error(key, f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None


def _default_policy(config: Mapping[str, Any]) -> DefaultPolicy:
    return build_policy(config)


builtin = ScannerPlugin(
    "builtin",
    "Pure-Python scanner, needs no daemon: MIME, uuencode and zip; EICAR, SHA-256 and byte-pattern lists",
    _builtin,
)
default = PolicyPlugin(
    "default", "The appliance semantics: replace, reject, discard or pass; drop, pass or defer", _default_policy
)
