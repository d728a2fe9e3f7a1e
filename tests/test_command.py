"""The command scanner: configuration, the pure reading of exit codes and output,
real runs of small fake commands (Python scripts in tmp_path) under the real
reactor, and clamdscan against a real clamd, alone and through the proxy."""

from __future__ import annotations

import hashlib
import os
import re
import smtplib
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, threads
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessTerminated
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from smtpguard import config as configuration
from smtpguard import replies, tap
from smtpguard.config import ConfigError
from smtpguard.envelope import Client, Envelope
from smtpguard.interfaces import IScanner, IScannerFactory
from smtpguard.plugins import command as command_plugin
from smtpguard.registry import build_scanner, factories
from smtpguard.results import ErrorKind, ScanResult, SizeLimit, Threat
from smtpguard.scanners import command as command_scanner
from smtpguard.scanners.command import CommandScanner, CommandSettings, InputMode, Outcome, classify
from smtpguard.spool import Message, Spool
from tests.conftest import SmtpSink, require_program
from tests.engines import EICAR, EICAR_SIGNATURE

ENVELOPE = Envelope(Client("192.0.2.1", 4321, helo="client.example"), "alice@example.org")
PYTHON = sys.executable
PROGRAM = os.path.basename(PYTHON)
CLAMD_EICAR = f"{EICAR_SIGNATURE}.UNOFFICIAL"


def message(data: bytes) -> Message:
    spool = Spool(0)
    spool.write(data)
    return spool.finish()


