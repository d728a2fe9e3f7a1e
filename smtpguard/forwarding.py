"""XFORWARD and XCLIENT from the MTA or proxy in front: their attributes read and
checked, the client they make of the session's, and the XFORWARD smtpguard sends
on to its next hop.

The rules are those of Postfix's XFORWARD_README and XCLIENT_README, and where
the READMEs leave a choice, what Postfix's smtpd does (xforward_cmd() and
xclient_cmd() in src/smtpd/smtpd.c).  Pure functions on values; a command that
cannot be accepted raises :class:`Refused` with the reply, and changes nothing.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from smtpguard import replies, xtext
from smtpguard.domains import ascii_form
from smtpguard.envelope import Client, Forwarding, Hop
from smtpguard.headers import has_control
from smtpguard.replies import Reply

UNAVAILABLE = "[UNAVAILABLE]"
TEMPUNAVAIL = "[TEMPUNAVAIL]"  # XCLIENT NAME only: the lookup failed for now
XFORWARD_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
XCLIENT_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN", "DESTADDR", "DESTPORT")
# The EHLO keywords, each followed by the attributes it takes.
XFORWARD_KEYWORD = " ".join(("XFORWARD", *XFORWARD_ATTRIBUTES))
XCLIENT_KEYWORD = " ".join(("XCLIENT", *XCLIENT_ATTRIBUTES))

# Both READMEs: an attribute-value element of at most 255 characters (as sent).
_VALUE_MAX = 255
# XFORWARD_README: PROTO "of up to 64 characters".
_PROTO_MAX = 64
# XFORWARD_README Note 1: no control character, non-ASCII, white space or
# character special in message headers, once decoded.
_WORD = re.compile(r"[!#-'*+\-./-9=?A-Z^-~]+")
_NUMERIC = re.compile(r"[0-9.]+")
_BLANKS = re.compile(r"[ \t]+")
# RFC 5321 section 4.1.2: at most 512 octets, CRLF included.
_LINE_MAX = 510


class Refused(Exception):
    """An XFORWARD or XCLIENT command that cannot be accepted; ``reply`` says why."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


@attrs.frozen
class Forwarded:
    """The XFORWARD attributes for the next transaction.  XFORWARD_README, "Server
    operation": the first XFORWARD makes every attribute [UNAVAILABLE] (here: empty,
    port 0), each later one updates those it names."""

    name: str = ""
    address: str = ""
    port: int = 0
    protocol: str = ""
    helo: str = ""
    ident: str = ""
    source: str = ""


# -- reading -------------------------------------------------------------------------


def _attributes(command: str, argument: str, known: tuple[str, ...]) -> dict[str, str]:
    """``NAME=value ...`` -> {"NAME": decoded value}, checked in smtpd.c's order:
    a missing value, a value over 255 characters, then an unknown name.  A name
    given twice counts once, with its last value, as in Postfix."""
    values: dict[str, str] = {}
    for word in _BLANKS.split(argument.strip(" \t")):
        name, _, raw = word.partition("=")
        if not raw:
            raise Refused(replies.ATTRIBUTE_EXPECTED)
        if len(raw) > _VALUE_MAX:
            raise Refused(replies.ATTRIBUTE_TOO_LONG)
        if name.upper() not in known:
            raise Refused(replies.bad_attribute_name(command, name))
        try:
            values[name.upper()] = xtext.unquote(raw)
        except xtext.XtextError:
            raise Refused(replies.bad_attribute_value(name.upper(), raw)) from None
    return values


def _unavailable(value: str) -> bool:
    # Both READMEs: [UNAVAILABLE] in any case (Note 3 of XFORWARD_README, Note 2 of XCLIENT_README).
    return value.upper() == UNAVAILABLE


def _check(name: str, value: str, valid: bool) -> None:
    if not valid:
        raise Refused(replies.bad_attribute_value(name, value))


def _host_name(name: str, value: str) -> str:
    """NAME: a host name, "not an SMTP client address" (XCLIENT_README); Postfix
    checks it with valid_hostname(), which refuses an all-numeric one."""
    if _unavailable(value):
        return ""
    _check(
        name,
        value,
        value.isascii() and not value.startswith("[") and ascii_form(value) == value and not _NUMERIC.fullmatch(value),
    )
    return value


def _address(name: str, value: str) -> str:
    """ADDR, DESTADDR: an IPv4 address, or an IPv6 one after "IPV6:" (in any
    case), never within []; Postfix's valid_mailhost_addr() takes nothing else."""
    if _unavailable(value):
        return ""
    try:
        if value[:5].upper() == "IPV6:":
            _check(name, value, value.isascii() and "%" not in value)
            return str(ipaddress.IPv6Address(value[5:]))
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise Refused(replies.bad_attribute_value(name, value)) from None


def _port(name: str, value: str) -> int:
    if _unavailable(value):
        return 0
    _check(name, value, value.isascii() and value.isdigit() and len(value) <= 5 and int(value) <= 65535)
    return int(value)


def _helo(name: str, value: str, ascii_only: bool) -> str:
    """HELO: a name smtpguard's own EHLO would take (see smtpguard.domains); in
    XFORWARD only in ASCII (XFORWARD_README Note 1)."""
    if _unavailable(value):
        return ""
    _check(name, value, ascii_form(value) is not None and (value.isascii() or not ascii_only))
    return value


def _word(name: str, value: str, longest: int = _VALUE_MAX) -> str:
    """PROTO and IDENT of XFORWARD: printable ASCII without white space or header
    specials (XFORWARD_README Note 1)."""
    if _unavailable(value):
        return ""
    _check(name, value, len(value) <= longest and _WORD.fullmatch(value) is not None)
    return value


