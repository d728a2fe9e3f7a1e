"""The notices' texts, parsed back with Python's email package: the RFC 3464
delivery status notification for the sender and the administrator's notice."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable
from email.message import EmailMessage, Message

import attrs
import pytest

from smtpguard.envelope import Client, Envelope, MailParameters, Notify, Recipient, RecipientParameters, Return
from smtpguard.incident import Incident, Relayed
from smtpguard.notifiers.dsn import NoticeSettings, admin_notice, relayed_notice, reported_recipients, sender_notice
from smtpguard.replies import Reply
from smtpguard.results import Action, Decision, ErrorKind, Notice, ScanResult, Threat

ARRIVED = 1700000000.0  # Tue, 14 Nov 2023 22:13:20 +0000
NOW = ARRIVED + 5
HEADERS = (
    b"Received: from client.example ([192.0.2.7])\r\n\tby mx.example.org; Tue, 14 Nov 2023 22:13:19 +0000\r\n"
    b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.net>\r\nSubject: quarterly report\r\n"
    b"Message-ID: <report.1@example.org>\r\n"
)
BODY = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*\r\n"
SETTINGS = NoticeSettings("postmaster@example.com", hostname="guard.example.com", admin="security@example.com")
VIRUS = ScanResult.infected((Threat("Eicar-Test-Signature", "invoice.zip/eicar.com"),), "builtin")
ALL = frozenset({Notice.SENDER, Notice.ADMIN})


def recipient(address: str, notify: frozenset[Notify] | None = None, orcpt: str | None = None) -> Recipient:
    return Recipient(address, RecipientParameters(notify=notify, orcpt=orcpt))


def incident(
    recipients: tuple[Recipient, ...] = (recipient("bob@example.net"),),
    sender: str = "alice@example.org",
    result: ScanResult = VIRUS,
    reason: str = "virus Eicar-Test-Signature",
    envid: str | None = None,
    headers: bytes = HEADERS,
    subject: str = "quarterly report",
    action: Action = Action.REPLACE,
) -> Incident:
    client = Client("192.0.2.7", 40001, "192.0.2.1", 25, helo="client.example", hostname="guard.example.com")
    envelope = Envelope(client, sender, MailParameters(envid=envid, ret=Return.FULL), recipients)
    decision = Decision(action, reason=reason, notices=ALL)
    return Incident("0A1B2C3D4E5F", envelope, result, decision, headers, ARRIVED, subject)


def parse(data: bytes | None) -> EmailMessage:
    assert data is not None
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def report(data: bytes | None) -> tuple[EmailMessage, list[Message]]:
    """The DSN and the field blocks of its message/delivery-status part."""
    message = parse(data)
    status = message.get_payload()[1]
    return message, status.get_payload()


@pytest.mark.parametrize(
    "build",
    [lambda: sender_notice(incident(), SETTINGS, NOW, "t0ken"), lambda: relayed_report()],
    ids=["failed", "relayed"],
)
def test_dsn_is_a_multipart_report_of_three_parts(build: Callable[[], bytes | None]) -> None:
    """The DSN, failed or relayed, is multipart/report; report-type=delivery-status
    with, in order, the human-readable text, message/delivery-status and
    text/rfc822-headers."""
    message = parse(build())

    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert [part.get_content_type() for part in message.iter_parts()] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]


def test_dsn_header_section() -> None:
    """The DSN comes from the configured address, goes to the envelope sender, and
    says it was sent automatically (RFC 3834)."""
    message = parse(sender_notice(incident(), SETTINGS, NOW, "t0ken"))

    assert message["From"] == "Mail Delivery System <postmaster@example.com>"
    assert message["To"] == "alice@example.org"
    assert message["Subject"] == "Mail Delivery Failure"
    assert message["Date"] == "Tue, 14 Nov 2023 22:13:25 +0000"
    assert message["Message-ID"] == "<t0ken@guard.example.com>"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"


def test_dsn_per_message_fields() -> None:
    """The per-message block: Original-Envelope-Id from ENVID, Reporting-MTA with the
    configured host name, and the Arrival-Date of the original."""
    _, blocks = report(sender_notice(incident(envid="QQ314159"), SETTINGS, NOW, "t0ken"))

    assert list(blocks[0].items()) == [
        ("Original-Envelope-Id", "QQ314159"),
        ("Reporting-MTA", "dns; guard.example.com"),
        ("Arrival-Date", "Tue, 14 Nov 2023 22:13:20 +0000"),
    ]


def test_dsn_without_envid_has_no_original_envelope_id() -> None:
    """Without ENVID the per-message block has no Original-Envelope-Id."""
    _, blocks = report(sender_notice(incident(), SETTINGS, NOW, "t0ken"))

    assert "Original-Envelope-Id" not in blocks[0]
    assert blocks[0]["Reporting-MTA"] == "dns; guard.example.com"


def test_dsn_per_recipient_fields_for_a_virus() -> None:
    """Each reported recipient gets a block: Original-Recipient from ORCPT with its
    xtext decoded, Final-Recipient, Action failed, Status 5.7.1, and an smtp
    Diagnostic-Code."""
    recipients = (recipient("bob@example.net", orcpt="rfc822;bob+2Bsales@example.net"),)
    _, blocks = report(sender_notice(incident(recipients), SETTINGS, NOW, "t0ken"))

    assert len(blocks) == 2
    assert list(blocks[1].items()) == [
        ("Original-Recipient", "rfc822;bob+sales@example.net"),
        ("Final-Recipient", "rfc822; bob@example.net"),
        ("Action", "failed"),
        ("Status", "5.7.1"),
        ("Diagnostic-Code", "smtp; 554 5.7.1 Message dropped: virus Eicar-Test-Signature"),
    ]


def test_dsn_without_orcpt_has_no_original_recipient() -> None:
    """A recipient given without ORCPT has no Original-Recipient field."""
    _, blocks = report(sender_notice(incident(), SETTINGS, NOW, "t0ken"))

    assert "Original-Recipient" not in blocks[1]
    assert blocks[1]["Final-Recipient"] == "rfc822; bob@example.net"


def test_dsn_for_a_dropped_message_has_status_5_7_0() -> None:
    """A message dropped for a scan error is reported with 5.7.0 and the reason."""
    result = ScanResult.failed(ErrorKind.TIMEOUT, scanner="clamd")
    data = sender_notice(incident(result=result, reason="scan error (timeout)"), SETTINGS, NOW, "t0ken")
    _, blocks = report(data)

    assert blocks[1]["Status"] == "5.7.0"
    assert blocks[1]["Diagnostic-Code"] == "smtp; 554 5.7.0 Message dropped: scan error (timeout)"


def test_dsn_for_a_message_too_big_to_scan_has_status_5_3_4() -> None:
    """A message dropped because it was too big to scan is reported with 5.3.4."""
    result = ScanResult.failed(ErrorKind.CONTENT_SIZE, scanner="clamd")
    _, blocks = report(sender_notice(incident(result=result, reason="scan error (content-size)"), SETTINGS, NOW, "t"))

    assert blocks[1]["Status"] == "5.3.4"


def test_dsn_returns_the_original_headers_and_never_the_body() -> None:
    """The text/rfc822-headers part holds the original header section byte for byte,
    and the body is nowhere in the DSN, although RET=FULL was asked for."""
    data = sender_notice(incident(), SETTINGS, NOW, "t0ken")
    message = parse(data)

    assert message.get_payload()[2].get_payload(decode=True) == HEADERS
    assert data is not None and b"EICAR" not in data


def test_dsn_returns_8bit_headers_quoted_printable() -> None:
    """Original headers with 8-bit bytes are returned exactly, quoted-printable
    encoded: the DSN itself stays 7-bit."""
    headers = b"From: J\xc3\xbcrgen <juergen@example.org>\r\nSubject: caf\xe9\r\n"
    data = sender_notice(incident(headers=headers), SETTINGS, NOW, "t0ken")
    part = parse(data).get_payload()[2]

    assert data is not None and data.isascii()
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert part.get_payload(decode=True) == headers


def test_dsn_text_from_the_default_template() -> None:
    """The human-readable part is the default template, rendered."""
    part = parse(sender_notice(incident(), SETTINGS, NOW, "t0ken")).get_payload()[0]

    assert part.get_content() == (
        'Mail Delivery Failure\r\n\r\nYour message to bob@example.net\r\nwith the subject "quarterly report"\r\n'
        "could not be delivered to one or more of its recipients for the reason:\r\n\r\n"
        "    virus Eicar-Test-Signature\r\n\r\n"
        "The message was not delivered as sent.  If you did not send it, your\r\n"
        "address may have been forged and you can ignore this notice.\r\n\r\n"
        "Reporting system: guard.example.com\r\nQueue id: 0A1B2C3D4E5F\r\n"
    )


def test_dsn_text_and_subject_from_custom_templates() -> None:
    """Custom templates fill every documented placeholder; an unknown one stays as written."""
    settings = attrs.evolve(
        SETTINGS,
        sender_subject="Undelivered: {subject}",
        sender_text=(
            "{threat}|{file}|{client}|{server}|{sender}|{recipients}|{subject}|{reason}|{queue_id}|"
            "{hostname}|{date}|{action}|{scanner}|{helo}|{envid}|{unknown}\n"
        ),
    )
    message = parse(sender_notice(incident(envid="E1"), settings, NOW, "t0ken"))

    assert message["Subject"] == "Undelivered: quarterly report"
    assert message.get_payload()[0].get_content() == (
        "Eicar-Test-Signature|invoice.zip/eicar.com|192.0.2.7:40001|192.0.2.1:25|alice@example.org|"
        "bob@example.net|quarterly report|virus Eicar-Test-Signature|0A1B2C3D4E5F|guard.example.com|"
        "Tue, 14 Nov 2023 22:13:20 +0000|body replaced by a notice|builtin|client.example|E1|{unknown}\r\n"
    )


def test_dsn_subject_is_encoded_and_kept_on_one_logical_line() -> None:
    """A non-ASCII subject with line breaks becomes one RFC 2047 encoded Subject,
    the line breaks shown as escapes: nothing from the original can add a header
    to the notice."""
    settings = attrs.evolve(SETTINGS, sender_subject="Undelivered: {subject}")
    data = sender_notice(incident(subject="caf\u00e9\r\nBcc: victim@example.com"), settings, NOW, "t0ken")
    message = parse(data)

    assert data is not None and data.isascii()
    assert message["Subject"] == "Undelivered: caf\u00e9\\x0d\\x0aBcc: victim@example.com"
    assert message["Bcc"] is None


def test_dsn_envid_with_line_breaks_stays_xtext() -> None:
    """An ENVID that decodes to something unprintable is reported xtext-encoded, so
    it cannot break the report's fields."""
    _, blocks = report(sender_notice(incident(envid="a\r\nAction: delivered"), SETTINGS, NOW, "t0ken"))

    assert blocks[0]["Original-Envelope-Id"] == "a+0D+0AAction:+20delivered"
    assert blocks[1]["Action"] == "failed"


