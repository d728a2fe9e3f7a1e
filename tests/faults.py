"""Fault injection on loopback: smtp-sink and smtpguard as processes a test kills and
starts again on the same port, a retrying load of numbered messages, and the
reckoning of what reached the next hop."""

from __future__ import annotations

import queue
import random
import re
import signal
import smtplib
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import attrs

from tests.conftest import require_program, wait_for_port
from tests.engines import EICAR
from tests.test_twistd import TWISTD, environment

SENDER = "alice@example.org"
RECIPIENT = "bob@example.net"
CLIENT_HELO = "load.test"
GUARD = "guard.test"  # smtpguard's [server] hostname
# Longer than anything smtpguard may take for one reply (scan deadline plus the next
# hop's timeouts): a client that gives up earlier opens a duplicate window of its own.
CLIENT_TIMEOUT = 60.0
_ENHANCED = re.compile(rb"^([245]\.\d{1,3}\.\d{1,3})\b")


# -- processes ------------------------------------------------------------------------


class Sink:
    """Postfix's smtp-sink on a fixed loopback port, so that it can be killed and
    started again where smtpguard expects its next hop; every incarnation dumps each
    message it accepts into the same folder."""

    def __init__(self, directory: Path, port: int) -> None:
        self.binary = require_program("smtp-sink")
        self.directory = directory
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def endpoint(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "-u", "root", "-d", str(self.directory / "%Y%m%d%H%M%S."), f"127.0.0.1:{self.port}", "256"],
            cwd=self.directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self, how: signal.Signals = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(how)
            self.process.wait(10)
        self.process = None


