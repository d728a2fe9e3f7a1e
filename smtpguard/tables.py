"""Reading one TOML table: typed look-ups whose errors name the key, and a check
that nothing unknown was left over.

It imports nothing of smtpguard's, so that a scanner, the quarantine or a
notifier can read its own table without pulling in the rest of the program.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why."""


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
