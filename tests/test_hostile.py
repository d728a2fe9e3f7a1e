"""Hostile clients: SMTP smuggling, slow and idle clients, floods of connections and
recipients, huge headers, messages at the size limit and a spool that cannot be
written.  Every case ends in a defined reply, and the session (or the server) is
still in sync afterwards.

Protocol-level cases run on StringTransport and a Clock (tests.test_server's
Session); the rest run through smtpguard as twistd builds it, on real sockets, to
Postfix's smtp-sink.  The clients here write raw bytes: smtplib would repair the
bare line endings under test, and it does not speak BDAT.
"""

from __future__ import annotations

import resource
import signal
import smtplib
import socket
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort

from smtpguard import replies, tap
from smtpguard.replies import Reply
from smtpguard.server import GuardFactory
from tests.conftest import SmtpSink, free_port, listen
from tests.test_bdat import chunk, received
from tests.test_integration import guard_config, in_thread, lf, sleep
from tests.test_server import (
    BARE_CR_OR_LF,
    CLIENT_NAME,
    MESSAGE,
    QUEUED,
    RECIPIENT,
    SENDER,
    Session,
    ready,
    transaction,
    transaction_replies,
)

LOOPBACK = "tcp:0:interface=127.0.0.1"
GUARD = "guard.test"  # smtpguard's [server] hostname in tests.test_integration's guard_config
CLIENT_TIMEOUT = 20.0
# The real-socket tests' envelope (smtp-sink accepts any).
MAIL_FROM = "alice@example.org"
RCPT_TO = "bob@example.net"
GREETING = Reply(220, "", f"{GUARD} ESMTP smtpguard")
SINK_QUEUED = Reply(250, "2.0.0", "Ok")  # smtp-sink's reply to the end of data, passed on by smtpguard
EHLO = f"EHLO {CLIENT_NAME}\r\n".encode()


# -- a raw client ----------------------------------------------------------------------------


class RawClient:
    """A blocking SMTP client for a thread: it writes exactly the bytes it is given
    and reads replies with Reply.from_lines."""

    def __init__(self, port: int, timeout: float = CLIENT_TIMEOUT) -> None:
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._received = b""

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.socket.close()

    def send(self, data: bytes) -> None:
        self.socket.sendall(data)

    def reply(self) -> Reply:
        lines: list[bytes] = []
        while not lines or lines[-1][3:4] == b"-":
            lines.append(self._line())
        return Reply.from_lines(lines)

    def replies(self, count: int) -> list[Reply]:
        return [self.reply() for _ in range(count)]

    def _line(self) -> bytes:
        while b"\r\n" not in self._received:
            data = self.socket.recv(65536)
            if not data:
                raise ConnectionError(f"closed by the server; unfinished line {self._received!r}")
            self._received += data
        line, self._received = self._received.split(b"\r\n", 1)
        return line

    def poll(self) -> bool:
        """Whether the server said something within the socket's timeout."""
        try:
            data = self.socket.recv(65536)
        except TimeoutError:
            return False
        self._received += data
        return True

    def closed_by_server(self) -> bool:
        """Whether the server has closed the connection with nothing more to say
        (waits up to the socket's timeout)."""
        if self._received:
            return False
        try:
            return self.socket.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def converse(port: int, *steps: tuple[bytes, int]) -> list[Reply]:
    """Connect, then for each (bytes, count) write the bytes as they are and read
    ``count`` replies; every reply, the greeting first."""
    with RawClient(port) as client:
        heard = [client.reply()]
        for data, count in steps:
            client.send(data)
            heard += client.replies(count)
        return heard


def envelope_lines(sender: str = MAIL_FROM, recipient: str = RCPT_TO) -> bytes:
    return f"MAIL FROM:<{sender}>\r\nRCPT TO:<{recipient}>\r\n".encode()


def text_message(subject: str, body: bytes = b"Hello Bob.\r\n") -> bytes:
    return f"From: <{MAIL_FROM}>\r\nTo: <{RCPT_TO}>\r\nSubject: {subject}\r\n\r\n".encode() + body


FOLLOW_UP = text_message("follow-up", b"The next transaction on the same connection.\r\n")


async def start(
    listening: list[IListeningPort], upstream: str, server: dict[str, Any] | None = None, description: str = LOOPBACK
) -> tuple[GuardFactory, int]:
    """smtpguard as twistd builds it (tap.build_factory, built-in scanner) on loopback."""
    factory = tap.build_factory(guard_config(upstream, server), reactor)
    return factory, await listen(listening, factory, description)


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        await sleep(0.02)


