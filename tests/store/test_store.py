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
    NotificationChannel,
    NotificationState,
    ReceivedInstance,
    ResultsStore,
    SchemaTooNewError,
    StoreError,
    StudyStatus,
    Verdict,
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
        except BaseException as error:  # noqa: BLE001 -- reported below: a thread's exception would otherwise vanish
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


def test_several_studies_read_at_once_are_what_each_read_alone_gives(store: ResultsStore) -> None:
    """`studies` (a worklist page's rows in one read) equals `study` for each UID; unknown UIDs are left out."""
    for n, study_uid in enumerate(("1.2.1", "1.2.2", "1.2.3")):
        for k in range(n + 1):
            store.receive(arrival(f"{study_uid}.{k}", study=study_uid, at=minutes(k)))
            if k % 2 == 0:
                store.record_finding(result(f"{study_uid}.{k}", Priority.URGENT, 0.6 + k / 10, at=minutes(k)))
    read = store.studies(["1.2.3", "9.9.9", "1.2.1", "1.2.3"])
    assert set(read) == {"1.2.1", "1.2.3"}
    for study_uid, record in read.items():
        assert record == store.study(study_uid)
    assert len(read["1.2.3"].instances) == 3 and len(read["1.2.3"].findings) == 2
    assert store.studies([]) == {}


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


# --- claims: several dispatchers on one store (issue 17 §3) -------------------------------------------------


def test_a_claim_holds_its_rows_for_its_lease_and_only_its_holder_records(database: Database,
                                                                          store: ResultsStore) -> None:
    """Claims take due rows earliest first, never one another's; an attempt needs the row's current claim;
    a released row is due again; a claim whose holder died ends with its lease and the row goes to the next."""
    store.receive(arrival("1.2.1.1"))
    seg, sr, sc = (store.add_delivery("1.2.1", f"1.2.99.{n}", kind, "PACS", f"/out/{n}.dcm")
                   for n, kind in enumerate(DeliveryKind, start=1))
    first = store.claim_deliveries(2, lease_s=60)
    assert ([d.id for d in first.rows], first.until) == ([seg, sr], minutes(1))
    assert all(d.next_attempt_at == minutes(1) for d in first.rows), "not due for anyone else until the lease ends"
    second = store.claim_deliveries(10, lease_s=60)
    assert [d.id for d in second.rows] == [sc] and second.token != first.token
    assert store.claim_deliveries(10, lease_s=60).rows == []
    with pytest.raises(StoreError, match=f"delivery {sc} was claimed again after this claim's lease ran out"):
        store.delivery_attempt(sc, ok=True, claim=first.token)
    assert store.delivery_attempt(seg, ok=True, claim=first.token).state is DeliveryState.DELIVERED
    assert store.release_deliveries(first.token, due_at=T0) == 1, "sr: claimed, not attempted"
    assert [d.id for d in store.due_deliveries()] == [sr]
    dying = store.claim_deliveries(10, lease_s=60)  # takes sr, then its holder dies
    assert [d.id for d in dying.rows] == [sr]
    database.clock.advance(61)
    taker = store.claim_deliveries(10, lease_s=60)
    assert [d.id for d in taker.rows] == [sr, sc], "both leases ran out"
    with pytest.raises(StoreError, match="claimed again"):
        store.delivery_attempt(sr, ok=True, claim=dying.token)
    failed = store.delivery_attempt(sr, ok=False, error="refused", next_attempt_at=minutes(5), claim=taker.token)
    assert (failed.state, failed.attempts, failed.next_attempt_at) == (DeliveryState.PENDING, 1, minutes(5))
    assert store.release_deliveries(taker.token, due_at=database.clock.now) == 1, "sc only: sr was attempted"
    assert [d.id for d in store.claim_deliveries(10, lease_s=60, destination="PACS").rows] == [sc]
    assert store.claim_deliveries(10, lease_s=60, exclude=("PACS",)).rows == []
    with pytest.raises(ValueError, match="lease must be positive"):
        store.claim_deliveries(10, lease_s=0)


