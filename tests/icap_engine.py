"""A real ICAP server for the tests: c-icap with its virus_scan service, backed by
a clamd the test provides, configured and run in a private directory."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import IN_CI, free_port, require_program

SERVICE = "avscan"


def _package_files(package: str) -> list[str]:
    """The files a Debian package installed (``dpkg -L``); fails in CI, skips elsewhere."""
    try:
        listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        message = f"the Debian package {package} is not installed (scripts/test installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return listing.splitlines()


def _one(files: list[str], suffix: str, package: str) -> str:
    for name in files:
        if name.endswith(suffix):
            return name
    raise RuntimeError(f"{package} has no file ending in {suffix}")


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (c-icap's servers)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in parentheses may contain spaces: fields follow the last ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            children.append(int(entry.name))
    return children


class CIcap:
    """c-icap in the foreground (``-N``) on 127.0.0.1 with the ``avscan`` service
    (virus_scan.so using clamd_mod.so), every file it writes in ``directory``.

    virus_scan scans every file type, objects up to 100M, and answers an error
    (never a pass) when clamd fails.
    """

    def __init__(
        self, directory: Path, clamd_socket: str, max_object_size: str = "100M", port: int | None = None
    ) -> None:
        self.binary = require_program("c-icap")
        modules = _package_files("libc-icap-mod-virus-scan")
        server = _package_files("c-icap")
        virus_scan = _one(modules, "/virus_scan.so", "libc-icap-mod-virus-scan")
        templates = _one(modules, "/templates/virus_scan", "libc-icap-mod-virus-scan")
        magic = _one(server, "/c-icap.magic", "c-icap")
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.access_log = directory / "access.log"
        self.server_log = directory / "server.log"
        self.config = directory / "c-icap.conf"
        self.config.write_text(
            f"PidFile {directory / 'c-icap.pid'}\n"
            f"CommandsSocket {directory / 'c-icap.ctl'}\n"
            f"Port 127.0.0.1:{self.port}\n"
            "ServerName smtpguard-test\n"
            f"TmpDir {directory}\n"
            f"ServerLog {self.server_log}\n"
            f"AccessLog {self.access_log}\n"
            "DebugLevel 1\n"
            "Timeout 60\n"
            "MaxKeepAliveRequests 100\n"
            "KeepAliveTimeout 60\n"
            "StartServers 1\n"
            "MaxServers 2\n"
            "MinSpareThreads 2\n"
            "MaxSpareThreads 8\n"
            "ThreadsPerChild 8\n"
            f"ModulesDir {Path(virus_scan).parent}\n"
            f"ServicesDir {Path(virus_scan).parent}\n"
            f"TemplateDir {Path(templates).parent}\n"
            f"LoadMagicFile {magic}\n"
            "Module common clamd_mod.so\n"
            f"clamd_mod.ClamdSocket {clamd_socket}\n"
            f"Service {SERVICE} virus_scan.so\n"
            "virus_scan.DefaultEngine clamd\n"
            f"virus_scan.MaxObjectSize {max_object_size}\n"
            "virus_scan.PassOnError off\n"
            "virus_scan.Allow204Responces on\n"
            "virus_scan.ScanFileTypes TEXT DATA EXECUTABLE ARCHIVE GRAPHICS STREAM DOCUMENT\n"
            # No early response before the verdict (which c-icap would send as a
            # 200 with the data so far): that is an error for smtpguard.
            "virus_scan.SendPercentData 0\n"
            f"virus_scan.StartSendPercentDataAfter {max_object_size}\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"icap://127.0.0.1:{self.port}/{SERVICE}"

    @property
    def endpoint(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        with (self.directory / "c-icap.out").open("wb") as output:
            self.process = subprocess.Popen(
                [self.binary, "-N", "-f", str(self.config)], stdout=output, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"c-icap exited with {self.process.returncode}: {self.log()}")
            if self.options_status() == 200:
                return
            time.sleep(0.05)
        raise TimeoutError(f"c-icap did not answer OPTIONS: {self.log()}")

    def options_status(self) -> int | None:
        """The status of an OPTIONS request for the service, or None when nothing answers."""
        request = (
            f"OPTIONS {self.url} ICAP/1.0\r\nHost: 127.0.0.1:{self.port}\r\nEncapsulated: null-body=0\r\n\r\n"
        ).encode()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as probe:
                probe.sendall(request)
                status = probe.recv(64).split(b" ", 2)
                return int(status[1]) if len(status) > 1 and status[1].isdigit() else None
        except OSError:
            return None

    def log(self) -> str:
        texts = []
        for path in (self.directory / "c-icap.out", self.server_log):
            if path.exists():
                texts.append(path.read_text(errors="replace")[-2000:])
        return "\n".join(texts)

    def access_lines(self) -> list[str]:
        if not self.access_log.exists():
            return []
        return self.access_log.read_text(errors="replace").splitlines()

    def stop(self, grace: float = 3.0) -> None:
        """Stop c-icap: SIGTERM, and SIGKILL for it and its children if it is still
        there after ``grace`` seconds (a child waits ten seconds for an idle
        keep-alive connection to close before it exits); then wait until nothing
        listens on the port any more."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()
        self.kill()
        deadline = time.monotonic() + 10
        while self._listening() and time.monotonic() < deadline:
            time.sleep(0.02)

    def kill(self) -> None:
        """Kill c-icap and its children at once (SIGKILL), as in a crash."""
        if self.process is None:
            return
        if self.process.poll() is None:
            for child in _children(self.process.pid):
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.process.kill()
        self.process.wait(10)
        self.process = None

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False
