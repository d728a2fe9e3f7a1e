"""What the built-in scanner looks for: the EICAR test file, SHA-256 digests of whole
files and byte patterns, read from the user's lists and matched on streams of bytes."""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from collections.abc import Iterable, Mapping

import attrs

from smtpguard.results import Threat

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_NAME = "Eicar-Test-Signature"

# A pattern this short would match nearly every message: a typo, not a signature.
MIN_PATTERN_LENGTH = 4

# Beyond this many patterns, looking for each in base64 text costs more than decoding it.
MAX_BASE64_PATTERNS = 8

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")


class SignatureError(ValueError):
    """A line of a signature list cannot be used; the message says which and why."""


@attrs.frozen
class Pattern:
    """A byte string whose presence anywhere in a file is a threat called ``name``."""

    name: str
    data: bytes


@attrs.frozen
class Signatures:
    """The digests (lower-case hex SHA-256 -> threat name) and byte patterns to find.
    The EICAR test file is always among the patterns."""

    digests: Mapping[str, str] = attrs.field(factory=dict)
    patterns: tuple[Pattern, ...] = (Pattern(EICAR_NAME, EICAR),)

    @classmethod
    def build(cls, digests: Mapping[str, str] = {}, patterns: Iterable[Pattern] = ()) -> Signatures:
        return cls(dict(digests), (Pattern(EICAR_NAME, EICAR), *patterns))


def _lines(lines: Iterable[str]) -> Iterable[tuple[int, str]]:
    """Numbered lines without blanks and ``#`` comments."""
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if text and not text.startswith("#"):
            yield number, text


def parse_digests(lines: Iterable[str]) -> dict[str, str]:
    """``hex-sha256 name`` lines (``sha256sum`` output reads the same) -> {digest: name}."""
    digests: dict[str, str] = {}
    for number, text in _lines(lines):
        digest, _, name = text.partition(" ")
        name = name.strip()
        if not _SHA256.fullmatch(digest):
            raise SignatureError(f"line {number}: {digest!r} is not a SHA-256 digest (64 hex digits)")
        if not name:
            raise SignatureError(f"line {number}: a name must follow the digest")
        digests[digest.lower()] = name
    return digests


def parse_pattern(text: str) -> Pattern:
    """One pattern: ``NAME:HEX``, ``NAME:"literal text"`` or a ClamAV ``.ndb`` line
    ``NAME:TARGET:*:HEX`` (any offset, no wildcards)."""
    name, colon, value = text.partition(":")
    name = name.strip()
    if not colon or not name:
        raise SignatureError(f"{text!r} is not NAME:PATTERN")
    if len(value) >= 2 and value.startswith('"') and value.endswith('"'):
        data = value[1:-1].encode("utf-8")
    else:
        fields = value.split(":")
        if len(fields) == 3:
            _target, offset, value = fields
            if offset.strip() != "*":
                raise SignatureError(f"{name}: only patterns at any offset (*) are supported, got {offset!r}")
        elif len(fields) != 1:
            raise SignatureError(f'{text!r} is neither NAME:HEX, NAME:"TEXT" nor NAME:TARGET:*:HEX')
        value = value.strip()
        if not _HEX.fullmatch(value):
            raise SignatureError(f"{name}: {value!r} is not an even number of hex digits (wildcards are not supported)")
        data = bytes.fromhex(value)
    if len(data) < MIN_PATTERN_LENGTH:
        raise SignatureError(f"{name}: a pattern needs at least {MIN_PATTERN_LENGTH} bytes")
    return Pattern(name, data)


def parse_patterns(lines: Iterable[str]) -> tuple[Pattern, ...]:
    """Pattern lines (see :func:`parse_pattern`); blanks and ``#`` comments skipped."""
    patterns = []
    for number, text in _lines(lines):
        try:
            patterns.append(parse_pattern(text))
        except SignatureError as error:
            raise SignatureError(f"line {number}: {error}") from None
    return tuple(patterns)


class Matcher:
    """Looks at one file as it streams by: its patterns (across chunk boundaries too)
    and, when ``digest`` is true and there are digests to compare, its SHA-256.
    Threats go to ``found`` as they are seen; the digest's on :meth:`close`."""

    def __init__(
        self, signatures: Signatures, path: str, found: list[Threat], patterns: bool = True, digest: bool = True
    ) -> None:
        self._path = path
        self._found = found
        self._signatures = signatures
        self._pending = list(signatures.patterns) if patterns else []
        self._overlap = max((len(pattern.data) for pattern in self._pending), default=1) - 1
        self._tail = b""
        self._hash = hashlib.sha256() if digest and signatures.digests else None

    def update(self, data: bytes) -> None:
        if self._hash is not None:
            self._hash.update(data)
        if not self._pending:
            return
        for pattern in list(self._pending):
            needed = len(pattern.data) - 1
            # The boundary window is small: the data itself is searched in place, not copied.
            if pattern.data in data or (needed and pattern.data in self._tail[-needed:] + data[:needed]):
                self._found.append(Threat(pattern.name, self._path))
                self._pending.remove(pattern)
        if len(data) >= self._overlap:
            self._tail = data[len(data) - self._overlap :] if self._overlap else b""
        else:
            self._tail = (self._tail + data)[-self._overlap :]

    def close(self) -> None:
        if self._hash is not None:
            name = self._signatures.digests.get(self._hash.hexdigest())
            if name is not None:
                self._found.append(Threat(name, self._path))
            self._hash = None


@functools.lru_cache(maxsize=16)
def base64_forms(patterns: tuple[Pattern, ...]) -> tuple[bytes, ...] | None:
    """What base64 text must contain to decode to bytes holding one of ``patterns``.

    Decoded bytes come in groups of three from four characters.  A pattern starts 0, 1
    or 2 bytes before a group boundary; from there on, its whole groups are encoded
    as fixed characters.  So unpadded base64 text (one run of groups) that holds none
    of these three encodings of any pattern cannot decode to a pattern.  None when a
    pattern is too short to have a whole group at every start (or there are too many
    patterns for the search to pay).
    """
    if len(patterns) > MAX_BASE64_PATTERNS:
        return None
    forms = []
    for pattern in patterns:
        for start in range(3):
            groups = pattern.data[start:]
            groups = groups[: len(groups) // 3 * 3]
            if not groups:
                return None
            forms.append(base64.b64encode(groups))
    return tuple(forms)


class Inspection:
    """The threats found in one message; hands out a :class:`Matcher` per file."""

    def __init__(self, signatures: Signatures) -> None:
        self.signatures = signatures
        self.threats: list[Threat] = []
        self._base64_forms = None if signatures.digests else base64_forms(signatures.patterns)

    def may_match_base64(self, text: bytes) -> bool:
        """Whether base64 ``text`` (its alphabet only, no "=") can decode to a file with a
        pattern in it or a listed digest: always, when there are digests to compare."""
        if self._base64_forms is None:
            return True
        return any(form in text for form in self._base64_forms)

    def file(self, path: str) -> Matcher:
        """A file's contents: patterns and digest."""
        return Matcher(self.signatures, path, self.threats)

    def container(self, path: str) -> Matcher:
        """An archive or attached message whose contents are inspected one by one:
        only its digest (its members get the patterns)."""
        return Matcher(self.signatures, path, self.threats, patterns=False)
