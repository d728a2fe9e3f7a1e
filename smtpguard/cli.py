"""The ``smtpguard`` command: helpers around the proxy that ``twistd smtpguard`` runs."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from smtpguard import config as configuration
from smtpguard.config import ConfigError


def check_config(arguments: argparse.Namespace) -> int:
    from twisted.internet import reactor

    from smtpguard.tap import build_factory

    try:
        loaded = configuration.load(arguments.file)
        build_factory(loaded, reactor)
    except ConfigError as error:
        print(f"smtpguard: {error}", file=sys.stderr)
        return 1
    print(f"{arguments.file}: ok")
    return 0


def capture(arguments: argparse.Namespace) -> int:
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from smtpguard.capture import capture_factory

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    endpoint = serverFromString(reactor, arguments.listen)

    def failed(failure: Any) -> None:
        print(f"smtpguard capture: {failure.getErrorMessage()}", file=sys.stderr)
        reactor.stop()  # type: ignore[attr-defined]

    endpoint.listen(capture_factory(reactor, arguments.directory)).addErrback(failed)
    reactor.run()  # type: ignore[attr-defined]
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="smtpguard", description="smtpguard utilities; the proxy itself runs as `twistd smtpguard`."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    checking = commands.add_parser("check-config", help="validate a configuration file and the plugins it names")
    checking.add_argument("file")
    checking.set_defaults(run=check_config)
    capturing = commands.add_parser("capture", help="run an SMTP server that stores what it receives in a folder")
    capturing.add_argument(
        "--listen", default="tcp:10026:interface=127.0.0.1", help="server endpoint (default: %(default)s)"
    )
    capturing.add_argument("--directory", default="capture", help="where messages go (default: %(default)s)")
    capturing.set_defaults(run=capture)
    arguments = parser.parse_args(argv)
    return int(arguments.run(arguments))


if __name__ == "__main__":
    sys.exit(main())
