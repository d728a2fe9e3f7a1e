"""The notices' texts, built without I/O: the delivery status notifications of
RFC 3464 for a sender (a failure, or "relayed" to a next hop without DSN), and
the plain-text notice for the administrator."""

from __future__ import annotations

import quopri
import re
from datetime import UTC, datetime
from email.utils import format_datetime, formataddr

import attrs

from smtpguard import headers, templates, xtext
from smtpguard.envelope import Envelope, Notify, Recipient
from smtpguard.incident import Incident, Relayed
from smtpguard.replies import Reply
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
RELAYED_SUBJECT = "Mail Delivery Report: relayed"
RELAYED_TEXT = """\
Mail Delivery Report

Your message to {recipients}
with the subject "{subject}"
was passed on to a mail system that does not report deliveries.

You asked to be told when it is delivered.  This report, that it left
{hostname}, is the last you will hear of it: it says the message was
relayed, not that it reached its recipients.

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
    relayed_subject: str = RELAYED_SUBJECT
    relayed_text: str = RELAYED_TEXT


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
    recipients = reported_recipients(incident.envelope)
    status = status_code(incident)
    diagnostic = f"554 {status} " + _ascii_line(f"Message dropped: {incident.decision.reason or 'policy'}")
    groups = [_recipient_fields(recipient, "failed", status, diagnostic) for recipient in recipients]
    texts = (settings.sender_subject, settings.sender_text, "Undelivered Message Headers")
    return _report(incident, recipients, groups, texts, settings, now, token)


def relayed_notice(
    incident: Incident, relayed: Relayed, settings: NoticeSettings, now: float, token: str
) -> bytes | None:
    """The "relayed" delivery status notification (RFC 3461 section 4.1, RFC 3464)
    for ``incident``'s sender: its message went to a next hop that reports no
    delivery, for the recipients in ``relayed`` that asked for NOTIFY=SUCCESS.
    None for the null sender or without such recipients.

    Each recipient is reported with Action: relayed, Status: 2.0.0, the next
    hop as Remote-MTA and its reply as Diagnostic-Code; the original header
    section is returned, never the body (RFC 3461 section 4.3: a report of
    success returns the headers only).
    """
    diagnostic = _reply_line(relayed.reply)
    remote = f"dns; {relayed.remote_mta}" if relayed.remote_mta and _PRINTABLE.match(relayed.remote_mta) else None
    groups = [_recipient_fields(recipient, "relayed", "2.0.0", diagnostic, remote) for recipient in relayed.recipients]
    texts = (settings.relayed_subject, settings.relayed_text, "Relayed Message Headers")
    return _report(incident, relayed.recipients, groups, texts, settings, now, token)


def _report(
    incident: Incident,
    recipients: tuple[Recipient, ...],
    groups: list[bytes],
    texts: tuple[str, str, str],
    settings: NoticeSettings,
    now: float,
    token: str,
) -> bytes | None:
    """A multipart/report of ``groups`` (per-recipient fields) about
    ``recipients`` for ``incident``'s sender, with ``texts``: the subject and
    text templates and the headers part's description; None when there is no
    one to tell."""
    subject, text_template, headers_description = texts
    envelope = incident.envelope
    if envelope.sender == "" or not recipients:
        return None
    values = notice_values(incident, settings.hostname)
    values["recipients"] = ", ".join(recipient.address for recipient in recipients)
    text = templates.render(text_template, values)
    boundary = f"smtpguard-{token}"
    head = _header_section(
        settings,
        to=envelope.sender,
        subject=templates.render(subject, values),
        now=now,
        token=token,
        auto_submitted="auto-replied",
        content_type=f'multipart/report; report-type=delivery-status;\nboundary="{boundary}"',
    )
    parts = [
        _part("text/plain", _crlf(text.encode("utf-8")), "Notification"),
        _part("message/delivery-status", _delivery_status(incident, groups, settings.hostname), "Delivery report"),
        _part("text/rfc822-headers", _crlf(incident.headers), headers_description),
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


def _delivery_status(incident: Incident, groups: list[bytes], hostname: str) -> bytes:
    """The message/delivery-status content (RFC 3464 section 2.1): per-message
    fields, then ``groups``, one per recipient; 7-bit by definition."""
    envid = incident.envelope.parameters.envid
    fields = [headers.field("Original-Envelope-Id", _printable(envid))] if envid is not None else []
    fields += [
        headers.field("Reporting-MTA", f"dns; {hostname}"),
        headers.field("Arrival-Date", rfc5322_date(incident.time)),
    ]
    report = b"\r\n".join([b"".join(fields), *groups])
    report.decode("ascii")  # 7-bit, or this notice is not built
    return report


def _recipient_fields(
    recipient: Recipient, action: str, status: str, diagnostic: str, remote_mta: str | None = None
) -> bytes:
    """One recipient's fields of a message/delivery-status (RFC 3464 section 2.3)."""
    fields = []
    if recipient.parameters.orcpt is not None:
        fields.append(headers.field("Original-Recipient", xtext.original_recipient_field(recipient.parameters.orcpt)))
    fields += [
        headers.field("Final-Recipient", _address_field(recipient.address)),
        headers.field("Action", action),
        headers.field("Status", status),
    ]
    if remote_mta is not None:
        fields.append(headers.field("Remote-MTA", remote_mta))
    fields.append(headers.field("Diagnostic-Code", f"smtp; {diagnostic}"))
    return b"".join(fields)


def _reply_line(reply: Reply) -> str:
    """An SMTP reply on one printable ASCII line, as a Diagnostic-Code quotes it."""
    enhanced = f" {reply.enhanced}" if reply.enhanced else ""
    return _ascii_line(f"{reply.code}{enhanced} {reply.text}")


def _address_field(address: str) -> str:
    """An address for Final-Recipient: rfc822, or utf-8 (RFC 6533) when it is not ASCII."""
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {xtext.encode_utf8_addr(address)}"


def _printable(value: str) -> str:
    """A value from the client in a header field: as it is when printable ASCII,
    xtext encoded otherwise (no CR LF can slip into the report)."""
    return value if _PRINTABLE.match(value) else xtext.encode(value)


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
