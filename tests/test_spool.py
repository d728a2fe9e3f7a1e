"""Spool: memory first, a private unlinked file beyond the threshold."""

from __future__ import annotations

import errno
import io
import os
import stat
import tempfile

import pytest

from smtpguard.spool import Spool, SpoolFull


def collect(spool: Spool, *chunks: bytes):
    for chunk in chunks:
        spool.write(chunk)
    return spool.finish()


class FailingFile(io.BytesIO):
    """A file whose writes (or flushes) fail like a full disk."""

    def __init__(self, fail_write: bool = True, fail_flush: bool = False) -> None:
        super().__init__()
        self.fail_write = fail_write
        self.fail_flush = fail_flush

    def write(self, data) -> int:
        if self.fail_write:
            del data  # like a C write: the failed call keeps no reference to the buffer
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)

    def flush(self) -> None:
        if self.fail_flush:
            raise OSError(errno.EIO, "Input/output error")
        super().flush()


def test_small_message_stays_in_memory(tmp_path):
    """Up to the memory limit the message is kept in a BytesIO."""
    message = collect(Spool(0, memory_limit=10, directory=str(tmp_path)), b"12345", b"67890")
    assert isinstance(message._body, io.BytesIO)
    assert (message.size, message.read()) == (10, b"1234567890")


def test_larger_message_moves_to_file(tmp_path):
    """One byte over the memory limit moves the message to a real file, all bytes kept."""
    message = collect(Spool(0, memory_limit=10, directory=str(tmp_path)), b"12345", b"67890", b"X")
    assert not isinstance(message._body, io.BytesIO)
    assert (message.size, message.read()) == (11, b"1234567890X")
    message.close()


def test_spool_file_is_private(tmp_path):
    """The spool file is a regular file with mode 0600."""
    message = collect(Spool(0, memory_limit=4, directory=str(tmp_path)), b"0123456789")
    status = os.fstat(message._body.fileno())
    assert stat.S_ISREG(status.st_mode)
    assert stat.S_IMODE(status.st_mode) == 0o600
    message.close()


def test_spool_file_not_in_directory(tmp_path):
    """The spool file has no name: the directory stays empty while it is in use."""
    spool = Spool(0, memory_limit=4, directory=str(tmp_path))
    spool.write(b"0123456789")
    assert os.fstat(spool._body.fileno()).st_nlink == 0
    assert os.listdir(tmp_path) == []
    message = spool.finish()
    assert os.listdir(tmp_path) == []
    message.close()


def test_spool_file_in_configured_directory(tmp_path, monkeypatch):
    """The file is created in the configured directory."""
    seen = []
    original = tempfile.TemporaryFile

    def recording(*args, **kwargs):
        seen.append(kwargs.get("dir"))
        return original(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", recording)
    collect(Spool(0, memory_limit=1, directory=str(tmp_path)), b"abc").close()
    assert seen == [str(tmp_path)]


def test_chunks_in_pieces_from_start(tmp_path):
    """chunks() yields the whole message in pieces of at most chunk_size, each time from the start."""
    message = collect(Spool(0, memory_limit=4, directory=str(tmp_path)), b"abcdefghij")
    assert list(message.chunks(4)) == [b"abcd", b"efgh", b"ij"]
    assert list(message.chunks(4)) == [b"abcd", b"efgh", b"ij"]
    message.close()


def test_chunks_of_empty_message():
    """An empty message has no chunks."""
    message = Spool(0).finish()
    assert (message.size, list(message.chunks())) == (0, [])


def test_headers_up_to_empty_line():
    """headers() returns the header block including the empty line."""
    message = collect(Spool(0), b"Subject: x\r\nFrom: a@example.com\r\n\r\nbody\r\n")
    assert message.headers() == b"Subject: x\r\nFrom: a@example.com\r\n\r\n"


def test_headers_after_chunks(tmp_path):
    """headers() reads from the start even after chunks() was read, on disk too."""
    message = collect(Spool(0, memory_limit=8, directory=str(tmp_path)), b"A: 1\r\n\r\nbody body body\r\n")
    assert list(message.chunks()) == [b"A: 1\r\n\r\nbody body body\r\n"]
    assert message.headers() == b"A: 1\r\n\r\n"
    message.close()


def test_headers_without_body():
    """Without an empty line the whole message is the header block."""
    assert collect(Spool(0), b"Subject: x\r\n").headers() == b"Subject: x\r\n"


def test_headers_empty_header_block():
    """A message starting with an empty line has an empty header block."""
    assert collect(Spool(0), b"\r\nbody\r\n").headers() == b"\r\n"


def test_headers_limit():
    """headers() reads at most ``limit`` bytes."""
    assert collect(Spool(0), b"Subject: xxxxxxxx\r\n\r\n").headers(limit=8) == b"Subject:"


def test_at_max_size_accepted():
    """A message of exactly max_size bytes is accepted."""
    message = collect(Spool(10), b"12345", b"67890")
    assert (message.size, message.read()) == (10, b"1234567890")


def test_over_max_size_raises_spool_full():
    """One byte more than max_size: finish raises SpoolFull with the size seen."""
    spool = Spool(10)
    spool.write(b"1234567890")
    spool.write(b"X")
    assert spool.overflowed is True
    with pytest.raises(SpoolFull) as caught:
        spool.finish()
    assert caught.value.args == (11,)


def test_over_max_size_counts_but_does_not_store(tmp_path):
    """Writes past the limit are counted, not stored, and nothing goes to disk."""
    spool = Spool(10, memory_limit=5, directory=str(tmp_path))
    spool.write(b"1234")
    spool.write(b"x" * 1000)
    spool.write(b"y" * 1000)
    assert spool.size == 2004
    assert isinstance(spool._body, io.BytesIO)
    assert spool._body.getvalue() == b"1234"


def test_spool_full_discards(tmp_path):
    """After SpoolFull the storage is closed."""
    spool = Spool(5, memory_limit=2, directory=str(tmp_path))
    spool.write(b"abcd")
    spool.write(b"efgh")
    body = spool._body
    with pytest.raises(SpoolFull):
        spool.finish()
    assert body.closed is True


def test_max_size_zero_is_unlimited():
    """max_size 0 means no limit."""
    message = collect(Spool(0, memory_limit=1024 * 1024), b"x" * 100_000)
    assert message.size == 100_000


def test_missing_directory_error_reraised(tmp_path):
    """A spool directory that does not exist: finish re-raises the OSError."""
    spool = Spool(0, memory_limit=4, directory=str(tmp_path / "missing"))
    spool.write(b"0123456789")
    assert isinstance(spool.error, FileNotFoundError)
    with pytest.raises(FileNotFoundError):
        spool.finish()


def test_missing_directory_discards(tmp_path):
    """After the OSError the in-memory part is closed."""
    spool = Spool(0, memory_limit=4, directory=str(tmp_path / "missing"))
    spool.write(b"0123456789")
    body = spool._body
    with pytest.raises(OSError):
        spool.finish()
    assert body.closed is True


def test_write_error_reraised(monkeypatch):
    """A file that fails on write: the first error is kept and finish raises it."""
    failing = FailingFile()
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda **kwargs: failing)
    spool = Spool(0, memory_limit=4)
    spool.write(b"0123")
    spool.write(b"456789")
    spool.write(b"more")
    assert spool.size == 14
    with pytest.raises(OSError) as caught:
        spool.finish()
    assert caught.value.errno == errno.ENOSPC


