"""The built-in scanner's containers: gzip, bzip2, xz, lzma and tar, zip behind a prefix
and zip entries only a local header lists (each an evasion of the scanner before
them), the archives it does not open, and the limits every container is held to,
bombs included: each stops at its limit, counted in bytes decompressed."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable

import pytest

from smtpguard.results import ErrorKind, ScanResult
from smtpguard.scanners import streams
from smtpguard.scanners.builtin import EICAR, BuiltinScanner
from smtpguard.scanners.containers import MAX_TAR_HEADER
from smtpguard.scanners.mimewalk import CHUNK_SIZE, Limits
from smtpguard.scanners.streams import INPUT_STEP, LZMA_MEMORY
from tests.test_builtin import (
    attachment,
    build,
    count_reads,
    eicar_in,
    mail,
    multipart,
    scan,
    spooled,
    text,
    zipped,
)

LIMIT = Limits().max_expanded_size
MIB = 1024 * 1024

# -- building containers ------------------------------------------------------------------


def attached(data: bytes, name: bytes) -> bytes:
    """A message of a text part and ``data`` as a base64 attachment called ``name``."""
    return mail(multipart(text(), attachment(data, name)))


def gzipped(data: bytes, name: str = "") -> bytes:
    """``data`` in a gzip file, with ``name`` in its header (FNAME) when given."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename=name, mode="wb", fileobj=buffer, mtime=0) as writer:
        writer.write(data)
    return buffer.getvalue()


