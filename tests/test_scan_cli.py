"""``smtpguard scan``: verdicts per file and clamdscan-like exit status, run as a
real command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from smtpguard.scanfiles import read_message

REPO = Path(__file__).resolve().parent.parent
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def smtpguard(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smtpguard.cli", *arguments],
        cwd=cwd,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def write(tmp_path: Path, name: str, body: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(b"Subject: test\n\n" + body + b"\n")
    return name


def test_clean_files_exit_zero(tmp_path):
    """Clean files print OK and the exit status is 0."""
    done = smtpguard("scan", "--scanner", "builtin", write(tmp_path, "a.eml", b"hello"), cwd=tmp_path)
    assert (done.returncode, done.stdout) == (0, "a.eml: OK\n")


def test_infected_file_exits_one(tmp_path):
    """An infected file prints the threat name, and the exit status is 1."""
    files = [write(tmp_path, "a.eml", b"hello"), write(tmp_path, "b.eml", EICAR)]
    done = smtpguard("scan", "--scanner", "builtin", *files, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stdout.splitlines()[0] == "a.eml: OK"
    assert done.stdout.splitlines()[1].startswith("b.eml: Eicar-Test-Signature FOUND")


def test_unreadable_file_exits_two(tmp_path):
    """A file that cannot be read is an error, and the exit status is 2."""
    done = smtpguard("scan", "--scanner", "builtin", "missing.eml", cwd=tmp_path)
    assert (done.returncode, done.stdout) == (2, "missing.eml: ERROR (cannot read: No such file or directory)\n")


def test_scanners_from_a_configuration_file(tmp_path):
    """--config takes the [[scanners]] of a configuration file."""
    config = '[upstream]\nendpoint = "tcp:127.0.0.1:1"\n[[scanners]]\ntype = "builtin"\n'
    (tmp_path / "smtpguard.toml").write_text(config)
    done = smtpguard("scan", "--config", "smtpguard.toml", write(tmp_path, "b.eml", EICAR), cwd=tmp_path)
    assert done.returncode == 1 and "FOUND" in done.stdout


def test_unknown_scanner_is_a_configuration_error(tmp_path):
    """An unknown scanner name stops with a message naming it, exit status 2."""
    done = smtpguard("scan", "--scanner", "nope", write(tmp_path, "a.eml", b"x"), cwd=tmp_path)
    assert done.returncode == 2
    assert "scanners[0].type: unknown scanner 'nope'" in done.stderr


def test_files_are_read_with_crlf_line_endings(tmp_path):
    """Message files with LF, CR or CRLF endings are scanned as CRLF, as received over SMTP."""
    (tmp_path / "m.eml").write_bytes(b"A: 1\nB: 2\r\n\rbody\r" + b"x" * 300_000 + b"\r\n")
    message = read_message(str(tmp_path / "m.eml"))
    try:
        assert message.read() == b"A: 1\r\nB: 2\r\n\r\nbody\r\n" + b"x" * 300_000 + b"\r\n"
    finally:
        message.close()
