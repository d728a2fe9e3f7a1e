"""smtpguard behind a real Postfix (Debian's), set up exactly as docs/postfix.md
says: after the queue (``content_filter``, re-injection into a second smtpd) and
before it (``smtpd_proxy_filter``).  Postfix delivers into a Maildir and logs to a
file; the tests read both, and its queue (``postqueue``).

smtpguard runs in this process on the global reactor (tap.build_service, as twistd
would build it), so clients (smtplib) run in threads, and waits poll the Maildir,
the log and the queue between turns of the reactor.  The tests that change nothing
share one deployment of each mode.
"""

from __future__ import annotations

import email
import re
import smtplib
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from smtpguard import cli, replies, tap
from smtpguard import config as configuration
from smtpguard.replies import Reply
from tests.certificates import throwaway_certificate
from tests.conftest import PostfixInstances, free_port
from tests.engines import EICAR, EICAR_SIGNATURE, Clamd
from tests.postfix import MAILBOX_MAIN_CF, PrivatePostfix, recipe, recipes
from tests.test_integration import assert_same_bytes, in_thread, lf, sleep, wire

T = TypeVar("T")

WAIT = 30.0  # the longest any one thing may take before a test fails
CLIENT_HELO = "client.example"
SENDER = "alice@example.org"
RECIPIENT = "bob@example.com"
THREAT = f"{EICAR_SIGNATURE}.UNOFFICIAL"
INFECTED = (
    b"From: <alice@example.org>\r\nTo: <bob@example.com>\r\nSubject: invoice\r\n"
    b"Date: Mon, 30 Nov 2026 12:00:00 +0000\r\nMessage-ID: <infected@example.org>\r\n\r\n" + EICAR + b"\r\n"
)


