#!/usr/bin/env python3
"""What each decompression bomb costs the built-in scanner: the CPU time of one scan
(``BuiltinScanner.scan_now``, default limits) and the peak resident memory of the
process above what it held just before the scan.

Each bomb is built once, attached to a message (base64, as a mail client sends it),
and scanned in a process of its own, so one bomb's memory does not hide another's:
the child spools the message as the proxy does (to a temporary file past 1 MiB),
resets the kernel's high-water mark (``/proc/self/clear_refs``, Linux only) and
reads it again (``VmHWM``) after the scan.

Run ``python benchmarks/bombs.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import bz2
import gc
import json
import lzma
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sidebyside import table

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from tests.test_containers import (  # noqa: E402
    MIB,
    attached,
    forty_two,
    joined,
    raw_zip,
    repeated_gzip,
    tiny_files,
    zip_bzip2_bomb,
)

GIB = 1024 * MIB


def many_entries(count: int) -> bytes:
    """A zip of ``count`` empty stored entries."""
    return raw_zip([(f"{n}", 0, b"", 0, 0) for n in range(count)])


def nested_multiparts(levels: int) -> bytes:
    """A whole message: ``levels`` multiparts inside each other around one text part."""
    header = b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n'
    opening = b"".join(header % (n, n) for n in range(levels))
    closing = b"".join(b"--b%d--\r\n" % n for n in reversed(range(levels)))
    return b"Subject: nest\r\n" + opening + b"Content-Type: text/plain\r\n\r\nhello\r\n" + closing


def tiny_parts(count: int) -> bytes:
    """A whole message: one multipart of ``count`` empty parts."""
    parts = b"--b\r\n\r\n" * count
    return b'Subject: parts\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n' + parts + b"--b--\r\n"


# name -> (file name, or None for a builder that makes the whole message; what it
# expands to; builder)
BOMBS: dict[str, tuple[bytes | None, str, Callable[[], bytes]]] = {
    "42.zip-like nest": (b"42.zip", "16 TiB: 4 layers of 16 zips, pages of 256 MiB", forty_two),
    "gzip of zeros": (b"zeros.gz", "10 GiB of zeros", lambda: repeated_gzip(bytes(MIB), 10 * 1024)),
    "bzip2 of zeros": (b"zeros.bz2", "4 GiB: 64 joined streams", lambda: joined(lambda data: bz2.compress(data, 9))),
    "xz of zeros": (b"zeros.xz", "4 GiB: 64 joined streams", lambda: joined(lzma.compress)),
    "zip with a bzip2 member": (b"bomb.zip", "4 GiB of zeros in one member", zip_bzip2_bomb),
    "tar.gz of tiny files": (b"many.tgz", "100,000 files of 1 byte", lambda: tiny_files(100_000)),
    "zip of many entries": (b"many.zip", "100,000 empty entries", lambda: many_entries(100_000)),
    "nested multiparts": (None, "10,000 multiparts inside each other", lambda: nested_multiparts(10_000)),
    "tiny MIME parts": (None, "100,000 empty parts", lambda: tiny_parts(100_000)),
}


def status(field: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(field)


def measure(path: Path) -> dict[str, object]:
    """Scan the message in ``path`` once; CPU seconds, peak bytes above the start, result."""
    from smtpguard.scanners.builtin import BuiltinScanner
    from smtpguard.spool import Spool

    spool = Spool(0)
    with path.open("rb") as source:
        while chunk := source.read(MIB):
            spool.write(chunk)
    message = spool.finish()
    scanner = BuiltinScanner()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to VmRSS
    before = status("VmRSS")
    started = time.process_time()
    result = scanner.scan_now(message)
    cpu = time.process_time() - started
    outcome = result.error.value if result.error else result.verdict.value
    return {"cpu": cpu, "peak": status("VmHWM") - before, "result": f"{outcome}: {result.detail}"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--bombs", default=",".join(BOMBS), help=f"comma-separated, of: {', '.join(BOMBS)}")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.child is not None:
        print(json.dumps(measure(arguments.child)))
        return 0
    names = [name.strip() for name in arguments.bombs.split(",") if name.strip()]
    unknown = [name for name in names if name not in BOMBS]
    if unknown:
        parser.error(f"unknown bombs: {', '.join(unknown)}")
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for name in names:
            filename, expands, build = BOMBS[name]
            print(f"{name}: building", file=sys.stderr)
            message = build() if filename is None else attached(build(), filename)
            path = Path(directory) / "message.eml"
            path.write_bytes(message)
            del message
            command = [sys.executable, str(HERE), "--child", str(path)]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            cost = json.loads(done.stdout)
            size = path.stat().st_size
            rows.append([name, f"{size:,}", expands, f"{cost['cpu']:.2f}", f"{cost['peak'] / MIB:.1f}", cost["result"]])
    print(table(["bomb", "message bytes", "expands to", "CPU s", "peak RSS MiB", "result"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
