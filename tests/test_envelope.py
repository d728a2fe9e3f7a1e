"""MAIL and RCPT parsing, parameters, xtext, and the arguments passed to the next hop."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpguard import replies
from smtpguard.envelope import (
    BodyType,
    Client,
    Envelope,
    EnvelopeError,
    MailParameters,
    Notify,
    Recipient,
    RecipientParameters,
    Return,
    decode_xtext,
    downgrade_refusal,
    encode_xtext,
    mail_arguments,
    parse_mail,
    parse_rcpt,
    rcpt_arguments,
    relayed_dsn_recipients,
)

ALL = {"SIZE": "10240000", "8BITMIME": "", "SMTPUTF8": "", "DSN": ""}


def mail_error(argument: str, max_size: int = 0):
    with pytest.raises(EnvelopeError) as caught:
        parse_mail(argument, max_size)
    return caught.value.reply


def rcpt_error(argument: str, smtputf8: bool = False):
    with pytest.raises(EnvelopeError) as caught:
        parse_rcpt(argument, smtputf8)
    return caught.value.reply


# -- MAIL ---------------------------------------------------------------------------


def test_mail_plain_address():
    """A plain sender without parameters."""
    assert parse_mail("FROM:<user@example.com>", 0) == ("user@example.com", MailParameters())


def test_mail_case_and_spacing():
    """The FROM: keyword is case-insensitive and may be followed by spaces."""
    assert parse_mail("from: <user@example.com>  ", 0) == ("user@example.com", MailParameters())


def test_mail_null_sender():
    """<> is the null sender."""
    assert parse_mail("FROM:<>", 0) == ("", MailParameters())


def test_mail_null_sender_with_parameters():
    """The null sender may carry parameters."""
    assert parse_mail("FROM:<> SIZE=10", 0) == ("", MailParameters(size=10))


def test_mail_missing_brackets():
    """A sender without angle brackets is a syntax error naming the syntax."""
    assert mail_error("FROM:user@example.com") == replies.SYNTAX_ERROR.with_text("Syntax: MAIL FROM:<address>")


def test_mail_missing_from():
    """MAIL without FROM: is a syntax error."""
    assert mail_error("<user@example.com>") == replies.SYNTAX_ERROR.with_text("Syntax: MAIL FROM:<address>")


@pytest.mark.parametrize(
    "address",
    [
        '"john doe"@example.com',
        '"a\\"b"@example.com',
        '"a>b"@example.com',
        "first.last+tag@sub.example.com",
        "user@[192.0.2.1]",
        "user@[IPv6:2001:db8::1]",
        "o'brien@example.com",
    ],
)
def test_mail_valid_addresses(address):
    """Quoted local parts, address literals and atom specials are accepted as given."""
    assert parse_mail(f"FROM:<{address}>", 0) == (address, MailParameters())


@pytest.mark.parametrize(
    "path",
    ["@relay.example:user@example.com", "@a.example,@b.example:user@example.com"],
)
def test_mail_source_route_stripped(path):
    """A source route is dropped from the sender."""
    assert parse_mail(f"FROM:<{path}>", 0) == ("user@example.com", MailParameters())


@pytest.mark.parametrize(
    "address",
    [
        "user",
        "@example.com",
        "user@",
        "us er@example.com",
        "a..b@example.com",
        ".a@example.com",
        "user@-example.com",
        "user@example..com",
        "user@[1.2.3.4",
        '"unterminated@example.com',
    ],
)
def test_mail_bad_address(address):
    """Malformed senders get 501 5.1.7."""
    assert mail_error(f"FROM:<{address}>") == replies.BAD_SENDER_SYNTAX


def test_mail_address_at_length_limit():
    """A 256-octet address is accepted."""
    address = "a" * 64 + "@" + "b" * 187 + ".com"
    assert len(address) == 256
    assert parse_mail(f"FROM:<{address}>", 0) == (address, MailParameters())


def test_mail_overlong_address():
    """A 257-octet address is refused."""
    address = "a" * 64 + "@" + "b" * 188 + ".com"
    assert mail_error(f"FROM:<{address}>") == replies.BAD_SENDER_SYNTAX


def test_mail_non_ascii_without_smtputf8():
    """A non-ASCII sender needs SMTPUTF8."""
    assert mail_error("FROM:<j\u00f6rg@example.com>") == replies.NON_ASCII_ADDRESS


def test_mail_non_ascii_with_smtputf8():
    """With SMTPUTF8 a non-ASCII sender is accepted."""
    assert parse_mail("FROM:<j\u00f6rg@b\u00fccher.example> SMTPUTF8", 0) == (
        "j\u00f6rg@b\u00fccher.example",
        MailParameters(smtputf8=True),
    )


def test_mail_smtputf8_with_value():
    """SMTPUTF8 takes no value."""
    assert mail_error("FROM:<a@example.com> SMTPUTF8=yes") == replies.SYNTAX_ERROR


def test_mail_size():
    """SIZE is parsed as an integer."""
    assert parse_mail("FROM:<a@example.com> SIZE=12345", 0) == ("a@example.com", MailParameters(size=12345))


def test_mail_size_at_maximum():
    """SIZE equal to the maximum is accepted."""
    assert parse_mail("FROM:<a@example.com> SIZE=1000", 1000)[1] == MailParameters(size=1000)


def test_mail_size_over_maximum():
    """SIZE above the maximum gets 552 5.3.4."""
    assert mail_error("FROM:<a@example.com> SIZE=1001", 1000) == replies.MESSAGE_TOO_BIG


def test_mail_size_unlimited_when_max_zero():
    """max_size 0 means no limit."""
    assert parse_mail("FROM:<a@example.com> SIZE=99999999999", 0)[1] == MailParameters(size=99999999999)


@pytest.mark.parametrize("value", ["SIZE", "SIZE=abc", "SIZE=-1", "SIZE=1.5", "SIZE=" + "9" * 21])
def test_mail_bad_size(value):
    """SIZE without a decimal value is a syntax error."""
    assert mail_error(f"FROM:<a@example.com> {value}") == replies.SYNTAX_ERROR.with_text("Bad SIZE parameter")


@pytest.mark.parametrize("value", ["\u00b2", "\u0661\u0662"])
def test_mail_size_non_ascii_digits(value):
    """Unicode digits are not a SIZE: a syntax error, not an exception or a number."""
    assert mail_error(f"FROM:<a@example.com> SIZE={value}") == replies.SYNTAX_ERROR.with_text("Bad SIZE parameter")


def test_mail_empty_value():
    """KEY= with an empty value is a syntax error."""
    assert mail_error("FROM:<a@example.com> SIZE=") == replies.SYNTAX_ERROR


@pytest.mark.parametrize(("value", "body"), [("8BITMIME", BodyType.EIGHT_BIT_MIME), ("7bit", BodyType.SEVEN_BIT)])
def test_mail_body(value, body):
    """BODY=7BIT and BODY=8BITMIME, case-insensitively."""
    assert parse_mail(f"FROM:<a@example.com> BODY={value}", 0)[1] == MailParameters(body=body)


def test_mail_body_unsupported():
    """An unknown BODY type: 555."""
    assert mail_error("FROM:<a@example.com> BODY=UTF16") == replies.UNKNOWN_PARAMETER.with_text("Unsupported BODY type")


def test_mail_body_binarymime():
    """BODY=BINARYMIME (RFC 3030) is accepted."""
    assert parse_mail("FROM:<a@example.com> BODY=BINARYMIME", 0)[1].body is BodyType.BINARYMIME


def test_mail_envid_xtext_decoded():
    """ENVID is decoded from xtext."""
    assert parse_mail("FROM:<a@example.com> ENVID=QQ+2B1+3Dx", 0)[1] == MailParameters(envid="QQ+1=x")


def test_mail_envid_malformed_xtext():
    """An ENVID that is not xtext is a syntax error."""
    assert mail_error("FROM:<a@example.com> ENVID=a+zz") == replies.SYNTAX_ERROR.with_text("Malformed xtext")


def test_mail_envid_lowercase_hex_is_malformed():
    """xtext hex digits are upper case."""
    assert mail_error("FROM:<a@example.com> ENVID=a+2b") == replies.SYNTAX_ERROR.with_text("Malformed xtext")


def test_mail_envid_too_long():
    """ENVID is limited to 100 characters."""
    assert mail_error("FROM:<a@example.com> ENVID=" + "a" * 101) == replies.SYNTAX_ERROR.with_text(
        "Bad ENVID parameter"
    )


def test_mail_envid_without_value():
    """ENVID needs a value."""
    assert mail_error("FROM:<a@example.com> ENVID") == replies.SYNTAX_ERROR.with_text("Bad ENVID parameter")


@pytest.mark.parametrize(("value", "ret"), [("FULL", Return.FULL), ("hdrs", Return.HEADERS)])
def test_mail_ret(value, ret):
    """RET=FULL and RET=HDRS, case-insensitively."""
    assert parse_mail(f"FROM:<a@example.com> RET={value}", 0)[1] == MailParameters(ret=ret)


def test_mail_bad_ret():
    """Another RET value is a syntax error."""
    assert mail_error("FROM:<a@example.com> RET=ALL") == replies.SYNTAX_ERROR.with_text("Bad RET parameter")


def test_mail_all_parameters():
    """All parameters together, keywords case-insensitive."""
    sender, parameters = parse_mail("FROM:<a@example.com> size=10 body=8bitmime smtputf8 envid=x ret=full", 0)
    assert (sender, parameters) == (
        "a@example.com",
        MailParameters(size=10, body=BodyType.EIGHT_BIT_MIME, smtputf8=True, envid="x", ret=Return.FULL),
    )


def test_mail_unknown_parameter():
    """An unknown parameter gets 555 naming it."""
    assert mail_error("FROM:<a@example.com> FOO=bar") == replies.UNKNOWN_PARAMETER.with_text(
        "Unsupported parameter FOO"
    )


def test_mail_duplicate_parameter():
    """A parameter given twice is a syntax error."""
    assert mail_error("FROM:<a@example.com> SIZE=1 size=2") == replies.SYNTAX_ERROR


def test_mail_bad_keyword():
    """A keyword with characters outside the ESMTP keyword syntax is a syntax error."""
    assert mail_error("FROM:<a@example.com> S_IZE=1") == replies.SYNTAX_ERROR


# -- RCPT ---------------------------------------------------------------------------


def test_rcpt_plain_address():
    """A plain recipient without parameters."""
    assert parse_rcpt("TO:<user@example.com>", False) == Recipient("user@example.com")


@pytest.mark.parametrize("path", ["postmaster", "Postmaster", "POSTMASTER"])
def test_rcpt_postmaster(path):
    """<postmaster> without a domain is accepted, in any case, as given."""
    assert parse_rcpt(f"TO:<{path}>", False) == Recipient(path)


def test_rcpt_null_path_refused():
    """RCPT TO:<> is a bad recipient."""
    assert rcpt_error("TO:<>") == replies.BAD_RECIPIENT_SYNTAX


def test_rcpt_source_route_stripped():
    """A source route is dropped from the recipient."""
    assert parse_rcpt("TO:<@relay.example:user@example.com>", False) == Recipient("user@example.com")


def test_rcpt_bad_address():
    """A recipient without a domain gets 501 5.1.3."""
    assert rcpt_error("TO:<user>") == replies.BAD_RECIPIENT_SYNTAX


def test_rcpt_overlong_address():
    """A recipient longer than 256 octets is refused."""
    assert rcpt_error("TO:<" + "a" * 64 + "@" + "b" * 188 + ".com>") == replies.BAD_RECIPIENT_SYNTAX


def test_rcpt_missing_brackets():
    """A recipient without angle brackets is a syntax error naming the syntax."""
    assert rcpt_error("TO:user@example.com") == replies.SYNTAX_ERROR.with_text("Syntax: RCPT TO:<address>")


def test_rcpt_non_ascii_needs_smtputf8():
    """A non-ASCII recipient is refused unless the transaction uses SMTPUTF8."""
    assert rcpt_error("TO:<j\u00f6rg@example.com>") == replies.NON_ASCII_ADDRESS
    assert parse_rcpt("TO:<j\u00f6rg@example.com>", True) == Recipient("j\u00f6rg@example.com")


def test_rcpt_notify_never():
    """NOTIFY=NEVER is the empty set."""
    assert parse_rcpt("TO:<a@example.com> NOTIFY=NEVER", False) == Recipient(
        "a@example.com", RecipientParameters(notify=frozenset())
    )


def test_rcpt_notify_list():
    """NOTIFY with several values, case-insensitively."""
    assert parse_rcpt("TO:<a@example.com> notify=success,Delay", False).parameters == RecipientParameters(
        notify=frozenset({Notify.SUCCESS, Notify.DELAY})
    )


@pytest.mark.parametrize(
    "value", ["NEVER,SUCCESS", "SUCCESS,NEVER", "SUCCESS,SUCCESS", "SOMETIMES", "", "SUCCESS,", "NEVER,NEVER"]
)
def test_rcpt_notify_invalid(value):
    """NEVER combined with others, duplicates and unknown words are syntax errors."""
    assert rcpt_error(f"TO:<a@example.com> NOTIFY{'=' + value if value else ''}") == (
        replies.SYNTAX_ERROR.with_text("Bad NOTIFY parameter")
    )


ORCPT_ACCEPTED = [
    # (value, in an SMTPUTF8 transaction)
    ("rfc822;a+2Bx@example.com", False),
    ("RFC822;a@example.com", False),
    ("rfc822;first+20last@example.com", False),  # decodes to printable ASCII, space included
    ("x400;c+3Dus+3Ba+3Dx", False),  # other address types: xtext
    ("rfc_822;a@example.com", False),  # addr-type is an atom
    ("utf-8;j\\x{F6}rg@example.com", False),  # utf-8-addr-xtext
    ("UTF-8;j\\x{f6}rg@example.com", False),  # hex digits in either case (ABNF)
    ("utf-8;a\\x{2B}b\\x{3D}c\\x{5C}d@example.com", False),  # "+", "=", "\\" escaped
    ("utf-8;\\x{1F600}@example.com", False),  # 5-digit HEXPOINT
    ("utf-8;jörg@example.com", True),  # utf-8-addr-unitext: raw UTF-8 under SMTPUTF8
    ("utf-8;jörg\\x{2B}x@例え.jp", True),
    ("rfc822;jörg@example.com", True),  # RFC 6531 3.3: an esmtp-value may carry UTF-8
    ("rfc822;j+C3+B6rg@example.com", False),  # UTF-8 escaped octet by octet, as Postfix sends it
    ("rfc822;j+C3+B6rg@example.com", True),
    ("rfc822;" + "a" * 493, False),  # 500 characters
]


@pytest.mark.parametrize(("value", "smtputf8"), ORCPT_ACCEPTED)
def test_rcpt_orcpt_accepted_as_received(value, smtputf8):
    """ORCPT values RFC 3461 4.2 and RFC 6533 section 3 allow are kept exactly as received."""
    assert parse_rcpt(f"TO:<a@example.com> ORCPT={value}", smtputf8).parameters == RecipientParameters(orcpt=value)


ORCPT_REFUSED = [
    "rfc822",  # no semicolon
    "rfc822;",  # no address
    ";a@example.com",  # no type
    "rfc(822);a@example.com",  # "(" is no atom character
    "rfc822;a+zz@example.com",  # not xtext
    "rfc822;a+2b@example.com",  # xtext hex is upper case
    "rfc822;a+0D+0A@example.com",  # decodes to a line break
    "rfc822;a+00@example.com",  # decodes to NUL
    "rfc822;a+C3@example.com",  # decodes to an octet that is not UTF-8
    "rfc822;a+C2+85@example.com",  # decodes to U+0085, a C1 control
    "rfc822;a+E2+80+A8@example.com",  # decodes to U+2028, a line separator
    "x400;a+C3+B6",  # other address types: ASCII only
    "utf-8;a+b@example.com",  # "+" is no QCHAR
    "utf-8;a=b@example.com",  # nor "="
    "utf-8;a\\b@example.com",  # a lone backslash
    "utf-8;a\\x{41}@example.com",  # ASCII letters are not escaped (no such HEXPOINT)
    "utf-8;a\\x{0D}\\x{0A}@example.com",  # nor CR LF
    "utf-8;a\\x{D800}@example.com",  # a surrogate
    "utf-8;a\\x{110000}@example.com",  # past Unicode
    "utf-8;a\\x{F6@example.com",  # unterminated
    "rfc822;" + "a" * 494,  # 501 characters
]


@pytest.mark.parametrize("value", ORCPT_REFUSED)
def test_rcpt_orcpt_refused(value):
    """An ORCPT value the RFCs do not allow gets 501 5.5.4 naming ORCPT, with or
    without SMTPUTF8."""
    for smtputf8 in (False, True):
        assert rcpt_error(f"TO:<a@example.com> ORCPT={value}", smtputf8) == replies.BAD_ORCPT


def test_rcpt_orcpt_without_value_refused():
    """ORCPT without a value is a syntax error."""
    assert rcpt_error("TO:<a@example.com> ORCPT") == replies.BAD_ORCPT


@pytest.mark.parametrize("value", ["utf-8;jörg@example.com", "rfc822;jörg@example.com"])
def test_rcpt_orcpt_raw_utf8_needs_smtputf8(value):
    """Raw UTF-8 in ORCPT outside an SMTPUTF8 transaction gets 501 5.5.4 saying so."""
    assert rcpt_error(f"TO:<a@example.com> ORCPT={value}") == replies.ORCPT_NEEDS_SMTPUTF8


def test_rcpt_orcpt_raw_utf8_only_in_rfc822_and_utf8_types():
    """Raw UTF-8 in an address type RFC 6533 says nothing of is refused."""
    assert rcpt_error("TO:<a@example.com> ORCPT=x400;jörg", True) == replies.BAD_ORCPT


def test_rcpt_unknown_parameter():
    """An unknown RCPT parameter gets 555 naming it."""
    assert rcpt_error("TO:<a@example.com> SIZE=1") == replies.UNKNOWN_PARAMETER.with_text("Unsupported parameter SIZE")


# -- xtext --------------------------------------------------------------------------


def test_encode_xtext_escapes_plus_equals_and_controls():
    """Plus, equals, space and controls become +XX."""
    assert encode_xtext("a+b=c d\x00") == "a+2Bb+3Dc+20d+00"


def test_decode_xtext():
    """+XX escapes are decoded."""
    assert decode_xtext("a+2Bb+3Dc+20d") == "a+b=c d"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127)))
def test_xtext_round_trip_ascii(value):
    """decode_xtext(encode_xtext(s)) == s for ASCII text, and the encoding is valid xtext."""
    encoded = encode_xtext(value)
    assert encoded.isascii()
    assert decode_xtext(encoded) == value


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_xtext_round_trip_any_text(value):
    """decode_xtext(encode_xtext(s)) == s for any text, non-ASCII included."""
    assert decode_xtext(encode_xtext(value)) == value


def test_envid_with_escaped_octets_relayed_unchanged():
    """An ENVID with escaped high octets reaches the next hop exactly as the client sent it."""
    sender, parameters = parse_mail("FROM:<a@example.com> ENVID=caf+C3+A9", 0)
    assert mail_arguments(sender, parameters, {"DSN": ""}) == "FROM:<a@example.com> ENVID=caf+C3+A9"


# -- arguments for the next hop -----------------------------------------------------

FULL_MAIL = MailParameters(size=100, body=BodyType.EIGHT_BIT_MIME, smtputf8=True, envid="id+1", ret=Return.HEADERS)


def test_mail_arguments_all_extensions():
    """With every extension advertised every parameter is passed on."""
    assert mail_arguments("a@example.com", FULL_MAIL, ALL) == (
        "FROM:<a@example.com> SIZE=100 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=id+2B1"
    )


def test_mail_arguments_no_extensions():
    """A next hop advertising nothing gets the bare sender."""
    assert mail_arguments("a@example.com", FULL_MAIL, {}) == "FROM:<a@example.com>"


@pytest.mark.parametrize(
    ("extension", "expected"),
    [
        ("SIZE", "FROM:<> SIZE=100"),
        ("8BITMIME", "FROM:<> BODY=8BITMIME"),
        ("SMTPUTF8", "FROM:<> SMTPUTF8"),
        ("DSN", "FROM:<> RET=HDRS ENVID=id+2B1"),
    ],
)
def test_mail_arguments_only_advertised(extension, expected):
    """Each parameter goes only with its own extension."""
    assert mail_arguments("", FULL_MAIL, {extension: ""}) == expected


def test_mail_arguments_size_override():
    """An explicit size replaces the client's SIZE."""
    assert mail_arguments("a@example.com", FULL_MAIL, {"SIZE": ""}, size=4321) == "FROM:<a@example.com> SIZE=4321"


