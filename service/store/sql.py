"""The results store in plain SQL, shared by both databases (long: every statement of the store, written once).

The statements are written once, with `?` parameters (never formatted values), in the SQL that SQLite ≥ 3.35
and PostgreSQL ≥ 10 both speak: `ON CONFLICT … DO NOTHING` for idempotent inserts, `RETURNING`, `CASE` for
the priority rank. Every operation is one short transaction on a pooled connection, so several threads (and
several processes, each with its own store) can share a database; the read-modify-write steps (priority
upgrade, delivery attempt) are single `UPDATE` statements, so they need no row locks of their own. The
outboxes' claims (claims.py) take row locks, `FOR UPDATE SKIP LOCKED`, where the database has them.
"""

from __future__ import annotations

import json
import secrets
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, NoReturn, Protocol, TypeVar

from service.cascade.finding import Priority
from service.store.base import (
    DEFAULT_MAX_ATTEMPTS,
    INTERNAL_ERROR,
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
    read_timestamp,
    require_utc,
    utc_now,
)
from service.store.claims import Claim, check_lease, owned_token
from service.store.feedback_sql import SqlFeedback
from service.store.migrations import LATEST_VERSION, MIGRATIONS, SCHEMA_MIGRATIONS
from service.store.notifications import (
    DEFAULT_NOTIFY_ATTEMPTS,
    NotificationChannel,
    NotificationRecord,
    NotificationState,
)

StateT = TypeVar("StateT", bound=Enum)  # an outbox's state enum (DeliveryState, NotificationState)
Row = Mapping[str, Any]


class Cursor(Protocol):
    rowcount: int

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """What both `sqlite3.Connection` and `psycopg.Connection` offer, and all the store uses."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...

    def close(self) -> None: ...


class Dialect(ABC):
    """Everything that differs between the databases, in one place."""

    types: Mapping[str, str]  # fills the migrations' {timestamp}, {id_pk} and {blob}
    begin_write = "BEGIN"
    begin_read = "BEGIN"
    migration_lock: str | None = None  # taken first in the migration transaction, where BEGIN alone is not enough
    skip_locked = ""  # after a claim's SELECT: rows another transaction is claiming are skipped, not waited for

    @abstractmethod
    def connect(self) -> Connection:
        """A new connection in autocommit mode (the store issues BEGIN/COMMIT), rows addressable by name."""

    @abstractmethod
    def describe(self) -> str:
        """The database in words for messages, without credentials."""

    def sql(self, text: str) -> str:
        """The statement in the driver's parameter style (the store writes `?`)."""
        return text

    @abstractmethod
    def timestamp(self, value: datetime) -> object:
        """A UTC datetime as this database stores it."""

    def is_broken(self, connection: Connection) -> bool:
        return False


def _ts(value: datetime | str) -> datetime:
    result = read_timestamp(value)
    if result is None:
        raise StoreError("a NOT NULL timestamp came back NULL")
    return result


class _Lease:
    """A pooled connection for one transaction; `discard()` keeps a connection in doubt out of the pool."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.discarded = False

    def discard(self) -> None:
        self.discarded = True


class ConnectionPool:
    """At most `size` connections, opened on demand and reused (last in, first out)."""

    def __init__(self, dialect: Dialect, size: int, wait_s: float = 60.0) -> None:
        if size < 1:
            raise ValueError(f"pool size must be at least 1, got {size}")
        self._dialect = dialect
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self._wait_s = wait_s
        self._closed = False

    @contextmanager
    def lease(self) -> Iterator[_Lease]:
        if self._closed:
            raise StoreError("the results store is closed")
        if not self._slots.acquire(timeout=self._wait_s):
            raise StoreError(f"no connection to {self._dialect.describe()} came free within {self._wait_s:.0f} s")
        try:
            with self._lock:
                connection = self._idle.pop() if self._idle else None
            lease = _Lease(connection if connection is not None else self._dialect.connect())
            try:
                yield lease
            finally:
                if lease.discarded or self._closed or self._dialect.is_broken(lease.connection):
                    lease.connection.close()
                else:
                    with self._lock:
                        self._idle.append(lease.connection)
        finally:
            self._slots.release()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


class Transaction:
    """Statements inside one open transaction, translated to the dialect's parameter style."""

    def __init__(self, connection: Connection, dialect: Dialect) -> None:
        self._connection = connection
        self._dialect = dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._connection.execute(self._dialect.sql(sql), tuple(params))

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        rows = self.all(sql, params)  # fetch to the end: SQLite cannot COMMIT with a statement still stepping
        return rows[0] if rows else None

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return list(self.execute(sql, params).fetchall())


class _Duplicate(Exception):
    """Raised inside `receive` to roll back a study row created for an instance that turned out known."""


RANK = "CASE priority WHEN 'STAT' THEN 0 WHEN 'URGENT' THEN 1 ELSE 2 END"  # NULL (pending) sorts as ROUTINE
STUDY_COLUMNS = "study_uid, status, priority, score, received_at, updated_at, reviewed_at, reviewed_by"
INSTANCE_COLUMNS = ("sop_uid, study_uid, series_uid, sop_class_uid, source, spool_path, status, error_code, "
                    "attempts, received_at, updated_at, sha256, outputs_attempts, outputs_due_at, listener")
