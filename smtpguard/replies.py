"""SMTP replies: one value type, and every reply smtpguard itself sends, named once."""

from __future__ import annotations

import re

import attrs

from smtpguard.headers import printable

_REPLY_LINE = re.compile(rb"^(\d{3})([ -]|$)(.*)$")
_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?: (.*))?$", re.S)


@attrs.frozen
class Reply:
    """One SMTP reply: a three-digit code, an optional enhanced status code (RFC 3463)
    and one or more lines of text."""

    code: int
    enhanced: str = ""
    text: str = ""

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def with_text(self, text: str) -> Reply:
        return attrs.evolve(self, text=text)

    def to_bytes(self) -> bytes:
        """The reply as it goes on the wire, multi-line where the text has newlines."""
        lines = self.text.split("\n") or [""]
        prefix = f"{self.enhanced} " if self.enhanced else ""
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{self.code}{sep}{prefix}{line}".rstrip(" ") + "\r\n")
        return "".join(out).encode("utf-8")

    @classmethod
    def from_lines(cls, lines: list[bytes]) -> Reply:
        """Build a reply from the raw lines (without CRLF) of a possibly multi-line
        reply; the enhanced code is taken from the first line when present."""
        code = 0
        texts: list[str] = []
        enhanced = ""
        for index, raw in enumerate(lines):
            match = _REPLY_LINE.match(raw)
            if match is None:
                raise ValueError(f"malformed reply line {raw!r}")
            code = int(match.group(1))
            # A peer's reply may be repeated to a client and logged: its control
            # characters (ESC for a terminal, say) are written as visible escapes.
            text = printable(match.group(3).decode("utf-8", "replace"))
            found = _ENHANCED.match(text)
            if found and (index == 0 or found.group(1) == enhanced):
                enhanced = found.group(1)
                text = found.group(2) or ""
            texts.append(text)
        return cls(code, enhanced, "\n".join(texts))


# Replies of smtpguard's own, by name.  Tests compare against these.
SERVICE_READY = Reply(220, "", "ESMTP smtpguard")
CLOSING = Reply(221, "2.0.0", "Bye")
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
RESET_OK = Reply(250, "2.0.0", "Ok")
DISCARDED = Reply(250, "2.0.0", "Ok: message discarded")
CANNOT_VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(214, "2.0.0", "See RFC 5321")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")

TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_CLIENT_CONNECTIONS = Reply(421, "4.7.0", "Too many connections from your address, try again later")
RATE_LIMITED = Reply(450, "4.7.1", "Too many messages from your address, try again later")
ACCESS_DENIED = Reply(554, "5.7.1", "Access denied")
TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
SESSION_TOO_LONG = Reply(421, "4.4.2", "Session time limit exceeded, closing connection")
MESSAGE_TOO_SLOW = Reply(421, "4.4.2", "Message time limit exceeded, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")
UPSTREAM_UNAVAILABLE = Reply(451, "4.4.1", "Next hop unavailable, try again later")
UPSTREAM_TIMEOUT = Reply(451, "4.4.2", "Next hop timed out, try again later")
UPSTREAM_PROTOCOL = Reply(451, "4.5.0", "Next hop protocol error, try again later")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
SCAN_DEFERRED = Reply(451, "4.7.1", "Message could not be scanned, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
SEPARATE_TRANSACTION = Reply(452, "4.5.3", "Recipient needs a separate transaction")
SPOOL_UNAVAILABLE = Reply(452, "4.3.1", "Insufficient system storage")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")

UNKNOWN_COMMAND = Reply(500, "5.5.1", "Command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BAD_ENCODING = Reply(500, "5.5.2", "Command is not valid UTF-8")
SYNTAX_ERROR = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
HELO_REQUIRED = Reply(501, "5.5.4", "Syntax: EHLO domain or address literal")
BAD_ORCPT = Reply(501, "5.5.4", "Bad ORCPT parameter")
ORCPT_NEEDS_SMTPUTF8 = Reply(501, "5.5.4", "Bad ORCPT parameter: non-ASCII requires SMTPUTF8")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NEED_HELO = Reply(503, "5.5.1", "Send EHLO or HELO first")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command first")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "TLS already active")
TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
SCAN_TOO_BIG = Reply(552, "5.3.4", "Message too big to be scanned")
SCAN_REJECTED = Reply(554, "5.7.0", "Message could not be scanned")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
HEADER_TOO_BIG = Reply(552, "5.3.4", "Message header section exceeds fixed maximum size")
NON_ASCII_ADDRESS = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
NEXT_HOP_NO_SMTPUTF8 = Reply(553, "5.6.7", "Next hop does not accept non-ASCII addresses")
NEXT_HOP_NO_SMTPUTF8_MESSAGE = Reply(554, "5.6.7", "Message refused: next hop does not accept non-ASCII headers")
NEXT_HOP_NO_8BITMIME = Reply(554, "5.6.3", "Next hop does not accept 8-bit data")
NEXT_HOP_NO_BINARYMIME = Reply(554, "5.6.3", "Next hop does not accept binary content")
BINARYMIME_NEEDS_BDAT = Reply(503, "5.5.1", "BODY=BINARYMIME requires BDAT")
CHUNK_RECEIVED = Reply(250, "2.0.0", "Ok")
BAD_BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT size [LAST]; closing the connection")
VIRUS_REJECTED = Reply(554, "5.7.1", "Message rejected: virus found")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Unsupported parameter")

# XFORWARD and XCLIENT, as Postfix's smtpd answers them (src/smtpd/smtpd.c).
TRANSACTION_IN_PROGRESS = Reply(503, "5.5.1", "MAIL transaction in progress")
NOT_AUTHORIZED = Reply(550, "5.7.0", "Insufficient authorization")
XFORWARD_SYNTAX = Reply(501, "5.5.4", "Syntax: XFORWARD attribute=value...")
XCLIENT_SYNTAX = Reply(501, "5.5.4", "Syntax: XCLIENT attribute=value...")
ATTRIBUTE_EXPECTED = Reply(501, "5.5.4", "attribute=value expected")
ATTRIBUTE_TOO_LONG = Reply(501, "5.5.4", "Attribute value too long")
BAD_ATTRIBUTE_NAME = Reply(501, "5.5.4", "Bad {command} attribute name: {name}")
BAD_ATTRIBUTE_VALUE = Reply(501, "5.5.4", "Bad {name} syntax: {value}")


def bad_attribute_name(command: str, name: str) -> Reply:
    """``501 5.5.4 Bad XFORWARD attribute name: FOO`` (the name made printable)."""
    return BAD_ATTRIBUTE_NAME.with_text(BAD_ATTRIBUTE_NAME.text.format(command=command, name=printable(name)))


def bad_attribute_value(name: str, value: str) -> Reply:
    """``501 5.5.4 Bad ADDR syntax: 192.0.2`` (the value made printable)."""
    return BAD_ATTRIBUTE_VALUE.with_text(BAD_ATTRIBUTE_VALUE.text.format(name=name, value=printable(value)))