def message(subject: str) -> bytes:
    """A clean message whose body would show any change: 8-bit text, a line that
    starts with a dot, trailing white space, a tab, a 998-character line."""
    head = (
        f"From: Alice <{SENDER}>\r\nTo: Bob <{RECIPIENT}>\r\nSubject: {subject}\r\n"
        f"Date: Mon, 30 Nov 2026 12:00:00 +0000\r\nMessage-ID: <{subject.replace(' ', '-')}@example.org>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    )
    body = "Grüße aus Köln.\r\n.a line that starts with a dot\r\ntrailing  \r\n\tindented\r\n" + "x" * 998
    return f"{head}\r\n{body}\r\n\r\n-- \r\nAlice\r\n".encode()


# -- the deployment --------------------------------------------------------------------


class Deployment:
    """A private Postfix and smtpguard wired as one of the guide's modes: the public
    smtpd on 127.0.0.1:``public``, smtpguard on ``guard``, the re-injecting smtpd
    on ``reinjection``.  What it logs and delivers is read from the last
    :meth:`begin` on, so that tests can share one."""

    def __init__(
        self,
        mode: str,
        scanner: str,
        directory: Path,
        tls: bool = False,
        xforward: bool = False,
        more: str = "",
        main_cf: str = "",
    ) -> None:
        self.public, self.guard, self.reinjection = free_port(), free_port(), free_port()
        reinjection = {"127.0.0.1:10026": f"127.0.0.1:{self.reinjection}"}
        main_cf = MAILBOX_MAIN_CF + main_cf
        if mode == "after-queue":
            transport = "after-queue master.cf transport" + (" with TLS" if tls else "")
            main_cf += recipe("after-queue main.cf", {"[127.0.0.1]:10025": f"[127.0.0.1]:{self.guard}"})
            master_cf = (
                f"127.0.0.1:{self.public} inet n - n - - smtpd\n"
                + recipe(transport)
                + recipe("after-queue master.cf re-injection", reinjection)
            )
        else:
            public = {"smtp      inet": f"127.0.0.1:{self.public} inet", "127.0.0.1:10025": f"127.0.0.1:{self.guard}"}
            master_cf = recipe("before-queue master.cf", {**public, **reinjection})
        settings = guard_settings(mode, self.guard, self.reinjection, scanner, directory, tls, xforward)
        merge(settings, tomllib.loads(more))
        self.config = configuration.parse(settings, "docs/postfix.md")
        self.main_cf, self.master_cf = main_cf, master_cf
        self.postfix: PrivatePostfix
        self.service: MultiService | None = None
        self._log_from = 0
        self._seen: set[Path] = set()

    def start(self, postfix: PostfixInstances) -> None:
        self.postfix = postfix(self.main_cf, self.master_cf, listening=(self.public, self.reinjection))
        self.start_guard()

    def start_guard(self) -> None:
        service = tap.build_service(self.config, reactor)
        service.startService()  # type: ignore[no-untyped-call]
        self.service = service

    async def stop_guard(self) -> None:
        service, self.service = self.service, None
        if service is not None:
            await service.stopService()  # type: ignore[no-untyped-call]

    def begin(self) -> None:
        """Forget what was logged and delivered so far."""
        self._log_from = len(self.postfix.log())
        self._seen = set(self.postfix.mailbox())

    def log_text(self) -> str:
        return self.postfix.log()[self._log_from :]

    def log(self, program: str) -> list[str]:
        """The log lines of one of Postfix's programs (``smtpd``, ``cleanup`` ...)."""
        return [line for line in self.log_text().splitlines() if f" postfix/{program}[" in line]

    def delivered(self) -> list[bytes]:
        """The messages in the Maildir, in the order they were delivered."""
        return [path.read_bytes() for path in self.postfix.mailbox() if path not in self._seen]

    async def settled(self, count: int) -> list[bytes]:
        """The Maildir once ``count`` messages are in it and the queue is empty, each
        queue file removed (so nothing more is on its way: no bounce, no copy)."""
        await until(lambda: len(self.delivered()) >= count)
        await until(lambda: not self.postfix.queue())
        return self.delivered()


def guard_settings(
    mode: str, guard: int, reinjection: int, scanner: str, directory: Path, tls: bool, xforward: bool
) -> dict[str, Any]:
    """smtpguard's configuration: the guide's, on the test's ports and scanner."""
    endpoints = {
        "tcp:10025:interface=127.0.0.1": f"tcp:{guard}:interface=127.0.0.1",
        "tcp:127.0.0.1:10026": f"tcp:127.0.0.1:{reinjection}",
        "unix:/run/clamav/clamd.ctl": scanner,
    }
    settings = tomllib.loads(recipe(f"{mode} smtpguard.toml", endpoints))
    if xforward:
        merge(settings, tomllib.loads(recipe("xforward smtpguard.toml")))
    if tls:
        key, certificate = throwaway_certificate("mx.example.com")
        (directory / "key.pem").write_bytes(key)
        (directory / "cert.pem").write_bytes(certificate)
        paths = {
            "/etc/smtpguard/cert.pem": str(directory / "cert.pem"),
            "/etc/smtpguard/key.pem": str(directory / "key.pem"),
        }
        merge(settings, tomllib.loads(recipe("tls smtpguard.toml", paths)))
    return settings


def merge(settings: dict[str, Any], more: dict[str, Any]) -> None:
    """Add ``more``'s keys to ``settings``' tables of the same names."""
    for table, values in more.items():
        settings.setdefault(table, {}).update(values)


class Deployments:
    """Starts deployments (their files in ``directory``, their Postfix instances
    with ``postfix``) and stops their smtpguard services."""

    def __init__(self, directory: Path, postfix: PostfixInstances) -> None:
        self.directory = directory
        self.postfix = postfix
        self.started: list[Deployment] = []

    def __call__(self, mode: str, scanner: str, **options: Any) -> Deployment:
        """A new deployment of ``mode`` ("after-queue" or "before-queue") scanning
        with the clamd at ``scanner``; ``options``: tls, xforward, more (TOML added
        to smtpguard's configuration), main_cf (added to Postfix's)."""
        deployment = Deployment(mode, scanner, self.directory, **options)
        self.started.append(deployment)
        deployment.start(self.postfix)
        return deployment

    def stop(self) -> None:
        for deployment in self.started:
            pytest_twisted.blockon(Deferred.fromCoroutine(deployment.stop_guard()))


@pytest.fixture
def deploy(tmp_path: Path, private_postfix: PostfixInstances) -> Iterator[Deployments]:
    """``deploy(mode, scanner, **options)``: a deployment of the test's own, for
    tests that stop parts of it or configure it otherwise."""
    deployments = Deployments(tmp_path, private_postfix)
    yield deployments
    deployments.stop()


@pytest.fixture(scope="module")
def shared(clamd: Clamd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Deployment]]:
    """The guide's deployment of a mode, as it stands, with the shared clamd:
    started once, for the tests that change nothing in it."""
    postfix = PostfixInstances()
    deployments = Deployments(tmp_path_factory.mktemp("postfix"), postfix)
    modes: dict[str, Deployment] = {}

    def get(mode: str) -> Deployment:
        if mode not in modes:
            modes[mode] = deployments(mode, clamd.unix_endpoint)
        modes[mode].begin()
        return modes[mode]

    yield get
    deployments.stop()
    postfix.stop()