def test_dsn_non_ascii_recipient_is_reported_as_utf8_address() -> None:
    """A non-ASCII recipient (SMTPUTF8) is reported with address type utf-8 in the
    utf-8-addr-xtext form of RFC 6533, keeping the report 7-bit."""
    _, blocks = report(sender_notice(incident((recipient("j\u00f6rg@example.net"),)), SETTINGS, NOW, "t0ken"))

    assert blocks[1]["Final-Recipient"] == "utf-8; j\\x{F6}rg@example.net"


def test_reported_recipients_honour_notify() -> None:
    """Only recipients whose NOTIFY is absent or names FAILURE are reported."""
    recipients = (
        recipient("absent@example.net"),
        recipient("never@example.net", frozenset()),
        recipient("success@example.net", frozenset({Notify.SUCCESS})),
        recipient("failure@example.net", frozenset({Notify.FAILURE})),
        recipient("both@example.net", frozenset({Notify.SUCCESS, Notify.FAILURE, Notify.DELAY})),
        recipient("delay@example.net", frozenset({Notify.DELAY})),
    )
    reported = reported_recipients(incident(recipients).envelope)

    assert [r.address for r in reported] == ["absent@example.net", "failure@example.net", "both@example.net"]


def test_dsn_lists_only_recipients_that_asked_for_failure_notices() -> None:
    """Recipients with NOTIFY=NEVER or NOTIFY=SUCCESS get no block and are not named
    in the text."""
    recipients = (
        recipient("never@example.net", frozenset()),
        recipient("bob@example.net"),
        recipient("success@example.net", frozenset({Notify.SUCCESS})),
    )
    message, blocks = report(sender_notice(incident(recipients), SETTINGS, NOW, "t0ken"))

    assert [block["Final-Recipient"] for block in blocks[1:]] == ["rfc822; bob@example.net"]
    assert "Your message to bob@example.net\r\n" in message.get_payload()[0].get_content()


