"""CHUNKING (RFC 3030): BDAT messages are spooled, scanned and relayed like DATA
ones, and no chunk's bytes are ever read as commands."""

from __future__ import annotations

import pytest

from smtpguard import replies
from tests.test_server import EICAR_MESSAGE, RECIPIENT, SENDER, Session, ready

VIRUS = replies.VIRUS_REJECTED.with_text("Message rejected: virus found (Eicar-Test-Signature)")


def chunk(data: bytes, last: bool = False) -> bytes:
    return f"BDAT {len(data)}{' LAST' if last else ''}\r\n".encode() + data


def received(size: int) -> bytes:
    return replies.CHUNK_RECEIVED.with_text(f"Ok: {size} octets received").to_bytes()


def delivered(session: Session) -> bytes:
    (delivery,) = session.hop.delivered
    return delivery.data.split(b"X-Virus-Status: clean\r\n", 1)[1]


@pytest.mark.parametrize("delivery", ["one-packet", "bytewise"])
def test_chunks_make_one_message(delivery: str) -> None:
    """Chunks are acknowledged one by one, and the message after LAST is the chunks joined."""
    session = ready()
    session.begin()
    wire = chunk(b"Subject: hi\r\n\r\nQUIT\r\n") + chunk(b"RSET\r\n.\r\n", last=True) + b"NOOP\r\n"
    session.send_bytewise(wire) if delivery == "bytewise" else session.send(wire)
    assert session.replies() == [received(21), replies.OK.with_text("Ok: queued").to_bytes(), replies.OK.to_bytes()]
    assert delivered(session) == b"Subject: hi\r\n\r\nQUIT\r\nRSET\r\n.\r\n"
    assert session.hop.commands == [f"MAIL {SENDER}", f"RCPT {RECIPIENT}", "DATA"]


def test_bdat_zero_last_ends_the_message() -> None:
    """BDAT 0 LAST ends a message whose data came in earlier chunks."""
    session = ready()
    session.begin()
    session.send(chunk(b"Subject: x\r\n\r\nbody\r\n"), b"BDAT 0 LAST\r\n")
    assert session.replies()[-1] == replies.OK.with_text("Ok: queued").to_bytes()
    assert delivered(session) == b"Subject: x\r\n\r\nbody\r\n"


def test_bdat_message_is_scanned() -> None:
    """An infected message sent with BDAT is rejected like one sent with DATA."""
    session = ready()
    session.begin()
    session.send(chunk(EICAR_MESSAGE[:20]), chunk(EICAR_MESSAGE[20:], last=True))
    assert session.replies() == [received(20), VIRUS.to_bytes()]
    assert session.hop.delivered == []


def test_final_chunk_is_answered_only_after_the_next_hop() -> None:
    """No 250 for the LAST chunk before the next hop accepted the message."""
    session = ready()
    session.begin()
    session.hop.hold = True
    session.send(chunk(b"Subject: x\r\n\r\nbody\r\n", last=True))
    assert session.replies() == []
    session.hop.release()
    assert session.replies() == [replies.OK.with_text("Ok: queued").to_bytes()]


def test_bare_line_endings_in_chunks_are_normalised() -> None:
    """Bare CR and LF in BDAT data (not BINARYMIME) become CRLF, also across chunk boundaries."""
    session = ready()
    session.begin()
    session.send(chunk(b"Subject: x\n\nline\r"), chunk(b"\nnext\r.\rlast\n", last=True))
    assert delivered(session) == b"Subject: x\r\n\r\nline\r\nnext\r\n.\r\nlast\r\n"


def test_binarymime_is_kept_byte_for_byte() -> None:
    """BODY=BINARYMIME data is stored exactly as sent."""
    session = ready()
    session.send(f"MAIL FROM:<{SENDER}> BODY=BINARYMIME\r\nRCPT TO:<{RECIPIENT}>\r\n".encode())
    session.replies()
    body = b"Subject: bin\r\n\r\n\x00\xff\r\r\n\n.\n"
    session.send(chunk(body, last=True))
    assert session.replies() == [replies.OK.with_text("Ok: queued").to_bytes()]
    assert delivered(session) == body