def tarred(members: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:  # type: ignore[call-overload]
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def deflated(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def repeated_deflate(segment: bytes, times: int) -> tuple[bytes, int]:
    """Raw deflate data of ``segment`` repeated ``times`` times, and its CRC-32, made
    without compressing it all: a full flush after each copy makes every copy's
    deflated bytes the same, so one copy's serve for all."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    first = compressor.compress(segment) + compressor.flush(zlib.Z_FULL_FLUSH)
    second = compressor.compress(segment) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert first == second
    crc = 0
    for _ in range(times):
        crc = zlib.crc32(segment, crc)
    return first * times + compressor.flush(), crc


def repeated_gzip(segment: bytes, times: int) -> bytes:
    """A gzip file of ``segment`` repeated ``times`` times (see :func:`repeated_deflate`)."""
    data, crc = repeated_deflate(segment, times)
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + data + struct.pack("<2L", crc, len(segment) * times % 2**32)


Entry = tuple[str, int, bytes, int, int]  # name, method, compressed data, CRC-32, size


def entry(name: str, data: bytes, method: int = zipfile.ZIP_DEFLATED) -> Entry:
    compressed = deflated(data) if method == zipfile.ZIP_DEFLATED else data
    return name, method, compressed, zlib.crc32(data), len(data)


def raw_zip(entries: list[Entry], listed: set[str] | None = None, described: bool = False) -> bytes:
    """A zip of ``entries`` whose central directory lists only those in ``listed``
    (all when None); ``described``: sizes and CRC in a data descriptor after the
    data, not in the local header (what a writer that cannot seek back does)."""
    body: list[bytes] = []
    directory: list[bytes] = []
    offset = 0
    flags = 0x08 if described else 0
    for name, method, compressed, crc, size in entries:
        sizes = (crc, len(compressed), size)
        encoded = name.encode()
        local_sizes = (0, 0, 0) if described else sizes
        local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, flags, method, 0, 0, *local_sizes, len(encoded), 0)
        descriptor = struct.pack("<4s3L", b"PK\x07\x08", *sizes) if described else b""
        if listed is None or name in listed:
            central = (b"PK\x01\x02", 20, 20, flags, method, 0, 0, *sizes, len(encoded), 0, 0, 0, 0, 0, offset)
            directory.append(struct.pack("<4s6H3L5H2L", *central) + encoded)
        body.append(local + encoded + compressed + descriptor)
        offset += len(body[-1])
    listing = b"".join(directory)
    count = min(len(directory), 0xFFFF)  # more would need zip64 records
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, len(listing), offset, 0)
    return b"".join(body) + listing + end


# A self-extracting archive: the extractor's code, then the zip it unpacks.
STUB = b"MZ\x90\x00" + b"This program cannot be run in DOS mode.\r\n" + bytes(4000)


def self_extracting(members: dict[str, bytes]) -> bytes:
    return STUB + zipped(members)


def hidden_entry_zip() -> bytes:
    """A zip of readme.txt and eicar.com whose central directory lists only readme.txt."""
    return raw_zip([entry("readme.txt", b"nothing to see\r\n"), entry("eicar.com", EICAR)], listed={"readme.txt"})


def content_size(detail: str) -> ScanResult:
    return ScanResult.failed(ErrorKind.CONTENT_SIZE, detail, "builtin")


# -- EICAR in every container (each an evasion of the scanner before them) ------------------

EVASIONS = [
    pytest.param(gzipped(EICAR), b"eicar.com.gz", "eicar.com.gz/eicar.com", id="gzip"),
    pytest.param(gzipped(EICAR, "tool.com"), b"download.gz", "download.gz/tool.com", id="gzip-named-in-its-header"),
    pytest.param(gzipped(b"hello\r\n") + gzipped(EICAR), b"two.gz", "two.gz/two", id="gzip-second-member"),
    pytest.param(bz2.compress(EICAR), b"eicar.com.bz2", "eicar.com.bz2/eicar.com", id="bzip2"),
    # Compressible, or xz stores it as it is.
    pytest.param(lzma.compress(EICAR + b"\r\n" * 100), b"eicar.com.xz", "eicar.com.xz/eicar.com", id="xz"),
    pytest.param(
        lzma.compress(EICAR, lzma.FORMAT_ALONE), b"eicar.com.lzma", "eicar.com.lzma/eicar.com", id="lzma-alone"
    ),
    pytest.param(
        tarred({"docs/eicar.com.gz": gzipped(EICAR)}), b"docs.tar", "docs.tar/docs/eicar.com.gz/eicar.com", id="tar"
    ),
    pytest.param(
        tarred({"docs/eicar.com": EICAR}, "w:gz"), b"docs.tar.gz", "docs.tar.gz/docs.tar/docs/eicar.com", id="tar.gz"
    ),
    pytest.param(tarred({"eicar.com": EICAR}, "w:gz"), b"docs.tgz", "docs.tgz/docs.tar/eicar.com", id="tgz"),
    pytest.param(tarred({"eicar.com": EICAR}, "w:bz2"), b"d.tar.bz2", "d.tar.bz2/d.tar/eicar.com", id="tar.bz2"),
    pytest.param(tarred({"eicar.com": EICAR}, "w:xz"), b"d.tar.xz", "d.tar.xz/d.tar/eicar.com", id="tar.xz"),
    pytest.param(self_extracting({"eicar.com": EICAR}), b"setup.exe", "setup.exe/eicar.com", id="zip-behind-a-prefix"),
    pytest.param(
        zipped({"setup.exe": self_extracting({"eicar.com": EICAR})}),
        b"tools.zip",
        "tools.zip/setup.exe/eicar.com",
        id="zip-behind-a-prefix-in-a-zip",
    ),
    pytest.param(
        gzipped(self_extracting({"eicar.com": EICAR})),
        b"setup.exe.gz",
        "setup.exe.gz/setup.exe/eicar.com",
        id="zip-behind-a-prefix-in-a-gzip",
    ),
    pytest.param(hidden_entry_zip(), b"files.zip", "files.zip/eicar.com", id="zip-entry-only-in-a-local-header"),
    pytest.param(
        STUB + hidden_entry_zip(), b"setup.exe", "setup.exe/eicar.com", id="local-header-only-behind-a-prefix"
    ),
    pytest.param(
        raw_zip([entry("readme.txt", b"hi\r\n"), entry("eicar.com", EICAR)], listed={"readme.txt"}, described=True),
        b"stream.zip",
        "stream.zip/eicar.com",
        id="local-header-only-with-a-data-descriptor",
    ),
    pytest.param(
        raw_zip([entry("eicar.com", EICAR, zipfile.ZIP_STORED), entry("b", b"b")], listed={"b"}, described=True),
        b"stream.zip",
        "stream.zip/eicar.com",
        id="local-header-only-stored-with-a-data-descriptor",
    ),
    pytest.param(
        zipped({"eicar.com": EICAR}, zipfile.ZIP_BZIP2)[:-22], b"cut.zip", "cut.zip/eicar.com", id="zip-without-end"
    ),
]


@pytest.mark.parametrize(("data", "name", "file"), EVASIONS)
def test_regression_eicar_is_found_inside_the_container(data: bytes, name: bytes, file: str) -> None:
    """EICAR deflated, bzip2ed or lzma'd inside a container that mail clients, gunzip,
    tar or 7-Zip open, which the built-in scanner used to answer clean for (or, for a
    zip cut before its central directory, corrupt-file): found and named by its path."""
    assert scan(attached(data, name)) == eicar_in(file)


def test_zip_cut_before_its_directory_is_corrupt_once_its_entries_are_read() -> None:
    """A zip whose central directory is gone, holding a clean entry: the entry is read
    from its local header, and the archive is corrupt-file, never clean."""
    archive = zipped({"readme.txt": b"nothing to see\r\n"})
    result = scan(attached(archive[: archive.index(b"PK\x01\x02")], b"cut.zip"))
    assert result == ScanResult.failed(
        ErrorKind.CORRUPT_FILE,
        "cut.zip: its central directory cannot be read: no end of central directory record",
        "builtin",
    )


def test_entries_inside_a_listed_entry_are_not_taken_for_hidden_ones() -> None:
    """A stored zip inside a zip: its local headers lie within the outer entry's data,
    so they are read once, as the inner archive's members, not as hidden entries of
    the outer one."""
    inner = zipped({"eicar.com": EICAR})
    result = scan(attached(zipped({"inner.zip": inner}, zipfile.ZIP_STORED), b"outer.zip"))
    assert result == eicar_in("outer.zip/inner.zip/eicar.com")


def test_a_zip_signature_in_a_plain_file_is_no_error() -> None:
    """A file that happens to hold the local header signature, followed by nothing that
    reads as an entry: clean (not a damaged archive)."""
    assert scan(attached(b"MZ" + bytes(100) + b"PK\x03\x04" + bytes(100), b"tool.exe")) == ScanResult.clean("builtin")


def test_gzip_bytes_after_the_last_member_are_ignored() -> None:
    """Zeros and junk after a gzip file's data are ignored, as gunzip ignores them."""
    assert scan(attached(gzipped(b"hello\r\n") + bytes(600) + b"junk", b"x.gz")) == ScanResult.clean("builtin")


def test_name_of_a_gzip_file_without_a_suffix() -> None:
    """A gzip file that neither says its member's name nor has a known suffix: the
    member is "(decompressed)"."""
    assert scan(attached(gzipped(EICAR), b"invoice.pdf")) == eicar_in("invoice.pdf/(decompressed)")


def test_each_container_is_a_layer() -> None:
    """max_depth 1: the gzip layer of a .tar.gz is opened, the tar inside it is not."""
    result = scan(attached(tarred({"a.txt": b"a"}, "w:gz"), b"a.tar.gz"), limits=Limits(max_depth=1))
    assert result == ScanResult.failed(
        ErrorKind.DECOMPRESS_LAYER, "a.tar.gz/a.tar: more than 1 nested layers", "builtin"
    )


def test_zip_behind_a_prefix_counts_as_a_layer() -> None:
    """max_depth 1 and a self-extractor inside a zip: the zip in it is one layer too many."""
    data = zipped({"setup.exe": self_extracting({"a.txt": b"a"})})
    result = scan(attached(data, b"tools.zip"), limits=Limits(max_depth=1))
    assert result == ScanResult.failed(
        ErrorKind.DECOMPRESS_LAYER, "tools.zip/setup.exe: more than 1 nested layers", "builtin"
    )


# -- what cannot be opened ------------------------------------------------------------------

RAR = b"Rar!\x1a\x07\x00" + bytes(64)
SEVEN_ZIP = b"7z\xbc\xaf\x27\x1c\x00\x04" + bytes(64)


@pytest.mark.parametrize(
    ("data", "name", "kind", "detail"),
    [
        pytest.param(
            RAR,
            b"a.rar",
            ErrorKind.DECOMPRESS_LAYER,
            "a.rar: RAR archive: not opened (smtpguard has no RAR decoder)",
            id="rar",
        ),
        pytest.param(
            SEVEN_ZIP,
            b"a.7z",
            ErrorKind.DECOMPRESS_LAYER,
            "a.7z: 7z archive: not opened (no 7z decoder whose memory use can be bounded)",
            id="7z",
        ),
        pytest.param(
            gzipped(b"hello " * 100)[:-20],
            b"a.gz",
            ErrorKind.CORRUPT_FILE,
            "a.gz/a: gzip data cut short",
            id="gzip-cut",
        ),
        pytest.param(
            gzipped(b"hello")[:-8] + b"\x00\x00\x00\x00\x05\x00\x00\x00",
            b"a.gz",
            ErrorKind.CORRUPT_FILE,
            "a.gz/a: gzip data: Error -3 while decompressing data: incorrect data check",
            id="gzip-bad-crc",
        ),
        pytest.param(
            bz2.compress(b"hello " * 100)[:-10],
            b"a.bz2",
            ErrorKind.CORRUPT_FILE,
            "a.bz2/a: bzip2 data cut short",
            id="bzip2-cut",
        ),
        pytest.param(
            lzma.compress(b"hello")[:-30] + bytes(30),
            b"a.xz",
            ErrorKind.CORRUPT_FILE,
            "a.xz/a: xz data: Corrupt input data",
            id="xz-damaged",
        ),
        pytest.param(
            tarred({"a.txt": b"a" * 2000})[:1500],
            b"a.tar",
            ErrorKind.CORRUPT_FILE,
            "a.tar/a.txt: not a readable tar archive: unexpected end of data",
            id="tar-cut",
        ),
        pytest.param(
            raw_zip([entry("a.txt", b"a", 9)]),
            b"a.zip",
            ErrorKind.CORRUPT_FILE,
            "a.zip/a.txt: compression method 9 is not supported",
            id="zip-deflate64",
        ),
    ],
)
def test_a_container_that_cannot_be_read_is_a_classified_error(
    data: bytes, name: bytes, kind: ErrorKind, detail: str
) -> None:
    """RAR and 7z archives (not opened), and damaged gzip, bzip2, xz, tar and zip
    files: an error of the kind the docs name, its detail naming the file and the
    problem; never clean."""
    assert scan(attached(data, name)) == ScanResult.failed(kind, detail, "builtin")


def test_stored_eicar_in_an_archive_that_is_not_opened_is_found() -> None:
    """A RAR archive is not opened, but its bytes are searched: a stored EICAR is
    found, and a threat wins over the error."""
    assert scan(attached(RAR + EICAR, b"a.rar")) == eicar_in("a.rar")


def test_encrypted_entry_only_in_a_local_header_is_password_protected() -> None:
    """An encrypted entry that the central directory does not list: password-protected."""
    hidden = entry("secret.doc", b"who knows", zipfile.ZIP_STORED)
    archive = bytearray(raw_zip([entry("a.txt", b"a"), hidden], listed={"a.txt"}))
    archive[archive.rindex(b"PK\x03\x04") + 6] |= 0x1
    assert scan(attached(bytes(archive), b"s.zip")) == ScanResult.failed(
        ErrorKind.PASSWORD_PROTECTED, "s.zip/secret.doc: encrypted archive member", "builtin"
    )


# -- limits and bombs ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    """2 GiB of zeros in a gzip file of about 2 MB."""
    return repeated_gzip(bytes(MIB), 2048)


def joined(compress: Callable[[bytes], bytes], streams: int = 64) -> bytes:
    """``streams`` compressed streams of 64 MiB of zeros each, one after the other."""
    return compress(bytes(64 * MIB)) * streams


def zip_bzip2_bomb() -> bytes:
    """A zip whose one bzip2 member declares and holds 4 GiB of zeros in 5 KB."""
    return raw_zip([("zeros.bin", zipfile.ZIP_BZIP2, joined(bz2.compress), 0, 0xFFFFFFFF)])


def tiny_files(count: int) -> bytes:
    """A .tar.gz of ``count`` one-byte files."""
    info = tarfile.TarInfo("f")
    info.size = 1
    return repeated_gzip(info.tobuf(tarfile.USTAR_FORMAT) + b"x" + bytes(511), count)


def test_gzip_bomb_stops_at_the_decoded_size_limit(gzip_bomb: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """A gzip of 2 GiB of zeros (deflate's ratio, about 1000 to 1, is within
    max_ratio): content-size once the bytes decoded pass 100 MiB, inflated 256 KiB
    at a time and not a read more."""
    inflated = count_reads(monkeypatch)
    result = scan(attached(gzip_bomb, b"zeros.gz"))
    assert result == content_size("zeros.gz/zeros: more than 104857600 bytes decoded")
    # The attachment itself (the gzip file, decoded from base64) counts too.
    assert inflated == [CHUNK_SIZE] * ((LIMIT - len(gzip_bomb)) // CHUNK_SIZE + 1)


@pytest.mark.parametrize(
    ("compress", "name"),
    [
        pytest.param(lambda data: bz2.compress(data, 9), b"zeros.bz2", id="bzip2"),
        pytest.param(lambda data: lzma.compress(data, preset=6), b"zeros.xz", id="xz"),
    ],
)
def test_bomb_past_the_ratio_stops_at_the_ratio(
    compress: Callable[[bytes], bytes], name: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """64 MiB of zeros in 4 GiB of joined streams of bzip2 (about 80 bytes a stream) or
    xz (10 KB): content-size once the output passes max_ratio (2000) times the input
    consumed, 8 MiB for the first 4 KiB taken."""
    inflated = count_reads(monkeypatch)
    result = scan(attached(joined(compress), name))
    member = name.decode().rsplit(".", 1)[0]
    assert result == content_size(f"{name.decode()}/{member}: decompresses to more than 2000 times its size")
    # The decoder has been given one step of input (4 KiB): the first read past 2000
    # times that is the one that fails.
    assert inflated == [CHUNK_SIZE] * (2000 * INPUT_STEP // CHUNK_SIZE)


def test_zip_member_bzip2_bomb_stops_at_the_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    """A zip whose bzip2 member declares and holds 4 GiB of zeros in a few kilobytes
    (zipfile would expand a whole read's input at once): content-size at the ratio,
    after the floor of 1 MiB."""
    inflated = count_reads(monkeypatch)
    result = scan(attached(zip_bzip2_bomb(), b"bomb.zip"))
    assert result == content_size("bomb.zip/zeros.bin: decompresses to more than 2000 times its size")
    # The decoder has been given one step of input (4 KiB): the first read past 2000
    # times that is the one that fails.
    assert inflated == [CHUNK_SIZE] * (2000 * INPUT_STEP // CHUNK_SIZE)


def test_lzma_naming_more_memory_than_allowed_is_refused() -> None:
    """An lzma file whose header asks for a 1 GiB dictionary: content-size, nothing
    allocated."""
    data = bytearray(lzma.compress(b"hello", lzma.FORMAT_ALONE))
    data[1:5] = (1024 * MIB).to_bytes(4, "little")
    result = scan(attached(bytes(data), b"big.lzma"))
    assert result == content_size(
        f"big.lzma/big: lzma data needs more than {LZMA_MEMORY} bytes of memory to decompress"
    )


def test_tar_of_many_tiny_files_stops_at_the_parts_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A .tar.gz of 100,000 one-byte files (100 MB of tar in 300 KB): content-size at
    max_parts (1000), having decompressed only the tar records read up to there."""
    inflated = count_reads(monkeypatch)
    result = scan(attached(tiny_files(100_000), b"many.tgz"))
    assert result == content_size("many.tgz/many.tar/f: more than 1000 parts")
    # The message's three parts and the tar make 4: 997 records of 1 KiB read.
    assert inflated == [CHUNK_SIZE] * (997 * 1024 // CHUNK_SIZE + 1)


def test_zip_directory_of_more_entries_than_parts_is_refused_before_it_is_read() -> None:
    """A zip whose end record counts 100,000 entries: content-size without reading its
    central directory."""
    archive = bytearray(zipped({"a.txt": b"a"}))
    struct.pack_into("<2H", archive, archive.rindex(b"PK\x05\x06") + 8, 65535, 65535)
    assert scan(attached(bytes(archive), b"many.zip")) == content_size("many.zip: more than 1000 parts")


def test_tar_extended_header_larger_than_allowed_is_refused() -> None:
    """A pax header bigger than 1 MiB, which tarfile would read whole: content-size."""
    info = tarfile.TarInfo("f")
    info.pax_headers = {"comment": "x" * (MAX_TAR_HEADER + 1)}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(info, io.BytesIO(b""))
    result = scan(attached(buffer.getvalue(), b"pax.tar"))
    assert result.error is ErrorKind.CONTENT_SIZE
    assert result.detail.startswith("pax.tar: an extended header of ")


def forty_two() -> bytes:
    """A 42.zip-like nest: four layers of 16 zips, 16 pages of 256 MiB of zeros at the
    bottom of each: 16 TiB in all."""
    page, crc = repeated_deflate(bytes(MIB), 256)
    layer = raw_zip([(f"page{n:x}.bin", zipfile.ZIP_DEFLATED, page, crc, 256 * MIB) for n in range(16)])
    for name in ("chapter", "book", "lib"):
        inner = (deflated(layer), zlib.crc32(layer), len(layer))
        layer = raw_zip([(f"{name}{n:x}.zip", zipfile.ZIP_DEFLATED, *inner) for n in range(16)])
    return layer


@pytest.fixture(scope="module")
def nest() -> bytes:
    return forty_two()


def test_42_zip_like_nest_stops_at_the_decoded_size_limit(nest: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """The nest's first page inflates until the bytes decoded pass 100 MiB: content-size,
    the last read the one that passed the limit."""
    inflated = count_reads(monkeypatch)
    result = scan(attached(nest, b"42.zip"))
    assert result == content_size("42.zip/lib0.zip/book0.zip/chapter0.zip/page0.bin: more than 104857600 bytes decoded")
    # What counts: the attachment (the nest itself), lib0.zip, book0.zip and
    # chapter0.zip as read from their archives, and the page.
    assert len(nest) + sum(inflated[:-1]) <= LIMIT < len(nest) + sum(inflated)


def test_configured_ratio_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    """max_ratio = 10 from the table: a gzip of 2 MiB of text compressing 100 to 1 is
    content-size, once past its first MiB."""
    data = gzipped(b"All work and no play makes Jack a dull boy.\r\n" * 50_000)
    result = build(max_ratio=10).scan_now(spooled(attached(data, b"jack.txt.gz")))
    assert result == content_size("jack.txt.gz/jack.txt: decompresses to more than 10 times its size")
    assert build().scan_now(spooled(attached(data, b"jack.txt.gz"))) == ScanResult.clean("builtin")


def test_stop_flag_ends_a_bomb_at_the_next_read(gzip_bomb: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan is told to stop after three reads of a gzip bomb: it ends as a timeout
    with no further read."""
    inflated = count_reads(monkeypatch)
    result = BuiltinScanner().scan_now(spooled(attached(gzip_bomb, b"zeros.gz")), lambda: len(inflated) >= 3)
    assert result == ScanResult.failed(ErrorKind.TIMEOUT, "stopped at the deadline", "builtin")
    assert inflated == [CHUNK_SIZE] * 3


def test_decompressing_stream_reads_in_bounded_steps() -> None:
    """Every read of a bomb's stream asks the decoder for at most the bytes wanted."""
    reader = streams.Decompressing(
        io.BytesIO(bz2.compress(bytes(64 * MIB))).read,
        bz2.BZ2Decompressor(),
        streams.Bounds(10**9, 1000, lambda: None),
        "bzip2",
    )
    assert [len(reader.read(1000)) for _ in range(3)] == [1000, 1000, 1000]
