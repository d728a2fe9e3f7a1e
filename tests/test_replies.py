"""Reply: wire form, parsing and classification."""

from __future__ import annotations

import pytest

from smtpguard import replies
from smtpguard.replies import Reply


def test_to_bytes_single_line_with_enhanced_code():
    """One line: code, space, enhanced code, text, CRLF."""
    assert Reply(250, "2.1.0", "Ok").to_bytes() == b"250 2.1.0 Ok\r\n"


def test_to_bytes_single_line_without_enhanced_code():
    """Without an enhanced code the text follows the code directly."""
    assert Reply(220, "", "ESMTP smtpguard").to_bytes() == b"220 ESMTP smtpguard\r\n"


def test_to_bytes_without_text():
    """No text and no enhanced code: the code alone, no trailing space."""
    assert Reply(250).to_bytes() == b"250\r\n"


def test_to_bytes_enhanced_code_without_text():
    """An enhanced code without text has no trailing space."""
    assert Reply(250, "2.0.0", "").to_bytes() == b"250 2.0.0\r\n"


def test_to_bytes_multi_line_with_enhanced_code():
    """Every line but the last uses "-", and each carries the enhanced code."""
    assert Reply(550, "5.7.1", "first\nsecond\nthird").to_bytes() == (
        b"550-5.7.1 first\r\n550-5.7.1 second\r\n550 5.7.1 third\r\n"
    )


def test_to_bytes_multi_line_without_enhanced_code():
    """An EHLO-style reply: continuation lines, no enhanced code."""
    assert Reply(250, "", "mx.example\nPIPELINING\nSIZE 1000").to_bytes() == (
        b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"
    )


def test_to_bytes_multi_line_empty_middle_line():
    """An empty line in the text is sent without a trailing space."""
    assert Reply(250, "2.0.0", "a\n\nb").to_bytes() == b"250-2.0.0 a\r\n250-2.0.0\r\n250 2.0.0 b\r\n"


def test_to_bytes_utf8_text():
    """Text is encoded as UTF-8."""
    assert Reply(250, "", "caf\u00e9").to_bytes() == b"250 caf\xc3\xa9\r\n"


def test_from_lines_single_line_with_enhanced_code():
    """The enhanced code is split off the text."""
    assert Reply.from_lines([b"250 2.1.5 Recipient ok"]) == Reply(250, "2.1.5", "Recipient ok")


def test_from_lines_single_line_without_enhanced_code():
    """Text without an enhanced code is kept whole."""
    assert Reply.from_lines([b"220 mx.example ESMTP Postfix"]) == Reply(220, "", "mx.example ESMTP Postfix")


def test_from_lines_code_only():
    """A line with just the code gives empty text."""
    assert Reply.from_lines([b"250"]) == Reply(250, "", "")


def test_from_lines_enhanced_code_only():
    """A line with only code and enhanced code gives empty text."""
    assert Reply.from_lines([b"250 2.0.0"]) == Reply(250, "2.0.0", "")


def test_from_lines_multi_line_with_enhanced_code():
    """Continuation lines repeating the enhanced code lose it; texts join with newlines."""
    lines = [b"550-5.7.1 first", b"550-5.7.1 second", b"550 5.7.1 third"]
    assert Reply.from_lines(lines) == Reply(550, "5.7.1", "first\nsecond\nthird")


def test_from_lines_multi_line_ehlo():
    """An EHLO reply keeps each line as text."""
    lines = [b"250-mx.example", b"250-PIPELINING", b"250-SIZE 10240000", b"250 8BITMIME"]
    assert Reply.from_lines(lines) == Reply(250, "", "mx.example\nPIPELINING\nSIZE 10240000\n8BITMIME")


def test_from_lines_later_different_enhanced_code_kept_in_text():
    """An enhanced code on a later line that differs from the first is text."""
    lines = [b"250-2.0.0 first", b"250 2.1.0 second"]
    assert Reply.from_lines(lines) == Reply(250, "2.0.0", "first\n2.1.0 second")


def test_from_lines_enhanced_code_only_on_later_line_kept_in_text():
    """Without an enhanced code on the first line, later lines keep theirs as text."""
    lines = [b"250-first", b"250 2.0.0 second"]
    assert Reply.from_lines(lines) == Reply(250, "", "first\n2.0.0 second")


def test_from_lines_invalid_utf8_replaced():
    """Text that is not UTF-8 is decoded with replacement characters."""
    assert Reply.from_lines([b"250 caf\xe9"]) == Reply(250, "", "caf\ufffd")


@pytest.mark.parametrize("line", [b"25 ok", b"abc ok", b"250_ok", b""])
def test_from_lines_malformed_raises(line):
    """A line that is not an SMTP reply line raises ValueError."""
    with pytest.raises(ValueError, match="malformed reply line"):
        Reply.from_lines([line])


@pytest.mark.parametrize(
    "reply",
    [
        Reply(250, "2.0.0", "Ok"),
        Reply(550, "5.7.1", "first\nsecond\nthird"),
        Reply(250, "", "mx.example\nPIPELINING\nSIZE 1000"),
        Reply(250, "2.0.0", "a\n\nb"),
        replies.VIRUS_REJECTED,
    ],
)
def test_to_bytes_from_lines_round_trip(reply):
    """Parsing the wire form gives the same reply back."""
    assert Reply.from_lines(reply.to_bytes().split(b"\r\n")[:-1]) == reply


@pytest.mark.parametrize(
    ("code", "positive", "transient", "permanent"),
    [
        (220, True, False, False),
        (250, True, False, False),
        (354, True, False, False),
        (399, True, False, False),
        (421, False, True, False),
        (451, False, True, False),
        (499, False, True, False),
        (500, False, False, True),
        (554, False, False, True),
    ],
)
def test_classification(code, positive, transient, permanent):
    """2xx/3xx are positive, 4xx transient, 5xx permanent."""
    reply = Reply(code)
    assert (reply.positive, reply.transient, reply.permanent) == (positive, transient, permanent)


def test_with_text_keeps_code_and_enhanced_code():
    """with_text replaces only the text."""
    assert replies.SYNTAX_ERROR.with_text("Bad SIZE parameter") == Reply(501, "5.5.4", "Bad SIZE parameter")


def test_named_replies_have_matching_enhanced_class():
    """Every named reply with an enhanced code uses the class of its reply code."""
    named = [value for value in vars(replies).values() if isinstance(value, Reply)]
    assert len(named) > 40
    for reply in named:
        if reply.enhanced:
            assert reply.enhanced[0] == str(reply.code)[0], reply


def test_from_lines_writes_control_characters_as_visible_escapes():
    """A peer's reply text reaches a client and the logs with ESC, BEL and NUL
    written as escapes, never as the bytes."""
    reply = Reply.from_lines([b"250-2.0.0 Ok \x1b[2J", b"250 2.0.0 queued\x07 as\x00 ABC"])
    assert reply == Reply(250, "2.0.0", "Ok \\x1b[2J\nqueued\\x07 as\\x00 ABC")
