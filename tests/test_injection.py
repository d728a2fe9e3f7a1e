"""Nothing smtpguard writes carries a control character it did not put there:
envelope addresses (address literals included) refuse control characters, every
header field smtpguard composes goes through smtpguard.headers, notice texts get
printable values, and ``smtpguard quarantine`` escapes what it prints.

The hostile inputs are those an attack on smtpguard used: a recipient address
literal with bare CRs that forged header fields inside smtpguard's own
Received:, a sender with a NUL relayed as it was, an RFC 2047 subject decoding to
CRLF that drew fake lines into the admin notice, and ESC sequences from envelope
addresses reaching the operator's terminal.
"""

from __future__ import annotations

import email
import email.policy
import os
import pty
import re
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, threads
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from smtpguard import config as configuration
from smtpguard import replies, rewrite, templates
from smtpguard.config import ConfigError
from smtpguard.envelope import Client, Envelope, EnvelopeError, Recipient, parse_mail, parse_rcpt
from smtpguard.headers import UnsafeHeader
from smtpguard.incident import Incident
from smtpguard.notifiers import Outcome, build_notifier
from smtpguard.notifiers.dsn import NoticeSettings, admin_notice, sender_notice
from smtpguard.notifiers.notifier import Notifier
from smtpguard.pipeline import received_header, status_headers
from smtpguard.quarantine import Quarantine
from smtpguard.results import Action, Decision, Notice, ScanResult, Threat
from smtpguard.spool import Message
from smtpguard.testing import MemoryNextHop
from tests.conftest import SinkStarter, SmtpSink
from tests.test_integration import CLIENT_HELO, RECIPIENT, SENDER, assert_dump, dumps, in_thread, start_guard, wire
from tests.test_notifier import real_notifier, settle
from tests.test_quarantine import WHEN, fired, smtpguard, synchronous
from tests.test_server import MESSAGE, QUEUED, ready, trace_headers, transaction, transaction_id, transaction_replies

# The attack's inputs, as the client sent them.
FORGING_RECIPIENT = b"victim@[192.0.2.1\rX-Virus-Status: clean\rX-Injected: yes]"
NUL_SENDER = b"a@[127.0.0.1\x00]"
FORGING_SUBJECT = b"Subject: =?utf-8?q?Invoice=0D=0AThreats:_none=0D=0AAction:_delivered=0D=0ABcc:_boss@example.com?="
C0_AND_DEL = [chr(code) for code in (*range(0x20), 0x7F)]


def control_id(character: str) -> str:
    return f"U+{ord(character):04X}"


# -- envelope addresses -------------------------------------------------------------------


def test_recipient_literal_with_bare_crs_gets_501_513_and_never_reaches_received() -> None:
    """The attack's RCPT (an address literal holding bare CRs and forged header
    fields) gets 501 5.1.3; the session goes on in sync, the next hop never hears
    of it, and the Received: of the message names the valid recipient only."""
    s = ready()
    s.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<" + FORGING_RECIPIENT + b">\r\n")
    s.send(b"RCPT TO:<bob@example.com>\r\nDATA\r\n" + MESSAGE + b".\r\n")

    assert s.replies() == [
        replies.SENDER_OK.to_bytes(),
        replies.BAD_RECIPIENT_SYNTAX.to_bytes(),
        replies.RECIPIENT_OK.to_bytes(),
        replies.START_DATA.to_bytes(),
        QUEUED.to_bytes(),
    ]
    assert s.hop.commands == ["MAIL alice@example.org", "RCPT bob@example.com", "DATA"]
    [delivery] = s.hop.delivered
    assert delivery.data == trace_headers(transaction_id(delivery.data)) + MESSAGE


def test_sender_literal_with_a_nul_gets_501_517_and_is_never_relayed() -> None:
    """MAIL FROM:<a@[127.0.0.1\\0]> gets 501 5.1.7 and goes nowhere; a proper
    transaction follows in the same session."""
    s = ready()
    s.send(b"MAIL FROM:<" + NUL_SENDER + b">\r\n" + transaction())

    assert s.replies() == [replies.BAD_SENDER_SYNTAX.to_bytes(), *transaction_replies()]
    assert s.hop.commands == ["MAIL alice@example.org", "RCPT bob@example.com", "DATA"]


