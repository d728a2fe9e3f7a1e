"""Scanning message files from the command line (``smtpguard scan``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TextIO

from smtpguard import config as configuration
from smtpguard.config import Config
from smtpguard.envelope import Client, Envelope
from smtpguard.interfaces import IScanner
from smtpguard.results import Verdict
from smtpguard.scanners.deadline import scan_safely, with_deadline
from smtpguard.spool import Message, Spool
from smtpguard.wire import LineEndingNormaliser

_READ_SIZE = 256 * 1024
EXIT_CLEAN, EXIT_INFECTED, EXIT_ERROR = 0, 1, 2


def load_config(path: str | None, specs: Sequence[str] | None) -> Config:
    """The configuration whose ``[[scanners]]`` are used: a file, with ``--scanner``
    values replacing its tables."""
    from smtpguard.tap import scanner_table

    data: dict[str, Any] = configuration.read_toml(path) if path else {}
    if specs:
        data["scanners"] = [scanner_table(spec) for spec in specs]
    # The next hop is not used for scanning files, but the file must be valid as a whole.
    data.setdefault("upstream", {}).setdefault("endpoint", "tcp:127.0.0.1:25")
    return configuration.parse(data, path or "command line")


def read_message(path: str) -> Message:
    """A message file as smtpguard would have received it: CRLF line endings."""
    spool = Spool(0)
    normaliser = LineEndingNormaliser(spool.write)
    with open(path, "rb") as file:
        while block := file.read(_READ_SIZE):
            normaliser.feed(block)
    normaliser.close()
    return spool.finish()


async def scan_files(reactor: Any, scanner: IScanner, deadline: float, paths: Sequence[str], out: TextIO) -> int:
    """Scan each file, print ``PATH: OK``, ``PATH: NAME FOUND`` or ``PATH: ERROR
    (kind: detail)``; return the exit status."""
    infected = failed = False
    for path in paths:
        try:
            message = read_message(path)
        except OSError as error:
            print(f"{path}: ERROR (cannot read: {error.strerror})", file=out)
            failed = True
            continue
        try:
            envelope = Envelope(Client("127.0.0.1", 0), "")
            result = await with_deadline(scan_safely(scanner, message, envelope), deadline, reactor, scanner.name)
        finally:
            message.close()
        if result.verdict is Verdict.CLEAN:
            print(f"{path}: OK", file=out)
        elif result.verdict is Verdict.INFECTED:
            infected = True
            for threat in result.threats:
                where = f" in {threat.file}" if threat.file else ""
                print(f"{path}: {threat.name} FOUND{where}", file=out)
        else:
            failed = True
            assert result.error is not None
            print(f"{path}: ERROR ({result.error.value}: {result.detail})", file=out)
    return EXIT_INFECTED if infected else EXIT_ERROR if failed else EXIT_CLEAN
