"""The built-in scanner reads a large spooled message from a map of its file and
decodes its large parts a window at a time, with the same verdicts as in memory."""

from __future__ import annotations

import base64
import binascii
import itertools
import random
import tracemalloc

from hypothesis import given
from hypothesis import strategies as st

from smtpguard.results import ScanResult, Threat
from smtpguard.scanners import decoders
from smtpguard.scanners.builtin import BuiltinScanner
from smtpguard.scanners.mapped import SPAN_MIN, WINDOW
from smtpguard.scanners.mimewalk import TEXT_OVERLAP, TEXT_WINDOW
from smtpguard.scanners.signatures import EICAR, EICAR_NAME
from smtpguard.spool import Message, Spool

ATTACHMENT_SIZE = 3 * WINDOW  # decoded: several windows, past SPAN_MIN encoded


def spooled(data: bytes) -> Message:
    """``data`` as the server holds a message this large: in a temporary file."""
    spool = Spool(max_size=len(data) + 1)
    spool.write(data)
    message = spool.finish()
    assert message.fileno() is not None
    return message


def multipart(body_headers: bytes, body: bytes) -> bytes:
    return (
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nThe figures.\r\n"
        b"--b\r\n" + body_headers + b"\r\n" + body + b"\r\n--b--\r\n"
    )




def encoded(data: bytes) -> bytes:
    text = base64.b64encode(data)
    return b"\r\n".join(text[at : at + 76] for at in range(0, len(text), 76))


def scan(message: Message) -> ScanResult:
    return BuiltinScanner().scan_now(message)


def test_eicar_at_the_end_of_a_large_base64_attachment_is_found_in_a_mapped_message() -> None:
    """EICAR after 12 MiB of random bytes in a base64 attachment: decoded window by
    window from the map, the attachment is found infected."""
    data = random.Random(1).randbytes(ATTACHMENT_SIZE) + EICAR
    headers = b'Content-Type: application/octet-stream; name="figures.bin"\r\nContent-Transfer-Encoding: base64\r\n'
    message = spooled(multipart(headers, encoded(data)))
    assert message.size > SPAN_MIN
    assert scan(message) == ScanResult.infected((Threat(EICAR_NAME, "figures.bin"),), "builtin")


def test_a_large_clean_base64_attachment_in_a_mapped_message_is_clean() -> None:
    """The same attachment without EICAR: clean, nothing left unread."""
    data = random.Random(2).randbytes(ATTACHMENT_SIZE)
    headers = b'Content-Type: application/octet-stream; name="figures.bin"\r\nContent-Transfer-Encoding: base64\r\n'
    assert scan(spooled(multipart(headers, encoded(data)))) == ScanResult.clean("builtin")


def test_a_uuencoded_block_across_two_text_windows_of_a_large_part_is_found() -> None:
    """A uuencoded EICAR that starts just before the end of the first window of a large
    text part (and ends after it) is decoded from the next window, which overlaps it."""
    block = b"begin 644 eicar.com\r\n" + binascii.b2a_uu(EICAR[:45]) + binascii.b2a_uu(EICAR[45:]) + b"`\r\nend\r\n"
    block = block.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")
    filler_line = b"x" * 70 + b"\r\n"
    lead = TEXT_WINDOW - len(block) // 2
    text = filler_line * (lead // len(filler_line)) + block + filler_line * (TEXT_WINDOW // len(filler_line))
    assert len(block) < TEXT_OVERLAP
    message = spooled(multipart(b"Content-Type: text/plain\r\n", text))
    assert scan(message) == ScanResult.infected((Threat(EICAR_NAME, "eicar.com"),), "builtin")


def test_scanning_a_large_mapped_message_allocates_far_less_than_it() -> None:
    """A 36 MB message with a base64 attachment: the scan's Python allocations peak
    below six windows (the map is not an allocation), the message itself being 36 MB."""
    data = random.Random(3).randbytes(27_000_000)
    headers = b'Content-Type: application/octet-stream; name="figures.bin"\r\nContent-Transfer-Encoding: base64\r\n'
    message = spooled(multipart(headers, encoded(data)))
    tracemalloc.start()
    try:
        result = scan(message)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result == ScanResult.clean("builtin")
    assert peak < 6 * WINDOW < message.size


@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=400), max_size=4))
def test_base64_decoded_in_windows_is_decoded_as_whole(data: bytes, cuts: list[int]) -> None:
    """Base64 text cut anywhere into windows decodes to the bytes the whole does, and
    is found padded inside exactly when the whole is."""
    text = encoded(data) + b"\r\n"
    edges = sorted({0, len(text), *(cut for cut in cuts if cut < len(text))})
    windows = [text[start:stop] for start, stop in itertools.pairwise(edges)]
    assert decoders.padded_inside_windows(windows) is decoders.padded_inside(text)
    assert b"".join(decoders.decode_base64_windows(windows)) == decoders.decode_base64(text)


@given(st.binary(max_size=100), st.binary(max_size=100), st.integers(min_value=1, max_value=50))
def test_padding_inside_is_found_across_windows(first: bytes, second: bytes, cut: int) -> None:
    """Two encodings joined (an "=" before the end): found padded inside whichever
    window holds the "=" and whichever the text after it."""
    text = base64.b64encode(first) + base64.b64encode(second)
    windows = [text[:cut], text[cut:]]
    assert decoders.padded_inside_windows(windows) is decoders.padded_inside(text)
