"""The readers' verdicts in SQL (feedback.py says what the rules are): mixed into `sql.SqlResultsStore`.

Why a mixin of its own: `sql.py` holds every other statement and is long already; this part only needs the
store's transactions, its clock and its dialect's timestamps, which `SqlResultsStore` provides.

How "never covering a priority the reader did not see" holds under concurrency: the verdict's transaction
first UPDATEs the study's row on the condition that its priority is still the one seen (and, for a later
verdict, that it is reviewed). In PostgreSQL that UPDATE takes the row's lock and re-reads the row once a
concurrent finding commits, exactly as `acknowledge` does, so a finding that raises the priority either
commits first (the verdict is refused) or after (the verdict was at the priority then current, and the
finding reopens the study). In SQLite writers are serialised (BEGIN IMMEDIATE). The same lock serialises
two verdicts of one reader on one study, so the supersede-then-insert below sees the other's row; the
partial UNIQUE index (one current verdict per reader and study) backs it up.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, NoReturn, Protocol

from service.cascade.finding import Priority
from service.store.base import (
    NotFoundError,
    StoreError,
    StudyStatus,
    read_timestamp,
    require_utc,
)
from service.store.feedback import (
    MAX_EXPORT,
    FeedbackLog,
    FeedbackRecord,
    Verdict,
    check_reader,
)

FEEDBACK_COLUMNS = ("id, study_uid, sop_uid, reader, verdict, priority, score, models_json, created_at, "
                    "superseded_at")


class _Tx(Protocol):
    """What `sql.Transaction` offers."""

    def execute(self, sql: str, params: Sequence[Any] = ...) -> Any: ...

    def one(self, sql: str, params: Sequence[Any] = ...) -> Mapping[str, Any] | None: ...

    def all(self, sql: str, params: Sequence[Any] = ...) -> list[Mapping[str, Any]]: ...


class SqlFeedback(FeedbackLog):
    """`FeedbackLog` over the store's transactions."""

    @abstractmethod
    def _transaction(self, write: bool) -> AbstractContextManager[_Tx]: ...

    @abstractmethod
    def _now(self) -> object: ...

    @abstractmethod
    def _stored(self, value: datetime) -> object:
        """A UTC datetime as the database stores it (the dialect's `timestamp`)."""

    def give_feedback(self, study_uid: str, reader: str, verdict: Verdict, *, seen: Priority,
                      acknowledge: bool = False) -> tuple[FeedbackRecord, bool]:
        reader, verdict = check_reader(reader), Verdict(verdict)
        if seen is None:
            raise ValueError("a study without a finding has no result to judge: a verdict needs the priority seen")
        seen = Priority(seen)
        now = self._now()
        with self._transaction(write=True) as tx:
            if acknowledge:  # acknowledge()'s compare-and-set, with the reader
                updated = tx.execute("UPDATE studies SET status = ?, reviewed_at = ?, reviewed_by = ?, updated_at = ? "
                                     "WHERE study_uid = ? AND priority = ?",
                                     (StudyStatus.REVIEWED.value, now, reader, now, study_uid, seen.value))
            else:  # changes nothing; it is the condition, and (PostgreSQL) the row's lock
                updated = tx.execute("UPDATE studies SET status = status WHERE study_uid = ? AND priority = ? "
                                     "AND status = ?", (study_uid, seen.value, StudyStatus.REVIEWED.value))
            if updated.rowcount == 0:
                _refused(tx, study_uid, seen)
            judged = _judged_finding(tx, study_uid)
            current = tx.one(f"SELECT {FEEDBACK_COLUMNS} FROM feedback WHERE study_uid = ? AND reader = ? "
                             "AND superseded_at IS NULL", (study_uid, reader))
            if current is not None and (current["verdict"], current["priority"]) == (verdict.value, seen.value):
                return _record(current), False  # the same verdict again (a resent form): nothing to add
            if current is not None:
                tx.execute("UPDATE feedback SET superseded_at = ? WHERE id = ?", (now, current["id"]))
            row = tx.one(f"INSERT INTO feedback (study_uid, sop_uid, reader, verdict, priority, score, models_json, "
                         f"created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING {FEEDBACK_COLUMNS}",
                         (study_uid, judged["sop_uid"], reader, verdict.value, seen.value, float(judged["score"]),
                          judged["models_json"], now))
        if row is None:
            raise StoreError(f"the verdict on study {study_uid} was not stored (INSERT returned no row)")
        return _record(row), True

    def feedback(self, study_uid: str | None = None, since: datetime | None = None, after: int = 0,
                 limit: int = MAX_EXPORT) -> list[FeedbackRecord]:
        if not 1 <= limit <= MAX_EXPORT:
            raise ValueError(f"limit must be in 1..{MAX_EXPORT}, got {limit}")
        where, params = ["id > ?"], [int(after)]
        if study_uid is not None:
            where.append("study_uid = ?")
            params.append(study_uid)
        if since is not None:
            where.append("created_at >= ?")
            params.append(self._stored(require_utc(since, "since")))
        with self._transaction(write=False) as tx:
            rows = tx.all(f"SELECT {FEEDBACK_COLUMNS} FROM feedback WHERE {' AND '.join(where)} ORDER BY id LIMIT ?",
                          (*params, limit))
        return [_record(row) for row in rows]


def _refused(tx: _Tx, study_uid: str, seen: Priority) -> NoReturn:
    """Why the study's conditional UPDATE matched nothing: unknown, raised since, or not reviewed yet."""
    row = tx.one("SELECT priority, status FROM studies WHERE study_uid = ?", (study_uid,))
    if row is None:
        raise NotFoundError(f"no study {study_uid} on the worklist")
    if row["priority"] != seen.value:
        raise StoreError(f"study {study_uid} changed since it was seen at {seen.value}: its priority is now "
                         f"{row['priority'] or 'none (no finding yet)'}; read it again before giving a verdict")
    raise StoreError(f"study {study_uid} is {row['status']}, not reviewed yet: a verdict is given with its "
                     f"acknowledgement (or later, once it is reviewed)")


def _judged_finding(tx: _Tx, study_uid: str) -> Mapping[str, Any]:
    """The finding that set the study's priority: highest priority, then highest score, then earliest (as
    the pages' `rows.priority_finding`). A study has a handful of findings: chosen here, not in SQL."""
    rows = tx.all("SELECT sop_uid, score, priority, models_json, created_at FROM findings WHERE study_uid = ?",
                  (study_uid,))
    if not rows:
        raise StoreError(f"study {study_uid} has a priority but no finding: nothing to judge")
    return min(rows, key=lambda r: (Priority(r["priority"]).rank, -float(r["score"]),
                                    read_timestamp(r["created_at"]), r["sop_uid"]))


def _record(row: Mapping[str, Any]) -> FeedbackRecord:
    created = read_timestamp(row["created_at"])
    if created is None:
        raise StoreError("a verdict's created_at came back NULL")
    return FeedbackRecord(id=int(row["id"]), study_uid=row["study_uid"], sop_uid=row["sop_uid"],
                          reader=row["reader"], verdict=Verdict(row["verdict"]), priority=Priority(row["priority"]),
                          score=float(row["score"]), models=json.loads(row["models_json"]), created_at=created,
                          superseded_at=read_timestamp(row["superseded_at"]))
