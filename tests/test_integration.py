"""End to end on loopback: Python's smtplib -> smtpguard (built-in scanner) -> a real
next hop (Postfix's smtp-sink, smtpguard's capture target, or a small scripted
server), with real sockets, real TLS and the global reactor.

smtplib runs in a thread (``deferToThread``) so that the reactor keeps serving
smtpguard while the client blocks.
"""

from __future__ import annotations

import datetime
import json
import re
import smtplib
import ssl as stdlib_ssl
from collections.abc import Iterator, Sequence
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.basic import LineReceiver

from smtpguard import config as configuration
from smtpguard import replies, tap
from smtpguard.capture import capture_factory
from smtpguard.replies import Reply
from smtpguard.tls import ServerTLS
from tests.certificates import throwaway_certificate
from tests.conftest import LoggingSmtpSink, SinkStarter, free_port, listen

LOOPBACK = "tcp:0:interface=127.0.0.1"
GUARD = "guard.test"  # smtpguard's [server] hostname
CLIENT_HELO = "client.example"
SENDER = "alice@example.org"
RECIPIENT = "bob@example.net"
TLS_NAME = "mail.test.example"
CLIENT_TIMEOUT = 20.0

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"

# RFC 5322 dates as smtpguard (email.utils.formatdate) and smtp-sink write them.
_DATE = rb"[A-Z][a-z]{2}, [ \d]?\d [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} [+-]\d{4}(?: \([A-Za-z]+\))?"


# -- plumbing -----------------------------------------------------------------------


def guard_config(upstream: str, server: dict[str, Any] | None = None, **upstream_keys: Any) -> configuration.Config:
    data = {
        "server": {"hostname": GUARD, **(server or {})},
        "upstream": {"endpoint": upstream, **upstream_keys},
        "scanners": [{"type": "builtin"}],
    }
    return configuration.parse(data, "integration-test")


async def start_guard(
    listening: list[IListeningPort],
    upstream: str,
    server: dict[str, Any] | None = None,
    description: str = LOOPBACK,
    **upstream_keys: Any,
) -> int:
    """smtpguard as twistd would build it (tap.build_factory), listening on loopback."""
    factory = tap.build_factory(guard_config(upstream, server, **upstream_keys), reactor)
    return await listen(listening, factory, description)


def in_thread(function: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
    return threads.deferToThread(function, *args, **kwargs)


def sleep(seconds: float) -> Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


def connect(port: int) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, local_hostname=CLIENT_HELO, timeout=CLIENT_TIMEOUT)


def wire(reply: Reply) -> tuple[int, bytes]:
    """A named reply as smtplib reports it: (code, b"enhanced text")."""
    return reply.code, f"{reply.enhanced} {reply.text}".encode()


def transaction(
    client: smtplib.SMTP,
    message: bytes,
    mail_options: Sequence[str] = (),
    recipients: Sequence[tuple[str, Sequence[str]]] = ((RECIPIENT, ()),),
) -> list[tuple[int, bytes]]:
    """MAIL, RCPT..., DATA on an open session; every reply, in order."""
    answers = [client.mail(SENDER, list(mail_options))]
    answers += [client.rcpt(address, list(options)) for address, options in recipients]
    answers.append(client.data(message))
    return answers


def send_one(port: int, message: bytes, **options: Any) -> list[tuple[int, bytes]]:
    with connect(port) as client:
        client.ehlo()
        return transaction(client, message, **options)


def attempt(
    port: int, message: bytes, sender: str = SENDER, recipient: str = RECIPIENT, **mail: Any
) -> list[tuple[int, bytes]]:
    """One transaction that stops at the first refusal; every reply, in order."""
    with connect(port) as client:
        client.ehlo()
        client.command_encoding = "utf-8"
        answers = [client.mail(sender, list(mail.get("mail_options", ())))]
        if answers[-1][0] != 250:
            return answers
        answers.append(client.rcpt(recipient))
        if answers[-1][0] != 250:
            return answers
        try:
            answers.append(client.data(message))
        except smtplib.SMTPDataError as refused:
            answers.append((refused.smtp_code, refused.smtp_error))
        return answers


def lf(message: bytes) -> bytes:
    """The message as smtp-sink dumps it: CR dropped, one LF per line."""
    return message.replace(b"\r\n", b"\n")


def assert_same_bytes(actual: bytes, expected: bytes) -> None:
    """Byte-for-byte equality that reports where (big messages make poor diffs)."""
    if actual == expected:
        return
    at = next(
        (i for i, (a, b) in enumerate(zip(actual, expected, strict=False)) if a != b), min(len(actual), len(expected))
    )
    pytest.fail(
        f"bytes differ at offset {at} (lengths {len(actual)} and {len(expected)}):\n"
        f"  got  {actual[max(0, at - 60) : at + 60]!r}\n  want {expected[max(0, at - 60) : at + 60]!r}"
    )


