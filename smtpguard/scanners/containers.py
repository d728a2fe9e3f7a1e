"""Opens the archives and compressed files that a message carries, one member at a
time: zip (also behind a prefix, and with entries that only a local header lists),
gzip, bzip2, xz, lzma and tar.  Every decompressor is fed a small step of input and
asked for a bounded amount of output, so what a member expands to is read like a
file, never held whole.  7z and RAR archives are recognised and not opened.

A container that cannot be read raises :class:`ContainerError`, whose ``kind`` is the
scan error it is; nothing here ever answers "nothing inside" for what it could not read.
"""

from __future__ import annotations

import bz2
import enum
import lzma
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import IO, Any, cast

from smtpguard.results import ErrorKind
from smtpguard.scanners.streams import (
    INPUT_STEP,
    LZMA_MEMORY,
    Bounds,
    ChunkReader,
    ContainerError,
    Decoder,
    Decompressing,
    Inflate,
    Member,
    Readable,
)
from smtpguard.scanners.ziparchive import TAIL as ZIP_TAIL
from smtpguard.scanners.ziparchive import ZipReader, ZipScout, ends_like_zip, holds_zip

__all__ = [
    "STREAMED",
    "ZIP_TAIL",
    "Bounds",
    "ChunkReader",
    "ContainerError",
    "Format",
    "Member",
    "Readable",
    "ZipScout",
    "ends_like_zip",
    "holds_zip",
    "members",
    "sniff",
]

# tarfile reads an extended header (a long name, pax records) whole.
MAX_TAR_HEADER = 1024 * 1024
_TAR_EXTENDED = {
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
}


class Format(enum.Enum):
    ZIP = "zip"
    GZIP = "gzip"
    BZIP2 = "bzip2"
    XZ = "xz"
    LZMA = "lzma"
    TAR = "tar"
    SEVEN_ZIP = "7z"
    RAR = "rar"
    MESSAGE = "message"  # an attached message: the walker parses it itself


# Opened as they stream by; the others need the whole file at hand (a zip's directory
# is at its end).
STREAMED = frozenset({Format.GZIP, Format.BZIP2, Format.XZ, Format.LZMA, Format.TAR})

# Why these are not opened (see docs/scanners/builtin.md): a decompress-layer error.
_NOT_OPENED = {
    Format.RAR: "RAR archive: not opened (smtpguard has no RAR decoder)",
    Format.SEVEN_ZIP: "7z archive: not opened (no 7z decoder whose memory use can be bounded)",
}

# What a compressed file's member is called when the file does not say: its own name
# less the suffix (a .tgz holds a .tar).
_SUFFIXES = {
    Format.GZIP: ((".tgz", ".tar"), (".taz", ".tar"), (".gz", ""), (".gzip", ""), (".z", "")),
    Format.BZIP2: ((".tbz2", ".tar"), (".tbz", ".tar"), (".tb2", ".tar"), (".bz2", ""), (".bz", "")),
    Format.XZ: ((".txz", ".tar"), (".xz", "")),
    Format.LZMA: ((".tlz", ".tar"), (".lzma", "")),
}
_UNNAMED = "(decompressed)"


# -- telling what a file is ------------------------------------------------------------


def sniff(head: bytes, name: str = "") -> Format | None:
    """The container format ``head`` (a file's first bytes) starts like, by its magic
    bytes whatever its name (lzma, which has none, also by its name)."""
    if head.startswith(b"\x1f\x8b\x08"):
        return Format.GZIP
    if head.startswith(b"BZh") and head[3:4] in b"123456789" and head[4:10] in (b"1AY&SY", b"\x17rE8P\x90"):
        return Format.BZIP2
    if head.startswith(b"\xfd7zXZ\x00"):
        return Format.XZ
    if head.startswith(b"7z\xbc\xaf\x27\x1c"):
        return Format.SEVEN_ZIP
    if head.startswith(b"Rar!\x1a\x07"):
        return Format.RAR
    if _is_tar(head):
        return Format.TAR
    if _is_lzma(head, name):
        return Format.LZMA
    return None


def _is_tar(head: bytes) -> bool:
    """A tar header: the ustar magic, or (old tar has none) a checksum that adds up."""
    if len(head) < tarfile.BLOCKSIZE:
        return False
    if head[257:262] == b"ustar":
        return True
    field = head[148:156].strip(b" \x00")
    if not field or field.strip(b"01234567"):
        return False
    # The checksum is the sum of the header's bytes, its own field counted as blanks.
    return int(field, 8) == sum(head[:148]) + 8 * 32 + sum(head[156 : tarfile.BLOCKSIZE])


def _is_lzma(head: bytes, name: str) -> bool:
    """An lzma ("LZMA alone") header: the default properties byte and an unknown size,
    as lzma and xz --format=lzma write it, or valid properties in a file named so."""
    if len(head) < 13 or head[0] >= 9 * 5 * 5:
        return False
    return (head[0] == 0x5D and head[5:13] == b"\xff" * 8) or name.lower().endswith((".lzma", ".tlz"))


