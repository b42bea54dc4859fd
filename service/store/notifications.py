"""The notification outbox's records and interface: one row per study, priority and channel (issue 14 §5).

    finding raised its study to a notified priority ─▶ add_notification(study, channel, priority, payload)
    one thread per channel ─▶ due_notifications(channel) ─▶ send ─▶ notification_attempt(ok | error + next)

Why a table of its own rather than rows in `deliveries`: a delivery is a file (`path`) keyed by the object it
sends (`object_uid`, destination) with a kind CHECK of SEG/SR/SC that SQLite cannot widen without rebuilding
the table; a notification is a small message keyed by *what happened* (the study reached this priority) and
sent over a channel. The key is the rule "once per priority raise": UNIQUE (study_uid, channel, priority),
and a row is only added while the study's priority is the one notified, in the same statement, so a repeat
at the same priority, a lower finding after a higher one, or a restart that runs the hook again adds nothing.
The states, attempts, backoff times and last error are the deliveries' (the dispatcher's machinery sends both).

`payload` is the JSON the message is built from (`service.pacs.notify.content.NotificationContent`): the
finding in words, UIDs, versions, the HL7 control ID; no patient data, as everywhere in the database (the
film's Accession Number and Patient ID/Name wait in a file beside its results). It is for the senders: an
API answer lists a notification's channel, priority, state, attempts, last error and times.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum

from service.cascade.finding import Priority

DEFAULT_NOTIFY_ATTEMPTS = 24  # at the notifier's backoff (5 s doubling to 5 min): about an hour and a half


class NotificationChannel(str, Enum):
    """Where a notification goes: the RIS over HL7 v2 MLLP, or a signed JSON webhook."""

    HL7 = "hl7"
    WEBHOOK = "webhook"


class NotificationState(str, Enum):
    """pending → sent (acknowledged by the receiver), or → failed once its attempts are spent (kept, visible)."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


@dataclass(frozen=True)
class NotificationRecord:
    """One pushed notification: `channel` doubles as the dispatcher's destination name (`destination`)."""

    id: int
    study_uid: str
    channel: NotificationChannel
    priority: Priority
    payload: str = field(repr=False)  # what the senders build the message from: not for answers or logs
    state: NotificationState
    attempts: int
    max_attempts: int
    last_error: str | None
    next_attempt_at: datetime | None  # None once sent or failed
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None

    @property
    def destination(self) -> str:
        return self.channel.value


class NotificationOutbox(ABC):
    """The store's notification outbox (part of every `ResultsStore`)."""

    @abstractmethod
    def add_notification(self, study_uid: str, channel: NotificationChannel, priority: Priority, payload: str,
                         max_attempts: int = DEFAULT_NOTIFY_ATTEMPTS) -> int | None:
        """Queue a notification, due now, if the study's priority is `priority` (it was raised to it); returns
        its id, the existing one's for a repeat (idempotent). None, adding nothing, when the study's priority is
        another (a higher one: notified, or to be, at that one). NotFoundError for an unknown study."""

    @abstractmethod
    def due_notifications(self, limit: int = 10, now: datetime | None = None, channel: str | None = None,
                          exclude: Collection[str] = ()) -> list[NotificationRecord]:
        """Pending notifications whose next attempt is due, earliest first; only `channel`'s where given,
        none of the channels in `exclude`."""

    @abstractmethod
    def notification_attempt(self, notification_id: int, ok: bool, error: str | None = None,
                             next_attempt_at: datetime | None = None, claim: str | None = None) -> NotificationRecord:
        """Record one attempt, as `delivery_attempt` does: sent when ok; otherwise failed once `max_attempts`
        are spent, else pending until `next_attempt_at`. StoreError for one already sent or failed, or claimed
        again since `claim` was taken (claims.py)."""

    @abstractmethod
    def retry_notification(self, notification_id: int) -> NotificationRecord:
        """A failed notification back to pending, due now, with a fresh attempt budget (an operator's retry
        once the receiver is fixed). NotFoundError for an unknown id; StoreError for one not failed."""

    @abstractmethod
    def notifications(self, study_uid: str | None = None,
                      state: NotificationState | None = None) -> list[NotificationRecord]:
        """Notifications, oldest first, optionally of one study and/or in one state."""

    @abstractmethod
    def notification_counts(self) -> dict[NotificationState, int]:
        """How many notifications are in each state (every state present)."""


__all__ = ["DEFAULT_NOTIFY_ATTEMPTS", "NotificationChannel", "NotificationOutbox", "NotificationRecord",
           "NotificationState"]
