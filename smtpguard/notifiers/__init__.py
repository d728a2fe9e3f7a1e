"""Notices about messages that were not delivered as sent: delivery status
notifications to senders, notices to the administrator, and the durable outbox
they wait in."""

from smtpguard.notifiers.dsn import NoticeSettings, admin_notice, sender_notice
from smtpguard.notifiers.notifier import Notifier, build_notifier
from smtpguard.notifiers.outbox import Outbox, Outcome, RetrySettings
from smtpguard.notifiers.service import NotifierService

__all__ = [
    "NoticeSettings",
    "Notifier",
    "NotifierService",
    "Outbox",
    "Outcome",
    "RetrySettings",
    "admin_notice",
    "build_notifier",
    "sender_notice",
]
