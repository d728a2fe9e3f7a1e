"""Counting a zip's central directory before zipfile builds it: entries are
walked, not taken from the count the end record states, and no further than
the limit."""

from __future__ import annotations

import io
import zipfile

import pytest

from smtpguard.scanners.mimewalk import zip_directory_entries


def archive(entries: int, prefix: bytes = b"") -> io.BytesIO:
    data = io.BytesIO()
    data.write(prefix)
    with zipfile.ZipFile(data, "a" if prefix else "w", allowZip64=True) as made:
        for index in range(entries):
            made.writestr(f"directory/a-rather-long-member-name-{index:05}.txt", b"x")
    data.seek(0)
    return data


@pytest.mark.parametrize("prefix", [b"", b"MZ" + b"\0" * 5000], ids=["plain", "self-extracting"])
def test_entries_are_counted_by_walking_the_directory(prefix: bytes) -> None:
    """A zip of 900 members with long names (more directory bytes than 46 per
    entry) counts 900, behind a prefix too."""
    assert zip_directory_entries(archive(900, prefix), 1000) == 900


def test_counting_stops_past_the_limit() -> None:
    """Past ``limit`` the walk stops: limit + 1 is all it reports."""
    assert zip_directory_entries(archive(50), 10) == 11


def test_a_stated_count_that_lies_is_not_believed() -> None:
    """An end record stating one entry over a directory of 50 counts 50."""
    raw = bytearray(archive(50).getvalue())
    end = raw.rfind(b"PK\x05\x06")
    raw[end + 8 : end + 12] = (1).to_bytes(2, "little") * 2
    assert zip_directory_entries(io.BytesIO(bytes(raw)), 1000) == 50


def test_no_end_record_counts_nothing() -> None:
    """Without an end-of-directory record nothing is counted (zipfile refuses it)."""
    assert zip_directory_entries(io.BytesIO(b"PK\x03\x04 not really a zip"), 1000) == 0


def test_the_spool_is_left_at_its_start() -> None:
    """Counting leaves the spool at offset 0 for zipfile."""
    data = archive(3)
    zip_directory_entries(data, 1000)
    assert data.tell() == 0
