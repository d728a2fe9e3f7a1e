"""``smtpguard quarantine list | show ID | release ID | delete ID``: the quarantine from
the command line.

Everything printed may come from a client (addresses, HELO names, subjects,
headers), so every control character is printed as a visible escape: nothing
can clear the operator's screen or draw rows of its own.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import attrs

from smtpguard import config as configuration
from smtpguard.config import ConfigError
from smtpguard.envelope import mail_arguments, rcpt_arguments
from smtpguard.headers import printable
from smtpguard.quarantine import Quarantine, QuarantineError, build_quarantine, envelope_of
from smtpguard.replies import Reply
from smtpguard.settings import UpstreamSettings

# Every parameter is shown, as if the next hop offered every extension.
_ALL_EXTENSIONS = {"SIZE": "", "8BITMIME": "", "SMTPUTF8": "", "DSN": ""}
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_RAW_TO_TERMINAL = (
    "show --raw writes the message as received, control characters included: "
    "redirect it to a file or pipe it into a program, not to a terminal"
)


class _UsageError(Exception):
    pass


def add_commands(subparsers: Any) -> None:
    """Add ``quarantine`` and its actions to the ``smtpguard`` command's subparsers.
    Each action sets ``run``, called with the parsed arguments; it returns the exit
    status."""
    # --config and --directory are accepted before the action and after it.
    where = argparse.ArgumentParser(add_help=False)
    choice = where.add_mutually_exclusive_group()
    choice.add_argument(
        "-c", "--config", metavar="FILE", default=argparse.SUPPRESS, help="the [quarantine] directory of this file"
    )
    choice.add_argument(
        "-d", "--directory", metavar="DIR", default=argparse.SUPPRESS, help="the quarantine directory itself"
    )
    quarantine = subparsers.add_parser(
        "quarantine", parents=[where], help="list, show, release or delete quarantined messages"
    )
    actions = quarantine.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list", parents=[where], help="one line per message: id, time, sender, recipients, verdict"
    )
    listing.set_defaults(run=list_entries)
    showing = actions.add_parser("show", parents=[where], help="what is known about a message, and its headers")
    showing.add_argument("id", metavar="ID")
    showing.add_argument("--raw", action="store_true", help="print the whole message as received instead")
    showing.set_defaults(run=show)
    releasing = actions.add_parser(
        "release", parents=[where], help="send a message, not scanned again, to its original recipients"
    )
    releasing.add_argument("id", metavar="ID")
    releasing.add_argument(
        "-u", "--upstream", metavar="ENDPOINT", help="the next hop (default: [upstream] endpoint of --config)"
    )
    releasing.set_defaults(run=release)
    deleting = actions.add_parser("delete", parents=[where], help="remove a message from the quarantine")
    deleting.add_argument("id", metavar="ID")
    deleting.set_defaults(run=delete)


def _open_store(arguments: argparse.Namespace, reactor: Any) -> Quarantine:
    path = getattr(arguments, "config", None)
    directory = getattr(arguments, "directory", None)
    if path is not None and directory is not None:
        raise _UsageError("give --config or --directory, not both")
    if path is not None:
        table = configuration.read_toml(path).get("quarantine")
        if table is None:
            raise ConfigError(f"{path}: quarantine: the file has no [quarantine] table")
        try:
            return build_quarantine(table, reactor)
        except ConfigError as error:
            raise ConfigError(f"{path}: quarantine.{error}") from None
    if directory is None:
        raise _UsageError("give --config FILE or --directory DIR")
    if not os.path.isdir(directory):
        raise ConfigError(f"{directory}: no such directory")
    return Quarantine(directory, reactor)


def _say(line: str, file: Any = None) -> None:
    """Print ``line`` as one line, its control characters (line breaks included) escaped."""
    print(printable(line), file=file or sys.stdout)


def _failed(error: Exception) -> int:
    _say(f"smtpguard quarantine: {error}", sys.stderr)
    return EXIT_USAGE if isinstance(error, _UsageError) else EXIT_FAILED


def list_entries(arguments: argparse.Namespace) -> int:
    """A table: id, time, sender, recipients, verdict; oldest first."""
    try:
        entries = _open_store(arguments, None).list()
    except (ConfigError, QuarantineError, _UsageError) as error:
        return _failed(error)
    rows: list[tuple[str, ...]] = [("ID", "TIME", "SENDER", "RECIPIENTS", "VERDICT")]
    # Escaped before the widths are measured, so the columns stay aligned.
    rows += [
        tuple(printable(cell) for cell in (e.id, e.time, f"<{e.sender}>", ",".join(e.recipients), e.status))
        for e in entries
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        _say("  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[4]]))
    return EXIT_OK


def describe(data: dict[str, Any]) -> list[str]:
    """An entry's metadata as ``name: value`` lines."""
    envelope = envelope_of(data)
    client = envelope.client
    lines = [
        ("id", data.get("id", "")),
        ("time", data.get("time", "")),
        ("transaction", data.get("transaction_id", "")),
        ("client", f"{client.namaddr} helo={client.helo or '-'} {client.protocol or '-'}"),
        *[("via", f"{hop.command} from [{hop.address}]:{hop.port}") for hop in (client.hop,) if hop is not None],
        ("mail", mail_arguments(envelope.sender, envelope.parameters, _ALL_EXTENSIONS)),
        *[("rcpt", rcpt_arguments(recipient, _ALL_EXTENSIONS)) for recipient in envelope.recipients],
        ("verdict", data.get("status", "")),
        ("scanner", data.get("scanner", "")),
        *[("threat", f"{t['name']} in {t['file']}" if t.get("file") else t["name"]) for t in data.get("threats", [])],
    ]
    if data.get("error"):
        lines.append(("error", f"{data['error']}: {data.get('detail', '')}"))
    decision = data.get("decision", {})
    lines.append(("decision", f"{decision.get('action', '')} ({decision.get('reason', '')})"))
    lines.append(("subject", data.get("subject", "")))
    lines.append(("size", str(data.get("size", ""))))
    return [f"{name + ':':13}{value}" for name, value in lines]


