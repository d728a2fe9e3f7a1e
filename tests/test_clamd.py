"""The clamd scanner: the pure reading of clamd's replies, the INSTREAM client and
its endpoint pool driven with StringTransport and Clock, the plugin's
configuration, and a real clamd, alone and through the proxy."""

from __future__ import annotations

import io
import smtplib
import zipfile
from collections.abc import Iterator
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, threads
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smtpguard import config as configuration
from smtpguard import replies, tap
from smtpguard.config import ConfigError
from smtpguard.envelope import Client, Envelope
from smtpguard.interfaces import IScanner, IScannerFactory
from smtpguard.plugins.clamd import clamd as clamd_plugin
from smtpguard.registry import build_scanner, factories
from smtpguard.results import ErrorKind, ScanResult, SizeLimit, Threat
from smtpguard.scanners import clamd_protocol as wire
from smtpguard.scanners.clamd import ClamdScanner, ClamdSettings
from smtpguard.spool import Message, Spool
from tests.conftest import SmtpSink
from tests.engines import EICAR, EICAR_SIGNATURE, Clamd

ENVELOPE = Envelope(Client("192.0.2.1", 4321, helo="client.example"), "alice@example.org")
CLAMD_EICAR = f"{EICAR_SIGNATURE}.UNOFFICIAL"
CLEAN = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: hello\r\n\r\nHello Bob.\r\n"


_OPEN: list[Message] = []


def message(data: bytes) -> Message:
    spool = Spool(0)
    spool.write(data)
    return opened(spool.finish())


def opened(made: Message) -> Message:
    """``made``, to be closed after the test (big ones hold a temporary file)."""
    _OPEN.append(made)
    return made


@pytest.fixture(autouse=True)
def close_messages() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def reply(data: bytes) -> ScanResult:
    return wire.classify(wire.split_reply(data), "clamd")


def failed(kind: ErrorKind, detail: str) -> ScanResult:
    return ScanResult.failed(kind, detail, "clamd")


def infected(*names: str) -> ScanResult:
    return ScanResult.infected(tuple(Threat(name) for name in names), "clamd")


CLEAN_RESULT = ScanResult.clean("clamd")


# -- 1. clamd's replies (pure) ---------------------------------------------------------


def test_stream_ok_alone_is_clean() -> None:
    """``stream: OK`` is the only clean answer."""
    assert reply(b"stream: OK\0") == CLEAN_RESULT


def test_found_is_infected_with_the_threat_name() -> None:
    """``stream: NAME FOUND`` is infected with NAME."""
    assert reply(b"stream: Win.Test.EICAR_HDB-1 FOUND\0") == infected("Win.Test.EICAR_HDB-1")


def test_every_found_line_is_a_threat() -> None:
    """With ALLMATCHSCAN or HeuristicScanPrecedence clamd sends one FOUND line per
    match: all of them are named, in order."""
    assert reply(b"stream: A.One FOUND\0stream: B.Two FOUND\0") == infected("A.One", "B.Two")


def test_real_threat_wins_over_a_limit_alert() -> None:
    """A virus and a limit alert in one answer: infected, with the virus only."""
    data = b"stream: Heuristics.Limits.Exceeded.MaxFiles FOUND\0stream: Real.Virus FOUND\0"
    assert reply(data) == infected("Real.Virus")


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("Heuristics.Limits.Exceeded.MaxRecursion", ErrorKind.DECOMPRESS_LAYER),
        ("Heuristics.Limits.Exceeded.MaxFiles", ErrorKind.DECOMPRESS_LAYER),
        ("Heuristics.Limits.Exceeded.MaxFileSize", ErrorKind.CONTENT_SIZE),
        ("Heuristics.Limits.Exceeded.MaxScanSize", ErrorKind.CONTENT_SIZE),
        ("Heuristics.Limits.Exceeded.MaxScanTime", ErrorKind.TIMEOUT),
        ("Heuristics.Limits.Exceeded.MaxPartitions", ErrorKind.DECOMPRESS_LAYER),
        ("Heuristics.Encrypted.Zip", ErrorKind.PASSWORD_PROTECTED),
        ("Heuristics.Encrypted.PDF", ErrorKind.PASSWORD_PROTECTED),
        ("Heuristics.Broken.Executable", ErrorKind.CORRUPT_FILE),
        ("Heuristics.Broken.Media.PNG.EOFReachedOutsideOfChunk", ErrorKind.CORRUPT_FILE),
    ],
)
def test_heuristic_alerts_that_mean_not_scanned_are_errors(name: str, kind: ErrorKind) -> None:
    """Limit, encryption and broken-file alerts are scan errors of their kind, with
    the alert's name as the detail, never threats."""
    assert reply(f"stream: {name} FOUND\0".encode()) == failed(kind, name)


def test_other_heuristics_are_threats() -> None:
    """Phishing, macros and the like are what the deployer asked clamd to find."""
    assert reply(b"stream: Heuristics.Phishing.Email.SpoofedDomain FOUND\0") == infected(
        "Heuristics.Phishing.Email.SpoofedDomain"
    )


@pytest.mark.parametrize(
    ("data", "kind", "detail"),
    [
        (b"INSTREAM size limit exceeded. ERROR\0", ErrorKind.CONTENT_SIZE, "INSTREAM size limit exceeded."),
        (b"stream: Exceeded max scan size ERROR\0", ErrorKind.CONTENT_SIZE, "Exceeded max scan size"),
        (b"stream: Exceeded max recursion depth ERROR\0", ErrorKind.DECOMPRESS_LAYER, "Exceeded max recursion depth"),
        (b"stream: Exceeded max scan files ERROR\0", ErrorKind.DECOMPRESS_LAYER, "Exceeded max scan files"),
        (b"stream: Exceeded time limit ERROR\0", ErrorKind.TIMEOUT, "Exceeded time limit"),
        (b"stream: Can't allocate memory ERROR\0", ErrorKind.OUT_OF_RESOURCES, "Can't allocate memory"),
        (b"stream: Can't create temporary file ERROR\0", ErrorKind.OUT_OF_RESOURCES, "Can't create temporary file"),
        (b"Error writing to temporary file ERROR\0", ErrorKind.OUT_OF_RESOURCES, "Error writing to temporary file"),
        (b"stream: Bad format or broken data ERROR\0", ErrorKind.CORRUPT_FILE, "Bad format or broken data"),
        (b"stream: Can't unpack some data ERROR\0", ErrorKind.CORRUPT_FILE, "Can't unpack some data"),
        (
            b"stream: Can't read file: corrupt archive ERROR\0",
            ErrorKind.CORRUPT_FILE,
            "Can't read file: corrupt archive",
        ),
        (b"stream: Broken pipe ERROR\0", ErrorKind.OTHER, "Broken pipe"),
        (b"COMMAND READ TIMED OUT ERROR\0", ErrorKind.TIMEOUT, "COMMAND READ TIMED OUT"),
    ],
)
def test_error_replies_are_classified_by_their_text(data: bytes, kind: ErrorKind, detail: str) -> None:
    """clamd's ERROR lines become the matching error kind, with clamd's text."""
    assert reply(data) == failed(kind, detail)


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (b"", "clamd closed the connection without a reply"),
        (b"stream: OK", "unexpected reply from clamd: b'stream: OK'"),
        (b"stream: OK\0garbage", "unexpected reply from clamd: b'garbage'"),
        (b"UNKNOWN COMMAND\0", "unexpected reply from clamd: 'UNKNOWN COMMAND'"),
        (b"stream: OK\0PONG\0", "unexpected reply from clamd: 'PONG'"),
        (b"stream:  FOUND\0", "unexpected reply from clamd: 'stream:  FOUND'"),
    ],
)
def test_anything_else_is_an_error_never_clean(data: bytes, detail: str) -> None:
    """An empty, unterminated, unknown or partly unknown answer is an ``other``
    error, even next to ``stream: OK``."""
    assert reply(data) == failed(ErrorKind.OTHER, detail)