def test_no_dsn_when_no_recipient_asked_for_failure_notices() -> None:
    """When every recipient said NOTIFY=NEVER or SUCCESS only, there is no DSN."""
    recipients = (recipient("never@example.net", frozenset()), recipient("s@example.net", frozenset({Notify.SUCCESS})))

    assert sender_notice(incident(recipients), SETTINGS, NOW, "t0ken") is None


def test_no_dsn_to_the_null_sender() -> None:
    """A message from <> gets no DSN, whatever the decision says."""
    assert sender_notice(incident(sender=""), SETTINGS, NOW, "t0ken") is None


def test_admin_notice_is_plain_text_with_the_details() -> None:
    """The admin notice is a text/plain message to the admin address listing client,
    sender, recipients, subject, threats and files, action and queue id."""
    recipients = (recipient("bob@example.net"), recipient("carol@example.net", frozenset()))
    message = parse(admin_notice(incident(recipients, action=Action.REJECT), SETTINGS, NOW, "t1"))

    assert message.get_content_type() == "text/plain"
    assert message["To"] == "security@example.com"
    assert message["From"] == "Mail Delivery System <postmaster@example.com>"
    assert message["Subject"] == "[smtpguard] virus Eicar-Test-Signature from alice@example.org"
    assert message["Auto-Submitted"] == "auto-generated"
    text = message.get_content()
    assert text.startswith(
        "smtpguard on guard.example.com stopped a message.\r\n\r\n"
        "Queue id:    0A1B2C3D4E5F\r\n"
        "Arrived:     Tue, 14 Nov 2023 22:13:20 +0000\r\n"
        "Client:      192.0.2.7:40001 (HELO client.example)\r\n"
        "Server:      192.0.2.1:25\r\n"
        "Sender:      alice@example.org\r\n"
        "Recipients:  bob@example.net, carol@example.net\r\n"
        "Subject:     quarterly report\r\n"
        "Threats:     Eicar-Test-Signature\r\n"
        "Files:       invoice.zip/eicar.com\r\n"
        "Scanner:     builtin\r\n"
        "Reason:      virus Eicar-Test-Signature\r\n"
        "Action:      rejected\r\n"
    )


