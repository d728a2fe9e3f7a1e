"""Several scanners as one: the ``all`` and ``failover`` chains, and the deadline
and error handling every scan goes through."""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smtpguard.config import ConfigError
from smtpguard.envelope import Client, Envelope
from smtpguard.interfaces import IClosable, IScanner
from smtpguard.registry import build_scanner
from smtpguard.results import ErrorKind, ScanResult, SizeLimit, Threat, Verdict
from smtpguard.scanners.chain import AllScanners, FailoverScanners
from smtpguard.scanners.deadline import scan_safely, with_deadline
from smtpguard.scanners.optional import size_limit
from smtpguard.spool import Spool
from smtpguard.testing import FixedScanner

ENVELOPE = Envelope(Client("127.0.0.1", 1), "a@example.com")
CLEAN = ScanResult.clean()
INFECTED = ScanResult.infected((Threat("Bad.Thing", "x.exe"),))
BROKEN = ScanResult.failed(ErrorKind.ENGINE_NOT_READY, "down")


def message():
    spool = Spool(0)
    spool.write(b"Subject: t\r\n\r\nbody\r\n")
    return spool.finish()


def outcome(deferred: Deferred) -> ScanResult:
    results: list = []
    deferred.addBoth(results.append)
    assert results, "the scan has not finished"
    assert isinstance(results[0], ScanResult), results[0]
    return results[0]


@implementer(IScanner)
class Raising:
    name = "raising"

    def scan(self, message, envelope):
        raise RuntimeError("bug")


@implementer(IScanner)
class Failing:
    name = "failing"

    def scan(self, message, envelope):
        return fail(RuntimeError("bug in a deferred"))


def test_chains_provide_iscanner():
    """Both chains are scanners themselves."""
    assert verifyObject(IScanner, AllScanners([FixedScanner(CLEAN)]))
    assert verifyObject(IScanner, FailoverScanners([FixedScanner(CLEAN)]))


def test_all_clean_when_every_scanner_is_clean():
    """``all`` is clean only when every scanner says clean."""
    chain = AllScanners([FixedScanner(CLEAN, "a"), FixedScanner(CLEAN, "b")])
    assert outcome(chain.scan(message(), ENVELOPE)) == ScanResult.clean("a+b")


def test_all_infection_wins_over_errors():
    """Any infection wins, even when another scanner failed; every threat is named."""
    second = ScanResult.infected((Threat("Other.Thing"),))
    chain = AllScanners([FixedScanner(BROKEN, "a"), FixedScanner(INFECTED, "b"), FixedScanner(second, "c")])
    result = outcome(chain.scan(message(), ENVELOPE))
    assert result.verdict is Verdict.INFECTED
    assert result.threats == (Threat("Bad.Thing", "x.exe"), Threat("Other.Thing"))


def test_all_error_when_one_scanner_fails():
    """A clean verdict from one scanner does not hide another's error."""
    chain = AllScanners([FixedScanner(CLEAN, "a"), FixedScanner(BROKEN, "b")])
    result = outcome(chain.scan(message(), ENVELOPE))
    assert (result.verdict, result.error, result.scanner) == (Verdict.ERROR, ErrorKind.ENGINE_NOT_READY, "b")


def test_all_runs_scanners_side_by_side():
    """``all`` starts every scanner at once and answers when the slowest has."""
    slow = FixedScanner(None, "slow")
    fast = FixedScanner(CLEAN, "fast")
    scanning = AllScanners([slow, fast]).scan(message(), ENVELOPE)
    assert len(slow.pending) == 1 and len(fast.scanned) == 1 and not scanning.called
    slow.pending[0].callback(CLEAN)
    assert outcome(scanning).verdict is Verdict.CLEAN


def test_all_turns_a_raising_scanner_into_an_error():
    """A scanner that raises is an ``other`` error, never clean."""
    result = outcome(AllScanners([FixedScanner(CLEAN), Raising()]).scan(message(), ENVELOPE))
    assert (result.verdict, result.error) == (Verdict.ERROR, ErrorKind.OTHER)


def test_failover_backup_not_asked_when_primary_decides():
    """The backup is not asked when the primary gives a verdict."""
    backup = FixedScanner(CLEAN, "backup")
    result = outcome(FailoverScanners([FixedScanner(INFECTED, "primary"), backup]).scan(message(), ENVELOPE))
    assert result.verdict is Verdict.INFECTED and backup.scanned == []


def test_failover_backup_asked_when_primary_fails():
    """When the primary fails, the backup's verdict stands."""
    backup = FixedScanner(INFECTED, "backup")
    result = outcome(FailoverScanners([FixedScanner(BROKEN, "primary"), backup]).scan(message(), ENVELOPE))
    assert result.verdict is Verdict.INFECTED and len(backup.scanned) == 1


def test_failover_backup_asked_when_primary_raises():
    """A primary that raises or fails its Deferred counts as failed: the backup decides."""
    for primary in (Raising(), Failing()):
        result = outcome(FailoverScanners([primary, FixedScanner(CLEAN, "backup")]).scan(message(), ENVELOPE))
        assert result == ScanResult.clean("backup")


def test_failover_last_error_stands_when_all_fail():
    """When every scanner fails, the last error is the result."""
    last = ScanResult.failed(ErrorKind.TIMEOUT, "slow")
    result = outcome(FailoverScanners([FixedScanner(BROKEN), FixedScanner(last, "last")]).scan(message(), ENVELOPE))
    assert (result.error, result.scanner) == (ErrorKind.TIMEOUT, "last")


