"""The ``example-subject`` scanner plugin, found by smtpguard in its plugins package.

This directory has no ``__init__.py``: smtpguard's own ``smtpguard.plugins``
package takes in every ``smtpguard/plugins/`` directory on ``sys.path``.
"""

from smtpguard.registry import ScannerPlugin

from smtpguard_example.scanner import build

example_subject = ScannerPlugin(
    "example-subject", "Flags messages whose Subject matches a regular expression (example plugin)", build
)
