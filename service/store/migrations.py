"""The schema, as numbered migrations shared by SQLite and PostgreSQL.

A migration is a list of statements, applied in one transaction and recorded in `schema_migrations`; a
released migration is never edited, only followed by a new one. The text is common SQL; the three types the
dialects spell differently are written `{timestamp}` (TEXT holding ISO 8601 UTC in SQLite, TIMESTAMPTZ in
PostgreSQL), `{id_pk}` (an auto-numbered primary key) and `{blob}` (BLOB, BYTEA). JSON is kept as TEXT in both: the
store is the only reader that needs its structure.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


SCHEMA_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at {timestamp} NOT NULL
)"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "studies, instances, findings, deliveries", (
        """
        CREATE TABLE studies (
            study_uid TEXT PRIMARY KEY,
            status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'triaged', 'reviewed')),
            priority TEXT CHECK (priority IN ('STAT', 'URGENT', 'ROUTINE')),
            score DOUBLE PRECISION,
            received_at {timestamp} NOT NULL,
            updated_at {timestamp} NOT NULL,
            reviewed_at {timestamp},
            reviewed_by TEXT
        )""",
        "CREATE INDEX studies_received ON studies (received_at)",
        "CREATE INDEX studies_status ON studies (status, received_at)",
        """
        CREATE TABLE instances (
            sop_uid TEXT PRIMARY KEY,
            study_uid TEXT NOT NULL REFERENCES studies (study_uid),
            series_uid TEXT,
            sop_class_uid TEXT,
            source TEXT NOT NULL,
            spool_path TEXT,
            status TEXT NOT NULL DEFAULT 'received'
                CHECK (status IN ('received', 'processing', 'done', 'failed')),
            error_code TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            received_at {timestamp} NOT NULL,
            updated_at {timestamp} NOT NULL
        )""",
        "CREATE INDEX instances_study ON instances (study_uid)",
        "CREATE INDEX instances_status ON instances (status, received_at)",
        """
        CREATE TABLE findings (
            sop_uid TEXT PRIMARY KEY REFERENCES instances (sop_uid),
            study_uid TEXT NOT NULL REFERENCES studies (study_uid),
            score DOUBLE PRECISION NOT NULL,
            label TEXT NOT NULL,
            priority TEXT NOT NULL CHECK (priority IN ('STAT', 'URGENT', 'ROUTINE')),
            threshold DOUBLE PRECISION NOT NULL,
            rle TEXT NOT NULL,
            instances_json TEXT NOT NULL,
            models_json TEXT NOT NULL,
            created_at {timestamp} NOT NULL
        )""",
        "CREATE INDEX findings_study ON findings (study_uid)",
        """
        CREATE TABLE deliveries (
            id {id_pk},
            study_uid TEXT NOT NULL REFERENCES studies (study_uid),
            object_uid TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('SEG', 'SR', 'SC')),
            destination TEXT NOT NULL,
            path TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL CHECK (max_attempts >= 1),
            last_error TEXT,
            next_attempt_at {timestamp},
            created_at {timestamp} NOT NULL,
            updated_at {timestamp} NOT NULL,
            delivered_at {timestamp},
            UNIQUE (object_uid, destination)
        )""",
        "CREATE INDEX deliveries_due ON deliveries (state, next_attempt_at)",
        "CREATE INDEX deliveries_study ON deliveries (study_uid)",
    )),
    # Nullable: rows received before it, and instances whose bytes were never kept (HTTP), have no digest.
    # The listener compares a repeated SOP Instance UID's bytes against it (issue 13 §3).
    Migration(2, "instances.sha256: digest of the bytes received", (
        "ALTER TABLE instances ADD COLUMN sha256 TEXT",
    )),
    # Issue 13 §9: a triaged instance whose SEG/SR/SC could not be written stays "outputs pending" (status
    # done, `outputs_due_at` set) and is retried with backoff across restarts; columns rather than a new
    # status value, because SQLite cannot change the status CHECK without rebuilding the table.
    Migration(3, "instances.outputs_due_at, outputs_attempts: result objects still to make", (
        "ALTER TABLE instances ADD COLUMN outputs_attempts INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE instances ADD COLUMN outputs_due_at {timestamp}",
        "CREATE INDEX instances_outputs_due ON instances (outputs_due_at)",
    )),
    # Issue 14 §5: pushed notifications (HL7 ORU^R01 to a RIS, a signed webhook), a durable outbox sent by the
    # delivery dispatcher's machinery. A table of its own: see service/store/notifications.py for why. The
    # UNIQUE key is the rule "one notification per study priority raise and channel".
    Migration(4, "notifications: the outbox of pushed notifications", (
        """
        CREATE TABLE notifications (
            id {id_pk},
            study_uid TEXT NOT NULL REFERENCES studies (study_uid),
            channel TEXT NOT NULL CHECK (channel IN ('hl7', 'webhook')),
            priority TEXT NOT NULL CHECK (priority IN ('STAT', 'URGENT', 'ROUTINE')),
            payload TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL CHECK (max_attempts >= 1),
            last_error TEXT,
            next_attempt_at {timestamp},
            created_at {timestamp} NOT NULL,
            updated_at {timestamp} NOT NULL,
            sent_at {timestamp},
            UNIQUE (study_uid, channel, priority)
        )""",
        "CREATE INDEX notifications_due ON notifications (state, next_attempt_at)",
    )),
    # Issue 14 §3: readers' verdicts (service/store/feedback.py). Rows are never updated but for
    # `superseded_at` (a reader's changed verdict stays as history); the partial UNIQUE index is the rule "one
    # current verdict per reader and study" (SQLite >= 3.8 and PostgreSQL both index a WHERE). studies_updated
    # lets `latest_change` read the newest updated_at from an index (the live pages poll it twice a second).
    Migration(5, "feedback: readers' verdicts; studies_updated: the live pages' change token", (
        """
        CREATE TABLE feedback (
            id {id_pk},
            study_uid TEXT NOT NULL REFERENCES studies (study_uid),
            sop_uid TEXT NOT NULL REFERENCES findings (sop_uid),
            reader TEXT NOT NULL,
            verdict TEXT NOT NULL CHECK (verdict IN ('agree', 'disagree', 'uncertain')),
            priority TEXT NOT NULL CHECK (priority IN ('STAT', 'URGENT', 'ROUTINE')),
            score DOUBLE PRECISION NOT NULL,
            models_json TEXT NOT NULL,
            created_at {timestamp} NOT NULL,
            superseded_at {timestamp}
        )""",
        "CREATE UNIQUE INDEX feedback_current ON feedback (study_uid, reader) WHERE superseded_at IS NULL",
        "CREATE INDEX feedback_study ON feedback (study_uid)",
        "CREATE INDEX feedback_created ON feedback (created_at)",
        "CREATE INDEX studies_updated ON studies (updated_at)",
    )),
    # Issue 17 §3: several dispatchers on one store. A claim (claims.py) writes its token here and moves the
    # row's next attempt to the end of its lease; an attempt clears it. NULL: not claimed (or claimed before).
    Migration(6, "deliveries.claim, notifications.claim: the dispatcher's lease token", (
        "ALTER TABLE deliveries ADD COLUMN claim TEXT",
        "ALTER TABLE notifications ADD COLUMN claim TEXT",
    )),
    # Issue 17 §1: several listeners on one store. Each instance received over DICOM names the listener that
    # holds its spool file; recovery, retention and outputs retries touch only their own. NULL: received over
    # HTTP, or before this migration (then the listener whose spool holds the file adopts it).
    Migration(7, "instances.listener: the DICOM listener that owns the instance's spool file", (
        "ALTER TABLE instances ADD COLUMN listener TEXT",
        "CREATE INDEX instances_listener ON instances (listener, status)",
    )),
    # Issue 17 §4: result objects readable from any replica. A copy of each result file (SEG, SR, SC, overlay
    # PNG) up to PTX_RESULTS_DATABASE_MAX_BYTES; the local folder stays the writer's copy and the default.
    Migration(8, "result_objects: result files kept in the database", (
        """
        CREATE TABLE result_objects (
            study_uid TEXT NOT NULL,
            sop_uid TEXT NOT NULL,
            name TEXT NOT NULL,
            data {blob} NOT NULL,
            size INTEGER NOT NULL,
            created_at {timestamp} NOT NULL,
            PRIMARY KEY (study_uid, sop_uid, name)
        )""",
        "CREATE INDEX result_objects_created ON result_objects (created_at)",
    )),
)

LATEST_VERSION = MIGRATIONS[-1].version


def _check_numbering() -> None:
    """Versions 1, 2, 3…: a gap or a duplicate would make `schema_migrations` ambiguous."""
    versions = [m.version for m in MIGRATIONS]
    if versions != list(range(1, len(versions) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..{len(versions)} in order, got {versions}")


_check_numbering()
