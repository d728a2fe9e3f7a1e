"""The strict next hop of tests/strict_hop.py is as strict as Postfix's smtpd:
each out-of-state command gets Postfix's reply, a message is queued only at a
complete end of data it answered 250, BDAT chunk bytes are never read as
commands, and its gates hold it where a test says.  Clients are smtplib and raw
sockets, in a thread, so that the reactor keeps serving the hop; the last tests
compare its replies with those of a private instance of Debian's Postfix."""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.internet.defer import Deferred

from smtpguard.replies import Reply
from tests.conftest import PostfixInstances, StrictHops, free_port
from tests.strict_hop import Postfix, StrictHop, fill

EHLO = b"EHLO client.test\r\n"
MAIL = b"MAIL FROM:<alice@example.org>\r\n"
RCPT = b"RCPT TO:<bob@example.com>\r\n"
MESSAGE = b"Subject: strict\r\n\r\nHello Bob.\r\n.starts with a dot\r\n"
STUFFED = b"Subject: strict\r\n\r\nHello Bob.\r\n..starts with a dot\r\n"


def in_thread(function: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
    return threads.deferToThread(function, *args, **kwargs)


def read_reply(stream: Any) -> bytes:
    """One whole reply (all its lines), or b"" when the connection is closed."""
    reply = b""
    try:
        while line := stream.readline():
            reply += line
            if line[3:4] != b"-":
                break
    except ConnectionResetError:
        pass
    return reply


def talk(
    port: int, steps: Sequence[bytes], then: bytes = b"", context: ssl.SSLContext | None = None
) -> list[bytes]:
    """Connect, read the greeting, send each step and read its reply; then send
    ``then`` without waiting for anything and close.  A step that starts with
    b"STARTTLS\\r\\n" is followed by the handshake (with ``context``).  The greeting
    and replies, raw."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock: socket.socket = raw
    stream = sock.makefile("rb")
    heard = [read_reply(stream)]
    for step in steps:
        try:
            sock.sendall(step)
        except OSError:  # closed by the server
            heard.append(b"")
            continue
        heard.append(read_reply(stream))
        if step.upper().startswith(b"STARTTLS\r\n") and heard[-1].startswith(b"220"):
            assert context is not None
            sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
            stream = sock.makefile("rb")
    if then:
        sock.sendall(then)
    sock.close()
    return heard


def pipeline(port: int, groups: Sequence[bytes]) -> None:
    """Send each group of command lines in one write and read a reply per line."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        stream = sock.makefile("rb")
        read_reply(stream)
        for group in groups:
            sock.sendall(group)
            for _ in range(group.count(b"\n")):
                read_reply(stream)


def wire(*replies: Reply) -> list[bytes]:
    return [reply.to_bytes() for reply in replies]


DEFAULT_EHLO = ("PIPELINING", "SIZE 10240000", "ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8", "CHUNKING")
GREETING = Reply(220, "", "hop.test ESMTP Postfix")


def ehlo_reply(*keywords: str) -> Reply:
    """The hop's EHLO reply offering ``keywords`` (all of the default ones if none)."""
    return Reply(250, "", "\n".join(["hop.test", *(keywords or DEFAULT_EHLO)]))

# (steps, the reply to the last step): commands out of their order.
OUT_OF_STATE = {
    "mail-before-ehlo": ([MAIL], Postfix.NEED_HELO),
    "nested-mail": ([EHLO, MAIL, MAIL], Postfix.NESTED_MAIL),
    "rcpt-before-mail": ([EHLO, RCPT], Postfix.NEED_MAIL),
    "data-before-mail": ([EHLO, b"DATA\r\n"], Postfix.NEED_RCPT),
    "data-before-rcpt": ([EHLO, MAIL, b"DATA\r\n"], Postfix.NO_VALID_RECIPIENTS),
    "bdat-before-mail": ([EHLO, b"BDAT 6 LAST\r\nQUIT\r\n"], Postfix.NEED_RCPT),
    "bdat-before-rcpt": ([EHLO, MAIL, b"BDAT 6\r\nQUIT\r\n"], Postfix.NO_VALID_RECIPIENTS),
    "data-after-bdat": ([EHLO, MAIL, RCPT, b"BDAT 2\r\nab", b"DATA\r\n"], Postfix.DATA_AFTER_BDAT),
    "rcpt-after-bdat": ([EHLO, MAIL, RCPT, b"BDAT 2\r\nab", RCPT], Postfix.RCPT_AFTER_BDAT),
    "mail-after-refused-bdat": ([EHLO, b"BDAT 2\r\nab", MAIL], Postfix.MAIL_AFTER_BDAT),
    "null-bdat": ([EHLO, MAIL, RCPT, b"BDAT 0\r\n"], Postfix.NULL_BDAT),
    "chunk-after-refused-chunk": ([EHLO, MAIL, b"BDAT 2\r\nab", b"BDAT 3 LAST\r\nabc"], fill(Postfix.DISCARDED, 3)),
    "xforward-not-authorized": ([EHLO, b"XFORWARD ADDR=192.0.2.1\r\n"], Postfix.XFORWARD_FORBIDDEN),
    "starttls-without-tls": ([EHLO, b"STARTTLS\r\n"], Postfix.NOT_IMPLEMENTED),
    "unknown-command": ([EHLO, b"HELP\r\n"], Postfix.NOT_RECOGNIZED),
    "empty-line": ([EHLO, b"\r\n"], Postfix.BAD_SYNTAX),
}


@pytest.mark.parametrize(("steps", "expected"), OUT_OF_STATE.values(), ids=OUT_OF_STATE.keys())
@pytest_twisted.ensureDeferred
async def test_out_of_state_command_gets_postfix_reply(
    strict_hop: StrictHop, steps: list[bytes], expected: Reply
) -> None:
    """Each command out of its order gets Postfix's reply (503 5.5.1 and kin), and
    the connection records whether a 503 was given."""
    heard = await in_thread(talk, strict_hop.port, steps)
    assert heard[-1] == expected.to_bytes()
    await strict_hop.wait_for_open(0)
    [connection] = strict_hop.connections
    assert connection.replies[-1] == expected
    assert connection.out_of_state == (expected.code == 503)
    assert strict_hop.queued == []


@pytest_twisted.ensureDeferred
async def test_in_order_session_records_commands_and_replies(strict_hop: StrictHop) -> None:
    """A whole session in order: every command and reply is recorded, no 503, and the
    connection is closed after QUIT."""
    steps = [EHLO, MAIL, RCPT, b"DATA\r\n", STUFFED + b".\r\n", b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n"]
    heard = await in_thread(talk, strict_hop.port, steps)
    queued = fill(Postfix.QUEUED, "00000000001")
    expected = [
        GREETING,
        ehlo_reply(),
        Postfix.SENDER_OK,
        Postfix.RECIPIENT_OK,
        Postfix.START_DATA,
        queued,
        Postfix.OK,
        Postfix.OK,
        Postfix.BYE,
    ]
    assert heard == wire(*expected)
    await strict_hop.wait_for_open(0)
    [connection] = strict_hop.connections
    assert connection.commands == [
        "EHLO client.test",
        "MAIL FROM:<alice@example.org>",
        "RCPT TO:<bob@example.com>",
        "DATA",
        "RSET",
        "NOOP",
        "QUIT",
    ]
    assert connection.replies == expected
    assert not connection.out_of_state
    assert not connection.open
    assert connection.closed_at is not None and connection.closed_at >= connection.opened_at


@pytest_twisted.ensureDeferred
async def test_smtplib_message_is_queued_without_dot_stuffing(strict_hop: StrictHop) -> None:
    """A message sent with smtplib is queued with its envelope and its exact bytes,
    the dot-stuffing smtplib added removed."""

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", strict_hop.port, timeout=10) as client:
            client.sendmail("alice@example.org", ["bob@example.com", "carol@example.com"], MESSAGE)

    await in_thread(send)
    [message] = strict_hop.queued
    assert (message.sender, message.recipients, message.data) == (
        "alice@example.org",
        ("bob@example.com", "carol@example.com"),
        MESSAGE,
    )
    assert (message.mail, message.chunked) == (f"mail FROM:<alice@example.org> size={len(MESSAGE)}", False)


@pytest_twisted.ensureDeferred
async def test_message_is_queued_only_when_the_final_reply_goes_out(strict_hop: StrictHop) -> None:
    """With the end-of-data gate closed, a complete message is not queued yet; it is
    when the gate releases the 250."""
    strict_hop.gates.end_of_data.close()
    client = in_thread(talk, strict_hop.port, [EHLO, MAIL, RCPT, b"DATA\r\n", STUFFED + b".\r\n"])
    [connection] = await strict_hop.gates.end_of_data.wait()
    assert strict_hop.queued == []
    assert connection.replies[-1] == Postfix.START_DATA
    strict_hop.gates.end_of_data.release()
    heard = await client
    assert heard[-1] == fill(Postfix.QUEUED, "00000000001").to_bytes()
    assert [message.data for message in strict_hop.queued] == [MESSAGE]


@pytest_twisted.ensureDeferred
async def test_connection_lost_mid_data_queues_nothing(strict_hop: StrictHop) -> None:
    """A connection lost in the middle of DATA queues nothing; what arrived is kept as cut off."""
    sent = b"Subject: cut\r\n\r\n..line one\r\nline two without its end"
    await in_thread(talk, strict_hop.port, [EHLO, MAIL, RCPT, b"DATA\r\n"], then=sent)
    await strict_hop.wait_for_open(0)
    assert strict_hop.queued == []
    assert [message.data for message in strict_hop.cut_off] == [sent.replace(b"\n..", b"\n.")]


@pytest_twisted.ensureDeferred
async def test_connection_lost_between_chunks_queues_nothing(strict_hop: StrictHop) -> None:
    """A connection lost after a BDAT chunk but before LAST queues nothing."""
    await in_thread(talk, strict_hop.port, [EHLO, MAIL, RCPT, b"BDAT 6\r\nabcdef"], then=b"BDAT 10 LAST\r\nghi")
    await strict_hop.wait_for_open(0)
    assert strict_hop.queued == []
    assert [(message.data, message.chunked) for message in strict_hop.cut_off] == [(b"abcdefghi", True)]


@pytest_twisted.ensureDeferred
async def test_end_of_data_received_is_queued_after_the_client_left(strict_hop: StrictHop) -> None:
    """A client that leaves after sending the end of data, before the final reply,
    still has its message queued once the hop answers 250, as with Postfix."""
    strict_hop.gates.end_of_data.close()
    await in_thread(talk, strict_hop.port, [EHLO, MAIL, RCPT, b"DATA\r\n"], then=STUFFED + b".\r\n")
    await strict_hop.wait_for_open(0)
    [connection] = strict_hop.gates.end_of_data.held
    strict_hop.gates.end_of_data.release()
    assert [message.data for message in strict_hop.queued] == [MESSAGE]
    assert connection.replies[-1] == Postfix.START_DATA


@pytest_twisted.ensureDeferred
async def test_chosen_final_reply_refuses_the_message(strict_hop: StrictHop) -> None:
    """With final_reply set to a 451, the client hears it and nothing is queued."""
    strict_hop.final_reply = Reply(451, "4.3.0", "Error: queue file write error")
    heard = await in_thread(talk, strict_hop.port, [EHLO, MAIL, RCPT, b"DATA\r\n", STUFFED + b".\r\n"])
    assert heard[-1] == strict_hop.final_reply.to_bytes()
    assert strict_hop.queued == []
    assert [message.data for message in strict_hop.refused] == [MESSAGE]


@pytest_twisted.ensureDeferred
async def test_bdat_chunk_bytes_are_never_commands(strict_hop: StrictHop) -> None:
    """Command lines inside BDAT chunks -- accepted or refused -- are message bytes:
    none is executed, and the accepted chunks are queued exactly."""
    inside = b"QUIT\r\nRSET\r\nMAIL FROM:<mallory@example.net>\r\n"
    steps = [
        EHLO,
        b"BDAT %d\r\n" % len(inside) + inside,  # refused (no transaction), still read whole
        b"RSET\r\n",
        MAIL,
        RCPT,
        b"BDAT %d\r\n" % len(inside) + inside,
        b"BDAT 5 LAST\r\nDATA\n",
    ]
    heard = await in_thread(talk, strict_hop.port, steps)
    assert heard[1:] == wire(
        ehlo_reply(),
        Postfix.NEED_RCPT,
        Postfix.OK,
        Postfix.SENDER_OK,
        Postfix.RECIPIENT_OK,
        fill(Postfix.CHUNK_RECEIVED, len(inside)),
        fill(Postfix.CHUNKS_QUEUED, 45 + 6, "00000000001"),  # DATA\n counts as DATA\r\n, as Postfix counts it
    )
    await strict_hop.wait_for_open(0)
    assert [command for command in strict_hop.connections[0].commands if not command.startswith("BDAT")] == [
        "EHLO client.test",
        "RSET",
        "MAIL FROM:<alice@example.org>",
        "RCPT TO:<bob@example.com>",
    ]
    [message] = strict_hop.queued
    assert (message.data, message.chunked) == (inside + b"DATA\n", True)


@pytest_twisted.ensureDeferred
async def test_bad_bdat_arguments_hang_up(strict_hop: StrictHop) -> None:
    """BDAT without a size gets 521 5.5.4 and the connection is closed, as the chunk
    cannot be told from commands."""
    heard = await in_thread(talk, strict_hop.port, [EHLO, b"BDAT many\r\n", b"NOOP\r\n"])
    assert heard[2:] == [Postfix.BDAT_SYNTAX.to_bytes(), b""]


@pytest_twisted.ensureDeferred
async def test_discarded_keywords_leave_the_ehlo_reply_and_refuse_their_commands(strict_hops: StrictHops) -> None:
    """discard_ehlo_keywords removes keywords from the EHLO reply; BDAT then gets
    521 5.5.1 and a hang-up, DSN parameters 501 5.7.1, SMTPUTF8 555 5.5.4."""
    hop = strict_hops(discard_ehlo_keywords={"chunking", "dsn", "smtputf8", "pipelining"})
    steps = [EHLO, b"MAIL FROM:<a@example.org> RET=HDRS\r\n", b"MAIL FROM:<a@example.org> SMTPUTF8\r\n"]
    heard = await in_thread(talk, hop.port, [*steps, b"BDAT 1 LAST\r\nx", b"NOOP\r\n"])
    assert heard[1:] == [
        *wire(
            ehlo_reply("SIZE 10240000", "ENHANCEDSTATUSCODES", "8BITMIME"),
            Postfix.DSN_DISABLED,
            fill(Postfix.UNSUPPORTED, "SMTPUTF8"),
            Postfix.BDAT_NOT_IMPLEMENTED,
        ),
        b"",
    ]


@pytest_twisted.ensureDeferred
async def test_improper_pipelining_is_recorded(strict_hops: StrictHops) -> None:
    """Commands sent before the reply they must wait for are recorded: after EHLO
    always, after anything when PIPELINING is not offered."""
    pipelining, without = strict_hops(), strict_hops(discard_ehlo_keywords={"pipelining"})
    for hop in (pipelining, without):
        await in_thread(pipeline, hop.port, [EHLO + MAIL, RCPT + b"QUIT\r\n"])
    await pipelining.wait_for_open(0)
    await without.wait_for_open(0)
    assert pipelining.connections[0].improper_pipelining == ["EHLO"]
    assert without.connections[0].improper_pipelining == ["EHLO", "RCPT"]


GATED = {
    "greeting": ([], 0),
    "ehlo": ([EHLO], 1),
    "mail": ([EHLO, MAIL], 2),
    "rcpt": ([EHLO, MAIL, RCPT], 3),
}


@pytest.mark.parametrize(("gate", "steps", "held_at"), [(name, *value) for name, value in GATED.items()])
@pytest_twisted.ensureDeferred
async def test_gate_holds_its_reply_until_released(
    strict_hop: StrictHop, gate: str, steps: list[bytes], held_at: int
) -> None:
    """A closed gate holds its reply (greeting, EHLO, MAIL, RCPT) with the
    connection open; released, the reply goes out and the session goes on."""
    getattr(strict_hop.gates, gate).close()
    client = in_thread(talk, strict_hop.port, [*steps, b"QUIT\r\n"])
    [connection] = await getattr(strict_hop.gates, gate).wait()
    assert len(connection.replies) == held_at
    assert strict_hop.open_connections == 1
    getattr(strict_hop.gates, gate).release()
    heard = await client
    session = [GREETING, ehlo_reply(), Postfix.SENDER_OK, Postfix.RECIPIENT_OK]
    assert heard[held_at:] == wire(session[held_at], Postfix.BYE)


@pytest_twisted.ensureDeferred
async def test_open_transaction_is_visible(strict_hop: StrictHop) -> None:
    """in_transaction says whether a connection is inside a MAIL transaction: from
    the accepted MAIL to RSET."""
    strict_hop.gates.rcpt.close()
    client = in_thread(talk, strict_hop.port, [EHLO, MAIL, RCPT, b"RSET\r\n"])
    [connection] = await strict_hop.gates.rcpt.wait()
    assert connection.in_transaction
    strict_hop.gates.rcpt.release()
    await client
    assert not connection.in_transaction


@pytest_twisted.ensureDeferred
async def test_open_connections_are_counted(strict_hop: StrictHop) -> None:
    """open_connections counts connections from connect to close; wait_for_open fires
    when the count is reached."""
    first = socket.create_connection(("127.0.0.1", strict_hop.port))
    second = socket.create_connection(("127.0.0.1", strict_hop.port))
    await strict_hop.wait_for_open(2)
    first.close()
    await strict_hop.wait_for_open(1)
    assert [connection.open for connection in strict_hop.connections] == [False, True]
    second.close()
    await strict_hop.wait_for_open(0)


@pytest_twisted.ensureDeferred
async def test_abort_drops_the_connection(strict_hop: StrictHop) -> None:
    """HopConnection.abort() drops the connection from the hop's side."""
    client = socket.create_connection(("127.0.0.1", strict_hop.port))
    await strict_hop.wait_for_open(1)
    strict_hop.connections[0].abort()
    await strict_hop.wait_for_open(0)
    client.close()


@pytest_twisted.ensureDeferred
async def test_starttls_starts_the_session_over(strict_hops: StrictHops) -> None:
    """STARTTLS (with the hop's throwaway certificate) answers 220 2.0.0, drops the
    transaction and the EHLO (MAIL next gets 503 5.5.1 send HELO/EHLO first), and
    the EHLO after it no longer offers STARTTLS."""
    hop = strict_hops(starttls=True)
    context = ssl.create_default_context(cadata=hop.certificate().decode())
    steps = [EHLO, MAIL, b"STARTTLS\r\n", MAIL, EHLO, b"STARTTLS\r\n"]
    heard = await in_thread(talk, hop.port, steps, context=context)
    assert heard[1:] == wire(
        ehlo_reply("PIPELINING", "SIZE 10240000", "STARTTLS", *DEFAULT_EHLO[2:]),
        Postfix.SENDER_OK,
        Postfix.READY_FOR_TLS,
        Postfix.NEED_HELO,
        ehlo_reply(),
        Postfix.TLS_ALREADY_ACTIVE,
    )
    assert hop.connections[0].tls


@pytest_twisted.ensureDeferred
async def test_plaintext_pipelined_after_starttls_is_discarded(strict_hops: StrictHops) -> None:
    """A command sent in plaintext right behind STARTTLS is dropped unread (RFC 3207),
    and recorded as improper pipelining."""
    hop = strict_hops(starttls=True)
    context = ssl.create_default_context(cadata=hop.certificate().decode())
    heard = await in_thread(talk, hop.port, [EHLO, b"STARTTLS\r\n" + MAIL, EHLO], context=context)
    assert heard[2:] == wire(Postfix.READY_FOR_TLS, ehlo_reply())
    await hop.wait_for_open(0)
    [connection] = hop.connections
    assert connection.commands == ["EHLO client.test", "STARTTLS", "EHLO client.test"]
    assert connection.improper_pipelining == ["STARTTLS"]


@pytest_twisted.ensureDeferred
async def test_smtplib_starttls_delivers(strict_hops: StrictHops) -> None:
    """smtplib verifies the throwaway certificate, and its message is queued."""
    hop = strict_hops(starttls=True)

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", hop.port, timeout=10) as client:
            client.starttls(context=ssl.create_default_context(cadata=hop.certificate().decode()))
            client.sendmail("alice@example.org", ["bob@example.com"], MESSAGE)

    await in_thread(send)
    assert [message.data for message in hop.queued] == [MESSAGE]


@pytest_twisted.ensureDeferred
async def test_xforward_is_recorded(strict_hops: StrictHops) -> None:
    """With xforward, XFORWARD is offered and accepted outside a transaction (503 5.5.1
    inside one); a queued message carries the lines sent before its MAIL, which
    last that one transaction (as Postfix logs orig_client for it only)."""
    hop = strict_hops(xforward=True)
    xforward = b"XFORWARD ADDR=192.0.2.1 PORT=4321 HELO=client.test\r\n"
    message = [MAIL, RCPT, b"DATA\r\n", STUFFED + b".\r\n"]
    steps = [EHLO, xforward, MAIL, xforward, *message[1:], *message]
    heard = await in_thread(talk, hop.port, steps)
    assert heard[2:5] == wire(Postfix.OK, Postfix.SENDER_OK, Postfix.IN_TRANSACTION)
    line = "XFORWARD ADDR=192.0.2.1 PORT=4321 HELO=client.test"
    assert [message.xforward for message in hop.queued] == [(line,), ()]
    assert hop.connections[0].xforward == [line]
    assert "XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT" in heard[1].decode()


# -- against Debian's Postfix -------------------------------------------------------------


# The smtpd the double stands for: Postfix's defaults, HELO required.
STRICT_MAIN_CF = """\
smtpd_helo_required = yes
default_transport = discard
relay_transport = discard
"""


@pytest.fixture(scope="module")
def postfix() -> Iterator[int]:
    """A private Postfix instance (tests/postfix.py) set up as HopSettings(): the
    port of its smtpd on 127.0.0.1."""
    instances = PostfixInstances()
    port = free_port()
    instances(STRICT_MAIN_CF, f"127.0.0.1:{port} inet n - n - - smtpd\n", listening=(port,))
    yield port
    instances.stop()


QUEUE_ID = re.compile(rb"queued as [0-9A-Z]+")


def comparable(steps: Sequence[bytes], heard: list[bytes]) -> list[bytes]:
    """The replies after the greeting, except EHLO's (Postfix also offers VRFY and
    ETRN), with the queue id left out."""
    return [QUEUE_ID.sub(b"queued as ID", reply) for step, reply in zip(steps, heard[1:], strict=True) if step != EHLO]


COMPARED = {
    **{name: steps for name, (steps, _) in OUT_OF_STATE.items()},
    "whole-message": [EHLO, MAIL, RCPT, b"DATA\r\n", STUFFED + b".\r\n", b"QUIT\r\n"],
    "chunked-message": [EHLO, MAIL, RCPT, b"BDAT 3\r\nabc", b"BDAT 2 LAST\r\nde", b"RSET\r\n"],
    "parameters": [
        EHLO,
        b"MAIL FROM:<a@example.org> BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=x\r\n",
        b"RCPT TO:<>\r\n",
        b"RCPT TO:<bob@example.com> NOTIFY=SOMETIMES\r\n",
        b"RCPT TO:<bob@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.com\r\n",
        b"RSET x\r\n",
        b"RSET\r\n",
        b"MAIL FROM:<a@example.org> BODY=BINARYMIME\r\n",
        b"MAIL FROM:<a@example.org\r\n",
        b"MAIL TO:<a@example.org>\r\n",
        # Last: after a MAIL refused for its SIZE, Postfix 3.7 refuses the next
        # MAIL without SIZE too (it keeps the size), which the double does not.
        b"MAIL FROM:<a@example.org> SIZE=99999999\r\n",
    ],
    "hello": [b"EHLO\r\n", b"HELO\r\n", b"HELO client.test\r\n", b"AUTH PLAIN\r\n"],
}


@pytest.mark.parametrize("steps", COMPARED.values(), ids=COMPARED.keys())
@pytest_twisted.ensureDeferred
async def test_replies_are_those_of_postfix(postfix: int, strict_hop: StrictHop, steps: list[bytes]) -> None:
    """The same commands get the same replies from the double as from Debian's
    Postfix smtpd (smtpd_helo_required = yes), queue ids aside."""
    from_postfix = await in_thread(talk, postfix, steps)
    from_double = await in_thread(talk, strict_hop.port, steps)
    assert comparable(steps, from_double) == comparable(steps, from_postfix)