def test_mail_arguments_size_without_client_size():
    """No SIZE from the client and none given: no SIZE parameter."""
    assert mail_arguments("a@example.com", MailParameters(), ALL) == "FROM:<a@example.com>"


def test_rcpt_arguments_dsn():
    """With DSN advertised, NOTIFY (in canonical order) and ORCPT go on."""
    recipient = Recipient(
        "b@example.com",
        RecipientParameters(notify=frozenset({Notify.DELAY, Notify.SUCCESS}), orcpt="rfc822;b@example.com"),
    )
    assert (
        rcpt_arguments(recipient, {"DSN": ""}) == "TO:<b@example.com> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b@example.com"
    )


def test_rcpt_arguments_never():
    """An empty NOTIFY set is sent as NEVER."""
    recipient = Recipient("b@example.com", RecipientParameters(notify=frozenset()))
    assert rcpt_arguments(recipient, {"DSN": ""}) == "TO:<b@example.com> NOTIFY=NEVER"


def test_rcpt_arguments_without_dsn():
    """Without DSN the DSN parameters are dropped."""
    recipient = Recipient(
        "b@example.com", RecipientParameters(notify=frozenset({Notify.FAILURE}), orcpt="rfc822;b@example.com")
    )
    assert rcpt_arguments(recipient, {"SIZE": "1", "8BITMIME": ""}) == "TO:<b@example.com>"


