"""The results store, one suite over both databases: SQLite (a file) and a real PostgreSQL server.

Every timestamp comes from a controlled clock, so orders and retry times are exact. Where a test needs to
see past the interface (the migrations table, row counts) it reads the database directly.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.cascade.finding import Finding, Priority
from service.cascade.masks import Instance
from service.store import (
    LATEST_VERSION,
    DeliveryKind,
    DeliveryState,
    FindingRecord,
    InstanceStatus,
    NotFoundError,
    ReceivedInstance,
    ResultsStore,
    SchemaTooNewError,
    StoreError,
    StudyStatus,
    open_store,
)
from service.store.migrations import MIGRATIONS

T0 = datetime(2026, 1, 2, 8, 0, tzinfo=UTC)


class Clock:
    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


@dataclass
class Database:
    """One empty database of either kind; `open()` opens a store on it as another process would."""

    kind: str
    url: str
    data_dir: Path
    clock: Clock = field(default_factory=Clock)
    opened: list[ResultsStore] = field(default_factory=list)

    def open(self, **options: Any) -> ResultsStore:
        store = open_store(self.url, self.data_dir, clock=self.clock, **options)
        self.opened.append(store)
        return store

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Raw SQL past the store (literal values only)."""
        if self.kind == "sqlite":
            with closing(sqlite3.connect(self.url.removeprefix("sqlite:///"), isolation_level=None)) as connection:
                return [tuple(row) for row in connection.execute(sql).fetchall()]
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as connection:
            cursor = connection.execute(sql)
            return [tuple(row) for row in cursor.fetchall()] if cursor.description else []


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'results.sqlite3'}"  # an absolute path: sqlite:////tmp/...
    else:
        url = request.getfixturevalue("postgres_server").create_database()
    db = Database(kind=request.param, url=url, data_dir=tmp_path)
    yield db
    for store in db.opened:
        store.close()


@pytest.fixture
def store(database: Database) -> ResultsStore:
    return database.open()


def arrival(sop: str, study: str = "1.2.1", at: datetime = T0, **fields: Any) -> ReceivedInstance:
    values: dict[str, Any] = {"series_uid": f"{study}.9", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1",
                              "source": "dicom:MODALITY1", "spool_path": f"/spool/{sop}.dcm", **fields}
    return ReceivedInstance(sop_uid=sop, study_uid=study, received_at=at, **values)


def result(sop: str, priority: Priority, score: float, at: datetime = T0) -> FindingRecord:
    return FindingRecord(sop_uid=sop, score=score, label="pneumothorax" if priority != Priority.ROUTINE else
                         "no_pneumothorax", priority=priority, threshold=0.5, rle="3 4 10 2",
                         instances=[{"bbox_px": [1, 2, 3, 4], "area_mm2": 12.5}],
                         models={"classifier": {"name": "c", "version": "1"}}, created_at=at)


def minutes(n: float) -> datetime:
    return T0 + timedelta(minutes=n)


# --- schema -----------------------------------------------------------------------------------------------


def test_migrate_is_idempotent_and_records_each_version(database: Database) -> None:
    store = database.open()  # open_store migrates
    assert store.migrate() == LATEST_VERSION
    database.open().close()  # another process starting on the same database
    rows = database.query("SELECT version, name FROM schema_migrations ORDER BY version")
    assert rows == [(m.version, m.name) for m in MIGRATIONS]
    tables = {"studies", "instances", "findings", "deliveries"}
    for table in tables:
        assert database.query(f"SELECT COUNT(*) FROM {table}") == [(0,)]


def test_a_database_from_a_newer_release_is_refused(database: Database) -> None:
    database.open().close()
    future = LATEST_VERSION + 1
    database.query(f"INSERT INTO schema_migrations (version, name, applied_at) "
                   f"VALUES ({future}, 'from the future', '2030-01-01T00:00:00.000000+00:00')")
    with pytest.raises(SchemaTooNewError, match=rf"schema version {future}, .* only up to version {LATEST_VERSION}"):
        database.open()
    assert database.query("SELECT MAX(version) FROM schema_migrations") == [(future,)]


# --- instances --------------------------------------------------------------------------------------------


