"""SQLite, the default: one file under the data directory, in WAL mode.

WAL lets readers (the worklist API) run while a writer commits; `synchronous=FULL` makes each commit durable
before C-STORE answers success (NORMAL could lose the last commits on power loss, which would break "every
instance that got a success status has a worklist entry"); `busy_timeout` makes concurrent writers, threads
or processes, wait for the lock instead of failing. Writes open with `BEGIN IMMEDIATE`: a deferred
transaction that reads and then writes can fail with SQLITE_BUSY on the upgrade, whatever the timeout.
Timestamps are ISO 8601 text with microseconds, always in UTC, so text order is time order.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

from service.store.base import StoreError
from service.store.sql import Connection, Dialect


class SqliteDialect(Dialect):
    types: ClassVar[Mapping[str, str]] = {"timestamp": "TEXT", "id_pk": "INTEGER PRIMARY KEY", "blob": "BLOB"}
    begin_write = "BEGIN IMMEDIATE"

    def __init__(self, path: Path, busy_timeout_s: float = 30.0) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s

    def describe(self) -> str:
        return f"SQLite database {self.path}"

    def connect(self) -> Connection:
        connection = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None,
                                     check_same_thread=False)  # the pool hands it to one thread at a time
        connection.row_factory = sqlite3.Row
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            connection.close()
            raise StoreError(f"{self.describe()} cannot use write-ahead logging (journal_mode is {mode!r}); "
                             f"put it on a local file system")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("PRAGMA foreign_keys=ON")
        return connection  # type: ignore[return-value]

    def timestamp(self, value: datetime) -> object:
        return value.astimezone(UTC).isoformat(timespec="microseconds")