def test_deadline_turns_a_stall_into_timeout():
    """A scan without a verdict by its deadline is a ``timeout`` error, on time."""
    clock = Clock()
    stalled = FixedScanner(None, "stalled")
    scanning = with_deadline(scan_safely(stalled, message(), ENVELOPE), 30, clock, "stalled")
    clock.advance(29.9)
    assert not scanning.called
    clock.advance(0.1)
    result = outcome(scanning)
    assert (result.error, result.scanner) == (ErrorKind.TIMEOUT, "stalled")


def test_chain_plugin_builds_failover_from_config():
    """``type = "chain"`` with ``mode = "failover"`` builds a failover of its members."""
    chain = build_scanner(
        {"type": "chain", "mode": "failover", "scanners": [{"type": "builtin"}, {"type": "builtin"}]},
        Clock(),
        "f.toml: scanners[0]",
    )
    assert isinstance(chain, FailoverScanners) and chain.name == "builtin|builtin"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"type": "chain", "scanners": []}, "f.toml: scanners[0].scanners: a list of at least one scanner table"),
        ({"type": "chain", "mode": "any", "scanners": [{"type": "builtin"}]}, "f.toml: scanners[0].mode: must be"),
        ({"type": "chain", "scanners": [{"type": "nope"}]}, "f.toml: scanners[0].scanners[0].type: unknown scanner"),
        ({"type": "chain", "scanners": [{"type": "builtin"}], "extra": 1}, "f.toml: scanners[0].extra: unknown key"),
    ],
)
def test_chain_plugin_errors_name_the_key(table, message):
    """A bad chain table stops the start with the full key in the message."""
    with pytest.raises(ConfigError) as raised:
        build_scanner(table, Clock(), "f.toml: scanners[0]")
    assert str(raised.value).startswith(message)


# -- the largest message a chain takes, and closing it ---------------------------------


@implementer(IScanner, IClosable)
class Held:
    """A scanner with a size limit (or none) whose close waits until ``closing`` fires."""

    def __init__(self, limit: SizeLimit | None = None, name: str = "held") -> None:
        self.name = name
        self.max_size = limit
        self.closing: Deferred[None] = Deferred()
        self.closed = 0

    def scan(self, message, envelope):
        return succeed(CLEAN)

    def close(self) -> Deferred[None]:
        self.closed += 1
        return self.closing


@implementer(IScanner, IClosable)
class BrokenClose:
    name = "broken-close"

    def scan(self, message, envelope):
        return succeed(CLEAN)

    def close(self) -> Deferred[None]:
        raise RuntimeError("bug in close")


def test_all_takes_the_smallest_limit_named_by_its_table():
    """Every scanner of an ``all`` chain must take the message: its limit is the
    smallest of theirs, its setting named as seen from the chain's table."""
    chain = AllScanners([Held(), Held(SizeLimit(30, "max_size")), Held(SizeLimit(20, "limit", "and the engine's"))])
    assert chain.max_size == SizeLimit(20, "scanners[2].limit", "and the engine's")


def test_all_without_limits_has_none():
    """No member with a limit, no limit (a scanner without max_size counts as none)."""
    assert AllScanners([Held(), FixedScanner(CLEAN)]).max_size is None


def test_failover_takes_the_largest_limit():
    """A message too big for one member goes on to the next: a failover chain takes
    what its most generous member takes."""
    assert FailoverScanners([Held(SizeLimit(20, "a")), Held(SizeLimit(30, "b"))]).max_size == SizeLimit(
        30, "scanners[1].b"
    )


def test_failover_with_a_member_without_limit_has_none():
    """One member that takes any size: the failover chain takes any size."""
    assert FailoverScanners([Held(SizeLimit(20, "a")), Held()]).max_size is None


def test_limit_without_a_setting_is_named_by_the_scanner_table():
    """A plugin's limit that names no key is reported as its table."""
    assert AllScanners([Held(), Held(SizeLimit(5))]).max_size == SizeLimit(5, "scanners[1]")


def test_limit_of_a_nested_chain_names_the_whole_path():
    """A clamd inside a chain, inside the [[scanners]] list: the full key."""
    member = build_scanner(
        {"type": "chain", "scanners": [{"type": "builtin"}, {"type": "clamd", "stream_max_length": "1M"}]},
        Clock(),
        "f.toml: scanners[0]",
    )
    limit = AllScanners([member]).max_size
    assert limit == SizeLimit(
        1048576, "scanners[0].scanners[1].stream_max_length", "together with StreamMaxLength in clamd.conf"
    )


def test_max_size_that_is_not_a_size_limit_is_refused():
    """A plugin whose max_size is not a SizeLimit fails loudly, not guessed at."""
    scanner = Held()
    scanner.max_size = 1000  # type: ignore[assignment]
    with pytest.raises(TypeError, match=r"^scanner 'held': max_size must be a SizeLimit or None, got 1000$"):
        size_limit(scanner)


@pytest.mark.parametrize("chain", [AllScanners, FailoverScanners])
def test_chain_close_closes_every_member_and_waits_for_them(chain):
    """Closing a chain closes each closable member once and fires when all have
    closed; members that hold nothing are skipped."""
    first, second = Held(), Held()
    closing = chain([first, FixedScanner(CLEAN), second]).close()
    assert (first.closed, second.closed) == (1, 1)
    first.closing.callback(None)
    assert not closing.called
    second.closing.callback(None)
    assert closing.called


def test_a_failing_close_does_not_keep_the_others_open():
    """A member whose close raises is logged; the others are still closed and the
    chain's close still fires."""
    other = Held()
    other.closing.callback(None)
    closing = AllScanners([BrokenClose(), other]).close()
    assert other.closed == 1
    assert outcome_of(closing) is None


def outcome_of(deferred: Deferred) -> object:
    results: list = []
    deferred.addBoth(results.append)
    assert results, "not fired"
    return results[0]