FINDING_COLUMNS = "sop_uid, score, label, priority, threshold, rle, instances_json, models_json, created_at"
CLAIMED_ANEW = ("was claimed again after this claim's lease ran out: its attempt is the new holder's to "
                "record (claims.py)")
DELIVERY_COLUMNS = ("id, study_uid, object_uid, kind, destination, path, state, attempts, max_attempts, "
                    "last_error, next_attempt_at, created_at, updated_at, delivered_at")
NOTIFICATION_COLUMNS = ("id, study_uid, channel, priority, payload, state, attempts, max_attempts, last_error, "
                        "next_attempt_at, created_at, updated_at, sent_at")


class SqlResultsStore(SqlFeedback, ResultsStore):
    """`ResultsStore` over a `Dialect`; `clock` is injectable so tests control every timestamp. The readers'
    verdicts' statements are in `feedback_sql.SqlFeedback`, which uses this class's transactions."""

    def __init__(self, dialect: Dialect, pool_size: int = 4, clock: Callable[[], datetime] = utc_now) -> None:
        self._dialect = dialect
        self._pool = ConnectionPool(dialect, pool_size)
        self._clock = clock

    def __repr__(self) -> str:
        return f"SqlResultsStore({self._dialect.describe()})"

    def _now(self) -> object:
        return self._dialect.timestamp(require_utc(self._clock(), "clock()"))

    def _stored(self, value: datetime) -> object:
        return self._dialect.timestamp(value)

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[Transaction]:
        with self._pool.lease() as lease:
            lease.connection.execute(self._dialect.begin_write if write else self._dialect.begin_read)
            try:
                yield Transaction(lease.connection, self._dialect)
                lease.connection.execute("COMMIT")
            except BaseException:
                try:
                    lease.connection.execute("ROLLBACK")
                except Exception:  # noqa: BLE001 -- the original error is the one to see; the connection is done
                    lease.discard()
                raise

    # --- schema ---------------------------------------------------------------------------------------------

    def migrate(self) -> int:
        types = self._dialect.types
        with self._transaction(write=True) as tx:
            if self._dialect.migration_lock:
                tx.execute(self._dialect.migration_lock)
            tx.execute(SCHEMA_MIGRATIONS.format(**types))
            row = tx.one("SELECT MAX(version) AS version FROM schema_migrations")
            current = int(row["version"]) if row and row["version"] is not None else 0
            if current > LATEST_VERSION:
                raise SchemaTooNewError(
                    f"{self._dialect.describe()} has schema version {current}, but this ptx-triage knows "
                    f"migrations only up to version {LATEST_VERSION}: it was written by a newer release. Run "
                    f"that release (or a later one), or point PTX_DATABASE_URL at another database; "
                    f"nothing was changed.")
            for migration in MIGRATIONS[current:]:
                for statement in migration.statements:
                    tx.execute(statement.format(**types))
                tx.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                           (migration.version, migration.name, self._now()))
        return LATEST_VERSION

    # --- instances ------------------------------------------------------------------------------------------

    def receive(self, instance: ReceivedInstance) -> bool:
        received = self._dialect.timestamp(instance.received_at)
        try:
            with self._transaction(write=True) as tx:
                tx.execute("INSERT INTO studies (study_uid, status, received_at, updated_at) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT (study_uid) DO NOTHING",
                           (instance.study_uid, StudyStatus.PENDING.value, received, received))
                inserted = tx.execute(
                    "INSERT INTO instances (sop_uid, study_uid, series_uid, sop_class_uid, source, spool_path, "
                    "status, received_at, updated_at, sha256, listener) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (sop_uid) DO NOTHING",
                    (instance.sop_uid, instance.study_uid, instance.series_uid, instance.sop_class_uid,
                     instance.source, instance.spool_path, InstanceStatus.RECEIVED.value, received, received,
                     instance.sha256, instance.listener))
                if inserted.rowcount == 0:
                    raise _Duplicate  # roll back: no study row for a repeat that named another study
        except _Duplicate:
            return False
        return True

    def pending_instances(self, limit: int | None = None, listener: str | None = None) -> list[InstanceRecord]:
        params: list[Any] = [InstanceStatus.RECEIVED.value, InstanceStatus.PROCESSING.value]
        sql = (f"SELECT {INSTANCE_COLUMNS} FROM instances WHERE status IN (?, ?)" + _owned_by(listener, params)
               + " ORDER BY received_at, sop_uid")
        if limit is not None:
            _check_limit(limit)
            sql += " LIMIT ?"
            params.append(limit)
        with self._transaction(write=False) as tx:
            return [_instance(row) for row in tx.all(sql, params)]

    def mark_instance(self, sop_uid: str, status: InstanceStatus, error_code: str | None = None) -> None:
        status = InstanceStatus(status)
        if status is InstanceStatus.OUTPUTS_PENDING:
            raise ValueError("outputs_pending is set by defer_outputs (with its due time), not mark_instance")
        if (status is InstanceStatus.FAILED) != (error_code is not None):
            raise ValueError(f"an instance marked {status.value} needs "
                             f"{'an error code' if status is InstanceStatus.FAILED else 'no error code'}, "
                             f"got {error_code!r}")
        with self._transaction(write=True) as tx:
            updated = tx.execute(
                "UPDATE instances SET status = ?, error_code = ?, attempts = attempts + ?, updated_at = ? "
                "WHERE sop_uid = ?",
                (status.value, error_code, int(status is InstanceStatus.PROCESSING), self._now(), sop_uid))
            if updated.rowcount == 0:
                raise NotFoundError(f"no instance with SOP Instance UID {sop_uid!r} was received")

    def retry_instance(self, sop_uid: str) -> InstanceRecord:
        with self._transaction(write=True) as tx:
            row = tx.one(f"UPDATE instances SET status = ?, error_code = NULL, attempts = 0, updated_at = ? "
                         f"WHERE sop_uid = ? AND status = ? AND error_code = ? AND spool_path IS NOT NULL "
                         f"RETURNING {INSTANCE_COLUMNS}",
                         (InstanceStatus.RECEIVED.value, self._now(), sop_uid, InstanceStatus.FAILED.value,
                          INTERNAL_ERROR))
            if row is None:
                existing = tx.one("SELECT status, error_code, spool_path FROM instances WHERE sop_uid = ?",
                                  (sop_uid,))
                if existing is None:
                    raise NotFoundError(f"no instance with SOP Instance UID {sop_uid!r} was received")
                if existing["status"] != InstanceStatus.FAILED.value:
                    why = f"is {existing['status']}; only a failed instance can be retried"
                elif existing["error_code"] != INTERNAL_ERROR:
                    why = (f"was rejected ({existing['error_code']}) for its content; it would be rejected again "
                           f"(only {INTERNAL_ERROR} failures can be retried)")
                else:
                    why = "came over HTTP: the service kept no bytes to triage again"
                raise StoreError(f"instance {sop_uid} {why}")
        return _instance(row)

    # --- result objects still to make -----------------------------------------------------------------------

    def defer_outputs(self, sop_uid: str, due_at: datetime) -> InstanceRecord:
        due = self._dialect.timestamp(require_utc(due_at, "due_at"))
        with self._transaction(write=True) as tx:
            row = tx.one(f"UPDATE instances SET outputs_due_at = ?, outputs_attempts = outputs_attempts + 1, "
                         f"updated_at = ? WHERE sop_uid = ? AND status = ? RETURNING {INSTANCE_COLUMNS}",
                         (due, self._now(), sop_uid, InstanceStatus.DONE.value))
            if row is None:
                _no_finding(tx, sop_uid)
        return _instance(row)

    def settle_outputs(self, sop_uid: str, error_code: str | None = None) -> None:
        with self._transaction(write=True) as tx:
            updated = tx.execute("UPDATE instances SET outputs_due_at = NULL, error_code = ?, updated_at = ? "
                                 "WHERE sop_uid = ? AND status = ?",
                                 (error_code, self._now(), sop_uid, InstanceStatus.DONE.value))
            if updated.rowcount == 0:
                _no_finding(tx, sop_uid)

    def adopt_instance(self, sop_uid: str, listener: str) -> InstanceRecord | None:
        if not listener:
            raise ValueError("listener must name the listener taking the instance (PTX_LISTENER_NAME)")
        with self._transaction(write=True) as tx:
            row = tx.one(f"UPDATE instances SET listener = ? WHERE sop_uid = ? AND listener IS NULL "
                         f"AND spool_path IS NOT NULL RETURNING {INSTANCE_COLUMNS}", (listener, sop_uid))
        return None if row is None else _instance(row)

    def due_outputs(self, now: datetime | None = None, listener: str | None = None) -> list[InstanceRecord]:
        params: list[Any] = [InstanceStatus.DONE.value]
        sql = (f"SELECT {INSTANCE_COLUMNS} FROM instances WHERE status = ? AND outputs_due_at IS NOT NULL"
               + _owned_by(listener, params))
        if now is not None:
            sql += " AND outputs_due_at <= ?"
            params.append(self._dialect.timestamp(require_utc(now, "now")))
        with self._transaction(write=False) as tx:
            return [_instance(row) for row in tx.all(sql + " ORDER BY outputs_due_at, sop_uid", params)]

    # --- findings and the worklist --------------------------------------------------------------------------

    def record_finding(self, finding: FindingRecord) -> bool:
        now = self._now()
        rank = finding.priority.rank
        with self._transaction(write=True) as tx:
            row = tx.one("SELECT study_uid FROM instances WHERE sop_uid = ?", (finding.sop_uid,))
            if row is None:
                raise NotFoundError(f"no instance with SOP Instance UID {finding.sop_uid!r} was received; "
                                    f"receive() it before recording its finding")
            study_uid = row["study_uid"]
            inserted = tx.execute(
                f"INSERT INTO findings ({FINDING_COLUMNS}, study_uid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (sop_uid) DO NOTHING",
                (finding.sop_uid, finding.score, finding.label, finding.priority.value, finding.threshold,
                 finding.rle, json.dumps(finding.instances, sort_keys=True),
                 json.dumps(finding.models, sort_keys=True), self._dialect.timestamp(finding.created_at),
                 study_uid))
            if inserted.rowcount == 0:
                return False
            tx.execute("UPDATE instances SET status = ?, error_code = NULL, updated_at = ? WHERE sop_uid = ?",
                       (InstanceStatus.DONE.value, now, finding.sop_uid))
            # One statement, so concurrent findings for one study cannot lose an upgrade. SET expressions all
            # see the row as it was: a reviewed study reopens only when this finding outranks its priority.
            tx.execute(
                f"UPDATE studies SET "
                f"status = CASE WHEN status = 'pending' THEN 'triaged' "
                f"WHEN status = 'reviewed' AND {RANK} > ? THEN 'triaged' ELSE status END, "
                f"priority = CASE WHEN priority IS NULL OR {RANK} > ? THEN ? ELSE priority END, "
                f"score = CASE WHEN score IS NULL OR score < ? THEN ? ELSE score END, "
                f"updated_at = ? WHERE study_uid = ?",
                (rank, rank, finding.priority.value, finding.score, finding.score, now, study_uid))
        return True

    def worklist(self, status: StudyStatus | None = None, priority: Priority | None = None,
                 since: datetime | None = None, limit: int = 50, offset: int = 0) -> list[WorklistItem]:
        _check_limit(limit)
        if offset < 0:
            raise ValueError(f"offset must be ≥ 0, got {offset}")
        where: list[str] = []
        params: list[Any] = []
        if status is not None:
            where.append("status = ?")
            params.append(StudyStatus(status).value)
        if priority is not None:
            where.append("priority = ?")
            params.append(Priority(priority).value)
        if since is not None:
            where.append("received_at >= ?")
            params.append(self._dialect.timestamp(require_utc(since, "since")))
        sql = (f"SELECT {STUDY_COLUMNS} FROM studies"
               + (" WHERE " + " AND ".join(where) if where else "")
               + f" ORDER BY {RANK}, received_at, study_uid LIMIT ? OFFSET ?")
        with self._transaction(write=False) as tx:
            return [_item(row) for row in tx.all(sql, [*params, limit, offset])]

    def instance(self, sop_uid: str) -> InstanceRecord | None:
        with self._transaction(write=False) as tx:
            row = tx.one(f"SELECT {INSTANCE_COLUMNS} FROM instances WHERE sop_uid = ?", (sop_uid,))
        return None if row is None else _instance(row)

    def study(self, study_uid: str) -> StudyRecord | None:
        with self._transaction(write=False) as tx:
            row = tx.one(f"SELECT {STUDY_COLUMNS} FROM studies WHERE study_uid = ?", (study_uid,))
            if row is None:
                return None
            instances = tx.all(f"SELECT {INSTANCE_COLUMNS} FROM instances WHERE study_uid = ? "
                               "ORDER BY received_at, sop_uid", (study_uid,))
            findings = tx.all(f"SELECT {FINDING_COLUMNS} FROM findings WHERE study_uid = ? "
                              "ORDER BY created_at, sop_uid", (study_uid,))
        return StudyRecord(**vars(_item(row)), instances=tuple(_instance(r) for r in instances),
                           findings=tuple(_finding(r) for r in findings))

    def studies(self, study_uids: Sequence[str]) -> dict[str, StudyRecord]:
        uids = list(dict.fromkeys(study_uids))
        if not uids:
            return {}
        marks = ", ".join("?" for _ in uids)
        with self._transaction(write=False) as tx:
            rows = tx.all(f"SELECT {STUDY_COLUMNS} FROM studies WHERE study_uid IN ({marks})", uids)
            instances = tx.all(f"SELECT {INSTANCE_COLUMNS} FROM instances WHERE study_uid IN ({marks}) "
                               "ORDER BY received_at, sop_uid", uids)
            findings = tx.all(f"SELECT study_uid, {FINDING_COLUMNS} FROM findings WHERE study_uid IN ({marks}) "
                              "ORDER BY created_at, sop_uid", uids)
        by_study: dict[str, tuple[list[Row], list[Row]]] = {row["study_uid"]: ([], []) for row in rows}
        for row in instances:
            by_study[row["study_uid"]][0].append(row)
        for row in findings:
            by_study[row["study_uid"]][1].append(row)
        return {row["study_uid"]: StudyRecord(**vars(_item(row)),
                                              instances=tuple(_instance(r) for r in by_study[row["study_uid"]][0]),
                                              findings=tuple(_finding(r) for r in by_study[row["study_uid"]][1]))
                for row in rows}

    def finding(self, sop_uid: str) -> tuple[str, FindingRecord] | None:
        with self._transaction(write=False) as tx:
            row = tx.one(f"SELECT study_uid, {FINDING_COLUMNS} FROM findings WHERE sop_uid = ?", (sop_uid,))
        return None if row is None else (row["study_uid"], _finding(row))

    def latest_change(self) -> str:
        # Two subqueries, not one SELECT COUNT(*), MAX(...): SQLite answers a lone MAX from the index.
        with self._transaction(write=False) as tx:
            row = tx.one("SELECT (SELECT COUNT(*) FROM studies) AS n, (SELECT MAX(updated_at) FROM studies) AS at")
        at = None if row is None else read_timestamp(row["at"])
        return f"{0 if row is None else int(row['n'])}@{'' if at is None else at.isoformat()}"

    def acknowledge(self, study_uid: str, by: str | None = None, *, seen: Priority | None) -> bool:
        seen_value = "" if seen is None else Priority(seen).value
        now = self._now()
        with self._transaction(write=True) as tx:
            # The compare-and-set is in the WHERE clause: a finding committed first makes this match nothing.
            updated = tx.execute("UPDATE studies SET status = ?, reviewed_at = ?, reviewed_by = ?, updated_at = ? "
                                 "WHERE study_uid = ? AND COALESCE(priority, '') = ?",
                                 (StudyStatus.REVIEWED.value, now, by, now, study_uid, seen_value))
            if updated.rowcount:
                return True
            row = tx.one("SELECT priority FROM studies WHERE study_uid = ?", (study_uid,))
        if row is None:
            return False
        current = row["priority"] or "none (no finding yet)"
        raise StoreError(f"study {study_uid} changed since it was seen at {seen_value or 'no finding yet'}: "
                         f"its priority is now {current}; read it again before acknowledging")

    # --- deliveries -----------------------------------------------------------------------------------------

    def add_delivery(self, study_uid: str, object_uid: str, kind: DeliveryKind, destination: str, path: str,
                     max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> int:
        kind = DeliveryKind(kind)
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        if not destination:
            raise ValueError("destination must name where to send the object")
        now = self._now()
        with self._transaction(write=True) as tx:
            if tx.one("SELECT 1 AS found FROM studies WHERE study_uid = ?", (study_uid,)) is None:
                raise NotFoundError(f"no study {study_uid!r} to deliver results for")
            tx.execute("INSERT INTO deliveries (study_uid, object_uid, kind, destination, path, state, attempts, "
                       "max_attempts, next_attempt_at, created_at, updated_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?) ON CONFLICT (object_uid, destination) DO NOTHING",
                       (study_uid, object_uid, kind.value, destination, path, DeliveryState.PENDING.value,
                        max_attempts, now, now, now))
            row = tx.one("SELECT id FROM deliveries WHERE object_uid = ? AND destination = ?",
                         (object_uid, destination))
        if row is None:
            raise StoreError(f"delivery of {object_uid!r} to {destination!r} vanished while being added")
        return int(row["id"])

    def due_deliveries(self, limit: int = 10, now: datetime | None = None, destination: str | None = None,
                       exclude: Collection[str] = ()) -> list[DeliveryRecord]:
        rows = self._due("deliveries", DELIVERY_COLUMNS, "destination", DeliveryState.PENDING.value, limit, now,
                         destination, exclude)
        return [_delivery(row) for row in rows]

    def _due(self, table: str, columns: str, target: str, pending: str, limit: int, now: datetime | None,
             only: str | None, exclude: Collection[str]) -> list[Any]:
        """Pending rows of an outbox (`deliveries` by destination, `notifications` by channel) whose next attempt
        is due, earliest first: `only` one target where given, none of those in `exclude`."""
        _check_limit(limit)
        at = self._dialect.timestamp(require_utc(now, "now")) if now is not None else self._now()
        where, params = ["state = ?", "next_attempt_at <= ?"], [pending, at]
        if only is not None:
            where.append(f"{target} = ?")
            params.append(only)
        if exclude:
            where.append(f"{target} NOT IN ({', '.join('?' for _ in exclude)})")
            params.extend(exclude)
        with self._transaction(write=False) as tx:
            return list(tx.all(f"SELECT {columns} FROM {table} WHERE {' AND '.join(where)} "
                               "ORDER BY next_attempt_at, id LIMIT ?", (*params, limit)))

    def delivery_attempt(self, delivery_id: int, ok: bool, error: str | None = None,
                         next_attempt_at: datetime | None = None, claim: str | None = None) -> DeliveryRecord:
        if not ok and (error is None or next_attempt_at is None):
            raise ValueError("a failed attempt needs its error and next_attempt_at (used unless it was the last)")
        now = self._now()
        # Never NULL even where unused: PostgreSQL would type a CASE of only untyped NULLs as text.
        retry_at = self._dialect.timestamp(require_utc(next_attempt_at, "next_attempt_at")) if not ok else now
        done = int(bool(ok))
        with self._transaction(write=True) as tx:
            row = tx.one(_attempt_sql("deliveries", "delivered", DELIVERY_COLUMNS, claim is not None),
                         (done, done, error, done, retry_at, done, now, now, delivery_id, DeliveryState.PENDING.value,
                          *([claim] if claim is not None else [])))
            return _updated_delivery(tx, delivery_id, row, "is already {state}; only a pending delivery takes attempts",
                                     claimed=claim is not None)

    def claim_deliveries(self, limit: int, lease_s: float, now: datetime | None = None,
                         destination: str | None = None, exclude: Collection[str] = (),
                         owner: str | None = None) -> Claim[DeliveryRecord]:
        rows, token, until = self._claim("deliveries", DELIVERY_COLUMNS, "destination", limit, lease_s, now,
                                         destination, exclude, owner)
        return Claim(token, until, sorted((_delivery(row) for row in rows), key=lambda record: record.id))

    def release_deliveries(self, token: str, due_at: datetime) -> int:
        return self._release("deliveries", token, due_at)

    def release_owned_deliveries(self, owner: str, due_at: datetime) -> int:
        return self._release_owned("deliveries", owner, due_at)

    def claim_notifications(self, limit: int, lease_s: float, now: datetime | None = None,
                            channel: str | None = None, exclude: Collection[str] = (),
                            owner: str | None = None) -> Claim[NotificationRecord]:
        rows, token, until = self._claim("notifications", NOTIFICATION_COLUMNS, "channel", limit, lease_s, now,
                                         channel, exclude, owner)
        return Claim(token, until, sorted((_notification(row) for row in rows), key=lambda record: record.id))

    def release_notifications(self, token: str, due_at: datetime) -> int:
        return self._release("notifications", token, due_at)

    def release_owned_notifications(self, owner: str, due_at: datetime) -> int:
        return self._release_owned("notifications", owner, due_at)

    def _claim(self, table: str, columns: str, target: str, limit: int, lease_s: float, now: datetime | None,
               only: str | None, exclude: Collection[str], owner: str | None = None) -> tuple[list[Row], str, datetime]:
        """One statement (claims.py): the due rows, locked and skipped if locked elsewhere, given a fresh token
        (prefixed by `owner`) and a next attempt at the lease's end. `target` is the table's destination column."""
        _check_limit(limit)
        at = require_utc(now, "now") if now is not None else require_utc(self._clock(), "clock()")
        until = at + timedelta(seconds=check_lease(lease_s))
        token = owned_token(owner, secrets.token_hex(16))
        where, params = ["state = ?", "next_attempt_at <= ?"], ["pending", self._dialect.timestamp(at)]
        if only is not None:
            where.append(f"{target} = ?")
            params.append(only)
        if exclude:
            where.append(f"{target} NOT IN ({', '.join('?' for _ in exclude)})")
            params.extend(exclude)
        with self._transaction(write=True) as tx:
            rows = tx.all(f"UPDATE {table} SET next_attempt_at = ?, claim = ? WHERE id IN (SELECT id FROM {table} "
                          f"WHERE {' AND '.join(where)} ORDER BY next_attempt_at, id LIMIT ?{self._dialect.skip_locked}"
                          f") RETURNING {columns}", (self._dialect.timestamp(until), token, *params, limit))
        return rows, token, until

    def _release(self, table: str, token: str, due_at: datetime) -> int:
        with self._transaction(write=True) as tx:
            rows = tx.all(f"UPDATE {table} SET next_attempt_at = ?, claim = NULL WHERE claim = ? AND state = ? "
                          "RETURNING id", (self._dialect.timestamp(require_utc(due_at, "due_at")), token, "pending"))
        return len(rows)

    def _release_owned(self, table: str, owner: str, due_at: datetime) -> int:
        """substr, not LIKE: a listener name may hold `_`, LIKE's wildcard."""
        prefix = owned_token(owner, "")
        with self._transaction(write=True) as tx:
            rows = tx.all(f"UPDATE {table} SET next_attempt_at = ?, claim = NULL WHERE substr(claim, 1, ?) = ? "
                          "AND state = ? RETURNING id",
                          (self._dialect.timestamp(require_utc(due_at, "due_at")), len(prefix), prefix, "pending"))
        return len(rows)

    def retry_delivery(self, delivery_id: int) -> DeliveryRecord:
        now = self._now()
        with self._transaction(write=True) as tx:
            row = tx.one(f"UPDATE deliveries SET state = ?, attempts = 0, next_attempt_at = ?, updated_at = ? "
                         f"WHERE id = ? AND state = ? RETURNING {DELIVERY_COLUMNS}",
                         (DeliveryState.PENDING.value, now, now, delivery_id, DeliveryState.FAILED.value))
            return _updated_delivery(tx, delivery_id, row, "is {state}; only a failed delivery can be retried")

    def deliveries(self, study_uid: str | None = None, state: DeliveryState | None = None) -> list[DeliveryRecord]:
        rows = self._listed("deliveries", DELIVERY_COLUMNS, study_uid,
                            None if state is None else DeliveryState(state).value)
        return [_delivery(row) for row in rows]

    def delivery_counts(self) -> dict[DeliveryState, int]:
        return self._counts("deliveries", DeliveryState)

    def _listed(self, table: str, columns: str, study_uid: str | None, state: str | None) -> list[Any]:
        """An outbox's rows (`deliveries` or `notifications`), of one study and/or in one state, oldest first."""
        where: list[str] = []
        params: list[Any] = []
        if study_uid is not None:
            where.append("study_uid = ?")
            params.append(study_uid)
        if state is not None:
            where.append("state = ?")
            params.append(state)
        sql = (f"SELECT {columns} FROM {table}" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id")
        with self._transaction(write=False) as tx:
            return list(tx.all(sql, params))

    def _counts(self, table: str, states: type[StateT]) -> dict[StateT, int]:
        """How many rows of an outbox are in each state, every state present."""
        with self._transaction(write=False) as tx:
            rows = tx.all(f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state")
        counts = dict.fromkeys(states, 0)
        counts.update({states(row["state"]): int(row["n"]) for row in rows})
        return counts

    # --- notifications (notifications.py) -------------------------------------------------------------------

    def add_notification(self, study_uid: str, channel: NotificationChannel, priority: Priority, payload: str,
                         max_attempts: int = DEFAULT_NOTIFY_ATTEMPTS) -> int | None:
        channel, priority = NotificationChannel(channel), Priority(priority)
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        now = self._now()
        with self._transaction(write=True) as tx:
            # One statement: the row is added only while the study is at `priority` (WHERE, needed anyway
            # by SQLite before ON CONFLICT in an INSERT ... SELECT), and once (the UNIQUE key).
            tx.execute("INSERT INTO notifications (study_uid, channel, priority, payload, state, attempts, "
                       "max_attempts, next_attempt_at, created_at, updated_at) "
                       "SELECT study_uid, ?, ?, ?, ?, 0, ?, ?, ?, ? FROM studies WHERE study_uid = ? AND priority = ? "
                       "ON CONFLICT (study_uid, channel, priority) DO NOTHING",
                       (channel.value, priority.value, payload, NotificationState.PENDING.value, max_attempts, now,
                        now, now, study_uid, priority.value))
            row = tx.one("SELECT id FROM notifications WHERE study_uid = ? AND channel = ? AND priority = ?",
                         (study_uid, channel.value, priority.value))
            if row is None and tx.one("SELECT 1 AS found FROM studies WHERE study_uid = ?", (study_uid,)) is None:
                raise NotFoundError(f"no study {study_uid!r} to notify about")
        return None if row is None else int(row["id"])

    def due_notifications(self, limit: int = 10, now: datetime | None = None, channel: str | None = None,
                          exclude: Collection[str] = ()) -> list[NotificationRecord]:
        rows = self._due("notifications", NOTIFICATION_COLUMNS, "channel", NotificationState.PENDING.value, limit,
                         now, channel, exclude)
        return [_notification(row) for row in rows]

    def notification_attempt(self, notification_id: int, ok: bool, error: str | None = None,
                             next_attempt_at: datetime | None = None, claim: str | None = None) -> NotificationRecord:
        if not ok and (error is None or next_attempt_at is None):
            raise ValueError("a failed attempt needs its error and next_attempt_at (used unless it was the last)")
        now = self._now()
        retry_at = self._dialect.timestamp(require_utc(next_attempt_at, "next_attempt_at")) if not ok else now
        done = int(bool(ok))
        with self._transaction(write=True) as tx:
            row = tx.one(_attempt_sql("notifications", "sent", NOTIFICATION_COLUMNS, claim is not None),
                         (done, done, error, done, retry_at, done, now, now, notification_id,
                          NotificationState.PENDING.value, *([claim] if claim is not None else [])))
            return _updated_notification(tx, notification_id, row,
                                         "is already {state}; only a pending notification takes attempts",
                                         claimed=claim is not None)

    def retry_notification(self, notification_id: int) -> NotificationRecord:
        now = self._now()
        with self._transaction(write=True) as tx:
            row = tx.one(f"UPDATE notifications SET state = ?, attempts = 0, next_attempt_at = ?, updated_at = ? "
                         f"WHERE id = ? AND state = ? RETURNING {NOTIFICATION_COLUMNS}",
                         (NotificationState.PENDING.value, now, now, notification_id, NotificationState.FAILED.value))
            return _updated_notification(tx, notification_id, row,
                                         "is {state}; only a failed notification can be retried")

    def notifications(self, study_uid: str | None = None,
                      state: NotificationState | None = None) -> list[NotificationRecord]:
        rows = self._listed("notifications", NOTIFICATION_COLUMNS, study_uid,
                            None if state is None else NotificationState(state).value)
        return [_notification(row) for row in rows]

    def notification_counts(self) -> dict[NotificationState, int]:
        return self._counts("notifications", NotificationState)

    def close(self) -> None:
        self._pool.close()


def _owned_by(listener: str | None, params: list[Any]) -> str:
    """The WHERE clause's tail keeping one listener's instances (and the spooled ones nobody owns yet, which
    predate store migration 7), its parameter appended to `params`; nothing without `listener`."""
    if listener is None:
        return ""
    params.append(listener)
    return " AND (listener = ? OR (listener IS NULL AND spool_path IS NOT NULL))"


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= 1000:
        raise ValueError(f"limit must be in 1..1000, got {limit}")


def _item(row: Row) -> WorklistItem:
    return WorklistItem(
        study_uid=row["study_uid"], status=StudyStatus(row["status"]),
        priority=None if row["priority"] is None else Priority(row["priority"]),
        score=None if row["score"] is None else float(row["score"]),
        received_at=_ts(row["received_at"]), updated_at=_ts(row["updated_at"]),
        reviewed_at=read_timestamp(row["reviewed_at"]), reviewed_by=row["reviewed_by"])


def _instance(row: Row) -> InstanceRecord:
    """A row as a record; status done with `outputs_due_at` set is outputs_pending (see InstanceStatus)."""
    status, due = InstanceStatus(row["status"]), read_timestamp(row["outputs_due_at"])
    if status is InstanceStatus.DONE and due is not None:
        status = InstanceStatus.OUTPUTS_PENDING
    return InstanceRecord(
        sop_uid=row["sop_uid"], study_uid=row["study_uid"], series_uid=row["series_uid"],
        sop_class_uid=row["sop_class_uid"], source=row["source"], spool_path=row["spool_path"],
        received_at=_ts(row["received_at"]), status=status, error_code=row["error_code"],
        attempts=int(row["attempts"]), updated_at=_ts(row["updated_at"]), sha256=row["sha256"],
        outputs_attempts=int(row["outputs_attempts"]), outputs_due_at=due, listener=row["listener"])


def _no_finding(tx: Transaction, sop_uid: str) -> NoReturn:
    """Why an outputs update matched no row: NotFoundError for an unknown instance, else StoreError."""
    existing = tx.one("SELECT status FROM instances WHERE sop_uid = ?", (sop_uid,))
    if existing is None:
        raise NotFoundError(f"no instance with SOP Instance UID {sop_uid!r} was received")
    raise StoreError(f"instance {sop_uid} is {existing['status']}: only a triaged (done) instance has result "
                     f"objects to make")


def _finding(row: Row) -> FindingRecord:
    return FindingRecord(
        sop_uid=row["sop_uid"], score=float(row["score"]), label=row["label"], priority=Priority(row["priority"]),
        threshold=float(row["threshold"]), rle=row["rle"], instances=json.loads(row["instances_json"]),
        models=json.loads(row["models_json"]), created_at=_ts(row["created_at"]))


def _updated_delivery(tx: Transaction, delivery_id: int, row: Row | None, conflict: str,
                      claimed: bool = False) -> DeliveryRecord:
    return _delivery(_updated_row(tx, "deliveries", "delivery", delivery_id, row, conflict, claimed))


def _updated_row(tx: Transaction, table: str, noun: str, row_id: int, row: Row | None, conflict: str,
                 claimed: bool) -> Row:
    """The outbox row an `UPDATE ... WHERE id = ? AND state = ? RETURNING` gave; where it gave none, why:
    NotFoundError for an unknown id, StoreError saying the claim ran out for a `claimed` attempt on a row
    still pending, else StoreError saying `conflict` with the state it is in. Both outboxes name their
    pending state 'pending'."""
    if row is None:
        existing = tx.one(f"SELECT state FROM {table} WHERE id = ?", (row_id,))
        if existing is None:
            raise NotFoundError(f"no {noun} with id {row_id}")
        if claimed and existing["state"] == "pending":
            raise StoreError(f"{noun} {row_id} {CLAIMED_ANEW}")
        raise StoreError(f"{noun} {row_id} {conflict.format(state=existing['state'])}")
    return row


def _delivery(row: Row) -> DeliveryRecord:
    return DeliveryRecord(
        id=int(row["id"]), study_uid=row["study_uid"], object_uid=row["object_uid"],
        kind=DeliveryKind(row["kind"]), destination=row["destination"], path=row["path"],
        state=DeliveryState(row["state"]), attempts=int(row["attempts"]), max_attempts=int(row["max_attempts"]),
        last_error=row["last_error"], next_attempt_at=read_timestamp(row["next_attempt_at"]),
        created_at=_ts(row["created_at"]), updated_at=_ts(row["updated_at"]),
        delivered_at=read_timestamp(row["delivered_at"]))


def _attempt_sql(table: str, done: str, columns: str, claimed: bool) -> str:
    """One attempt on an outbox row (`deliveries` or `notifications`) in one UPDATE: `done` when ok, failed
    once its attempts are spent, else pending until the given time; its claim ended; the row as it is now
    RETURNed. Parameters: ok ×2, error, ok, retry time, ok, now ×2, id, the pending state (and the claim
    token when `claimed`: only the holder of the row's current claim records)."""
    return (f"UPDATE {table} SET "
            f"state = CASE WHEN ? = 1 THEN '{done}' WHEN attempts + 1 >= max_attempts THEN 'failed' "
            "ELSE 'pending' END, "
            "last_error = CASE WHEN ? = 1 THEN last_error ELSE ? END, "
            "next_attempt_at = CASE WHEN ? = 1 OR attempts + 1 >= max_attempts THEN NULL ELSE ? END, "
            f"{done}_at = CASE WHEN ? = 1 THEN ? ELSE NULL END, "
            "attempts = attempts + 1, updated_at = ?, claim = NULL "
            f"WHERE id = ? AND state = ?{' AND claim = ?' if claimed else ''} RETURNING {columns}")


def _updated_notification(tx: Transaction, notification_id: int, row: Row | None,
                          conflict: str, claimed: bool = False) -> NotificationRecord:
    return _notification(_updated_row(tx, "notifications", "notification", notification_id, row, conflict, claimed))


def _notification(row: Row) -> NotificationRecord:
    return NotificationRecord(
        id=int(row["id"]), study_uid=row["study_uid"], channel=NotificationChannel(row["channel"]),
        priority=Priority(row["priority"]), payload=row["payload"], state=NotificationState(row["state"]),
        attempts=int(row["attempts"]), max_attempts=int(row["max_attempts"]), last_error=row["last_error"],
        next_attempt_at=read_timestamp(row["next_attempt_at"]), created_at=_ts(row["created_at"]),
        updated_at=_ts(row["updated_at"]), sent_at=read_timestamp(row["sent_at"]))