def test_admin_notice_ends_with_the_original_headers_and_not_the_body() -> None:
    """After the details come the original headers; the body is not included."""
    data = admin_notice(incident(), SETTINGS, NOW, "t1")
    text = parse(data).get_content()

    assert text.endswith("\r\nThe original headers:\r\n\r\n" + HEADERS.decode())
    assert data is not None and b"EICAR" not in data


def test_admin_notice_names_the_quarantine() -> None:
    """When the decision kept a copy, the action says so."""
    quarantined = attrs.evolve(incident(), decision=Decision(Action.DISCARD, quarantine=True, notices=ALL))
    text = parse(admin_notice(quarantined, SETTINGS, NOW, "t1")).get_content()

    assert "Action:      discarded, quarantined\r\n" in text


def test_no_admin_notice_without_an_admin_address() -> None:
    """Without [notifications] admin there is no admin notice."""
    assert admin_notice(incident(), attrs.evolve(SETTINGS, admin=None), NOW, "t1") is None


# -- the relayed DSN ----------------------------------------------------------------

QUEUED = Reply(250, "2.0.0", "Ok: queued as 4F2A")
SUCCESS = frozenset({Notify.SUCCESS})


def relayed_report(envid: str | None = None) -> bytes | None:
    recipients = (
        recipient("bob@example.net", SUCCESS, orcpt="rfc822;bob+2Bsales@example.net"),
        recipient("jörg@example.net", frozenset({Notify.SUCCESS, Notify.FAILURE}), orcpt="utf-8;jörg@example.net"),
    )
    relayed = Relayed(recipients, QUEUED, "192.0.2.25")
    clean = incident(recipients, result=ScanResult.clean("builtin"), reason="", action=Action.DELIVER, envid=envid)
    return relayed_notice(clean, relayed, SETTINGS, NOW, "t0ken")


