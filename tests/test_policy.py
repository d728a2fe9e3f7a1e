"""The default policy as a pure function: every verdict x every mode x the notify
flags, policy banks, and the [policy] table."""

from __future__ import annotations

import ipaddress
import itertools

import attrs
import pytest
from zope.interface.verify import verifyObject

from smtpguard import replies, templates
from smtpguard.config import ConfigError
from smtpguard.envelope import Client, Envelope, Recipient
from smtpguard.interfaces import IPolicy, IRecipientPolicy
from smtpguard.policies.default import DefaultPolicy, OnError, OnVirus, PolicySettings, Rule
from smtpguard.policies.options import build_policy
from smtpguard.results import Action, Decision, ErrorKind, Notice, ScanResult, Threat

CLIENT = Client("192.0.2.7", 40000, "198.51.100.1", 25, helo="client.example")
ENVELOPE = Envelope(CLIENT, "alice@example.com", recipients=(Recipient("bob@example.org"),))
NULL_SENDER = attrs.evolve(ENVELOPE, sender="")
CLEAN = ScanResult.clean("s")
INFECTED = ScanResult.infected((Threat("Eicar-Test-Signature", "eicar.com"),), "s")
FLAGS = list(itertools.product([False, True], repeat=4))


def settings(**changes) -> PolicySettings:
    return attrs.evolve(PolicySettings(), **changes)


def test_provides_ipolicy():
    """DefaultPolicy provides IPolicy."""
    assert verifyObject(IPolicy, DefaultPolicy())


def test_defaults():
    """Without configuration infected mail is rejected and unscanned mail deferred."""
    policy = DefaultPolicy()
    assert policy.decide(ENVELOPE, INFECTED).action is Action.REJECT
    assert policy.decide(ENVELOPE, ScanResult.failed(ErrorKind.TIMEOUT)).reply == replies.SCAN_DEFERRED


@pytest.mark.parametrize("mode", list(OnVirus))
@pytest.mark.parametrize(("quarantine", "notify_sender", "notify_admin", "null_sender"), FLAGS)
def test_clean_is_always_delivered_untouched(mode, quarantine, notify_sender, notify_admin, null_sender):
    """A clean message is delivered without tag, quarantine or notice, whatever the settings."""
    policy = DefaultPolicy(
        settings(on_virus=mode, quarantine=quarantine, notify_sender_on_virus=notify_sender, notify_admin=notify_admin)
    )
    assert policy.decide(NULL_SENDER if null_sender else ENVELOPE, CLEAN) == Decision(Action.DELIVER)


VIRUS_ACTIONS = {
    OnVirus.REPLACE: (Action.REPLACE, None),
    OnVirus.REJECT: (
        Action.REJECT,
        replies.VIRUS_REJECTED.with_text("Message rejected: virus found (Eicar-Test-Signature)"),
    ),
    OnVirus.DISCARD: (Action.DISCARD, replies.DISCARDED),
    OnVirus.PASS: (Action.DELIVER, None),
}


@pytest.mark.parametrize("mode", list(OnVirus))
@pytest.mark.parametrize(("quarantine", "notify_sender", "notify_admin", "null_sender"), FLAGS)
def test_infected(mode, quarantine, notify_sender, notify_admin, null_sender):
    """Infected: the on_virus action, quarantine as set, the admin told when set, and the
    sender told only when asked, when there is one, and when nothing else tells it
    (not after a 5xx, not in monitoring mode)."""
    policy = DefaultPolicy(
        settings(on_virus=mode, quarantine=quarantine, notify_sender_on_virus=notify_sender, notify_admin=notify_admin)
    )
    decision = policy.decide(NULL_SENDER if null_sender else ENVELOPE, INFECTED)
    action, reply = VIRUS_ACTIONS[mode]
    expected = set()
    if notify_admin:
        expected.add(Notice.ADMIN)
    if notify_sender and not null_sender and mode in (OnVirus.REPLACE, OnVirus.DISCARD):
        expected.add(Notice.SENDER)
    notice = templates.VIRUS_NOTICE if action is Action.REPLACE else None
    assert decision == Decision(
        action, reply, "virus Eicar-Test-Signature", quarantine=quarantine, notices=frozenset(expected), notice=notice
    )


