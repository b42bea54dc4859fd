"""The results store's interface: what the service keeps about studies, and the records it hands back.

    C-STORE / HTTP ─▶ receive(instance) ─▶ pending_instances() ─▶ mark_instance(processing)
                      ─▶ record_finding(finding)  (instance done, study priority/score/status updated)
                      ─▶ worklist() · study() · acknowledge()
    results not made ─▶ defer_outputs(due) ─▶ due_outputs() ─▶ settle_outputs()  (instance outputs_pending)
    SEG / SR / SC  ─▶ add_delivery() ─▶ claim_deliveries() ─▶ delivery_attempt()  (never deleted; claims.py)
    priority raised ─▶ add_notification() ─▶ claim_notifications() ─▶ notification_attempt()
    reader's verdict ─▶ give_feedback() (with the acknowledgement, or later) ─▶ feedback()  (feedback.py)
    live pages       ─▶ latest_change(): a token that moves whenever a study changes

Study states (the worklist state):

    pending ──finding──▶ triaged ──acknowledge──▶ reviewed
       └────────────acknowledge─────────────────▶ reviewed
    reviewed ──finding that raises the priority──▶ triaged  (reopened)

A study's priority only ever goes up (STAT > URGENT > ROUTINE); it is None until the first finding, and a
pending study sorts with the ROUTINE ones (without a result it keeps its ordinary place in the reading order).
A finding after an acknowledgement keeps the study reviewed unless it raises the priority: the reader has
dealt with the study at the priority they saw, and only a result that would have put it higher must bring
it back in front of them; silently keeping such a study "reviewed" would hide a new STAT behind a filter.

All timestamps are timezone-aware UTC; a naive datetime is refused rather than guessed at.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from types import TracebackType
from typing import Any, Self

from service.cascade.finding import Finding, Priority
from service.errors import ServiceError
from service.store.claims import OutboxClaims
from service.store.feedback import FeedbackLog
from service.store.notifications import NotificationOutbox

DEFAULT_MAX_ATTEMPTS = 10
SPOOL_MISSING = "spool_missing"  # the store knows the instance, its bytes are gone (disk replaced, manual cleanup)
INTERNAL_ERROR = "internal_error"  # an instance's attempts spent without an outcome (not its content): retryable


class StoreError(ServiceError):
    """Root of the store's own errors (database driver errors pass through unchanged, with their cause)."""

    code = "store_error"


class SchemaTooNewError(StoreError):
    """The database was migrated by a newer version of this code; writing to it could corrupt what it expects."""

    code = "schema_too_new"


class NotFoundError(StoreError, LookupError):
    """An operation named an instance, study or delivery the store does not have."""

    code, http_status = "not_found", 404


class StudyStatus(str, Enum):
    PENDING = "pending"
    TRIAGED = "triaged"
    REVIEWED = "reviewed"


class InstanceStatus(str, Enum):
    """received → processing → done | failed; received and processing are what resumes after a restart.

    outputs_pending: triaged (its finding is on the worklist) but its result objects (SEG, SR, SC) are not
    all made yet, after a fault or an interruption; they are made again from the kept spool file, with
    backoff, and the instance is done once they are. Stored as status done with `outputs_due_at` set (a
    column, not a new value in the status CHECK: SQLite cannot alter a CHECK without rebuilding the
    table), so only a record shows it."""

    RECEIVED = "received"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    OUTPUTS_PENDING = "outputs_pending"


class DeliveryKind(str, Enum):
    SEG = "SEG"
    SR = "SR"
    SC = "SC"


class DeliveryState(str, Enum):
    """pending → delivered, or → failed once its attempts are spent; a failed delivery stays visible."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


def require_utc(value: datetime, name: str) -> datetime:
    """`value` in UTC; a naive datetime is an error because its zone can only be guessed."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (UTC), got naive {value.isoformat()}")
    return value.astimezone(UTC)


def utc_now() -> datetime:
    return datetime.now(UTC)


