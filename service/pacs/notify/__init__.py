"""Pushed notifications of STAT and URGENT findings: HL7 v2.5.1 ORU^R01 over MLLP to a RIS, and a signed JSON
webhook, through a durable outbox in the store (issue 14 §5; docs/notifications.md).

    finding recorded ─▶ Pacs._on_finding ─▶ Notifier.notify (outbox.py)   store rows only, never blocks intake
                          content.py: what it says, from the finding and the film's header, once
    NotificationDispatcher (the delivery dispatcher's threads and backoff) ─┬▶ mllp.py + hl7.py ─▶ RIS (ACK)
                                                                           └▶ webhook.py ─▶ receiver (2xx)
"""

from service.pacs.notify.content import (
    FilmIdentifiers,
    IdentifierFiles,
    NotificationContent,
    parse_priorities,
)
from service.pacs.notify.mllp import MllpAddress, MllpSender
from service.pacs.notify.outbox import (
    NOTIFY_BACKOFF,
    NOTIFY_OUTCOMES,
    NotificationDispatcher,
    Notifier,
    NotifySettingsError,
    check_settings,
)
from service.pacs.notify.webhook import SignatureError, WebhookSender, sign, verify

__all__ = [
    "NOTIFY_BACKOFF", "NOTIFY_OUTCOMES", "FilmIdentifiers", "IdentifierFiles", "MllpAddress", "MllpSender",
    "NotificationContent", "NotificationDispatcher", "Notifier", "NotifySettingsError", "SignatureError",
    "WebhookSender", "check_settings", "parse_priorities", "sign", "verify",
]
