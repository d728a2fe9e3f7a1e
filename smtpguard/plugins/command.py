"""The ``command`` scanner plugin: an external command-line scanner such as clamdscan."""

from smtpguard.registry import ScannerPlugin
from smtpguard.scanners.command import build

command = ScannerPlugin("command", "Runs an external command-line scanner (e.g. clamdscan) on each message", build)
