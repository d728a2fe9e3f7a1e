"""The envelope of one SMTP transaction: who connected, the sender and recipients,
and the MAIL/RCPT parameters of RFC 1870, 1652, 6531 and 3461, parsed and validated.

Everything here is a value; parsing functions raise :class:`EnvelopeError`
carrying the reply the client should hear.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Mapping
from enum import Enum, StrEnum
from typing import Any

import attrs

from smtpguard import replies, xtext
from smtpguard.domains import ascii_form
from smtpguard.headers import has_control
from smtpguard.replies import Reply


class EnvelopeError(Exception):
    """A MAIL or RCPT command that cannot be accepted; ``reply`` says why."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


class BodyType(Enum):
    SEVEN_BIT = "7BIT"
    EIGHT_BIT_MIME = "8BITMIME"
    BINARYMIME = "BINARYMIME"  # RFC 3030: only with BDAT


class Return(Enum):
    FULL = "FULL"
    HEADERS = "HDRS"


class Notify(Enum):
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    DELAY = "DELAY"


class Forwarding(StrEnum):
    """How a host in front told smtpguard who the client is."""

    XFORWARD = "XFORWARD"  # Postfix's XFORWARD_README: for one transaction
    XCLIENT = "XCLIENT"  # Postfix's XCLIENT_README: for the rest of the session


@attrs.frozen
class Hop:
    """The host that connected and spoke for the client: the MTA in front that sent
    XFORWARD, or the proxy (nginx's mail proxy, say) that sent XCLIENT."""

    command: Forwarding = attrs.field(converter=Forwarding)
    address: str
    port: int
    helo: str = ""


def _hop(value: Hop | Mapping[str, Any] | None) -> Hop | None:
    """A Hop, also from the mapping a quarantine record keeps of it."""
    if value is None or isinstance(value, Hop):
        return value
    return Hop(**value)


@attrs.frozen
class Client:
    """Who is talking to us: the client's address, port, HELO name and host name,
    our own endpoint, and how the message came (ESMTP, TLS).

    Behind an MTA that sent XFORWARD (for one transaction) or a proxy that sent
    XCLIENT, the client is the one they named, and ``hop`` is the host that
    connected.  ``esmtp`` and ``tls`` are always those of the connection the
    message came on.  An address, name, HELO, ident or login that is not known is
    empty (``[UNAVAILABLE]`` in those commands), a port that is not known 0.
    """

    address: str
    port: int
    server_address: str = ""
    server_port: int = 0
    helo: str = ""
    esmtp: bool = True
    tls: bool = False
    hostname: str = ""  # ours
    tls_version: str = ""  # of the connection the message came on, once its handshake is done
    tls_cipher: str = ""
    name: str = ""  # the client's host name, as XFORWARD or XCLIENT NAME gave it
    login: str = ""  # XCLIENT LOGIN: the name it authenticated with at the proxy
    # XFORWARD PROTO, "" when unavailable; None: the client talked to us (see protocol)
    forwarded_protocol: str | None = None
    ident: str = ""  # XFORWARD IDENT: the message's queue id on the MTA in front
    source: str = "REMOTE"  # XFORWARD SOURCE: LOCAL or REMOTE to the MTA in front, or ""
    hop: Hop | None = attrs.field(default=None, converter=_hop)

    @property
    def protocol(self) -> str:
        """The client's protocol as XFORWARD PROTO= carries it: the one the MTA in
        front forwarded, else the WITH keyword of RFC 3848 (see
        :attr:`Envelope.protocol` for the one of the Received: header)."""
        if self.forwarded_protocol is not None:
            return self.forwarded_protocol
        return with_keyword(self.esmtp, self.tls, bool(self.login))

    @property
    def helo_ascii(self) -> str:
        """The HELO name as a header or command without SMTPUTF8 may carry it (its
        U-labels as A-labels), as for XFORWARD HELO=; empty if there is none."""
        return ascii_form(self.helo) or ""

    @property
    def namaddr(self) -> str:
        """The client for logs, as Postfix writes it: ``name[address]:port``."""
        return namaddr(self.name, self.address, self.port)


def namaddr(name: str, address: str, port: int) -> str:
    return f"{name}[{address or 'unknown'}]" + (f":{port}" if port else "")


def with_keyword(esmtp: bool, tls: bool, authenticated: bool = False, smtputf8: bool = False) -> str:
    """The WITH keyword of RFC 3848 (RFC 6531 for SMTPUTF8): "A" when the client
    authenticated (at the proxy that sent XCLIENT LOGIN), as Postfix writes it."""
    if not esmtp:
        return "SMTP"
    keyword = ("UTF8SMTP" if smtputf8 else "ESMTP") + ("S" if tls else "")
    return keyword + ("A" if authenticated else "")


