"""The arrows between smtpguard's modules run one way: server -> pipeline ->
scanners / policy / notifiers / upstream, and the values everyone uses import
none of those.  Each module is imported alone in a fresh interpreter and the
smtpguard modules that came with it are compared with what it may use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import smtpguard

PACKAGE = Path(smtpguard.__file__).parent
ROOT = PACKAGE.parent
# Prints the smtpguard modules loaded by importing the module named in argv[1].
PROBE = (
    "import importlib, json, sys; importlib.import_module(sys.argv[1]); "
    "print(json.dumps(sorted(name for name in sys.modules if name.split('.')[0] == 'smtpguard')))"
)

# Values: imported by everyone, they import nothing of smtpguard's but each other.
VALUES = frozenset(
    f"smtpguard.{name}"
    for name in (
        *("replies", "envelope", "results", "spool", "access", "settings", "tables"),
        *("proxyheader", "xtext", "domains", "headers"),
    )
)
# What the parts of a message's path (scanners, policies, notifiers, the quarantine)
# must never bring in: the protocols on either side, the pipeline that drives them,
# and the assembly of the configuration file and the service.
ASSEMBLY_AND_PROTOCOLS = frozenset(
    f"smtpguard.{name}" for name in ("server", "upstream", "smtpclient", "pipeline", "config", "tap", "capture")
)


def modules_in(folder: str) -> list[str]:
    """The modules of this checkout's ``smtpguard/<folder>`` (not other distributions')."""
    return sorted(
        f"smtpguard.{folder}.{path.stem}" for path in (PACKAGE / folder).glob("*.py") if path.stem != "__init__"
    )


SCANNERS = [*modules_in("scanners"), *modules_in("plugins")]
PARTS = [*modules_in("policies"), *modules_in("notifiers"), "smtpguard.quarantine"]


def import_alone(module: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-c", PROBE, module], cwd=ROOT, capture_output=True, timeout=120)


class Imports(dict[str, "subprocess.CompletedProcess[bytes]"]):
    def __call__(self, module: str) -> frozenset[str]:
        """The other smtpguard modules that importing ``module`` alone loaded."""
        done = self[module]
        assert done.returncode == 0, f"importing {module} failed:\n{done.stderr.decode()}"
        return frozenset(json.loads(done.stdout)) - {"smtpguard", module}


@pytest.fixture(scope="module")
def loaded() -> Imports:
    """Every module checked here imported alone, each in a fresh interpreter (a few at a time)."""
    modules = sorted({*VALUES, *SCANNERS, *PARTS, "smtpguard.config"})
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return Imports(zip(modules, pool.map(import_alone, modules), strict=True))


@pytest.mark.parametrize("module", sorted(VALUES))
def test_values_import_only_values(loaded: Imports, module: str) -> None:
    """A values module brings in no smtpguard module but other values."""
    assert sorted(loaded(module) - VALUES) == []


@pytest.mark.parametrize("module", SCANNERS)
def test_scanner_modules_import_neither_the_server_nor_the_next_hop(
    loaded: Imports, module: str
) -> None:
    """A scanner or its plugin module imports neither smtpguard.server nor
    smtpguard.upstream, nor the pipeline, the configuration file or the service."""
    assert sorted(loaded(module) & ASSEMBLY_AND_PROTOCOLS) == []


@pytest.mark.parametrize("module", PARTS)
def test_policies_notifiers_and_quarantine_import_neither_the_server_nor_the_next_hop(
    loaded: Imports, module: str
) -> None:
    """Policies, notifiers and the quarantine import neither the protocols, the
    pipeline, the configuration file nor the service (a notifier is handed its next hop)."""
    assert sorted(loaded(module) & ASSEMBLY_AND_PROTOCOLS) == []


def test_reading_the_configuration_imports_no_protocol(loaded: Imports) -> None:
    """smtpguard.config builds settings values; it imports values only, neither the
    server nor the next hop."""
    assert sorted(loaded("smtpguard.config")) == [
        "smtpguard.access",
        "smtpguard.headers",
        "smtpguard.replies",
        "smtpguard.results",
        "smtpguard.settings",
        "smtpguard.tables",
    ]


def test_config_error_is_the_one_plugins_import() -> None:
    """Plugin builders raise smtpguard.config.ConfigError (as they always have); it
    is the class every table reader raises."""
    from smtpguard import config, tables

    assert (config.ConfigError, config.Table, config.options) == (tables.ConfigError, tables.Table, tables.options)
