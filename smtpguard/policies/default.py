"""The default policy: infected mail is rejected, mail that could not be scanned
is deferred, clean mail is delivered."""

from __future__ import annotations

from zope.interface import implementer

from smtpguard import replies
from smtpguard.envelope import Envelope
from smtpguard.interfaces import IPolicy
from smtpguard.results import Action, Decision, ScanResult, Verdict


@implementer(IPolicy)
class DefaultPolicy:
    def decide(self, envelope: Envelope, result: ScanResult) -> Decision:
        if result.verdict is Verdict.CLEAN:
            return Decision(Action.DELIVER)
        if result.verdict is Verdict.INFECTED:
            names = ", ".join(threat.name for threat in result.threats)
            return Decision(
                Action.REJECT, replies.VIRUS_REJECTED.with_text(f"Message rejected: virus found ({names})"), names
            )
        assert result.error is not None
        return Decision(Action.DEFER, replies.SCAN_DEFERRED, result.error.value)