@attrs.frozen
class MailParameters:
    size: int | None = None
    body: BodyType | None = None
    smtputf8: bool = False
    envid: str | None = None
    ret: Return | None = None


@attrs.frozen
class RecipientParameters:
    notify: frozenset[Notify] | None = None  # empty set: NOTIFY=NEVER
    orcpt: str | None = None


@attrs.frozen
class Recipient:
    address: str
    parameters: RecipientParameters = RecipientParameters()


@attrs.frozen
class Envelope:
    client: Client
    sender: str
    parameters: MailParameters = MailParameters()
    recipients: tuple[Recipient, ...] = ()

    def with_recipient(self, recipient: Recipient) -> Envelope:
        return attrs.evolve(self, recipients=(*self.recipients, recipient))

    @property
    def protocol(self) -> str:
        """The WITH keyword for this transaction's Received: header, which traces
        the connection the message came on: RFC 6531's UTF8SMTP / UTF8SMTPS for an
        SMTPUTF8 one, with "A" after XCLIENT LOGIN (smtpguard itself offers no
        AUTH)."""
        client, smtputf8 = self.client, self.parameters.smtputf8
        return with_keyword(client.esmtp or smtputf8, client.tls, bool(client.login), smtputf8)


_MAIL = re.compile(r"^FROM:\s*<(.*?)>(?:\s+(.*))?$", re.I | re.S)
_RCPT = re.compile(r"^TO:\s*<(.*?)>(?:\s+(.*))?$", re.I | re.S)
_SOURCE_ROUTE = re.compile(r"^@[^:]+:")
_ATOM_CHARS = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_LOCAL_PART = re.compile(
    rf'^(?:{_ATOM_CHARS}+(?:\.{_ATOM_CHARS}+)*|"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*")$'
)
_DOMAIN = re.compile(
    r"^(?:[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\u0080-\U0010ffff-]*[A-Za-z0-9\u0080-\U0010ffff])?)"
    r"(?:\.[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\u0080-\U0010ffff-]*[A-Za-z0-9\u0080-\U0010ffff])?)*$"
)
_LET_DIG = frozenset(string.ascii_letters + string.digits)
_IPV6_CHARACTERS = frozenset(string.hexdigits + ":.")
_ESMTP_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
_MAX_PATH = 256


def parse_address(path: str, error: Reply) -> str:
    """Validate the inside of ``<...>``; return the address without source route.

    No control character is accepted anywhere, an address literal included
    (RFC 5321's qtextSMTP, quoted-pairSMTP and dcontent exclude them): an
    address ends up in header fields, notices and logs.
    """
    if has_control(path):
        raise EnvelopeError(error)
    path = _SOURCE_ROUTE.sub("", path)
    if len(path.encode("utf-8")) > _MAX_PATH:
        raise EnvelopeError(error)
    if path.endswith("]"):
        # A literal holds no "[", so the last "@[" starts it (its dcontent may hold "@").
        local, at, literal = path.rpartition("@[")
        valid_domain = _address_literal(literal[:-1])
    else:
        local, at, domain = path.rpartition("@")
        valid_domain = _DOMAIN.match(domain) is not None
    if not at or not local or not _LOCAL_PART.match(local) or not valid_domain:
        raise EnvelopeError(error)
    return path


def _address_literal(text: str) -> bool:
    """The inside of ``[...]``, RFC 5321 section 4.1.3: an IPv4 address, ``IPv6:``
    and an IPv6 address, or a General-address-literal (``tag:dcontent``)."""
    tag, colon, content = text.partition(":")
    if not colon:
        return _ipv4_literal(text)
    if tag.upper() == "IPV6":
        return _ipv6_literal(content)
    return (
        tag.isascii()
        and bool(tag)
        and tag[-1] in _LET_DIG
        and all(char in _LET_DIG or char == "-" for char in tag)
        and bool(content)
        and all("!" <= char <= "Z" or "^" <= char <= "~" for char in content)
    )


def _ipv4_literal(text: str) -> bool:
    """Four Snum of 1 to 3 digits, each at most 255."""
    parts = text.split(".")
    return len(parts) == 4 and all(
        part.isascii() and part.isdigit() and len(part) <= 3 and int(part) <= 255 for part in parts
    )


def _ipv6_literal(text: str) -> bool:
    """RFC 5321's IPv6-addr: full, compressed (at most 6 groups beside "::"), and
    either with an IPv4 address at the end (at most 4 groups beside "::")."""
    if not text or not set(text) <= _IPV6_CHARACTERS:
        return False  # also keeps out the zone index ipaddress would take
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    if "::" not in text:
        return True
    groups = [group for group in text.split(":") if group]
    return len(groups) <= (5 if "." in text else 6)