def read_timestamp(value: datetime | str | None) -> datetime | None:
    """A stored timestamp back as an aware UTC datetime (SQLite hands back its ISO 8601 text)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return require_utc(value, "stored timestamp")


def _require_uid(value: str, name: str) -> None:
    if not value or len(value) > 64:
        raise ValueError(f"{name} must be a UID of 1 to 64 characters, got {value!r}")


@dataclass(frozen=True)
class ReceivedInstance:
    """One instance as it arrived: `source` says how ("dicom:<calling AE>", "http"); `spool_path` is where
    its bytes wait for processing (None when they were processed in the request, as over HTTP); `sha256` the
    hex digest of the dataset bytes as received (None where unknown), so that a later C-STORE reusing the SOP
    Instance UID with other content can be told from an identical resend. `listener` names the DICOM listener
    whose spool holds the file (PTX_LISTENER_NAME): several listeners share one store, and each resumes,
    retries and sweeps only its own. None over HTTP (no file), and for rows received before store migration 7
    (the listener whose spool holds the file adopts them: `adopt_instance`)."""

    sop_uid: str
    study_uid: str
    series_uid: str | None
    sop_class_uid: str | None
    source: str
    spool_path: str | None
    received_at: datetime
    # keyword-only with a default, so existing callers and the subclass's own fields are unaffected
    sha256: str | None = field(default=None, kw_only=True)
    listener: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        _require_uid(self.sop_uid, "sop_uid")
        _require_uid(self.study_uid, "study_uid")
        if self.sha256 is not None and (len(self.sha256) != 64
                                        or any(c not in "0123456789abcdef" for c in self.sha256)):
            raise ValueError("sha256 must be 64 lowercase hexadecimal digits (hashlib's hexdigest) or None")
        if not self.source:
            raise ValueError("source must name where the instance came from, e.g. 'dicom:MODALITY1' or 'http'")
        object.__setattr__(self, "received_at", require_utc(self.received_at, "received_at"))


@dataclass(frozen=True)
class InstanceRecord(ReceivedInstance):
    """A stored instance; `attempts` counts how often processing started (a film that keeps crashing the
    worker shows up here rather than looping unseen). `outputs_attempts` counts the times its result objects
    could not all be made; `outputs_due_at` is when they are tried again (None unless outputs_pending)."""

    status: InstanceStatus
    error_code: str | None
    attempts: int
    updated_at: datetime
    outputs_attempts: int = field(default=0, kw_only=True)
    outputs_due_at: datetime | None = field(default=None, kw_only=True)


@dataclass(frozen=True)
class FindingRecord:
    """What is kept of a Finding: the API's JSON parts (instances, models) and the RLE, not the mask array."""

    sop_uid: str
    score: float
    label: str
    priority: Priority
    threshold: float
    rle: str
    instances: list[dict[str, Any]]
    models: dict[str, Any]
    created_at: datetime

    def __post_init__(self) -> None:
        _require_uid(self.sop_uid, "sop_uid")
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"score must be in [0, 1], got {self.score}")
        object.__setattr__(self, "score", float(self.score))  # numpy scalars: drivers want plain floats
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "priority", Priority(self.priority))
        object.__setattr__(self, "created_at", require_utc(self.created_at, "created_at"))

    @classmethod
    def from_finding(cls, finding: Finding, created_at: datetime) -> FindingRecord:
        """The record of a service Finding, in the same JSON shape the HTTP API answers with."""
        if finding.sop_uid is None:
            raise ValueError("a finding without a SOP Instance UID cannot be stored (nothing to key it by)")
        body = finding.to_json("none")
        return cls(sop_uid=finding.sop_uid, score=float(finding.score), label=str(body["label"]),
                   priority=finding.priority, threshold=float(finding.threshold), rle=finding.rle,
                   instances=list(body["instances"]), models=dict(finding.models),  # type: ignore[arg-type]
                   created_at=created_at)


@dataclass(frozen=True)
class WorklistItem:
    """One study on the worklist. `priority` and `score` are None until its first finding; `received_at` is
    its first instance's arrival (the order within a priority)."""

    study_uid: str
    status: StudyStatus
    priority: Priority | None
    score: float | None
    received_at: datetime
    updated_at: datetime
    reviewed_at: datetime | None
    reviewed_by: str | None