@pytest.mark.parametrize(
    ("value", "size"), [(26214400, 26214400), ("25M", 26214400), ("512K", 524288), ("1m", 1048576), ("100", 100)]
)
def test_sizes_are_read_as_clamd_conf_writes_them(value: int | str, size: int) -> None:
    """Plain byte counts and K/M suffixes, as in clamd.conf."""
    assert wire.parse_size(value) == size


@pytest.mark.parametrize("value", ["25G", "lots", "", "-1", True])
def test_other_sizes_are_refused(value: Any) -> None:
    """Anything else is a ValueError."""
    with pytest.raises(ValueError):
        wire.parse_size(value)


# -- 2. the client, driven with StringTransport and Clock ------------------------------


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Connects a protocol to a StringTransport at once, refuses, or hangs."""

    def __init__(self, mode: str = "connect") -> None:
        self.mode = mode
        self.connections: list[tuple[Protocol, StringTransport]] = []
        self.attempts = 0

    def connect(self, factory: Factory) -> Deferred[Protocol]:
        self.attempts += 1
        if self.mode == "refuse":
            return defer.fail(ConnectionRefusedError())
        if self.mode == "missing":
            return defer.fail(ConnectError(osError="2: No such file or directory"))
        if self.mode == "hang":
            return Deferred()
        protocol = factory.buildProtocol(None)
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return defer.succeed(protocol)

    @property
    def last(self) -> tuple[Protocol, StringTransport]:
        return self.connections[-1]

    def answer(self, data: bytes) -> None:
        """The last connection's clamd writes ``data`` and closes."""
        protocol, _ = self.last
        protocol.dataReceived(data)
        protocol.connectionLost(Failure(ConnectionDone()))

    def drain(self) -> None:
        """The transport sends all it is given, as long as the producer produces."""
        _, transport = self.last
        while transport.producer is not None:
            transport.producer.resumeProducing()


def scanner(*endpoints: FakeEndpoint, clock: Clock | None = None, **settings: Any) -> tuple[ClamdScanner, Clock]:
    """A scanner with a connection per scan (``keep_connections = 0``), unless the
    test keeps IDSESSION connections (section 3)."""
    settings.setdefault("keep_connections", 0)
    clock = clock or Clock()
    named = [(f"fake:{index}", endpoint) for index, endpoint in enumerate(endpoints)]
    return ClamdScanner(clock, named, ClamdSettings(**settings)), clock


def result_of(scanning: Deferred[ScanResult]) -> ScanResult:
    results: list[ScanResult] = []
    scanning.addCallback(results.append)
    assert results, "the scan has not ended"
    return results[0]


def framed(*chunks: bytes) -> bytes:
    return b"".join(len(chunk).to_bytes(4, "big") + chunk for chunk in chunks) + b"\0\0\0\0"


def test_message_is_sent_as_instream_chunks_one_per_turn() -> None:
    """``zINSTREAM\\0``, then each chunk with its 4-byte big-endian length, written
    only when the transport asks for more; the zero-length chunk ends the stream
    in the same write as the last chunk."""
    endpoint = FakeEndpoint()
    clamd, _ = scanner(endpoint, chunk_size=4)
    clamd.scan(message(b"0123456789"), ENVELOPE)
    _, transport = endpoint.last

    assert transport.value() == b"zINSTREAM\0"
    assert transport.producer is not None and not transport.streaming
    transport.producer.resumeProducing()
    assert transport.value() == b"zINSTREAM\0" + b"\0\0\0\x040123"
    transport.producer.resumeProducing()
    assert transport.value() == b"zINSTREAM\0" + framed(b"0123", b"4567")[:-4]
    transport.producer.resumeProducing()
    assert transport.value() == b"zINSTREAM\0" + framed(b"0123", b"4567", b"89")
    assert transport.producer is None


def test_empty_message_is_only_the_end_of_stream() -> None:
    """A zero-byte message is sent as the zero-length chunk alone."""
    endpoint = FakeEndpoint()
    clamd, _ = scanner(endpoint)
    clamd.scan(message(b""), ENVELOPE)
    endpoint.drain()
    assert endpoint.last[1].value() == b"zINSTREAM\0\0\0\0\0"


def test_reply_after_close_is_the_result() -> None:
    """clamd's answer counts once clamd has closed the connection: clean here."""
    endpoint = FakeEndpoint()
    clamd, _ = scanner(endpoint)
    scanning = clamd.scan(message(CLEAN), ENVELOPE)
    endpoint.drain()
    protocol, _ = endpoint.last
    protocol.dataReceived(b"stream: OK\0")
    assert not scanning.called
    protocol.connectionLost(Failure(ConnectionDone()))
    assert result_of(scanning) == CLEAN_RESULT


def test_found_reply_is_infected() -> None:
    """``stream: NAME FOUND`` makes the scan infected with NAME."""
    endpoint = FakeEndpoint()
    clamd, _ = scanner(endpoint)
    scanning = clamd.scan(message(CLEAN), ENVELOPE)
    endpoint.drain()
    endpoint.answer(b"stream: Eicar-Signature FOUND\0")
    assert result_of(scanning) == infected("Eicar-Signature")


def test_reply_while_sending_stops_the_stream() -> None:
    """clamd answering and closing mid-stream (its size limit) ends the sending:
    no further chunk is read or written, and the answer is the result."""
    endpoint = FakeEndpoint()
    clamd, _ = scanner(endpoint, chunk_size=4)
    scanning = clamd.scan(message(b"0123456789"), ENVELOPE)
    _, transport = endpoint.last
    producer = transport.producer
    producer.resumeProducing()
    endpoint.answer(b"INSTREAM size limit exceeded. ERROR\0")
    producer.resumeProducing()
    assert transport.value() == b"zINSTREAM\0\0\0\0\x040123"
    assert result_of(scanning) == failed(ErrorKind.CONTENT_SIZE, "INSTREAM size limit exceeded.")


def test_closed_without_reply_is_an_error_and_marks_the_endpoint_down() -> None:
    """A connection closed with nothing said is an ``other`` error (never clean),
    and the endpoint is not used again until it answers PING."""
    endpoint = FakeEndpoint()
    clamd, _ = scanner(endpoint)
    scanning = clamd.scan(message(CLEAN), ENVELOPE)
    endpoint.drain()
    endpoint.answer(b"")
    assert result_of(scanning) == failed(ErrorKind.OTHER, "clamd closed the connection without a reply")
    assert not clamd.endpoints[0].up


def test_overlong_reply_is_an_error_and_aborts() -> None:
    """More than 64 KiB of reply is not clamd: ``other``, connection aborted."""
    endpoint = FakeEndpoint()
    clamd, _ = scanner(endpoint)
    scanning = clamd.scan(message(CLEAN), ENVELOPE)
    endpoint.drain()
    protocol, transport = endpoint.last
    protocol.dataReceived(b"x" * (wire.MAX_REPLY + 1))
    assert result_of(scanning) == failed(ErrorKind.OTHER, f"reply longer than {wire.MAX_REPLY} bytes")
    assert transport.disconnected


