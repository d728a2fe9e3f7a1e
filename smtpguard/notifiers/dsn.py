"""The notices' texts, built without I/O: the delivery status notification of
RFC 3464 for a sender, and the plain-text notice for the administrator."""

from __future__ import annotations

import quopri
import re
from datetime import UTC, datetime
from email.utils import format_datetime, formataddr

import attrs

from smtpguard import headers, templates
from smtpguard.envelope import Envelope, EnvelopeError, Notify, Recipient, decode_xtext, encode_xtext
from smtpguard.incident import Incident
from smtpguard.results import Action, ErrorKind, Verdict

SENDER_SUBJECT = "Mail Delivery Failure"
SENDER_TEXT = """\
Mail Delivery Failure

Your message to {recipients}
with the subject "{subject}"
could not be delivered to one or more of its recipients for the reason:

    {reason}

The message was not delivered as sent.  If you did not send it, your
address may have been forged and you can ignore this notice.

Reporting system: {hostname}
Queue id: {queue_id}
"""
ADMIN_SUBJECT = "[smtpguard] {reason} from {sender}"
ADMIN_TEXT = """\
smtpguard on {hostname} stopped a message.

Queue id:    {queue_id}
Arrived:     {date}
Client:      {client} (HELO {helo})
Server:      {server}
Sender:      {sender}
Recipients:  {recipients}
Subject:     {subject}
Threats:     {threat}
Files:       {file}
Scanner:     {scanner}
Reason:      {reason}
Action:      {action}
"""

# Placeholders notices know on top of those of smtpguard.templates.
EXTRA_PLACEHOLDERS = ("hostname", "date", "action", "scanner", "helo", "envid")
PLACEHOLDERS = (*templates.PLACEHOLDERS, *EXTRA_PLACEHOLDERS)

_ACTIONS = {
    Action.DELIVER: "delivered with a warning",
    Action.REPLACE: "body replaced by a notice",
    Action.REJECT: "rejected",
    Action.DISCARD: "discarded",
    Action.DEFER: "deferred",
}
_MAX_LINE = 998
_PRINTABLE = re.compile(r"^[\x20-\x7e]*$")


@attrs.frozen
class NoticeSettings:
    """Who notices come from and what they say; the texts are templates."""

    from_address: str
    from_name: str = "Mail Delivery System"
    hostname: str = "localhost"  # Reporting-MTA, and the right side of Message-IDs
    admin: str | None = None
    sender_subject: str = SENDER_SUBJECT
    sender_text: str = SENDER_TEXT
    admin_subject: str = ADMIN_SUBJECT
    admin_text: str = ADMIN_TEXT


def reported_recipients(envelope: Envelope) -> tuple[Recipient, ...]:
    """The recipients a failure may be reported for (RFC 3461 section 4.1): NOTIFY
    absent, or naming FAILURE."""
    return tuple(
        recipient
        for recipient in envelope.recipients
        if recipient.parameters.notify is None or Notify.FAILURE in recipient.parameters.notify
    )


def rfc5322_date(seconds: float) -> str:
    return format_datetime(datetime.fromtimestamp(seconds, UTC))


def notice_values(incident: Incident, hostname: str) -> dict[str, str]:
    """The placeholder values for ``incident``'s notices."""
    envelope, decision = incident.envelope, incident.decision
    values = templates.values(envelope, incident.result, decision.reason, incident.subject, incident.transaction_id)
    action = _ACTIONS[decision.action] + (", quarantined" if decision.quarantine else "")
    values.update(
        hostname=hostname,
        date=rfc5322_date(incident.time),
        action=action,
        scanner=incident.result.scanner or "-",
        helo=envelope.client.helo or "-",
        envid=envelope.parameters.envid or "",
    )
    return values


