"""A message read as mail readers read it: every bare CR and bare LF a CRLF,
converted as it is read from the spool."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from smtpguard.crlf import bare_line_ends, with_crlf
from smtpguard.spool import Message, Spool
from smtpguard.wire import normalise_line_endings


def collect(spool: Spool, *chunks: bytes) -> Message:
    for chunk in chunks:
        spool.write(chunk)
    return spool.finish()


bare_endings = st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b".", b"\x00"]), max_size=40).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(data=bare_endings, chunk_size=st.integers(1, 8), in_memory=st.booleans())
def test_with_crlf_reads_the_message_with_every_line_end_crlf(tmp_path_factory, data, chunk_size, in_memory):
    """with_crlf(message) is the message as normalise_line_endings makes it, its size exact,
    in chunks of at most the size asked for, wherever the chunks cut a CRLF; from
    memory and from disk alike."""
    directory = str(tmp_path_factory.mktemp("spool"))
    message = collect(Spool(0, memory_limit=1 << 20 if in_memory else 0, directory=directory), data)
    read = with_crlf(message)
    chunks = list(read.chunks(chunk_size))
    assert b"".join(chunks) == normalise_line_endings(data)
    assert read.size == len(normalise_line_endings(data))
    assert all(0 < len(chunk) <= chunk_size for chunk in chunks)
    message.close()


@settings(max_examples=200, deadline=None)
@given(data=bare_endings, offset=st.integers(0, 80))
def test_tail_of_the_crlf_reading_is_that_reading_from_the_offset(data, offset):
    """tail(offset) of the CRLF reading, and its headers(), come from that reading."""
    read = with_crlf(collect(Spool(0), data))
    offset = min(offset, read.size)
    tail = read.tail(offset)
    assert (tail.read(), tail.size) == (normalise_line_endings(data)[offset:], read.size - offset)
    assert tail.headers() == Message.from_bytes(normalise_line_endings(data)[offset:]).headers()


def test_with_crlf_of_a_message_with_crlf_only_is_the_message_itself():
    """A message with no bare CR or LF is its own CRLF reading: nothing is converted."""
    message = collect(Spool(0), b"Subject: x\r\n\r\nbody\r\n")
    assert with_crlf(message) is message


def test_crlf_reading_shares_the_storage_and_needs_no_closing(tmp_path):
    """The CRLF reading is read from the message's own spool file: closing the
    reading leaves the message open, closing the message closes the reading."""
    message = collect(Spool(0, memory_limit=1, directory=str(tmp_path)), b"A: 1\n\nbody\n")
    read = with_crlf(message)
    read.close()
    assert (message.closed, read.read()) == (False, b"A: 1\r\n\r\nbody\r\n")
    message.close()
    assert read.closed is True


@settings(max_examples=300, deadline=None)
@given(data=bare_endings, cuts=st.lists(st.integers(0, 40), max_size=3))
def test_bare_line_ends_are_counted_once_wherever_chunks_are_cut(data, cuts):
    """Each bare CR and bare LF counts once (each costs one byte more as CRLF), and
    a CRLF cut between two chunks, empty ones between them or not, counts as none."""
    bounds = [0, *sorted(min(cut, len(data)) for cut in cuts), len(data)]
    chunks = [data[start:end] for start, end in pairwise(bounds)]
    assert bare_line_ends(chunks) == len(normalise_line_endings(data)) - len(data)