def show(arguments: argparse.Namespace) -> int:
    """The metadata and the header section of a message; with --raw the whole
    message, byte for byte."""
    try:
        store = _open_store(arguments, None)
        data = store.get(arguments.id)
        message = store.open(arguments.id)
    except (ConfigError, QuarantineError, _UsageError) as error:
        return _failed(error)
    try:
        if arguments.raw:
            if sys.stdout.isatty():
                return _failed(_UsageError(_RAW_TO_TERMINAL))
            for chunk in message.chunks():
                sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            return EXIT_OK
        try:
            lines = describe(data)
        except QuarantineError as error:
            return _failed(error)
        except (KeyError, TypeError, AttributeError) as error:
            return _failed(QuarantineError(f"{arguments.id}: the metadata is incomplete ({error!r})"))
        head = message.headers().decode("utf-8", "replace").split("\r\n")
        if head[-1] == "":
            del head[-1]  # the end of the last line, not a line
        for line in [*lines, "", *head]:
            _say(line)
    finally:
        message.close()
    return EXIT_OK


def delete(arguments: argparse.Namespace) -> int:
    try:
        _open_store(arguments, None).delete(arguments.id)
    except (ConfigError, QuarantineError, _UsageError) as error:
        return _failed(error)
    except OSError as error:
        return _failed(Exception(f"{arguments.id}: cannot delete: {error.strerror}"))
    _say(f"{arguments.id}: deleted")
    return EXIT_OK


def upstream_settings(arguments: argparse.Namespace) -> UpstreamSettings:
    """The next hop for a release: the configuration's ``[upstream]`` (with --upstream
    replacing its endpoint) or --upstream alone.  No connection is kept: the
    command sends one message and ends."""
    path = getattr(arguments, "config", None)
    if path is not None:
        data = configuration.read_toml(path)
        # [quarantine] has been checked by build_quarantine; parse checks the rest.
        rest = {key: value for key, value in data.items() if key != "quarantine"}
        if arguments.upstream:
            rest["upstream"] = {**rest.get("upstream", {}), "endpoint": arguments.upstream}
        settings = configuration.parse(rest, path).upstream
    elif arguments.upstream:
        settings = UpstreamSettings(arguments.upstream)
    else:
        raise _UsageError("release needs --upstream ENDPOINT, or --config FILE with an [upstream] endpoint")
    return attrs.evolve(settings, keep_connections=0)


def _reply_lines(reply: Reply) -> list[str]:
    return reply.to_bytes().decode("utf-8", "replace").split("\r\n")[:-1]


def release(arguments: argparse.Namespace) -> int:
    """Release through the next hop and print its reply: exit 0 on 250, 1 otherwise."""
    from twisted.internet.defer import Deferred, succeed
    from twisted.python.failure import Failure

    from smtpguard.running import run_until_done
    from smtpguard.upstream import Upstream

    def run(reactor: Any) -> Deferred[int]:
        try:
            store = _open_store(arguments, reactor)
            next_hop = Upstream(reactor, upstream_settings(arguments))
        except (ConfigError, _UsageError) as error:
            return succeed(_failed(error))
        except ValueError as error:  # clientFromString on a malformed endpoint
            return succeed(_failed(Exception(f"bad next hop endpoint: {error}")))

        def replied(reply: Reply) -> int:
            for line in _reply_lines(reply):
                _say(line)
            return EXIT_OK if reply.code == 250 else EXIT_FAILED

        def failed(failure: Failure) -> int:
            failure.trap(QuarantineError)
            return _failed(failure.value)  # type: ignore[arg-type]

        return store.release(arguments.id, next_hop).addCallbacks(replied, failed)

    return run_until_done(run, EXIT_FAILED)