@pytest.mark.parametrize("control", C0_AND_DEL, ids=control_id)
@pytest.mark.parametrize(
    "shape",
    ["a{}b@example.org", '"a{}b"@example.org', "ab@exa{}mple.org", "ab@[192.0.2.1{}]", "ab@[x-tag:a{}b]"],
    ids=["local-part", "quoted-local-part", "domain", "ipv4-literal", "general-literal"],
)
def test_every_c0_control_and_del_in_an_address_is_refused(shape: str, control: str) -> None:
    """A C0 control or DEL anywhere in an address: 501 5.1.7 as sender, 501 5.1.3 as recipient."""
    address = shape.format(control)
    with pytest.raises(EnvelopeError) as sender:
        parse_mail(f"FROM:<{address}>", 0)
    with pytest.raises(EnvelopeError) as recipient:
        parse_rcpt(f"TO:<{address}>", smtputf8=True)
    assert (sender.value.reply, recipient.value.reply) == (replies.BAD_SENDER_SYNTAX, replies.BAD_RECIPIENT_SYNTAX)


@pytest.mark.parametrize("control", ["\x80", "\x85", "\x9b", "\u2028", "\u2029"], ids=control_id)
def test_c1_controls_and_line_separators_in_a_utf8_address_are_refused(control: str) -> None:
    """With SMTPUTF8, a C1 control (NEL, CSI) or U+2028/2029 is no letter: 501 5.1.3."""
    with pytest.raises(EnvelopeError) as refused:
        parse_rcpt(f"TO:<j{control}rg@example.net>", smtputf8=True)
    assert refused.value.reply == replies.BAD_RECIPIENT_SYNTAX


@pytest.mark.parametrize(
    "literal",
    [
        "192.0.2.1",
        "0.0.0.0",
        "255.255.255.255",
        "001.002.003.004",
        "IPv6:2001:db8::1",
        "ipv6:2001:DB8:0:0:0:0:0:1",
        "IPv6:::1",
        "IPv6:1:2:3:4:5:6::",
        "IPv6:::ffff:192.0.2.1",
        "IPv6:1:2:3:4::192.0.2.1",
        "IPv6:1:2:3:4:5:6:192.0.2.1",
        "x-tag:anything@here",
        "-tag:!Z^~",
    ],
)
def test_address_literals_of_rfc_5321_are_accepted(literal: str) -> None:
    """IPv4, IPv6 (full, compressed, with an IPv4 tail) and General-address-literals
    as RFC 5321 section 4.1.3 writes them are accepted as they are."""
    assert parse_rcpt(f"TO:<bob@[{literal}]>", smtputf8=False).address == f"bob@[{literal}]"


@pytest.mark.parametrize(
    "literal",
    [
        "",
        "192.0.2",
        "192.0.2.1.5",
        "192.0.2.256",
        "192.0.2.1000",
        "192.0.2.x",
        "192.0.2.1 ",
        "IPv6:",
        "IPv6:2001:db8::1::2",
        "IPv6:2001:db8:::1",
        "IPv6:1:2:3:4:5:6:7::",
        "IPv6:1:2:3:4:5::192.0.2.1",
        "IPv6:fe80::1%eth0",
        "IPv6:192.0.2.1",
        "IPv6:12345::1",
        "tag-:x",
        "tag:",
        ":x",
        "t\u00e4g:x",
        "x-tag:a b",
        "x-tag:a\\b",
        "x-tag:a[b",
        "x-tag:a]b",
        "x-tag:\u00e4",
    ],
)
def test_malformed_address_literals_are_refused(literal: str) -> None:
    """A literal that is no IPv4 address, no valid IPv6 address (RFC 5321's group
    counts, no zone index) and no tag:dcontent pair gets 501 5.1.3."""
    with pytest.raises(EnvelopeError) as refused:
        parse_rcpt(f"TO:<bob@[{literal}]>", smtputf8=True)
    assert refused.value.reply == replies.BAD_RECIPIENT_SYNTAX


@pytest.mark.parametrize("parameter", ["BODY=8BITMIME\x1cSMTPUTF8", "SIZE=10\x1b", "BODY=8BITMIME\x00"])
def test_control_characters_in_mail_parameters_are_refused(parameter: str) -> None:
    """A control character among the MAIL parameters (RFC 5321's esmtp-value has
    none) gets 501 5.5.4, also where Python's str.split() took it for a space."""
    with pytest.raises(EnvelopeError) as refused:
        parse_mail(f"FROM:<a@example.org> {parameter}", 0)
    assert refused.value.reply == replies.SYNTAX_ERROR


