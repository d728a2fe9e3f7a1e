"""Real scanning engines for the tests: ClamAV's clamd with a signature database
the test writes, started and stopped on demand."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import free_port, require_program

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
# clamd reports a match of this .ndb line as "Smtpguard.Test.EICAR.UNOFFICIAL".
EICAR_SIGNATURE = "Smtpguard.Test.EICAR"


class Clamd:
    """clamd on a private unix socket and a loopback TCP port.

    The database holds one .ndb signature for the EICAR test string, so clamd
    starts in seconds and needs no download.
    """

    def __init__(self, directory: Path, stream_max_length: str = "10M", extra: str = "") -> None:
        self.binary = require_program("clamd")
        self.directory = directory
        self.socket_path = str(directory / "clamd.sock")
        self.port = free_port()
        database = directory / "db"
        database.mkdir(parents=True, exist_ok=True)
        (database / "smtpguard-test.ndb").write_text(f"{EICAR_SIGNATURE}:0:*:{EICAR.hex()}\n")
        self.config = directory / "clamd.conf"
        self.config.write_text(
            "Foreground yes\n"
            f"LocalSocket {self.socket_path}\n"
            f"TCPSocket {self.port}\n"
            "TCPAddr 127.0.0.1\n"
            f"DatabaseDirectory {database}\n"
            f"LogFile {directory / 'clamd.log'}\n"
            "LogVerbose yes\n"
            + ("User root\n" if os.getuid() == 0 else "")
            + f"StreamMaxLength {stream_max_length}\n"
            + "MaxThreads 4\n"
            + extra
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def unix_endpoint(self) -> str:
        return f"unix:{self.socket_path}"

    @property
    def tcp_endpoint(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        self.process = subprocess.Popen(
            [self.binary, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.directory / "clamd.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"clamd exited with {self.process.returncode}: {log}")
            if self.ping():
                return
            time.sleep(0.1)
        raise TimeoutError("clamd did not answer PING")

    def ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.settimeout(1)
                probe.connect(self.socket_path)
                probe.sendall(b"zPING\0")
                return probe.recv(16) == b"PONG\0"
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def pause(self) -> None:
        """Stall clamd (SIGSTOP): connections are accepted by the kernel, never answered."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
