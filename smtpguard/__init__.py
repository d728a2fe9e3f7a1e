"""smtpguard: an SMTP antivirus-scanning proxy built on Twisted."""

__version__ = "0.1.0"
