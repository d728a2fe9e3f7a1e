"""Attacks from the outside that still break a documented promise.

Each test sends what a hostile client sends, through smtpguard as twistd builds it
(tap.build_factory, built-in scanner) on real sockets to Postfix's smtp-sink, or
through the built-in scanner's public ``scan_now``, and asserts what docs/protocol.md,
docs/scanners/builtin.md and docs/quarantine.md promise.
"""

from __future__ import annotations

import base64
import io
import struct
import tracemalloc
import zipfile
from collections.abc import Callable

import pytest_twisted
from twisted.internet.interfaces import IListeningPort

from smtpguard import replies
from smtpguard.replies import Reply
from smtpguard.results import ErrorKind, ScanResult
from smtpguard.scanners.builtin import BuiltinScanner
from smtpguard.spool import Message
from tests.conftest import SinkStarter, SmtpSink
from tests.test_hostile import (
    EHLO,
    FOLLOW_UP,
    GREETING,
    SINK_QUEUED,
    RawClient,
    dumps,
    envelope_lines,
    start,
)
from tests.test_integration import in_thread

# -- a zip archive whose central directory decodes to millions of entries -------------------

# Entries in the inner archive's central directory: about 9 MB of directory (well
# under max_expanded_size) that deflates to a message of about 40 KB.
ENTRIES = 200_000
# What one scan may take beyond the message: docs/scanners/builtin.md keeps a nested
# archive in memory "up to 4 MiB while it is opened, and beyond that in a temporary
# file", and the parsed message at about five times its size.
SCAN_MEMORY = 16 * 1024 * 1024


def directory_only_zip(entries: int) -> bytes:
    """A zip archive of one empty stored member ``a`` whose central directory lists
    it ``entries`` times (zip readers take duplicate names)."""
    name = b"a"
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0) + name
    record = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0, 0, 0, 0, 0, 0)
    directory = (record + name) * entries
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, len(directory), len(local), 0)
    return local + directory + end