async def dumps(sink: SmtpSink, expected: int) -> list[bytes]:
    found: list[bytes] = await in_thread(sink.messages, expected)
    return found


def nowhere() -> str:
    """A next hop nobody listens on: for tests that never get as far as MAIL."""
    return f"tcp:127.0.0.1:{free_port()}"


# -- SMTP smuggling, through smtpguard to smtp-sink --------------------------------------------

# What a smuggler hides behind a fake end of data: a whole second transaction.
SMUGGLED = (
    b"MAIL FROM:<mallory@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
    b"From: <ceo@example.net>\r\nSubject: smuggled\r\n\r\nPlease wire the money.\r\n"
)
SMUGGLING_HEAD = text_message("smuggling", b"first")
FAKE_ENDINGS = {
    "LF.LF": b"\n.\n",
    "CR.CR": b"\r.\r",
    "LF.CRLF": b"\n.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "CR.CRLF": b"\r.\r\n",
}
# How each fake ending is stored after DATA's unstuffing and CRLF normalisation
# (tests.test_server's smuggling test): after CRLF, ".\n" loses its stuffed dot.
STORED_AFTER_DATA = {
    "LF.LF": b"\r\n.\r\n",
    "CR.CR": b"\r\n.\r\n",
    "LF.CRLF": b"\r\n.\r\n",
    "CRLF.LF": b"\r\n\r\n",
    "CR.CRLF": b"\r\n.\r\n",
}


def assert_one_smuggling_message(found: list[bytes], stored: bytes) -> None:
    """smtp-sink received the smuggling message whole, with the smuggled transaction
    as its text, then the follow-up; never a message of the smuggler's envelope."""
    assert len(found) == 2, found
    [smuggling] = [dump for dump in found if b"Subject: smuggling" in dump]
    [follow_up] = [dump for dump in found if b"Subject: follow-up" in dump]
    assert smuggling.endswith(lf(stored) + b"\n"), smuggling
    assert follow_up.endswith(lf(FOLLOW_UP) + b"\n"), follow_up
    for dump in found:
        assert f"X-Mail-Args: <{MAIL_FROM}>\n".encode() in dump
        assert f"X-Rcpt-Args: <{RCPT_TO}>\n".encode() in dump
        assert b"X-Rcpt-Args: <victim@example.net>" not in dump


@pytest.mark.parametrize("name", list(FAKE_ENDINGS))
@pytest_twisted.ensureDeferred
async def test_smuggling_with_data_reaches_smtp_sink_as_one_message(
    name: str, listening: list[IListeningPort], smtp_sink: SmtpSink
) -> None:
    """A fake end of data (bare CR/LF around the dot) followed by a smuggled MAIL,
    RCPT, DATA and message, then the real CRLF.CRLF, all pipelined: smtp-sink gets
    ONE message carrying the smuggled text, and the session goes on in sync."""
    _, port = await start(listening, smtp_sink.endpoint)
    message = SMUGGLING_HEAD + FAKE_ENDINGS[name] + SMUGGLED

    heard = await in_thread(
        converse,
        port,
        (EHLO, 1),
        (envelope_lines() + b"DATA\r\n" + message + b".\r\n", 4),
        (b"NOOP\r\n", 1),
        (envelope_lines() + b"DATA\r\n" + FOLLOW_UP + b".\r\n", 4),
        (b"QUIT\r\n", 1),
    )

    assert [reply.code for reply in heard] == [220, 250, 250, 250, 354, 250, 250, 250, 250, 354, 250, 221]
    assert heard[5] == heard[10] == SINK_QUEUED
    assert heard[6] == replies.OK
    stored = SMUGGLING_HEAD + STORED_AFTER_DATA[name] + SMUGGLED
    assert_one_smuggling_message(await dumps(smtp_sink, 2), stored)