def test_message_over_stream_max_length_is_content_size_without_connecting() -> None:
    """A message bigger than stream_max_length is not sent at all."""
    endpoint = FakeEndpoint()
    clamd, _ = scanner(endpoint, stream_max_length=10)
    assert result_of(clamd.scan(message(b"x" * 11), ENVELOPE)) == failed(
        ErrorKind.CONTENT_SIZE, "11 bytes, more than stream_max_length (10)"
    )
    assert endpoint.attempts == 0


def test_message_of_exactly_stream_max_length_is_sent() -> None:
    """clamd refuses only what exceeds StreamMaxLength; so do we."""
    endpoint = FakeEndpoint()
    clamd, _ = scanner(endpoint, stream_max_length=10)
    clamd.scan(message(b"x" * 10), ENVELOPE)
    assert endpoint.attempts == 1


def test_clamd_size_limit_is_learned_for_that_endpoint() -> None:
    """After clamd refused N bytes, messages of N bytes or more are reported
    ``content-size`` without being sent there; smaller ones still are."""
    endpoint = FakeEndpoint()
    clamd, _ = scanner(endpoint, chunk_size=1000)
    clamd.scan(message(b"x" * 1000), ENVELOPE)
    endpoint.answer(b"INSTREAM size limit exceeded. ERROR\0")

    second = clamd.scan(message(b"y" * 1000), ENVELOPE)
    assert result_of(second) == failed(ErrorKind.CONTENT_SIZE, "clamd's StreamMaxLength is below 1000 bytes")
    assert endpoint.attempts == 1
    clamd.scan(message(b"z" * 999), ENVELOPE)
    assert endpoint.attempts == 2


def test_refused_connection_is_engine_not_ready() -> None:
    """Nothing listens: ``engine-not-ready`` naming the endpoint and the error."""
    clamd, _ = scanner(FakeEndpoint("refuse"))
    assert result_of(clamd.scan(message(CLEAN), ENVELOPE)) == failed(
        ErrorKind.ENGINE_NOT_READY, "fake:0: Connection was refused by other side."
    )


def test_missing_socket_is_engine_not_ready() -> None:
    """A unix socket path that does not exist: ``engine-not-ready``."""
    clamd, _ = scanner(FakeEndpoint("missing"))
    assert result_of(clamd.scan(message(CLEAN), ENVELOPE)) == failed(
        ErrorKind.ENGINE_NOT_READY, "fake:0: An error occurred while connecting: 2: No such file or directory."
    )


def test_failover_to_the_next_endpoint() -> None:
    """The first endpoint refuses: the same scan goes to the second."""
    dead, alive = FakeEndpoint("refuse"), FakeEndpoint()
    clamd, _ = scanner(dead, alive)
    scanning = clamd.scan(message(CLEAN), ENVELOPE)
    alive.drain()
    alive.answer(b"stream: OK\0")
    assert result_of(scanning) == CLEAN_RESULT
    assert [state.up for state in clamd.endpoints] == [False, True]


def test_endpoints_are_used_in_turn() -> None:
    """Round robin: scans alternate between two live endpoints."""
    first, second = FakeEndpoint(), FakeEndpoint()
    clamd, _ = scanner(first, second)
    for _ in range(4):
        clamd.scan(message(CLEAN), ENVELOPE)
    assert (first.attempts, second.attempts) == (2, 2)
    assert [state.scans for state in clamd.endpoints] == [2, 2]


def test_endpoint_down_is_skipped_until_ping_answers() -> None:
    """A failed endpoint gets no scans; after health_check_interval it is PINGed,
    and once it answers PONG it takes its turn again."""
    flaky, steady = FakeEndpoint("refuse"), FakeEndpoint()
    clamd, clock = scanner(flaky, steady, health_check_interval=5)
    clamd.scan(message(CLEAN), ENVELOPE)
    for _ in range(3):
        clamd.scan(message(CLEAN), ENVELOPE)
    assert (flaky.attempts, steady.attempts) == (1, 4)

    flaky.mode = "connect"
    clock.advance(5)
    protocol, transport = flaky.last
    assert transport.value() == b"zPING\0"
    protocol.dataReceived(b"PONG\0")
    assert transport.disconnecting
    assert clamd.endpoints[0].up

    for _ in range(2):
        clamd.scan(message(CLEAN), ENVELOPE)
    assert (flaky.attempts, steady.attempts) == (3, 5)
    clock.advance(5)
    assert flaky.attempts == 3  # all up: no more PINGs


def test_failed_ping_keeps_the_endpoint_down_and_checks_again() -> None:
    """No PONG: the endpoint stays down and is PINGed again an interval later."""
    endpoint, other = FakeEndpoint("refuse"), FakeEndpoint()
    clamd, clock = scanner(endpoint, other, health_check_interval=5)
    clamd.scan(message(CLEAN), ENVELOPE)
    clock.advance(5)
    assert endpoint.attempts == 2 and not clamd.endpoints[0].up
    clock.advance(5)
    assert endpoint.attempts == 3 and not clamd.endpoints[0].up


def test_ping_without_answer_fails_at_the_interval() -> None:
    """A PING that gets no answer (a stalled clamd) fails after at most the check
    interval, with the connection aborted, and the endpoint stays down."""
    endpoint, other = FakeEndpoint("refuse"), FakeEndpoint()
    clamd, clock = scanner(endpoint, other, health_check_interval=5)
    clamd.scan(message(CLEAN), ENVELOPE)
    endpoint.mode = "connect"
    clock.advance(5)
    _, transport = endpoint.last
    clock.advance(5)
    assert transport.disconnected
    assert not clamd.endpoints[0].up
    assert clamd.endpoints[0].last_error == "no PONG within 5 s"


def test_all_endpoints_down_are_pinged_on_demand() -> None:
    """When no endpoint is up, a scan PINGs them at once instead of failing, and
    uses one that answers."""
    endpoint = FakeEndpoint("refuse")
    clamd, _ = scanner(endpoint)
    assert result_of(clamd.scan(message(CLEAN), ENVELOPE)).error is ErrorKind.ENGINE_NOT_READY

    endpoint.mode = "connect"
    scanning = clamd.scan(message(CLEAN), ENVELOPE)
    ping, _ = endpoint.last
    ping.dataReceived(b"PONG\0")
    endpoint.drain()
    endpoint.answer(b"stream: OK\0")
    assert result_of(scanning) == CLEAN_RESULT


def test_check_health_on_demand_brings_endpoints_back() -> None:
    """``check_health()`` PINGs the endpoints that are down, now."""
    endpoint, other = FakeEndpoint("refuse"), FakeEndpoint()
    clamd, _ = scanner(endpoint, other)
    clamd.scan(message(CLEAN), ENVELOPE)
    endpoint.mode = "connect"
    checked = clamd.check_health()
    protocol, _ = endpoint.last
    protocol.dataReceived(b"PONG\0")
    assert checked.called
    assert clamd.endpoints[0].up