def test_a_repeated_sop_instance_uid_is_a_no_op(database: Database, store: ResultsStore) -> None:
    assert store.receive(arrival("1.2.1.1"))
    assert not store.receive(arrival("1.2.1.1", at=minutes(5), source="http"))
    assert not store.receive(arrival("1.2.1.1", study="9.9.9"))  # the first arrival's study wins, no orphan
    assert database.query("SELECT sop_uid, source FROM instances") == [("1.2.1.1", "dicom:MODALITY1")]
    assert database.query("SELECT study_uid FROM studies") == [("1.2.1",)]
    study = store.study("1.2.1")
    assert study is not None and [i.received_at for i in study.instances] == [T0]


def test_concurrent_receives_of_one_sop_uid_give_one_row(database: Database) -> None:
    stores = [database.open(pool_size=4), database.open(pool_size=4)]  # two processes, several threads each
    threads, start = 12, threading.Barrier(12)
    outcomes: list[bool] = []
    errors: list[BaseException] = []

    def deliver(n: int) -> None:
        try:
            start.wait()
            outcomes.append(stores[n % 2].receive(arrival("1.2.7.1", study="1.2.7")))
            outcomes.append(stores[n % 2].receive(arrival(f"1.2.7.{100 + n}", study="1.2.7")))
        except BaseException as error:  # reported below: a thread's exception would otherwise vanish
            errors.append(error)

    workers = [threading.Thread(target=deliver, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    assert errors == []
    assert sorted(outcomes).count(True) == 1 + threads  # the shared UID once, each thread's own UID once
    assert database.query("SELECT COUNT(*) FROM instances WHERE sop_uid = '1.2.7.1'") == [(1,)]
    assert database.query("SELECT COUNT(*) FROM instances") == [(1 + threads,)]
    assert database.query("SELECT COUNT(*) FROM studies") == [(1,)]


def test_unfinished_instances_resume_oldest_first_after_a_restart(database: Database) -> None:
    store = database.open()
    for sop, at in [("1.2.1.3", minutes(2)), ("1.2.1.9", minutes(0)), ("1.2.1.2", minutes(1)),
                    ("1.2.1.4", minutes(3)), ("1.2.1.5", minutes(1))]:
        store.receive(arrival(sop, at=at))  # UID order is not arrival order
    store.mark_instance("1.2.1.2", InstanceStatus.PROCESSING)  # the worker died here
    store.mark_instance("1.2.1.4", InstanceStatus.FAILED, error_code="not_chest")
    store.record_finding(result("1.2.1.3", Priority.ROUTINE, 0.1))
    store.close()

    restarted = database.open()
    pending = restarted.pending_instances()
    assert [(i.sop_uid, i.status, i.attempts) for i in pending] == [
        ("1.2.1.9", InstanceStatus.RECEIVED, 0), ("1.2.1.2", InstanceStatus.PROCESSING, 1),
        ("1.2.1.5", InstanceStatus.RECEIVED, 0)]  # same arrival time: by UID
    assert pending[0].spool_path == "/spool/1.2.1.9.dcm" and pending[0].source == "dicom:MODALITY1"
    assert [i.sop_uid for i in restarted.pending_instances(limit=1)] == ["1.2.1.9"]
    study = restarted.study("1.2.1")
    assert study is not None
    states = {i.sop_uid: (i.status, i.error_code) for i in study.instances}
    assert states["1.2.1.4"] == (InstanceStatus.FAILED, "not_chest")
    assert states["1.2.1.3"] == (InstanceStatus.DONE, None)


def test_mark_instance_checks_its_arguments(store: ResultsStore) -> None:
    store.receive(arrival("1.2.1.1"))
    with pytest.raises(NotFoundError, match="1.2.1.404"):
        store.mark_instance("1.2.1.404", InstanceStatus.DONE)
    with pytest.raises(ValueError, match="needs an error code"):
        store.mark_instance("1.2.1.1", InstanceStatus.FAILED)
    with pytest.raises(ValueError, match="needs no error code"):
        store.mark_instance("1.2.1.1", InstanceStatus.DONE, error_code="not_chest")


def test_timestamps_come_back_in_utc_and_naive_ones_are_refused(store: ResultsStore) -> None:
    local = datetime(2026, 1, 2, 10, 30, tzinfo=timezone(timedelta(hours=2)))
    store.receive(arrival("1.2.1.1", at=local))
    item = store.worklist()[0]
    assert item.received_at == local and item.received_at.utcoffset() == timedelta(0)
    with pytest.raises(ValueError, match="timezone-aware"):
        arrival("1.2.1.2", at=datetime(2026, 1, 2, 10, 30))


# --- findings and the worklist ----------------------------------------------------------------------------


def test_a_later_result_never_lowers_priority(database: Database, store: ResultsStore) -> None:
    for n in (1, 2, 3):
        store.receive(arrival(f"1.2.1.{n}"))
    assert store.record_finding(result("1.2.1.1", Priority.URGENT, 0.7))
    assert (store.worklist()[0].priority, store.worklist()[0].score) == (Priority.URGENT, 0.7)
    assert store.record_finding(result("1.2.1.2", Priority.ROUTINE, 0.2))
    item = store.worklist()[0]
    assert (item.priority, item.score, item.status) == (Priority.URGENT, 0.7, StudyStatus.TRIAGED)
    assert store.record_finding(result("1.2.1.3", Priority.STAT, 0.95))
    assert (store.worklist()[0].priority, store.worklist()[0].score) == (Priority.STAT, 0.95)
    # Re-processing after a crash: the instance already has its finding, nothing changes.
    assert not store.record_finding(result("1.2.1.2", Priority.STAT, 0.99))
    assert (store.worklist()[0].priority, store.worklist()[0].score) == (Priority.STAT, 0.95)
    assert database.query("SELECT COUNT(*) FROM findings") == [(3,)]


def test_a_finding_round_trips_and_finishes_its_instance(store: ResultsStore) -> None:
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:4, 3:6] = True
    finding = Finding(study_uid="1.2.1", series_uid="1.2.1.9", sop_uid="1.2.1.1", score=np.float32(0.8).item(),
                      positive=True, priority=Priority.URGENT, threshold=0.45, mask=mask, rle="19 2 27 2 35 2",
                      instances=[Instance(bbox_px=(3, 2, 3, 2), bbox_mm=None, area_px=6, area_mm2=None,
                                          centroid_px=(4.0, 2.5))],
                      models={"classifier": {"name": "ptx-classifier", "version": "1.0.0", "backend": "ort"}})
    record = FindingRecord.from_finding(finding, created_at=minutes(1))
    store.receive(arrival("1.2.1.1"))
    store.mark_instance("1.2.1.1", InstanceStatus.PROCESSING)
    assert store.record_finding(record)
    study = store.study("1.2.1")
    assert study is not None
    assert study.findings == (record,)
    assert study.findings[0].instances[0]["bbox_px"] == [3, 2, 3, 2]
    assert [(i.status, i.attempts) for i in study.instances] == [(InstanceStatus.DONE, 1)]
    assert store.pending_instances() == []
    assert store.study("9.9.9") is None
    with pytest.raises(NotFoundError, match="receive"):
        store.record_finding(result("1.2.1.404", Priority.STAT, 0.9))


def test_review_state_machine(database: Database, store: ResultsStore) -> None:
    clock = database.clock
    for n in (1, 2, 3):
        store.receive(arrival(f"1.2.1.{n}"))
    assert store.worklist()[0].status == StudyStatus.PENDING and store.worklist()[0].priority is None
    store.record_finding(result("1.2.1.1", Priority.URGENT, 0.7))
    assert store.worklist()[0].status == StudyStatus.TRIAGED
    clock.advance(60)
    assert store.acknowledge("1.2.1", by="dr.who", seen=Priority.URGENT)
    item = store.worklist()[0]
    assert (item.status, item.reviewed_by, item.reviewed_at) == (StudyStatus.REVIEWED, "dr.who", minutes(1))
    store.record_finding(result("1.2.1.2", Priority.URGENT, 0.8))  # nothing the reader has not seen
    assert store.worklist()[0].status == StudyStatus.REVIEWED
    store.record_finding(result("1.2.1.3", Priority.STAT, 0.9))  # would have been read first: back on the list
    item = store.worklist()[0]
    assert (item.status, item.priority) == (StudyStatus.TRIAGED, Priority.STAT)
    assert not store.acknowledge("9.9.9", seen=None)


def test_an_acknowledged_pending_study_reopens_only_for_a_positive(store: ResultsStore) -> None:
    for n in (1, 2):
        store.receive(arrival(f"1.2.1.{n}"))
    store.acknowledge("1.2.1", by=None, seen=None)
    store.record_finding(result("1.2.1.1", Priority.ROUTINE, 0.1))
    item = store.worklist()[0]
    assert (item.status, item.priority, item.reviewed_by) == (StudyStatus.REVIEWED, Priority.ROUTINE, None)
    store.record_finding(result("1.2.1.2", Priority.URGENT, 0.6))
    assert store.worklist()[0].status == StudyStatus.TRIAGED


def test_worklist_orders_by_priority_then_arrival_with_filters_and_pages(store: ResultsStore) -> None:
    studies = [  # study, arrival (minutes), priority (None: no finding yet), acknowledged
        ("1.2.10", 0, Priority.ROUTINE, False), ("1.2.11", 1, Priority.URGENT, False),
        ("1.2.12", 2, Priority.STAT, False), ("1.2.13", -1, Priority.URGENT, False),
        ("1.2.14", 4, None, False), ("1.2.15", 3, Priority.STAT, True), ("1.2.16", 2, Priority.STAT, False),
    ]
    for study, at, priority, acknowledged in studies:
        store.receive(arrival(f"{study}.1", study=study, at=minutes(at)))
        if priority is not None:
            store.record_finding(result(f"{study}.1", priority, {"STAT": 0.95, "URGENT": 0.6, "ROUTINE": 0.1}[
                priority.value]))
        if acknowledged:
            store.acknowledge(study, seen=priority)
    order = ["1.2.12", "1.2.16", "1.2.15", "1.2.13", "1.2.11", "1.2.10", "1.2.14"]
    assert [i.study_uid for i in store.worklist()] == order
    assert [i.study_uid for i in store.worklist(status=StudyStatus.REVIEWED)] == ["1.2.15"]
    assert [i.study_uid for i in store.worklist(status=StudyStatus.PENDING)] == ["1.2.14"]
    assert [i.study_uid for i in store.worklist(priority=Priority.URGENT)] == ["1.2.13", "1.2.11"]
    assert [i.study_uid for i in store.worklist(since=minutes(2))] == ["1.2.12", "1.2.16", "1.2.15", "1.2.14"]
    assert [i.study_uid for i in store.worklist(status=StudyStatus.TRIAGED, priority=Priority.STAT,
                                                since=minutes(2))] == ["1.2.12", "1.2.16"]
    pages = [store.worklist(limit=3, offset=offset) for offset in (0, 3, 6, 9)]
    assert [len(page) for page in pages] == [3, 3, 1, 0]
    assert [i.study_uid for page in pages for i in page] == order
    with pytest.raises(ValueError, match="limit"):
        store.worklist(limit=0)
    with pytest.raises(ValueError, match="offset"):
        store.worklist(offset=-1)


# --- deliveries -------------------------------------------------------------------------------------------


def test_delivery_retries_are_counted_and_nothing_is_dropped(database: Database, store: ResultsStore) -> None:
    clock = database.clock
    store.receive(arrival("1.2.1.1"))
    seg = store.add_delivery("1.2.1", "1.2.99.1", DeliveryKind.SEG, "PACS", "/out/seg.dcm", max_attempts=3)
    sr = store.add_delivery("1.2.1", "1.2.99.2", DeliveryKind.SR, "PACS", "/out/sr.dcm", max_attempts=3)
    assert store.add_delivery("1.2.1", "1.2.99.1", DeliveryKind.SEG, "PACS", "/out/seg.dcm") == seg  # re-queued
    assert [d.id for d in store.due_deliveries()] == [seg, sr]

    first = store.delivery_attempt(seg, ok=False, error="association rejected", next_attempt_at=minutes(1))
    assert (first.state, first.attempts, first.last_error, first.next_attempt_at) == (
        DeliveryState.PENDING, 1, "association rejected", minutes(1))
    assert [d.id for d in store.due_deliveries()] == [sr]  # seg waits for its backoff
    assert [d.id for d in store.due_deliveries(now=minutes(1))] == [sr, seg]  # earliest due first

    clock.advance(60)
    delivered = store.delivery_attempt(sr, ok=True)
    assert (delivered.state, delivered.attempts, delivered.delivered_at, delivered.next_attempt_at) == (
        DeliveryState.DELIVERED, 1, minutes(1), None)
    store.delivery_attempt(seg, ok=False, error="timeout", next_attempt_at=minutes(3))
    last = store.delivery_attempt(seg, ok=False, error="refused", next_attempt_at=minutes(7))
    assert (last.state, last.attempts, last.last_error, last.next_attempt_at) == (
        DeliveryState.FAILED, 3, "refused", None)
    assert store.due_deliveries(now=minutes(60)) == []
    with pytest.raises(StoreError, match="already failed"):
        store.delivery_attempt(seg, ok=True)

    assert [(d.id, d.state) for d in store.deliveries(study_uid="1.2.1")] == [
        (seg, DeliveryState.FAILED), (sr, DeliveryState.DELIVERED)]
    assert [d.kind for d in store.deliveries(state=DeliveryState.FAILED)] == [DeliveryKind.SEG]
    assert store.delivery_counts() == {DeliveryState.PENDING: 0, DeliveryState.DELIVERED: 1, DeliveryState.FAILED: 1}
    assert database.query("SELECT COUNT(*) FROM deliveries") == [(2,)]


def test_an_instance_failed_with_internal_error_can_be_retried(store: ResultsStore) -> None:
    store.receive(arrival("1.2.1.1"))  # spooled (DICOM)
    store.receive(arrival("1.2.1.2"))
    store.receive(arrival("1.2.1.3", spool_path=None))  # HTTP's own: no bytes kept
    store.receive(arrival("1.2.1.4"))
    for sop_uid in ("1.2.1.1", "1.2.1.3"):
        store.mark_instance(sop_uid, InstanceStatus.PROCESSING)
        store.mark_instance(sop_uid, InstanceStatus.FAILED, "internal_error")
    store.mark_instance("1.2.1.2", InstanceStatus.FAILED, "not_chest")
    retried = store.retry_instance("1.2.1.1")
    assert (retried.sop_uid, retried.status, retried.error_code, retried.attempts) == (
        "1.2.1.1", InstanceStatus.RECEIVED, None, 0)
    assert [r.sop_uid for r in store.pending_instances()] == ["1.2.1.1", "1.2.1.4"]
    with pytest.raises(StoreError, match="is received; only a failed instance"):
        store.retry_instance("1.2.1.1")
    with pytest.raises(StoreError, match=r"rejected \(not_chest\) for its content"):
        store.retry_instance("1.2.1.2")
    with pytest.raises(StoreError, match="came over HTTP"):
        store.retry_instance("1.2.1.3")
    with pytest.raises(NotFoundError):
        store.retry_instance("1.2.1.404")


def test_a_failed_delivery_can_be_retried_with_a_fresh_budget(database: Database, store: ResultsStore) -> None:
    store.receive(arrival("1.2.1.1"))
    seg = store.add_delivery("1.2.1", "1.2.99.1", DeliveryKind.SEG, "PACS", "/out/seg.dcm", max_attempts=1)
    sr = store.add_delivery("1.2.1", "1.2.99.2", DeliveryKind.SR, "PACS", "/out/sr.dcm", max_attempts=1)
    failed = store.delivery_attempt(seg, ok=False, error="refused", next_attempt_at=minutes(1))
    assert failed.state is DeliveryState.FAILED
    with pytest.raises(StoreError, match="pending; only a failed delivery can be retried"):
        store.retry_delivery(sr)
    database.clock.advance(120)
    again = store.retry_delivery(seg)
    assert (again.state, again.attempts, again.last_error, again.next_attempt_at) == (
        DeliveryState.PENDING, 0, "refused", minutes(2))
    assert [d.id for d in store.due_deliveries(now=minutes(2))] == [sr, seg]
    assert store.delivery_attempt(seg, ok=True).state is DeliveryState.DELIVERED
    with pytest.raises(StoreError, match="delivered; only a failed delivery"):
        store.retry_delivery(seg)
    with pytest.raises(NotFoundError):
        store.retry_delivery(seg + sr + 100)


def test_due_deliveries_of_one_destination_or_all_but_some(store: ResultsStore) -> None:
    store.receive(arrival("1.2.1.1"))
    ids = {name: store.add_delivery("1.2.1", f"1.2.99.{n}", DeliveryKind.SR, name, f"/out/{n}.dcm")
           for n, name in enumerate(("a", "b", "c", "a2"), start=1)}
    assert [d.id for d in store.due_deliveries(destination="b")] == [ids["b"]]
    assert [d.id for d in store.due_deliveries(destination="zzz")] == []
    assert [d.id for d in store.due_deliveries(exclude=("a", "c"))] == [ids["b"], ids["a2"]]
    assert [d.id for d in store.due_deliveries(exclude=("a", "b", "c", "a2"))] == []
    assert len(store.due_deliveries()) == 4


def test_delivery_arguments_are_checked(store: ResultsStore) -> None:
    store.receive(arrival("1.2.1.1"))
    with pytest.raises(NotFoundError, match="9.9.9"):
        store.add_delivery("9.9.9", "1.2.99.1", DeliveryKind.SR, "PACS", "/out/sr.dcm")
    with pytest.raises(ValueError, match="max_attempts"):
        store.add_delivery("1.2.1", "1.2.99.1", DeliveryKind.SR, "PACS", "/out/sr.dcm", max_attempts=0)
    delivery = store.add_delivery("1.2.1", "1.2.99.1", DeliveryKind.SR, "PACS", "/out/sr.dcm")
    with pytest.raises(ValueError, match="next_attempt_at"):
        store.delivery_attempt(delivery, ok=False, error="refused")
    with pytest.raises(NotFoundError, match="404"):
        store.delivery_attempt(404, ok=True)


# --- opening ----------------------------------------------------------------------------------------------


def test_the_default_is_sqlite_in_wal_mode_under_the_data_dir(tmp_path: Path) -> None:
    with open_store(None, tmp_path / "data") as store:
        store.receive(arrival("1.2.1.1"))
    with closing(sqlite3.connect(tmp_path / "data" / "ptx.sqlite3")) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert connection.execute("SELECT COUNT(*) FROM instances").fetchone() == (1,)


@pytest.mark.parametrize(("url", "message"), [
    ("sqlite:///:memory:", "must name a SQLite file"),
    ("sqlite:///", "must name a SQLite file"),
    ("mysql://user:secret@db/ptx", r"sqlite:/// or postgresql://, got 'mysql'"),
])
def test_unusable_database_urls_are_refused(tmp_path: Path, url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        open_store(url, tmp_path)
    assert "secret" not in str(raised.value)


def test_finding_by_instance(store):
    assert store.finding("1.2.3.999") is None
    store.receive(arrival("1.2.826.0.1.7", "1.2.826.0.1.70"))
    store.record_finding(result("1.2.826.0.1.7", Priority.URGENT, 0.8))
    study_uid, record = store.finding("1.2.826.0.1.7")
    assert study_uid == "1.2.826.0.1.70" and record.score == 0.8 and record.priority is Priority.URGENT


def test_an_acknowledgement_covers_only_the_priority_the_reader_saw(database: Database, store: ResultsStore) -> None:
    """Issue 13 §5: a reader opens a study at ROUTINE, a second film raises it to STAT, then the reader acks:
    the ack is refused (naming STAT) and the study stays in front of them. Unconditional before: reviewed."""
    for n in (1, 2):
        store.receive(arrival(f"1.2.1.{n}"))
    store.record_finding(result("1.2.1.1", Priority.ROUTINE, 0.1))
    seen = store.study("1.2.1").priority
    store.record_finding(result("1.2.1.2", Priority.STAT, 0.95))
    with pytest.raises(StoreError, match="changed since.*now STAT"):
        store.acknowledge("1.2.1", by="dr.who", seen=seen)
    item = store.worklist()[0]
    assert (item.status, item.priority, item.reviewed_by) == (StudyStatus.TRIAGED, Priority.STAT, None)
    with pytest.raises(StoreError, match="now STAT"):
        store.acknowledge("1.2.1", seen=None)  # "no finding yet" is not what it is either
    assert store.acknowledge("1.2.1", by="dr.who", seen=Priority.STAT)
    assert store.worklist()[0].status == StudyStatus.REVIEWED
    store.receive(arrival("1.2.9.1", study="1.2.9"))
    with pytest.raises(StoreError, match="now none"):
        store.acknowledge("1.2.9", seen=Priority.ROUTINE)
    assert store.acknowledge("1.2.9", seen=None)
    assert not store.acknowledge("9.9.9", seen=Priority.STAT)


def test_an_acknowledgement_racing_a_stat_finding_never_hides_it(database: Database) -> None:
    """Two stores (as two processes would), two threads, released together: one records a STAT finding, the
    other acks with the ROUTINE it saw. Either order is allowed, and its outcome exact: the ack first, then
    the STAT reopens the study; the finding first, then the ack is refused. Never reviewed at STAT."""
    writer, reader = database.open(), database.open()
    outcomes = {"acknowledged": 0, "refused": 0}
    for n in range(40):
        study = f"1.3.{n}"
        writer.receive(arrival(f"{study}.1", study=study))
        writer.receive(arrival(f"{study}.2", study=study))
        writer.record_finding(result(f"{study}.1", Priority.ROUTINE, 0.1))
        barrier = threading.Barrier(2)
        acked: list[bool | StoreError] = []

        def finding(study: str = study) -> None:
            barrier.wait()
            writer.record_finding(result(f"{study}.2", Priority.STAT, 0.95))

        def ack(study: str = study) -> None:
            barrier.wait()
            try:
                acked.append(reader.acknowledge(study, by="dr.who", seen=Priority.ROUTINE))
            except StoreError as exc:
                acked.append(exc)

        threads = [threading.Thread(target=finding), threading.Thread(target=ack)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        item = writer.study(study)
        assert (item.status, item.priority) == (StudyStatus.TRIAGED, Priority.STAT), (n, acked)
        if acked == [True]:  # the ack won: reviewed by the reader at ROUTINE, reopened by the STAT
            outcomes["acknowledged"] += 1
            assert item.reviewed_by == "dr.who"
        else:
            assert len(acked) == 1 and "now STAT" in str(acked[0]), (n, acked)
            outcomes["refused"] += 1
            assert item.reviewed_by is None
    assert sum(outcomes.values()) == 40


def test_the_digest_received_is_kept_and_may_be_absent(database: Database, store: ResultsStore) -> None:
    """Migration 2's nullable `instances.sha256`: kept as given, None for arrivals without one (HTTP, rows
    from before the migration); a malformed digest is refused before it reaches the database."""
    digest = "ab" * 32
    assert store.receive(arrival("1.2.1.1", sha256=digest))
    assert store.receive(arrival("1.2.1.2"))
    first, second = store.instance("1.2.1.1"), store.instance("1.2.1.2")
    assert first is not None and first.sha256 == digest
    assert second is not None and second.sha256 is None
    study = store.study("1.2.1")
    assert study is not None and [i.sha256 for i in study.instances] == [digest, None]
    assert database.query("SELECT sop_uid, sha256 FROM instances ORDER BY sop_uid") == [
        ("1.2.1.1", digest), ("1.2.1.2", None)]
    for bad in ("AB" * 32, "ab" * 31, "zz" * 32):
        with pytest.raises(ValueError, match="sha256"):
            arrival("1.2.1.3", sha256=bad)


def test_a_version_1_database_gains_the_digest_column_with_its_rows_kept(database: Database) -> None:
    """Upgrading: a database at schema 1 with an instance in it migrates to the latest, the old row's digest
    NULL (the listener then compares a repeat with the spool file, or the study alone)."""
    store = database.open()
    assert store.receive(arrival("1.2.1.1"))
    store.close()
    database.opened.remove(store)
    database.query("ALTER TABLE instances DROP COLUMN sha256")  # back to schema 1 (SQLite >= 3.35 and PostgreSQL)
    database.query("DELETE FROM schema_migrations WHERE version > 1")
    upgraded = database.open()
    assert database.query("SELECT MAX(version) FROM schema_migrations") == [(LATEST_VERSION,)]
    old = upgraded.instance("1.2.1.1")
    assert old is not None and old.sha256 is None
    assert upgraded.receive(arrival("1.2.1.2", sha256="cd" * 32))
    new = upgraded.instance("1.2.1.2")
    assert new is not None and new.sha256 == "cd" * 32