# -- header fields smtpguard composes ---------------------------------------------------------


def envelope(sender: str = SENDER, recipient: str = RECIPIENT) -> Envelope:
    client = Client("192.0.2.7", 40001, "192.0.2.1", 25, helo="client.example", hostname="guard.example.com")
    return Envelope(client, sender, recipients=(Recipient(recipient),))


def test_received_refuses_a_recipient_with_a_cr() -> None:
    """Should an envelope with a CR in an address reach received_header (built by
    hand, say), the header is refused rather than written with forged fields."""
    with pytest.raises(UnsafeHeader):
        received_header(envelope(recipient=FORGING_RECIPIENT.decode()), "0A1B2C3D4E5F", 1_700_000_000.0)


def test_threat_name_with_crlf_stays_inside_x_virus_status() -> None:
    """A scanner's threat name holding CRLF and a forged status field ends up on
    the one X-Virus-Status line smtpguard writes."""
    result = ScanResult.infected((Threat("Evil\r\nX-Virus-Status: clean\x1b"),), "command")
    assert status_headers(result, "guard.example.com") == (
        b"X-Virus-Scanned: smtpguard (command) on guard.example.com\r\n"
        b"X-Virus-Status: infected (Evil X-Virus-Status: clean\\x1b)\r\n"
    )


def test_status_headers_without_a_hostname_say_localhost() -> None:
    """Without a server hostname X-Virus-Scanned names localhost, as Received: does,
    instead of ending in white space."""
    assert status_headers(ScanResult.clean("builtin"), "") == (
        b"X-Virus-Scanned: smtpguard (builtin) on localhost\r\nX-Virus-Status: clean\r\n"
    )


def test_subject_tag_with_crlf_adds_no_field() -> None:
    """A subject tag holding CRLF and a field of its own stays in the Subject."""
    assert rewrite.tag_subject(b"Subject: hi\r\n", "[x]\r\nBcc: victim@example.com") == (
        b"Subject: hi\r\n [x] Bcc: victim@example.com\r\n"
    )


def test_template_values_are_made_printable() -> None:
    """Placeholder values go in on one line: a tab as a space, CR, LF, ESC and the
    other control characters as visible escapes; the template's own lines stay."""
    values = {"subject": "a\r\nThreats: none\tb\x1b[2J", "sender": "x@example.org"}
    assert templates.render("Subject: {subject}\nFrom: {sender}\n", values) == (
        "Subject: a\\x0d\\x0aThreats: none b\\x1b[2J\nFrom: x@example.org\n"
    )


SETTINGS = NoticeSettings("postmaster@example.com", hostname="guard.example.com", admin="security@example.com")
VIRUS = ScanResult.infected((Threat("Eicar-Test-Signature", "eicar.com"),), "builtin")


def incident(sender: str = SENDER, headers: bytes = b"Subject: invoice\r\n") -> Incident:
    decision = Decision(Action.REJECT, reason="virus Eicar-Test-Signature", notices=frozenset(Notice))
    return Incident(
        "0A1B2C3D4E5F", envelope(sender), VIRUS, decision, headers, 1_700_000_000.0, rewrite.subject(headers)
    )


def test_dsn_to_a_sender_with_a_cr_is_not_built() -> None:
    """A sender whose address literal holds a CR and a Subject: field (as MAIL
    accepted before) gets no DSN: its To: field would carry a forged Subject."""
    with pytest.raises(UnsafeHeader):
        sender_notice(incident(sender="a@[127.0.0.1\rSubject: You won]"), SETTINGS, 1_700_000_005.0, "t0ken")


def test_notifier_logs_the_refused_dsn_as_lost_and_queues_nothing(tmp_path: Path) -> None:
    """The notifier refuses that DSN, logs it as lost, and still queues the admin notice."""
    notifier = build_notifier(
        {"from": "postmaster@example.com", "admin": "security@example.com", "outbox": str(tmp_path)},
        MemoryNextHop(),
        "guard.example.com",
        Clock(),
    )
    notifier.start()
    with capturedLogs() as events:
        fired(notifier.notify(incident(sender="a@[127.0.0.1\rSubject: You won]")))
    assert [event["log_format"] for event in events if event["log_level"] >= LogLevel.error] == [
        "{tid}: {kind} notice LOST: cannot build it"
    ]
    assert [notice.recipient for notice in notifier.outbox.pending()] == ["security@example.com"]


