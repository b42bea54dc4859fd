"""The notifier: a recorded finding at a notified priority becomes outbox rows, sent by the delivery machinery.

    Pacs._on_finding ─▶ Notifier.notify_async(finding)          local writes only: intake never waits
                          ├▶ IdentifierFiles.write               (the film's identifiers, beside its results)
                          └▶ store.add_notification per channel  (once per study priority raise)
    NotificationDispatcher: one thread per channel ─▶ MllpSender / WebhookSender ─▶ notification_attempt

`NotificationDispatcher` is the delivery `Dispatcher` (its threads, backoff with jitter, rejections kept
with the longest backoff, a down receiver's remaining rows recorded without waiting out each timeout, a
channel no longer configured recorded as such) over the store's notifications instead of its deliveries.
Its backoff is its own, shorter than the deliveries' (a STAT finding is worth a prompt retry): 5 s doubling to
5 minutes, DEFAULT_NOTIFY_ATTEMPTS attempts (about an hour and a half) before a notification is failed for
good; it stays visible per study (`store.notifications(study_uid)`) and an operator can retry it.

Each attempt counts in ptx_notifications_total{channel, outcome}: ok, failed (to be retried), given_up (the
last attempt failed). Log lines name the notification's id, priority and channel and our words, never the
film's identifiers nor the receiver's text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Mapping
from datetime import datetime
from typing import Any, Protocol

from service.cascade.finding import Finding, Priority
from service.metrics import child, metrics
from service.pacs.delivery.dispatcher import Backoff, Dispatcher
from service.pacs.notify.content import (
    FilmIdentifiers,
    IdentifierFiles,
    NotificationContent,
    parse_priorities,
)
from service.pacs.notify.mllp import MllpAddress, MllpSender
from service.pacs.notify.webhook import WebhookSender, check_webhook_url
from service.settings import Settings
from service.store import (
    DEFAULT_NOTIFY_ATTEMPTS,
    Claim,
    NotificationChannel,
    NotificationRecord,
    NotificationState,
    ResultsStore,
    utc_now,
)
from service.store.results_files import ResultsFolder

NOTIFY_BACKOFF = Backoff(base_s=5.0, factor=2.0, max_s=300.0)
GIVEN_UP = "given_up"
NOTIFY_OUTCOMES = ("ok", "failed", GIVEN_UP)  # ptx_notifications_total's outcome label


class NotificationSender(Protocol):
    """Sends one notification; raises DeliveryError (retryable or not, receiver down or not)."""

    def send(self, record: NotificationRecord) -> None: ...

    def close(self) -> None: ...


class NotificationDispatcher(Dispatcher):
    """The delivery dispatcher over the notification outbox (see the module docstring)."""

    noun = "notification"

    def __init__(self, store: ResultsStore, senders: Mapping[str, NotificationSender], *,
                 on_outcome: Callable[[str, str], None] | None = None, **options: Any) -> None:
        super().__init__(store, senders, **options)  # type: ignore[arg-type]
        self.on_outcome = on_outcome

    def _due(self, at: datetime, destination: str | None, exclude: Collection[str]) -> Claim[Any]:
        return self.store.claim_notifications(self.batch_size, self.lease_s, now=at, channel=destination,
                                              exclude=exclude, owner=self.owner)

    def _release(self, token: str, at: datetime) -> int:
        return self.store.release_notifications(token, at)

    def _release_owned(self, owner: str, at: datetime) -> int:
        return self.store.release_owned_notifications(owner, at)

    def _deliver(self, sender: Any, record: Any) -> None:
        sender.send(record)

    def _store_attempt(self, record: Any, ok: bool, error: str | None, next_at: datetime | None,
                       claim: str | None) -> Any:
        return self.store.notification_attempt(record.id, ok, error=error, next_attempt_at=next_at, claim=claim)

    def _reported(self, record: Any, updated: Any, ok: bool) -> None:
        if self.on_outcome is not None:
            outcome = "ok" if ok else GIVEN_UP if updated.state is NotificationState.FAILED else "failed"
            self.on_outcome(record.channel.value, outcome)

    @staticmethod
    def _what(record: Any) -> str:
        return str(record.priority.value)


class Notifier:
    """Queues notifications for recorded findings and runs their dispatcher; `start()` / `close()`."""

    def __init__(self, store: ResultsStore, files: IdentifierFiles, senders: Mapping[str, NotificationSender], *,
                 priorities: Collection[Priority], patient_ids: bool = False, backoff: Backoff = NOTIFY_BACKOFF,
                 max_attempts: int = DEFAULT_NOTIFY_ATTEMPTS, poll_interval_s: float = 5.0,
                 on_outcome: Callable[[str, str], None] | None = None,
                 clock: Callable[[], datetime] = utc_now, **claims: Any) -> None:
        unknown = set(senders) - {c.value for c in NotificationChannel}
        if unknown:
            known = [c.value for c in NotificationChannel]
            raise ValueError(f"notification channels are {known}, got {sorted(unknown)}")
        self.store, self.files, self.senders = store, files, dict(senders)
        self.priorities, self.patient_ids = frozenset(priorities), patient_ids
        self.max_attempts, self.clock = max_attempts, clock
        self.dispatcher = NotificationDispatcher(store, self.senders, backoff=backoff, max_attempts=max_attempts,
                                                 poll_interval_s=poll_interval_s, on_outcome=on_outcome, clock=clock,
                                                 **claims)  # lease_s, owner (PTX_DELIVERY_LEASE_S, PTX_LISTENER_NAME)

    @classmethod
    def from_settings(cls, settings: Settings, store: ResultsStore, results: ResultsFolder, *,
                      on_outcome: Callable[[str, str], None] | None = None, owned: bool = True) -> Notifier | None:
        """The notifier PTX_NOTIFY_* ask for, None when no channel is set; ValueError naming a bad setting.
        `owned`: its claims carry PTX_LISTENER_NAME, and its start takes back what that name held (claims.py):
        only for the one notifier a listener runs."""
        priorities = check_settings(settings)
        files = IdentifierFiles(results)
        senders: dict[str, NotificationSender] = {}
        if settings.notify_hl7.strip():
            senders[NotificationChannel.HL7.value] = MllpSender(
                MllpAddress.parse(settings.notify_hl7), sending_facility=settings.dicom_ae_title,
                identifiers=files.read)
        if settings.notify_webhook.strip():
            assert settings.notify_webhook_secret is not None  # check_settings
            senders[NotificationChannel.WEBHOOK.value] = WebhookSender(
                settings.notify_webhook, settings.notify_webhook_secret.get_secret_value().encode("utf-8"),
                identifiers=files.read)
        if not senders:
            return None
        return cls(store, files, senders, priorities=priorities, patient_ids=settings.notify_hl7_patient_ids,
                   on_outcome=on_outcome, lease_s=settings.delivery_lease_s,
                   owner=settings.listener_name if owned else None)

    @classmethod
    def observed(cls, settings: Settings, store: ResultsStore, results: ResultsFolder) -> Notifier | None:
        """The edge's notifier for films recorded over HTTP (PTX_RECORD_HTTP): `from_settings` with each attempt
        counted in ptx_notifications_total{channel, outcome}, every series at 0 from the start (so that
        `increase()` sees the first one). Its claims name no owner: every edge worker runs one, beside the PACS
        side's, under one listener name, and an owner's start would release the others' claims mid-send."""
        registry = metrics()
        notifier = cls.from_settings(settings, store, results, owned=False, on_outcome=lambda channel, outcome: child(
            registry.notifications, channel=channel, outcome=outcome).inc())
        for channel in () if notifier is None else notifier.senders:
            for outcome in NOTIFY_OUTCOMES:
                child(registry.notifications, channel=channel, outcome=outcome)
        return notifier

    def notify(self, finding: Finding) -> dict[str, int]:
        """Queue the finding's notifications, one per channel, when its priority is notified and its study is
        at that priority (the store checks, in the insert); returns {channel: id} (a repeat: the existing
        ids), empty when none is due. Local writes only (the identifiers file, the store): returns at disk and
        database speed whatever the receivers' state; wakes their threads."""
        if finding.priority not in self.priorities or finding.study_uid is None or finding.sop_uid is None:
            return {}
        content = NotificationContent.from_finding(finding, self.clock())
        header = finding.source.header if finding.source is not None else None
        self.files.write(content, FilmIdentifiers.from_header(header, patient_ids=self.patient_ids))
        ids: dict[str, int] = {}
        for channel in self.senders:
            added = self.store.add_notification(content.study_uid, NotificationChannel(channel), finding.priority,
                                                content.to_json(), max_attempts=self.max_attempts)
            if added is not None:
                ids[channel] = added
        self.dispatcher.wake(ids)
        return ids

    async def notify_async(self, finding: Finding) -> dict[str, int]:
        """`notify` off the event loop (the store writes block)."""
        return await asyncio.to_thread(self.notify, finding)

    def start(self) -> None:
        self.dispatcher.start()

    def close(self, timeout_s: float = 10.0) -> None:
        self.dispatcher.close(timeout_s)


class NotifySettingsError(ValueError):
    """A PTX_NOTIFY_* setting is unusable; the message names it."""


def check_settings(settings: Settings) -> frozenset[Priority]:
    """Every PTX_NOTIFY_* setting checked without opening a connection (start-up calls it: a bad value stops
    the service with its name); returns the notified priorities. NotifySettingsError otherwise."""
    try:
        priorities = parse_priorities(settings.notify_priorities)
        if settings.notify_hl7.strip():
            MllpAddress.parse(settings.notify_hl7)
        if settings.notify_webhook.strip():
            check_webhook_url(settings.notify_webhook)
    except ValueError as error:
        raise NotifySettingsError(str(error)) from None
    secret = settings.notify_webhook_secret
    if settings.notify_webhook.strip() and (secret is None or not secret.get_secret_value().strip()):
        raise NotifySettingsError("PTX_NOTIFY_WEBHOOK is set but PTX_NOTIFY_WEBHOOK_SECRET is not: every webhook "
                                  "request is signed with it (HMAC-SHA256); set a long random secret shared with "
                                  "the receiver")
    return priorities