def test_parse_then_arguments_round_trip():
    """A recipient parsed from the client is passed on with the same parameters."""
    recipient = parse_rcpt("TO:<b@example.com> NOTIFY=FAILURE,DELAY ORCPT=rfc822;b+2Bx@example.com", False)
    assert rcpt_arguments(recipient, ALL) == "TO:<b@example.com> NOTIFY=FAILURE,DELAY ORCPT=rfc822;b+2Bx@example.com"


# What each kind of next hop receives: (EHLO keywords, MAIL argument, RCPT argument)
# for an SMTPUTF8 transaction with every DSN parameter and a UTF-8 ORCPT.
NEXT_HOPS = [
    (
        {"8BITMIME": "", "SMTPUTF8": "", "DSN": ""},
        "FROM:<a@example.com> BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=id",
        "TO:<b@example.com> NOTIFY=SUCCESS ORCPT=utf-8;jörg@example.com",
    ),
    (
        {"8BITMIME": "", "DSN": ""},
        "FROM:<a@example.com> BODY=8BITMIME RET=HDRS ENVID=id",
        "TO:<b@example.com> NOTIFY=SUCCESS ORCPT=utf-8;j\\x{F6}rg@example.com",
    ),
    (
        {"8BITMIME": "", "SMTPUTF8": ""},
        "FROM:<a@example.com> BODY=8BITMIME SMTPUTF8",
        "TO:<b@example.com>",
    ),
    ({"8BITMIME": ""}, "FROM:<a@example.com> BODY=8BITMIME", "TO:<b@example.com>"),
    ({}, "FROM:<a@example.com>", "TO:<b@example.com>"),
]