def details(notice: bytes | None) -> list[str]:
    """The lines of an admin notice's text before the original headers."""
    assert notice is not None
    message = email.message_from_bytes(notice, policy=email.policy.default)
    text = message.get_content()  # type: ignore[attr-defined]
    return str(text).split("\r\nThe original headers:")[0].split("\r\n")


def assert_subject_on_its_own_line(lines: list[str]) -> None:
    """The forged subject is one escaped line; Threats: and Action: are smtpguard's only."""
    escaped = "Invoice\\x0d\\x0aThreats: none\\x0d\\x0aAction: delivered\\x0d\\x0aBcc: boss@example.com"
    assert f"Subject:     {escaped}" in lines
    assert [line for line in lines if line.startswith(("Threats:", "Action:", "Bcc:"))] == [
        "Threats:     Eicar-Test-Signature",
        "Action:      rejected",
    ]


def test_admin_notice_shows_a_subject_decoding_to_crlf_on_its_line() -> None:
    """An RFC 2047 subject that decodes to CRLF and "Threats: none", "Action:
    delivered", "Bcc:" lines stays on the Subject line, its line breaks escaped:
    the notice has one Threats: and one Action: line, both smtpguard's, and no Bcc:."""
    lines = details(admin_notice(incident(headers=FORGING_SUBJECT + b"\r\n"), SETTINGS, 1_700_000_005.0, "t1"))

    assert_subject_on_its_own_line(lines)


@pytest.mark.parametrize("hostname", ["", "mx.example\rX-Injected: yes", "mx.example\x1b", "mx example"])
def test_server_hostname_that_is_no_host_name_stops_the_start(hostname: str) -> None:
    """[server] hostname goes into every greeting and Received: field: empty, or
    with white space or a control character, it is a start error naming the key."""
    data = {
        "server": {"hostname": hostname},
        "upstream": {"endpoint": "tcp:127.0.0.1:1"},
        "scanners": [{"type": "builtin"}],
    }
    with pytest.raises(ConfigError) as refused:
        configuration.parse(data, "f.toml")
    assert str(refused.value) == f"f.toml: server.hostname: must be a host name, got {hostname!r}"


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("from", "Postmaster\x1b[2J <postmaster@example.com>", "must be an address"),
        ("admin", "security@example.com\x00", "must be an address"),
        ("hostname", "guard\x1b.example", "must be a host name"),
    ],
)
def test_notification_settings_with_control_characters_stop_the_start(key: str, value: str, problem: str) -> None:
    """Notice addresses and the reporting host name go into header fields: a
    control character in them is a start error, not a notice lost later."""
    table = {"outbox": "/nonexistent", key: value}
    with pytest.raises(ConfigError) as refused:
        build_notifier(table, MemoryNextHop(), "guard.example.com", Clock())
    assert str(refused.value).startswith(f"{key}: {problem}")


# -- against the real thing: smtplib -> smtpguard -> smtp-sink ---------------------------------