@pytest.fixture
def after_queue(shared: Callable[[str], Deployment]) -> Deployment:
    return shared("after-queue")


@pytest.fixture
def before_queue(shared: Callable[[str], Deployment]) -> Deployment:
    return shared("before-queue")


async def until(condition: Callable[[], T], timeout: float = WAIT) -> T:
    """``condition()`` once it is true, checked every 50 ms; fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"still not true after {timeout} s: {condition}")
        await sleep(0.05)
    return value


# -- clients ---------------------------------------------------------------------------


def send(
    port: int,
    content: bytes,
    sender: str = SENDER,
    recipient: str = RECIPIENT,
    mail_options: Sequence[str] = (),
    rcpt_options: Sequence[str] = (),
    source: str = "127.0.0.1",
) -> list[tuple[int, bytes]]:
    """One transaction from ``source`` with HELO client.example, stopping at the first
    refusal: the replies to MAIL, RCPT and the end of data, as smtplib reports them."""
    with smtplib.SMTP(
        "127.0.0.1", port, local_hostname=CLIENT_HELO, timeout=WAIT, source_address=(source, 0)
    ) as client:
        client.ehlo()
        answers = [client.mail(sender, list(mail_options))]
        if answers[-1][0] == 250:
            answers.append(client.rcpt(recipient, list(rcpt_options)))
        if answers[-1][0] == 250:
            answers.append(client.data(content))
        return answers


def accepted(answers: list[tuple[int, bytes]]) -> bool:
    return [code for code, _ in answers] == [250, 250, 250]


def split(delivered: bytes) -> tuple[bytes, bytes]:
    """A Maildir message's header section (each line ending in LF) and body."""
    head, _, body = delivered.partition(b"\n\n")
    return head + b"\n", body


def assert_unchanged(delivered: bytes, sent: bytes) -> None:
    """The delivered message ends with the sent header fields, in order, and the
    sent body, byte for byte (in the Maildir's LF line ends)."""
    head, body = split(delivered)
    sent_head, sent_body = split(lf(sent))
    assert_same_bytes(body, sent_body)
    assert head.endswith(sent_head), head.decode("utf-8", "replace")


# The Received: fields of a message through either mode, newest first, up to their
# ids: the re-injecting smtpd's, smtpguard's (its client is Postfix: the smtp
# transport, or the public smtpd's proxy, both say EHLO hop.test), the public smtpd's.
TRACE = [
    b"from mx.example.com (unknown [127.0.0.1]) by hop.test (Postfix) with ESMTP",
    b"from hop.test ([127.0.0.1]) by mx.example.com (smtpguard) with ESMTP",
    b"from client.example (unknown [127.0.0.1]) by hop.test (Postfix) with ESMTP",
]


def trace(delivered: bytes) -> list[bytes]:
    """The Received: fields of a Maildir message, up to their WITH clause."""
    return [re.match(rb".*? with \w+", value).group() for value in field(delivered, "Received")]  # type: ignore[union-attr]


def field(delivered: bytes, name: str) -> list[bytes]:
    """Every value of header field ``name`` (unfolded) in a Maildir message."""
    head, _ = split(delivered)
    unfolded = re.sub(rb"\n[ \t]", b" ", head)
    prefix = name.encode().lower() + b": "
    return [line[len(prefix) :] for line in unfolded.split(b"\n") if line.lower().startswith(prefix)]