@pytest.mark.parametrize(("extensions", "mail", "rcpt"), NEXT_HOPS)
def test_wire_arguments_per_next_hop(extensions, mail, rcpt):
    """DSN parameters go only to a next hop offering DSN (RFC 3461 4.1), SMTPUTF8
    only to one offering SMTPUTF8, and a raw UTF-8 ORCPT is downgraded to the
    utf-8-addr-xtext form where SMTPUTF8 is missing (RFC 6533)."""
    sender, parameters = parse_mail("FROM:<a@example.com> BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=id", 0)
    recipient = parse_rcpt("TO:<b@example.com> NOTIFY=SUCCESS ORCPT=utf-8;jörg@example.com", True)
    assert mail_arguments(sender, parameters, extensions) == mail
    assert rcpt_arguments(recipient, extensions) == rcpt


@pytest.mark.parametrize(
    ("orcpt", "with_smtputf8", "without_smtputf8"),
    [
        ("rfc822;b+2Bx@example.com", "rfc822;b+2Bx@example.com", "rfc822;b+2Bx@example.com"),
        ("utf-8;j\\x{F6}rg@example.com", "utf-8;j\\x{F6}rg@example.com", "utf-8;j\\x{F6}rg@example.com"),
        ("utf-8;jörg\\x{2B}1@example.com", "utf-8;jörg\\x{2B}1@example.com", "utf-8;j\\x{F6}rg\\x{2B}1@example.com"),
        ("rfc822;jörg+2B1@例え.jp", "rfc822;jörg+2B1@例え.jp", "utf-8;j\\x{F6}rg\\x{2B}1@\\x{4F8B}\\x{3048}.jp"),
    ],
)
def test_rcpt_arguments_orcpt_forms(orcpt, with_smtputf8, without_smtputf8):
    """ORCPT goes as received to a next hop with DSN and SMTPUTF8; to one with
    DSN only, a value with raw UTF-8 becomes the utf-8 type in utf-8-addr-xtext
    form, and an ASCII value goes as received."""
    recipient = parse_rcpt(f"TO:<b@example.com> ORCPT={orcpt}", True)
    assert rcpt_arguments(recipient, {"DSN": "", "SMTPUTF8": ""}) == f"TO:<b@example.com> ORCPT={with_smtputf8}"
    assert rcpt_arguments(recipient, {"DSN": ""}) == f"TO:<b@example.com> ORCPT={without_smtputf8}"