def test_a_listener_started_again_takes_back_what_its_killed_self_claimed(database: Database,
                                                                           store: ResultsStore) -> None:
    """A claim names its listener; that listener's next start releases the rows still claimed under its name
    (due at once), and no other listener's (a name that is a prefix of another, or differs by LIKE's `_`
    wildcard, included). Before, they waited out the lease (300 s) whoever started."""
    store.receive(arrival("1.2.1.1"))
    seg, sr, sc = (store.add_delivery("1.2.1", f"1.2.99.{n}", kind, "PACS", f"/out/{n}.dcm")
                   for n, kind in enumerate(DeliveryKind, start=1))
    killed = store.claim_deliveries(2, lease_s=300, owner="pacs-1")
    other = store.claim_deliveries(1, lease_s=300, owner="pacs-10")
    assert killed.token.startswith("pacs-1/") and [d.id for d in killed.rows] == [seg, sr]
    assert [d.id for d in other.rows] == [sc]
    assert store.release_owned_deliveries("pacs_1", due_at=T0) == 0
    assert store.release_owned_deliveries("pacs-", due_at=T0) == 0
    assert store.claim_deliveries(10, lease_s=60).rows == []
    assert store.release_owned_deliveries("pacs-1", due_at=T0) == 2
    assert [d.id for d in store.claim_deliveries(10, lease_s=60, owner="pacs-1").rows] == [seg, sr]
    with pytest.raises(ValueError, match="without '/'"):
        store.claim_deliveries(10, lease_s=60, owner="a/b")
    store.record_finding(result("1.2.1.1", Priority.STAT, 0.95))
    hl7 = store.add_notification("1.2.1", NotificationChannel.HL7, Priority.STAT, "{}")
    assert [n.id for n in store.claim_notifications(5, lease_s=300, owner="pacs-1").rows] == [hl7]
    assert store.release_owned_notifications("pacs-10", due_at=T0) == 0
    assert store.release_owned_notifications("pacs-1", due_at=T0) == 1


def test_notifications_are_claimed_as_deliveries_are(database: Database, store: ResultsStore) -> None:
    store.receive(arrival("1.2.1.1"))
    store.record_finding(result("1.2.1.1", Priority.STAT, 0.95))
    hl7 = store.add_notification("1.2.1", NotificationChannel.HL7, Priority.STAT, "{}")
    hook = store.add_notification("1.2.1", NotificationChannel.WEBHOOK, Priority.STAT, "{}")
    claim = store.claim_notifications(10, lease_s=30, channel="hl7")
    assert [n.id for n in claim.rows] == [hl7] and claim.rows[0].next_attempt_at == T0 + timedelta(seconds=30)
    assert [n.id for n in store.claim_notifications(10, lease_s=30).rows] == [hook]
    with pytest.raises(StoreError, match=f"notification {hook} was claimed again"):
        store.notification_attempt(hook, ok=True, claim=claim.token)
    assert store.notification_attempt(hl7, ok=True, claim=claim.token).state is NotificationState.SENT
    assert store.release_notifications(claim.token, due_at=T0) == 0


def test_dispatchers_on_one_database_claim_disjoint_rows(database: Database) -> None:
    """Eight stores (as eight processes would open them) claim at once, over and over: every row is taken by
    exactly one claim. On PostgreSQL the rows are locked and skipped (SKIP LOCKED); SQLite serialises."""
    first = database.open(pool_size=2)
    first.receive(arrival("1.2.1.1"))
    ids = {first.add_delivery("1.2.1", f"1.2.99.{n}", DeliveryKind.SR, "PACS", f"/out/{n}.dcm") for n in range(400)}
    stores = [first, *(database.open(pool_size=2) for _ in range(7))]
    taken: list[list[int]] = [[] for _ in stores]
    start, first_round = threading.Barrier(len(stores)), threading.Barrier(len(stores))

    def claim(index: int) -> None:
        start.wait()
        while rows := stores[index].claim_deliveries(3, lease_s=600).rows:
            if not taken[index]:  # every store's first claim made before any second one (8 × 3 < 400 rows):
                first_round.wait(30)  # one thread may otherwise drain SQLite's serialised queue alone (seen in CI)
            taken[index].extend(d.id for d in rows)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    every = [i for ids_taken in taken for i in ids_taken]
    assert sorted(every) == sorted(ids), "each row claimed exactly once"
    assert sum(1 for ids_taken in taken if ids_taken) > 1, "the claims ran side by side"


