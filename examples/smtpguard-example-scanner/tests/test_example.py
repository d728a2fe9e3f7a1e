"""Tests of the example-subject scanner: its verdicts, its configuration, its
discovery as a plugin, and its effect on mail through smtpguard's pipeline with
the test doubles of smtpguard.testing."""

from __future__ import annotations

from typing import Any

import pytest
from smtpguard import replies
from smtpguard.config import ConfigError
from smtpguard.envelope import Client, Envelope, Recipient
from smtpguard.interfaces import IScanner, IScannerFactory
from smtpguard.pipeline import Pipeline
from smtpguard.policies.default import DefaultPolicy
from smtpguard.registry import factories
from smtpguard.results import ErrorKind, ScanResult, Threat
from smtpguard.spool import Message, Spool
from smtpguard.testing import MemoryNextHop
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from smtpguard_example.scanner import HEADER_LIMIT, SubjectScanner, build

ENVELOPE = Envelope(Client("192.0.2.7", 50000, helo="client.example"), "alice@example.org")
RECIPIENT = Recipient("bob@example.net")


def message(data: bytes) -> Message:
    spool = Spool(0)
    spool.write(data)
    return spool.finish()


def result_of(deferred: Deferred[Any]) -> Any:
    """The result of a Deferred that has already fired."""
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def scan(scanner: SubjectScanner, data: bytes) -> ScanResult:
    result: ScanResult = result_of(scanner.scan(message(data), ENVELOPE))
    return result


def invoice_scanner(**keys: Any) -> SubjectScanner:
    return build({"pattern": "invoice.*overdue", **keys}, Clock())


def test_matching_subject_is_flagged() -> None:
    """A Subject matching the pattern (any case by default) is infected, named by
    ``threat``."""
    result = scan(invoice_scanner(threat="Example.Invoice"), b"Subject: Your INVOICE is overdue\r\n\r\nPay.\r\n")
    assert result == ScanResult.infected((Threat("Example.Invoice"),), "example-subject")


def test_other_subject_is_clean() -> None:
    """A Subject that does not match is clean; so is the body, which is not read."""
    result = scan(invoice_scanner(), b"Subject: Lunch?\r\n\r\ninvoice overdue\r\n")
    assert result == ScanResult.clean("example-subject")


def test_encoded_subject_is_decoded_before_matching() -> None:
    """An RFC 2047 encoded Subject is matched in its decoded form."""
    encoded = b"Subject: =?utf-8?b?SW52b2ljZSDDvGJlcmbDpGxsaWcgKG92ZXJkdWUp?=\r\n\r\nx\r\n"
    assert scan(invoice_scanner(), encoded).threats == (Threat("Example.Subject"),)


def test_case_is_respected_when_asked() -> None:
    """With ``ignore_case = false`` the case must match."""
    assert scan(invoice_scanner(ignore_case=False), b"Subject: INVOICE OVERDUE\r\n\r\n") == ScanResult.clean(
        "example-subject"
    )


def test_any_of_several_subjects_counts() -> None:
    """A second Subject header is looked at too."""
    data = b"Subject: hello\r\nSubject: invoice overdue\r\n\r\nx\r\n"
    assert scan(invoice_scanner(), data).threats == (Threat("Example.Subject"),)


def test_header_block_too_long_to_read_is_an_error_not_clean() -> None:
    """When the header block goes on past what the scanner reads, it answers
    with a content-size error: it cannot call clean what it has not seen."""
    data = b"X-Filler: " + b"a" * HEADER_LIMIT + b"\r\nSubject: invoice overdue\r\n\r\nx\r\n"
    assert scan(invoice_scanner(), data) == ScanResult.failed(
        ErrorKind.CONTENT_SIZE, f"header block over {HEADER_LIMIT} bytes", "example-subject"
    )


def test_pattern_is_required() -> None:
    """A table without ``pattern`` is refused, naming the key."""
    with pytest.raises(ConfigError) as raised:
        build({}, Clock())
    assert str(raised.value) == 'pattern: is required, e.g. "invoice.*overdue"'


def test_invalid_pattern_is_refused() -> None:
    """A pattern that does not compile is refused with the reason."""
    with pytest.raises(ConfigError) as raised:
        build({"pattern": "(unclosed"}, Clock())
    assert str(raised.value) == (
        "pattern: not a valid regular expression: missing ), unterminated subpattern at position 0"
    )


def test_unknown_key_is_refused() -> None:
    """A misspelt key stops the start instead of being ignored."""
    with pytest.raises(ConfigError) as raised:
        build({"pattern": "x", "ignorecase": True}, Clock())
    assert str(raised.value) == "ignorecase: unknown key"


def test_plugin_is_found_by_smtpguard() -> None:
    """smtpguard's registry lists ``example-subject``, and what it builds from a
    table provides IScanner under the table's name."""
    factory = factories(IScannerFactory)["example-subject"]
    scanner = factory.build({"pattern": "x", "name": "subjects"}, Clock())
    assert verifyObject(IScanner, scanner)
    assert scanner.name == "subjects"


def relay_through_pipeline(data: bytes) -> tuple[Any, MemoryNextHop]:
    """``data`` through smtpguard's pipeline with this scanner, the default
    policy and an in-memory next hop: the client's reply and the next hop."""
    hop = MemoryNextHop()
    session = hop.session()
    session.mail(ENVELOPE)
    session.rcpt(RECIPIENT)
    envelope = ENVELOPE.with_recipient(RECIPIENT)
    pipeline = Pipeline(Clock(), invoice_scanner(), DefaultPolicy(), scan_timeout=10)
    reply = result_of(pipeline.process(envelope, message(data), session, "T1"))
    return reply, hop


def test_flagged_message_is_rejected_by_the_default_policy() -> None:
    """Through the pipeline a flagged message gets 554 5.7.1 naming the threat
    and never reaches the next hop."""
    reply, hop = relay_through_pipeline(b"Subject: invoice overdue\r\n\r\nx\r\n")
    assert reply == replies.VIRUS_REJECTED.with_text("Message rejected: virus found (Example.Subject)")
    assert hop.delivered == []


def test_clean_message_is_delivered_with_status_headers() -> None:
    """Through the pipeline a clean message is delivered, marked as scanned by
    this scanner."""
    reply, hop = relay_through_pipeline(b"Subject: lunch\r\n\r\nx\r\n")
    assert reply.code == 250
    [delivery] = hop.delivered
    assert b"X-Virus-Scanned: smtpguard (example-subject) on " in delivery.data
    assert delivery.data.endswith(b"X-Virus-Status: clean\r\nSubject: lunch\r\n\r\nx\r\n")