def test_relayed_dsn_header_section() -> None:
    """The relayed DSN goes to the envelope sender with its own subject, sent
    automatically (RFC 3834)."""
    message = parse(relayed_report())

    assert (message["To"], message["Subject"], message["Auto-Submitted"]) == (
        "alice@example.org",
        "Mail Delivery Report: relayed",
        "auto-replied",
    )


def test_relayed_dsn_fields() -> None:
    """Per message: ENVID, Reporting-MTA, Arrival-Date.  Per recipient: the ORCPT as
    Original-Recipient, Final-Recipient, Action relayed, Status 2.0.0, the next
    hop as Remote-MTA and its reply as Diagnostic-Code."""
    _, blocks = report(relayed_report(envid="QQ314159"))

    assert [list(block.items()) for block in blocks] == [
        [
            ("Original-Envelope-Id", "QQ314159"),
            ("Reporting-MTA", "dns; guard.example.com"),
            ("Arrival-Date", "Tue, 14 Nov 2023 22:13:20 +0000"),
        ],
        [
            ("Original-Recipient", "rfc822;bob+sales@example.net"),
            ("Final-Recipient", "rfc822; bob@example.net"),
            ("Action", "relayed"),
            ("Status", "2.0.0"),
            ("Remote-MTA", "dns; 192.0.2.25"),
            ("Diagnostic-Code", "smtp; 250 2.0.0 Ok: queued as 4F2A"),
        ],
        [
            ("Original-Recipient", "utf-8;j\\x{F6}rg@example.net"),
            ("Final-Recipient", "utf-8; j\\x{F6}rg@example.net"),
            ("Action", "relayed"),
            ("Status", "2.0.0"),
            ("Remote-MTA", "dns; 192.0.2.25"),
            ("Diagnostic-Code", "smtp; 250 2.0.0 Ok: queued as 4F2A"),
        ],
    ]


def test_relayed_dsn_returns_the_headers_only() -> None:
    """The third part is the original header section, byte for byte."""
    message = parse(relayed_report())

    assert message.get_payload()[2].get_payload(decode=True) == HEADERS


def test_relayed_dsn_text_names_the_recipients() -> None:
    """The human-readable part says the message was relayed, for whom."""
    text = parse(relayed_report()).get_payload()[0].get_content()

    assert "Your message to bob@example.net, jörg@example.net" in text
    assert "relayed, not that it reached its recipients" in text


def test_relayed_dsn_without_remote_mta_has_no_remote_mta_field() -> None:
    """A next hop without a name (a UNIX socket) gives no Remote-MTA field."""
    relayed = Relayed((recipient("bob@example.net", SUCCESS),), QUEUED, None)
    _, blocks = report(relayed_notice(incident(relayed.recipients), relayed, SETTINGS, NOW, "t0ken"))

    assert "Remote-MTA" not in blocks[1]
    assert blocks[1]["Diagnostic-Code"] == "smtp; 250 2.0.0 Ok: queued as 4F2A"


def test_relayed_dsn_multi_line_reply_on_one_line() -> None:
    """A multi-line reply of the next hop is one printable line in Diagnostic-Code."""
    relayed = Relayed((recipient("bob@example.net", SUCCESS),), Reply(250, "", "Ok\nqueued\x07 as 1"), "mx")
    _, blocks = report(relayed_notice(incident(relayed.recipients), relayed, SETTINGS, NOW, "t0ken"))

    assert blocks[1]["Diagnostic-Code"] == "smtp; 250 Ok queued? as 1"


def test_no_relayed_dsn_to_the_null_sender_or_for_no_one() -> None:
    """No relayed DSN for the null sender, nor without recipients owed one."""
    relayed = Relayed((recipient("bob@example.net", SUCCESS),), QUEUED, "mx")
    assert relayed_notice(incident(relayed.recipients, sender=""), relayed, SETTINGS, NOW, "t0ken") is None
    nobody = Relayed((), QUEUED, "mx")
    assert relayed_notice(incident(), nobody, SETTINGS, NOW, "t0ken") is None