def dsn_envelope(sender: str = "a@example.com", smtputf8: bool = False) -> Envelope:
    """An envelope with one recipient for each NOTIFY choice."""
    recipients = [
        parse_rcpt("TO:<success@example.com> NOTIFY=SUCCESS", False),
        parse_rcpt("TO:<both@example.com> NOTIFY=FAILURE,SUCCESS ORCPT=rfc822;orig@example.com", False),
        parse_rcpt("TO:<failure@example.com> NOTIFY=FAILURE,DELAY", False),
        parse_rcpt("TO:<never@example.com> NOTIFY=NEVER", False),
        parse_rcpt("TO:<unset@example.com>", False),
    ]
    return Envelope(Client("192.0.2.1", 1), sender, MailParameters(smtputf8=smtputf8), tuple(recipients))


@pytest.mark.parametrize(
    ("extensions", "owed"),
    [
        ({"DSN": "", "SMTPUTF8": ""}, []),
        ({"DSN": ""}, []),
        ({"8BITMIME": "", "SMTPUTF8": ""}, ["success@example.com", "both@example.com"]),
        ({}, ["success@example.com", "both@example.com"]),
    ],
)
def test_relayed_dsn_recipients_per_next_hop(extensions, owed):
    """Toward a next hop without DSN the recipients whose NOTIFY names SUCCESS are
    owed a relayed DSN; NOTIFY=NEVER, FAILURE/DELAY only and no NOTIFY are not;
    a next hop with DSN reports itself."""
    assert [recipient.address for recipient in relayed_dsn_recipients(dsn_envelope(), extensions)] == owed


