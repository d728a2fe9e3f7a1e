"""Property tests of the ESMTP server against hostile input streams: random bytes,
overlong lines, NUL, invalid UTF-8, pipelined garbage, and valid commands, DATA
and BDAT mixed in, cut into packets anywhere.

Whatever comes in, dataReceived never raises, the output is a sequence of
well-formed replies (at most one per input line), the protocol's buffers stay
bounded, and the session can be brought back in sync for a normal transaction.
"""

from __future__ import annotations

import itertools
import random
import re
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtpguard import replies
from smtpguard.replies import Reply
from tests.test_server import CLIENT_NAME, Session, transaction, transaction_replies

MAX_LINE = 64  # max_line_length: small, so that overlong lines are common
# What the protocol may hold between packets: one command line (and its CR), or a
# DATA line held back by the reader (wire.DataReader passes longer ones on).
BUFFER_BOUND = MAX_LINE + 1
READER_BOUND = 64 * 1024
PAUSE_BUFFER = 256 * 1024  # server._PAUSE_BUFFER: reading stops above this while busy
SETTLE_LIMIT = 1024 * 1024  # the most a BDAT chunk left open is completed with
EHLO = f"EHLO {CLIENT_NAME}\r\n".encode()
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID = [
    b"EHLO client.example.org",
    b"HELO client.example.org",
    b"ehlo x",
    b"MAIL FROM:<alice@example.org>",
    b"MAIL FROM:<>",
    b"mail from:<alice@example.org> SIZE=100 BODY=8BITMIME",
    b"MAIL FROM:<alice@example.org> BODY=BINARYMIME",
    b"MAIL FROM:<alice@example.org> SIZE=99999999999999999999",
    b"RCPT TO:<bob@example.com>",
    b"RCPT TO:<carol@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;carol@example.com",
    b"RCPT TO:<postmaster>",
    b"RSET",
    b"NOOP",
    b"VRFY bob",
    b"EXPN staff",
    b"HELP",
    b"STARTTLS",
    b"",
]
# Commands after which the input is no longer (only) command lines.
STREAM_VERBS = {"DATA", "BDAT", "QUIT"}
ENDINGS = [b"\r\n", b"\n", b"\r\r\n"]
FAKE_ENDINGS = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n..\r\n"]


def verb(line: bytes) -> str:
    """The verb as the server reads it (upper-cased), or "" for a line that is not UTF-8."""
    try:
        return line.decode("utf-8").partition(" ")[0].upper()
    except UnicodeDecodeError:
        return ""


def without_lf(data: bytes) -> bytes:
    return data.replace(b"\n", b"")


# -- strategies -------------------------------------------------------------------------------

