"""Opportunistic TLS toward a real next hop (the strict hop on loopback), as
Postfix's "may" level: a refused STARTTLS goes on in plain text on the same
connection, a failed handshake on a new one; tls = required does neither."""

from __future__ import annotations

import smtplib
from typing import Any

import pytest_twisted
from twisted.internet import reactor, ssl, threads

from smtpguard import replies
from smtpguard.pipeline import Pipeline
from smtpguard.policies.default import DefaultPolicy
from smtpguard.replies import Reply
from smtpguard.results import ScanResult
from smtpguard.server import GuardFactory
from smtpguard.settings import ServerSettings, UpstreamSettings, UpstreamTLS
from smtpguard.testing import FixedScanner
from smtpguard.upstream import Upstream
from tests.conftest import listen
from tests.strict_hop import HopSettings, StrictHop, StrictHopProtocol

MESSAGE = b"Subject: tls\r\n\r\nHello Bob.\r\n"


class RefusingProtocol(StrictHopProtocol):
    def smtp_STARTTLS(self, argument: str) -> Reply | None:
        return Reply(454, "4.7.0", "TLS not available due to local problem")  # Postfix's text


class RefusingHop(StrictHop):
    protocol = RefusingProtocol  # type: ignore[assignment]


class OldTLSHop(StrictHop):
    """Offers STARTTLS but speaks only TLS 1.0 and 1.1, which no client of ours accepts:
    every handshake fails."""

    def tls_options(self) -> Any:
        options = super().tls_options()
        return ssl.CertificateOptions(
            privateKey=options.privateKey,
            certificate=options.certificate,
            insecurelyLowerMinimumTo=ssl.TLSVersion.TLSv1_0,
            lowerMaximumSecurityTo=ssl.TLSVersion.TLSv1_1,
        )


def hop_of(kind: type[StrictHop]) -> tuple[StrictHop, Any]:
    hop = kind(reactor, HopSettings(starttls=True))
    port = reactor.listenTCP(0, hop, interface="127.0.0.1")  # type: ignore[attr-defined]
    hop.port = port.getHost().port
    return hop, port


async def guard(listening: list[Any], hop: StrictHop, tls: UpstreamTLS) -> int:
    upstream = Upstream(reactor, UpstreamSettings(hop.endpoint, hostname="guard.test", tls=tls, timeout=20.0))
    pipeline = Pipeline(reactor, FixedScanner(ScanResult.clean()), DefaultPolicy())
    return await listen(listening, GuardFactory(reactor, upstream, pipeline.process, ServerSettings()))


def send(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=20) as client:
        client.ehlo()
        code, text = client.mail("alice@example.org")
        if code != 250:
            return code, text
        client.rcpt("bob@example.net")
        return client.data(MESSAGE)


@pytest_twisted.ensureDeferred
async def test_refused_starttls_goes_on_in_plain_text(listening: list[Any]) -> None:
    """tls = opportunistic, and the next hop answers STARTTLS with 454: the
    message is delivered in plain text over that same connection."""
    hop, port = hop_of(RefusingHop)
    listening.append(port)
    guard_port = await guard(listening, hop, UpstreamTLS.OPPORTUNISTIC)
    code, _ = await threads.deferToThread(send, guard_port)
    assert code == 250
    [connection] = hop.connections
    assert connection.commands[:3] == ["EHLO guard.test", "STARTTLS", "MAIL FROM:<alice@example.org>"]
    assert (connection.tls, len(hop.queued)) == (False, 1)


@pytest_twisted.ensureDeferred
async def test_failed_handshake_reconnects_in_plain_text(listening: list[Any]) -> None:
    """tls = opportunistic, and every TLS handshake with the next hop fails: a
    second connection, without STARTTLS, delivers the message."""
    hop, port = hop_of(OldTLSHop)
    listening.append(port)
    guard_port = await guard(listening, hop, UpstreamTLS.OPPORTUNISTIC)
    code, _ = await threads.deferToThread(send, guard_port)
    assert code == 250
    first, second = hop.connections
    assert (first.commands, first.tls) == (["EHLO guard.test", "STARTTLS"], True)
    assert second.commands[:2] == ["EHLO guard.test", "MAIL FROM:<alice@example.org>"]
    assert (second.tls, [queued.connection for queued in hop.queued]) == (False, [second.number])


@pytest_twisted.ensureDeferred
async def test_required_tls_never_falls_back(listening: list[Any]) -> None:
    """tls = required: a refused STARTTLS makes 451 4.4.1 for the client, and
    nothing goes to the next hop in plain text."""
    hop, port = hop_of(RefusingHop)
    listening.append(port)
    guard_port = await guard(listening, hop, UpstreamTLS.REQUIRED)
    assert await threads.deferToThread(send, guard_port) == (
        replies.UPSTREAM_UNAVAILABLE.code,
        f"{replies.UPSTREAM_UNAVAILABLE.enhanced} {replies.UPSTREAM_UNAVAILABLE.text}".encode(),
    )
    assert [connection.commands for connection in hop.connections] == [["EHLO guard.test", "STARTTLS"]]
    assert hop.queued == []