def test_failed_move_to_disk_closes_file(monkeypatch):
    """When copying the in-memory part to the new file fails, that file is closed too."""
    failing = FailingFile()
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda **kwargs: failing)
    spool = Spool(0, memory_limit=4)
    spool.write(b"0123")
    spool.write(b"456789")
    with pytest.raises(OSError):
        spool.finish()
    assert failing.closed is True


def test_write_error_after_move_reraised(monkeypatch):
    """A write that fails once the data is on disk is re-raised by finish."""
    failing = FailingFile(fail_write=False)
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda **kwargs: failing)
    spool = Spool(0, memory_limit=4)
    spool.write(b"0123456789")
    failing.fail_write = True
    spool.write(b"more")
    with pytest.raises(OSError) as caught:
        spool.finish()
    assert caught.value.errno == errno.ENOSPC
    assert failing.closed is True


def test_flush_error_reraised(monkeypatch):
    """An error on the final flush is re-raised by finish, storage closed."""
    failing = FailingFile(fail_write=False, fail_flush=True)
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda **kwargs: failing)
    spool = Spool(0, memory_limit=4)
    spool.write(b"0123456789")
    with pytest.raises(OSError) as caught:
        spool.finish()
    assert caught.value.errno == errno.EIO
    assert failing.closed is True


def test_discard_closes_memory():
    """discard() closes the in-memory storage."""
    spool = Spool(0)
    spool.write(b"abc")
    spool.discard()
    assert spool._body.closed is True


def test_discard_closes_file(tmp_path):
    """discard() closes the spool file."""
    spool = Spool(0, memory_limit=1, directory=str(tmp_path))
    spool.write(b"abc")
    descriptor = spool._body.fileno()
    spool.discard()
    assert spool._body.closed is True
    with pytest.raises(OSError):
        os.fstat(descriptor)


def test_message_close(tmp_path):
    """Message.close() closes it; closed says so."""
    message = collect(Spool(0, memory_limit=1, directory=str(tmp_path)), b"abc")
    assert message.closed is False
    message.close()
    assert message.closed is True


# -- the header section as mail readers find it (a BINARYMIME message keeps bare CR and LF)


@pytest.mark.parametrize(
    ("data", "section"),
    [
        (b"A: 1\nB: 2\n\nbody", b"A: 1\nB: 2\n"),
        (b"A: 1\rB: 2\r\rbody", b"A: 1\rB: 2\r"),
        (b"A: 1\r\nB: 2\n\r\nbody", b"A: 1\r\nB: 2\n"),
        (b"A: 1\r\nB: 2\r\r\nbody\r\n\r\nmore", b"A: 1\r\nB: 2\r"),
        (b"A: 1\r\nB: 2\r\n\nbody", b"A: 1\r\nB: 2\r\n"),
        (b"A: 1\n\rbody", b"A: 1\n"),
        (b"\nbody", b""),
        (b"\rbody", b""),
        (b"A: 1\r\nB: 2\r\n\r\nbody", b"A: 1\r\nB: 2\r\n"),
    ],
)
def test_header_section_ends_at_the_first_empty_line_whatever_its_line_ends(data, section):
    """A bare CR or LF ends a line, as mail readers read it: the header section ends
    at the first empty line and the body starts after it."""
    message = collect(Spool(0), data)
    assert message.split_headers() == (section, data.index(b"body"))
    assert message.headers() == data[: data.index(b"body")]


@pytest.mark.parametrize("data", [b"A: 1\r\nB: 2\r\nbody", b"A: 1\r\nB: 2\nC: 3\r\nbody"])
def test_the_cr_and_lf_of_one_crlf_never_make_an_empty_line(data):
    """A CRLF is one line end: a message with no empty line is all header."""
    assert collect(Spool(0), data).split_headers() == (data, len(data))
