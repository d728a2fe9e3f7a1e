"""The name a client gives in EHLO or HELO: a domain or an address literal
(RFC 5321 sections 4.1.1.1, 4.1.2 and 4.1.3), whose labels may be U-labels
(RFC 6531 section 3.3), and its ASCII form for headers and commands."""

from __future__ import annotations

import ipaddress
import re

import idna

# RFC 5321 sub-domain (letters, digits, inner hyphens), plus the underscore that
# many hosts carry in their names (Windows machines, above all).  Postfix's smtpd
# accepts any HELO name by default (smtpd_helo_restrictions is empty); its
# reject_invalid_helo_hostname check takes underscores anywhere in a label
# (valid_hostname() in its util library), and so does smtpguard.
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
# RFC 5321 General-address-literal: Standardized-tag ":" 1*dcontent.
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+")
# RFC 5321 section 4.5.3.1.2: a domain name or number.
_MAX_LENGTH = 255


def ascii_form(name: str) -> str | None:
    """``name`` as a header or command without SMTPUTF8 may carry it: U-labels as
    A-labels (RFC 5890), everything else as it is; None when ``name`` is neither a
    domain nor an address literal."""
    if name.startswith("[") and name.endswith("]"):
        form = name if _address_literal(name[1:-1]) else None
    else:
        form = _domain(name)
    return form if form is not None and len(form) <= _MAX_LENGTH else None


def _domain(name: str) -> str | None:
    labels = []
    for label in name.split("."):
        if label.isascii():
            if _LABEL.fullmatch(label) is None:
                return None
            labels.append(label)
            continue
        # IDNA 2008 (the idna package): Python's own "idna" codec is IDNA 2003,
        # which encodes emoji and symbols and maps fullwidth letters to ASCII.
        try:
            labels.append(idna.alabel(label.lower()).decode("ascii"))
        except UnicodeError:  # idna.IDNAError is one
            return None
    return ".".join(labels)


def _address_literal(inside: str) -> bool:
    if _ipv4(inside):
        return True
    tag, _, address = inside.partition(":")
    if tag.upper() == "IPV6":
        return _ipv6(address)
    return _GENERAL_LITERAL.fullmatch(inside) is not None


def _ipv4(text: str) -> bool:
    """RFC 5321 IPv4-address-literal: four Snum (1 to 3 digits, up to 255)."""
    parts = text.split(".")
    return len(parts) == 4 and all(
        part.isascii() and part.isdigit() and len(part) <= 3 and int(part) <= 255 for part in parts
    )


def _ipv6(text: str) -> bool:
    # ipaddress also takes a zone ("%eth0"), which an address literal has not.
    if not text.isascii() or "%" in text:
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True
