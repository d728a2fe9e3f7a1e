"""``smtpguard check-config`` warns about a listener that takes XFORWARD from the
MTA in front (``xforward_hosts``, as behind Postfix's after-queue content_filter)
while its policy rejects infected mail: that MTA has accepted the message already
and would bounce it, virus and all, to a sender who may be forged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from smtpguard import cli

SERVER = """\
[server]
listen = ["tcp:10025:interface=127.0.0.1"]
"""
REST = """
[upstream]
endpoint = "tcp:127.0.0.1:10026"

[[scanners]]
type = "builtin"
"""


def check(tmp_path: Path, capsys: Any, text: str) -> tuple[int, str, str]:
    """check-config on ``text``: its exit status, stdout and stderr."""
    path = tmp_path / "smtpguard.toml"
    path.write_text(text)
    status = cli.main(["check-config", str(path)])
    out, err = capsys.readouterr()
    return status, out, err


def warning(path: Path, endpoint: str, banks: str) -> str:
    return (
        f"smtpguard: warning: {path}: listener {endpoint} takes XFORWARD (xforward_hosts) and rejects infected"
        f' mail ({banks}: on_virus = "reject"). Behind Postfix\'s content_filter (after the queue) each such 554'
        " makes Postfix bounce the infected message to its sender, who may be forged: use on_virus ="
        ' "replace" or "discard" there (docs/postfix.md). Behind smtpd_proxy_filter (before the queue)'
        " rejecting is right.\n"
    )


def test_xforward_listener_rejecting_viruses_by_default_is_warned_about(tmp_path: Path, capsys: Any) -> None:
    """xforward_hosts with the default policy (on_virus = "reject"): the file is
    valid (exit 0, "ok") and the listener is named in one warning on stderr."""
    text = SERVER + 'xforward_hosts = ["127.0.0.1"]\n' + REST
    path = tmp_path / "smtpguard.toml"
    expected = warning(path, "tcp:10025:interface=127.0.0.1", "policy")
    assert check(tmp_path, capsys, text) == (0, f"{path}: ok\n", expected)


@pytest.mark.parametrize("action", ["replace", "discard"])
def test_xforward_listener_replacing_or_discarding_viruses_draws_no_warning(
    tmp_path: Path, capsys: Any, action: str
) -> None:
    """xforward_hosts with on_virus = "replace" or "discard": no warning."""
    text = SERVER + 'xforward_hosts = ["127.0.0.1"]\n' + REST + f'\n[policy]\non_virus = "{action}"\n'
    path = tmp_path / "smtpguard.toml"
    assert check(tmp_path, capsys, text) == (0, f"{path}: ok\n", "")


def test_listener_without_xforward_rejecting_viruses_draws_no_warning(tmp_path: Path, capsys: Any) -> None:
    """Without xforward_hosts (a before-queue filter, or no MTA in front) rejecting
    is the right policy: no warning."""
    path = tmp_path / "smtpguard.toml"
    assert check(tmp_path, capsys, SERVER + REST + '\n[policy]\non_virus = "reject"\n') == (0, f"{path}: ok\n", "")


def test_each_rejecting_listener_is_warned_about_with_its_rejecting_banks(tmp_path: Path, capsys: Any) -> None:
    """Per listener, with its own policy keys: a listener without xforward_hosts is
    not warned about; one whose policy drops the rejecting bank is not; one that
    keeps it is, naming that bank (policy.rules[0]), not [policy] (replace)."""
    text = (
        SERVER
        + REST
        + """
[policy]
on_virus = "replace"

[[policy.rules]]
recipient_domains = ["example.net"]
on_virus = "reject"

[[listeners]]
endpoint = "tcp:10027:interface=127.0.0.1"
xforward_hosts = ["127.0.0.1"]

[listeners.policy]
rules = []

[[listeners]]
endpoint = "tcp:10028:interface=127.0.0.1"
xforward_hosts = ["127.0.0.1"]
"""
    )
    path = tmp_path / "smtpguard.toml"
    expected = warning(path, "tcp:10028:interface=127.0.0.1", "policy.rules[0]")
    assert check(tmp_path, capsys, text) == (0, f"{path}: ok\n", expected)