class Guard:
    """smtpguard as ``twistd -n smtpguard --config FILE``, stopped with a signal and
    started again on the same port; each incarnation logs to its own file."""

    def __init__(self, directory: Path, port: int, config: str) -> None:
        self.directory = directory
        self.port = port
        self.config = directory / "smtpguard.toml"
        self.config.write_text(config, encoding="utf-8")
        self.process: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    def start(self, timeout: float = 20.0) -> None:
        log = self.directory / f"smtpguard-{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("wb") as output:
            self.process = subprocess.Popen(
                [*TWISTD, "-n", "--pidfile=", "smtpguard", "--config", str(self.config)],
                cwd=self.directory,
                env=environment(),
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"smtpguard exited with {self.process.returncode}:\n{self.text()[-3000:]}")
            try:
                smtplib.SMTP("127.0.0.1", self.port, timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"smtpguard did not listen on {self.port} within {timeout} s")

    def stop(self, how: signal.Signals = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(how)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
                raise
        self.process = None

    def text(self) -> str:
        return "".join(log.read_text(encoding="utf-8", errors="replace") for log in self.logs)


def guard_config(port: int, upstream: str, clamd: str) -> str:
    """smtpguard with the default policy (reject viruses, defer scan errors) and
    timeouts short enough for every fault to resolve in seconds."""
    return (
        "[server]\n"
        f'listen = ["tcp:{port}:interface=127.0.0.1"]\n'
        f'hostname = "{GUARD}"\n'
        "[upstream]\n"
        f'endpoint = "{upstream}"\n'
        "timeout = 5\n"
        "connect_timeout = 2\n"
        "[[scanners]]\n"
        'type = "clamd"\n'
        f'endpoint = "{clamd}"\n'
        "timeout = 5\n"
        "health_check_interval = 0.5\n"
        "[scanning]\n"
        "timeout = 10\n"
        "[policy]\n"
        'on_virus = "reject"\n'
        'fail_mode = "defer"\n'
    )


# -- the load -------------------------------------------------------------------------


def is_infected(number: int) -> bool:
    return number % 10 == 7  # one message in ten


def numbered_message(test_id: str, number: int) -> bytes:
    """A message that says its id in its headers and in its last line, padded: most
    to a few KB, one in five to up to 24 KB, one in fifty to up to 1.5 MB (longer
    in flight, and spooled to a file by smtpguard past 1 MiB)."""
    lines = [
        f"From: <{SENDER}>",
        f"To: <{RECIPIENT}>",
        f"Subject: fault injection {number}",
        f"Message-ID: <{test_id}@faults.test>",
        f"X-Test-Id: {test_id}",
        "",
        f"Message {number} of the fault-injection load.",
    ]
    limit = 1_500_000 if number % 50 == 3 else 24_000 if number % 5 == 0 else 2_000
    pad = random.Random(number).randrange(limit // 10, limit)
    lines += [f"{row:06d} " + "x" * 70 for row in range(pad // 78)]
    text = "\r\n".join(lines).encode("ascii") + b"\r\n"
    if is_infected(number):
        text += EICAR + b"\r\n"
    return text + trailer(test_id)


def trailer(test_id: str) -> bytes:
    """The last line: a dump that ends with it holds the whole message."""
    return f"End of test message {test_id}.\r\n".encode("ascii")


@attrs.define
class Outcome:
    """What the client saw for one message over all its attempts."""

    number: int
    infected: bool
    final: int | None = None  # 250 or a 5xx; None: still not settled when time ran out
    final_text: str = ""
    attempts: int = 0
    transient: Counter[str] = attrs.Factory(Counter)  # "451 4.7.1" -> times heard
    connection_errors: Counter[str] = attrs.Factory(Counter)  # exception name -> times


def _reply_key(code: int, text: bytes | str) -> str:
    raw = text.encode("utf-8", "replace") if isinstance(text, str) else text
    match = _ENHANCED.match(raw)
    return f"{code} {match.group(1).decode()}" if match else str(code)


class Load:
    """``count`` numbered messages sent by ``concurrency`` threads with smtplib, each
    retried (same id, same bytes) after a 4xx or a lost connection until it gets
    250 or a 5xx, for at most ``budget`` seconds per message."""

    def __init__(self, port: int, count: int, concurrency: int, budget: float, token: str) -> None:
        self.port = port
        self.concurrency = concurrency
        self.budget = budget
        self.outcomes: dict[str, Outcome] = {}
        self.messages: dict[str, bytes] = {}
        self._todo: queue.SimpleQueue[str] = queue.SimpleQueue()
        for number in range(count):
            test_id = f"{token}.{number:05d}"
            self.outcomes[test_id] = Outcome(number, is_infected(number))
            self.messages[test_id] = numbered_message(test_id, number)
            self._todo.put(test_id)
        self._lock = threading.Lock()
        self._settled = 0
        self._stopped = threading.Event()
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(concurrency)]
        self.started = 0.0
        self.elapsed = 0.0

    @property
    def settled(self) -> int:
        with self._lock:
            return self._settled

    def start(self) -> None:
        self.started = time.monotonic()
        for thread in self._threads:
            thread.start()

    def wait(self, timeout: float) -> bool:
        """True once every message is settled (or has run out of time) within ``timeout``."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.elapsed = time.monotonic() - self.started
        return not any(thread.is_alive() for thread in self._threads)

    def stop(self) -> None:
        """Give up on every message not yet settled (the test is over)."""
        self._stopped.set()

    def wait_for(self, settled: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.settled < settled and time.monotonic() < deadline:
            time.sleep(0.05)

    def _work(self) -> None:
        client: smtplib.SMTP | None = None
        while True:
            try:
                test_id = self._todo.get_nowait()
            except queue.Empty:
                break
            client = self._deliver(test_id, client)
            with self._lock:
                self._settled += 1
        if client is not None:
            _close(client, polite=True)

    def _deliver(self, test_id: str, client: smtplib.SMTP | None) -> smtplib.SMTP | None:
        outcome = self.outcomes[test_id]
        message = self.messages[test_id]
        deadline = time.monotonic() + self.budget
        while time.monotonic() < deadline and not self._stopped.is_set():
            outcome.attempts += 1
            code: int
            text: bytes | str
            try:
                if client is None:
                    client = smtplib.SMTP("127.0.0.1", self.port, local_hostname=CLIENT_HELO, timeout=CLIENT_TIMEOUT)
                client.sendmail(SENDER, [RECIPIENT], message)
                outcome.final = 250
                return client
            except smtplib.SMTPRecipientsRefused as refused:
                code, text = refused.recipients[RECIPIENT]
            except smtplib.SMTPResponseException as failed:
                code, text = failed.smtp_code, failed.smtp_error
            except OSError as lost:  # SMTPServerDisconnected, refused connections, timeouts
                outcome.connection_errors[type(lost).__name__] += 1
                if client is not None:
                    _close(client, polite=False)
                client = None
                self._pause(outcome.attempts)
                continue
            if code >= 500:
                outcome.final = code
                outcome.final_text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
                return client
            outcome.transient[_reply_key(code, text)] += 1
            if client is not None and client.sock is None:  # smtplib closes after a 421
                client = None
            self._pause(outcome.attempts)
        return client

    @staticmethod
    def _pause(attempt: int) -> None:
        time.sleep(min(0.1 * attempt, 0.5) + random.uniform(0, 0.1))


def _close(client: smtplib.SMTP, polite: bool) -> None:
    try:
        if polite:
            client.quit()
        else:
            client.close()
    except OSError:
        client.close()


# -- faults -----------------------------------------------------------------------------


@attrs.frozen
class Fault:
    """One injected fault: ``name``, run once the load has settled the fraction ``at``
    of its messages.  ``window``: it may leave a message accepted by the next hop
    whose 250 never reaches the client (smtpguard or the next hop dies, or the next
    hop answers the end of data too late), the window SMTP itself cannot close.
    ``cuts``: the next hop dies and may leave the dump of an unfinished message."""

    name: str
    at: float
    action: Callable[[], None]
    window: bool = False
    cuts: bool = False


@attrs.frozen
class Injected:
    fault: Fault
    settled: int  # messages settled when it started
    began: float  # wall-clock time, comparable with file modification times
    ended: float

    def near(self, moment: float, before: float, after: float) -> bool:
        return self.began - before <= moment <= self.ended + after


def inject(load: Load, faults: Iterable[Fault], count: int, timeout: float) -> list[Injected]:
    """Run each fault once the load has settled its share of the messages (or the
    timeout has passed); the record of what was done and when."""
    done = []
    for fault in faults:
        load.wait_for(int(fault.at * count), timeout)
        settled, began = load.settled, time.time()
        fault.action()
        done.append(Injected(fault, settled, began, time.time()))
    return done


# -- what arrived ------------------------------------------------------------------------


@attrs.frozen
class Dump:
    """One file smtp-sink wrote."""

    path: Path
    test_id: str | None
    complete: bool  # ends with the message's last line: not cut off by a killed sink
    status: tuple[str, ...]  # every X-Virus-Status value in the header section
    scanned: tuple[str, ...]  # every X-Virus-Scanned value in the header section
    intact: bool  # the message as sent follows smtpguard's headers, byte for byte
    mtime: float


def read_dumps(directory: Path, messages: dict[str, bytes]) -> list[Dump]:
    dumps = []
    for path in sorted(directory.iterdir()):
        if not path.is_file():
            continue
        data = path.read_bytes()
        header, _, _ = data.partition(b"\n\n")
        fields = _fields(header)
        ids = fields.get("x-test-id", [])
        test_id = ids[0] if len(ids) == 1 else None
        sent = messages.get(test_id or "")
        complete = test_id is not None and data.endswith(trailer(test_id).replace(b"\r\n", b"\n") + b"\n")
        intact = (
            sent is not None and data.partition(b"\nX-Virus-Status: clean\n")[2] == sent.replace(b"\r\n", b"\n") + b"\n"
        )
        dumps.append(
            Dump(
                path,
                test_id,
                complete,
                tuple(fields.get("x-virus-status", [])),
                tuple(fields.get("x-virus-scanned", [])),
                intact,
                path.stat().st_mtime,
            )
        )
    return dumps


def _fields(header: bytes) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for line in header.decode("utf-8", "replace").split("\n"):
        if line[:1] in (" ", "\t") or ":" not in line:
            continue
        name, _, value = line.partition(":")
        fields.setdefault(name.strip().lower(), []).append(value.strip())
    return fields


def first_near(moment: float, injected: Iterable[Injected], before: float, after: float) -> Injected | None:
    """The first of ``injected`` that ``moment`` falls near (see Injected.near)."""
    return next((fault for fault in injected if fault.near(moment, before, after)), None)


# -- the report ---------------------------------------------------------------------------


def summary(
    load: Load, dumps: list[Dump], injected: list[Injected], duplicates: dict[str, int], blamed: Counter[str]
) -> str:
    """The table printed at the end: what the client heard, what arrived, the faults
    (with the extra copies each one explains)."""
    outcomes = load.outcomes.values()
    finals = Counter(outcome.final for outcome in outcomes)
    transient: Counter[str] = Counter()
    connection: Counter[str] = Counter()
    for outcome in outcomes:
        transient.update(outcome.transient)
        connection.update(outcome.connection_errors)
    permanent = sorted((code, n) for code, n in finals.items() if code is not None and code >= 500)
    rows = [
        ("messages sent", str(len(load.outcomes))),
        ("  of them infected", str(sum(outcome.infected for outcome in outcomes))),
        ("concurrency", str(load.concurrency)),
        ("attempts", str(sum(outcome.attempts for outcome in outcomes))),
        ("250 (final)", str(finals[250])),
        ("5xx (final)", ", ".join(f"{code}: {n}" for code, n in permanent) or "none"),
        ("unsettled", str(finals[None])),
        ("4xx heard (retried)", ", ".join(f"{key}: {n}" for key, n in sorted(transient.items())) or "none"),
        ("connections lost/refused", ", ".join(f"{key}: {n}" for key, n in sorted(connection.items())) or "none"),
        ("messages retried", str(sum(outcome.attempts > 1 for outcome in outcomes))),
        ("dump files", str(len(dumps))),
        ("  cut off (next hop killed)", str(sum(not dump.complete for dump in dumps))),
        ("duplicates (extra copies)", str(sum(duplicates.values()))),
        ("elapsed", f"{load.elapsed:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = ["", "fault-injection summary", *(f"  {name:<{width}}  {value}" for name, value in rows), "  faults:"]
    for done in injected:
        extra = f", {blamed[done.fault.name]} duplicates" if blamed[done.fault.name] else ""
        took = done.ended - done.began
        lines.append(f"    {done.fault.name:<30} at {done.settled:>5} settled, took {took:4.1f} s{extra}")
    return "\n".join(lines)