DELIVERY = re.compile(
    r" (?P<queue_id>[0-9A-F]+): to=<(?P<to>[^>]*)>, (?:orig_to=<[^>]*>, )?relay=(?P<relay>\S+), .*"
    r" status=(?P<status>\w+) \((?P<text>.*)\)$",
    re.M,
)


def deliveries(setup: Deployment) -> list[tuple[str, str, str, str, str]]:
    """Every delivery attempt Postfix logged: (queue id, recipient, relay, status, text)."""
    return [match.group("queue_id", "to", "relay", "status", "text") for match in DELIVERY.finditer(setup.log_text())]


def report_parts(delivered: bytes) -> dict[str, Any]:
    """The parts of a delivery status notification (multipart/report), by type."""
    report = email.message_from_bytes(delivered)
    assert report.get_content_type() == "multipart/report"
    return {part.get_content_type(): part for part in report.walk()}


def queue_id(answers: list[tuple[int, bytes]]) -> str:
    """The queue id in Postfix's 250 to the end of data."""
    return answers[-1][1].decode().rpartition(" ")[2]


async def logged(setup: Deployment, queue: str) -> list[tuple[str, str, str, str, str]]:
    """The deliveries Postfix logged for queue file ``queue``, once there is one.
    Processes log on their own: a re-injected message can be logged as delivered
    before the smtp client logs that smtpguard took it, so never rely on the order."""
    return await until(lambda: [entry for entry in deliveries(setup) if entry[0] == queue])


async def relayed_to_guard(setup: Deployment, first: str) -> str:
    """Asserts that Postfix delivered queue file ``first`` to smtpguard, which
    answered with the re-injecting smtpd's 250; that smtpd's queue id."""
    [(_, _, relay, status, text)] = await logged(setup, first)
    assert (relay, status) == (f"127.0.0.1[127.0.0.1]:{setup.guard}", "sent")
    found = re.fullmatch(r"250 2\.0\.0 Ok: \d+ bytes queued as (?P<id>[0-9A-F]+)", text)
    assert found is not None, text
    return found["id"]


def into_maildir(queue_id: str, recipient: str) -> tuple[str, str, str, str, str]:
    return (queue_id, recipient, "virtual", "sent", "delivered to maildir")


# -- the guide's recipes ---------------------------------------------------------------


def test_the_tls_transport_is_the_transport_with_tls_added() -> None:
    """The guide's TLS transport is its plain transport plus two TLS settings, so
    the tests of either recipe cover the same entry."""
    plain, tls = recipes()["after-queue master.cf transport"], recipes()["after-queue master.cf transport with TLS"]
    assert tls == plain + "    -o smtp_tls_security_level=encrypt\n    -o smtp_tls_loglevel=1\n"


def test_the_guides_configurations_pass_check_config_without_warning(tmp_path: Path, capsys: Any) -> None:
    """Both smtpguard.toml recipes are valid as they stand and draw no warning."""
    for mode in ("after-queue", "before-queue"):
        path = tmp_path / f"{mode}.toml"
        path.write_text(recipes()[f"{mode} smtpguard.toml"])
        assert cli.main(["check-config", str(path)]) == 0
        assert capsys.readouterr() == (f"{path}: ok\n", "")


# -- after the queue -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_after_queue_clean_message_is_delivered_unchanged(after_queue: Deployment) -> None:
    """A clean message goes public smtpd -> queue -> smtpguard -> re-injecting
    smtpd -> Maildir, once: its header fields and body byte for byte, under the
    trace fields of the re-injecting smtpd, smtpguard and the public smtpd."""
    sent = message("clean after the queue")
    answers = await in_thread(send, after_queue.public, sent, mail_options=["BODY=8BITMIME"])
    [delivered] = await after_queue.settled(1)
    assert_unchanged(delivered, sent)
    assert trace(delivered) == TRACE
    assert field(delivered, "X-Virus-Status") == [b"clean"]
    second = await relayed_to_guard(after_queue, queue_id(answers))
    assert await logged(after_queue, second) == [into_maildir(second, RECIPIENT)]