def parse_parameters(text: str | None) -> dict[str, str | None]:
    """Split ``KEY[=VALUE] ...`` into an upper-cased mapping, refusing duplicates
    and control characters (RFC 5321's esmtp-value excludes them)."""
    parameters: dict[str, str | None] = {}
    for item in (text or "").replace("\t", " ").split(" "):
        if not item:
            continue
        if has_control(item):
            raise EnvelopeError(replies.SYNTAX_ERROR)
        key, has_value, value = item.partition("=")
        key = key.upper()
        if not _ESMTP_KEYWORD.match(key) or key in parameters or (has_value and not value):
            raise EnvelopeError(replies.SYNTAX_ERROR)
        parameters[key] = value if has_value else None
    return parameters


def decode_xtext(value: str) -> str:
    """RFC 3461 xtext: ``+XX`` hex escapes."""
    try:
        return xtext.decode(value)
    except xtext.XtextError:
        raise EnvelopeError(replies.SYNTAX_ERROR.with_text("Malformed xtext")) from None


encode_xtext = xtext.encode


def _is_ascii(text: str) -> bool:
    return text.isascii()


def parse_mail(argument: str, max_size: int) -> tuple[str, MailParameters]:
    """Parse the argument of ``MAIL`` (everything after the verb)."""
    match = _MAIL.match(argument.strip())
    if match is None:
        raise EnvelopeError(replies.SYNTAX_ERROR.with_text("Syntax: MAIL FROM:<address>"))
    path, rest = match.groups()
    params = parse_parameters(rest)
    smtputf8 = "SMTPUTF8" in params
    if smtputf8 and params["SMTPUTF8"] is not None:
        raise EnvelopeError(replies.SYNTAX_ERROR)
    sender = "" if path == "" else parse_address(path, replies.BAD_SENDER_SYNTAX)
    if not smtputf8 and not _is_ascii(sender):
        raise EnvelopeError(replies.NON_ASCII_ADDRESS)
    size: int | None = None
    body: BodyType | None = None
    envid: str | None = None
    ret: Return | None = None
    for key, value in params.items():
        if key == "SIZE":
            if value is None or not (value.isascii() and value.isdigit()) or len(value) > 20:
                raise EnvelopeError(replies.SYNTAX_ERROR.with_text("Bad SIZE parameter"))
            size = int(value)
            if max_size and size > max_size:
                raise EnvelopeError(replies.MESSAGE_TOO_BIG)
        elif key == "BODY":
            try:
                body = BodyType((value or "").upper())
            except ValueError:
                raise EnvelopeError(replies.UNKNOWN_PARAMETER.with_text("Unsupported BODY type")) from None
        elif key == "ENVID":
            if value is None or len(value) > 100:
                raise EnvelopeError(replies.SYNTAX_ERROR.with_text("Bad ENVID parameter"))
            envid = decode_xtext(value)
            if has_control(envid):
                # It goes into DSNs, notices and quarantine metadata (RFC 3461 4.4:
                # printable ASCII once decoded).
                raise EnvelopeError(replies.SYNTAX_ERROR.with_text("Bad ENVID parameter"))
        elif key == "RET":
            try:
                ret = Return((value or "").upper())
            except ValueError:
                raise EnvelopeError(replies.SYNTAX_ERROR.with_text("Bad RET parameter")) from None
        elif key != "SMTPUTF8":
            raise EnvelopeError(replies.UNKNOWN_PARAMETER.with_text(f"Unsupported parameter {key}"))
    return sender, MailParameters(size=size, body=body, smtputf8=smtputf8, envid=envid, ret=ret)


def parse_rcpt(argument: str, smtputf8: bool) -> Recipient:
    """Parse the argument of ``RCPT`` (everything after the verb)."""
    match = _RCPT.match(argument.strip())
    if match is None:
        raise EnvelopeError(replies.SYNTAX_ERROR.with_text("Syntax: RCPT TO:<address>"))
    path, rest = match.groups()
    if path.lower() == "postmaster":
        address = path
    else:
        address = parse_address(path, replies.BAD_RECIPIENT_SYNTAX)
    if not smtputf8 and not _is_ascii(address):
        raise EnvelopeError(replies.NON_ASCII_ADDRESS)
    notify: frozenset[Notify] | None = None
    orcpt: str | None = None
    for key, value in parse_parameters(rest).items():
        if key == "NOTIFY":
            notify = _parse_notify(value)
        elif key == "ORCPT":
            orcpt = _parse_orcpt(value, smtputf8)
        else:
            raise EnvelopeError(replies.UNKNOWN_PARAMETER.with_text(f"Unsupported parameter {key}"))
    return Recipient(address, RecipientParameters(notify=notify, orcpt=orcpt))


