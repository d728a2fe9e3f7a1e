"""An example smtpguard scanner plugin: flags messages whose Subject matches a
configured regular expression."""

from smtpguard_example.scanner import SubjectScanner, build

__all__ = ["SubjectScanner", "build"]