@pytest_twisted.ensureDeferred
async def test_after_queue_virus_is_replaced_and_nothing_bounces(after_queue: Deployment) -> None:
    """With the guide's policy (replace), EICAR reaches the recipient as the notice
    that replaces it, and nothing goes back to the sender: one message in the
    Maildir, none of it the virus, the queue empty."""
    answers = await in_thread(send, after_queue.public, INFECTED)
    [delivered] = await after_queue.settled(1)
    assert EICAR not in delivered
    assert field(delivered, "Delivered-To") == [RECIPIENT.encode()]
    assert field(delivered, "X-Virus-Status") == [f"infected ({THREAT})".encode()]
    notice = re.fullmatch(
        rb"Your mail 127\.0\.0\.1:\d+-127\.0\.0\.1:%d contains contaminated file \(message\)"
        rb" with virus %s, so it is dropped\.\n" % (after_queue.guard, THREAT.encode()),
        split(delivered)[1],
    )
    assert notice is not None, split(delivered)[1]
    second = await relayed_to_guard(after_queue, queue_id(answers))
    assert await logged(after_queue, second) == [into_maildir(second, RECIPIENT)]


@pytest_twisted.ensureDeferred
async def test_after_queue_discarded_virus_gets_the_sender_a_notice_without_it(
    deploy: Deployments, clamd: Clamd, tmp_path: Path
) -> None:
    """With the guide's other policy (discard, notify the sender), smtpguard answers
    Postfix 250 2.0.0 Ok: message discarded; the sender gets smtpguard's notice,
    a report with the message's headers and no part of its body, and nothing else
    is delivered or queued."""
    outbox = {"/var/spool/smtpguard/outbox": str(tmp_path / "outbox")}
    setup = deploy("after-queue", clamd.unix_endpoint, more=recipe("after-queue smtpguard.toml discard", outbox))
    answers = await in_thread(send, setup.public, INFECTED)
    [delivered] = await setup.settled(1)
    assert EICAR not in delivered
    assert field(delivered, "Delivered-To") == [SENDER.encode()]
    assert field(delivered, "Return-Path") == [b"<>"]
    assert field(delivered, "From") == [b"Mail Delivery System <postmaster@example.com>"]
    parts = report_parts(delivered)
    assert "message/rfc822" not in parts
    assert "Subject: invoice" in parts["text/rfc822-headers"].get_payload()
    first = queue_id(answers)
    [(_, _, relay, status, text)] = await logged(setup, first)
    [maildir] = await until(lambda: [entry for entry in deliveries(setup) if entry[0] != first])
    assert (relay, status, text) == (
        f"127.0.0.1[127.0.0.1]:{setup.guard}",
        "sent",
        wire_text(replies.DISCARDED),
    )
    assert maildir[1:] == (SENDER, "virtual", "sent", "delivered to maildir")


@pytest_twisted.ensureDeferred
async def test_after_queue_rejected_virus_is_bounced_to_the_sender(deploy: Deployments, clamd: Clamd) -> None:
    """Why the guide never rejects after the queue: with on_virus = "reject",
    smtpguard's 554 5.7.1 makes Postfix bounce the message it had accepted, virus
    included, to the envelope sender (who may be forged)."""
    setup = deploy("after-queue", clamd.unix_endpoint, more='[policy]\non_virus = "reject"\n')
    answers = await in_thread(send, setup.public, INFECTED)
    [bounce] = await setup.settled(1)
    assert field(bounce, "Delivered-To") == [SENDER.encode()]
    assert EICAR in bounce
    rejected = replies.VIRUS_REJECTED.with_text(f"Message rejected: virus found ({THREAT})")
    [(_, recipient, relay, status, text)] = await logged(setup, queue_id(answers))
    assert (recipient, relay, status) == (RECIPIENT, f"127.0.0.1[127.0.0.1]:{setup.guard}", "bounced")
    assert text == f"host 127.0.0.1[127.0.0.1] said: {wire_text(rejected)} (in reply to end of DATA command)"
    assert f"{queue_id(answers)}: sender non-delivery notification: " in setup.log_text()


