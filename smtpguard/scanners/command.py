"""The command scanner: runs an external command-line scanner (``clamdscan`` and the
like) on each message and reads its verdict from the exit code and the output."""

from __future__ import annotations

import enum
import errno
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpguard.envelope import Envelope
from smtpguard.interfaces import IScanner
from smtpguard.results import ErrorKind, ScanResult, SizeLimit, Threat
from smtpguard.scanners.deadline import with_deadline
from smtpguard.scanners.optional import oversize
from smtpguard.spool import Message

log = Logger()

# clamdscan and clamscan print "stream: NAME FOUND" (stdin) or "PATH: NAME FOUND".
DEFAULT_THREAT_PATTERN = r"^.*: (?P<name>\S+) FOUND[ \t\r]*$"
# The name reported when an "infected" exit code comes without a name we can read.
UNNAMED_THREAT = "unknown"
FILE_PLACEHOLDER = "{file}"
STDIN_CHUNK = 64 * 1024
DETAIL_LENGTH = 200
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class InputMode(enum.Enum):
    STDIN = "stdin"
    FILE = "file"


@attrs.frozen
class CommandSettings:
    """A validated ``[[scanners]]`` table of type ``command``."""

    command: tuple[str, ...]
    executable: str
    input: InputMode = InputMode.STDIN
    clean_codes: frozenset[int] = frozenset({0})
    infected_codes: frozenset[int] = frozenset({1})
    error_codes: Mapping[int, ErrorKind] = attrs.field(factory=dict)
    threat_pattern: re.Pattern[str] = re.compile(DEFAULT_THREAT_PATTERN, re.MULTILINE)
    timeout: float = 60.0
    max_output: int = 64 * 1024
    directory: str | None = None
    name: str = "command"
    largest_message: int | None = None  # bytes the engine behind the command takes


@attrs.frozen
class Outcome:
    """How the command ended and what it said (each stream cut at ``max_output``)."""

    exit_code: int | None
    signal: int | None
    stdout: bytes = b""
    stderr: bytes = b""
    input_complete: bool = True


# -- reading the answer: pure -------------------------------------------------------


def find_threats(pattern: re.Pattern[str], output: bytes) -> tuple[Threat, ...]:
    """Every distinct threat ``pattern`` names in ``output``, in order."""
    text = output.decode("utf-8", "replace")
    found: dict[Threat, None] = {}
    for match in pattern.finditer(text):
        name = match.group("name")
        if name:
            file = match.group("file") if "file" in pattern.groupindex else None
            found.setdefault(Threat(name, file or ""), None)
    return tuple(found)


def classify(settings: CommandSettings, outcome: Outcome) -> ScanResult:
    """The scan result for how the command ended.  Clean only for a clean exit
    code, after the whole message went in, with no threat named in the output."""
    name = settings.name
    threats = find_threats(settings.threat_pattern, outcome.stdout + b"\n" + outcome.stderr)
    if outcome.signal is not None or outcome.exit_code is None:
        return ScanResult.failed(ErrorKind.OTHER, f"{_program(settings)} killed by signal {outcome.signal}", name)
    code = outcome.exit_code
    if code in settings.infected_codes:
        return ScanResult.infected(threats or (Threat(UNNAMED_THREAT),), name)
    if code in settings.clean_codes:
        if threats:
            found = ", ".join(threat.name for threat in threats)
            return ScanResult.failed(
                ErrorKind.OTHER, f"exit code {code} means clean but the output names {found}", name
            )
        if not outcome.input_complete:
            return ScanResult.failed(ErrorKind.OTHER, f"{_program(settings)} stopped reading the message", name)
        return ScanResult.clean(name)
    kind = settings.error_codes.get(code, ErrorKind.OTHER)
    return ScanResult.failed(kind, _error_detail(settings, outcome), name)


def _program(settings: CommandSettings) -> str:
    return os.path.basename(settings.command[0])


def _error_detail(settings: CommandSettings, outcome: Outcome) -> str:
    said = ""
    for stream in (outcome.stderr, outcome.stdout):
        lines = [line.strip() for line in stream.decode("utf-8", "replace").splitlines() if line.strip()]
        if lines:
            said = ": " + lines[-1]
            break
    detail = f"{_program(settings)} exited with code {outcome.exit_code}{said}"
    return detail if len(detail) <= DETAIL_LENGTH else detail[: DETAIL_LENGTH - 3] + "..."


# -- running the command ------------------------------------------------------------


