"""Result objects kept in the database (migration 8's `result_objects`), so that every replica reads them.

    ResultsFolder.write ─▶ put(study, sop, name, data)      the bytes, up to PTX_RESULTS_DATABASE_MAX_BYTES
                       └▶ put_oversize(study, sop, name, n)  larger: a row without bytes that says so
    any replica        ─▶ get(...) · names(...)             what the writer's folder holds, from anywhere
    retention          ─▶ remove(study, sop) · stale(cutoff) with the instance's folder; rows no folder owns

Why the database and not only each replica's folder: with several listeners on one PostgreSQL store the
delivery and notification dispatchers claim rows with SKIP LOCKED, so a SEG written on listener A's volume
may be sent by listener B, and the API behind a Service may be answered by a replica that made nothing.
S3-compatible object stores are not supported (yet): the database is already shared and backed up.

Why a class over the store rather than statements in `sql.py`: these are a handful of key-value statements
that need only the store's transactions and clock; `SqlResultsStore` provides both (`_transaction`, `_now`,
`_stored`, as for `feedback_sql.SqlFeedback`). A row whose `data` is empty but whose `size` is not is the
"too large to share" marker: a reader elsewhere can then say why it has no copy instead of a bare 404.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from service.store.base import require_utc


class _Tx(Protocol):
    """What `sql.Transaction` offers."""

    def execute(self, sql: str, params: Sequence[Any] = ...) -> Any: ...

    def all(self, sql: str, params: Sequence[Any] = ...) -> list[Mapping[str, Any]]: ...


class SqlStore(Protocol):
    """What `sql.SqlResultsStore` offers its own room: transactions, its clock, the dialect's timestamps."""

    def _transaction(self, write: bool) -> AbstractContextManager[_Tx]: ...

    def _now(self) -> object: ...

    def _stored(self, value: datetime) -> object: ...


@dataclass(frozen=True)
class StoredObject:
    """One row: `data` is None where the object was over the size bound (`size` says how large it was)."""

    data: bytes | None
    size: int


class ResultObjects:
    """Put, get, list and remove result objects in the store's database (bytes in, bytes out: BLOB / BYTEA)."""

    def __init__(self, store: Any) -> None:
        if not all(hasattr(store, name) for name in ("_transaction", "_now", "_stored")):
            raise TypeError(f"result objects in the database need the SQL results store, got {type(store).__name__}")
        self._store: SqlStore = store

    def put(self, study_uid: str, sop_uid: str, name: str, data: bytes) -> None:
        """Insert or replace (results made again after a fault replace the first ones)."""
        if not data:
            raise ValueError(f"{name}: an empty result object is not stored (an empty row marks an oversize one)")
        self._upsert(study_uid, sop_uid, name, bytes(data), len(data))

    def put_oversize(self, study_uid: str, sop_uid: str, name: str, size: int) -> None:
        """Record that the object exists but, at `size` bytes, is kept in its writer's folder only."""
        if size <= 0:
            raise ValueError(f"{name}: an oversize object has a positive size, got {size}")
        self._upsert(study_uid, sop_uid, name, b"", size)

    def _upsert(self, study_uid: str, sop_uid: str, name: str, data: bytes, size: int) -> None:
        with self._store._transaction(write=True) as tx:
            tx.execute("INSERT INTO result_objects (study_uid, sop_uid, name, data, size, created_at) "
                       "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (study_uid, sop_uid, name) DO UPDATE SET "
                       "data = excluded.data, size = excluded.size, created_at = excluded.created_at",
                       (study_uid, sop_uid, name, data, size, self._store._now()))

    def get(self, study_uid: str, sop_uid: str, name: str) -> StoredObject | None:
        """The row, or None when the database has no such object."""
        with self._store._transaction(write=False) as tx:
            rows = tx.all("SELECT data, size FROM result_objects WHERE study_uid = ? AND sop_uid = ? AND name = ?",
                          (study_uid, sop_uid, name))
        if not rows:
            return None
        data, size = bytes(rows[0]["data"]), int(rows[0]["size"])
        return StoredObject(None if not data and size else data, size)

    def names(self, study_uid: str, sop_uid: str) -> list[str]:
        """The names of the instance's objects whose bytes are here (oversize markers left out), sorted."""
        with self._store._transaction(write=False) as tx:
            rows = tx.all("SELECT name FROM result_objects WHERE study_uid = ? AND sop_uid = ? AND "
                          "NOT (size > 0 AND length(data) = 0) ORDER BY name", (study_uid, sop_uid))
        return [str(row["name"]) for row in rows]

    def remove(self, study_uid: str, sop_uid: str) -> int:
        """Every object of the instance (retention); returns how many rows went."""
        with self._store._transaction(write=True) as tx:
            return int(tx.execute("DELETE FROM result_objects WHERE study_uid = ? AND sop_uid = ?",
                                  (study_uid, sop_uid)).rowcount)

    def stale(self, cutoff: datetime) -> list[tuple[str, str]]:
        """Instances whose newest object was stored before `cutoff`: for a retention sweep to remove even
        where no replica's folder holds them any more (a replica scaled away with its volume)."""
        before = self._store._stored(require_utc(cutoff, "cutoff"))
        with self._store._transaction(write=False) as tx:
            rows = tx.all("SELECT study_uid, sop_uid FROM result_objects GROUP BY study_uid, sop_uid "
                          "HAVING MAX(created_at) < ? ORDER BY study_uid, sop_uid", (before,))
        return [(str(row["study_uid"]), str(row["sop_uid"])) for row in rows]