@pytest.mark.parametrize("kind", list(ErrorKind))
@pytest.mark.parametrize("mode", list(OnError))
@pytest.mark.parametrize(("quarantine_dropped", "notify_sender", "tag_on_pass", "null_sender"), FLAGS)
def test_scan_error(kind, mode, quarantine_dropped, notify_sender, tag_on_pass, null_sender):
    """Scan error: drop replaces (sender told when asked), pass delivers (tagged when
    asked), defer answers 451 4.7.1 (but content-size, which no retry can cure, is
    rejected), reject answers 552 5.3.4 for content-size and 554 5.7.0 for the
    other kinds; never an admin notice."""
    policy = DefaultPolicy(
        settings(
            fail_mode=mode,
            quarantine_dropped=quarantine_dropped,
            notify_sender_on_error_drop=notify_sender,
            notify_recipient_on_error_pass=tag_on_pass,
            subject_tag="[unchecked]",
        )
    )
    decision = policy.decide(NULL_SENDER if null_sender else ENVELOPE, ScanResult.failed(kind, "x"))
    reason = f"scan error ({kind.value})"
    if kind is ErrorKind.CONTENT_SIZE and mode in (OnError.DEFER, OnError.REJECT):
        assert decision == Decision(Action.REJECT, replies.SCAN_TOO_BIG, reason)
    elif mode is OnError.DEFER:
        assert decision == Decision(Action.DEFER, replies.SCAN_DEFERRED, reason)
    elif mode is OnError.REJECT:
        assert decision == Decision(Action.REJECT, replies.SCAN_REJECTED, reason)
    elif mode is OnError.PASS:
        assert decision == Decision(Action.DELIVER, reason=reason, subject_tag="[unchecked]" if tag_on_pass else None)
    else:
        notices = frozenset({Notice.SENDER}) if notify_sender and not null_sender else frozenset()
        assert decision == Decision(
            Action.REPLACE, reason=reason, quarantine=quarantine_dropped, notices=notices, notice=templates.ERROR_NOTICE
        )


def test_content_size_is_rejected_by_default():
    """Without configuration a message too big to scan gets 552 5.3.4 at once:
    deferring it would only have the sender retry until it gives up."""
    decision = DefaultPolicy().decide(ENVELOPE, ScanResult.failed(ErrorKind.CONTENT_SIZE, "x"))
    assert decision == Decision(Action.REJECT, replies.SCAN_TOO_BIG, "scan error (content-size)")
    assert (replies.SCAN_TOO_BIG.code, replies.SCAN_TOO_BIG.enhanced) == (552, "5.3.4")


def test_content_size_is_deferred_only_when_the_fallback_names_it():
    """content-size = "defer" in [policy.fallback] (or default = "defer") defers it."""
    for table in ({"content-size": "defer"}, {"default": "defer"}):
        policy = build_policy({"fallback": table})
        assert policy.decide(ENVELOPE, ScanResult.failed(ErrorKind.CONTENT_SIZE)).reply == replies.SCAN_DEFERRED


def test_fallback_overrides_fail_mode_per_kind():
    """[policy.fallback] decides for the kinds it names; fail_mode for the others."""
    policy = DefaultPolicy(settings(fail_mode=OnError.DEFER, fallback={ErrorKind.CONTENT_SIZE: OnError.PASS}))
    assert policy.decide(ENVELOPE, ScanResult.failed(ErrorKind.CONTENT_SIZE)).action is Action.DELIVER
    assert policy.decide(ENVELOPE, ScanResult.failed(ErrorKind.TIMEOUT)).action is Action.DEFER


def test_notice_texts_come_from_the_settings():
    """virus_notice and error_notice set the text that replaces a dropped body."""
    texts = {"virus_notice": "Removed: {threat}", "error_notice": "No: {reason}"}
    policy = build_policy({"on_virus": "replace", "fail_mode": "drop", **texts})
    assert policy.decide(ENVELOPE, INFECTED).notice == "Removed: {threat}"
    assert policy.decide(ENVELOPE, ScanResult.failed(ErrorKind.TIMEOUT)).notice == "No: {reason}"


def test_forged_sender_threats_are_not_answered():
    """No notice goes to the sender of a threat known to forge its sender."""
    policy = DefaultPolicy(
        settings(on_virus=OnVirus.REPLACE, notify_sender_on_virus=True, forged_sender_threats=("Eicar-*",))
    )
    assert policy.decide(ENVELOPE, INFECTED).notices == frozenset({Notice.ADMIN})


def test_rule_by_recipient_domain():
    """A rule for a recipient domain (and its subdomains) applies when any recipient is in it."""
    rule = Rule(settings(on_virus=OnVirus.DISCARD), recipient_domains=("example.org",))
    policy = DefaultPolicy(settings(), [rule])
    sub = attrs.evolve(ENVELOPE, recipients=(Recipient("x@mail.example.org"),))
    other = attrs.evolve(ENVELOPE, recipients=(Recipient("x@example.net"),))
    assert policy.decide(ENVELOPE, INFECTED).action is Action.DISCARD
    assert policy.decide(sub, INFECTED).action is Action.DISCARD
    assert policy.decide(other, INFECTED).action is Action.REJECT


