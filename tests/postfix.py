"""A private Postfix instance for the tests, and the recipes of docs/postfix.md.

An instance has its own config_directory, queue_directory and data_directory in
one temporary directory; it listens on loopback only, logs to a file there
(``maillog_file`` through the ``postlog`` service, as Postfix's MAILLOG_README
says) and its virtual(8) agent delivers into a Maildir there.  Postfix's daemons
run as the postfix user and ``postfix start`` wants root: the ``private_postfix``
fixture of tests/conftest.py starts and stops instances.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from tests.conftest import require_program, wait_for_port

DOCS = Path(__file__).resolve().parent.parent / "docs" / "postfix.md"

# What every instance has: its directories and log, loopback only, and the
# services of Debian's master.cf that are not SMTP listeners.
MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = hop.test
mydomain = test
mydestination =
relay_domains =
mynetworks = 127.0.0.0/8
inet_interfaces = loopback-only
inet_protocols = ipv4
smtpd_banner = $myhostname ESMTP $mail_name
alias_maps =
alias_database =
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
"""
MASTER_CF = """\
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
pickup unix n - n 60 1 pickup
tlsmgr unix - - n 1000? 1 tlsmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
virtual unix - n n - - virtual
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""
# Mail for these domains goes into one Maildir (MAILDIR); anything else bounces.
# No client name lookups: every client is unknown[address], whatever the resolver.
MAILDIR = "maildir"
MAILBOX_MAIN_CF = f"""\
smtpd_peername_lookup = no
virtual_mailbox_domains = example.com, example.org
virtual_mailbox_base = {{root}}/mail
virtual_mailbox_maps = static:{MAILDIR}/
virtual_uid_maps = static:{{uid}}
virtual_gid_maps = static:{{gid}}
default_transport = error:5.1.2 no delivery outside the test domains
relay_transport = error:5.1.2 no delivery outside the test domains
"""


class PrivatePostfix:
    """A Postfix instance of its own.  ``main_cf`` and ``master_cf`` are added to
    the common settings; ``{root}`` in them is the instance's directory, ``{uid}``
    and ``{gid}`` the postfix user's."""

    def __init__(self, main_cf: str = "", master_cf: str = "", listening: tuple[int, ...] = ()) -> None:
        # Postfix's daemons run as the postfix user: a directory it can reach.
        self.root = Path(tempfile.mkdtemp(prefix="smtpguard-postfix-"))
        self.root.chmod(0o755)
        self.listening = listening
        self.config = self.root / "conf"
        self.config.mkdir()
        (self.root / "queue").mkdir()
        for owned in ("data", "mail"):
            (self.root / owned).mkdir()
            shutil.chown(self.root / owned, "postfix", "postfix")
        user = pwd.getpwnam("postfix")
        names = {"root": str(self.root), "uid": str(user.pw_uid), "gid": str(user.pw_gid)}
        (self.config / "main.cf").write_text(fill(MAIN_CF + main_cf, names))
        (self.config / "master.cf").write_text(fill(MASTER_CF + master_cf, names))

    def run(self, program: str, *arguments: str) -> str:
        """Run one of Postfix's commands on this instance; its output."""
        done = subprocess.run(
            [require_program(program), "-c", str(self.config), *arguments],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return done.stdout

    def start(self) -> None:
        try:
            self.run("postfix", "start")
            for port in self.listening:
                wait_for_port(port)
        except (subprocess.CalledProcessError, TimeoutError) as error:
            raise RuntimeError(f"Postfix did not start: {self.log() or error}") from error

    def stop(self) -> None:
        pid = self.root / "queue" / "pid" / "master.pid"
        if pid.exists():
            master = int(pid.read_text())
            self.run("postfix", "stop")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(master, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def queue(self) -> list[dict[str, object]]:
        """The queued messages (``postqueue -j``): queue_name, queue_id, sender, recipients."""
        return [json.loads(line) for line in self.run("postqueue", "-j").splitlines()]

    def flush(self) -> None:
        """Deliver the deferred mail now (``postqueue -f``)."""
        self.run("postqueue", "-f")

    def mailbox(self) -> list[Path]:
        """The messages delivered into the Maildir, oldest first."""
        new = self.root / "mail" / MAILDIR / "new"
        if not new.is_dir():
            return []
        return sorted(new.iterdir(), key=lambda path: path.stat().st_mtime_ns)


def fill(text: str, names: Mapping[str, str]) -> str:
    """``text`` with each ``{name}`` replaced (a literal replacement: Postfix's own
    ``${name}`` and TOML's braces are left alone)."""
    for name, value in names.items():
        text = text.replace("{" + name + "}", value)
    return text


RECIPE = re.compile(r"<!-- recipe: (?P<name>[^>]+?) -->\n```[a-z]*\n(?P<text>.*?)```\n", re.S)


def recipes() -> dict[str, str]:
    """The blocks of docs/postfix.md marked ``<!-- recipe: NAME -->``, by name."""
    return {match["name"]: match["text"] for match in RECIPE.finditer(DOCS.read_text(encoding="utf-8"))}


def recipe(name: str, replacements: Mapping[str, str] | None = None) -> str:
    """The recipe ``name`` of docs/postfix.md with each key of ``replacements``
    (which must appear in it) replaced: the ports and paths of the test."""
    text = recipes()[name]
    for old, new in (replacements or {}).items():
        assert old in text, f"docs/postfix.md, recipe {name!r}: {old!r} is gone"
        text = text.replace(old, new)
    return text