@pytest_twisted.ensureDeferred
async def test_after_queue_dsn_parameters_survive(after_queue: Deployment) -> None:
    """ENVID, RET, NOTIFY and ORCPT go through smtpguard to the re-injecting
    smtpd: its delivery makes the one success notification the sender gets, with
    the Original-Envelope-Id and Original-Recipient the client gave, and the
    headers alone (RET=HDRS); the public Postfix sends no "relayed" notice."""
    options = {
        "mail_options": ["RET=HDRS", "ENVID=QQ314159"],
        "rcpt_options": ["NOTIFY=SUCCESS", "ORCPT=rfc822;robert@example.net"],
    }
    await in_thread(send, after_queue.public, message("dsn"), **options)
    delivered, notification = await after_queue.settled(2)
    assert [field(each, "Delivered-To") for each in (delivered, notification)] == [
        [b"bob@example.com"],
        [b"alice@example.org"],
    ]
    parts = report_parts(notification)
    assert "message/rfc822" not in parts
    assert parts["text/rfc822-headers"].get_payload().startswith("Return-Path: <alice@example.org>")
    per_message, per_recipient = parts["message/delivery-status"].get_payload()
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert (per_recipient["Final-Recipient"], per_recipient["Original-Recipient"], per_recipient["Action"]) == (
        "rfc822; bob@example.com",
        "rfc822;robert@example.net",
        "delivered",
    )


@pytest_twisted.ensureDeferred
async def test_after_queue_smtputf8_addresses_and_headers_are_intact(after_queue: Deployment) -> None:
    """An SMTPUTF8 message with UTF-8 addresses and header fields is delivered to
    its UTF-8 recipient, from its UTF-8 sender, with those fields byte for byte."""
    sender, recipient = "ålice@example.org", "bøb@example.com"
    sent = (
        f"From: Ålice <{sender}>\r\nTo: Bøb <{recipient}>\r\nSubject: Grüße, Bøb\r\n"
        "Date: Mon, 30 Nov 2026 12:00:00 +0000\r\nMessage-ID: <utf8@example.org>\r\n\r\nHej Bøb!\r\n"
    ).encode()
    answers = await in_thread(
        send, after_queue.public, sent, sender, recipient, mail_options=["SMTPUTF8", "BODY=8BITMIME"]
    )
    [delivered] = await after_queue.settled(1)
    assert_unchanged(delivered, sent)
    assert field(delivered, "Return-Path") == [f"<{sender}>".encode()]
    assert field(delivered, "Delivered-To") == [recipient.encode()]
    assert b"(smtpguard) with UTF8SMTP id" in b"".join(field(delivered, "Received"))
    second = await relayed_to_guard(after_queue, queue_id(answers))
    assert await logged(after_queue, second) == [into_maildir(second, recipient)]


@pytest_twisted.ensureDeferred
async def test_after_queue_virtual_aliases_are_expanded_after_smtpguard(deploy: Deployments, clamd: Clamd) -> None:
    """With a virtual alias (sales -> bob), smtpguard is given the message for the
    address the client named (no_address_mappings before the filter), and the
    re-injecting smtpd expands it: delivered once, to bob, as sales' mail."""
    aliases = "virtual_alias_maps = inline:{ sales@example.com=bob@example.com }\n"
    setup = deploy("after-queue", clamd.unix_endpoint, main_cf=aliases)
    answers = await in_thread(send, setup.public, message("aliased"), recipient="sales@example.com")
    [delivered] = await setup.settled(1)
    assert (field(delivered, "X-Original-To"), field(delivered, "Delivered-To")) == (
        [b"sales@example.com"],
        [b"bob@example.com"],
    )
    [(_, recipient, relay, *_)] = [entry for entry in deliveries(setup) if entry[0] == queue_id(answers)]
    assert (recipient, relay) == ("sales@example.com", f"127.0.0.1[127.0.0.1]:{setup.guard}")


@pytest_twisted.ensureDeferred
async def test_after_queue_starttls_to_smtpguard_is_negotiated(deploy: Deployments, clamd: Clamd) -> None:
    """With the guide's TLS transport (smtp_tls_security_level=encrypt) and
    smtpguard's certificate, Postfix delivers to smtpguard over TLS: it logs the
    TLS connection, and smtpguard's Received: says ESMTPS."""
    setup = deploy("after-queue", clamd.unix_endpoint, tls=True)
    await in_thread(send, setup.public, message("over tls"))
    [delivered] = await setup.settled(1)
    assert b"by mx.example.com (smtpguard) with ESMTPS id" in b"".join(field(delivered, "Received"))
    established = [line for line in setup.log("smtp") if "TLS connection established to" in line]
    assert len(established) == 1
    assert re.search(
        rf"postfix/smtp\[\d+\]: Untrusted TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:{setup.guard}:"
        r" TLSv1\.3 with cipher ",
        established[0],
    ), established


