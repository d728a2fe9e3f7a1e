"""The encodings of DSN parameter values: RFC 3461 xtext (ENVID, ORCPT, XFORWARD)
and the RFC 6533 ``utf-8`` address type of ORCPT, with what an ORCPT value may be,
how it is passed to a next hop with or without SMTPUTF8, and how it is written
into a delivery status notification.

Pure functions on strings; a value that breaks the grammar raises
:class:`XtextError` (a ValueError).
"""

from __future__ import annotations

import re

ORCPT_MAX = 500  # RFC 3461 section 4.2


class XtextError(ValueError):
    """A value that is not what its grammar allows."""


class NeedsSMTPUTF8(XtextError):
    """Raw UTF-8 in a value of a transaction without SMTPUTF8."""


_XCHAR = r"[\x21-\x2a\x2c-\x3c\x3e-\x7e]"
_XTEXT = re.compile(rf"(?:{_XCHAR}|\+[0-9A-F]{{2}})*")
# RFC 6531 section 3.3 lets an esmtp-value carry UTF-8 in an SMTPUTF8 transaction.
_XTEXT_UTF8 = re.compile(rf"(?:{_XCHAR}|\+[0-9A-F]{{2}}|[^\x00-\x7f])*")

# RFC 6533 section 3.  QCHAR: printable ASCII but "+", "=" and "\".
_QCHAR = r"[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]"
_HEXPOINT = (
    r"(?:[01][1-9]|10|20|2B|3D|7F|5C|[89A-F][0-9A-F]"  # 2 digits: xtext-specials, "\", U+0080-U+00FF
    r"|[1-9A-F][0-9A-F]{2}"  # 3 digits
    r"|[1-9A-CEF][0-9A-F]{3}|D[0-7][0-9A-F]{2}"  # 4 digits, no surrogates
    r"|[1-9A-F][0-9A-F]{4}|10[0-9A-F]{4})"  # 5 and 6 digits
)
_EMBEDDED = rf"\\x\{{{_HEXPOINT}\}}"
_UTF8_ADDR_XTEXT = re.compile(rf"(?:{_QCHAR}|{_EMBEDDED})+", re.I)
_UTF8_ADDR_UNITEXT = re.compile(rf"(?:{_QCHAR}|[^\x00-\x7f]|{_EMBEDDED})+", re.I)
_EMBEDDED_ANY = re.compile(r"\\x\{([0-9A-Fa-f]+)\}")