def guard_headers(recipient: str | None = RECIPIENT, protocol: str = "ESMTP", newline: bytes = b"\n") -> bytes:
    """A regex for smtpguard's own headers on a clean message: Received:, then
    X-Virus-Scanned and X-Virus-Status."""
    received = re.escape(f"Received: from {CLIENT_HELO} ([127.0.0.1])".encode()) + newline
    received += re.escape(f"\tby {GUARD} (smtpguard) with {protocol} id ".encode()) + rb"[0-9A-F]{12}"
    if recipient is not None:
        received += newline + re.escape(f"\tfor <{recipient}>".encode())
    received += rb"; (?P<date>" + _DATE + rb")" + newline
    status = re.escape(f"X-Virus-Scanned: smtpguard (builtin) on {GUARD}".encode()) + newline
    return received + status + re.escape(b"X-Virus-Status: clean") + newline


def sink_headers(mail_args: str, rcpt_args: Sequence[str]) -> bytes:
    """A regex for the headers smtp-sink writes for a transaction from smtpguard."""
    lines = [
        re.escape(b"X-Client-Addr: 127.0.0.1"),
        re.escape(b"X-Client-Proto: ESMTP"),
        re.escape(f"X-Helo-Args: {GUARD}".encode()),
        re.escape(f"X-Mail-Args: {mail_args}".encode()),
        *[re.escape(f"X-Rcpt-Args: {args}".encode()) for args in rcpt_args],
        re.escape(f"Received: from {GUARD} ([127.0.0.1])".encode()),
        rb"\tby smtp-sink \(smtp-sink\) with ESMTP id [0-9a-f]{8};",
        rb"\t" + _DATE,
    ]
    return b"\n".join(lines) + b"\n"


def assert_dump(
    dump: bytes,
    message: bytes,
    mail_args: str = f"<{SENDER}>",
    rcpt_args: Sequence[str] = (f"<{RECIPIENT}>",),
    recipient: str | None = RECIPIENT,
    protocol: str = "ESMTP",
) -> None:
    """``dump`` is exactly: smtp-sink's headers, smtpguard's headers, the message
    byte for byte (as smtp-sink writes lines), and smtp-sink's closing empty line."""
    tail = lf(message) + b"\n"
    assert_same_bytes(dump[len(dump) - len(tail) :], tail)
    head = dump[: len(dump) - len(tail)]
    found = re.fullmatch(sink_headers(mail_args, rcpt_args) + guard_headers(recipient, protocol), head)
    assert found is not None, head.decode("utf-8", "replace")
    stamped = parsedate_to_datetime(found.group("date").decode())
    assert abs((stamped - datetime.datetime.now(datetime.UTC)).total_seconds()) < 120


async def dumps(sink: LoggingSmtpSink, expected: int = 1) -> list[bytes]:
    result: list[bytes] = await in_thread(sink.messages, expected)
    return result


def text_message(subject: str, body: bytes = b"Hello Bob.\r\n") -> bytes:
    return (
        f"From: Alice <{SENDER}>\r\nTo: Bob <{RECIPIENT}>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@example.org>\r\n\r\n"
    ).encode() + body


# -- a scripted next hop ------------------------------------------------------------