def test_rule_by_sender_and_network_needs_both():
    """A rule with several criteria applies only when all of them match; the first matching rule wins."""
    both = Rule(
        settings(on_virus=OnVirus.PASS),
        senders=("*@example.com",),
        client_networks=(ipaddress.ip_network("192.0.2.0/24"),),
    )
    fallback = Rule(settings(on_virus=OnVirus.DISCARD), senders=("*",))
    policy = DefaultPolicy(settings(), [both, fallback])
    assert policy.decide(ENVELOPE, INFECTED).action is Action.DELIVER
    elsewhere = attrs.evolve(ENVELOPE, client=attrs.evolve(CLIENT, address="203.0.113.9"))
    assert policy.decide(elsewhere, INFECTED).action is Action.DISCARD


def test_table_builds_settings_fallback_and_rules():
    """The [policy] table with [policy.fallback] and [[policy.rules]] builds the policy;
    rules inherit what they do not set."""
    policy = build_policy(
        {
            "on_virus": "replace",
            "fail_mode": "drop",
            "quarantine": True,
            "fallback": {"timeout": "defer", "default": "pass"},
            "rules": [{"recipient_domains": ["Example.ORG"], "on_virus": "discard"}],
        }
    )
    assert (policy.settings.on_virus, policy.settings.fail_mode, policy.settings.quarantine) == (
        OnVirus.REPLACE,
        OnError.DROP,
        True,
    )
    assert policy.settings.on_error(ErrorKind.TIMEOUT) is OnError.DEFER
    assert policy.settings.on_error(ErrorKind.CORRUPT_FILE) is OnError.PASS
    (rule,) = policy.rules
    assert rule.recipient_domains == ("example.org",)
    assert (rule.settings.on_virus, rule.settings.quarantine) == (OnVirus.DISCARD, True)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"on_virus": "bounce"}, "on_virus: must be one of replace, reject, discard, pass, got 'bounce'"),
        ({"fail_mode": 1}, "fail_mode: expected a string, got 1"),
        ({"fallback": {"slow": "pass"}}, "fallback.slow: unknown scan error kind"),
        ({"fallback": {"timeout": "maybe"}}, "fallback.timeout: must be one of drop, pass, defer"),
        ({"rules": [{"on_virus": "pass"}]}, "rules[0].recipient_domains: a rule needs"),
        ({"rules": [{"senders": ["*"], "colour": "red"}]}, "rules[0].colour: unknown key"),
        ({"rules": [{"client_networks": ["10.0.0.300/8"]}]}, "rules[0].client_networks:"),
        ({"quarantine": "yes"}, "quarantine: expected true or false, got 'yes'"),
        ({"typo": True}, "typo: unknown key"),
    ],
)
def test_table_errors_name_the_key(table, message):
    """A bad [policy] table stops the start with the key and the problem."""
    with pytest.raises(ConfigError) as raised:
        build_policy(table)
    assert str(raised.value).startswith(message)


def test_threat_names_are_given_once():
    """The same threat found twice is named once in the reply and the reason."""
    twice = ScanResult.infected((Threat("Eicar-Test-Signature", "a.com"), Threat("Eicar-Test-Signature", "b.com")))
    decision = DefaultPolicy().decide(ENVELOPE, twice)
    assert decision.reason == "virus Eicar-Test-Signature"
    assert decision.reply == replies.VIRUS_REJECTED.with_text("Message rejected: virus found (Eicar-Test-Signature)")


# -- one bank per transaction -------------------------------------------------------------

LAB = Rule(settings(on_virus=OnVirus.PASS), recipient_domains=("lab.example",))
PARTNER = Rule(settings(on_virus=OnVirus.DISCARD), recipient_domains=("partner.example",))
BANKS = DefaultPolicy(settings(), [LAB, PARTNER])
ADDRESSES = ["a@lab.example", "b@Mail.LAB.Example", "c@partner.example", "d@corp.example", "e@notlab.example"]


def to(*addresses: str, sender: str = ENVELOPE.sender) -> Envelope:
    """ENVELOPE with ``sender`` and these accepted recipients."""
    return attrs.evolve(ENVELOPE, sender=sender, recipients=tuple(Recipient(address) for address in addresses))


def test_default_policy_provides_irecipientpolicy():
    """DefaultPolicy is asked at each RCPT: it provides IRecipientPolicy."""
    assert verifyObject(IRecipientPolicy, DefaultPolicy())


@pytest.mark.parametrize("address", ADDRESSES)
def test_first_recipient_is_always_accepted(address):
    """The first recipient of a transaction sets its bank: whichever bank that is, it is accepted."""
    assert BANKS.accepts(to(), Recipient(address)) is True