def _source(name: str, value: str) -> str:
    """SOURCE: LOCAL or REMOTE (to the MTA in front), in any case."""
    if _unavailable(value):
        return ""
    _check(name, value, value.upper() in ("LOCAL", "REMOTE"))
    return value.upper()


_XFORWARD_FIELDS: Mapping[str, tuple[str, Callable[[str, str], str | int]]] = {
    "NAME": ("name", _host_name),
    "ADDR": ("address", _address),
    "PORT": ("port", _port),
    "PROTO": ("protocol", lambda name, value: _word(name, value, _PROTO_MAX)),
    "HELO": ("helo", lambda name, value: _helo(name, value, ascii_only=True)),
    "IDENT": ("ident", _word),
    "SOURCE": ("source", _source),
}


def xforward(argument: str, current: Forwarded | None) -> Forwarded:
    """The attributes after ``XFORWARD argument``, given those before (None: the
    first XFORWARD of the transaction)."""
    values = _attributes("XFORWARD", argument, XFORWARD_ATTRIBUTES)
    changes: dict[str, Any] = {}
    for key, value in values.items():
        field, parse = _XFORWARD_FIELDS[key]
        changes[field] = parse(key, value)
    return attrs.evolve(current or Forwarded(), **changes)


def forwarded_client(session: Client, forwarded: Forwarded) -> Client:
    """The client of a transaction after XFORWARD: the original client as the MTA
    in front named it, with nothing of the session's mixed in (XFORWARD_README:
    "The server must not mix client attributes from XFORWARD with client
    attributes from the current SMTP session"); the session is its hop."""
    return attrs.evolve(
        session,
        address=forwarded.address,
        port=forwarded.port,
        name=forwarded.name,
        helo=forwarded.helo,
        login="",
        forwarded_protocol=forwarded.protocol,
        ident=forwarded.ident,
        source=forwarded.source,
        hop=Hop(Forwarding.XFORWARD, session.address, session.port, session.helo),
    )


def xclient(argument: str, session: Client, peer: Hop) -> Client:
    """The session's client after ``XCLIENT argument``; ``peer`` is the host that
    connected (the hop, with the name it gave in EHLO, unless an earlier XCLIENT
    set one).

    XCLIENT_README, "Server response": the session goes back to its greeting,
    except for TLS and what this command sent, so HELO, PROTO (ESMTP or not) and
    LOGIN not given are reset, as xclient_cmd() resets them.  The other
    attributes keep their values, but an address comes with its own name and port
    or none: a proxy's port or an earlier client's name never describes another
    client.
    """
    values = _attributes("XCLIENT", argument, XCLIENT_ATTRIBUTES)
    hop = session.hop or attrs.evolve(peer, helo=session.helo)
    client = attrs.evolve(session, helo="", esmtp=False, login="", hop=hop)
    if "ADDR" in values:
        client = attrs.evolve(client, address=_address("ADDR", values["ADDR"]), port=0, name="")
    if "NAME" in values:
        # XCLIENT_README: [TEMPUNAVAIL] when the lookup failed for now; unknown all the same.
        name = values["NAME"]
        client = attrs.evolve(client, name="" if name.upper() == TEMPUNAVAIL else _host_name("NAME", name))
    if "PORT" in values:
        client = attrs.evolve(client, port=_port("PORT", values["PORT"]))
    if "HELO" in values:
        client = attrs.evolve(client, helo=_helo("HELO", values["HELO"], ascii_only=False))
    if "PROTO" in values:
        # XCLIENT_README: "either SMTP or ESMTP" (Postfix refuses anything else).
        proto = values["PROTO"].upper()
        _check("PROTO", values["PROTO"], proto in ("SMTP", "ESMTP"))
        client = attrs.evolve(client, esmtp=proto == "ESMTP")
    if "LOGIN" in values:
        client = attrs.evolve(client, login=_login(values["LOGIN"]))
    if "DESTADDR" in values:
        client = attrs.evolve(client, server_address=_address("DESTADDR", values["DESTADDR"]))
    if "DESTPORT" in values:
        client = attrs.evolve(client, server_port=_port("DESTPORT", values["DESTPORT"]))
    return client


def _login(value: str) -> str:
    """LOGIN: a SASL login name (UTF-8 allowed), [UNAVAILABLE] for none."""
    if _unavailable(value):
        return ""
    _check("LOGIN", value, not has_control(value))
    return value


# -- sending on --------------------------------------------------------------------------


def xforward_commands(client: Client, offered: str) -> list[str]:
    """The XFORWARD commands that tell a next hop offering ``offered`` (the
    attribute names after its XFORWARD keyword) who ``client`` is: every offered
    attribute smtpguard knows, [UNAVAILABLE] where the value is not known, as
    Postfix's smtp client sends them; in as few commands as the 512-octet limit
    of a command line allows (XFORWARD_README Note 2)."""
    wanted = set(offered.upper().split())
    address = f"IPV6:{client.address}" if ":" in client.address else client.address
    values = {
        "NAME": client.name,
        "ADDR": address,
        "PORT": str(client.port) if client.port else "",
        "PROTO": client.protocol,
        "HELO": client.helo_ascii,
        "IDENT": client.ident,
        "SOURCE": client.source,
    }
    words = []
    for key, value in values.items():
        if key in wanted:
            word = f"{key}={xtext.encode(value or UNAVAILABLE)}"
            words.append(word if len(word) <= _LINE_MAX - len("XFORWARD ") else f"{key}={UNAVAILABLE}")
    commands: list[str] = []
    for word in words:
        if commands and len(commands[-1]) + 1 + len(word) <= _LINE_MAX:
            commands[-1] += " " + word
        else:
            commands.append("XFORWARD " + word)
    return commands