@pytest_twisted.ensureDeferred
async def test_after_queue_clamd_down_defers_and_delivers_once_it_is_back(deploy: Deployments, tmp_path: Path) -> None:
    """With clamd stopped, Postfix defers each message on smtpguard's 451 4.7.1 and
    keeps it; once clamd is back, ``postqueue -f`` delivers each exactly once."""
    engine = Clamd(tmp_path / "clamd")
    engine.start()
    try:
        setup = deploy("after-queue", engine.unix_endpoint)
        engine.stop()
        said = f"host 127.0.0.1[127.0.0.1] said: {wire_text(replies.SCAN_DEFERRED)} (in reply to end of DATA command)"
        await down_then_back(setup, (f"127.0.0.1[127.0.0.1]:{setup.guard}", said), engine.start)
    finally:
        engine.stop()


@pytest_twisted.ensureDeferred
async def test_after_queue_smtpguard_down_defers_and_delivers_once_it_is_back(
    deploy: Deployments, clamd: Clamd
) -> None:
    """With smtpguard stopped, Postfix defers each message (connection refused) and
    keeps it; once smtpguard is back, ``postqueue -f`` delivers each exactly once."""
    setup = deploy("after-queue", clamd.unix_endpoint)
    await setup.stop_guard()
    refused = f"connect to 127.0.0.1[127.0.0.1]:{setup.guard}: Connection refused"
    await down_then_back(setup, ("none", refused), setup.start_guard)


def wire_text(reply: Reply) -> str:
    return reply.to_bytes().decode().strip()


async def down_then_back(setup: Deployment, why: tuple[str, str], restore: Callable[[], None], count: int = 3) -> None:
    """Sends ``count`` messages one after the other, each accepted by Postfix and
    its delivery to smtpguard deferred with ``why`` (relay, reason); then calls
    ``restore`` and flushes the queue: each is delivered, once."""
    subjects = [f"while down {number}" for number in range(count)]
    for number, subject in enumerate(subjects, 1):
        assert accepted(await in_thread(send, setup.public, message(subject)))
        await until(lambda: len(deliveries(setup)) == number)  # noqa: B023 (awaited at once)
    assert [(relay, status, text) for _, _, relay, status, text in deliveries(setup)] == [
        (why[0], "deferred", why[1])
    ] * count
    queued = await in_thread(setup.postfix.queue)
    assert [(entry["queue_name"], entry["recipients"]) for entry in queued] == [
        ("deferred", [{"address": RECIPIENT, "delay_reason": why[1]}])
    ] * count
    assert setup.delivered() == []
    restore()
    await in_thread(setup.postfix.flush)
    delivered = await setup.settled(count)
    assert sorted(field(each, "Subject")[0].decode() for each in delivered) == subjects


# -- before the queue ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_before_queue_clean_message_is_delivered_unchanged(before_queue: Deployment) -> None:
    """A clean message passes through smtpguard during the client's session and is
    queued once, by the second smtpd: the client's 250 is that smtpd's, and the
    message arrives byte for byte under the trace fields of that smtpd, smtpguard
    and the public smtpd (which adds its own to what it passes on)."""
    sent = message("clean before the queue")
    answers = await in_thread(send, before_queue.public, sent, mail_options=["BODY=8BITMIME"])
    [delivered] = await before_queue.settled(1)
    assert_unchanged(delivered, sent)
    assert trace(delivered) == TRACE
    assert deliveries(before_queue) == [into_maildir(queue_id(answers), RECIPIENT)]