def test_stalled_clamd_is_a_timeout_at_the_deadline() -> None:
    """No reply: at ``timeout`` seconds (not before) the scan ends as ``timeout``,
    the connection is aborted and the endpoint is marked down."""
    endpoint = FakeEndpoint()
    clamd, clock = scanner(endpoint, timeout=60)
    scanning = clamd.scan(message(CLEAN), ENVELOPE)
    endpoint.drain()
    clock.advance(59.9)
    assert not scanning.called
    clock.advance(0.1)
    assert result_of(scanning) == failed(ErrorKind.TIMEOUT, "no verdict within 60 s")
    assert endpoint.last[1].disconnected
    assert not clamd.endpoints[0].up


def test_hanging_connect_is_a_timeout() -> None:
    """A connection attempt that never completes is a ``timeout`` at the deadline."""
    clamd, clock = scanner(FakeEndpoint("hang"), timeout=3)
    scanning = clamd.scan(message(CLEAN), ENVELOPE)
    clock.advance(3)
    assert result_of(scanning) == failed(ErrorKind.TIMEOUT, "no verdict within 3 s")


def test_close_cancels_the_health_checks() -> None:
    """``close()`` cancels the next health check and fires at once; a scan that
    fails afterwards schedules none."""
    clamd, clock = scanner(FakeEndpoint("refuse"))
    assert result_of(clamd.scan(message(CLEAN), ENVELOPE)).error is ErrorKind.ENGINE_NOT_READY
    assert [call.getTime() for call in clock.getDelayedCalls()] == [10.0]
    assert clamd.close().called
    assert clock.getDelayedCalls() == []
    assert result_of(clamd.scan(message(CLEAN), ENVELOPE)).error is ErrorKind.ENGINE_NOT_READY
    assert clock.getDelayedCalls() == []


def test_close_aborts_a_ping_under_way() -> None:
    """A PING waiting for its PONG when the scanner closes is aborted, and its
    timeout cancelled: nothing is left scheduled."""
    endpoint, other = FakeEndpoint("refuse"), FakeEndpoint()
    clamd, clock = scanner(endpoint, other, health_check_interval=5)
    scanning = clamd.scan(message(CLEAN), ENVELOPE)
    other.drain()
    other.answer(b"stream: OK\0")
    assert result_of(scanning) == CLEAN_RESULT
    endpoint.mode = "connect"
    clock.advance(5)
    _, transport = endpoint.last
    assert transport.value() == b"zPING\0"
    assert clamd.close().called
    assert transport.disconnected
    assert clock.getDelayedCalls() == []


def test_max_size_is_stream_max_length() -> None:
    """The largest message the scanner takes is its stream_max_length, with the
    key that sets it and clamd.conf's setting that must match."""
    clamd, _ = scanner(FakeEndpoint(), stream_max_length=1000)
    assert clamd.max_size == SizeLimit(1000, "stream_max_length", "together with StreamMaxLength in clamd.conf")


def test_scanner_provides_iscanner() -> None:
    """The scanner is an IScanner named ``clamd``."""
    clamd, _ = scanner(FakeEndpoint())
    assert verifyObject(IScanner, clamd)
    assert clamd.name == "clamd"


# -- 2b. IDSESSION: one connection for many scans ----------------------------------------


def sessions(*endpoints: FakeEndpoint, **settings: Any) -> tuple[ClamdScanner, Clock]:
    """A scanner that keeps its IDSESSION connections (two by default)."""
    settings.setdefault("keep_connections", 2)
    return scanner(*endpoints, **settings)


def scanned_in_session(endpoint: FakeEndpoint, clamd: ClamdScanner, request: int) -> ScanResult:
    """One clean message scanned over ``endpoint``'s last connection, answered as
    clamd answers request number ``request`` of its session."""
    scanning = clamd.scan(message(CLEAN), ENVELOPE)
    endpoint.drain()
    protocol, _ = endpoint.last
    protocol.dataReceived(b"%d: stream: OK\0" % request)
    return result_of(scanning)


def test_session_starts_with_idsession_and_frames_each_scan_as_instream() -> None:
    """A new connection says ``zIDSESSION\\0``, then ``zINSTREAM\\0`` and the chunks
    as without a session, all in one write for a small message."""
    endpoint = FakeEndpoint()
    clamd, _ = sessions(endpoint)
    clamd.scan(message(b"0123456789"), ENVELOPE)
    endpoint.drain()
    assert endpoint.last[1].value() == b"zIDSESSION\0zINSTREAM\0" + framed(b"0123456789")


def test_clean_scans_share_one_connection() -> None:
    """Three clean scans in turn: one connection, one ``zINSTREAM`` after another on
    it, each answer ``N: stream: OK`` clean; the connection stays open."""
    endpoint = FakeEndpoint()
    clamd, _ = sessions(endpoint)
    results = [scanned_in_session(endpoint, clamd, request) for request in (1, 2, 3)]
    assert results == [CLEAN_RESULT] * 3
    _, transport = endpoint.last
    instream = b"zINSTREAM\0" + framed(CLEAN)
    assert transport.value() == b"zIDSESSION\0" + instream * 3
    assert not transport.disconnecting
    assert (endpoint.attempts, clamd.endpoints[0].connections, clamd.endpoints[0].scans) == (1, 1, 3)


def test_found_ends_the_session_and_every_line_counts() -> None:
    """A FOUND answer ends the session (``zEND\\0``); every line clamd sends until
    it closes is read, without its request number; the next scan connects anew."""
    endpoint = FakeEndpoint()
    clamd, _ = sessions(endpoint)
    assert scanned_in_session(endpoint, clamd, 1) == CLEAN_RESULT
    scanning = clamd.scan(message(CLEAN), ENVELOPE)
    endpoint.drain()
    protocol, transport = endpoint.last
    protocol.dataReceived(b"2: stream: A.One FOUND\0")
    assert transport.value().endswith(b"zEND\0")
    assert not scanning.called
    protocol.dataReceived(b"2: stream: B.Two FOUND\0")
    protocol.connectionLost(Failure(ConnectionDone()))
    assert result_of(scanning) == infected("A.One", "B.Two")
    assert scanned_in_session(endpoint, clamd, 1) == CLEAN_RESULT
    assert endpoint.attempts == 2


def test_answer_with_another_request_number_is_never_clean() -> None:
    """``2: stream: OK`` for request 1 is not an answer to it: an ``other`` error."""
    endpoint = FakeEndpoint()
    clamd, _ = sessions(endpoint)
    scanning = clamd.scan(message(CLEAN), ENVELOPE)
    endpoint.drain()
    endpoint.answer(b"2: stream: OK\0")
    assert result_of(scanning) == failed(ErrorKind.OTHER, "unexpected reply from clamd: '2: stream: OK'")


def test_kept_session_closed_unanswered_is_scanned_again_on_a_new_connection() -> None:
    """clamd ends a kept session as the next message goes out (closed, nothing
    said): the message is sent once more, on a new connection, and its answer
    counts; the endpoint stays up."""
    endpoint = FakeEndpoint()
    clamd, _ = sessions(endpoint)
    assert scanned_in_session(endpoint, clamd, 1) == CLEAN_RESULT
    scanning = clamd.scan(message(CLEAN + EICAR), ENVELOPE)
    endpoint.drain()
    endpoint.last[0].connectionLost(Failure(ConnectionDone()))
    assert endpoint.attempts == 2
    endpoint.drain()
    assert endpoint.last[1].value() == b"zIDSESSION\0zINSTREAM\0" + framed(CLEAN + EICAR)
    endpoint.answer(b"1: stream: Eicar-Signature FOUND\0")
    assert result_of(scanning) == infected("Eicar-Signature")
    assert clamd.endpoints[0].up
    assert clamd.endpoints[0].scans == 2


