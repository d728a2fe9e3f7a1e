"""ClamAV's clamd protocol without I/O: how INSTREAM data is framed and what clamd's
replies mean, as scan results."""

from __future__ import annotations

import re
import struct

import attrs

from smtpguard.results import ErrorKind, ScanResult, Threat

INSTREAM = b"zINSTREAM\0"
PING = b"zPING\0"
PONG = b"PONG"
END_OF_STREAM = struct.pack(">I", 0)
# clamd's own default StreamMaxLength.
DEFAULT_STREAM_MAX_LENGTH = 25 * 1024 * 1024
# Real replies are a few hundred bytes; anything this long is not clamd talking.
MAX_REPLY = 64 * 1024

_SIZE = re.compile(r"\s*(\d+)\s*([kKmM]?)\s*")
_UNITS = {"": 1, "k": 1024, "m": 1024 * 1024}


def chunk_header(length: int) -> bytes:
    """The 4-byte big-endian length that precedes each INSTREAM chunk."""
    return struct.pack(">I", length)


def parse_size(value: int | str) -> int:
    """A byte count written as clamd.conf writes it: ``26214400``, ``"25M"``, ``"512K"``.

    @raise ValueError: for anything else.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        return value
    found = _SIZE.fullmatch(value)
    if found is None:
        raise ValueError(f"not a size: {value!r}")
    return int(found.group(1)) * _UNITS[found.group(2).lower()]


@attrs.frozen
class Reply:
    """What clamd sent on one connection: its complete (null-terminated) lines, and
    any bytes after the last terminator."""

    lines: tuple[str, ...]
    rest: bytes = b""


def split_reply(data: bytes) -> Reply:
    *complete, rest = data.split(b"\0")
    return Reply(tuple(line.decode("utf-8", "replace").strip() for line in complete), rest)


# Heuristics.Limits.Exceeded.<limit>: clamd stopped looking before the end.
_LIMITS = {
    "MaxRecursion": ErrorKind.DECOMPRESS_LAYER,
    "MaxFiles": ErrorKind.DECOMPRESS_LAYER,
    "MaxFileSize": ErrorKind.CONTENT_SIZE,
    "MaxScanSize": ErrorKind.CONTENT_SIZE,
    "MaxScanTime": ErrorKind.TIMEOUT,
}


def heuristic_kind(name: str) -> ErrorKind | None:
    """The error a detection name stands for, or None for a real threat.

    With AlertExceedsMax, AlertEncrypted* and AlertBroken* clamd reports the limits it
    hit, the content it could not decrypt and the files it found broken as FOUND:
    those are reasons the message could not be scanned, not viruses.
    """
    if name.startswith("Heuristics.Limits.Exceeded."):
        limit = name.removeprefix("Heuristics.Limits.Exceeded.").split(".")[0]
        # The remaining limits (MaxEmbeddedPE, MaxPartitions, MaxRecHWP3 ...) stop
        # the decoding of nested structures.
        return _LIMITS.get(limit, ErrorKind.DECOMPRESS_LAYER)
    if name.startswith("Heuristics.Encrypted."):
        return ErrorKind.PASSWORD_PROTECTED
    if name.startswith("Heuristics.Broken."):
        return ErrorKind.CORRUPT_FILE
    return None


# clamd's ERROR texts (its own and libclamav's cl_strerror), first match wins.
_ERRORS: tuple[tuple[re.Pattern[str], ErrorKind], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), kind)
    for pattern, kind in (
        (r"size limit exceeded|max scan size|file size limit", ErrorKind.CONTENT_SIZE),
        (r"max recursion|recursion limit|max scan files|files number limit", ErrorKind.DECOMPRESS_LAYER),
        (r"time limit|timed out", ErrorKind.TIMEOUT),
        (
            r"allocate memory|into memory|temporary (file|directory)|write to (temporary )?file",
            ErrorKind.OUT_OF_RESOURCES,
        ),
        (r"mutex lock", ErrorKind.OUT_OF_RESOURCES),
        (r"corrupt|bad format or broken|can't unpack|can't parse", ErrorKind.CORRUPT_FILE),
        (r"encrypted|password", ErrorKind.PASSWORD_PROTECTED),
        (r"still active|bad state", ErrorKind.ENGINE_NOT_READY),
    )
)


def error_kind(text: str) -> ErrorKind:
    """The kind of an ERROR reply's text, e.g. ``INSTREAM size limit exceeded.``."""
    for pattern, kind in _ERRORS:
        if pattern.search(text):
            return kind
    return ErrorKind.OTHER


_FOUND = re.compile(r"stream: (?P<name>\S.*?) FOUND")
# The text ends in a non-blank (or is empty): a lazy text followed by "\s*" would try
# every split of a run of blanks, quadratic in its length.
_ERROR = re.compile(r"(?:stream: )?(?P<text>(?:.*\S)?)\s*ERROR")


def classify(reply: Reply, scanner: str) -> ScanResult:
    """The scan result for clamd's whole answer to one INSTREAM.

    ``stream: OK`` alone is clean; ``stream: NAME FOUND`` lines (several with
    ALLMATCHSCAN or HeuristicScanPrecedence) are threats, except the heuristic
    names that mean clamd could not finish (see :func:`heuristic_kind`); an
    ``... ERROR`` line is classified by its text. Real threats win over errors.
    Anything else, an empty answer included, is an ``other`` error: never clean.
    """
    if reply.rest:
        return ScanResult.failed(ErrorKind.OTHER, f"unexpected reply from clamd: {_show(reply.rest)}", scanner)
    if not reply.lines:
        return ScanResult.failed(ErrorKind.OTHER, "clamd closed the connection without a reply", scanner)
    threats: list[Threat] = []
    errors: list[tuple[ErrorKind, str]] = []
    for line in reply.lines:
        found = _FOUND.fullmatch(line)
        failed = _ERROR.fullmatch(line)
        if line == "stream: OK":
            continue
        if found is not None:
            name = found.group("name")
            kind = heuristic_kind(name)
            if kind is None:
                threats.append(Threat(name))
            else:
                errors.append((kind, name))
        elif failed is not None:
            errors.append((error_kind(failed.group("text")), failed.group("text") or line))
        else:
            errors.append((ErrorKind.OTHER, f"unexpected reply from clamd: {_show(line)}"))
    if threats:
        return ScanResult.infected(tuple(threats), scanner)
    if errors:
        kind, detail = errors[0]
        return ScanResult.failed(kind, detail, scanner)
    return ScanResult.clean(scanner)


def _show(text: str | bytes, limit: int = 200) -> str:
    shown = repr(text[:limit])
    return shown + "..." if len(text) > limit else shown