@pytest.mark.parametrize("name", [*FAKE_ENDINGS, "CRLF.CRLF"])
@pytest_twisted.ensureDeferred
async def test_smuggling_with_bdat_reaches_smtp_sink_as_one_message(
    name: str, listening: list[IListeningPort], smtp_sink: SmtpSink
) -> None:
    """BDAT chunks whose data holds an end of data (bare or a real CRLF.CRLF, split
    across the two chunks) and a smuggled transaction: relayed with DATA, smtp-sink
    gets ONE message carrying the smuggled text, and the session goes on in sync."""
    _, port = await start(listening, smtp_sink.endpoint)
    ending = FAKE_ENDINGS.get(name, b"\r\n.\r\n")
    data = SMUGGLING_HEAD + ending + SMUGGLED + b".\r\n" + b"more smuggled lines\r\n"
    cut = len(SMUGGLING_HEAD) + 1  # inside the ending
    chunks = chunk(data[:cut]) + chunk(data[cut:], last=True)

    heard = await in_thread(
        converse,
        port,
        (EHLO, 1),
        (envelope_lines() + chunks, 4),
        (b"NOOP\r\n", 1),
        (envelope_lines() + chunk(FOLLOW_UP, last=True), 3),
        (b"QUIT\r\n", 1),
    )

    assert [reply.code for reply in heard] == [220, 250, 250, 250, 250, 250, 250, 250, 250, 250, 221]
    assert heard[4] == replies.CHUNK_RECEIVED.with_text(f"Ok: {cut} octets received")
    assert heard[5] == heard[9] == SINK_QUEUED
    # BDAT data is not dot-stuffed: only its line endings are made CRLF.
    stored = SMUGGLING_HEAD + b"\r\n.\r\n" + SMUGGLED + b".\r\nmore smuggled lines\r\n"
    assert_one_smuggling_message(await dumps(smtp_sink, 2), stored)


# -- slow and idle clients (Clock) ----------------------------------------------------------


@pytest.mark.parametrize("command", ["DATA", "BDAT"])
def test_one_byte_per_second_client_is_served(command: str) -> None:
    """A client writing one byte per second gets every reply and its message relayed,
    within the session deadline."""
    s = Session.open()
    s.replies()
    if command == "DATA":
        wire = EHLO + transaction() + b"QUIT\r\n"
        expected = [*transaction_replies(), replies.CLOSING.to_bytes()]
    else:
        wire = EHLO + transaction().split(b"DATA\r\n")[0] + chunk(MESSAGE, last=True) + b"QUIT\r\n"
        expected = [*transaction_replies()[:2], QUEUED.to_bytes(), replies.CLOSING.to_bytes()]
    assert len(wire) < s.factory.settings.session_timeout
    for index in range(len(wire)):
        s.send(wire[index : index + 1])
        s.clock.advance(1)
    heard = s.replies()
    assert heard[0].startswith(b"250-") and heard[1:] == expected
    [delivery] = s.hop.delivered
    assert delivery.data.endswith(MESSAGE)


@pytest.mark.parametrize(
    ("command_timeout", "session_timeout", "cut_at", "reply"),
    [(300.0, 3600.0, 300.0, replies.TIMEOUT), (3600.0, 600.0, 600.0, replies.SESSION_TOO_LONG)],
    ids=["command-timeout-first", "session-deadline-first"],
)
def test_idle_client_is_cut(command_timeout: float, session_timeout: float, cut_at: float, reply: Reply) -> None:
    """A client that never says a word after the greeting is cut with 421 4.4.2 at
    the command timeout or the session deadline, whichever comes first; no timer is left."""
    s = Session.open(command_timeout=command_timeout, session_timeout=session_timeout)
    s.replies()
    s.clock.advance(cut_at - 1)
    assert s.replies() == []
    assert not s.closed
    s.clock.advance(1)
    assert s.replies() == [reply.to_bytes()]
    assert s.closed
    s.lose()
    assert [call for call in s.clock.getDelayedCalls() if call.active()] == []


@pytest.mark.parametrize(
    ("prologue", "prologue_replies", "cut_after", "reply"),
    [
        (b"NOOP ", [], 60.0, replies.TIMEOUT),
        (b"DATA\r\n", [replies.START_DATA.to_bytes()], 300.0, replies.MESSAGE_TOO_SLOW),
        (b"BDAT 1000000 LAST\r\n", [], 300.0, replies.MESSAGE_TOO_SLOW),
    ],
    ids=["command-line", "DATA", "BDAT"],
)
def test_regression_slow_loris_is_cut(
    prologue: bytes, prologue_replies: list[bytes], cut_after: float, reply: Reply
) -> None:
    """A client that sends one byte just before each timeout, forever, is cut with
    421 4.4.2: inside a command line at command_timeout (per command, not per
    byte), inside DATA or a BDAT chunk at message_timeout (the whole message);
    nothing is relayed and the next hop's transaction is ended."""
    s = ready(session_timeout=10_000.0, command_timeout=60.0, data_timeout=60.0, message_timeout=300.0)
    s.begin()
    s.send(prologue)
    started = s.clock.seconds()
    assert s.replies() == prologue_replies
    while s.clock.seconds() + 59 < started + cut_after:
        s.send(b"x")
        s.clock.advance(59)
        assert not s.closed
    s.send(b"x")
    s.clock.advance(started + cut_after - s.clock.seconds() - 0.5)
    assert (s.replies(), s.closed) == ([], False)
    s.clock.advance(0.5)
    assert s.replies() == [reply.to_bytes()]
    assert s.closed
    s.lose()
    assert s.hop.delivered == []
    assert s.hop.commands == [f"MAIL {SENDER}", f"RCPT {RECIPIENT}", "QUIT"]


