"""Running the reactor for one command-line action and turning its outcome into
an exit status."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred


def run_until_done(action: Callable[[Any], Deferred[int]], failed: int) -> int:
    """Run the reactor until ``action(reactor)`` fires; its result is the exit
    status, ``failed`` when it fails."""
    status = [failed]

    def main(reactor: Any) -> Deferred[None]:
        return action(reactor).addCallback(lambda code: status.__setitem__(0, code))

    try:
        task.react(main)
    except SystemExit as exit_:
        if exit_.code:
            return failed
    return status[0]