def test_binarymime_needs_bdat() -> None:
    """DATA in a BODY=BINARYMIME transaction gets 503 5.5.1."""
    session = ready()
    session.send(f"MAIL FROM:<{SENDER}> BODY=BINARYMIME\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode())
    assert session.replies()[-1] == replies.BINARYMIME_NEEDS_BDAT.to_bytes()


def test_refused_chunk_is_swallowed() -> None:
    """BDAT without MAIL is refused once its bytes are read; they are never executed."""
    session = ready()
    session.send(chunk(b"QUIT\r\nRSET\r\n", last=True) + b"NOOP\r\n")
    assert session.replies() == [replies.NEED_MAIL.to_bytes(), replies.OK.to_bytes()]
    assert not session.closed


def test_chunks_after_a_refused_chunk_are_refused() -> None:
    """After a refused chunk, the rest of the transaction's chunks are refused too."""
    session = ready()
    session.send(f"MAIL FROM:<{SENDER}>\r\n".encode())
    session.replies()
    session.send(chunk(b"one\r\n"), chunk(b"two\r\n", last=True), b"NOOP\r\n")
    assert session.replies() == [
        replies.NO_VALID_RECIPIENTS.to_bytes(),
        replies.BAD_SEQUENCE.to_bytes(),
        replies.OK.to_bytes(),
    ]


def test_data_after_bdat_is_a_bad_sequence() -> None:
    """DATA after a BDAT chunk in the same transaction gets 503 5.5.1."""
    session = ready()
    session.begin()
    session.send(chunk(b"Subject: x\r\n"), b"DATA\r\n")
    assert session.replies() == [received(12), replies.BAD_SEQUENCE.to_bytes()]


def test_oversized_chunks_get_552_after_last() -> None:
    """Chunks beyond max_message_size are read to the end and then refused with 552 5.3.4."""
    session = ready(max_message_size=100)
    session.begin()
    session.send(chunk(b"x" * 80), chunk(b"y" * 80, last=True), b"NOOP\r\n")
    assert session.replies() == [received(80), replies.MESSAGE_TOO_BIG.to_bytes(), replies.OK.to_bytes()]
    assert session.hop.delivered == []


def test_rset_abandons_the_chunks() -> None:
    """RSET drops the chunks received so far; a new transaction starts clean."""
    session = ready()
    session.begin()
    session.send(chunk(b"old\r\n"), b"RSET\r\n")
    session.replies()
    session.begin()
    session.send(chunk(b"Subject: new\r\n\r\nnew\r\n", last=True))
    assert delivered(session) == b"Subject: new\r\n\r\nnew\r\n"


@pytest.mark.parametrize("argument", ["", "x", "-1", "5 NOTLAST", "1 LAST extra", "\uff11\uff12"])
def test_malformed_bdat_closes_the_connection(argument: str) -> None:
    """A BDAT without a valid size cannot be told from commands: 501 5.5.4 and close."""
    session = ready()
    session.begin()
    session.send(f"BDAT {argument}\r\nQUIT\r\n".encode())
    assert session.replies() == [replies.BAD_BDAT_SYNTAX.to_bytes()]
    assert session.closed


@pytest.mark.parametrize("pieces", [1, 2, 300], ids=["one read", "two reads", "many reads"])
def test_regression_overlong_bdat_line_closes_before_its_chunk(pieces: int) -> None:
    """A BDAT line past max_line_length (its size cannot be read) gets 500 5.5.2
    and the connection is closed: its chunk is never executed as commands,
    however the line arrives."""
    s = ready()
    s.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\n".encode())
    s.replies()
    chunk = b"RCPT TO:<victim@example.net>\r\n"
    line = b"bdat " + b"0" * 2100 + str(len(chunk)).encode() + b" LAST\r\n"
    step = -(-len(line) // pieces)
    s.send(*(line[i : i + step] for i in range(0, len(line), step)), chunk)
    assert s.replies() == [replies.LINE_TOO_LONG.to_bytes()]
    assert s.transport.disconnecting
    assert s.hop.commands == [f"MAIL {SENDER}", f"RCPT {RECIPIENT}"]


@pytest.mark.parametrize("separator", ["\t", "\x0b", "\x0c"])
def test_bdat_with_other_white_space_closes_the_connection(separator: str) -> None:
    """"BDAT<TAB>5 LAST" is not a BDAT smtpguard can read, but its chunk may
    follow: 501 5.5.4 and close, never its bytes read as commands."""
    session = ready()
    session.begin()
    session.send(f"BDAT{separator}9 LAST\r\nNOOP\r\nNOOP\r\n".encode())
    assert session.replies() == [replies.BAD_BDAT_SYNTAX.to_bytes()]
    assert session.closed