def wait_for_cut(port: int, steps: bytes, count: int, drip: bytes | None) -> tuple[list[Reply], Reply, bool]:
    """Connect, write ``steps`` and read ``count`` replies, then (when ``drip`` is
    given) write it byte by byte every 0.3 s until the server speaks: (replies,
    the server's last word, whether it then closed)."""
    with RawClient(port, timeout=10.0) as client:
        heard = [client.reply()]
        client.send(steps)
        heard += client.replies(count)
        if drip is not None:
            client.socket.settimeout(0.3)
            for byte in (drip[i : i + 1] for i in range(len(drip))):
                client.send(byte)
                if client.poll():
                    break
            client.socket.settimeout(10.0)
        last = client.reply()
        return heard, last, client.closed_by_server()


@pytest_twisted.ensureDeferred
async def test_idle_client_on_a_real_socket_is_disconnected(listening: list[IListeningPort]) -> None:
    """With [server] command_timeout = 1, a client that stays silent after EHLO gets
    421 4.4.2 and the connection is closed (when exactly: test_idle_client_is_cut,
    on a Clock)."""
    _, port = await start(listening, nowhere(), {"command_timeout": 1.0})

    heard, last, closed = await in_thread(wait_for_cut, port, EHLO, 1, None)

    assert heard[:1] == [GREETING] and heard[1].code == 250
    assert (last, closed) == (replies.TIMEOUT, True)


@pytest_twisted.ensureDeferred
async def test_slow_loris_on_a_real_socket_is_cut_at_the_session_deadline(
    listening: list[IListeningPort], smtp_sink: SmtpSink
) -> None:
    """With [server] session_timeout = 2 and data_timeout = 1, a client dripping
    DATA one byte every 0.3 s (each byte within data_timeout) gets the session
    deadline's 421 4.4.2, the connection is closed, and smtp-sink receives nothing.
    (When exactly: test_idle_client_is_cut, on a Clock.)"""
    server = {"session_timeout": 2.0, "data_timeout": 1.0, "command_timeout": 1.0}
    _, port = await start(listening, smtp_sink.endpoint, server)

    heard, last, closed = await in_thread(wait_for_cut, port, EHLO + envelope_lines() + b"DATA\r\n", 4, b"x" * 100)

    assert heard[:1] == [GREETING] and heard[1].code == 250
    assert heard[2:] == [replies.SENDER_OK, replies.RECIPIENT_OK, replies.START_DATA]
    assert (last, closed) == (replies.SESSION_TOO_LONG, True)
    await eventually(lambda: list(smtp_sink.directory.iterdir()) == [], "smtp-sink drops the unfinished transaction")


# -- many half-open connections -------------------------------------------------------------


def open_silent(port: int, count: int) -> list[tuple[RawClient, Reply]]:
    """``count`` connections that never send anything, each with its first reply."""
    clients = [RawClient(port, timeout=10.0) for _ in range(count)]
    return [(client, client.reply()) for client in clients]


def refused_and_closed(port: int) -> tuple[Reply, bool]:
    with RawClient(port, timeout=10.0) as client:
        return client.reply(), client.closed_by_server()


def send_with_smtplib(port: int, message: bytes) -> list[tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname=CLIENT_NAME, timeout=CLIENT_TIMEOUT) as client:
        client.ehlo()
        return [client.mail(MAIL_FROM), client.rcpt(RCPT_TO), client.data(message)]