def hostile_session(port: int, message: bytes) -> list[tuple[int, bytes]]:
    """The attack's commands among a proper transaction, sent with smtplib (raw
    where smtplib itself would refuse the bytes); every reply in order."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname=CLIENT_HELO, timeout=20) as client:
        client.ehlo()
        client.send(b"MAIL FROM:<" + NUL_SENDER + b">\r\n")
        answers = [client.getreply()]
        answers.append(client.mail(SENDER))
        client.send(b"RCPT TO:<" + FORGING_RECIPIENT + b">\r\n")
        answers.append(client.getreply())
        answers.append(client.rcpt(RECIPIENT))
        answers.append(client.data(message))
        return answers


@pytest_twisted.ensureDeferred
async def test_smtp_sink_receives_neither_the_nul_sender_nor_the_forged_recipient(
    listening: list[IListeningPort], smtp_sinks: SinkStarter
) -> None:
    """Over real sockets: the NUL sender gets 501 5.1.7, the CR recipient 501 5.1.3;
    smtp-sink sees only the proper MAIL and RCPT, and the message it stores
    carries exactly smtpguard's own headers (Received: for the one valid recipient)."""
    sink = smtp_sinks("sink")
    port = await start_guard(listening, sink.endpoint)
    message = b"From: Alice <alice@example.org>\r\nSubject: hello\r\n\r\nHello Bob.\r\n"

    answers = await in_thread(hostile_session, port, message)

    assert answers == [
        wire(replies.BAD_SENDER_SYNTAX),
        (250, b"2.1.0 Ok"),
        wire(replies.BAD_RECIPIENT_SYNTAX),
        (250, b"2.1.5 Ok"),
        (250, b"2.0.0 Ok"),
    ]
    [dump] = await dumps(sink)
    assert_dump(dump, message)
    commands = [line for line in sink.commands() if line.startswith(("MAIL", "RCPT"))]
    assert commands == [f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RECIPIENT}>"]


@pytest.fixture
def notifiers() -> Iterator[list[Notifier]]:
    """Notifiers a test started; stopped at teardown."""
    started: list[Notifier] = []
    yield started
    for notifier in started:
        pytest_twisted.blockon(defer.maybeDeferred(notifier.stop))


@pytest_twisted.ensureDeferred
async def test_admin_notice_reaches_smtp_sink_without_forged_lines(
    smtp_sink: SmtpSink, notifiers: list[Notifier], tmp_path: Path
) -> None:
    """The admin notice for a message whose subject decodes to CRLF and fake
    lines, delivered through the upstream client to smtp-sink, has the subject on
    one escaped line and only smtpguard's own Threats: and Action: lines."""
    notifier = real_notifier(notifiers, tmp_path / "outbox", smtp_sink.endpoint)
    forged = attrs.evolve(
        incident(headers=FORGING_SUBJECT + b"\r\n"),
        decision=Decision(Action.REJECT, reason="virus Eicar-Test-Signature", notices=frozenset({Notice.ADMIN})),
    )

    await notifier.notify(forged)
    outcomes = await settle(notifier)
    [dump] = await threads.deferToThread(smtp_sink.messages, 1)

    assert outcomes == [Outcome.DELIVERED]
    lines = details(dump.replace(b"\n", b"\r\n"))
    assert_subject_on_its_own_line(lines)


# -- the quarantine command line ------------------------------------------------------------------

ESC_SENDER = "\x1b[2J\x1b[Hroot@example.org"
FAKE_ROW_RECIPIENT = "bob@example.net\r20991231T000000Z-00000000  2099-12-31T00:00:00Z  <ceo@example.org>"
HOSTILE_HEADERS = b"Subject: =?utf-8?q?=1B[31mURGENT?=\r\nX-Note: \x1b]0;pwned\x07\r\n"


@pytest.fixture
def hostile_entry(tmp_path: Path) -> tuple[Path, str]:
    """A quarantine directory holding one entry whose envelope, HELO, subject and
    headers carry ESC, BEL and CR (as entries stored before addresses were checked)."""
    directory = tmp_path / "quarantine"
    store = Quarantine(str(directory), Clock(), synchronous)
    client = Client("203.0.113.7", 41000, "192.0.2.1", 25, "evil\x1b[1A", hostname="guard.test")
    hostile = Envelope(client, ESC_SENDER, recipients=(Recipient(FAKE_ROW_RECIPIENT),))
    decision = Decision(Action.REPLACE, reason="virus found", quarantine=True)
    kept = Incident(
        "0123456789AB", hostile, VIRUS, decision, HOSTILE_HEADERS, WHEN, rewrite.subject(HOSTILE_HEADERS)
    )
    message = Message.from_bytes(HOSTILE_HEADERS + b"\r\nbody\r\n")
    try:
        entry_id = str(fired(store.store(kept, message)))
    finally:
        message.close()
    return directory, entry_id


def assert_no_control_characters(output: bytes) -> None:
    """Nothing but printable characters and the line breaks the command writes."""
    assert re.search(rb"[\x00-\x09\x0b-\x1f\x7f]", output) is None, output
    assert re.search("[\x80-\x9f]", output.decode("utf-8")) is None, output