def test_relayed_dsn_recipients_null_sender():
    """The null sender is never owed a DSN."""
    assert relayed_dsn_recipients(dsn_envelope(sender=""), {}) == ()


NON_ASCII_HEADERS = "Subject: Grüße\r\nFrom: <jörg@example.com>\r\n".encode()
ASCII_HEADERS = b"Subject: hello\r\n"


@pytest.mark.parametrize(
    ("smtputf8", "headers", "extensions", "refusal"),
    [
        (True, NON_ASCII_HEADERS, {"8BITMIME": "", "DSN": ""}, replies.NEXT_HOP_NO_SMTPUTF8_MESSAGE),
        (True, NON_ASCII_HEADERS, {}, replies.NEXT_HOP_NO_SMTPUTF8_MESSAGE),
        (True, NON_ASCII_HEADERS, {"8BITMIME": "", "SMTPUTF8": ""}, None),
        (True, ASCII_HEADERS, {"8BITMIME": "", "DSN": ""}, None),
        (True, ASCII_HEADERS, {}, None),
        (False, NON_ASCII_HEADERS, {"8BITMIME": ""}, None),
    ],
)
def test_downgrade_refusal_per_next_hop(smtputf8, headers, extensions, refusal):
    """An SMTPUTF8 transaction with non-ASCII headers needs a next hop offering
    SMTPUTF8 (554 5.6.7 otherwise, RFC 6531 3.2); an all-ASCII one, and one
    without SMTPUTF8, is not refused for it."""
    assert downgrade_refusal(dsn_envelope(smtputf8=smtputf8), headers, extensions) == refusal


@pytest.mark.parametrize(
    ("esmtp", "tls", "keyword"), [(True, False, "ESMTP"), (True, True, "ESMTPS"), (False, True, "SMTP")]
)
def test_client_protocol_keyword(esmtp, tls, keyword):
    """The WITH keyword follows EHLO/HELO and TLS."""
    assert Client("192.0.2.1", 25, esmtp=esmtp, tls=tls).protocol == keyword


@pytest.mark.parametrize("escape", ["+0D+0A", "+00", "+1B", "+7F", "+09"])
def test_regression_envid_decoding_to_a_control_character_is_refused(escape: str) -> None:
    """An ENVID whose xtext decodes to a control character (CR LF that would land
    in quarantine metadata, say) is refused with 501 5.5.4."""
    assert mail_error(f"FROM:<a@example.com> ENVID=QQ{escape}X") == replies.SYNTAX_ERROR.with_text(
        "Bad ENVID parameter"
    )