@pytest_twisted.ensureDeferred
async def test_connections_beyond_max_connections_are_refused_and_cleaned_up(
    listening: list[IListeningPort], smtp_sink: SmtpSink
) -> None:
    """200 silent connections with max_connections = 100 (and no per-client limit,
    since all come from 127.0.0.1): 100 are greeted, 100 get 421 4.7.0 and are
    closed; an ordinary client is refused while all slots are taken and served
    once some close; at the end the factory counts 0 connections."""
    factory, port = await start(
        listening,
        smtp_sink.endpoint,
        {"max_connections": 100, "max_connections_per_client": 0},
        "tcp:0:interface=127.0.0.1:backlog=512",
    )
    opened = await in_thread(open_silent, port, 200)
    try:
        greeted = [client for client, reply in opened if reply == GREETING]
        refused = [client for client, reply in opened if reply == replies.TOO_MANY_CONNECTIONS]
        assert (len(greeted), len(refused)) == (100, 100), [reply for _, reply in opened]
        assert all(await in_thread(lambda: [client.closed_by_server() for client in refused]))
        await eventually(lambda: factory.connections == 100, "only the greeted connections are counted")

        assert await in_thread(refused_and_closed, port) == (replies.TOO_MANY_CONNECTIONS, True)

        for client in greeted[:10]:
            client.close()
        await eventually(lambda: factory.connections == 90, "closed connections free their slots")
        answers = await in_thread(send_with_smtplib, port, FOLLOW_UP)
        assert answers == [(250, b"2.1.0 Ok"), (250, b"2.1.5 Ok"), (250, b"2.0.0 Ok")]
        [dump] = await dumps(smtp_sink, 1)
        assert dump.endswith(lf(FOLLOW_UP) + b"\n")
    finally:
        for client, _ in opened:
            client.close()
    await eventually(lambda: factory.connections == 0, "every connection is cleaned up")


# -- huge headers ---------------------------------------------------------------------------