def directory_bomb(entries: int = ENTRIES) -> bytes:
    """A message with one zip attachment holding ``inner.zip``, deflated: the
    directory-only archive above."""
    outer = io.BytesIO()
    with zipfile.ZipFile(outer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("inner.zip", directory_only_zip(entries))
    encoded = base64.encodebytes(outer.getvalue()).replace(b"\n", b"\r\n")
    return (
        b"From: <alice@example.org>\r\nSubject: invoice\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: application/zip; name="invoice.zip"\r\nContent-Transfer-Encoding: base64\r\n\r\n' + encoded
    )


def peak_memory_of(work: Callable[[], object]) -> int:
    """The most memory Python allocated (in any thread) while ``work()`` ran."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_nested_zip_with_a_huge_central_directory_is_scanned_in_bounded_memory() -> None:
    """The attacker attaches a zip whose only member, inner.zip, deflates from 9 MB
    of central directory listing one empty file 200,000 times (a 40 KB message).
    The scan does end in content-size (more than max_parts members), but only after
    the zip reader has built an entry object for every one of the 200,000 records:
    the scan peaks at about 90 MB for 40 KB of mail (the full 365 KB form, 2,000,000
    records under max_expanded_size, takes 750 MB and 9 s of CPU in one step that
    no deadline interrupts).  builtin.md promises memory within a bounded multiple
    of the message, a nested archive in memory only up to 4 MiB, and max_parts
    counting archive members so that a message cannot make the parser build more."""
    message = directory_bomb()
    scanner = BuiltinScanner()

    def scan() -> None:
        spooled = Message.from_bytes(message)
        try:
            results.append(scanner.scan_now(spooled))
        finally:
            spooled.close()

    results: list[ScanResult] = []
    peak = peak_memory_of(scan)

    [result] = results
    assert result.error is ErrorKind.CONTENT_SIZE
    assert peak < len(message) * 5 + SCAN_MEMORY, f"{peak >> 20} MiB for a {len(message) >> 10} KiB message"


def send_and_measure(port: int, message: bytes) -> tuple[list[Reply], int]:
    """One transaction carrying ``message`` on a raw connection, then the follow-up
    message on the same connection; every reply and the peak memory of the process
    while smtpguard handled them."""
    heard: list[Reply] = []

    def converse() -> None:
        with RawClient(port, timeout=120.0) as client:
            heard.append(client.reply())
            client.send(EHLO)
            heard.append(client.reply())
            for data in (message, FOLLOW_UP):
                client.send(envelope_lines() + b"DATA\r\n")
                heard.extend(client.replies(3))
                client.send(data + b".\r\n")
                heard.append(client.reply())

    return heard, peak_memory_of(converse)


@pytest_twisted.ensureDeferred
async def test_zip_directory_bomb_over_smtp_gets_552_in_bounded_memory(
    listening: list[IListeningPort], smtp_sink: SmtpSink
) -> None:
    """Over real sockets, with the built-in scanner's defaults: the 40 KB message
    of test_nested_zip_with_a_huge_central_directory... gets 552 5.3.4 (content-size
    is rejected by default), smtp-sink gets only the follow-up message of the same
    session, and the process's memory stays within what builtin.md promises for one
    scan.  What goes wrong: the session's scan takes about 90 MB for 40 KB sent;
    a few connections (or four clients, max_scans) sending the 365 KB form take
    3 GB."""
    _, port = await start(listening, smtp_sink.endpoint)
    message = directory_bomb()

    heard, peak = await in_thread(send_and_measure, port, message)

    assert heard[0] == GREETING and heard[1].code == 250
    transaction = [replies.SENDER_OK, replies.RECIPIENT_OK, replies.START_DATA]
    assert heard[2:] == [*transaction, replies.SCAN_TOO_BIG, *transaction, SINK_QUEUED]
    [dump] = await dumps(smtp_sink, 1)
    assert b"Subject: follow-up" in dump
    assert peak < len(message) * 5 + SCAN_MEMORY, f"{peak >> 20} MiB for a {len(message) >> 10} KiB message"


# -- a BDAT command line over max_line_length ------------------------------------------------

SMUGGLED_RCPT = b"RCPT TO:<victim@example.net>\r\n"


def overlong_bdat(port: int) -> tuple[list[Reply], bytes, bool]:
    """EHLO, MAIL, RCPT, then a BDAT whose size is written with 2100 leading zeros
    (a line over max_line_length) followed by its chunk, which looks like a RCPT.
    The replies up to the one for the BDAT line, what the server wrote after it,
    and whether it then closed the connection (waiting at most 2 s for either)."""
    size = len(SMUGGLED_RCPT)
    bdat = b"BDAT " + b"0" * 2100 + b"%d LAST\r\n" % size
    with RawClient(port, timeout=5.0) as client:
        heard = [client.reply()]
        client.send(EHLO + envelope_lines())
        heard += client.replies(3)
        client.send(bdat + SMUGGLED_RCPT)
        heard.append(client.reply())
        client.socket.settimeout(2.0)
        later, closed = b"", False
        try:
            while not closed:
                data = client.socket.recv(65536)
                later += data
                closed = data == b""
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed = True
        return heard, later, closed


@pytest_twisted.ensureDeferred
async def test_overlong_bdat_line_never_lets_its_chunk_run_as_commands(
    listening: list[IListeningPort], smtp_sinks: SinkStarter
) -> None:
    """The client writes `BDAT 000...0030 LAST` with its size padded past
    max_line_length (2048), then the 30-byte chunk `RCPT TO:<victim@example.net>`.
    smtpguard answers 500 5.5.2 for the line, as for any over-long line, and then
    reads the chunk as a command: the next hop is asked for RCPT TO:<victim> and the
    client hears 250 2.1.5.  protocol.md: every BDAT chunk is read to its end and a
    chunk's bytes are never read as commands; a BDAT whose size cannot be read is
    answered and the connection closed, since its chunk cannot be told from
    commands.  Expected: 500 5.5.2, then the connection is closed; the next hop
    never hears of the victim."""
    sink = smtp_sinks("sink")
    _, port = await start(listening, sink.endpoint)

    heard, later, closed = await in_thread(overlong_bdat, port)

    assert heard[2:] == [replies.SENDER_OK, replies.RECIPIENT_OK, replies.LINE_TOO_LONG]
    assert (later, closed) == (b"", True)
    assert [line for line in sink.commands() if line.startswith("RCPT")] == ["RCPT TO:<bob@example.net>"]


# -- an ENVID whose xtext decodes to a line break ---------------------------------------------


def envid_session(port: int) -> list[Reply]:
    with RawClient(port) as client:
        heard = [client.reply()]
        client.send(EHLO + b"MAIL FROM:<alice@example.org> ENVID=QQ+0D+0AX-Evil:+20yes\r\nRSET\r\n")
        heard += client.replies(3)
        return heard


@pytest_twisted.ensureDeferred
async def test_envid_that_decodes_to_crlf_is_refused_at_mail(
    listening: list[IListeningPort], smtp_sink: SmtpSink
) -> None:
    """The client sends `MAIL FROM:<alice@example.org> ENVID=QQ+0D+0AX-Evil:+20yes`.
    smtpguard answers 250 and keeps the ENVID; with a quarantine, the entry's
    metadata then holds `"envid": "QQ\\r\\nX-Evil: yes"`, a CR LF from the client
    (docs/quarantine.md: `envid` is decoded).  protocol.md refuses a MAIL or RCPT
    parameter with a control character with 501 5.5.4, and for the other xtext
    parameter, ORCPT, names exactly this case: "an escape that decodes to a control
    character (+0D+0A)" is refused.  Expected: 501 5.5.4, and the session goes on."""
    _, port = await start(listening, smtp_sink.endpoint)

    heard = await in_thread(envid_session, port)

    assert heard[0] == GREETING and heard[1].code == 250
    assert (heard[2].code, heard[2].enhanced) == (501, "5.5.4")
    assert heard[3] == replies.RESET_OK


# -- a message with no empty line in its first MiB --------------------------------------------


def one_message(port: int, message: bytes) -> list[Reply]:
    with RawClient(port, timeout=60.0) as client:
        heard = [client.reply()]
        client.send(EHLO + envelope_lines() + b"DATA\r\n")
        heard += client.replies(4)
        client.send(message + b".\r\n")
        heard.append(client.reply())
        client.send(b"RSET\r\n")
        heard.append(client.reply())
        return heard


@pytest_twisted.ensureDeferred
async def test_two_megabyte_message_without_an_empty_line_gets_the_documented_552(
    listening: list[IListeningPort], smtp_sink: SmtpSink
) -> None:
    """A client sends a 2.6 MB message: one header field, then text lines, and no
    empty line.  Its header section (up to the empty line) is over the documented
    1 MiB limit, so forged status headers could not be removed from it: it is
    refused with 552 5.3.4 (docs/protocol.md, limits), nothing reaches the next
    hop, and the session goes on."""
    _, port = await start(listening, smtp_sink.endpoint)
    message = b"Subject: nightly log\r\n" + b"2026-11-30 job finished without errors\r\n" * 65_000

    heard = await in_thread(one_message, port, message)

    assert heard[2:] == [
        replies.SENDER_OK,
        replies.RECIPIENT_OK,
        replies.START_DATA,
        replies.HEADER_TOO_BIG,
        replies.RESET_OK,
    ]
    assert list(smtp_sink.directory.iterdir()) == []
