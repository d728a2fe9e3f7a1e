"""The example third-party plugin (examples/smtpguard-example-scanner) installs with
pip into a directory of its own and is then found, built and used by smtpguard, as
docs/plugins.md promises; its own tests pass in that environment."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "smtpguard-example-scanner"


def _can_build_wheels_here() -> bool:
    """Whether pip can build the example with this Python's own setuptools
    (``--no-build-isolation``): setuptools 70.1 and later build wheels on their
    own, older ones need the ``wheel`` package."""
    if importlib.util.find_spec("wheel") is not None:
        return True
    try:
        from setuptools import __version__
    except ImportError:
        return False
    major, minor = (int(part) for part in __version__.split(".")[:2])
    return (major, minor) >= (70, 1)


class Installed:
    """The example installed with ``pip --target`` into ``site``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.source = directory / "source"
        self.site = directory / "site"
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(self.site), str(ROOT)]),
            "PYTHONDONTWRITEBYTECODE": "1",
        }

    def python(self, *arguments: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *arguments],
            cwd=cwd or self.directory,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """pip installs a copy of the example (a copy, so that the build leaves
    nothing in the repository) without dependencies into a fresh directory."""
    place = Installed(tmp_path_factory.mktemp("example-plugin"))
    shutil.copytree(EXAMPLE, place.source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    isolation = ["--no-build-isolation"] if _can_build_wheels_here() else []
    pip = place.python(
        "-m", "pip", "install", "-q", "--no-deps", *isolation, "--target", str(place.site), str(place.source)
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    yield place


def test_install_lays_out_a_drop_in_module_without_init_files(installed: Installed) -> None:
    """The installed tree has the plugin module in smtpguard/plugins/ and no
    __init__.py in smtpguard/ or smtpguard/plugins/ (which would shadow smtpguard)."""
    assert (installed.site / "smtpguard" / "plugins" / "example_scanner.py").is_file()
    assert not (installed.site / "smtpguard" / "__init__.py").exists()
    assert not (installed.site / "smtpguard" / "plugins" / "__init__.py").exists()
    assert (installed.site / "smtpguard_example" / "scanner.py").is_file()


CHECK = r"""
import json
from twisted.internet.task import Clock
from smtpguard.interfaces import IScannerFactory
from smtpguard.registry import build_scanner, factories
from smtpguard.spool import Spool
from smtpguard.envelope import Client, Envelope
import smtpguard
import smtpguard_example.scanner

def scan(scanner, data):
    spool = Spool(0)
    spool.write(data)
    found = []
    scanner.scan(spool.finish(), Envelope(Client("192.0.2.1", 1), "a@example.org")).addBoth(found.append)
    result = found[0]
    return [result.verdict.value, result.scanner, [threat.name for threat in result.threats]]

scanner = build_scanner(
    {"type": "example-subject", "pattern": "lottery", "threat": "Example.Lottery"}, Clock(), "test: scanners[0]"
)
print(json.dumps({
    "smtpguard": smtpguard.__file__,
    "example": smtpguard_example.scanner.__file__,
    "factories": sorted(factories(IScannerFactory)),
    "description": factories(IScannerFactory)["example-subject"].description,
    "infected": scan(scanner, b"Subject: You won the LOTTERY\r\n\r\nClaim it.\r\n"),
    "clean": scan(scanner, b"Subject: Minutes\r\n\r\nAttached.\r\n"),
}))
"""


def test_smtpguard_finds_builds_and_uses_the_installed_plugin(installed: Installed) -> None:
    """With the install directory on PYTHONPATH, smtpguard's registry lists
    ``example-subject`` beside the bundled scanners (smtpguard itself still comes
    from the repository); a ``[[scanners]]`` table builds it; it flags a matching
    Subject and passes another one."""
    run = installed.python("-c", CHECK)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["smtpguard"] == str(ROOT / "smtpguard" / "__init__.py")
    assert report["example"] == str(installed.site / "smtpguard_example" / "scanner.py")
    assert {"builtin", "command", "example-subject"} <= set(report["factories"])
    assert report["description"] == "Flags messages whose Subject matches a regular expression (example plugin)"
    assert report["infected"] == ["infected", "example-subject", ["Example.Lottery"]]
    assert report["clean"] == ["clean", "example-subject", []]


def test_configuration_errors_of_the_plugin_name_the_table_and_key(installed: Installed) -> None:
    """A bad table for the plugin is refused through smtpguard's registry with
    the table and the key named."""
    run = installed.python(
        "-c",
        "from twisted.internet.task import Clock\n"
        "from smtpguard.registry import build_scanner\n"
        "from smtpguard.config import ConfigError\n"
        "try:\n"
        "    build_scanner({'type': 'example-subject'}, Clock(), 'smtpguard.toml: scanners[2]')\n"
        "except ConfigError as error:\n"
        "    print(error)\n",
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == 'smtpguard.toml: scanners[2].pattern: is required, e.g. "invoice.*overdue"\n'


def test_the_examples_own_tests_pass_against_the_installed_plugin(installed: Installed) -> None:
    """The example's test file, run with pytest where only the installed copy of
    the example is importable, passes whole."""
    tests = installed.source / "tests" / "test_example.py"
    run = installed.python("-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests))
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines()[-1].startswith("12 passed")