@pytest.mark.parametrize(
    ("first", "second", "accepted"),
    [
        ("a@lab.example", "b@lab.example", True),  # the same bank
        ("a@lab.example", "b@Mail.LAB.Example", True),  # the same bank: a subdomain, in any case
        ("a@lab.example", "c@partner.example", False),  # another bank
        ("a@lab.example", "d@corp.example", False),  # no bank: [policy] itself
        ("a@lab.example", "e@notlab.example", False),  # no bank: only a dot makes a subdomain
        ("d@corp.example", "a@lab.example", False),  # [policy] first, a bank second
        ("d@corp.example", "e@notlab.example", True),  # [policy] both
        ("c@partner.example", "c2@PARTNER.example", True),
    ],
)
def test_second_recipient_joins_only_the_bank_of_the_first(first, second, accepted):
    """A recipient may join a transaction only when it selects the bank of the recipient already accepted."""
    assert BANKS.accepts(to(first), Recipient(second)) is accepted


@pytest.mark.parametrize("first", ADDRESSES)
@pytest.mark.parametrize("second", ADDRESSES)
def test_accepted_recipients_are_decided_alike(first, second):
    """A recipient is accepted exactly when the decision for it alone equals the decision for
    the first alone, and then the message to both is decided that way too."""
    alone = BANKS.decide(to(first), INFECTED)
    accepted = BANKS.accepts(to(first), Recipient(second))
    assert accepted is (BANKS.decide(to(second), INFECTED) == alone)
    if accepted:
        assert BANKS.decide(to(first, second), INFECTED) == alone


def test_bank_of_the_recipients_already_accepted_holds():
    """With several recipients accepted, a further one must share their bank."""
    envelope = to("a@lab.example", "b@Mail.LAB.Example")
    assert BANKS.accepts(envelope, Recipient("x@lab.example")) is True
    assert BANKS.accepts(envelope, Recipient("d@corp.example")) is False


@pytest.mark.parametrize(
    ("sender", "accepted"),
    [("alice@monitoring.example", True), ("alice@example.com", False)],
)
def test_sender_bank_takes_every_recipient(sender, accepted):
    """A bank chosen by sender alone holds for every recipient of the transaction (the sender is
    the transaction's own); for another sender the recipient banks behind it split as usual."""
    monitoring = Rule(settings(on_virus=OnVirus.DISCARD), senders=("*@monitoring.example",))
    policy = DefaultPolicy(settings(), [monitoring, LAB])
    assert policy.accepts(to("a@lab.example", sender=sender), Recipient("d@corp.example")) is accepted


@pytest.mark.parametrize(
    ("client", "accepted"),
    [("192.0.2.7", False), ("203.0.113.9", True)],
)
def test_bank_by_recipient_and_network_splits_only_for_that_network(client, accepted):
    """A bank with a recipient domain and a client network splits recipients only for a client
    in that network; from elsewhere every recipient has the [policy] settings."""
    lab_from_here = attrs.evolve(LAB, client_networks=(ipaddress.ip_network("192.0.2.0/24"),))
    policy = DefaultPolicy(settings(), [lab_from_here])
    envelope = attrs.evolve(to("a@lab.example"), client=attrs.evolve(CLIENT, address=client))
    assert policy.accepts(envelope, Recipient("d@corp.example")) is accepted


@pytest.mark.parametrize(("order", "accepted"), [("parent first", True), ("subdomain first", False)])
def test_first_matching_bank_is_the_recipients_bank(order, accepted):
    """When two banks match a recipient, the first listed is its bank: a subdomain listed after
    its parent domain's bank belongs to the parent's."""
    parent = Rule(settings(on_virus=OnVirus.PASS), recipient_domains=("example.net",))
    child = Rule(settings(on_virus=OnVirus.DISCARD), recipient_domains=("lab.example.net",))
    policy = DefaultPolicy(settings(), [parent, child] if order == "parent first" else [child, parent])
    assert policy.accepts(to("a@example.net"), Recipient("b@lab.example.net")) is accepted


def test_banks_with_equal_settings_share_a_transaction():
    """Two banks (or a bank and [policy]) with equal settings decide alike: their recipients
    share a transaction."""
    lab = Rule(settings(on_virus=OnVirus.PASS), recipient_domains=("lab.example",))
    partner = Rule(settings(on_virus=OnVirus.PASS), recipient_domains=("partner.example",))
    same_as_default = Rule(settings(), recipient_domains=("corp.example",))
    policy = DefaultPolicy(settings(), [lab, partner, same_as_default])
    assert policy.accepts(to("a@lab.example"), Recipient("c@partner.example")) is True
    assert policy.accepts(to("d@corp.example"), Recipient("x@elsewhere.example")) is True
