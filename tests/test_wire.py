"""DataReader (decoding DATA) and dot_stuff (encoding it)."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpguard import wire
from smtpguard.wire import DataReader, dot_stuff

PIECES = [b".", b"\r", b"\n", b"\r\n", b"..", b"x"]
SMUGGLING = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"]


def decode(chunks: list[bytes]) -> tuple[bytes, bytes | None, bool]:
    """Feed ``chunks`` to a fresh reader: (decoded bytes, rest, done)."""
    out: list[bytes] = []
    reader = DataReader(out.append)
    rest = None
    for chunk in chunks:
        assert rest is None, "fed after the end of data"
        rest = reader.feed(chunk)
    return b"".join(out), rest, reader.done


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[start:end] for start, end in itertools.pairwise(points)]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def normalised(data: bytes) -> bytes:
    """CRLF line endings only, and a final CRLF unless empty."""
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    return data if not data or data.endswith(b"\r\n") else data + b"\r\n"


messages = st.lists(st.sampled_from(PIECES), max_size=40).map(b"".join)


def test_simple_message_is_decoded():
    """A plain message comes out without the terminator, and done is set."""
    assert decode([b"Subject: x\r\n\r\nbody\r\n.\r\n"]) == (b"Subject: x\r\n\r\nbody\r\n", b"", True)


def test_no_end_before_terminator():
    """Without CRLF.CRLF feed returns None and the reader is not done."""
    assert decode([b"Subject: x\r\n\r\nbody\r\n"]) == (b"Subject: x\r\n\r\nbody\r\n", None, False)


def test_stuffed_dots_are_removed():
    """A dot at the start of a line loses exactly one dot."""
    assert decode([b"a\r\n..\r\n...b\r\n.x\r\n.\r\n"]) == (b"a\r\n.\r\n..b\r\nx\r\n", b"", True)


def test_bare_cr_and_lf_are_normalised():
    """Bare CR and bare LF become CRLF."""
    assert decode([b"a\rb\nc\r\n\n\r\r\n.\r\n"]) == (b"a\r\nb\r\nc\r\n\r\n\r\n\r\n", b"", True)


def test_byte_by_byte_equals_single_feed():
    """Feeding one byte at a time gives what a single feed gives."""
    data = b"..first\r\na\rb\nc\r\n..\r\n\r.\n\r\n.x\r\n\r\n.\r\nQUIT\r\n"
    whole = decode([data])
    assert whole == (b".first\r\na\r\nb\r\nc\r\n.\r\n\r\n.\r\n\r\nx\r\n\r\n", b"QUIT\r\n", True)
    assert decode([*bytewise(data[:-7]), data[-7:]]) == whole


@settings(max_examples=200, deadline=None)
@given(data=st.data(), message=messages)
def test_any_chunking_gives_same_result(data, message):
    """Random splits of the input (including single bytes) decode to the same result."""
    raw = message + b"\r\n.\r\nRSET\r\n"
    whole = decode([raw])
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(raw)), max_size=len(raw)))
    chunks = split(raw, cuts)
    end = len(raw) - len(whole[1])
    # Chunks after the one holding the end of data are not fed; join them onto it.
    fed: list[bytes] = []
    consumed = 0
    for chunk in chunks:
        if consumed >= end:
            fed[-1] += chunk
        else:
            fed.append(chunk)
        consumed += len(chunk)
    assert decode(fed) == whole


@settings(max_examples=200, deadline=None)
@given(data=st.data(), message=messages.map(normalised))
def test_round_trip_is_identity(data, message):
    """dot_stuff then DataReader gives back a CRLF-normalised message, whatever the chunking."""
    source = split(message, data.draw(st.lists(st.integers(min_value=0, max_value=len(message)), max_size=10)))
    encoded = b"".join(dot_stuff(source))
    received = split(encoded, data.draw(st.lists(st.integers(min_value=0, max_value=len(encoded)), max_size=10)))
    assert decode(received) == (message, b"", True)


@settings(max_examples=200, deadline=None)
@given(message=messages)
def test_restuffed_output_has_single_final_dot_line(message):
    """Whatever arrives, re-encoding the decoded message has one lone "." line: the last."""
    decoded, _, _ = decode([message + b"\r\n.\r\n"])
    lines = b"".join(dot_stuff([decoded])).split(b"\r\n")
    assert lines[-2:] == [b".", b""]
    assert lines.count(b".") == 1


def test_leading_dot_on_first_line():
    """The first line is at a line start: its stuffed dot is removed."""
    assert decode([b"..hidden\r\n.\r\n"]) == (b".hidden\r\n", b"", True)


def test_leading_dot_on_first_line_split_after_dot():
    """A first-line dot in its own chunk is still removed."""
    assert decode([b".", b".hidden\r\n", b".", b"\r", b"\n"]) == (b".hidden\r\n", b"", True)


def test_lone_dot_first_line_is_empty_message():
    """A lone dot line straight away is the empty message."""
    assert decode([b".\r\nQUIT\r\n"]) == (b"", b"QUIT\r\n", True)


def test_empty_message_encodes_to_lone_dot():
    """An empty message is sent as ".<CRLF>" alone, empty chunks included."""
    assert list(dot_stuff([])) == [b".\r\n"]
    assert b"".join(dot_stuff([b"", b""])) == b".\r\n"


def test_dot_stuff_leading_dot_of_first_line():
    """The first line starting with a dot is stuffed."""
    assert b"".join(dot_stuff([b".a\r\n"])) == b"..a\r\n.\r\n"


def test_dot_stuff_chunk_split_right_before_dot():
    """A chunk beginning with a dot after a chunk ending in CRLF is stuffed."""
    encoded = b"".join(dot_stuff([b"a\r\n", b".b\r\n", b".", b"\r\n"]))
    assert encoded == b"a\r\n..b\r\n..\r\n.\r\n"


def test_dot_stuff_chunk_split_between_cr_and_lf():
    """A boundary inside CRLF does not hide the dot that follows."""
    assert b"".join(dot_stuff([b"a\r", b"\n.b\r\n"])) == b"a\r\n..b\r\n.\r\n"


def test_dot_stuff_dot_in_mid_line_chunk_not_stuffed():
    """A chunk beginning with a dot in the middle of a line is left alone."""
    assert b"".join(dot_stuff([b"a", b".b\r\n"])) == b"a.b\r\n.\r\n"


def test_dot_stuff_unterminated_message_gets_crlf():
    """A message without final CRLF gets one before the final dot."""
    assert b"".join(dot_stuff([b"abc"])) == b"abc\r\n.\r\n"


@pytest.mark.parametrize("variant", SMUGGLING)
def test_smuggling_variant_is_not_end_of_data(variant):
    """Bare CR/LF forms of the terminator do not end the message."""
    out: list[bytes] = []
    reader = DataReader(out.append)
    assert reader.feed(b"Subject: x\r\n\r\nbody" + variant + b"MAIL FROM:<evil@example.com>\r\n") is None
    assert reader.done is False
    assert reader.feed(b".\r\nQUIT\r\n") == b"QUIT\r\n"
    assert reader.done is True


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        (b"\n.\n", b"body\r\n.\r\nsmuggled\r\n"),
        (b"\r.\r", b"body\r\n.\r\nsmuggled\r\n"),
        (b"\n.\r\n", b"body\r\n.\r\nsmuggled\r\n"),
        (b"\r\n.\n", b"body\r\n\r\nsmuggled\r\n"),
        (b"\r.\r\n", b"body\r\n.\r\nsmuggled\r\n"),
    ],
)
def test_smuggling_variant_decoded(variant, expected):
    """Each variant decodes to CRLF lines; the message goes on to the real terminator."""
    assert decode([b"body" + variant + b"smuggled\r\n.\r\n"]) == (expected, b"", True)


@pytest.mark.parametrize("variant", SMUGGLING)
def test_smuggling_variant_restuffed_has_no_lone_dot(variant):
    """Re-encoding the decoded message leaves no lone "." line but the final one."""
    decoded, _, _ = decode(bytewise(b"body" + variant + b"smuggled\r\n.\r\n"))
    lines = b"".join(dot_stuff([decoded])).split(b"\r\n")
    assert [index for index, line in enumerate(lines) if line == b"."] == [len(lines) - 2]
    assert lines[-1] == b""


def test_long_line_is_passed_on_and_memory_bounded():
    """A line far over 64 KiB without CRLF reaches the sink before the end, holding at most 64 KiB."""
    out: list[bytes] = []
    reader = DataReader(out.append)
    line = b"x" * (200 * 1024)
    largest = 0
    for start in range(0, len(line), 1000):
        assert reader.feed(line[start : start + 1000]) is None
        largest = max(largest, len(reader._pending))
    assert largest <= wire._HOLD_LIMIT
    assert len(b"".join(out)) >= len(line) - wire._HOLD_LIMIT
    assert reader.feed(b"\r\n.\r\n") == b""
    assert b"".join(out) == line + b"\r\n"


def test_long_line_after_crlf_in_one_feed_is_held_at_most_limit():
    """A CRLF and then a long line in one feed: at most 64 KiB of the partial line is held back."""
    out: list[bytes] = []
    reader = DataReader(out.append)
    assert reader.feed(b"Subject: x\r\n" + b"x" * 100_000) is None
    assert len(reader._pending) <= wire._HOLD_LIMIT


@pytest.mark.parametrize("size", [1000, 4096, 65535, 65536, 65537, 100_000])
def test_long_lines_same_result_for_any_chunk_size(size):
    """Long lines with dots, bare CR and LF decode the same in chunks of any size."""
    raw = b"x" * 70_000 + b"\r." + b"y" * 70_000 + b"\n..z" + b"w" * 70_000 + b"\r\n..\r\n.\r\nQUIT\r\n"
    whole = decode([raw])
    assert whole == (
        b"x" * 70_000 + b"\r\n." + b"y" * 70_000 + b"\r\n..z" + b"w" * 70_000 + b"\r\n.\r\n",
        b"QUIT\r\n",
        True,
    )
    chunks = [raw[i : i + size] for i in range(0, len(raw), size)]
    tail = len(b"QUIT\r\n")
    if len(chunks[-1]) <= tail:
        chunks[-2:] = [chunks[-2] + chunks[-1]]
    assert decode(chunks) == whole


def test_bytes_after_terminator_are_returned_exactly():
    """Pipelined commands after the end of data are returned unchanged."""
    assert decode([b"body\r\n.\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"]) == (
        b"body\r\n",
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n",
        True,
    )


def test_bytes_after_split_terminator_are_returned_exactly():
    """A terminator split over feeds still returns exactly what follows it."""
    out: list[bytes] = []
    reader = DataReader(out.append)
    assert reader.feed(b"body\r\n.\r") is None
    assert reader.feed(b"\nQUIT\r\n\n.\r") == b"QUIT\r\n\n.\r"
    assert b"".join(out) == b"body\r\n"


class Searched(bytes):
    """A received block that notes what is searched for in it."""

    def __new__(cls, data: bytes) -> Searched:
        made = super().__new__(cls, data)
        made.searches = []
        return made

    def find(self, sub: bytes, *args: int) -> int:  # type: ignore[override]
        self.searches.append(sub)
        return super().find(sub, *args)


def test_block_without_a_dot_line_is_searched_once() -> None:
    """A block with no line that starts with a dot is searched once, for CRLF ".":
    without one there is neither an end of data nor a dot to take off in it."""
    block = Searched(b"Subject: x\r\n\r\n" + b"line without a dot\r\n" * 100)
    out: list[bytes] = []
    assert DataReader(out.append).feed(block) is None
    assert block.searches == [b"\r\n."]
    assert b"".join(out) == bytes(block)


def test_end_of_data_is_looked_for_from_the_first_dot_line_on() -> None:
    """With a line that starts with a dot, the end of data is searched for from there."""
    block = Searched(b"a\r\n..stuffed\r\nb\r\n.\r\nQUIT\r\n")
    out: list[bytes] = []
    assert DataReader(out.append).feed(block) == b"QUIT\r\n"
    assert block.searches == [b"\r\n.", b"\r\n.\r\n"]
    assert b"".join(out) == b"a\r\n.stuffed\r\nb\r\n"
