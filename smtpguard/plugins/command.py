"""The ``command`` scanner plugin: an external command-line scanner such as clamdscan.

Its ``[[scanners]]`` table is read here; :mod:`smtpguard.scanners.command` runs it.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from typing import Any

from smtpguard.registry import ScannerPlugin
from smtpguard.results import ErrorKind
from smtpguard.scanners.command import (
    DEFAULT_THREAT_PATTERN,
    FILE_PLACEHOLDER,
    CommandScanner,
    CommandSettings,
    InputMode,
)
from smtpguard.scanners.optional import largest_message
from smtpguard.tables import Table, options


def settings_from_config(config: Mapping[str, Any]) -> CommandSettings:
    """Validate a ``[[scanners]]`` table; raises ConfigError naming the key."""
    table = options(config)
    name = table.get("name", str, "command")
    if not name:
        raise table.error("name", "must not be empty")
    command = table.strings("command", ())
    if not command or not command[0]:
        raise table.error("command", 'is required, e.g. ["clamdscan", "--no-summary", "--stream", "-"]')
    executable = shutil.which(command[0])
    if executable is None:
        raise table.error("command", f"{command[0]!r} is not an executable file (nor one found on PATH)")
    mode = InputMode(table.choice("input", tuple(mode.value for mode in InputMode), "stdin"))
    placeholder = any(FILE_PLACEHOLDER in argument for argument in command[1:])
    if mode is InputMode.FILE and not placeholder:
        raise table.error("command", f'needs a "{FILE_PLACEHOLDER}" argument with input = "file"')
    if mode is InputMode.STDIN and placeholder:
        raise table.error("input", f'must be "file" when the command has a "{FILE_PLACEHOLDER}" argument')
    clean = _codes(table, "clean_codes", (0,))
    infected = _codes(table, "infected_codes", (1,))
    errors = _error_codes(table)
    if clean & infected:
        raise table.error("infected_codes", f"exit code {min(clean & infected)} is also in clean_codes")
    for code in errors:
        if code in clean or code in infected:
            where = "clean_codes" if code in clean else "infected_codes"
            raise table.error(f"error_codes.{code}", f"exit code {code} is also in {where}")
    settings = CommandSettings(
        command=command,
        executable=executable,
        input=mode,
        clean_codes=clean,
        infected_codes=infected,
        error_codes=errors,
        threat_pattern=_pattern(table),
        timeout=table.positive("timeout", float, 60.0),
        max_output=table.positive("max_output", int, 64 * 1024),
        largest_message=largest_message(table),
        directory=table.get("directory", str, None),  # type: ignore[arg-type]
        name=name,
    )
    table.check_unknown()
    return settings


def _exit_code(table: Table, key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        raise table.error(key, f"exit codes are integers from 0 to 255, got {value!r}")
    return value


def _codes(table: Table, key: str, default: tuple[int, ...]) -> frozenset[int]:
    value = table.get(key, list, list(default))
    return frozenset(_exit_code(table, key, item) for item in value)


def _error_codes(table: Table) -> dict[int, ErrorKind]:
    if not isinstance(table.data.get("error_codes", {}), dict):
        raise table.error("error_codes", 'must be a table, e.g. {"2" = "other"}')
    errors = table.table("error_codes")
    kinds = tuple(kind.value for kind in ErrorKind)
    found: dict[int, ErrorKind] = {}
    for key in list(errors.data):
        code = _exit_code(errors, key, int(key) if key.isdecimal() else key)
        found[code] = ErrorKind(errors.choice(key, kinds, ErrorKind.OTHER.value))
    errors.check_unknown()
    return found


def _pattern(table: Table) -> re.Pattern[str]:
    source = table.get("threat_pattern", str, DEFAULT_THREAT_PATTERN)
    try:
        pattern = re.compile(source, re.MULTILINE)
    except re.error as error:
        raise table.error("threat_pattern", f"not a valid regular expression: {error}") from None
    if "name" not in pattern.groupindex:
        raise table.error("threat_pattern", "needs a (?P<name>...) group for the threat's name")
    return pattern


def build(config: Mapping[str, Any], reactor: Any) -> CommandScanner:
    """The ``command`` plugin's builder."""
    return CommandScanner(settings_from_config(config), reactor)


command = ScannerPlugin("command", "Runs an external command-line scanner (e.g. clamdscan) on each message", build)
