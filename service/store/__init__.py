"""The results store: studies, instances, findings, worklist state, deliveries, notifications, verdicts (#5).

    open_store(settings.database_url, settings.data_dir) → ResultsStore

SQLite in `<data_dir>/ptx.sqlite3` by default; `sqlite:///relative.db` or `sqlite:////absolute.db` (the
SQLAlchemy convention: the path follows the third slash) for another file; `postgresql://user@host/db` (or
`postgres://`) for PostgreSQL. The interface and its records are in `base.py`, the SQL in `sql.py`, each
database's differences in `sqlite.py` / `postgres.py`, the schema in `migrations.py`; the notification outbox
and the readers' verdicts have their records and rules in `notifications.py` and `feedback.py`, the
outboxes' claims (several dispatchers on one store) in `claims.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from service.store.base import (
    DEFAULT_MAX_ATTEMPTS,
    INTERNAL_ERROR,
    SPOOL_MISSING,
    DeliveryKind,
    DeliveryRecord,
    DeliveryState,
    FindingRecord,
    InstanceRecord,
    InstanceStatus,
    NotFoundError,
    ReceivedInstance,
    ResultsStore,
    SchemaTooNewError,
    StoreError,
    StudyRecord,
    StudyStatus,
    WorklistItem,
    utc_now,
)
from service.store.claims import DEFAULT_LEASE_S, Claim
from service.store.digests import dataset_sha256, file_dataset_sha256
from service.store.feedback import FeedbackRecord, Verdict
from service.store.migrations import LATEST_VERSION
from service.store.notifications import (
    DEFAULT_NOTIFY_ATTEMPTS,
    NotificationChannel,
    NotificationRecord,
    NotificationState,
)
from service.store.sql import Dialect, SqlResultsStore

SQLITE_FILE = "ptx.sqlite3"


def dialect_for(database_url: str | None, data_dir: Path) -> Dialect:
    """The database a URL names (None or empty: SQLite under `data_dir`), creating SQLite's folder."""
    from service.store.postgres import PostgresDialect
    from service.store.sqlite import SqliteDialect

    if not database_url:
        path = data_dir / SQLITE_FILE
    elif database_url.startswith("sqlite:///"):
        rest = database_url.removeprefix("sqlite:///")
        if not rest or rest == ":memory:":
            raise ValueError("PTX_DATABASE_URL must name a SQLite file (an in-memory database would be one per "
                             "connection and gone at exit), e.g. sqlite:////var/lib/ptx/ptx.sqlite3")
        path = Path(rest)
    elif database_url.split("://", 1)[0] in ("postgresql", "postgres"):
        return PostgresDialect(database_url)
    else:
        scheme = database_url.split(":", 1)[0] if ":" in database_url else database_url[:12]
        raise ValueError(f"PTX_DATABASE_URL must start with sqlite:/// or postgresql://, got {scheme!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteDialect(path)


def open_store(database_url: str | None, data_dir: Path, *, pool_size: int = 4,
               clock: Callable[[], datetime] = utc_now) -> ResultsStore:
    """Open the store and bring its schema up to date (refusing a database newer than this code)."""
    store = SqlResultsStore(dialect_for(database_url, data_dir), pool_size=pool_size, clock=clock)
    try:
        store.migrate()
    except BaseException:
        store.close()
        raise
    return store


__all__ = [
    "DEFAULT_LEASE_S", "DEFAULT_MAX_ATTEMPTS", "DEFAULT_NOTIFY_ATTEMPTS", "INTERNAL_ERROR", "LATEST_VERSION",
    "SPOOL_MISSING", "Claim", "DeliveryKind", "DeliveryRecord", "DeliveryState", "FeedbackRecord", "FindingRecord",
    "InstanceRecord", "InstanceStatus", "NotFoundError", "NotificationChannel", "NotificationRecord",
    "NotificationState", "ReceivedInstance", "ResultsStore", "SchemaTooNewError", "StoreError", "StudyRecord",
    "StudyStatus", "Verdict", "WorklistItem", "dataset_sha256", "dialect_for", "file_dataset_sha256", "open_store",
]