class ScriptedNextHopProtocol(LineReceiver):
    """A minimal ESMTP server that records every command and message and answers
    the end of data when its factory says so."""

    delimiter = b"\r\n"
    MAX_LENGTH = 65536
    factory: ScriptedNextHop

    def connectionMade(self) -> None:
        self._data: list[bytes] | None = None
        self.sendLine(b"220 scripted.test ESMTP")

    def lineReceived(self, line: bytes) -> None:
        if self._data is not None:
            if line == b".":
                self._end_of_data()
            else:
                self._data.append(line[1:] if line.startswith(b".") else line)
            return
        hop = self.factory
        hop.commands.append(line.decode())
        verb = line.split(b" ", 1)[0].upper()
        if verb == b"EHLO":
            lines = [b"scripted.test", *hop.extensions]
            self.transport.write(b"".join(b"250-" + x + b"\r\n" for x in lines[:-1]) + b"250 " + lines[-1] + b"\r\n")
        elif verb == b"STARTTLS" and hop.tls is not None:
            # Anything in hop.injection follows the 220 in the same plaintext write,
            # as a man in the middle would add it.
            self.transport.write(b"220 2.0.0 Ready to start TLS\r\n" + hop.injection)
            self.transport.startTLS(hop.tls)
        elif verb == b"DATA":
            self._data = []
            self.sendLine(b"354 End data with <CR><LF>.<CR><LF>")
        elif verb == b"QUIT":
            self.sendLine(b"221 2.0.0 Bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"250 2.0.0 Ok")

    def _end_of_data(self) -> None:
        hop = self.factory
        assert self._data is not None
        hop.messages.append(b"".join(line + b"\r\n" for line in self._data))
        self._data = None
        if not hop.end_of_data.called:
            hop.end_of_data.callback(None)
        answer = hop.hold if hop.hold is not None else defer.succeed(hop.data_reply)
        answer.addCallback(self._answer)

    def _answer(self, line: bytes) -> None:
        self.sendLine(line)


class ScriptedNextHop(Factory):
    protocol = ScriptedNextHopProtocol

    def __init__(self, extensions: Sequence[bytes] = (b"PIPELINING", b"SIZE 104857600", b"8BITMIME", b"DSN")) -> None:
        self.extensions = list(extensions)
        self.commands: list[str] = []
        self.messages: list[bytes] = []
        self.end_of_data: Deferred[None] = Deferred()
        self.hold: Deferred[bytes] | None = None  # set: the end of data waits for it
        self.data_reply = b"250 2.0.0 Ok: queued as SCRIPTED1"
        self.tls: Any = None  # server TLS options: STARTTLS is offered and works
        self.injection = b""


class Silent(Protocol):
    """Accepts the TCP connection and never says a word."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)  # type: ignore[attr-defined]


@pytest.fixture
def silent_factory() -> Iterator[Factory]:
    factory = Factory.forProtocol(Silent)
    factory.connections = []  # type: ignore[attr-defined]
    yield factory
    for protocol in factory.connections:  # type: ignore[attr-defined]
        if protocol.transport is not None:
            protocol.transport.abortConnection()


# -- certificates -------------------------------------------------------------------


@attrs.frozen
class Certificate:
    certificate: Path
    key: Path

    def server_options(self) -> Any:
        return ServerTLS(str(self.certificate), str(self.key))

    def client_context(self) -> stdlib_ssl.SSLContext:
        return stdlib_ssl.create_default_context(cafile=str(self.certificate))


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate for mail.test.example and 127.0.0.1."""
    directory = tmp_path_factory.mktemp("tls")
    key, certificate = throwaway_certificate(TLS_NAME)
    paths = Certificate(directory / "cert.pem", directory / "key.pem")
    paths.certificate.write_bytes(certificate)
    paths.key.write_bytes(key)
    return paths


# -- 1. clean mail reaches smtp-sink byte for byte -----------------------------------


TRICKY_BODY = (
    b"A plain first line.\r\n"
    b".A line that starts with a dot.\r\n"
    b"..Two dots.\r\n"
    b".\r\n"
    b"The line above is a lone dot; the next one is 998 characters long.\r\n"
    + b"L" * 997
    + b"x\r\n"
    + "8-bit UTF-8: Grüße aus Köln, naïve café, Ελληνικά, 日本語 ✓\r\n".encode()
    + b" leading space and trailing space \r\n"
    b"\r\n"
    b"Last line.\r\n"
)


@pytest_twisted.ensureDeferred
async def test_clean_message_is_relayed_byte_for_byte_with_trace_headers(
    listening: list[IListeningPort], smtp_sinks: SinkStarter
) -> None:
    """A clean 8-bit message with dot lines and a 998-character line reaches smtp-sink
    unchanged after smtp-sink's headers and smtpguard's Received/X-Virus-* headers."""
    sink = smtp_sinks("sink")
    port = await start_guard(listening, sink.endpoint)
    message = text_message("tricky", TRICKY_BODY)
    assert len(b"L" * 997 + b"x") == 998

    answers = await in_thread(send_one, port, message, mail_options=["BODY=8BITMIME"])

    assert answers == [(250, b"2.1.0 Ok"), (250, b"2.1.5 Ok"), (250, b"2.0.0 Ok")]
    [dump] = await dumps(sink)
    assert_dump(dump, message, mail_args=f"<{SENDER}> BODY=8BITMIME")


@pytest_twisted.ensureDeferred
async def test_xforward_carries_client_address_and_helo(
    listening: list[IListeningPort], smtp_sinks: SinkStarter
) -> None:
    """smtp-sink offers XFORWARD NAME ADDR PROTO HELO; smtpguard sends exactly those,
    with the client's address and HELO, before MAIL."""
    sink = smtp_sinks("sink")
    port = await start_guard(listening, sink.endpoint)

    await in_thread(send_one, port, text_message("xforward"))
    await dumps(sink)

    commands = sink.commands()
    xforward = [line for line in commands if line.upper().startswith("XFORWARD")]
    assert xforward == [f"XFORWARD NAME=[UNAVAILABLE] ADDR=127.0.0.1 PROTO=ESMTP HELO={CLIENT_HELO}"]
    upper = [line.upper() for line in commands]
    assert upper.index(xforward[0].upper()) < upper.index(f"MAIL FROM:<{SENDER.upper()}>")


def boundary_message(size: int = 5 * 1024 * 1024, step: int = 64 * 1024) -> tuple[bytes, list[int]]:
    """A message of about ``size`` bytes with a dot-led line at every ``step``
    boundary: on even boundaries a lone "." line ends right before it and a
    ".line" starts exactly at it; on odd ones the CRLF straddles it (CR at
    boundary - 1, LF at the boundary) and the dot follows."""
    out = bytearray(b"From: <alice@example.org>\r\nTo: <bob@example.net>\r\nSubject: boundaries\r\n\r\n")
    starts: list[int] = []
    boundary = step
    line = 0
    while boundary < size:
        even = (boundary // step) % 2 == 0
        lead = b".\r\n" if even else b""
        target = boundary if even else boundary + 1
        while target - len(lead) - len(out) > 1000:
            line += 1
            out += b"filler %08d " % line + b"abcdefghijklmnopqrstuvwxyz0123456789" * 2 + b"\r\n"
        out += b"f" * (target - len(lead) - len(out) - 2) + b"\r\n"
        out += lead
        starts.append(len(out))
        out += b".dot line at offset %d\r\n" % len(out)
        boundary += step
    out += b"The end.\r\n"
    return bytes(out), starts


@pytest_twisted.ensureDeferred
async def test_five_megabyte_message_with_dots_at_chunk_boundaries(
    listening: list[IListeningPort], smtp_sinks: SinkStarter
) -> None:
    """A 5 MB message (spooled to disk) with dot-led lines at and around every
    64 KiB and 256 KiB boundary reaches smtp-sink byte for byte."""
    message, starts = boundary_message()
    assert len(message) > 5 * 1024 * 1024 - 65536
    assert [start for start in starts if start % (256 * 1024) == 0] == list(range(256 * 1024, len(message), 256 * 1024))
    assert all(message[start : start + 1] == b"." for start in starts)
    sink = smtp_sinks("sink")
    port = await start_guard(listening, sink.endpoint)

    answers = await in_thread(send_one, port, message)

    assert answers == [(250, b"2.1.0 Ok"), (250, b"2.1.5 Ok"), (250, b"2.0.0 Ok")]
    [dump] = await dumps(sink)
    assert_dump(dump, message)


@pytest_twisted.ensureDeferred
async def test_mail_and_dsn_parameters_reach_smtp_sink(
    listening: list[IListeningPort], smtp_sinks: SinkStarter
) -> None:
    """BODY, RET, ENVID (xtext) and each recipient's NOTIFY and ORCPT arrive at smtp-sink;
    SIZE is not passed on because smtp-sink does not advertise SIZE (RFC 1870)."""
    sink = smtp_sinks("sink")
    port = await start_guard(listening, sink.endpoint)
    message = text_message("dsn", "Grüße\r\n".encode())
    carol = "carol@example.net"

    answers = await in_thread(
        send_one,
        port,
        message,
        mail_options=[f"SIZE={len(message)}", "BODY=8BITMIME", "RET=HDRS", "ENVID=QQ314159+2Bx"],
        recipients=[
            (RECIPIENT, ["NOTIFY=SUCCESS,FAILURE", f"ORCPT=rfc822;{RECIPIENT}"]),
            (carol, ["NOTIFY=NEVER"]),
        ],
    )

    assert answers == [(250, b"2.1.0 Ok"), (250, b"2.1.5 Ok"), (250, b"2.1.5 Ok"), (250, b"2.0.0 Ok")]
    [dump] = await dumps(sink)
    assert_dump(
        dump,
        message,
        mail_args=f"<{SENDER}> BODY=8BITMIME RET=HDRS ENVID=QQ314159+2Bx",
        rcpt_args=[f"<{RECIPIENT}> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;{RECIPIENT}", f"<{carol}> NOTIFY=NEVER"],
        recipient=None,
    )


@pytest_twisted.ensureDeferred
async def test_size_is_passed_on_to_a_next_hop_that_offers_size(listening: list[IListeningPort]) -> None:
    """A next hop advertising SIZE, 8BITMIME and DSN receives MAIL with SIZE, BODY,
    RET and ENVID, and RCPT with NOTIFY and ORCPT."""
    hop = ScriptedNextHop()
    hop_port = await listen(listening, hop)
    port = await start_guard(listening, f"tcp:127.0.0.1:{hop_port}")
    message = text_message("size")

    answers = await in_thread(
        send_one,
        port,
        message,
        mail_options=[f"SIZE={len(message)}", "BODY=7BIT", "RET=FULL", "ENVID=id+2B1"],
        recipients=[(RECIPIENT, ["NOTIFY=DELAY", f"ORCPT=rfc822;{RECIPIENT}"])],
    )

    assert answers == [(250, b"2.0.0 Ok"), (250, b"2.0.0 Ok"), (250, b"2.0.0 Ok: queued as SCRIPTED1")]
    assert hop.commands[:4] == [
        f"EHLO {GUARD}",
        f"MAIL FROM:<{SENDER}> SIZE={len(message)} BODY=7BIT RET=FULL ENVID=id+2B1",
        f"RCPT TO:<{RECIPIENT}> NOTIFY=DELAY ORCPT=rfc822;{RECIPIENT}",
        "DATA",
    ]


# -- 2. viruses ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_infected_message_is_rejected_and_the_session_goes_on(
    listening: list[IListeningPort], smtp_sinks: SinkStarter
) -> None:
    """An EICAR message gets 554 5.7.1 and nothing is dumped; a clean message in the
    same session is then delivered."""
    sink = smtp_sinks("sink")
    port = await start_guard(listening, sink.endpoint)
    infected = text_message("infected", b"Attached, as promised:\r\n" + EICAR + b"\r\n")
    clean = text_message("clean after infected")

    def session() -> tuple[list[tuple[int, bytes]], list[Path], list[tuple[int, bytes]]]:
        with connect(port) as client:
            client.ehlo()
            first = transaction(client, infected)
            between = sorted(sink.directory.iterdir())
            second = transaction(client, clean)
            return first, between, second

    first, between, second = await in_thread(session)

    rejected = replies.VIRUS_REJECTED.with_text("Message rejected: virus found (Eicar-Test-Signature)")
    assert first == [(250, b"2.1.0 Ok"), (250, b"2.1.5 Ok"), wire(rejected)]
    assert between == []
    assert second == [(250, b"2.1.0 Ok"), (250, b"2.1.5 Ok"), (250, b"2.0.0 Ok")]
    [dump] = await dumps(sink)
    assert_dump(dump, clean)


# -- 3. next hop failures -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_next_hop_down_defers_mail_with_451_441(listening: list[IListeningPort]) -> None:
    """Nothing listens at the next hop's address: MAIL gets 451 4.4.1."""
    port = await start_guard(listening, f"tcp:127.0.0.1:{free_port()}")

    def session() -> tuple[int, bytes]:
        with connect(port) as client:
            client.ehlo()
            return client.mail(SENDER)

    assert await in_thread(session) == wire(replies.UPSTREAM_UNAVAILABLE)


@pytest_twisted.ensureDeferred
async def test_silent_next_hop_defers_mail_with_451_442_after_timeout(
    listening: list[IListeningPort], silent_factory: Factory
) -> None:
    """A next hop that accepts TCP but never greets: MAIL gets 451 4.4.2 once the
    [upstream] timeout (0.5 s) has passed (when exactly: test_smtpclient's
    test_no_greeting_within_timeout, on a Clock)."""
    hop_port = await listen(listening, silent_factory)
    port = await start_guard(listening, f"tcp:127.0.0.1:{hop_port}", timeout=0.5)

    def session() -> tuple[int, bytes]:
        with connect(port) as client:
            client.ehlo()
            return client.mail(SENDER)

    assert await in_thread(session) == wire(replies.UPSTREAM_TIMEOUT)
    assert len(silent_factory.connections) == 1  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_next_hop_silent_after_end_of_data_defers_with_451_442(listening: list[IListeningPort]) -> None:
    """A next hop that takes the whole message but never answers the end of data: the
    client gets 451 4.4.2 after the [upstream] timeout (0.5 s), never a 250."""
    hop = ScriptedNextHop()
    hop.hold = Deferred()  # never fired
    hop_port = await listen(listening, hop)
    port = await start_guard(listening, f"tcp:127.0.0.1:{hop_port}", timeout=0.5)
    message = text_message("never answered")

    answers = await in_thread(send_one, port, message)

    assert answers == [(250, b"2.0.0 Ok"), (250, b"2.0.0 Ok"), wire(replies.UPSTREAM_TIMEOUT)]
    assert len(hop.messages) == 1 and hop.messages[0].endswith(message)


@pytest_twisted.ensureDeferred
async def test_next_hop_refusing_rcpt_is_heard_by_the_client(
    listening: list[IListeningPort], smtp_sinks: SinkStarter
) -> None:
    """smtp-sink refuses RCPT (-f RCPT with its own 550 5.1.1 text): the client gets
    exactly that reply, and DATA is then refused for want of recipients."""
    refusal = "550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown"
    sink = smtp_sinks("sink", "-f", "RCPT", "-B", refusal)
    port = await start_guard(listening, sink.endpoint)

    def session() -> tuple[tuple[int, bytes], tuple[int, bytes], tuple[int, bytes]]:
        with connect(port) as client:
            client.ehlo()
            return client.mail(SENDER), client.rcpt(RECIPIENT), client.docmd("DATA")

    mail, rcpt, data = await in_thread(session)

    assert mail == (250, b"2.1.0 Ok")
    assert rcpt == (550, b"5.1.1 <bob@example.net>: Recipient address rejected: User unknown")
    assert data == wire(replies.NO_VALID_RECIPIENTS)


@pytest_twisted.ensureDeferred
async def test_next_hop_refusing_end_of_data_is_heard_by_the_client(
    listening: list[IListeningPort], smtp_sinks: SinkStarter
) -> None:
    """smtp-sink refuses the end of data with 450 4.3.0 (-r .): the client hears that
    reply, not 250."""
    sink = smtp_sinks("sink", "-r", ".")
    port = await start_guard(listening, sink.endpoint)

    answers = await in_thread(send_one, port, text_message("refused at the dot"))

    assert answers == [(250, b"2.1.0 Ok"), (250, b"2.1.5 Ok"), (450, b"4.3.0 Error: command failed")]


@pytest_twisted.ensureDeferred
async def test_8bit_message_is_not_sent_to_a_next_hop_without_8bitmime(
    listening: list[IListeningPort], smtp_sinks: SinkStarter
) -> None:
    """BODY=8BITMIME with 8-bit content, next hop (smtp-sink -8) without 8BITMIME: the
    client gets a permanent 5.6.3 refusal (RFC 6152 forbids passing 8-bit data on
    unannounced) and smtp-sink receives no message."""
    sink = smtp_sinks("sink", "-8")
    port = await start_guard(listening, sink.endpoint)

    answers = await in_thread(
        attempt, port, text_message("8 bit", "Grüße\r\n".encode()), mail_options=["BODY=8BITMIME"]
    )

    code, text = answers[-1]
    assert (code // 100, text[:5]) == (5, b"5.6.3"), answers
    assert sorted(sink.directory.iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_utf8_addresses_are_not_sent_to_a_next_hop_without_smtputf8(
    listening: list[IListeningPort], smtp_sinks: SinkStarter
) -> None:
    """MAIL FROM:<älice@...> SMTPUTF8, next hop (smtp-sink) without SMTPUTF8: MAIL is
    refused with 553 5.6.7 (RFC 6531) and smtp-sink never sees the non-ASCII address."""
    sink = smtp_sinks("sink")
    port = await start_guard(listening, sink.endpoint)

    answers = await in_thread(
        attempt, port, b"Subject: hi\r\n\r\nhi\r\n", sender="älice@example.org", mail_options=["SMTPUTF8"]
    )

    assert len(answers) == 1 and (answers[0][0], answers[0][1][:5]) == (553, b"5.6.7"), answers
    assert [line for line in sink.commands() if line.upper().startswith("MAIL")] == []


# -- 4. 250 only after the next hop's 250 --------------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_hears_250_only_after_next_hop_said_250(listening: list[IListeningPort]) -> None:
    """While the next hop holds back its reply to the end of data, the client has no
    reply; once it answers, the client gets that very reply (its queue id, which
    exists only once the next hop answered)."""
    hop = ScriptedNextHop()
    hop.hold = Deferred()
    hop_port = await listen(listening, hop)
    port = await start_guard(listening, f"tcp:127.0.0.1:{hop_port}")
    message = text_message("held")

    sending = in_thread(send_one, port, message)
    await hop.end_of_data
    await sleep(0.3)
    assert not sending.called
    hop.hold.callback(b"250 2.0.0 Ok: queued as HELD1")
    answers = await sending

    assert answers == [(250, b"2.0.0 Ok"), (250, b"2.0.0 Ok"), (250, b"2.0.0 Ok: queued as HELD1")]
    [relayed] = hop.messages
    found = re.fullmatch(guard_headers(newline=b"\r\n"), relayed[: len(relayed) - len(message)])
    assert found is not None and relayed.endswith(message)


# -- 5. TLS -------------------------------------------------------------------------


def tls_server(certificate: Certificate, **keys: Any) -> dict[str, Any]:
    return {"tls_certificate": str(certificate.certificate), "tls_key": str(certificate.key), **keys}


@pytest_twisted.ensureDeferred
async def test_starttls_then_relay_says_esmtps(
    listening: list[IListeningPort], smtp_sinks: SinkStarter, certificate: Certificate
) -> None:
    """STARTTLS with the configured certificate (verified by the client), then a
    message: delivered, and smtpguard's Received: says ESMTPS."""
    sink = smtp_sinks("sink")
    port = await start_guard(listening, sink.endpoint, server=tls_server(certificate))
    message = text_message("starttls")

    def session() -> tuple[bool, tuple[int, bytes], bool, list[tuple[int, bytes]]]:
        with connect(port) as client:
            client.ehlo()
            offered = client.has_extn("starttls")
            started = client.starttls(context=certificate.client_context())
            client.ehlo()
            return offered, started, client.has_extn("starttls"), transaction(client, message)

    offered, started, offered_again, answers = await in_thread(session)

    assert offered is True
    assert started == wire(replies.READY_FOR_TLS)
    assert offered_again is False
    assert answers == [(250, b"2.1.0 Ok"), (250, b"2.1.5 Ok"), (250, b"2.0.0 Ok")]
    [dump] = await dumps(sink)
    assert_dump(dump, message, protocol="ESMTPS")
    [xforward] = [line for line in sink.commands() if line.startswith("XFORWARD")]
    assert xforward == f"XFORWARD NAME=[UNAVAILABLE] ADDR=127.0.0.1 PROTO=ESMTPS HELO={CLIENT_HELO}"


@pytest_twisted.ensureDeferred
async def test_require_tls_refuses_mail_before_starttls(
    listening: list[IListeningPort], smtp_sinks: SinkStarter, certificate: Certificate
) -> None:
    """With require_tls, MAIL in clear gets 530 5.7.0; after STARTTLS the message goes through."""
    sink = smtp_sinks("sink")
    port = await start_guard(listening, sink.endpoint, server=tls_server(certificate, require_tls=True))
    message = text_message("require tls")

    def session() -> tuple[tuple[int, bytes], list[tuple[int, bytes]]]:
        with connect(port) as client:
            client.ehlo()
            refused = client.mail(SENDER)
            client.starttls(context=certificate.client_context())
            client.ehlo()
            return refused, transaction(client, message)

    refused, answers = await in_thread(session)

    assert refused == wire(replies.TLS_REQUIRED)
    assert answers == [(250, b"2.1.0 Ok"), (250, b"2.1.5 Ok"), (250, b"2.0.0 Ok")]
    [dump] = await dumps(sink)
    assert_dump(dump, message, protocol="ESMTPS")


# Twisted's own ssl: endpoint parser still hands pyOpenSSL's deprecated X509 and
# PKey objects to the context; nothing of smtpguard's does.
@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL (X509|PKey) objects is deprecated:DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_implicit_tls_listener(
    listening: list[IListeningPort], smtp_sinks: SinkStarter, certificate: Certificate
) -> None:
    """On an ssl: endpoint the session is TLS from the first byte: no STARTTLS offered,
    the message is delivered, and Received: says ESMTPS."""
    sink = smtp_sinks("sink")
    description = f"ssl:0:privateKey={certificate.key}:certKey={certificate.certificate}:interface=127.0.0.1"
    port = await start_guard(listening, sink.endpoint, server=tls_server(certificate), description=description)
    message = text_message("implicit tls")

    def session() -> tuple[bool, list[tuple[int, bytes]]]:
        context = certificate.client_context()
        with smtplib.SMTP_SSL(
            "127.0.0.1", port, local_hostname=CLIENT_HELO, timeout=CLIENT_TIMEOUT, context=context
        ) as client:
            client.ehlo()
            return client.has_extn("starttls"), transaction(client, message)

    offered, answers = await in_thread(session)

    assert offered is False
    assert answers == [(250, b"2.1.0 Ok"), (250, b"2.1.5 Ok"), (250, b"2.0.0 Ok")]
    [dump] = await dumps(sink)
    assert_dump(dump, message, protocol="ESMTPS")


async def start_tls_capture(
    listening: list[IListeningPort], directory: Path, certificate: Certificate
) -> tuple[int, list[Any]]:
    """smtpguard's capture target offering STARTTLS; returns its port and the
    Client (who, HELO, TLS) of every message it stored."""
    factory = capture_factory(reactor, str(directory))
    factory.settings = attrs.evolve(factory.settings, tls=certificate.server_options())
    clients: list[Any] = []
    store = factory.process

    def process(envelope: Any, message: Any, relay: Any, transaction_id: str, receiving: float) -> Any:
        clients.append(envelope.client)
        return store(envelope, message, relay, transaction_id, receiving)

    factory.process = process
    return await listen(listening, factory), clients


@pytest_twisted.ensureDeferred
async def test_upstream_tls_required_with_verified_certificate_delivers(
    listening: list[IListeningPort], tmp_path: Path, certificate: Certificate
) -> None:
    """tls = "required" with tls_hostname and tls_ca matching the capture target's
    certificate: the message is relayed over STARTTLS and stored unchanged."""
    capture = tmp_path / "capture"
    capture_port, clients = await start_tls_capture(listening, capture, certificate)
    port = await start_guard(
        listening,
        f"tcp:127.0.0.1:{capture_port}",
        tls="required",
        tls_hostname=TLS_NAME,
        tls_ca=str(certificate.certificate),
    )
    message = text_message("upstream tls")

    answers = await in_thread(send_one, port, message)

    assert answers[:2] == [(250, b"2.1.0 Ok"), (250, b"2.1.5 Ok")]
    assert answers[2][0] == 250 and answers[2][1].startswith(b"2.0.0 Ok: queued as ")
    [stored] = sorted(capture.glob("*.eml"))
    assert answers[2][1] == b"2.0.0 Ok: queued as " + stored.stem.encode()
    data = stored.read_bytes()
    assert re.fullmatch(guard_headers(newline=b"\r\n"), data[: len(data) - len(message)]) is not None
    assert_same_bytes(data[len(data) - len(message) :], message)
    envelope = json.loads(stored.with_suffix(".json").read_text())
    assert envelope == {"sender": SENDER, "recipients": [RECIPIENT], "client": "127.0.0.1", "helo": GUARD}
    assert [(client.tls, client.protocol) for client in clients] == [(True, "ESMTPS")]


@pytest_twisted.ensureDeferred
async def test_upstream_tls_wrong_hostname_defers_and_delivers_nothing(
    listening: list[IListeningPort], tmp_path: Path, certificate: Certificate
) -> None:
    """tls = "required" with a tls_hostname the certificate does not carry: MAIL gets
    451 4.4.1 and the capture target stores nothing."""
    capture = tmp_path / "capture"
    capture_port, clients = await start_tls_capture(listening, capture, certificate)
    port = await start_guard(
        listening,
        f"tcp:127.0.0.1:{capture_port}",
        tls="required",
        tls_hostname="wrong.test.example",
        tls_ca=str(certificate.certificate),
    )

    def session() -> tuple[int, bytes]:
        with connect(port) as client:
            client.ehlo()
            return client.mail(SENDER)

    assert await in_thread(session) == wire(replies.UPSTREAM_UNAVAILABLE)
    assert sorted(capture.iterdir()) == []
    assert clients == []


@pytest_twisted.ensureDeferred
async def test_upstream_tls_required_without_starttls_defers(
    listening: list[IListeningPort], smtp_sinks: SinkStarter
) -> None:
    """tls = "required" towards smtp-sink, which offers no STARTTLS: MAIL gets 451 4.4.1
    and smtp-sink never sees a MAIL command."""
    sink = smtp_sinks("sink")
    port = await start_guard(listening, sink.endpoint, tls="required", tls_hostname=TLS_NAME)

    def session() -> tuple[int, bytes]:
        with connect(port) as client:
            client.ehlo()
            return client.mail(SENDER)

    assert await in_thread(session) == wire(replies.UPSTREAM_UNAVAILABLE)
    assert [line for line in sink.commands() if line.lower().startswith("mail")] == []


@pytest_twisted.ensureDeferred
async def test_upstream_tls_opportunistic_without_starttls_delivers_in_clear(
    listening: list[IListeningPort], smtp_sinks: SinkStarter
) -> None:
    """tls = "opportunistic" towards smtp-sink, which offers no STARTTLS: the message
    is delivered in clear, byte for byte."""
    sink = smtp_sinks("sink")
    port = await start_guard(listening, sink.endpoint, tls="opportunistic")
    message = text_message("opportunistic")

    answers = await in_thread(send_one, port, message)

    assert answers == [(250, b"2.1.0 Ok"), (250, b"2.1.5 Ok"), (250, b"2.0.0 Ok")]
    [dump] = await dumps(sink)
    assert_dump(dump, message)
    assert not any(line.upper().startswith("STARTTLS") for line in sink.commands())


@pytest_twisted.ensureDeferred
async def test_upstream_tls_opportunistic_uses_offered_starttls(
    listening: list[IListeningPort], tmp_path: Path, certificate: Certificate
) -> None:
    """tls = "opportunistic" towards a next hop offering STARTTLS: TLS is used (the
    certificate is not checked) and the message is stored."""
    capture = tmp_path / "capture"
    capture_port, clients = await start_tls_capture(listening, capture, certificate)
    port = await start_guard(listening, f"tcp:127.0.0.1:{capture_port}", tls="opportunistic")
    message = text_message("opportunistic tls")

    answers = await in_thread(send_one, port, message)

    assert [code for code, _ in answers] == [250, 250, 250]
    [stored] = sorted(capture.glob("*.eml"))
    assert stored.read_bytes().endswith(message)
    assert [client.tls for client in clients] == [True]


@pytest_twisted.ensureDeferred
async def test_upstream_tls_relays_a_five_megabyte_message_unchanged(
    listening: list[IListeningPort], tmp_path: Path, certificate: Certificate
) -> None:
    """A 5 MB message with dots at chunk boundaries crosses the verified STARTTLS
    link to the capture target byte for byte."""
    capture = tmp_path / "capture"
    capture_port, _ = await start_tls_capture(listening, capture, certificate)
    port = await start_guard(
        listening,
        f"tcp:127.0.0.1:{capture_port}",
        tls="required",
        tls_hostname=TLS_NAME,
        tls_ca=str(certificate.certificate),
    )
    message, _ = boundary_message()

    answers = await in_thread(send_one, port, message)

    assert [code for code, _ in answers] == [250, 250, 250]
    [stored] = sorted(capture.glob("*.eml"))
    data = stored.read_bytes()
    assert re.fullmatch(guard_headers(newline=b"\r\n"), data[: len(data) - len(message)]) is not None
    assert_same_bytes(data[len(data) - len(message) :], message)


@pytest_twisted.ensureDeferred
async def test_plaintext_injected_after_upstream_starttls_is_a_protocol_error(
    listening: list[IListeningPort], certificate: Certificate
) -> None:
    """A man in the middle appends "250 injected" to the next hop's plaintext 220 for
    STARTTLS: smtpguard never takes it as the reply to its post-TLS EHLO. Bytes after
    that 220 and before the handshake are a protocol error: the client's MAIL gets
    451 4.5.0 and the next hop hears nothing after STARTTLS."""
    hop = ScriptedNextHop(extensions=(b"PIPELINING", b"8BITMIME", b"STARTTLS"))
    hop.tls = certificate.server_options()
    hop.injection = b"250 injected\r\n"
    hop_port = await listen(listening, hop)
    port = await start_guard(
        listening,
        f"tcp:127.0.0.1:{hop_port}",
        tls="required",
        tls_hostname=TLS_NAME,
        tls_ca=str(certificate.certificate),
    )
    message = text_message("injection")

    answers = await in_thread(attempt, port, message)

    assert answers == [wire(replies.UPSTREAM_PROTOCOL)]
    assert (hop.commands, hop.messages) == ([f"EHLO {GUARD}", "STARTTLS"], [])