def _inner_name(name: str, format: Format) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    for suffix, replacement in _SUFFIXES.get(format, ()):
        if base.lower().endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)] + replacement
    return _UNNAMED


# -- gzip, bzip2, xz, lzma ------------------------------------------------------------------


def _lzma_decoder(format: int) -> lzma.LZMADecompressor:
    return lzma.LZMADecompressor(format, memlimit=LZMA_MEMORY)


_STREAMS: dict[Format, tuple[bytes, Callable[[], Decoder]]] = {
    Format.GZIP: (b"\x1f\x8b", lambda: Inflate(16 + zlib.MAX_WBITS)),
    Format.BZIP2: (b"BZh", bz2.BZ2Decompressor),
    Format.XZ: (b"\xfd7zXZ\x00", lambda: _lzma_decoder(lzma.FORMAT_XZ)),
    Format.LZMA: (b"", lambda: _lzma_decoder(lzma.FORMAT_ALONE)),
}


def _gzip_name(head: bytes) -> str:
    """The file name a gzip header carries (FNAME), or ""."""
    flags = head[3] if len(head) > 3 else 0
    at = 10
    if flags & 0x04:  # FEXTRA
        at += 2 + int.from_bytes(head[at : at + 2], "little")
    if not flags & 0x08 or at > len(head):  # no FNAME
        return ""
    end = head.find(b"\x00", at)
    return head[at:end].decode("latin-1") if end > at else ""


def _compressed_members(format: Format, source: Readable, name: str, bounds: Bounds) -> Iterator[Member]:
    """The one member of a gzip, bzip2, xz or lzma file: what it decompresses to."""
    magic, decoder = _STREAMS[format]

    def restart(rest: bytes) -> Decoder | None:
        return decoder() if magic and rest.startswith(magic) else None

    head = source.read(INPUT_STEP)
    inner = (_gzip_name(head) if format is Format.GZIP else "") or _inner_name(name, format)
    yield Member(inner, Decompressing(source.read, decoder(), bounds, format.value, restart=restart, pending=head))


# -- tar ---------------------------------------------------------------------------------


class _TarHeaderTooLarge(tarfile.HeaderError):
    pass


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses an extended header larger than MAX_TAR_HEADER, which tarfile would
    read whole."""

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _TAR_EXTENDED and self.size > MAX_TAR_HEADER:
            raise _TarHeaderTooLarge(f"an extended header of {self.size} bytes, more than {MAX_TAR_HEADER}")
        return cast(tarfile.TarInfo, super()._proc_member(archive))  # type: ignore[misc]


def _tar_error(error: tarfile.TarError) -> ContainerError:
    if isinstance(error, _TarHeaderTooLarge):
        return ContainerError(ErrorKind.CONTENT_SIZE, str(error))
    return ContainerError(ErrorKind.CORRUPT_FILE, f"not a readable tar archive: {error}")


class _TarMember:
    """A tar member's contents, whose read errors are container errors."""

    def __init__(self, contents: IO[bytes]) -> None:
        self._contents = contents

    def read(self, size: int = -1, /) -> bytes:
        try:
            return self._contents.read(size)
        except tarfile.TarError as error:
            raise _tar_error(error) from None


def _tar_members(source: Readable) -> Iterator[Member]:
    """A tar archive's entries, read as the archive streams by (no seeking back)."""
    try:
        archive = tarfile.open(fileobj=cast(IO[bytes], source), mode="r|", tarinfo=_BoundedTarInfo)
    except tarfile.TarError as error:
        raise _tar_error(error) from None
    with archive:
        while True:
            try:
                info = archive.next()
                contents = archive.extractfile(info) if info is not None and info.isreg() else None
            except tarfile.TarError as error:
                raise _tar_error(error) from None
            if info is None:
                return
            yield Member(info.name, _TarMember(contents) if contents is not None else None)


# -- all together ------------------------------------------------------------------------


def members(format: Format, source: Any, name: str, bounds: Bounds, embedded: bool = False) -> Iterator[Member]:
    """The members of the ``format`` container in ``source`` (a seekable file for a zip,
    anything readable for the others), one after the other: each must be read before
    the next is asked for.  Raises :class:`ContainerError` when the container cannot be
    read, at once or after the members that could.  ``embedded``: a zip found inside
    another file, whose unreadable parts are no error (the signature may be chance)."""
    if format is Format.ZIP:
        return ZipReader(source, bounds, embedded).members()
    if format is Format.TAR:
        return _tar_members(source)
    if format in _STREAMS:
        return _compressed_members(format, source, name, bounds)
    raise ContainerError(ErrorKind.DECOMPRESS_LAYER, _NOT_OPENED.get(format, f"{format.value}: not a container"))