@implementer(IPullProducer)
class _Feeder:
    """Writes the message to the command's stdin a chunk at a time, each when the
    pipe has taken the previous one, so memory stays bounded for any size."""

    def __init__(self, chunks: Iterator[bytes], transport: Any) -> None:
        self._chunks = chunks
        self._transport = transport
        self._stopped = False
        self.complete = False

    def resumeProducing(self) -> None:
        if self._stopped:
            return
        chunk = next(self._chunks, None)
        if chunk is None:
            self._stopped = True
            self.complete = True
            self._transport.unregisterProducer()
            self._transport.closeStdin()
            return
        self._transport.write(chunk)

    def stopProducing(self) -> None:
        # The pipe closed under us (the command exited or closed its stdin), or
        # the scan was abandoned: either way the rest of the message stays unsent.
        self._stopped = True


class _Run(ProcessProtocol):
    """One run of the command: feeds it, keeps the start of its output, and fires
    :attr:`ended` with an :class:`Outcome`; cancelling :attr:`ended` kills it."""

    def __init__(self, message: Message, settings: CommandSettings, path: str | None) -> None:
        self._message = message
        self._limit = settings.max_output
        self._path = path
        self._output: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        self._feeder: _Feeder | None = None
        self.ended: Deferred[Outcome] = Deferred(self._cancel)

    def connectionMade(self) -> None:
        if self._path is not None:
            self.transport.closeStdin()  # type: ignore[union-attr]
            return
        self._feeder = _Feeder(self._message.chunks(STDIN_CHUNK), self.transport)
        self.transport.registerProducer(self._feeder, False)  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        # Read everything (a blocked writer would never exit) but keep only the start.
        kept = self._output.get(childFD)
        if kept is not None and len(kept) < self._limit:
            kept += data[: self._limit - len(kept)]

    def processEnded(self, reason: Failure) -> None:
        self.remove_file()
        if self.ended.called:
            return
        code: int | None = 0
        signal: int | None = None
        if isinstance(reason.value, ProcessTerminated):
            code, signal = reason.value.exitCode, reason.value.signal
        complete = self._feeder is None or self._feeder.complete
        self.ended.callback(Outcome(code, signal, bytes(self._output[1]), bytes(self._output[2]), complete))

    def _cancel(self, ended: Deferred[Outcome]) -> None:
        if self._feeder is not None:
            self._feeder.stopProducing()
        try:
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]
        except ProcessExitedAlready:
            pass
        self.remove_file()

    def remove_file(self) -> None:
        if self._path is not None:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass


@implementer(IScanner)
class CommandScanner:
    """Runs ``settings.command`` once per message, with the message on its stdin or
    in a private temporary file, under the ``timeout`` deadline."""

    def __init__(self, settings: CommandSettings, reactor: Any) -> None:
        self.settings = settings
        self.name = settings.name
        self._reactor = reactor

    @property
    def max_size(self) -> SizeLimit | None:
        largest = self.settings.largest_message
        if largest is None:
            return None
        advice = "together with the engine's own (clamdscan: clamd's StreamMaxLength)"
        return SizeLimit(largest, "max_size", advice)

    def scan(self, message: Message, envelope: Envelope) -> Deferred[ScanResult]:
        too_big = oversize(message.size, self.max_size, self.name)
        if too_big is not None:
            return defer.succeed(too_big)
        try:
            running = self._run(message)
        except Exception:
            running = defer.fail()  # with_deadline logs it and makes it an error result
        return with_deadline(running, self.settings.timeout, self._reactor, self.name)

    def _run(self, message: Message) -> Deferred[ScanResult]:
        settings = self.settings
        path: str | None = None
        argv = list(settings.command)
        if settings.input is InputMode.FILE:
            try:
                path = write_private_file(message, settings.directory)
            except OSError as error:
                kind = ErrorKind.OUT_OF_RESOURCES if error.errno in _NO_SPACE else ErrorKind.OTHER
                detail = f"cannot write the message for {_program(settings)}: {error.strerror}"
                return defer.succeed(ScanResult.failed(kind, detail, self.name))
            argv = [argv[0], *(argument.replace(FILE_PLACEHOLDER, path) for argument in argv[1:])]
        run = _Run(message, settings, path)
        try:
            self._reactor.spawnProcess(run, settings.executable, argv, env=dict(os.environ))
        except OSError as error:
            run.remove_file()
            detail = f"cannot run {settings.command[0]}: {error.strerror or error}"
            return defer.succeed(ScanResult.failed(ErrorKind.OTHER, detail, self.name))
        except BaseException:
            run.remove_file()
            raise
        return run.ended.addCallback(lambda outcome: classify(settings, outcome))


def write_private_file(message: Message, directory: str | None) -> str:
    """Copy ``message`` to a new file only its owner can read (mode 0600); its path.

    Written synchronously: the message is already on local disk or in memory, and
    a thread would complicate removing the file on a timeout for little gain.
    """
    descriptor, path = tempfile.mkstemp(prefix="smtpguard-", suffix=".eml", dir=directory)
    try:
        with os.fdopen(descriptor, "wb") as file:
            for chunk in message.chunks():
                file.write(chunk)
    except BaseException:
        os.unlink(path)
        raise
    return path