def test_quarantine_list_escapes_control_characters(hostile_entry: tuple[Path, str], tmp_path: Path) -> None:
    """`smtpguard quarantine list` writes ESC and CR from the envelope as visible
    escapes: the sender cannot clear the screen, the recipient cannot draw a row."""
    directory, entry_id = hostile_entry
    done = smtpguard("quarantine", "--directory", str(directory), "list", cwd=tmp_path)

    assert (done.returncode, done.stderr) == (0, b"")
    assert_no_control_characters(done.stdout)
    header, row = done.stdout.decode().splitlines()
    assert header.startswith("ID  ")
    assert row == (
        f"{entry_id}  2026-11-29T22:45:01Z  <\\x1b[2J\\x1b[Hroot@example.org>  "
        "bob@example.net\\x0d20991231T000000Z-00000000  2099-12-31T00:00:00Z  <ceo@example.org>  "
        "infected (Eicar-Test-Signature)"
    )


def test_quarantine_show_escapes_control_characters(hostile_entry: tuple[Path, str], tmp_path: Path) -> None:
    """`smtpguard quarantine show ID` escapes control characters in the envelope,
    the HELO name, the decoded subject and the header section."""
    directory, entry_id = hostile_entry
    done = smtpguard("quarantine", "--directory", str(directory), "show", entry_id, cwd=tmp_path)

    assert (done.returncode, done.stderr) == (0, b"")
    assert_no_control_characters(done.stdout)
    lines = done.stdout.decode().splitlines()
    assert lines[3] == "client:      [203.0.113.7]:41000 helo=evil\\x1b[1A ESMTP"
    assert lines[4] == "mail:        FROM:<\\x1b[2J\\x1b[Hroot@example.org>"
    assert lines[5] == (
        "rcpt:        TO:<bob@example.net\\x0d20991231T000000Z-00000000  2099-12-31T00:00:00Z  <ceo@example.org>>"
    )
    assert "subject:     \\x1b[31mURGENT" in lines
    assert lines[-3:] == ["Subject: =?utf-8?q?=1B[31mURGENT?=", "X-Note: \\x1b]0;pwned\\x07", ""]


def test_quarantine_errors_escape_control_characters(tmp_path: Path) -> None:
    """An error message naming something the operator typed escapes its control characters too."""
    done = smtpguard("quarantine", "--directory", "\x1b[2Jnowhere", "list", cwd=tmp_path)
    assert (done.returncode, done.stdout) == (1, b"")
    assert done.stderr == b"smtpguard quarantine: \\x1b[2Jnowhere: no such directory\n"


def run_on_a_terminal(*arguments: str, cwd: Path) -> tuple[int, bytes, bytes]:
    """The command with its standard output on a pseudo-terminal: (status, what
    reached the terminal, standard error)."""
    controller, terminal = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "smtpguard.cli", *arguments],
            cwd=cwd,
            env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PATH": "/usr/bin:/bin"},
            stdout=terminal,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        os.set_blocking(controller, False)
        try:
            shown = os.read(controller, 65536)
        except BlockingIOError:
            shown = b""
        return done.returncode, shown, done.stderr
    finally:
        os.close(controller)
        os.close(terminal)


def test_show_raw_refuses_to_write_to_a_terminal(hostile_entry: tuple[Path, str], tmp_path: Path) -> None:
    """`show --raw` writes bytes as received, so it refuses a terminal (exit 2) and
    says to redirect it; nothing reaches the terminal."""
    directory, entry_id = hostile_entry
    arguments = ("quarantine", "--directory", str(directory), "show", "--raw", entry_id)
    status, shown, error = run_on_a_terminal(*arguments, cwd=tmp_path)
    assert (status, shown) == (2, b"")
    assert error == (
        b"smtpguard quarantine: show --raw writes the message as received, control characters included: "
        b"redirect it to a file or pipe it into a program, not to a terminal\n"
    )


def test_show_raw_to_a_pipe_is_byte_for_byte(hostile_entry: tuple[Path, str], tmp_path: Path) -> None:
    """Into a pipe `show --raw` still writes the message exactly as received."""
    directory, entry_id = hostile_entry
    done = smtpguard("quarantine", "--directory", str(directory), "show", "--raw", entry_id, cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, HOSTILE_HEADERS + b"\r\nbody\r\n", b"")