@pytest_twisted.ensureDeferred
async def test_before_queue_virus_is_refused_in_the_session_and_nothing_is_queued(before_queue: Deployment) -> None:
    """With the guide's policy (reject), the client hears smtpguard's 554 5.7.1 as
    the reply to its end of data, and Postfix queues and delivers nothing."""
    answers = await in_thread(send, before_queue.public, INFECTED)
    rejected = replies.VIRUS_REJECTED.with_text(f"Message rejected: virus found ({THREAT})")
    assert answers == [wire(replies.SENDER_OK), wire(replies.RECIPIENT_OK), wire(rejected)]
    assert await in_thread(before_queue.postfix.queue) == []
    assert before_queue.delivered() == []
    assert deliveries(before_queue) == []
    assert not [line for line in before_queue.log("cleanup") if "message-id=" in line]


@pytest_twisted.ensureDeferred
async def test_before_queue_clamd_down_tells_the_client_to_try_later(deploy: Deployments, tmp_path: Path) -> None:
    """With no clamd listening, the client hears smtpguard's 451 4.7.1 as the reply
    to its end of data; nothing is queued."""
    setup = deploy("before-queue", f"unix:{tmp_path / 'no-clamd.sock'}")
    answers = await in_thread(send, setup.public, message("no clamd"))
    assert answers == [wire(replies.SENDER_OK), wire(replies.RECIPIENT_OK), wire(replies.SCAN_DEFERRED)]
    assert await in_thread(setup.postfix.queue) == []


@pytest_twisted.ensureDeferred
async def test_before_queue_smtpguard_down_tells_the_client_to_try_later(deploy: Deployments, clamd: Clamd) -> None:
    """With smtpguard stopped, the public smtpd cannot reach its proxy filter: the
    client's RCPT gets Postfix's 451 4.3.0 Error: queue file write error, the log
    says why, and Postfix sends the postmaster a notice."""
    setup = deploy("before-queue", clamd.unix_endpoint)
    await setup.stop_guard()
    answers = await in_thread(send, setup.public, message("no smtpguard"))
    assert answers == [wire(replies.SENDER_OK), (451, b"4.3.0 Error: queue file write error")]
    assert any(
        f"warning: connect to proxy filter 127.0.0.1:{setup.guard}: Connection refused" in line
        for line in setup.log("smtpd")
    ), setup.log("smtpd")
    # Postfix tells the postmaster too (which this test instance cannot deliver).
    [(_, postmaster, *_, text)] = await until(lambda: deliveries(setup))
    assert (postmaster, text) == ("postmaster@hop.test", "no delivery outside the test domains")


# -- the original client ---------------------------------------------------------------

ORIGINAL_CLIENT = "127.0.0.2"


@pytest.mark.parametrize("mode", ["after-queue", "before-queue"])
@pytest_twisted.ensureDeferred
async def test_reinjecting_smtpd_records_the_original_client(deploy: Deployments, clamd: Clamd, mode: str) -> None:
    """With the guide's xforward_hosts, the client's address (127.0.0.2) and HELO
    reach the re-injecting smtpd through Postfix's XFORWARD to smtpguard and
    smtpguard's to it: it logs orig_client=unknown[127.0.0.2], and the message's
    queue file holds that address and HELO (postcat; the final delivery is held
    back with defer_transports so that the file can be read)."""
    setup = deploy(mode, clamd.unix_endpoint, xforward=True, main_cf="defer_transports = virtual\n")
    answers = await in_thread(send, setup.public, message("original client"), source=ORIGINAL_CLIENT)
    await until(lambda: [entry for entry in deliveries(setup) if entry[2] == "none"])
    reinjected = await relayed_to_guard(setup, queue_id(answers)) if mode == "after-queue" else queue_id(answers)
    [logged] = [line.split(f": {reinjected}: ")[1] for line in setup.log("smtpd") if f": {reinjected}: client=" in line]
    fields = dict(pair.split("=", 1) for pair in logged.split(", "))
    assert (fields["client"], fields["orig_client"]) == ("unknown[127.0.0.1]", f"unknown[{ORIGINAL_CLIENT}]")
    queue_file = await in_thread(setup.postfix.run, "postcat", "-q", reinjected)
    attributes = dict(re.findall(r"^named_attribute: (\w+)=(.*)$", queue_file, re.M))
    assert (attributes["log_client_address"], attributes["log_helo_name"]) == (ORIGINAL_CLIENT, CLIENT_HELO)