def status_code(incident: Incident) -> str:
    """The RFC 3463 status of the report: 5.7.1 for a virus, 5.3.4 for a message
    too big to scan, 5.7.0 for any other message dropped by policy."""
    result = incident.result
    if result.verdict is Verdict.INFECTED:
        return "5.7.1"
    if result.error is ErrorKind.CONTENT_SIZE:
        return "5.3.4"
    return "5.7.0"


def sender_notice(incident: Incident, settings: NoticeSettings, now: float, token: str) -> bytes | None:
    """The delivery status notification for ``incident``'s sender, or None when no
    one may be told: the null sender, or no recipient whose NOTIFY allows it.

    ``token`` (random, from [0-9a-z]) makes the MIME boundary and Message-ID.
    Only the original header section is returned, never the body, whatever RET
    asked for: the body is what was dropped.
    """
    envelope = incident.envelope
    recipients = reported_recipients(envelope)
    if envelope.sender == "" or not recipients:
        return None
    values = notice_values(incident, settings.hostname)
    values["recipients"] = ", ".join(recipient.address for recipient in recipients)
    text = templates.render(settings.sender_text, values)
    boundary = f"smtpguard-{token}"
    head = _header_section(
        settings,
        to=envelope.sender,
        subject=templates.render(settings.sender_subject, values),
        now=now,
        token=token,
        auto_submitted="auto-replied",
        content_type=f'multipart/report; report-type=delivery-status;\nboundary="{boundary}"',
    )
    parts = [
        _part("text/plain", _crlf(text.encode("utf-8")), "Notification"),
        _part("message/delivery-status", _delivery_status(incident, recipients, settings.hostname), "Delivery report"),
        _part("text/rfc822-headers", _crlf(incident.headers), "Undelivered Message Headers"),
    ]
    body = b"This is a MIME-encapsulated message.\r\n"
    for part in parts:
        body += b"\r\n--" + boundary.encode("ascii") + b"\r\n" + part
    body += b"\r\n--" + boundary.encode("ascii") + b"--\r\n"
    return head + headers.field("MIME-Version", "1.0") + b"\r\n" + body


def admin_notice(incident: Incident, settings: NoticeSettings, now: float, token: str) -> bytes | None:
    """The plain-text notice for the administrator (None without one): the template's
    text followed by the original header section, never the body."""
    if not settings.admin:
        return None
    values = notice_values(incident, settings.hostname)
    text = templates.render(settings.admin_text, values).encode("utf-8")
    if not text.endswith(b"\n"):
        text += b"\n"
    text += b"\nThe original headers:\n\n" + incident.headers.decode("utf-8", "replace").encode("utf-8")
    encoding, body = _transfer_encoding(_crlf(text))
    charset = "us-ascii" if encoding == "7bit" else "utf-8"
    head = _header_section(
        settings,
        to=settings.admin,
        subject=templates.render(settings.admin_subject, values),
        now=now,
        token=token,
        auto_submitted="auto-generated",
        content_type=f"text/plain; charset={charset}",
    )
    return (
        head
        + headers.field("MIME-Version", "1.0")
        + headers.field("Content-Transfer-Encoding", encoding)
        + b"\r\n"
        + body
    )


def _header_section(
    settings: NoticeSettings, to: str, subject: str, now: float, token: str, auto_submitted: str, content_type: str
) -> bytes:
    return b"".join(
        [
            headers.field("From", formataddr((settings.from_name, settings.from_address))),
            headers.field("To", f"<{to}>"),
            headers.field("Subject", subject, text=True),
            headers.field("Date", rfc5322_date(now)),
            headers.field("Message-ID", f"<{token}@{settings.hostname}>"),
            # RFC 3834: no automatic reply to this one.
            headers.field("Auto-Submitted", auto_submitted),
            headers.field("Content-Type", *content_type.split("\n")),
        ]
    )


