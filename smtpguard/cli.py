"""The ``smtpguard`` command: helpers around the proxy that ``twistd smtpguard`` runs."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from smtpguard import config as configuration
from smtpguard.config import Config, ConfigError, Listener
from smtpguard.quarantine_cli import add_commands as add_quarantine_commands


def check_config(arguments: argparse.Namespace) -> int:
    from twisted.internet import reactor

    from smtpguard.tap import build_factory

    try:
        loaded = configuration.load(arguments.file)
        build_factory(loaded, reactor)
        warnings = xforward_warnings(loaded)
    except ConfigError as error:
        print(f"smtpguard: {error}", file=sys.stderr)
        return 1
    for warning in warnings:
        print(f"smtpguard: warning: {warning}", file=sys.stderr)
    print(f"{arguments.file}: ok")
    return 0


def xforward_warnings(config: Config) -> list[str]:
    """A warning for each listener that takes XFORWARD (``xforward_hosts``: an MTA
    in front, such as Postfix's after-queue content_filter) and rejects infected
    mail: there the MTA has accepted the message already, and bounces it, virus
    and all, to its possibly forged sender."""
    from smtpguard.policies.default import DefaultPolicy, OnVirus
    from smtpguard.registry import build_policy

    warnings = []
    for listener in config.listeners:
        if not _xforward_hosts(listener):
            continue
        policy = build_policy(config.policy_for(listener), f"{config.source}: policy")
        if not isinstance(policy, DefaultPolicy):
            continue
        banks = [("policy", policy.settings)]
        banks += [(f"policy.rules[{index}]", rule.settings) for index, rule in enumerate(policy.rules)]
        rejecting = [name for name, settings in banks if settings.on_virus is OnVirus.REJECT]
        if rejecting:
            warnings.append(
                f"{config.source}: listener {listener.endpoint} takes XFORWARD (xforward_hosts) and rejects infected"
                f' mail ({", ".join(rejecting)}: on_virus = "reject"). Behind Postfix\'s content_filter (after the'
                " queue) each such 554 makes Postfix bounce the infected message to its sender, who may be forged:"
                ' use on_virus = "replace" or "discard" there (docs/postfix.md). Behind smtpd_proxy_filter (before'
                " the queue) rejecting is right."
            )
    return warnings


def _xforward_hosts(listener: Listener) -> tuple[Any, ...]:
    """The networks ``listener`` takes XFORWARD from."""
    return tuple(listener.access.xforward_hosts)


def scan(arguments: argparse.Namespace) -> int:
    """Scan message files with the configured scanners, like clamdscan: exit 0 when
    all are clean, 1 when any is infected, 2 when any could not be scanned (and
    none is infected)."""
    from twisted.internet.defer import Deferred, succeed

    from smtpguard.running import run_until_done
    from smtpguard.scanfiles import EXIT_ERROR, load_config, scan_files
    from smtpguard.tap import build_scanners

    def run(reactor: Any) -> Deferred[int]:
        try:
            loaded = load_config(arguments.config, arguments.scanner)
            scanner = build_scanners(loaded, reactor)
        except ConfigError as error:
            print(f"smtpguard: {error}", file=sys.stderr)
            return succeed(EXIT_ERROR)
        scanning = scan_files(reactor, scanner, loaded.scan_timeout, arguments.files, sys.stdout)
        return Deferred.fromCoroutine(scanning)

    return run_until_done(run, EXIT_ERROR)


def capture(arguments: argparse.Namespace) -> int:
    """Serve until stopped (exit 0); exit 1 with one line when the endpoint
    cannot be listened on."""
    from twisted.internet.defer import Deferred, succeed
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.error import CannotListenError
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from smtpguard.capture import capture_factory
    from smtpguard.listening import cannot_listen
    from smtpguard.running import run_until_done

    def serve(reactor: Any) -> Deferred[int]:
        try:
            endpoint = serverFromString(reactor, arguments.listen)
        except ValueError as error:
            print(f"smtpguard capture: bad endpoint {arguments.listen!r}: {error}", file=sys.stderr)
            return succeed(1)

        def failed(failure: Any) -> int:
            failure.trap(CannotListenError, OSError)
            print(f"smtpguard capture: {cannot_listen(arguments.listen, failure.value)}", file=sys.stderr)
            return 1

        # Standard error stays ours, for the one line that says why it stopped.
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
        stopped: Deferred[int] = Deferred()  # by SIGINT or SIGTERM, a normal end
        reactor.addSystemEventTrigger("before", "shutdown", stopped.callback, 0)
        listening: Deferred[Any] = endpoint.listen(capture_factory(reactor, arguments.directory))
        return listening.addCallbacks(lambda _: stopped, failed)

    return run_until_done(serve, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="smtpguard", description="smtpguard utilities; the proxy itself runs as `twistd smtpguard`."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    checking = commands.add_parser("check-config", help="validate a configuration file and the plugins it names")
    checking.add_argument("file")
    checking.set_defaults(run=check_config)
    scanning = commands.add_parser("scan", help="scan message files (.eml) and print a verdict for each")
    scanning.add_argument("files", nargs="+", metavar="FILE")
    scanning.add_argument("-c", "--config", help="take the [[scanners]] of this configuration file")
    scanning.add_argument("-s", "--scanner", action="append", help="scan with this (as twistd smtpguard --scanner)")
    scanning.set_defaults(run=scan)
    capturing = commands.add_parser("capture", help="run an SMTP server that stores what it receives in a folder")
    capturing.add_argument(
        "--listen", default="tcp:10026:interface=127.0.0.1", help="server endpoint (default: %(default)s)"
    )
    capturing.add_argument("--directory", default="capture", help="where messages go (default: %(default)s)")
    capturing.set_defaults(run=capture)
    add_quarantine_commands(commands)
    arguments = parser.parse_args(argv)
    return int(arguments.run(arguments))


if __name__ == "__main__":
    sys.exit(main())