def test_new_session_closed_unanswered_is_an_error_and_not_tried_again() -> None:
    """The new connection of that second try closes unanswered too: an ``other``
    error, the endpoint marked down, and no third try."""
    endpoint = FakeEndpoint()
    clamd, _ = sessions(endpoint)
    assert scanned_in_session(endpoint, clamd, 1) == CLEAN_RESULT
    scanning = clamd.scan(message(CLEAN), ENVELOPE)
    endpoint.drain()
    endpoint.last[0].connectionLost(Failure(ConnectionDone()))
    endpoint.drain()
    endpoint.answer(b"")
    assert result_of(scanning) == failed(ErrorKind.OTHER, "clamd closed the connection without a reply")
    assert endpoint.attempts == 2
    assert not clamd.endpoints[0].up


def test_second_try_that_cannot_connect_is_an_error_not_a_failover() -> None:
    """A message sent once and left unanswered goes nowhere else: when the new
    connection cannot be made, the scan is an ``other`` error, and the second
    endpoint never sees the message."""
    endpoint, other = FakeEndpoint(), FakeEndpoint()
    clamd, _ = sessions(endpoint, other)
    assert scanned_in_session(endpoint, clamd, 1) == CLEAN_RESULT
    assert scanned_in_session(other, clamd, 1) == CLEAN_RESULT
    scanning = clamd.scan(message(CLEAN), ENVELOPE)
    endpoint.drain()
    endpoint.mode = "refuse"
    endpoint.last[0].connectionLost(Failure(ConnectionDone()))
    assert result_of(scanning) == failed(ErrorKind.OTHER, "clamd closed the connection without a reply")
    assert other.attempts == 1 and other.last[1].value() == b"zIDSESSION\0zINSTREAM\0" + framed(CLEAN)


def test_kept_session_closed_while_idle_is_not_used() -> None:
    """A kept connection that clamd closes while idle is forgotten: the next scan
    connects anew and the old transport gets nothing more."""
    endpoint = FakeEndpoint()
    clamd, _ = sessions(endpoint)
    assert scanned_in_session(endpoint, clamd, 1) == CLEAN_RESULT
    protocol, transport = endpoint.last
    written = transport.value()
    protocol.connectionLost(Failure(ConnectionDone()))
    assert len(clamd.endpoints[0].kept or ()) == 0
    assert scanned_in_session(endpoint, clamd, 1) == CLEAN_RESULT
    assert endpoint.attempts == 2 and transport.value() == written


def test_kept_session_is_ended_after_keep_time() -> None:
    """A connection idle for ``keep_time`` seconds is ended with ``zEND\\0`` and
    closed; not a moment before."""
    endpoint = FakeEndpoint()
    clamd, clock = sessions(endpoint, keep_time=10)
    assert scanned_in_session(endpoint, clamd, 1) == CLEAN_RESULT
    _, transport = endpoint.last
    clock.advance(9.9)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.value().endswith(b"zEND\0") and transport.disconnecting
    assert clock.getDelayedCalls() == []


def test_at_most_keep_connections_are_kept() -> None:
    """Two scans at once take two connections; with ``keep_connections = 1`` the
    one answered last is ended, the other kept."""
    endpoint = FakeEndpoint()
    clamd, _ = sessions(endpoint, keep_connections=1)
    first = clamd.scan(message(CLEAN), ENVELOPE)
    second = clamd.scan(message(CLEAN), ENVELOPE)
    (one, one_transport), (two, two_transport) = endpoint.connections
    for _, transport in endpoint.connections:
        while transport.producer is not None:
            transport.producer.resumeProducing()
    one.dataReceived(b"1: stream: OK\0")
    two.dataReceived(b"1: stream: OK\0")
    assert result_of(first) == result_of(second) == CLEAN_RESULT
    assert not one_transport.disconnecting
    assert two_transport.value().endswith(b"zEND\0") and two_transport.disconnecting


def test_stalled_session_is_a_timeout_and_its_connection_aborted() -> None:
    """No answer on a kept connection: ``timeout`` at the deadline, the connection
    aborted (never kept) and the endpoint marked down."""
    endpoint = FakeEndpoint()
    clamd, clock = sessions(endpoint, timeout=60)
    assert scanned_in_session(endpoint, clamd, 1) == CLEAN_RESULT
    scanning = clamd.scan(message(CLEAN), ENVELOPE)
    endpoint.drain()
    clock.advance(60)
    assert result_of(scanning) == failed(ErrorKind.TIMEOUT, "no verdict within 60 s")
    assert endpoint.last[1].disconnected
    assert len(clamd.endpoints[0].kept or ()) == 0
    assert not clamd.endpoints[0].up


def test_session_answer_while_sending_stops_the_stream() -> None:
    """clamd's size limit hit mid-stream: no further chunk is written (clamd closes
    the session), and the answer is the result."""
    endpoint = FakeEndpoint()
    clamd, _ = sessions(endpoint, chunk_size=4)
    scanning = clamd.scan(message(b"0123456789"), ENVELOPE)
    protocol, transport = endpoint.last
    producer = transport.producer
    producer.resumeProducing()
    protocol.dataReceived(b"1: INSTREAM size limit exceeded. ERROR\0")
    producer.resumeProducing()
    assert transport.value() == b"zIDSESSION\0zINSTREAM\0\0\0\0\x040123"
    protocol.connectionLost(Failure(ConnectionDone()))
    assert result_of(scanning) == failed(ErrorKind.CONTENT_SIZE, "INSTREAM size limit exceeded.")


def test_session_overlong_answer_is_an_error_and_aborts() -> None:
    """More than 64 KiB without an answer's end: ``other``, connection aborted."""
    endpoint = FakeEndpoint()
    clamd, _ = sessions(endpoint)
    scanning = clamd.scan(message(CLEAN), ENVELOPE)
    endpoint.drain()
    protocol, transport = endpoint.last
    protocol.dataReceived(b"x" * (wire.MAX_REPLY + 1))
    assert result_of(scanning) == failed(ErrorKind.OTHER, f"reply longer than {wire.MAX_REPLY} bytes")
    assert transport.disconnected
    assert len(clamd.endpoints[0].kept or ()) == 0


def test_clamd_speaking_on_an_idle_session_ends_it() -> None:
    """Bytes from clamd on a kept connection with no scan under way are not clamd's
    protocol: the connection is aborted and not used again."""
    endpoint = FakeEndpoint()
    clamd, _ = sessions(endpoint)
    assert scanned_in_session(endpoint, clamd, 1) == CLEAN_RESULT
    protocol, transport = endpoint.last
    protocol.dataReceived(b"1: stream: OK\0")
    assert transport.disconnected
    assert scanned_in_session(endpoint, clamd, 1) == CLEAN_RESULT
    assert endpoint.attempts == 2


def test_close_ends_the_kept_sessions() -> None:
    """``close()`` ends every kept connection with ``zEND\\0``, and fires once
    they are gone."""
    endpoint = FakeEndpoint()
    clamd, clock = sessions(endpoint)
    assert scanned_in_session(endpoint, clamd, 1) == CLEAN_RESULT
    closed = clamd.close()
    protocol, transport = endpoint.last
    assert transport.value().endswith(b"zEND\0") and transport.disconnecting
    assert clock.getDelayedCalls() == []
    assert not closed.called
    protocol.connectionLost(Failure(ConnectionDone()))
    assert closed.called