# addr-type is an atom (RFC 3461 section 4.2) inside an esmtp-value, so no "=".
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+/?^_`{|}~-]+")
# RFC 3461 section 4.2: an original recipient address is printable ASCII
# (graphic and white space) before it is encoded as xtext.
_PRINTABLE = re.compile(r"[\x20-\x7e\t]")
_FIELD_SAFE = re.compile(r"[\x20-\x7e]*")


def decode(value: str, utf8: bool = False) -> str:
    """RFC 3461 xtext (``+XX`` hex escapes, one octet of UTF-8 each) to the text it
    stands for; with ``utf8`` (an SMTPUTF8 transaction) raw UTF-8 may be mixed in."""
    if not (_XTEXT_UTF8 if utf8 else _XTEXT).fullmatch(value):
        raise XtextError(f"malformed xtext {value!r}")
    raw = re.sub(rb"\+([0-9A-F]{2})", lambda m: bytes([int(m.group(1), 16)]), value.encode("utf-8"))
    return raw.decode("utf-8", "surrogateescape")


_ESCAPE = re.compile(rb"\+([0-9A-Fa-f]{2})")
_PLUS = re.compile(rb"\+(?![0-9A-Fa-f]{2})")


def unquote(value: str) -> str:
    """An XFORWARD or XCLIENT attribute value as Postfix's smtpd reads it
    (xtext_unquote() in its global library): ``+XX`` escapes decoded, hex digits in
    either case; a value with a "+" that starts no escape is taken as sent, since
    both READMEs (Note 4 of XFORWARD_README, Note 3 of XCLIENT_README) ask servers
    to take unencoded values from older senders, and nginx's mail proxy sends
    LOGIN and NAME unencoded.  Raises XtextError when the octets are not UTF-8."""
    raw = value.encode("utf-8")
    if _PLUS.search(raw) is None:
        raw = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise XtextError(f"not UTF-8 once decoded: {value!r}") from None


def encode(value: str) -> str:
    """``value`` as RFC 3461 xtext: what is not printable ASCII, and "+" and "=",
    as ``+XX`` for each octet of its UTF-8; the inverse of :func:`decode`."""
    encoded = []
    for char in value:
        if "\x21" <= char <= "\x7e" and char not in "+=":
            encoded.append(char)
        else:
            encoded.extend(f"+{octet:02X}" for octet in char.encode("utf-8", "surrogateescape"))
    return "".join(encoded)


def encode_utf8_addr(address: str, unitext: bool = False) -> str:
    """``address`` in RFC 6533 utf-8-addr-xtext form (7-bit: every character that
    is not a QCHAR as ``\\x{HEX}``), or utf-8-addr-unitext form (non-ASCII kept)."""
    return "".join(
        char if re.fullmatch(_QCHAR, char) or (unitext and not char.isascii()) else f"\\x{{{ord(char):02X}}}"
        for char in address
    )


def decode_utf8_addr(value: str) -> str:
    """The address an RFC 6533 utf-8-addr-xtext or -unitext value stands for."""
    if not _UTF8_ADDR_UNITEXT.fullmatch(value):
        raise XtextError(f"malformed utf-8 address {value!r}")
    return _EMBEDDED_ANY.sub(lambda m: chr(int(m.group(1), 16)), value)


def parse_orcpt(value: str, smtputf8: bool) -> str:
    """An ORCPT value checked against RFC 3461 section 4.2 and RFC 6533 section 3,
    returned as received (``addr-type;address``).

    Allowed: ``utf-8;`` with a utf-8-addr-xtext address, or with a
    utf-8-addr-unitext one (raw UTF-8) in an SMTPUTF8 transaction;
    ``rfc822;`` with xtext that decodes to printable text (ASCII, or UTF-8 as
    Postfix escapes it), plus raw UTF-8 in an SMTPUTF8 transaction; any other
    address type with such xtext.  At most 500 characters.

    @raise NeedsSMTPUTF8: raw UTF-8 without SMTPUTF8.
    @raise XtextError: anything else the grammar does not allow.
    """
    addr_type, semicolon, address = value.partition(";")
    if len(value) > ORCPT_MAX or not semicolon or not _ADDR_TYPE.fullmatch(addr_type) or not address:
        raise XtextError(f"malformed ORCPT {value!r}")
    if not value.isascii():
        if not smtputf8:
            raise NeedsSMTPUTF8(f"ORCPT {value!r} needs SMTPUTF8")
        if addr_type.lower() not in ("utf-8", "rfc822"):
            raise XtextError(f"raw UTF-8 in an ORCPT of type {addr_type!r}")
    if addr_type.lower() == "utf-8":
        decode_utf8_addr(address)
        return value
    # Postfix writes a UTF-8 address as rfc822 xtext, each octet escaped: allowed
    # when the octets are UTF-8 for printable characters.
    printable = _printable if addr_type.lower() == "rfc822" else _PRINTABLE.fullmatch
    if not all(printable(char) for char in decode(address, utf8=True)):
        raise XtextError(f"ORCPT {value!r} does not decode to printable text")
    return value


def _printable(char: str) -> bool:
    """Printable ASCII or white space, or a printable non-ASCII character (no C1
    control, line separator or undecodable octet)."""
    return bool(_PRINTABLE.fullmatch(char)) or (not char.isascii() and char.isprintable())


def orcpt_for_next_hop(orcpt: str, smtputf8: bool) -> str:
    """The ORCPT value to send to a next hop: as received when the transaction
    goes with SMTPUTF8 or the value is ASCII; otherwise downgraded as RFC 6533
    says, to the utf-8 type in its 7-bit utf-8-addr-xtext form."""
    if smtputf8 or orcpt.isascii():
        return orcpt
    try:
        address = original_address(orcpt)
    except XtextError:
        # Not from parse_orcpt (an old quarantine record): its characters as they are.
        address = orcpt.partition(";")[2]
    return "utf-8;" + encode_utf8_addr(address)


def original_address(orcpt: str) -> str:
    """The address an ORCPT value names, decoded."""
    addr_type, _, address = orcpt.partition(";")
    return decode_utf8_addr(address) if addr_type.lower() == "utf-8" else decode(address, utf8=True)


def original_recipient_field(orcpt: str) -> str:
    """An ORCPT value as the Original-Recipient field of a message/delivery-status
    (RFC 3464 section 2.3.1), which is 7-bit: ``rfc822;bob@example.net`` decoded
    when that is printable, a non-ASCII address as ``utf-8;`` in
    utf-8-addr-xtext form, anything else xtext encoded.  Never a control
    character, never a line break."""
    addr_type, _, address = orcpt.partition(";")
    try:
        decoded = original_address(orcpt)
    except XtextError:
        # Not from parse_orcpt (an old quarantine record, a plugin): kept, made safe.
        return f"{addr_type};{address if _FIELD_SAFE.fullmatch(address) and address.isascii() else encode(address)}"
    if addr_type.lower() == "utf-8" or not decoded.isascii():
        return "utf-8;" + encode_utf8_addr(decoded)
    return f"{addr_type};{decoded if _FIELD_SAFE.fullmatch(decoded) else address}"
