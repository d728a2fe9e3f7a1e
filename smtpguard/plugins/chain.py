"""The ``chain`` scanner: several scanners as one (``mode = "all"`` or ``"failover"``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from smtpguard.interfaces import IScanner
from smtpguard.registry import ScannerPlugin, build_scanner
from smtpguard.scanners.chain import AllScanners, FailoverScanners
from smtpguard.tables import options


def _chain(config: Mapping[str, Any], reactor: Any) -> IScanner:
    table = options(config)
    mode = table.choice("mode", ("all", "failover"), "all")
    members = table.raw("scanners")
    table.check_unknown()
    if not isinstance(members, list) or not members or not all(isinstance(member, dict) for member in members):
        raise table.error("scanners", "a list of at least one scanner table is needed")
    built = [build_scanner(member, reactor, f"scanners[{index}]") for index, member in enumerate(members)]
    return AllScanners(built) if mode == "all" else FailoverScanners(built)


chain = ScannerPlugin("chain", "Several scanners as one: all must pass, or failover to a backup when one fails", _chain)