def _delivery_status(incident: Incident, recipients: tuple[Recipient, ...], hostname: str) -> bytes:
    """The message/delivery-status content (RFC 3464 section 2.1): per-message
    fields, then a group per recipient; 7-bit by definition."""
    envid = incident.envelope.parameters.envid
    fields = [headers.field("Original-Envelope-Id", _printable(envid))] if envid is not None else []
    fields += [
        headers.field("Reporting-MTA", f"dns; {hostname}"),
        headers.field("Arrival-Date", rfc5322_date(incident.time)),
    ]
    groups = [b"".join(fields)]
    status = status_code(incident)
    diagnostic = _ascii_line(f"Message dropped: {incident.decision.reason or 'policy'}")
    for recipient in recipients:
        fields = []
        if recipient.parameters.orcpt is not None:
            fields.append(headers.field("Original-Recipient", _original_recipient(recipient.parameters.orcpt)))
        fields += [
            headers.field("Final-Recipient", _address_field(recipient.address)),
            headers.field("Action", "failed"),
            headers.field("Status", status),
            headers.field("Diagnostic-Code", f"smtp; 554 {status} {diagnostic}"),
        ]
        groups.append(b"".join(fields))
    report = b"\r\n".join(groups)
    report.decode("ascii")  # 7-bit, or this notice is not built
    return report


def _original_recipient(orcpt: str) -> str:
    """ORCPT's ``addr-type;xtext`` as the Original-Recipient field wants it: the
    address decoded (``rfc822;bob@example.net``), unless decoding would make it
    unprintable, in which case it stays encoded."""
    addr_type, _, encoded = orcpt.partition(";")
    if addr_type.upper() == "UTF-8":
        return f"{addr_type};{_utf8_addr_xtext(encoded)}"
    try:
        decoded = decode_xtext(encoded)
    except EnvelopeError:
        return f"{addr_type};{_printable(encoded)}"
    return f"{addr_type};{decoded if _PRINTABLE.match(decoded) else encoded}"


def _address_field(address: str) -> str:
    """An address for Final-Recipient: rfc822, or utf-8 (RFC 6533) when it is not ASCII."""
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {_utf8_addr_xtext(address)}"


def _utf8_addr_xtext(address: str) -> str:
    """RFC 6533 utf-8-addr-xtext: what is not printable ASCII, and the backslash,
    '+' and '=', written as ``\\x{HEX}``."""
    return "".join(
        char if "\x21" <= char <= "\x7e" and char not in "\\+=" else f"\\x{{{ord(char):X}}}" for char in address
    )


def _printable(value: str) -> str:
    """A value from the client in a header field: as it is when printable ASCII,
    xtext encoded otherwise (no CR LF can slip into the report)."""
    return value if _PRINTABLE.match(value) else encode_xtext(value)


def _ascii_line(text: str) -> str:
    text = " ".join(text.split())
    return "".join(char if " " <= char <= "~" else "?" for char in text)[:400]


def _crlf(data: bytes) -> bytes:
    """``data`` with CRLF line ends only, ending in one."""
    data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return data if data.endswith(b"\r\n") or not data else data + b"\r\n"


def _transfer_encoding(data: bytes) -> tuple[str, bytes]:
    """7bit when ``data`` (CRLF lines) is ASCII in short lines, quoted-printable
    otherwise: notices stay 7-bit, so any next hop takes them."""
    if data.isascii() and all(len(line) <= _MAX_LINE for line in data.split(b"\r\n")):
        return "7bit", data
    return "quoted-printable", quopri.encodestring(data.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n")


def _part(content_type: str, content: bytes, description: str) -> bytes:
    fields = [headers.field("Content-Description", description)]
    if content_type == "message/delivery-status":
        fields.append(headers.field("Content-Type", content_type))
    else:
        encoding, content = _transfer_encoding(content)
        if content_type == "text/plain":
            content_type += "; charset=" + ("us-ascii" if encoding == "7bit" else "utf-8")
        fields += [headers.field("Content-Type", content_type), headers.field("Content-Transfer-Encoding", encoding)]
    return b"".join(fields) + b"\r\n" + content