def test_session_of_a_scan_under_way_at_close_is_ended_when_the_scan_ends() -> None:
    """A scan that goes on after ``close()`` keeps its answer; its connection is
    then ended at once with ``zEND\\0``, never kept with an idle timer."""
    endpoint = FakeEndpoint()
    clamd, clock = sessions(endpoint)
    scanning = clamd.scan(message(CLEAN), ENVELOPE)
    endpoint.drain()
    clamd.close()
    protocol, transport = endpoint.last
    protocol.dataReceived(b"1: stream: OK\0")
    assert result_of(scanning) == CLEAN_RESULT
    assert transport.value().endswith(b"zEND\0") and transport.disconnecting
    assert clock.getDelayedCalls() == []


# -- 3. the plugin and its configuration ------------------------------------------------


def test_plugin_is_found_by_name() -> None:
    """``type = "clamd"`` finds the bundled factory."""
    found = factories(IScannerFactory)["clamd"]
    assert found is clamd_plugin
    assert verifyObject(IScannerFactory, found)


def test_endpoint_string_and_defaults() -> None:
    """One endpoint string; timeout 60, stream_max_length 25 MiB, checks every 10 s."""
    built = clamd_plugin.build({"endpoint": "tcp:127.0.0.1:3310"}, Clock())
    assert [state.description for state in built.endpoints] == ["tcp:127.0.0.1:3310"]
    assert built._settings == ClamdSettings(60.0, 25 * 1024 * 1024, 10.0)


def test_default_endpoint_is_debians_socket() -> None:
    """No endpoint: Debian's clamav-daemon socket."""
    built = clamd_plugin.build({}, Clock())
    assert [state.description for state in built.endpoints] == ["unix:/run/clamav/clamd.ctl"]


def test_endpoints_list_and_settings() -> None:
    """``endpoints`` lists several; the other keys are read as documented."""
    config = {
        "endpoints": ["unix:/run/clamav/clamd.ctl", "tcp:10.0.0.2:3310"],
        "timeout": 5,
        "stream_max_length": "100M",
        "health_check_interval": 2.5,
    }
    built = clamd_plugin.build(config, Clock())
    assert [state.description for state in built.endpoints] == config["endpoints"]
    assert built._settings == ClamdSettings(5.0, 100 * 1024 * 1024, 2.5)


def test_kept_connections_are_configured() -> None:
    """``keep_connections`` and ``keep_time`` set the IDSESSION connections kept per
    endpoint (10 for 10 s by default); 0 gives every scan a connection of its own."""
    assert (ClamdSettings().keep_connections, ClamdSettings().keep_time) == (10, 10.0)
    built = clamd_plugin.build({"keep_connections": 3, "keep_time": 2.5}, Clock())
    assert (built._settings.keep_connections, built._settings.keep_time) == (3, 2.5)
    assert all(state.kept is not None for state in built.endpoints)
    alone = clamd_plugin.build({"keep_connections": 0}, Clock())
    assert [state.kept for state in alone.endpoints] == [None]


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({"endpoint": "unix:/a", "endpoints": ["unix:/b"]}, "endpoints: give either endpoint or endpoints, not both"),
        ({"keep_connections": -1}, "keep_connections: must be 0 or more, got -1"),
        ({"keep_connections": "2"}, "keep_connections: expected an integer"),
        ({"keep_time": 0}, "keep_time: must be greater than 0, got 0.0"),
        ({"endpoints": []}, "endpoints: at least one endpoint is needed"),
        ({"endpoints": ["unix:/a", "unix:/a"]}, "endpoints: an endpoint is listed twice"),
        ({"endpoints": [3310]}, "endpoints: expected a list of strings, got [3310]"),
        ({"endpoint": 3310}, "endpoint: expected a string, got 3310"),
        ({"endpoint": "clamd:3310"}, "endpoint: bad client endpoint 'clamd:3310': "),
        ({"timeout": 0}, "timeout: must be greater than 0, got 0.0"),
        ({"health_check_interval": -1}, "health_check_interval: must be greater than 0, got -1.0"),
        ({"stream_max_length": "big"}, "stream_max_length: expected a size in bytes (26214400, or 25M"),
        ({"stream_max_length": 0}, "stream_max_length: must be greater than 0, got 0"),
        ({"stream_max_length": 1.5}, "stream_max_length: expected a size in bytes"),
        ({"url": "icap://x"}, "url: unknown key"),
    ],
)
def test_bad_configuration_names_the_key(config: dict[str, Any], error: str) -> None:
    """Every mistake is a ConfigError that starts with the key."""
    with pytest.raises(ConfigError) as raised:
        clamd_plugin.build(config, Clock())
    assert str(raised.value).startswith(error)


def test_registry_builds_it_from_a_scanners_table() -> None:
    """A ``[[scanners]]`` table with ``type = "clamd"`` builds a ClamdScanner; an
    error names the file and the table."""
    built = build_scanner({"type": "clamd", "endpoint": "unix:/tmp/c.sock"}, Clock(), "f.toml: scanners[0]")
    assert isinstance(built, ClamdScanner)
    with pytest.raises(ConfigError, match=r"^f\.toml: scanners\[0\]\.timeout: must be greater than 0"):
        build_scanner({"type": "clamd", "timeout": -1}, Clock(), "f.toml: scanners[0]")


# -- 4. a real clamd -------------------------------------------------------------------


@pytest.fixture
def built() -> Iterator[list[ClamdScanner]]:
    """Scanners a test builds on the real reactor; their health checks stop at teardown."""
    scanners: list[ClamdScanner] = []
    yield scanners
    for one in scanners:
        one.close()


def real(built: list[ClamdScanner], **config: Any) -> ClamdScanner:
    made = clamd_plugin.build(config, reactor)
    built.append(made)
    return made


def mail(body: str = "Hello Bob.", attachment: tuple[bytes, str, str, str] | None = None) -> bytes:
    """A message as a client would send it (CRLF), with an optional attachment
    (data, maintype, subtype, filename) that the email package encodes in base64."""
    email = EmailMessage()
    email["From"] = "alice@example.org"
    email["To"] = "bob@example.net"
    email["Subject"] = "test"
    email.set_content(body)
    if attachment is not None:
        data, maintype, subtype, filename = attachment
        email.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return email.as_bytes(policy=SMTP)