def test_a_version_5_database_gains_the_claim_columns_with_its_rows_kept(database: Database) -> None:
    store = database.open()
    store.receive(arrival("1.2.1.1"))
    delivery = store.add_delivery("1.2.1", "1.2.99.1", DeliveryKind.SEG, "PACS", "/out/seg.dcm")
    store.close()
    database.opened.remove(store)
    back_to_version_5(database)
    upgraded = database.open()
    assert database.query("SELECT MAX(version) FROM schema_migrations") == [(LATEST_VERSION,)]
    claim = upgraded.claim_deliveries(10, lease_s=60)
    assert [d.id for d in claim.rows] == [delivery]
    assert upgraded.delivery_attempt(delivery, ok=True, claim=claim.token).state is DeliveryState.DELIVERED


def back_to_version_5(database: Database) -> None:
    """Undo migrations 6-8 (the outboxes' claim columns, instances.listener, result_objects) as a database from
    before them would be."""
    database.query("DROP TABLE result_objects")
    database.query("DROP INDEX instances_listener")
    database.query("ALTER TABLE instances DROP COLUMN listener")
    database.query("ALTER TABLE deliveries DROP COLUMN claim")
    database.query("ALTER TABLE notifications DROP COLUMN claim")
    database.query("DELETE FROM schema_migrations WHERE version > 5")


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

        def finding(study: str = study, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            writer.record_finding(result(f"{study}.2", Priority.STAT, 0.95))

        def ack(study: str = study, barrier: threading.Barrier = barrier, acked: list = acked) -> None:
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
    back_to_version_2(database)
    database.query("ALTER TABLE instances DROP COLUMN sha256")  # back to schema 1 (SQLite >= 3.35 and PostgreSQL)
    database.query("DELETE FROM schema_migrations WHERE version > 1")
    upgraded = database.open()
    assert database.query("SELECT MAX(version) FROM schema_migrations") == [(LATEST_VERSION,)]
    old = upgraded.instance("1.2.1.1")
    assert old is not None and old.sha256 is None
    assert upgraded.receive(arrival("1.2.1.2", sha256="cd" * 32))
    new = upgraded.instance("1.2.1.2")
    assert new is not None and new.sha256 == "cd" * 32


def back_to_version_2(database: Database) -> None:
    """Undo migration 3 (the outputs columns and their index) as a database from before it would be."""
    back_to_version_3(database)
    database.query("DROP INDEX instances_outputs_due")  # SQLite drops no column an index still uses
    database.query("ALTER TABLE instances DROP COLUMN outputs_due_at")
    database.query("ALTER TABLE instances DROP COLUMN outputs_attempts")
    database.query("DELETE FROM schema_migrations WHERE version > 2")


# --- results still to make (issue 13 §9) ------------------------------------------------------------------


def test_a_triaged_instance_whose_results_failed_is_outputs_pending_until_settled(database: Database) -> None:
    """defer_outputs: the instance shows as outputs_pending (in its study too), with its attempts and due
    time, across a restart; due_outputs lists it once due; settle_outputs makes it done again, keeping the
    count. The row itself stays status 'done' (the finding is recorded), with the due time beside it."""
    store = database.open()
    store.receive(arrival("1.2.1.1"))
    store.record_finding(result("1.2.1.1", Priority.URGENT, 0.8))
    store.receive(arrival("1.2.1.2", at=minutes(1)))
    store.record_finding(result("1.2.1.2", Priority.ROUTINE, 0.1))
    assert store.due_outputs() == []
    first = store.defer_outputs("1.2.1.1", minutes(10))
    assert (first.status, first.outputs_attempts, first.outputs_due_at) == (InstanceStatus.OUTPUTS_PENDING, 1,
                                                                            minutes(10))
    store.defer_outputs("1.2.1.2", minutes(5))
    store.close()

    restarted = database.open()
    assert [i.sop_uid for i in restarted.due_outputs()] == ["1.2.1.2", "1.2.1.1"]  # earliest due first
    assert restarted.due_outputs(minutes(4)) == []
    assert [i.sop_uid for i in restarted.due_outputs(minutes(5))] == ["1.2.1.2"]
    study = restarted.study("1.2.1")
    assert study is not None and study.status is StudyStatus.TRIAGED and study.priority is Priority.URGENT
    assert {i.sop_uid: i.status for i in study.instances} == {"1.2.1.1": InstanceStatus.OUTPUTS_PENDING,
                                                             "1.2.1.2": InstanceStatus.OUTPUTS_PENDING}
    again = restarted.defer_outputs("1.2.1.1", minutes(30))
    assert (again.outputs_attempts, again.outputs_due_at) == (2, minutes(30))
    assert database.query("SELECT status FROM instances WHERE sop_uid = '1.2.1.1'") == [("done",)]

    restarted.settle_outputs("1.2.1.1")
    restarted.settle_outputs("1.2.1.2", "spool_missing")  # never to be made: said so, not hidden
    made, lost = restarted.instance("1.2.1.1"), restarted.instance("1.2.1.2")
    assert made is not None and (made.status, made.error_code, made.outputs_attempts, made.outputs_due_at) == (
        InstanceStatus.DONE, None, 2, None)
    assert lost is not None and (lost.status, lost.error_code) == (InstanceStatus.DONE, "spool_missing")
    assert restarted.due_outputs() == []
    assert restarted.finding("1.2.1.1") is not None  # the finding was never in question


def test_only_a_triaged_instance_can_have_results_pending(store: ResultsStore) -> None:
    store.receive(arrival("1.2.1.1"))
    with pytest.raises(NotFoundError, match="no instance with SOP Instance UID '9.9'"):
        store.defer_outputs("9.9", minutes(1))
    with pytest.raises(StoreError, match="instance 1.2.1.1 is received: only a triaged"):
        store.defer_outputs("1.2.1.1", minutes(1))
    with pytest.raises(StoreError, match="instance 1.2.1.1 is received: only a triaged"):
        store.settle_outputs("1.2.1.1")
    with pytest.raises(ValueError, match="outputs_pending is set by defer_outputs"):
        store.mark_instance("1.2.1.1", InstanceStatus.OUTPUTS_PENDING)
    with pytest.raises(ValueError, match="due_at must be timezone-aware"):
        store.defer_outputs("1.2.1.1", datetime(2026, 1, 1))
    assert store.pending_instances()[0].status is InstanceStatus.RECEIVED  # nothing changed


def test_a_version_2_database_gains_the_outputs_columns_with_its_rows_kept(database: Database) -> None:
    store = database.open()
    store.receive(arrival("1.2.1.1", sha256="ab" * 32))
    store.record_finding(result("1.2.1.1", Priority.STAT, 0.95))
    store.close()
    database.opened.remove(store)
    back_to_version_2(database)
    upgraded = database.open()
    assert database.query("SELECT MAX(version) FROM schema_migrations") == [(LATEST_VERSION,)]
    old = upgraded.instance("1.2.1.1")
    assert old is not None and (old.status, old.outputs_attempts, old.outputs_due_at, old.sha256) == (
        InstanceStatus.DONE, 0, None, "ab" * 32)
    assert upgraded.defer_outputs("1.2.1.1", minutes(1)).status is InstanceStatus.OUTPUTS_PENDING


# --- the notification outbox (issue 14 §5) -----------------------------------------------------------------


def back_to_version_3(database: Database) -> None:
    """Undo migration 4 (the notifications table) as a database from before it would be."""
    back_to_version_4(database)
    database.query("DROP TABLE IF EXISTS notifications")
    database.query("DELETE FROM schema_migrations WHERE version > 3")


def test_a_notification_is_queued_once_per_study_priority_raise(database: Database, store: ResultsStore) -> None:
    """add_notification adds a row only while the study is at that priority, once per channel and priority:
    a repeat returns the same id, a lower priority than the study's adds nothing (None)."""
    HL7, WEBHOOK = NotificationChannel.HL7, NotificationChannel.WEBHOOK
    store.receive(arrival("1.2.1.1"))
    assert store.add_notification("1.2.1", HL7, Priority.URGENT, "{}") is None, "no finding yet: no priority"
    store.record_finding(result("1.2.1.1", Priority.URGENT, 0.8))
    urgent = store.add_notification("1.2.1", HL7, Priority.URGENT, '{"n": 1}')
    assert urgent is not None and store.add_notification("1.2.1", HL7, Priority.URGENT, '{"n": 2}') == urgent
    assert store.add_notification("1.2.1", WEBHOOK, Priority.URGENT, "{}") not in (None, urgent)
    assert store.add_notification("1.2.1", HL7, Priority.STAT, "{}") is None, "the study is not STAT"
    store.receive(arrival("1.2.1.2"))
    store.record_finding(result("1.2.1.2", Priority.STAT, 0.97))
    stat = store.add_notification("1.2.1", HL7, Priority.STAT, "{}", max_attempts=3)
    assert stat is not None and stat != urgent
    assert store.add_notification("1.2.1", WEBHOOK, Priority.ROUTINE, "{}") is None
    rows = store.notifications("1.2.1")
    assert [(r.channel, r.priority, r.state, r.attempts) for r in rows] == [
        (HL7, Priority.URGENT, NotificationState.PENDING, 0), (WEBHOOK, Priority.URGENT, NotificationState.PENDING, 0),
        (HL7, Priority.STAT, NotificationState.PENDING, 0)]
    assert rows[0].payload == '{"n": 1}' and rows[2].max_attempts == 3, "the first payload stays"
    assert "payload" not in repr(rows[0]), "the payload (the film's identifiers) stays out of reprs"
    assert database.query("SELECT COUNT(*) FROM notifications") == [(3,)]
    with pytest.raises(NotFoundError, match="no study '9.9' to notify about"):
        store.add_notification("9.9", HL7, Priority.STAT, "{}")
    with pytest.raises(ValueError, match="'fax' is not a valid NotificationChannel"):
        store.add_notification("1.2.1", "fax", Priority.STAT, "{}")  # type: ignore[arg-type]


def test_notification_attempts_back_off_end_failed_and_can_be_retried(database: Database,
                                                                     store: ResultsStore) -> None:
    HL7, WEBHOOK = NotificationChannel.HL7, NotificationChannel.WEBHOOK
    store.receive(arrival("1.2.1.1"))
    store.record_finding(result("1.2.1.1", Priority.STAT, 0.95))
    hl7 = store.add_notification("1.2.1", HL7, Priority.STAT, "{}", max_attempts=2)
    hook = store.add_notification("1.2.1", WEBHOOK, Priority.STAT, "{}")
    assert hl7 is not None and hook is not None
    assert [n.id for n in store.due_notifications()] == [hl7, hook]
    assert [n.id for n in store.due_notifications(channel="webhook")] == [hook]
    assert [n.id for n in store.due_notifications(exclude=("hl7",))] == [hook]
    first = store.notification_attempt(hl7, ok=False, error="hl7: no connection", next_attempt_at=minutes(1))
    assert (first.state, first.attempts, first.next_attempt_at, first.last_error) == (
        NotificationState.PENDING, 1, minutes(1), "hl7: no connection")
    assert [n.id for n in store.due_notifications()] == [hook]
    assert [n.id for n in store.due_notifications(now=minutes(1))] == [hook, hl7]  # earliest due first
    sent = store.notification_attempt(hook, ok=True)
    assert (sent.state, sent.sent_at, sent.next_attempt_at) == (NotificationState.SENT, T0, None)
    last = store.notification_attempt(hl7, ok=False, error="hl7: AE", next_attempt_at=minutes(3))
    assert (last.state, last.attempts, last.next_attempt_at) == (NotificationState.FAILED, 2, None)
    assert store.due_notifications(now=minutes(60)) == []
    assert store.notification_counts() == {NotificationState.PENDING: 0, NotificationState.SENT: 1,
                                           NotificationState.FAILED: 1}
    with pytest.raises(StoreError, match=f"notification {hl7} is already failed; only a pending"):
        store.notification_attempt(hl7, ok=True)
    with pytest.raises(StoreError, match=f"notification {hook} is sent; only a failed notification"):
        store.retry_notification(hook)
    with pytest.raises(NotFoundError, match="no notification with id 404"):
        store.retry_notification(404)
    with pytest.raises(ValueError, match="a failed attempt needs its error and next_attempt_at"):
        store.notification_attempt(hl7, ok=False, error="x")
    again = store.retry_notification(hl7)
    assert (again.state, again.attempts, again.last_error) == (NotificationState.PENDING, 0, "hl7: AE")
    assert [n.id for n in store.notifications(state=NotificationState.PENDING)] == [hl7]
    assert [d.id for d in store.deliveries()] == [], "notifications are not deliveries"


def test_a_version_3_database_gains_the_notifications_table_with_its_rows_kept(database: Database) -> None:
    store = database.open()
    store.receive(arrival("1.2.1.1"))
    store.record_finding(result("1.2.1.1", Priority.STAT, 0.95))
    store.close()
    database.opened.remove(store)
    back_to_version_3(database)
    upgraded = database.open()
    assert database.query("SELECT MAX(version) FROM schema_migrations") == [(LATEST_VERSION,)]
    study = upgraded.study("1.2.1")
    assert study is not None and study.priority is Priority.STAT
    assert upgraded.add_notification("1.2.1", NotificationChannel.HL7, Priority.STAT, "{}") is not None


# --- readers' verdicts (issue 14 §3) -----------------------------------------------------------------------


def back_to_version_4(database: Database) -> None:
    """Undo migration 5 (the feedback table, the studies_updated index) as a database from before it would be."""
    back_to_version_5(database)
    database.query("DROP TABLE IF EXISTS feedback")
    database.query("DROP INDEX IF EXISTS studies_updated")
    database.query("DELETE FROM schema_migrations WHERE version > 4")


def test_a_verdict_goes_with_the_acknowledgement_or_later_and_never_covers_an_unseen_priority(
        database: Database, store: ResultsStore) -> None:
    """The reader saw ROUTINE; a STAT film raised the study since: their verdict with the acknowledgement is
    refused (naming STAT), nothing is written. At STAT it is kept with the ack, naming the STAT finding; a
    second reader's later verdict leaves the review alone; a changed verdict supersedes, the old one kept."""
    clock = database.clock
    store.receive(arrival("1.2.1.1"))
    store.receive(arrival("1.2.1.2"))
    store.record_finding(result("1.2.1.1", Priority.ROUTINE, 0.1))
    with pytest.raises(StoreError, match="is triaged, not reviewed yet: a verdict is given with its acknowledgement"):
        store.give_feedback("1.2.1", "dr.lee", Verdict.AGREE, seen=Priority.ROUTINE)
    store.record_finding(result("1.2.1.2", Priority.STAT, 0.95))
    with pytest.raises(StoreError, match="changed since it was seen at ROUTINE: its priority is now STAT"):
        store.give_feedback("1.2.1", "dr.lee", Verdict.AGREE, seen=Priority.ROUTINE, acknowledge=True)
    study = store.study("1.2.1")
    assert (study.status, study.reviewed_by) == (StudyStatus.TRIAGED, None)
    assert store.feedback() == [] and database.query("SELECT COUNT(*) FROM feedback") == [(0,)]

    clock.advance(60)
    first, new = store.give_feedback("1.2.1", "dr.lee", Verdict.DISAGREE, seen=Priority.STAT, acknowledge=True)
    assert new and (first.sop_uid, first.score, first.priority, first.verdict, first.reader, first.created_at) == (
        "1.2.1.2", 0.95, Priority.STAT, Verdict.DISAGREE, "dr.lee", minutes(1))
    assert first.models == {"classifier": {"name": "c", "version": "1"}} and first.current
    study = store.study("1.2.1")
    assert (study.status, study.reviewed_by, study.reviewed_at) == (StudyStatus.REVIEWED, "dr.lee", minutes(1))
    again, new = store.give_feedback("1.2.1", "dr.lee", Verdict.DISAGREE, seen=Priority.STAT)
    assert not new and again == first, "the same verdict again (a resent form) adds nothing"

    clock.advance(60)
    second, new = store.give_feedback("1.2.1", "dr.kim", Verdict.AGREE, seen=Priority.STAT)
    assert new and store.study("1.2.1").reviewed_by == "dr.lee", "a later verdict is not an acknowledgement"
    clock.advance(60)
    changed, new = store.give_feedback("1.2.1", "dr.lee", Verdict.UNCERTAIN, seen=Priority.STAT)
    assert new and changed.id not in (first.id, second.id)
    rows = store.feedback(study_uid="1.2.1")
    assert [(r.reader, r.verdict, r.superseded_at) for r in rows] == [
        ("dr.lee", Verdict.DISAGREE, minutes(3)), ("dr.kim", Verdict.AGREE, None), ("dr.lee", Verdict.UNCERTAIN, None)]
    assert database.query("SELECT COUNT(*) FROM feedback WHERE superseded_at IS NULL") == [(2,)]

    assert [r.id for r in store.feedback(since=minutes(2))] == [second.id, changed.id]
    assert [r.id for r in store.feedback(after=first.id, limit=1)] == [second.id]
    assert store.feedback(study_uid="9.9") == []
    with pytest.raises(NotFoundError, match="no study 9.9"):
        store.give_feedback("9.9", "dr.lee", Verdict.AGREE, seen=Priority.STAT, acknowledge=True)
    with pytest.raises(ValueError, match="needs the reader's login"):
        store.give_feedback("1.2.1", " ", Verdict.AGREE, seen=Priority.STAT)
    with pytest.raises(ValueError, match="no result to judge"):
        store.give_feedback("1.2.1", "dr.lee", Verdict.AGREE, seen=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'maybe' is not a valid Verdict"):
        store.give_feedback("1.2.1", "dr.lee", "maybe", seen=Priority.STAT)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit must be in 1..10000"):
        store.feedback(limit=0)


def test_a_verdict_racing_a_stat_finding_never_covers_it(database: Database) -> None:
    """As the acknowledgement's race: two stores, two threads released together, one records a STAT finding,
    the other acknowledges with a DISAGREE on the ROUTINE it saw. The verdict is kept at ROUTINE (it won) or
    refused naming STAT (the finding won); never a verdict at STAT, never a lost STAT."""
    writer, reader = database.open(), database.open()
    kept = refused = 0
    for n in range(20):
        study = f"1.4.{n}"
        writer.receive(arrival(f"{study}.1", study=study))
        writer.receive(arrival(f"{study}.2", study=study))
        writer.record_finding(result(f"{study}.1", Priority.ROUTINE, 0.1))
        barrier = threading.Barrier(2)
        outcome: list[object] = []

        def finding(study: str = study, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            writer.record_finding(result(f"{study}.2", Priority.STAT, 0.95))

        def verdict(study: str = study, barrier: threading.Barrier = barrier, outcome: list = outcome) -> None:
            barrier.wait()
            try:
                outcome.append(reader.give_feedback(study, "dr.who", Verdict.DISAGREE, seen=Priority.ROUTINE,
                                                    acknowledge=True)[0])
            except StoreError as exc:
                outcome.append(exc)

        threads = [threading.Thread(target=finding), threading.Thread(target=verdict)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        item, rows = writer.study(study), writer.feedback(study_uid=study)
        assert (item.status, item.priority) == (StudyStatus.TRIAGED, Priority.STAT), (n, outcome)
        if isinstance(outcome[0], StoreError):
            assert "now STAT" in str(outcome[0]) and rows == [] and item.reviewed_by is None, (n, outcome)
            refused += 1
        else:
            assert [(r.priority, r.sop_uid) for r in rows] == [(Priority.ROUTINE, f"{study}.1")], (n, rows)
            kept += 1
    assert kept + refused == 20


def test_the_change_token_moves_with_every_change_a_worklist_row_shows(database: Database,
                                                                       store: ResultsStore) -> None:
    """latest_change: what the live pages compare before their page queries. A new study, a finding and an
    acknowledgement move it; a read, a repeated C-STORE and a later verdict (no row shows it) do not."""
    clock = database.clock
    tokens = [store.latest_change()]

    def moved() -> bool:
        clock.advance(1)
        tokens.append(store.latest_change())
        return tokens[-1] != tokens[-2]

    assert store.receive(arrival("1.2.1.1")) and moved()
    assert store.receive(arrival("1.2.2.1", study="1.2.2", at=T0 - timedelta(hours=1))) and moved(), \
        "a study stamped before the newest one (another clock) still moves it: the count"
    assert not store.receive(arrival("1.2.1.1")) and not moved()
    store.worklist()
    assert not moved()
    store.record_finding(result("1.2.1.1", Priority.URGENT, 0.7, at=clock.now))
    assert moved()
    store.acknowledge("1.2.1", by="dr.who", seen=Priority.URGENT)
    assert moved()
    store.give_feedback("1.2.1", "dr.kim", Verdict.AGREE, seen=Priority.URGENT)
    assert not moved()


def test_a_version_4_database_gains_the_feedback_table_with_its_rows_kept(database: Database) -> None:
    store = database.open()
    store.receive(arrival("1.2.1.1"))
    store.record_finding(result("1.2.1.1", Priority.STAT, 0.95))
    store.close()
    database.opened.remove(store)
    back_to_version_4(database)
    upgraded = database.open()
    assert database.query("SELECT MAX(version) FROM schema_migrations") == [(LATEST_VERSION,)]
    assert upgraded.study("1.2.1").priority is Priority.STAT
    record, new = upgraded.give_feedback("1.2.1", "dr.lee", Verdict.AGREE, seen=Priority.STAT, acknowledge=True)
    assert new and record.sop_uid == "1.2.1.1"