def big_message(size: int) -> bytes:
    """``size`` bytes of numbered CRLF lines (not repetitive, so a lost or
    repeated chunk changes the digest)."""
    lines = b"".join(b"%08d The quick brown fox jumps over the lazy dog.\r\n" % i for i in range(size // 56 + 1))
    return b"Subject: big\r\n\r\n" + lines[: size - 17]


def fake(tmp_path: Path, source: str, name: str = "fake.py") -> list[str]:
    """The argv of a fake command: this Python running ``source``."""
    script = tmp_path / name
    script.write_text("import os, sys, hashlib, signal, time\n" + source)
    return [PYTHON, str(script)]


def scanner(command: list[str], **keys: Any) -> CommandScanner:
    return command_plugin.build({"command": command, **keys}, reactor)


def settings(**keys: Any) -> CommandSettings:
    return command_plugin.settings_from_config({"command": [PYTHON], **keys})


def config_error(**keys: Any) -> str:
    with pytest.raises(ConfigError) as raised:
        command_plugin.settings_from_config(keys)
    return str(raised.value)


async def scan(scanner: CommandScanner, data: bytes) -> ScanResult:
    body = message(data)
    try:
        result: ScanResult = await scanner.scan(body, ENVELOPE)
    finally:
        body.close()
    return result


# -- configuration ------------------------------------------------------------------


def test_plugin_is_found_and_builds_a_command_scanner() -> None:
    """The ``command`` factory is among the plugins and builds a verified IScanner
    named by the table's ``name``."""
    factory = factories(IScannerFactory)["command"]
    built = factory.build({"command": [PYTHON, "-c", "pass"], "name": "custom"}, MemoryReactorClock())
    assert isinstance(built, CommandScanner)
    assert verifyObject(IScanner, built)
    assert built.name == "custom"


def test_defaults_are_the_clamdscan_conventions() -> None:
    """Without options: stdin, exit 0 clean, 1 infected, anything else ``other``,
    60 s timeout, 64 KiB of output kept, named ``command``."""
    assert settings() == CommandSettings(command=(PYTHON,), executable=PYTHON)
    assert settings().input is InputMode.STDIN
    assert (settings().clean_codes, settings().infected_codes, settings().error_codes) == ({0}, {1}, {})
    assert (settings().timeout, settings().max_output, settings().name) == (60.0, 65536, "command")


def test_error_codes_table_maps_exit_codes_to_error_kinds() -> None:
    """``[scanners.error_codes]`` keys are exit codes, values ErrorKind values."""
    read = settings(error_codes={"2": "engine-not-ready", "3": "content-size"})
    assert read.error_codes == {2: ErrorKind.ENGINE_NOT_READY, 3: ErrorKind.CONTENT_SIZE}


def test_command_is_required() -> None:
    """A table without ``command`` is refused, with an example."""
    assert config_error() == 'command: is required, e.g. ["clamdscan", "--no-summary", "--stream", "-"]'


def test_missing_executable_is_refused_at_start() -> None:
    """A program that is neither a path to an executable nor on PATH is refused."""
    assert config_error(command=["no-such-scanner-here"]) == (
        "command: 'no-such-scanner-here' is not an executable file (nor one found on PATH)"
    )


def test_file_input_needs_the_file_placeholder() -> None:
    """``input = "file"`` without ``{file}`` in the command is refused, and so is
    ``{file}`` with stdin input."""
    assert config_error(command=[PYTHON], input="file") == 'command: needs a "{file}" argument with input = "file"'
    assert config_error(command=[PYTHON, "{file}"]) == (
        'input: must be "file" when the command has a "{file}" argument'
    )


def test_unknown_error_kind_is_refused() -> None:
    """An error_codes value that is not an ErrorKind names the code and the choices."""
    assert config_error(command=[PYTHON], error_codes={"2": "broken"}) == (
        "error_codes.2: must be one of engine-not-ready, timeout, too-many-requests, out-of-resources, "
        "content-size, decompress-layer, corrupt-file, password-protected, other, got 'broken'"
    )


def test_exit_code_out_of_range_is_refused() -> None:
    """Exit codes are 0..255, in the lists and as error_codes keys."""
    assert config_error(command=[PYTHON], clean_codes=[256]) == (
        "clean_codes: exit codes are integers from 0 to 255, got 256"
    )
    assert config_error(command=[PYTHON], error_codes={"x": "other"}) == (
        "error_codes.x: exit codes are integers from 0 to 255, got 'x'"
    )


def test_exit_code_with_two_meanings_is_refused() -> None:
    """One exit code cannot be both clean and infected, nor clean and an error."""
    assert config_error(command=[PYTHON], infected_codes=[0, 1]) == (
        "infected_codes: exit code 0 is also in clean_codes"
    )
    assert config_error(command=[PYTHON], error_codes={"0": "other"}) == (
        "error_codes.0: exit code 0 is also in clean_codes"
    )


def test_threat_pattern_must_compile_and_have_a_name_group() -> None:
    """threat_pattern is a regular expression with a ``name`` group."""
    assert config_error(command=[PYTHON], threat_pattern="(FOUND") == (
        "threat_pattern: not a valid regular expression: missing ), unterminated subpattern at position 0"
    )
    assert config_error(command=[PYTHON], threat_pattern="(.*) FOUND") == (
        "threat_pattern: needs a (?P<name>...) group for the threat's name"
    )


def test_max_size_is_the_largest_message_passed_to_the_command() -> None:
    """``max_size`` declares the engine's limit: it is the scanner's max_size, and
    a bigger message is ``content-size`` without running the command."""
    # A Clock cannot spawn processes: a run would have been an ``other`` error.
    limited = CommandScanner(settings(max_size=10), Clock())
    advice = "together with the engine's own (clamdscan: clamd's StreamMaxLength)"
    assert limited.max_size == SizeLimit(10, "max_size", advice)
    results: list[ScanResult] = []
    limited.scan(message(b"x" * 11), ENVELOPE).addCallback(results.append)
    assert results == [ScanResult.failed(ErrorKind.CONTENT_SIZE, "11 bytes, more than max_size (10)", "command")]


def test_max_size_absent_or_zero_is_no_limit() -> None:
    """Without ``max_size`` (or with 0) the command takes any size; below 0 is refused."""
    assert CommandScanner(settings(), reactor).max_size is None
    assert CommandScanner(settings(max_size=0), reactor).max_size is None
    assert config_error(command=[PYTHON], max_size=-1) == "max_size: must be 0 (no limit) or more, got -1"


def test_unknown_key_is_refused() -> None:
    """A key the scanner does not know stops the start."""
    assert config_error(command=[PYTHON], comand=["x"]) == "comand: unknown key"


def test_registry_names_the_table_in_errors() -> None:
    """Through the registry, errors name the file, the table and the key."""
    with pytest.raises(ConfigError) as raised:
        build_scanner({"type": "command", "timeout": 0}, MemoryReactorClock(), "f.toml: scanners[1]")
    assert str(raised.value) == (
        'f.toml: scanners[1].command: is required, e.g. ["clamdscan", "--no-summary", "--stream", "-"]'
    )


# -- reading the answer (pure) ------------------------------------------------------


def test_clean_exit_code_is_clean() -> None:
    """Exit 0 with clamdscan's "stream: OK" is clean."""
    assert classify(settings(), Outcome(0, None, b"stream: OK\n")) == ScanResult.clean("command")


def test_infected_exit_code_names_every_threat_found() -> None:
    """Exit 1: each distinct name on a "...: NAME FOUND" line, in order, from
    stdout and stderr."""
    outcome = Outcome(
        1, None, b"stream: Eicar-Sig FOUND\r\nother: Second FOUND\nstream: Eicar-Sig FOUND\n", b"x: T3 FOUND"
    )
    threats = (Threat("Eicar-Sig"), Threat("Second"), Threat("T3"))
    assert classify(settings(), outcome) == ScanResult.infected(threats, "command")


def test_infected_exit_code_without_a_readable_name_is_still_infected() -> None:
    """Exit 1 and no name in the output: infected by an ``unknown`` threat."""
    assert classify(settings(), Outcome(1, None, b"bad stuff\n")) == ScanResult.infected(
        (Threat("unknown"),), "command"
    )


def test_custom_pattern_with_file_group_names_the_file() -> None:
    """A ``file`` group in threat_pattern fills Threat.file."""
    read = settings(threat_pattern=r"^VIRUS (?P<name>\S+) IN (?P<file>\S+)$")
    outcome = Outcome(1, None, b"VIRUS W32.Bad IN doc.exe\n")
    assert classify(read, outcome) == ScanResult.infected((Threat("W32.Bad", "doc.exe"),), "command")


def test_mapped_error_code_gives_its_kind_and_the_last_line_said() -> None:
    """An exit code in error_codes gives that ErrorKind; the detail quotes the
    last line of stderr."""
    read = settings(error_codes={"2": "engine-not-ready"})
    outcome = Outcome(2, None, b"", b"first\nERROR: Could not connect to clamd\n\n")
    assert classify(read, outcome) == ScanResult.failed(
        ErrorKind.ENGINE_NOT_READY, f"{PROGRAM} exited with code 2: ERROR: Could not connect to clamd", "command"
    )


def test_unexpected_exit_code_is_an_other_error() -> None:
    """An exit code in no list is ``other``: never clean."""
    assert classify(settings(), Outcome(7, None, b"said something\n")) == ScanResult.failed(
        ErrorKind.OTHER, f"{PROGRAM} exited with code 7: said something", "command"
    )


def test_signal_is_an_other_error_even_with_a_clean_looking_output() -> None:
    """A command killed by a signal is ``other``, whatever it printed."""
    assert classify(settings(), Outcome(None, 9, b"stream: OK\n")) == ScanResult.failed(
        ErrorKind.OTHER, f"{PROGRAM} killed by signal 9", "command"
    )


def test_clean_exit_code_with_a_threat_in_the_output_is_an_error() -> None:
    """Exit 0 but a FOUND line: contradictory, so ``other``, not clean."""
    assert classify(settings(), Outcome(0, None, b"stream: Evil FOUND\n")) == ScanResult.failed(
        ErrorKind.OTHER, "exit code 0 means clean but the output names Evil", "command"
    )


def test_clean_exit_code_before_the_whole_message_went_in_is_an_error() -> None:
    """Exit 0 from a command that stopped reading its stdin is ``other``."""
    assert classify(settings(), Outcome(0, None, b"", b"", input_complete=False)) == ScanResult.failed(
        ErrorKind.OTHER, f"{PROGRAM} stopped reading the message", "command"
    )


def test_long_error_detail_is_cut() -> None:
    """The detail stays short (200 characters) whatever the command said."""
    result = classify(settings(), Outcome(3, None, b"", b"e" * 5000))
    assert result.detail == (f"{PROGRAM} exited with code 3: " + "e" * 5000)[:197] + "..."


# -- the process protocol, with a fake process and a Clock ---------------------------


class FakeProcess:
    """What the scanner uses of a process transport, recorded."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.producer: Any = None
        self.streaming: bool | None = None
        self.stdin_closed = False
        self.signals: list[str] = []

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer, self.streaming = producer, streaming

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, signal: str) -> None:
        self.signals.append(signal)


class ProcessClock(task.Clock):
    """A Clock that also "spawns" processes: FakeProcess transports."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, str, list[str], FakeProcess]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: Any = None) -> FakeProcess:
        process = FakeProcess()
        self.spawned.append((protocol, executable, args, process))
        protocol.makeConnection(process)
        return process


def fired(deferred: defer.Deferred[Any]) -> list[Any]:
    results: list[Any] = []
    deferred.addBoth(results.append)
    return results


def scanner_on(clock: ProcessClock) -> CommandScanner:
    return command_plugin.build({"command": [PYTHON]}, clock)


def test_stdin_gets_one_chunk_each_time_the_pipe_asks() -> None:
    """The message is a pull producer on the process's stdin: one 64 KiB chunk per
    resumeProducing (so a slow command holds back the reading), then stdin is
    closed; the command is spawned with the configured argv."""
    clock = ProcessClock()
    built = command_plugin.build({"command": [PYTHON, "-x"]}, clock)
    data = bytes(range(256)) * 600  # 153600 bytes: three chunks
    results = fired(built.scan(message(data), ENVELOPE))
    [(_, executable, args, process)] = clock.spawned
    assert (executable, args, process.streaming) == (PYTHON, [PYTHON, "-x"], False)
    assert process.written == []
    for expected in (1, 2, 3):
        process.producer.resumeProducing()
        assert len(process.written) == expected
    assert not process.stdin_closed
    process.producer.resumeProducing()
    assert (process.producer, process.stdin_closed) == (None, True)
    assert [len(chunk) for chunk in process.written] == [65536, 65536, 22528]
    assert b"".join(process.written) == data
    assert results == []


def test_exit_status_and_output_make_the_result() -> None:
    """Output read from the pipes and the exit status, once the process ends,
    give the result: here exit 1 and a FOUND line."""
    clock = ProcessClock()
    results = fired(scanner_on(clock).scan(message(b"x"), ENVELOPE))
    [(protocol, _, _, process)] = clock.spawned
    process.producer.resumeProducing()
    process.producer.resumeProducing()
    protocol.childDataReceived(1, b"stream: Split")
    protocol.childDataReceived(1, b".Name FOUND\n")
    protocol.processEnded(Failure(ProcessTerminated(exitCode=1)))
    assert results == [ScanResult.infected((Threat("Split.Name"),), "command")]


def test_deadline_kills_the_process_at_the_timeout_not_before() -> None:
    """With the default 60 s timeout: nothing at 59.9 s; at 60 s a timeout error
    and SIGKILL; the process's later end changes nothing."""
    clock = ProcessClock()
    results = fired(scanner_on(clock).scan(message(b"x"), ENVELOPE))
    [(protocol, _, _, process)] = clock.spawned
    clock.advance(59.9)
    assert (results, process.signals) == ([], [])
    clock.advance(0.1)
    assert results == [ScanResult.failed(ErrorKind.TIMEOUT, "no verdict within 60 s", "command")]
    assert process.signals == ["KILL"]
    protocol.processEnded(Failure(ProcessTerminated(signal=9)))
    assert len(results) == 1


# -- real runs of fake commands -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_clean_exit_of_a_real_command_is_clean(tmp_path: Path) -> None:
    """A command that reads the message and exits 0 gives a clean result."""
    command = fake(tmp_path, "sys.stdin.buffer.read(); print('stream: OK')")
    assert await scan(scanner(command), b"Subject: hi\r\n\r\nHello\r\n") == ScanResult.clean("command")


@pytest_twisted.ensureDeferred
async def test_infected_exit_of_a_real_command_names_the_threat(tmp_path: Path) -> None:
    """Exit 1 and "stream: NAME FOUND": infected with NAME, under the table's name."""
    command = fake(tmp_path, "sys.stdin.buffer.read(); print('stream: Fake.Virus-1 FOUND'); sys.exit(1)")
    result = await scan(scanner(command, name="fakeav"), b"Subject: hi\r\n\r\nHello\r\n")
    assert result == ScanResult.infected((Threat("Fake.Virus-1"),), "fakeav")


@pytest_twisted.ensureDeferred
async def test_unknown_exit_code_of_a_real_command_is_an_error(tmp_path: Path) -> None:
    """Exit 5, in no list: an ``other`` error quoting its stderr."""
    command = fake(tmp_path, "sys.stdin.buffer.read(); print('license expired', file=sys.stderr); sys.exit(5)")
    assert await scan(scanner(command), b"x\r\n") == ScanResult.failed(
        ErrorKind.OTHER, f"{PROGRAM} exited with code 5: license expired", "command"
    )


@pytest_twisted.ensureDeferred
async def test_real_command_killed_by_a_signal_is_an_error(tmp_path: Path) -> None:
    """A command that dies of SIGTERM gives an ``other`` error, not clean."""
    command = fake(tmp_path, "sys.stdin.buffer.read(); print('stream: OK', flush=True); os.kill(os.getpid(), 15)")
    assert await scan(scanner(command), b"x\r\n") == ScanResult.failed(
        ErrorKind.OTHER, f"{PROGRAM} killed by signal 15", "command"
    )


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest_twisted.ensureDeferred
async def test_timeout_kills_the_command_and_gives_a_timeout_error(tmp_path: Path) -> None:
    """A command that hangs: after ``timeout`` (0.5 s) the result is a timeout
    error, and the process is killed (SIGKILL) and reaped.  (When exactly the
    deadline fires is test_deadline_kills_the_process_at_the_timeout_not_before.)"""
    pid_file = tmp_path / "pid"
    command = fake(tmp_path, f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    result = await scan(scanner(command, timeout=0.5), b"x\r\n")
    assert result == ScanResult.failed(ErrorKind.TIMEOUT, "no verdict within 0.5 s", "command")
    pid = int(pid_file.read_text())
    for _ in range(100):  # reaping follows SIGCHLD: bounded wait, 5 s at most
        if _gone(pid):
            break
        await task.deferLater(reactor, 0.05, lambda: None)
    assert _gone(pid)


@pytest_twisted.ensureDeferred
async def test_five_megabytes_reach_the_command_on_stdin_unchanged(tmp_path: Path) -> None:
    """A 5 MB message is streamed to stdin whole: the command's sha256 and byte
    count of what it read match the message's."""
    data = big_message(5 * 1024 * 1024)
    command = fake(
        tmp_path,
        "data = sys.stdin.buffer.read()\n"
        "print(f'stream: {hashlib.sha256(data).hexdigest()}-{len(data)} FOUND'); sys.exit(1)\n",
    )
    result = await scan(scanner(command), data)
    assert result == ScanResult.infected((Threat(f"{hashlib.sha256(data).hexdigest()}-{len(data)}"),), "command")


@pytest_twisted.ensureDeferred
async def test_command_that_stops_reading_stdin_is_never_clean(tmp_path: Path) -> None:
    """A command that exits 0 without reading a 5 MB message is an error: it
    cannot have looked at what it did not read."""
    command = fake(tmp_path, "sys.exit(0)")
    assert await scan(scanner(command), big_message(5 * 1024 * 1024)) == ScanResult.failed(
        ErrorKind.OTHER, f"{PROGRAM} stopped reading the message", "command"
    )


@pytest_twisted.ensureDeferred
async def test_file_input_is_a_private_file_removed_after_the_scan(tmp_path: Path) -> None:
    """With ``input = "file"`` the command gets a file path for ``{file}``: the
    file holds the message, has mode 0600 while the command runs, and is gone
    afterwards; it is created in ``directory``."""
    data = big_message(300 * 1024)
    spool = tmp_path / "spool"
    spool.mkdir()
    command = fake(
        tmp_path,
        "path = sys.argv[1]\n"
        "mode = os.stat(path).st_mode & 0o777\n"
        "digest = hashlib.sha256(open(path, 'rb').read()).hexdigest()\n"
        "print(f'{path}: mode-{mode:o}-{digest} FOUND'); sys.exit(1)\n",
    )
    result = await scan(
        scanner(
            [*command, "{file}"],
            input="file",
            directory=str(spool),
            threat_pattern=r"^(?P<file>.+): (?P<name>\S+) FOUND$",
        ),
        data,
    )
    [threat] = result.threats
    assert threat.name == f"mode-600-{hashlib.sha256(data).hexdigest()}"
    assert Path(threat.file).parent == spool
    assert not os.path.exists(threat.file)
    assert list(spool.iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_file_input_file_is_removed_after_a_timeout(tmp_path: Path) -> None:
    """The temporary file is removed when the deadline kills the command too."""
    spool = tmp_path / "spool"
    spool.mkdir()
    command = fake(tmp_path, "time.sleep(60)")
    result = await scan(scanner([*command, "{file}"], input="file", directory=str(spool), timeout=0.5), b"x\r\n")
    assert result.error is ErrorKind.TIMEOUT
    assert list(spool.iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_output_beyond_the_limit_is_drained_but_not_read(tmp_path: Path) -> None:
    """A command printing 1 MiB is not blocked (its output is drained); only the
    first ``max_output`` bytes are searched for threat names."""
    command = fake(
        tmp_path,
        "sys.stdin.buffer.read()\n"
        "print('stream: First FOUND'); print(('x' * 1023 + chr(10)) * 1024); print('stream: Late FOUND')\n"
        "sys.exit(1)\n",
    )
    assert await scan(scanner(command, max_output=4096), b"x\r\n") == ScanResult.infected((Threat("First"),), "command")


@pytest_twisted.ensureDeferred
async def test_command_gone_at_scan_time_is_an_error(tmp_path: Path) -> None:
    """A program removed after the start cannot run: an ``other`` error."""
    program = tmp_path / "vanishing-scanner"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    built = scanner([str(program)])
    program.unlink()
    result = await scan(built, b"x\r\n")
    assert result == ScanResult.failed(ErrorKind.OTHER, f"cannot run {program}: No such file or directory", "command")


@pytest_twisted.ensureDeferred
async def test_parallel_scans_each_get_their_own_answer(tmp_path: Path) -> None:
    """Several messages scanned at once by one scanner each get the verdict for
    their own bytes."""
    command = fake(
        tmp_path,
        "data = sys.stdin.buffer.read()\n"
        "print(f'stream: {hashlib.sha256(data).hexdigest()[:16]} FOUND'); sys.exit(1)\n",
    )
    built = scanner(command)
    bodies = [b"Subject: %d\r\n\r\n" % i + b"y" * (i * 100_000) for i in range(4)]
    results = await defer.gatherResults([defer.ensureDeferred(scan(built, body)) for body in bodies])
    assert [result.threats for result in results] == [
        (Threat(hashlib.sha256(body).hexdigest()[:16]),) for body in bodies
    ]


# -- the real engine: clamdscan and clamd -------------------------------------------


@pytest.fixture
def clamdscan(clamd: Any, tmp_path: Path) -> list[str]:
    """clamdscan's argv, with a config file pointing at the session's clamd."""
    program = require_program("clamdscan")
    conf = tmp_path / "clamdscan.conf"
    conf.write_text(f"LocalSocket {clamd.socket_path}\n")
    return [program, f"--config-file={conf}", "--no-summary", "--stream"]


def eicar_message(subject: str = "test file") -> bytes:
    return f"From: a@example.org\r\nSubject: {subject}\r\n\r\nAttached:\r\n".encode() + EICAR + b"\r\n"


@pytest_twisted.ensureDeferred
async def test_clamdscan_finds_a_clean_message_clean(clamdscan: list[str]) -> None:
    """clamdscan --stream - on a plain message: clean."""
    result = await scan(scanner([*clamdscan, "-"], name="clamdscan"), b"Subject: hi\r\n\r\nHello\r\n")
    assert result == ScanResult.clean("clamdscan")


@pytest_twisted.ensureDeferred
async def test_clamdscan_finds_eicar_with_clamds_threat_name(clamdscan: list[str]) -> None:
    """clamdscan --stream - on an EICAR message: infected, named as clamd names it."""
    result = await scan(scanner([*clamdscan, "-"], name="clamdscan"), eicar_message())
    assert result == ScanResult.infected((Threat(CLAMD_EICAR),), "clamdscan")


@pytest_twisted.ensureDeferred
async def test_clamdscan_finds_eicar_in_a_large_message(clamdscan: list[str]) -> None:
    """EICAR at the end of a 5 MB message streamed through clamdscan is found."""
    data = big_message(5 * 1024 * 1024) + b"\r\n" + EICAR + b"\r\n"
    assert await scan(scanner([*clamdscan, "-"]), data) == ScanResult.infected((Threat(CLAMD_EICAR),), "command")


@pytest_twisted.ensureDeferred
async def test_clamdscan_with_file_input_finds_eicar(clamdscan: list[str]) -> None:
    """With ``input = "file"`` clamdscan --stream {file} finds EICAR too."""
    result = await scan(scanner([*clamdscan, "{file}"], input="file"), eicar_message())
    assert result == ScanResult.infected((Threat(CLAMD_EICAR),), "command")


@pytest_twisted.ensureDeferred
async def test_clamdscan_without_clamd_is_the_mapped_error(tmp_path: Path) -> None:
    """clamdscan that cannot reach clamd exits 2, mapped here to engine-not-ready."""
    program = require_program("clamdscan")
    conf = tmp_path / "clamdscan.conf"
    conf.write_text(f"LocalSocket {tmp_path / 'nothing.sock'}\n")
    built = scanner(
        [program, f"--config-file={conf}", "--no-summary", "--stream", "-"], error_codes={"2": "engine-not-ready"}
    )
    result = await scan(built, b"x\r\n")
    assert result == ScanResult.failed(
        ErrorKind.ENGINE_NOT_READY,
        f"clamdscan exited with code 2: ERROR: Could not connect to clamd on LocalSocket {tmp_path / 'nothing.sock'}:"
        " No such file or directory",
        "command",
    )


# -- through the proxy --------------------------------------------------------------


@pytest.fixture
def listening() -> Iterator[list[IListeningPort]]:
    opened: list[IListeningPort] = []
    yield opened
    for port in opened:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


def _sink_files(sink: SmtpSink) -> list[bytes]:
    return [path.read_bytes() for path in sorted(sink.directory.iterdir())]


@pytest_twisted.ensureDeferred
async def test_proxy_with_clamdscan_rejects_eicar_and_delivers_clean_mail(
    clamdscan: list[str], smtp_sink: SmtpSink, listening: list[IListeningPort]
) -> None:
    """smtpguard built from a config with a ``command`` scanner running clamdscan:
    the EICAR message gets 554 5.7.1 naming clamd's signature and is not relayed;
    the clean message in the same session is relayed with X-Virus-Status: clean."""
    settings = configuration.parse(
        {
            "server": {"hostname": "guard.test"},
            "upstream": {"endpoint": smtp_sink.endpoint},
            "scanners": [{"type": "command", "name": "clamdscan", "command": [*clamdscan, "-"], "timeout": 30}],
        },
        "command-test",
    )
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(tap.build_factory(settings, reactor))
    listening.append(port)

    def session() -> tuple[tuple[int, bytes], list[bytes], dict[str, tuple[int, bytes]]]:
        with smtplib.SMTP("127.0.0.1", port.getHost().port, local_hostname="client.example", timeout=30) as client:
            client.ehlo()
            try:
                client.sendmail("a@example.org", ["b@example.net"], eicar_message("infected"))
            except smtplib.SMTPDataError as refused:
                infected = (refused.smtp_code, refused.smtp_error)
            else:
                infected = (250, b"accepted")
            between = _sink_files(smtp_sink)
            refused_recipients = client.sendmail("a@example.org", ["b@example.net"], b"Subject: clean\r\n\r\nHi\r\n")
            return infected, between, refused_recipients

    infected, between, refused_recipients = await threads.deferToThread(session)
    rejected = replies.VIRUS_REJECTED.with_text(f"Message rejected: virus found ({CLAMD_EICAR})")
    assert infected == (rejected.code, f"{rejected.enhanced} {rejected.text}".encode())
    assert between == []
    assert refused_recipients == {}
    [dump] = await threads.deferToThread(smtp_sink.messages, 1)
    assert re.search(rb"\nX-Virus-Scanned: smtpguard \(clamdscan\) on guard\.test\nX-Virus-Status: clean\n", dump)
    assert dump.endswith(b"Subject: clean\n\nHi\n\n")


def test_private_file_mode_is_0600(tmp_path: Path) -> None:
    """write_private_file creates the copy with mode 0600, whatever the umask."""
    old = os.umask(0)
    try:
        path = command_scanner.write_private_file(message(b"abc\r\n"), str(tmp_path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Path(path).read_bytes() == b"abc\r\n"