garbage = st.binary(max_size=120).map(without_lf)
line_contents = st.one_of(
    st.sampled_from(VALID),
    garbage,
    st.tuples(st.sampled_from(VALID), garbage).map(b"".join),  # a valid command, then garbage
    st.integers(MAX_LINE - 8, MAX_LINE + 3).map(lambda n: b"NOOP " + b"A" * n),  # around the limit
    st.integers(1, 5000).map(lambda n: b"X" * n),  # far over it
    st.text(max_size=60).map(lambda text: without_lf(text.encode("utf-8"))),  # any Unicode
    st.tuples(st.sampled_from(VALID), st.sampled_from([b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80"])).map(b"".join),
)
command_lines = st.tuples(line_contents, st.sampled_from(ENDINGS)).map(b"".join)


@st.composite
def data_blocks(draw: st.DrawFn) -> bytes:
    """DATA, a body with fake endings and dots in it, and (usually) the real end."""
    body = draw(st.lists(st.one_of(garbage, st.sampled_from(FAKE_ENDINGS), st.sampled_from(VALID)), max_size=12))
    end = draw(st.sampled_from([b"\r\n.\r\n", b"\r\n.\r\n", b""]))
    return b"DATA\r\n" + b"".join(body) + end


@st.composite
def bdat_chunks(draw: st.DrawFn) -> bytes:
    """BDAT with a size and the bytes it announces (sometimes fewer, sometimes a bad size)."""
    data = draw(st.binary(max_size=300))
    size = draw(st.one_of(st.just(len(data)), st.integers(0, 400)))
    last = draw(st.sampled_from([b"", b" LAST", b" last", b" NOTLAST", b" LAST extra"]))
    return b"BDAT %d%s\r\n" % (size, last) + data


stream_items = st.one_of(
    command_lines,
    command_lines,
    data_blocks(),
    bdat_chunks(),
    st.binary(max_size=300),  # raw bytes, line feeds and all
    st.sampled_from([b"QUIT\r\n", b"BDAT\r\n", b"DATA\r\n", b".\r\n"]),
)


@st.composite
def packets(draw: st.DrawFn, stream: bytes) -> list[bytes]:
    """``stream`` cut into packets at arbitrary points."""
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    bounds = [0, *cuts, len(stream)]
    return [stream[start:end] for start, end in itertools.pairwise(bounds) if end > start]


# -- checks -----------------------------------------------------------------------------------

_REPLY_LINE = re.compile(rb"\d{3}[ -]")


def parse_replies(output: bytes) -> list[Reply]:
    """The replies in ``output``; fails unless it is whole, well-formed replies only."""
    assert output == b"" or output.endswith(b"\r\n"), output[-200:]
    parsed: list[Reply] = []
    lines: list[bytes] = []
    for line in output.split(b"\r\n")[:-1]:
        assert _REPLY_LINE.match(line), line
        assert not lines or line[:3] == lines[0][:3], (lines, line)  # one code per multi-line reply
        lines.append(line)
        if line[3:4] == b" ":
            reply = Reply.from_lines(lines)
            assert 200 <= reply.code <= 599, reply
            parsed.append(reply)
            lines = []
    assert lines == [], "an unfinished multi-line reply"
    return parsed


def fresh(**settings: Any) -> Session:
    """A session past the greeting, with the small max_line_length."""
    session = Session.open(max_line_length=MAX_LINE, **settings)
    assert [reply.code for reply in parse_replies(session.transport.value())] == [220]
    session.transport.clear()
    return session


def held_bytes(session: Session) -> int:
    reader = session.proto._reader
    return len(session.proto._buffer) + (len(reader._pending) if reader is not None else 0)


def feed(session: Session, pieces: list[bytes], check: Callable[[Session], None] | None = None) -> None:
    """Feed ``pieces`` one by one; after each, the protocol holds a bounded number of
    bytes (a closing session ignores all further input)."""
    for piece in pieces:
        closing = session.proto._closing
        before = len(session.proto._buffer)
        session.send(piece)
        if closing:
            assert len(session.proto._buffer) == before
        elif not session.proto._closing:
            assert len(session.proto._buffer) <= BUFFER_BOUND
            assert held_bytes(session) <= BUFFER_BOUND + READER_BOUND
        if check is not None:
            check(session)


def settle(session: Session) -> None:
    """End whatever line, message or chunk the input left open.  A BDAT chunk that
    still expects more than SETTLE_LIMIT bytes cannot be completed here: the test
    then fails and says so (the strategies never announce one that large)."""
    proto = session.proto
    session.send(b"\r\n")
    while not session.proto._closing and (proto._chunk is not None or proto._reader is not None):
        if proto._chunk is not None:
            if proto._chunk.remaining > SETTLE_LIMIT:
                pytest.fail(
                    f"cannot settle the session: a BDAT chunk still expects {proto._chunk.remaining} bytes, "
                    f"more than the {SETTLE_LIMIT} this test sends to complete one"
                )
            session.send(b"x" * proto._chunk.remaining)
        else:
            session.send(b"\r\n.\r\n")


def assert_in_sync(session: Session) -> None:
    """Once whatever the input left open is ended, the session serves RSET, EHLO and
    a whole transaction as usual, or, if the input closed it, says nothing more."""
    settle(session)
    parse_replies(session.transport.value())
    session.transport.clear()
    if session.proto._closing:
        session.send(b"NOOP\r\n", EHLO)
        assert session.transport.value() == b""
        return
    session.send(b"RSET\r\n" + EHLO + transaction())
    heard = session.replies()
    assert heard[0] == replies.RESET_OK.to_bytes()
    assert heard[1].startswith(b"250-")
    assert heard[2:] == transaction_replies()


# -- properties -------------------------------------------------------------------------------


@FUZZ
@given(st.data())
def test_every_command_line_gets_exactly_one_reply(data: st.DataObject) -> None:
    """Command lines of any content (valid, garbage, NUL, invalid UTF-8, overlong, any
    line ending) but no DATA, BDAT or QUIT, in packets cut anywhere: exactly one
    well-formed reply per line, in a session that stays in sync."""
    lines = data.draw(st.lists(command_lines.filter(lambda line: verb(line) not in STREAM_VERBS), max_size=40))
    partial = data.draw(garbage)
    stream = b"".join(lines) + partial
    session = fresh()
    feed(session, data.draw(packets(stream)))
    assert len(parse_replies(session.transport.value())) == len(lines)
    assert_in_sync(session)


@FUZZ
@given(st.data())
def test_any_stream_gives_well_formed_replies(data: st.DataObject) -> None:
    """Anything at all (commands, DATA with fake endings, BDAT chunks of any size,
    raw bytes, QUIT), in packets cut anywhere: dataReceived never raises, buffers
    stay bounded, the output is well-formed replies, at most one per line, and the
    session can be brought back in sync."""
    stream = b"".join(data.draw(st.lists(stream_items, max_size=25)))
    session = fresh()
    feed(session, data.draw(packets(stream)))
    assert len(parse_replies(session.transport.value())) <= stream.count(b"\n")
    assert_in_sync(session)


@FUZZ
@given(st.data())
def test_any_stream_after_ehlo_and_mail(data: st.DataObject) -> None:
    """As above, in a session already past EHLO, MAIL and RCPT, so that DATA and
    BDAT content is actually received, spooled and relayed."""
    stream = b"".join(data.draw(st.lists(stream_items, max_size=25)))
    session = fresh()
    session.send(EHLO, b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.com>\r\n")
    assert [reply.code for reply in parse_replies(session.transport.value())] == [250, 250, 250]
    session.transport.clear()
    feed(session, data.draw(packets(stream)))
    assert len(parse_replies(session.transport.value())) <= stream.count(b"\n")
    assert_in_sync(session)


@FUZZ
@given(st.data())
def test_reply_text_carries_no_control_characters(data: st.DataObject) -> None:
    """Whatever a client sends, and however much of it a reply quotes (the EHLO
    greeting echoes the client's name), reply lines hold no control character
    other than HT (RFC 5321 textstring), so no client can forge reply lines."""
    names = st.binary(min_size=1, max_size=30).map(without_lf)
    lines = data.draw(st.lists(st.one_of(names.map(lambda name: b"EHLO " + name), line_contents), max_size=10))
    session = fresh()
    session.send(b"".join(line + b"\r\n" for line in lines))
    for line in session.transport.value().split(b"\r\n")[:-1]:
        assert re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", line) is None, line


@st.composite
def floods(draw: st.DrawFn) -> list[bytes]:
    """Up to five packets of pipelined lines, each at most a transport's read (64 KiB)."""
    lines = st.sampled_from([b"NOOP\r\n", b"RCPT TO:<bob@example.com>\r\n", b"X" * 1000 + b"\r\n", b"garbage\n"])
    piece = st.tuples(lines, st.integers(1, 64 * 1024)).map(lambda p: p[0] * (p[1] // len(p[0]) + 1))
    return draw(st.lists(piece, max_size=5))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(floods())
def test_reading_pauses_while_a_command_waits(pieces: list[bytes]) -> None:
    """While MAIL waits for the next hop, pipelined input is buffered and reading is
    paused exactly when the buffer passes the pause threshold; once the next hop
    answers, everything is processed, reading resumes and the buffer is empty."""
    session = fresh(max_recipients=100_000)
    session.hop.hold = True
    session.send(b"EHLO x\r\nMAIL FROM:<alice@example.org>\r\n")

    def paused_over_the_threshold(session: Session) -> None:
        over = len(session.proto._buffer) > PAUSE_BUFFER
        assert (session.transport.producerState == "paused") == over

    for piece in pieces:
        session.send(piece)
        paused_over_the_threshold(session)
    while session.hop.held:
        session.hop.release()
    assert session.transport.producerState == "producing"
    assert len(session.proto._buffer) == 0
    heard = parse_replies(session.transport.value())
    assert len(heard) == 2 + sum(piece.count(b"\n") for piece in pieces)


# -- memory over a long random run --------------------------------------------------------------


def random_stream(rng: random.Random, size: int) -> Iterator[bytes]:
    """About ``size`` bytes of the kind of input above, from a seeded generator."""
    produced = 0
    while produced < size:
        kind = rng.randrange(6)
        if kind == 0:
            item = rng.choice(VALID) + rng.choice(ENDINGS)
        elif kind == 1:
            item = rng.randbytes(rng.randrange(200))
        elif kind == 2:
            item = b"X" * rng.randrange(10_000) + b"\r\n"
        elif kind == 3:
            body = b"".join(rng.choice([rng.randbytes(100), *FAKE_ENDINGS]) for _ in range(rng.randrange(50)))
            item = b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n" + body + b"\r\n.\r\n"
        elif kind == 4:
            chunk = rng.randbytes(rng.randrange(3000))
            item = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nBDAT %d LAST\r\n" % len(chunk) + chunk
        else:
            item = b"RCPT TO:<bob@example.com>\r\n" * rng.randrange(100)
        produced += len(item)
        yield item


def test_memory_stays_bounded_over_a_long_random_run() -> None:
    """Forty rounds of 100 KB of random input in random packets, on one session
    (reopened when the input closes it): traced memory after the last round is
    within 128 KiB of what it was after the tenth."""
    rng = random.Random(20240229)
    session = fresh()
    after: list[int] = []
    tracemalloc.start()
    try:
        for _ in range(40):
            stream = b"".join(random_stream(rng, 100_000))
            cuts = sorted(rng.randrange(len(stream)) for _ in range(50))
            feed(session, [stream[a:b] for a, b in itertools.pairwise([0, *cuts, len(stream)])])
            parse_replies(session.transport.value())
            settle(session)
            if session.proto._closing:
                session.lose()
                session = session.another()
            else:
                session.send(b"RSET\r\nEHLO x\r\n")
            session.transport.clear()
            session.hop.commands.clear()
            session.hop.delivered.clear()
            del stream
            after.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert after[-1] - after[9] < 128 * 1024, after
    assert session.factory.connections == 1


def test_settle_fails_naming_the_chunk_it_cannot_complete() -> None:
    """The settle step never gives up silently: a chunk larger than it completes
    fails the test with the bytes that chunk still expects."""
    session = fresh()
    session.send(EHLO, b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.com>\r\nBDAT 2000000 LAST\r\n")
    expects = "a BDAT chunk still expects 1999998 bytes, more than the 1048576"  # settle's CRLF went into it
    with pytest.raises(pytest.fail.Exception, match=expects):
        settle(session)
