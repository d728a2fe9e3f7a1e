"""The RFC 6533 utf-8 address forms, and ORCPT as a next hop and a DSN get it."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpguard import xtext

# Printable ASCII, no control character, no line break: a header field's value.
FIELD = re.compile(r"[\x20-\x7e]+")


@pytest.mark.parametrize(
    ("address", "xtext_form", "unitext_form"),
    [
        ("bob@example.net", "bob@example.net", "bob@example.net"),
        ("jörg@example.com", "j\\x{F6}rg@example.com", "jörg@example.com"),
        ('"a b+c=d\\e"@x', '"a\\x{20}b\\x{2B}c\\x{3D}d\\x{5C}e"@x', '"a\\x{20}b\\x{2B}c\\x{3D}d\\x{5C}e"@x'),
        ("\U0001f600@例え.jp", "\\x{1F600}@\\x{4F8B}\\x{3048}.jp", "\U0001f600@例え.jp"),
    ],
)
def test_encode_utf8_addr_forms(address, xtext_form, unitext_form):
    """utf-8-addr-xtext escapes every non-QCHAR; utf-8-addr-unitext keeps non-ASCII
    and escapes SP, "+", "=" and "\\" only; both decode back."""
    assert xtext.encode_utf8_addr(address) == xtext_form
    assert xtext.encode_utf8_addr(address, unitext=True) == unitext_form
    assert xtext.decode_utf8_addr(xtext_form) == address
    assert xtext.decode_utf8_addr(unitext_form) == address


printable_addresses = st.text(
    alphabet=st.characters(min_codepoint=0x20, blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40
)


@settings(max_examples=300, deadline=None)
@given(printable_addresses)
def test_utf8_addr_xtext_round_trip_and_accepted(address):
    """Any address encoded as utf-8-addr-xtext is ASCII, accepted as an ORCPT
    without SMTPUTF8, and decodes back."""
    encoded = xtext.encode_utf8_addr(address)
    assert encoded.isascii()
    assert xtext.parse_orcpt(f"utf-8;{encoded}", smtputf8=False) == f"utf-8;{encoded}"
    assert xtext.original_address(f"utf-8;{encoded}") == address


@settings(max_examples=300, deadline=None)
@given(printable_addresses, st.booleans())
def test_accepted_orcpt_fits_a_dsn_and_a_7bit_next_hop(address, rfc822):
    """Whatever ORCPT is accepted becomes an Original-Recipient field of printable
    ASCII with no line break, and an ASCII value for a next hop without SMTPUTF8."""
    value = f"rfc822;{xtext.encode(address)}" if rfc822 else f"utf-8;{xtext.encode_utf8_addr(address, unitext=True)}"
    try:
        xtext.parse_orcpt(value, smtputf8=True)
    except xtext.XtextError:
        return  # refused at RCPT: never stored
    assert FIELD.fullmatch(xtext.original_recipient_field(value))
    assert xtext.orcpt_for_next_hop(value, smtputf8=False).isascii()
    assert xtext.original_address(xtext.orcpt_for_next_hop(value, smtputf8=False)) == xtext.original_address(value)


@pytest.mark.parametrize(
    ("orcpt", "field"),
    [
        ("rfc822;bob+2Bsales@example.net", "rfc822;bob+sales@example.net"),
        ("RFC822;a+20b@example.net", "RFC822;a b@example.net"),
        ("rfc822;a+09b@example.net", "rfc822;a+09b@example.net"),  # a tab stays encoded
        ("x400;c+3Dus", "x400;c=us"),
        ("utf-8;j\\x{F6}rg@example.com", "utf-8;j\\x{F6}rg@example.com"),
        ("utf-8;jörg@example.com", "utf-8;j\\x{F6}rg@example.com"),
        ("rfc822;jörg@example.com", "utf-8;j\\x{F6}rg@example.com"),
        ("rfc822;j+C3+B6rg@example.com", "utf-8;j\\x{F6}rg@example.com"),  # as Postfix sends it
        # Stored before ORCPT was checked (an old quarantine record): made safe.
        ("rfc822;a+0D+0AX-Evil:+20yes", "rfc822;a+0D+0AX-Evil:+20yes"),
        ("rfc822;a\r\nX-Evil: yes", "rfc822;a+0D+0AX-Evil:+20yes"),
    ],
)
def test_original_recipient_field(orcpt, field):
    """Original-Recipient carries the address decoded when that is printable ASCII,
    a non-ASCII one as utf-8 in utf-8-addr-xtext form, anything else encoded."""
    assert xtext.original_recipient_field(orcpt) == field


def test_decode_keeps_raw_utf8_only_when_asked():
    """xtext with raw UTF-8 is read only for an SMTPUTF8 transaction."""
    assert xtext.decode("j\u00f6rg+2B1", utf8=True) == "jörg+1"
    with pytest.raises(xtext.XtextError):
        xtext.decode("j\u00f6rg+2B1")


def test_orcpt_for_next_hop_of_a_value_stored_unchecked():
    """A value stored before ORCPT was checked (an old quarantine record) still
    goes to a next hop without SMTPUTF8 as ASCII."""
    assert xtext.orcpt_for_next_hop("utf-8;jörg\\x{zz}", smtputf8=False) == "utf-8;j\\x{F6}rg\\x{5C}x{zz}"