def _parse_notify(value: str | None) -> frozenset[Notify]:
    words = (value or "").upper().split(",")
    if words == ["NEVER"]:
        return frozenset()
    try:
        parsed = [Notify(word) for word in words]
    except ValueError:
        raise EnvelopeError(replies.SYNTAX_ERROR.with_text("Bad NOTIFY parameter")) from None
    if len(set(parsed)) != len(parsed):
        raise EnvelopeError(replies.SYNTAX_ERROR.with_text("Bad NOTIFY parameter"))
    return frozenset(parsed)


def _parse_orcpt(value: str | None, smtputf8: bool) -> str:
    """ORCPT as received (``addr-type;address``), once it is what RFC 3461 section
    4.2 and RFC 6533 section 3 allow: see :func:`smtpguard.xtext.parse_orcpt`."""
    try:
        return xtext.parse_orcpt(value or "", smtputf8)
    except xtext.NeedsSMTPUTF8:
        raise EnvelopeError(replies.ORCPT_NEEDS_SMTPUTF8) from None
    except xtext.XtextError:
        raise EnvelopeError(replies.BAD_ORCPT) from None


def mail_arguments(
    sender: str, parameters: MailParameters, extensions: Mapping[str, str], size: int | None = None
) -> str:
    """The MAIL argument to send to a next hop advertising ``extensions``."""
    words = [f"FROM:<{sender}>"]
    if "SIZE" in extensions and (size if size is not None else parameters.size) is not None:
        words.append(f"SIZE={size if size is not None else parameters.size}")
    if parameters.body is not None and parameters.body.value in extensions:
        words.append(f"BODY={parameters.body.value}")
    elif parameters.body is BodyType.SEVEN_BIT and "8BITMIME" in extensions:
        words.append("BODY=7BIT")
    if parameters.smtputf8 and "SMTPUTF8" in extensions:
        words.append("SMTPUTF8")
    if "DSN" in extensions:
        if parameters.ret is not None:
            words.append(f"RET={parameters.ret.value}")
        if parameters.envid is not None:
            words.append(f"ENVID={encode_xtext(parameters.envid)}")
    return " ".join(words)


def rcpt_arguments(recipient: Recipient, extensions: Mapping[str, str]) -> str:
    """The RCPT argument to send to a next hop advertising ``extensions``."""
    words = [f"TO:<{recipient.address}>"]
    if "DSN" in extensions:
        notify = recipient.parameters.notify
        if notify is not None:
            order = [n.value for n in Notify if n in notify]
            words.append("NOTIFY=" + (",".join(order) if order else "NEVER"))
        if recipient.parameters.orcpt is not None:
            orcpt = xtext.orcpt_for_next_hop(recipient.parameters.orcpt, smtputf8="SMTPUTF8" in extensions)
            words.append(f"ORCPT={orcpt}")
    return " ".join(words)


def relayed_dsn_recipients(envelope: Envelope, extensions: Mapping[str, str]) -> tuple[Recipient, ...]:
    """The recipients owed a "relayed" DSN once a next hop advertising
    ``extensions`` has taken the message (RFC 3461 sections 4.1 and 5.2.2): none
    when it offers DSN (it reports itself) or for the null sender; otherwise
    those whose NOTIFY names SUCCESS (NOTIFY=NEVER and an absent NOTIFY ask for
    no success report)."""
    if "DSN" in extensions or envelope.sender == "":
        return ()
    return tuple(
        recipient
        for recipient in envelope.recipients
        if recipient.parameters.notify is not None and Notify.SUCCESS in recipient.parameters.notify
    )


def downgrade_refusal(envelope: Envelope, header_section: bytes, extensions: Mapping[str, str]) -> Reply | None:
    """Why a message cannot go to a next hop advertising ``extensions``, or None.

    RFC 6531 section 3.2: an SMTPUTF8 transaction whose header section is not
    ASCII needs a next hop that offers SMTPUTF8; there is no silent downgrade.
    (Its envelope addresses were checked at MAIL and RCPT; an all-ASCII one goes
    on without the SMTPUTF8 parameter.)"""
    if envelope.parameters.smtputf8 and "SMTPUTF8" not in extensions and not header_section.isascii():
        return replies.NEXT_HOP_NO_SMTPUTF8_MESSAGE
    return None