def zipped(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


@pytest_twisted.ensureDeferred
async def test_real_clean_message(clamd: Clamd, built: list[ClamdScanner]) -> None:
    """clamd finds nothing in a plain message: clean."""
    result = await real(built, endpoint=clamd.unix_endpoint).scan(message(mail()), ENVELOPE)
    assert result == CLEAN_RESULT


@pytest_twisted.ensureDeferred
async def test_real_eicar_in_the_body(clamd: Clamd, built: list[ClamdScanner]) -> None:
    """The EICAR string in a text body: infected, with clamd's name for it."""
    data = CLEAN + EICAR + b"\r\n"
    result = await real(built, endpoint=clamd.unix_endpoint).scan(message(data), ENVELOPE)
    assert result == infected(CLAMD_EICAR)


@pytest_twisted.ensureDeferred
async def test_real_eicar_as_base64_attachment(clamd: Clamd, built: list[ClamdScanner]) -> None:
    """EICAR as a base64 attachment (the raw string is nowhere in the message):
    clamd decodes the mail itself and finds it."""
    data = mail(attachment=(EICAR, "application", "octet-stream", "eicar.com"))
    assert EICAR not in data and b"Content-Transfer-Encoding: base64" in data
    result = await real(built, endpoint=clamd.unix_endpoint).scan(message(data), ENVELOPE)
    assert result == infected(CLAMD_EICAR)


@pytest_twisted.ensureDeferred
async def test_real_eicar_in_a_zip_attachment(clamd: Clamd, built: list[ClamdScanner]) -> None:
    """EICAR inside a deflated zip, attached in base64: clamd finds it."""
    data = mail(attachment=(zipped("eicar.com", EICAR * 3), "application", "zip", "eicar.zip"))
    result = await real(built, endpoint=clamd.tcp_endpoint).scan(message(data), ENVELOPE)
    assert result == infected(CLAMD_EICAR)


@pytest_twisted.ensureDeferred
async def test_real_big_message_is_streamed_whole(clamd: Clamd, built: list[ClamdScanner]) -> None:
    """An 8 MB message from a file-backed spool, EICAR in its last line: all of
    it reaches clamd, which finds it."""
    spool = Spool(0, memory_limit=64 * 1024)
    spool.write(CLEAN)
    line = b"%07d The quick brown fox jumps over the lazy dog, again and again.\r\n"
    for index in range(8_000_000 // len(line % 0)):
        spool.write(line % index)
    spool.write(EICAR + b"\r\n")
    result = await real(built, endpoint=clamd.unix_endpoint).scan(opened(spool.finish()), ENVELOPE)
    assert result == infected(CLAMD_EICAR)


@pytest_twisted.ensureDeferred
async def test_real_stopped_clamd_is_engine_not_ready_and_comes_back(tmp_path: Path, built: list[ClamdScanner]) -> None:
    """clamd not running: both its endpoints fail (socket gone, port refused) and
    the scan is ``engine-not-ready``; once clamd runs again the periodic health
    check (every 0.2 s here) PINGs both back up and scans work."""
    engine = Clamd(tmp_path)
    engine.start()
    engine.stop()
    scanner = real(built, endpoints=[engine.unix_endpoint, engine.tcp_endpoint], health_check_interval=0.2)
    try:
        result = await scanner.scan(message(CLEAN), ENVELOPE)
        assert result.error is ErrorKind.ENGINE_NOT_READY
        assert result.detail == (
            f"{engine.unix_endpoint}: An error occurred while connecting: 2: No such file or directory.; "
            f"{engine.tcp_endpoint}: Connection was refused by other side: 111: Connection refused."
        )
        await threads.deferToThread(engine.start)
        for _ in range(100):
            if all(state.up for state in scanner.endpoints):
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        assert [state.up for state in scanner.endpoints] == [True, True]
        assert await scanner.scan(message(CLEAN + EICAR), ENVELOPE) == infected(CLAMD_EICAR)
    finally:
        engine.stop()


@pytest_twisted.ensureDeferred
async def test_real_stalled_clamd_is_a_timeout(tmp_path: Path, built: list[ClamdScanner]) -> None:
    """clamd stopped with SIGSTOP (connections accepted, never answered): the scan
    ends as ``timeout`` by the 1 s deadline (when exactly it fires is
    test_stalled_clamd_is_a_timeout_at_the_deadline, on a Clock)."""
    engine = Clamd(tmp_path)
    engine.start()
    engine.pause()
    try:
        result = await real(built, endpoint=engine.unix_endpoint, timeout=1).scan(message(CLEAN), ENVELOPE)
        assert result == failed(ErrorKind.TIMEOUT, "no verdict within 1 s")
    finally:
        engine.resume()
        engine.stop()


@pytest_twisted.ensureDeferred
async def test_real_stream_max_length_is_checked_before_sending(clamd: Clamd, built: list[ClamdScanner]) -> None:
    """Over our stream_max_length: ``content-size``, and clamd never hears of it."""
    scanner = real(built, endpoint=clamd.unix_endpoint, stream_max_length="1K")
    result = await scanner.scan(message(CLEAN + b"x" * 1024), ENVELOPE)
    assert result == failed(ErrorKind.CONTENT_SIZE, f"{len(CLEAN) + 1024} bytes, more than stream_max_length (1024)")
    assert scanner.endpoints[0].scans == 0


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest_twisted.ensureDeferred
async def test_real_clamd_size_limit_is_content_size(tmp_path: Path, built: list[ClamdScanner], transport: str) -> None:
    """Our limit at 10M, clamd's StreamMaxLength at 1M: clamd's own "INSTREAM size
    limit exceeded" for a 2 MB message becomes ``content-size``."""
    engine = Clamd(tmp_path, stream_max_length="1M")
    engine.start()
    try:
        endpoint = engine.unix_endpoint if transport == "unix" else engine.tcp_endpoint
        scanner = real(built, endpoint=endpoint, stream_max_length="10M")
        result = await scanner.scan(message(CLEAN + b"x" * 2_000_000), ENVELOPE)
        assert result == failed(ErrorKind.CONTENT_SIZE, "INSTREAM size limit exceeded.")
        assert scanner.endpoints[0].up
    finally:
        engine.stop()


@pytest_twisted.ensureDeferred
async def test_real_failover_from_a_dead_endpoint(clamd: Clamd, built: list[ClamdScanner], tmp_path: Path) -> None:
    """First endpoint a socket nobody listens on, second the real clamd: the scan
    fails over and finds EICAR; the dead one is marked down."""
    scanner = real(built, endpoints=[f"unix:{tmp_path / 'nobody.sock'}", clamd.unix_endpoint])
    result = await scanner.scan(message(CLEAN + EICAR), ENVELOPE)
    assert result == infected(CLAMD_EICAR)
    assert [(state.up, state.scans) for state in scanner.endpoints] == [(False, 0), (True, 1)]


@pytest_twisted.ensureDeferred
async def test_real_scans_share_one_idsession_connection(clamd: Clamd, built: list[ClamdScanner]) -> None:
    """Five clean scans in turn go over one IDSESSION connection; an infected one
    ends that session, and the next scan opens a second connection."""
    scanner = real(built, endpoint=clamd.unix_endpoint)
    for _ in range(5):
        assert await scanner.scan(message(mail()), ENVELOPE) == CLEAN_RESULT
    assert (scanner.endpoints[0].connections, scanner.endpoints[0].scans) == (1, 5)
    assert await scanner.scan(message(CLEAN + EICAR), ENVELOPE) == infected(CLAMD_EICAR)
    assert await scanner.scan(message(mail()), ENVELOPE) == CLEAN_RESULT
    assert scanner.endpoints[0].connections == 2


@pytest_twisted.ensureDeferred
async def test_real_restarted_clamd_session_is_tried_again_on_a_new_connection(
    tmp_path: Path, built: list[ClamdScanner]
) -> None:
    """clamd restarted while a session connection is kept, and the next message
    sent on it before the close is seen (clamd is restarted without the reactor
    running): the message goes once more on a new connection, and is scanned."""
    engine = Clamd(tmp_path)
    engine.start()
    try:
        scanner = real(built, endpoint=engine.unix_endpoint)
        assert await scanner.scan(message(mail()), ENVELOPE) == CLEAN_RESULT
        engine.stop()
        engine.start()
        assert len(scanner.endpoints[0].kept or ()) == 1  # its close not seen yet
        assert await scanner.scan(message(CLEAN + EICAR), ENVELOPE) == infected(CLAMD_EICAR)
        assert (scanner.endpoints[0].connections, scanner.endpoints[0].up) == (2, True)
    finally:
        engine.stop()


@pytest_twisted.ensureDeferred
async def test_real_session_closed_by_clamd_while_idle_is_not_used(tmp_path: Path, built: list[ClamdScanner]) -> None:
    """clamd stopped while a session connection is kept: the connection is
    forgotten as soon as it closes, and the scan after clamd's restart connects
    anew."""
    engine = Clamd(tmp_path)
    engine.start()
    try:
        scanner = real(built, endpoint=engine.unix_endpoint)
        assert await scanner.scan(message(mail()), ENVELOPE) == CLEAN_RESULT
        assert len(scanner.endpoints[0].kept or ()) == 1
        await threads.deferToThread(engine.stop)
        for _ in range(100):
            if not scanner.endpoints[0].kept:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        assert len(scanner.endpoints[0].kept or ()) == 0
        await threads.deferToThread(engine.start)
        assert await scanner.scan(message(mail()), ENVELOPE) == CLEAN_RESULT
        assert (scanner.endpoints[0].connections, scanner.endpoints[0].up) == (2, True)
    finally:
        engine.stop()


def instream_log_lines(engine: Clamd) -> list[str]:
    log = (engine.directory / "clamd.log").read_text(errors="replace")
    return [line for line in log.splitlines() if line.startswith("instream(")]


@pytest_twisted.ensureDeferred
async def test_real_round_robin_over_unix_and_tcp(clamd: Clamd, built: list[ClamdScanner]) -> None:
    """Two endpoints of one clamd: four scans go two and two, as clamd's own log
    shows (``instream(local)`` for the socket, ``instream(127.0.0.1@port)`` for TCP)."""
    before = len(instream_log_lines(clamd))
    scanner = real(built, endpoints=[clamd.unix_endpoint, clamd.tcp_endpoint])
    for _ in range(4):
        assert await scanner.scan(message(CLEAN + EICAR), ENVELOPE) == infected(CLAMD_EICAR)
    for _ in range(50):  # clamd logs just after it answers
        new = instream_log_lines(clamd)[before:]
        if len(new) >= 4:
            break
        await task.deferLater(reactor, 0.02, lambda: None)
    sources = sorted(line.split(":")[0].split("@")[0] for line in new)
    assert sources == ["instream(127.0.0.1", "instream(127.0.0.1", "instream(local)", "instream(local)"]
    assert [state.scans for state in scanner.endpoints] == [2, 2]


# -- 5. through the proxy ---------------------------------------------------------------


@pytest.fixture
def listening() -> Iterator[list[IListeningPort]]:
    opened: list[IListeningPort] = []
    yield opened
    for port in opened:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


async def start_guard(listening: list[IListeningPort], clamd: Clamd, sink: SmtpSink, **scanner: Any) -> int:
    config = configuration.parse(
        {
            "server": {"hostname": "guard.test"},
            "upstream": {"endpoint": sink.endpoint},
            "scanners": [{"type": "clamd", "endpoint": clamd.unix_endpoint, "timeout": 20, **scanner}],
        },
        "clamd-test",
    )
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(tap.build_factory(config, reactor))
    listening.append(port)
    return int(port.getHost().port)


def send(port: int, data: bytes) -> tuple[int, bytes]:
    """One message through smtplib; the reply to its end of data."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=20) as client:
        client.ehlo()
        client.mail("alice@example.org")
        client.rcpt("bob@example.net")
        try:
            return client.data(data)
        except smtplib.SMTPDataError as refused:
            return refused.smtp_code, refused.smtp_error


@pytest_twisted.ensureDeferred
async def test_proxy_rejects_eicar_attachment_and_relays_clean_mail(
    clamd: Clamd, smtp_sink: SmtpSink, listening: list[IListeningPort]
) -> None:
    """With ``[[scanners]] type = "clamd"``, an EICAR attachment gets 554 5.7.1
    naming clamd's signature and is not relayed; a clean message reaches smtp-sink
    marked clean by clamd."""
    port = await start_guard(listening, clamd, smtp_sink)
    virus = mail(attachment=(EICAR, "application", "octet-stream", "eicar.com"))

    rejected = await threads.deferToThread(send, port, virus)
    relayed = await threads.deferToThread(send, port, mail("Nothing to see here."))

    expected = replies.VIRUS_REJECTED.with_text(f"Message rejected: virus found ({CLAMD_EICAR})")
    assert rejected == (expected.code, f"{expected.enhanced} {expected.text}".encode())
    assert relayed[0] == 250
    [dump] = await threads.deferToThread(smtp_sink.messages, 1)
    assert b"X-Virus-Scanned: smtpguard (clamd) on guard.test\n" in dump
    assert b"X-Virus-Status: clean\n" in dump
    assert dump.endswith(b"\nNothing to see here.\n\n")


LIMIT = 1024 * 1024
LINE = b"x" * 78 + b"\r\n"


def message_of(size: int) -> bytes:
    """A message of exactly ``size`` bytes as smtplib sends it (CRLF lines, no
    line starting with a dot): headers, lines of x, and a last line of y."""
    head = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: size\r\n\r\n"
    lines = (size - len(head)) // len(LINE) - 1
    rest = size - len(head) - lines * len(LINE)
    return head + LINE * lines + b"y" * (rest - 2) + b"\r\n"


def declare(port: int, size: int) -> tuple[str, tuple[int, bytes]]:
    """EHLO's SIZE, and the reply to a MAIL that declares ``size``."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=20) as client:
        client.ehlo()
        return client.esmtp_features["size"], client.mail("alice@example.org", [f"SIZE={size}"])


def smtplib_reply(reply: replies.Reply) -> tuple[int, bytes]:
    return reply.code, f"{reply.enhanced} {reply.text}".encode()


@pytest_twisted.ensureDeferred
async def test_proxy_advertises_and_enforces_clamds_limit(
    tmp_path: Path, smtp_sink: SmtpSink, listening: list[IListeningPort]
) -> None:
    """clamd's StreamMaxLength and stream_max_length at 1 MiB, max_message_size not
    set: EHLO advertises SIZE 1048576; MAIL SIZE=1048577 and a message of 1048577
    bytes get 552 5.3.4 (never a 451 for the sender to retry); a message of exactly
    1048576 bytes is scanned by clamd and relayed."""
    assert len(message_of(LIMIT)) == LIMIT
    engine = Clamd(tmp_path / "clamd", stream_max_length="1M")
    engine.start()
    try:
        port = await start_guard(listening, engine, smtp_sink, stream_max_length="1M")
        advertised, declared = await threads.deferToThread(declare, port, LIMIT + 1)
        too_big = await threads.deferToThread(send, port, message_of(LIMIT + 1))
        exact = await threads.deferToThread(send, port, message_of(LIMIT))
        dumps = await threads.deferToThread(smtp_sink.messages, 1)
    finally:
        engine.stop()

    assert advertised == str(LIMIT)
    assert declared == too_big == smtplib_reply(replies.MESSAGE_TOO_BIG)
    assert exact[0] == 250
    [dump] = dumps
    assert b"X-Virus-Scanned: smtpguard (clamd) on guard.test\n" in dump
    assert b"X-Virus-Status: clean\n" in dump
    assert dump.count(LINE.replace(b"\r\n", b"\n")) == message_of(LIMIT).count(LINE)