@dataclass(frozen=True)
class StudyRecord(WorklistItem):
    instances: tuple[InstanceRecord, ...]
    findings: tuple[FindingRecord, ...]


@dataclass(frozen=True)
class DeliveryRecord:
    """One object (SEG / SR / SC, by its SOP Instance UID `object_uid`) to send to one destination."""

    id: int
    study_uid: str
    object_uid: str
    kind: DeliveryKind
    destination: str
    path: str
    state: DeliveryState
    attempts: int
    max_attempts: int
    last_error: str | None
    next_attempt_at: datetime | None  # None once delivered or failed
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None


class ResultsStore(NotificationOutbox, FeedbackLog, OutboxClaims):
    """Studies, instances, findings, worklist state, delivery attempts, notifications and readers' verdicts,
    over SQLite or PostgreSQL.

    Safe to call from several threads; several processes may share one database (each opens its own store).
    """

    @abstractmethod
    def migrate(self) -> int:
        """Apply the migrations this database lacks and return its schema version. Idempotent and safe to run
        from several processes at once; raises SchemaTooNewError for a database newer than this code."""

    @abstractmethod
    def receive(self, instance: ReceivedInstance) -> bool:
        """Record an arrival, creating its study (pending) if new. False when its SOP Instance UID is already
        known: nothing changes (a repeated C-STORE is a no-op, and the first arrival's study wins)."""

    @abstractmethod
    def pending_instances(self, limit: int | None = None, listener: str | None = None) -> list[InstanceRecord]:
        """Instances received or processing but not finished, oldest first: what resumes after a restart.
        With `listener`: that listener's, and the spooled ones no listener owns yet (received before store
        migration 7: only the listener whose spool holds the file may take them, `adopt_instance`)."""

    @abstractmethod
    def adopt_instance(self, sop_uid: str, listener: str) -> InstanceRecord | None:
        """A spooled instance no listener owns (received before store migration 7) now `listener`'s, whose
        spool holds its file; None, changing nothing, when it has an owner already (or no spool file)."""

    @abstractmethod
    def mark_instance(self, sop_uid: str, status: InstanceStatus, error_code: str | None = None) -> None:
        """Move an instance on; FAILED needs the rejection's `error_code`, the other states take none.
        PROCESSING counts an attempt; OUTPUTS_PENDING is refused (ValueError: `defer_outputs` sets it).
        Raises NotFoundError for an unknown instance."""

    @abstractmethod
    def record_finding(self, finding: FindingRecord) -> bool:
        """Store a finding, mark its instance done and update its study (priority upgraded only, score the
        maximum, status per the module's state machine), all in one transaction. False, changing nothing,
        when that instance already has a finding (re-processing after a crash). NotFoundError when the
        instance was never received."""

    @abstractmethod
    def worklist(self, status: StudyStatus | None = None, priority: Priority | None = None,
                 since: datetime | None = None, limit: int = 50, offset: int = 0) -> list[WorklistItem]:
        """Studies by priority (STAT, URGENT, then ROUTINE and pending), then first arrival, then UID;
        `since` keeps studies first received at or after it."""

    @abstractmethod
    def instance(self, sop_uid: str) -> InstanceRecord | None:
        """The instance with this SOP Instance UID, in whichever study (one row, not the study's list)."""

    @abstractmethod
    def study(self, study_uid: str) -> StudyRecord | None:
        """One study with its instances (by arrival) and findings (by creation), or None."""

    @abstractmethod
    def studies(self, study_uids: Sequence[str]) -> dict[str, StudyRecord]:
        """Several studies as `study` reads each, in one transaction of three queries (a worklist page's rows:
        25 round trips before); a UID not stored is left out."""

    @abstractmethod
    def finding(self, sop_uid: str) -> tuple[str, FindingRecord] | None:
        """The finding of one instance with its study's UID, or None."""

    @abstractmethod
    def acknowledge(self, study_uid: str, by: str | None = None, *, seen: Priority | None) -> bool:
        """Mark a study reviewed (by whom, when) if its priority is still `seen`, the one the reader saw (None:
        no finding yet); False when the study is unknown. A compare-and-set in one statement: StoreError,
        naming the current priority and changing nothing, when a finding raised it since (an acknowledgement
        never covers a priority the reader did not see). Priorities only go up, so equal means unchanged."""

    @abstractmethod
    def latest_change(self) -> str:
        """A token that differs whenever a study was added or changed (a finding, a review): the live pages
        compare it before running their page queries, so a poll costs two index lookups while nothing
        changes. Built from the studies' count and latest `updated_at`, so a write stamped earlier than the
        latest (another host's clock behind) may not move it: the pages compare in full now and then too."""

    @abstractmethod
    def add_delivery(self, study_uid: str, object_uid: str, kind: DeliveryKind, destination: str, path: str,
                     max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> int:
        """Queue an object for a destination, due now; returns its id. Idempotent: the same object for the
        same destination returns the existing delivery's id (a restart may queue it again)."""

    @abstractmethod
    def due_deliveries(self, limit: int = 10, now: datetime | None = None, destination: str | None = None,
                       exclude: Collection[str] = ()) -> list[DeliveryRecord]:
        """Pending deliveries whose next attempt is due, earliest first (a listing: dispatchers claim them,
        claims.py); only those for `destination` where given, none for the destinations in `exclude`."""

    @abstractmethod
    def retry_instance(self, sop_uid: str) -> InstanceRecord:
        """An instance that failed with `internal_error` (attempts spent on something other than its content)
        back to received with a fresh attempt budget, for the intake to take up again (an operator's retry
        after a fix). NotFoundError for an unknown instance; StoreError for one in another state, failed
        with a rejection (its content: it would fail again), or without spooled bytes (HTTP's own)."""

    @abstractmethod
    def defer_outputs(self, sop_uid: str, due_at: datetime) -> InstanceRecord:
        """A triaged instance whose result objects were not all made (a fault, or an interruption): now
        outputs_pending, to be made again at `due_at` (the caller's backoff); counts one outputs attempt.
        NotFoundError for an unknown instance; StoreError for one without a finding (nothing to make)."""

    @abstractmethod
    def settle_outputs(self, sop_uid: str, error_code: str | None = None) -> None:
        """An outputs_pending instance back to done: its objects made, or (with `error_code`, e.g.
        SPOOL_MISSING) never to be made. NotFoundError for an unknown instance; StoreError for one without
        a finding."""

    @abstractmethod
    def due_outputs(self, now: datetime | None = None, listener: str | None = None) -> list[InstanceRecord]:
        """The outputs_pending instances, earliest due first; only those due at `now` where given, and only
        `listener`'s (with the unowned spooled ones, as `pending_instances`) where given."""

    @abstractmethod
    def retry_delivery(self, delivery_id: int) -> DeliveryRecord:
        """A failed delivery back to pending, due now, with a fresh attempt budget (an operator's retry once
        the destination is fixed); its last error is kept until the next attempt. NotFoundError for an
        unknown id; StoreError for one that is not failed (pending: it is being retried already; delivered:
        nothing to do)."""

    @abstractmethod
    def delivery_attempt(self, delivery_id: int, ok: bool, error: str | None = None,
                         next_attempt_at: datetime | None = None, claim: str | None = None) -> DeliveryRecord:
        """Record one attempt: delivered when ok; otherwise failed once `max_attempts` are spent, else pending
        until `next_attempt_at` (the caller's backoff; required for every failed attempt). Raises StoreError
        for a delivery already delivered or failed, or claimed again since `claim` (its token) was taken."""

    @abstractmethod
    def deliveries(self, study_uid: str | None = None, state: DeliveryState | None = None) -> list[DeliveryRecord]:
        """Deliveries, oldest first, optionally of one study and/or in one state."""

    @abstractmethod
    def delivery_counts(self) -> dict[DeliveryState, int]:
        """How many deliveries are in each state (every state present), for the metrics."""

    @abstractmethod
    def close(self) -> None:
        """Close the store's connections; the store is unusable afterwards."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