def filler_headers(size: int) -> bytes:
    """Header fields of 100 bytes each (CRLF included), ``size`` bytes or a little more."""
    return b"".join(b"X-Filler-%07d: " % number + b"f" * 81 + b"\r\n" for number in range(size // 100 + 1))


def header_message(fields: bytes, body: bytes = b"The body.\r\n") -> bytes:
    return f"From: <{MAIL_FROM}>\r\nSubject: big header\r\n".encode() + fields + b"\r\n" + body


TWO_MB_OF_FIELDS = header_message(filler_headers(2 * 1024 * 1024))
LONG_FIELD = b"X-Long: " + b"L" * 100_000 + b"\r\n"


def stream_in(s: Session, message: bytes) -> int:
    """Send DATA and ``message`` in 64 KiB packets, then the final dot; the peak of
    memory traced while the message streamed in."""
    s.send(b"DATA\r\n")
    tracemalloc.start()
    try:
        for offset in range(0, len(message), 65536):
            s.send(message[offset : offset + 65536])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    s.send(b".\r\n", b"NOOP\r\n")
    return peak


def test_100_kb_header_line_is_relayed_intact_with_bounded_memory() -> None:
    """One 100 KB header line, sent in 64 KiB packets: accepted and relayed byte for
    byte, and while it streams in the session holds less than 512 KiB."""
    s = ready(spool_memory=256 * 1024)
    s.begin()
    message = header_message(LONG_FIELD)
    peak = stream_in(s, message)
    assert s.replies() == [replies.START_DATA.to_bytes(), QUEUED.to_bytes(), replies.OK.to_bytes()]
    assert peak < 512 * 1024, peak
    [delivery] = s.hop.delivered
    assert delivery.data.endswith(b"X-Virus-Status: clean\r\n" + message)


def test_two_megabytes_of_header_fields_are_refused_with_bounded_memory() -> None:
    """Two megabytes of header fields, sent in 64 KiB packets: while they stream in
    the session holds less than a megabyte (spool_memory is 256 KiB); the header
    section is longer than smtpguard reads (1 MiB), so the message is refused with
    552 5.3.4, the next hop's transaction is reset with nothing delivered, and the
    session goes on."""
    s = ready(spool_memory=256 * 1024)
    s.begin()
    peak = stream_in(s, TWO_MB_OF_FIELDS)
    assert s.replies() == [
        replies.START_DATA.to_bytes(),
        replies.HEADER_TOO_BIG.to_bytes(),
        replies.OK.to_bytes(),
    ]
    assert peak < 1024 * 1024, peak
    assert (s.hop.commands, s.hop.delivered) == ([f"MAIL {SENDER}", f"RCPT {RECIPIENT}", "RSET"], [])
    s.send(transaction())
    assert s.replies() == transaction_replies()
    [delivery] = s.hop.delivered
    assert delivery.data.endswith(b"X-Virus-Status: clean\r\n" + MESSAGE)


def test_forged_status_headers_in_a_huge_header_section_are_never_relayed() -> None:
    """X-Virus-Status / X-Virus-Scanned forged by the client at the top of a header
    section longer than a megabyte never reach the next hop: smtpguard cannot read
    such a section whole to drop them, so the message is refused with 552 5.3.4."""
    forged = b"X-Virus-Status: clean\r\nX-Virus-Scanned: forged\r\n"
    s = ready()
    s.send(transaction(data=forged + TWO_MB_OF_FIELDS))
    assert s.replies() == transaction_replies(final=replies.HEADER_TOO_BIG)
    assert (s.hop.commands, s.hop.delivered) == ([f"MAIL {SENDER}", f"RCPT {RECIPIENT}", "RSET"], [])


@pytest_twisted.ensureDeferred
async def test_huge_headers_reach_smtp_sink_intact(listening: list[IListeningPort], smtp_sink: SmtpSink) -> None:
    """900 KB of header fields plus a 100 KB header line (a header section just
    under a mebibyte) reach smtp-sink byte for byte, spooled to disk through
    [server] spool_memory."""
    _, port = await start(listening, smtp_sink.endpoint, {"spool_memory": 256 * 1024})
    message = header_message(filler_headers(900 * 1000) + LONG_FIELD)
    assert len(message.split(b"\r\n\r\n")[0]) < 1024 * 1024

    heard = await in_thread(converse, port, (EHLO, 1), (envelope_lines() + b"DATA\r\n" + message + b".\r\n", 4))

    assert heard[2:] == [replies.SENDER_OK, replies.RECIPIENT_OK, replies.START_DATA, SINK_QUEUED]
    [dump] = await dumps(smtp_sink, 1)
    assert dump.endswith(b"X-Virus-Status: clean\n" + lf(message) + b"\n")


# -- 10,000 recipients in one packet --------------------------------------------------------


def many_recipients(count: int) -> list[str]:
    return [f"user{number:05d}@example.com" for number in range(count)]


def test_ten_thousand_recipients_beyond_max_recipients() -> None:
    """10,000 RCPTs pipelined in one packet with max_recipients = 1000: the first 1000
    get 250, the other 9000 452 4.5.3, in order; the message goes to the 1000, and
    the session is in sync."""
    s = ready(max_recipients=1000)
    recipients = many_recipients(10_000)
    s.send(transaction(recipients=recipients) + b"NOOP\r\n")
    assert s.replies() == [
        replies.SENDER_OK.to_bytes(),
        *[replies.RECIPIENT_OK.to_bytes()] * 1000,
        *[replies.TOO_MANY_RECIPIENTS.to_bytes()] * 9000,
        replies.START_DATA.to_bytes(),
        QUEUED.to_bytes(),
        replies.OK.to_bytes(),
    ]
    [delivery] = s.hop.delivered
    assert [recipient.address for recipient in delivery.envelope.recipients] == recipients[:1000]
    assert s.hop.commands == [f"MAIL {SENDER}", *(f"RCPT {address}" for address in recipients[:1000]), "DATA"]


def test_ten_thousand_recipients_within_max_recipients() -> None:
    """With max_recipients = 10,000, all 10,000 pipelined RCPTs are accepted and the
    message goes to every one of them."""
    s = ready(max_recipients=10_000)
    recipients = many_recipients(10_000)
    s.send(transaction(recipients=recipients) + b"NOOP\r\n")
    assert s.replies() == [*transaction_replies(recipients=10_000), replies.OK.to_bytes()]
    [delivery] = s.hop.delivered
    assert [recipient.address for recipient in delivery.envelope.recipients] == recipients


# -- a message at SIZE and at SIZE + 1 ------------------------------------------------------

SIZE = 10_000


def sized_message(size: int) -> bytes:
    """A message of exactly ``size`` bytes as stored, with a line that starts with a
    dot (one byte more on the wire with DATA, where it is stuffed)."""
    head = b"Subject: size\r\n\r\n.dotted line\r\n"
    return head + b"y" * (size - len(head) - 2) + b"\r\n"


def send_sized(s: Session, message: bytes, command: str) -> list[bytes]:
    """One transaction with ``message`` (DATA stuffs its dot lines), then NOOP; the replies after MAIL and RCPT."""
    s.begin()
    if command == "DATA":
        s.send(b"DATA\r\n" + message.replace(b"\r\n.", b"\r\n..") + b".\r\n" + b"NOOP\r\n")
    else:
        half = len(message) // 2
        s.send(chunk(message[:half]) + chunk(message[half:], last=True) + b"NOOP\r\n")
    return s.replies()


@pytest.mark.parametrize("command", ["DATA", "BDAT"])
def test_message_of_exactly_size_is_accepted(command: str) -> None:
    """A message of exactly the advertised SIZE (counted unstuffed) is accepted and relayed whole."""
    s = ready(max_message_size=SIZE)
    message = sized_message(SIZE)
    heard = send_sized(s, message, command)
    first = replies.START_DATA.to_bytes() if command == "DATA" else received(SIZE // 2)
    assert heard == [first, QUEUED.to_bytes(), replies.OK.to_bytes()]
    [delivery] = s.hop.delivered
    assert delivery.data.endswith(b"X-Virus-Status: clean\r\n" + message)


@pytest.mark.parametrize("command", ["DATA", "BDAT"])
def test_message_one_byte_over_size_gets_552_and_the_session_goes_on(command: str) -> None:
    """A message of SIZE + 1 bytes gets 552 5.3.4 after its end (final dot or LAST
    chunk), nothing is relayed, and the next transaction on the session is."""
    s = ready(max_message_size=SIZE)
    message = sized_message(SIZE + 1)
    heard = send_sized(s, message, command)
    first = replies.START_DATA.to_bytes() if command == "DATA" else received((SIZE + 1) // 2)
    assert heard == [first, replies.MESSAGE_TOO_BIG.to_bytes(), replies.OK.to_bytes()]
    assert s.hop.delivered == []
    s.send(transaction())
    assert s.replies() == transaction_replies()
    [delivery] = s.hop.delivered
    assert delivery.data.endswith(MESSAGE)


# -- a spool that cannot be written ---------------------------------------------------------

SPOOLED = b"Subject: spooled\r\n\r\n" + (b"s" * 98 + b"\r\n") * 100  # > spool_memory below
SPOOL_MEMORY = 1024


@pytest.fixture(params=["missing-directory", "under-a-regular-file"])
def unwritable_spool(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A spool_directory in which nobody, root included, can create a file."""
    if request.param == "missing-directory":
        return str(tmp_path / "missing")
    (tmp_path / "file").write_bytes(b"")
    return str(tmp_path / "file" / "spool")


def spool_wire(message: bytes, command: str) -> bytes:
    if command == "DATA":
        return transaction(data=message)
    return transaction().split(b"DATA\r\n")[0] + chunk(message[:500]) + chunk(message[500:], last=True)


def spool_replies(final: Reply, command: str) -> list[bytes]:
    if command == "DATA":
        return transaction_replies(final=final)
    return [*transaction_replies()[:2], received(500), final.to_bytes()]


@pytest.mark.parametrize("command", ["DATA", "BDAT"])
def test_unwritable_spool_directory_gets_452_and_the_session_goes_on(unwritable_spool: str, command: str) -> None:
    """A message that outgrows spool_memory while spool_directory cannot be written
    gets 452 4.3.1; nothing reaches the next hop (it is reset), and the session
    still relays a message that fits in memory."""
    s = ready(spool_memory=SPOOL_MEMORY, spool_directory=unwritable_spool)
    s.send(spool_wire(SPOOLED, command), b"NOOP\r\n")
    assert s.replies() == [*spool_replies(replies.SPOOL_UNAVAILABLE, command), replies.OK.to_bytes()]
    assert s.hop.delivered == []
    assert s.hop.commands == [f"MAIL {SENDER}", f"RCPT {RECIPIENT}", "RSET"]
    s.send(transaction())
    assert s.replies() == transaction_replies()
    [delivery] = s.hop.delivered
    assert delivery.data.endswith(MESSAGE)


@pytest.fixture
def file_size_limit() -> Iterator[int]:
    """Files of this process cannot grow past the limit returned (writes fail with
    EFBIG instead of raising SIGXFSZ): a full disk, for root too."""
    limit = 64 * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.mark.parametrize("command", ["DATA", "BDAT"])
def test_spool_that_fills_up_mid_message_gets_452_and_relays_nothing(
    tmp_path: Path, file_size_limit: int, command: str
) -> None:
    """A spool file that cannot grow past 64 KiB while a 300 KiB message arrives:
    452 4.3.1 and never a half-written message at the next hop; the session goes on."""
    message = b"Subject: too big for the disk\r\n\r\n" + (b"d" * 98 + b"\r\n") * 3000
    assert len(message) > 4 * file_size_limit
    s = ready(spool_memory=SPOOL_MEMORY, spool_directory=str(tmp_path))
    s.send(spool_wire(message, command), b"NOOP\r\n")
    assert s.replies() == [*spool_replies(replies.SPOOL_UNAVAILABLE, command), replies.OK.to_bytes()]
    assert s.hop.delivered == []
    assert s.hop.commands == [f"MAIL {SENDER}", f"RCPT {RECIPIENT}", "RSET"]
    assert list(tmp_path.iterdir()) == []  # the spool file was anonymous, and is gone
    s.send(transaction())
    assert s.replies() == transaction_replies()


@pytest_twisted.ensureDeferred
async def test_unwritable_spool_directory_on_a_real_socket(
    listening: list[IListeningPort], smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    """[server] spool_directory gone after the start: a message past spool_memory
    gets 452 4.3.1 and smtp-sink receives nothing of it; the next (small) message on
    the same connection reaches smtp-sink."""
    spool = tmp_path / "spool"
    spool.mkdir()
    server = {"spool_memory": SPOOL_MEMORY, "spool_directory": str(spool)}
    _, port = await start(listening, smtp_sink.endpoint, server)
    spool.rmdir()

    heard = await in_thread(
        converse,
        port,
        (EHLO, 1),
        (envelope_lines() + b"DATA\r\n" + SPOOLED + b".\r\n", 4),
        (b"NOOP\r\n", 1),
        (envelope_lines() + b"DATA\r\n" + FOLLOW_UP + b".\r\n", 4),
    )

    assert heard[2:] == [
        replies.SENDER_OK,
        replies.RECIPIENT_OK,
        replies.START_DATA,
        replies.SPOOL_UNAVAILABLE,
        replies.OK,
        replies.SENDER_OK,
        replies.RECIPIENT_OK,
        replies.START_DATA,
        SINK_QUEUED,
    ]
    [dump] = await dumps(smtp_sink, 1)
    assert dump.endswith(lf(FOLLOW_UP) + b"\n")


# -- commands in disguise -------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    ["ma\u0131l FROM:<alice@example.org>", "r\u017fet", "\ufb06arttls"],
    ids=["dotless-i-MAIL", "long-s-RSET", "st-ligature-STARTTLS"],
)
def test_non_ascii_verb_is_no_command(line: str) -> None:
    """A verb with non-ASCII letters is not a command, even when str.upper() turns it
    into one (dotless i -> I, long s -> S, the st ligature -> ST): 500 5.5.1."""
    s = ready()
    s.send(line.encode() + b"\r\nNOOP\r\n")
    assert s.replies() == [replies.UNKNOWN_COMMAND.to_bytes(), replies.OK.to_bytes()]
    assert s.hop.commands == []


@pytest.mark.parametrize(
    "name",
    [b"evil\rX-Injected:\tyes", b"evil\x00", b"evil\x1b[2J", b"evil\tX-Injected:yes"],
    ids=["bare-CR", "NUL", "escape", "tab"],
)
def test_ehlo_name_with_control_characters_is_refused(name: bytes) -> None:
    """An EHLO name with a bare CR, a tab or another control character gets 501 5.5.4:
    it is never echoed in a reply nor written into the Received: header; the
    session goes on with a proper EHLO."""
    s = Session.open()
    s.replies()
    s.send(b"EHLO " + name + b"\r\n")
    assert s.replies() == [replies.HELO_REQUIRED.to_bytes()]
    s.hello()
    s.send(transaction())
    assert s.replies() == transaction_replies()
    [delivery] = s.hop.delivered
    assert BARE_CR_OR_LF.search(delivery.data) is None
    assert name not in delivery.data


def test_unusable_spool_directory_stops_the_start(tmp_path: Path) -> None:
    """A spool_directory that is not a writable directory is a start error naming the key."""
    from smtpguard import config as configuration
    from smtpguard import tap
    from smtpguard.config import ConfigError

    (tmp_path / "file").write_bytes(b"")
    data = {
        "server": {"spool_directory": str(tmp_path / "file" / "spool")},
        "upstream": {"endpoint": "tcp:127.0.0.1:1"},
        "scanners": [{"type": "builtin"}],
    }
    with pytest.raises(ConfigError, match=r"^f\.toml: server\.spool_directory: .* is not a writable directory$"):
        tap.build_factory(configuration.parse(data, "f.toml"), reactor)
