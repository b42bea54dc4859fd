"""Retention sweep (service/retention.py) on a real SQLite store, a real results folder and a real spool;
ages made with old modification times and an injected clock."""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from service.cascade.finding import Priority
from service.pacs.retention import Retention
from service.pacs.spool import Spool
from service.settings import load_settings
from service.store import (
    DeliveryKind,
    FindingRecord,
    InstanceStatus,
    NotificationChannel,
    ReceivedInstance,
    ResultsStore,
    open_store,
)
from service.store.results_files import ResultsFolder
from tests.dicom_factory import chest_like, dataset, to_bytes

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
DAYS = 30


def age(path: Path, days: float) -> None:
    """Set the modification time of `path` (a file, or every file in a folder) to `days` before NOW."""
    stamp = (NOW - timedelta(days=days)).timestamp()
    for target in ([path] if path.is_file() else list(path.iterdir())):
        os.utime(target, (stamp, stamp))


class World:
    def __init__(self, root: Path, store: ResultsStore) -> None:
        self.store = store
        self.results = ResultsFolder(root / "results")
        self.spool = Spool(root / "spool")
        self.retention = Retention(store, self.results, self.spool, DAYS, clock=lambda: NOW)

    def instance(self, status: InstanceStatus, spooled: bool = False, study_uid: str | None = None) -> tuple[str, str]:
        """A received instance moved on to `status` (DONE with a finding); spooled: its file in the spool."""
        ds = dataset(chest_like(32, 32), StudyInstanceUID=study_uid or generate_uid())
        sop, study = str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)
        path = self.spool.write(sop, to_bytes(ds)) if spooled else None
        self.store.receive(ReceivedInstance(sop_uid=sop, study_uid=study, series_uid=None, sop_class_uid=None,
                                            source="dicom:TEST", spool_path=None if path is None else str(path),
                                            received_at=NOW - timedelta(days=60)))
        if status is InstanceStatus.DONE:
            self.store.record_finding(FindingRecord(sop_uid=sop, score=0.7, label="pneumothorax",
                                                    priority=Priority.URGENT, threshold=0.5, rle="1 2", instances=[],
                                                    models={}, created_at=NOW - timedelta(days=60)))
        elif status is not InstanceStatus.RECEIVED:
            self.store.mark_instance(sop, status, error_code="not_chest" if status is InstanceStatus.FAILED else None)
        return study, sop

    def results_of(self, study: str, sop: str, days_old: float) -> Path:
        for name in ("SEG.dcm", "SR.dcm", "overlay.png"):
            self.results.write(study, sop, name, b"object with patient data")
        folder = self.results.root / study / sop
        age(folder, days_old)
        return folder


@pytest.fixture
def world(tmp_path: Path) -> World:
    with open_store(None, tmp_path) as store:
        yield World(tmp_path, store)


def test_old_results_go_unless_a_delivery_is_pending(world: World, caplog: pytest.LogCaptureFixture) -> None:
    old_delivered, old_pending, old_failed, young, undelivered = (world.instance(InstanceStatus.DONE) for _ in range(5))
    folders = {name: world.results_of(*uids, days_old=days) for name, uids, days in (
        ("old_delivered", old_delivered, 31), ("old_pending", old_pending, 45), ("old_failed", old_failed, 40),
        ("young", young, 29), ("undelivered", undelivered, 31))}
    for name, (study, sop) in (("old_delivered", old_delivered), ("old_pending", old_pending),
                               ("old_failed", old_failed)):
        delivery = world.store.add_delivery(study, generate_uid(), DeliveryKind.SR, "pacs",
                                            str(folders[name] / "SR.dcm"), max_attempts=1)
        if name == "old_delivered":
            world.store.delivery_attempt(delivery, ok=True)
        elif name == "old_failed":
            world.store.delivery_attempt(delivery, ok=False, error="refused", next_attempt_at=NOW)
    # A second instance of the pending study, old and delivered-free: goes, while its sibling stays.
    sibling = world.results_of(old_pending[0], world.instance(InstanceStatus.DONE, study_uid=old_pending[0])[1], 50)

    with caplog.at_level(logging.INFO, logger="ptx.retention"):
        report = world.retention.sweep()

    assert (report.results_removed, report.results_kept_pending) == (4, 1)
    gone = {name for name, folder in folders.items() if not folder.exists()}
    assert gone == {"old_delivered", "old_failed", "undelivered"} and not sibling.exists()
    assert sorted(p.name for p in folders["old_pending"].iterdir()) == ["SEG.dcm", "SR.dcm", "overlay.png"]
    assert not (world.results.root / old_delivered[0]).exists()  # the emptied study folder goes too
    assert (world.results.root / old_pending[0]).is_dir()
    assert "removed 4 result folder(s)" in caplog.text
    # The worklist keeps the studies and their findings (no patient attributes in them).
    study = world.store.study(old_delivered[0])
    assert study is not None and [f.sop_uid for f in study.findings] == [old_delivered[1]]
    assert world.results.present(*old_delivered) == []  # the API then links to nothing
    assert world.retention.sweep().results_removed == 0  # idempotent


def test_spool_files_go_only_when_their_instance_is_finished(world: World) -> None:
    done_old = world.instance(InstanceStatus.DONE, spooled=True)[1]
    failed_old = world.instance(InstanceStatus.FAILED, spooled=True)[1]
    done_young = world.instance(InstanceStatus.DONE, spooled=True)[1]
    received_old = world.instance(InstanceStatus.RECEIVED, spooled=True)[1]
    processing_old = world.instance(InstanceStatus.PROCESSING, spooled=True)[1]
    unknown = dataset(chest_like(32, 32))
    world.spool.write(str(unknown.SOPInstanceUID), to_bytes(unknown))  # spooled, never recorded (a crash)
    for sop in (done_old, failed_old, received_old, processing_old, str(unknown.SOPInstanceUID)):
        age(world.spool.path(sop), 90)
    age(world.spool.path(done_young), 1)

    report = world.retention.sweep()

    assert (report.spool_removed, report.spool_kept) == (2, 3)
    assert set(world.spool.pending()) == {done_young, received_old, processing_old, str(unknown.SOPInstanceUID)}
    assert {i.sop_uid for i in world.store.pending_instances()} == {received_old, processing_old}


def test_the_spool_file_of_an_instance_whose_results_are_pending_is_kept(world: World) -> None:
    """An outputs_pending instance is triaged but its SEG/SR/SC are still to be made from its spool file
    (issue 13 §9): however old, the file stays until they are made; then it goes like any finished one's."""
    pending = world.instance(InstanceStatus.DONE, spooled=True)[1]
    world.store.defer_outputs(pending, NOW + timedelta(hours=1))
    age(world.spool.path(pending), 90)
    report = world.retention.sweep()
    assert (report.spool_removed, report.spool_kept) == (0, 1) and world.spool.pending() == [pending]
    world.store.settle_outputs(pending)  # made at last (the intake would have removed the file itself)
    assert world.retention.sweep().spool_removed == 1 and world.spool.pending() == []


def test_the_setting() -> None:
    assert load_settings(environ={}).retention_days == 30
    assert load_settings(environ={"PTX_RETENTION_DAYS": "0"}).retention_days == 0  # keep forever: no sweep
    with pytest.raises(ValueError, match="retention_days"):
        load_settings(environ={"PTX_RETENTION_DAYS": "-1"})
    with pytest.raises(ValueError, match="positive"):
        Retention(None, None, None, 0)  # type: ignore[arg-type]


def test_old_results_stay_while_their_notification_is_still_being_pushed(world: World) -> None:
    """notification.json beside the results holds what the HL7 message needs (service/pacs/notify): an old
    folder whose study's notification is still pending stays; once it is sent, the folder goes."""
    study, sop = world.instance(InstanceStatus.DONE)
    folder = world.results_of(study, sop, days_old=40)
    world.results.write_notification(study, sop, b'{"accession_number": "A1"}')
    age(folder, 40)
    payload = json.dumps({"sop_uid": sop})
    notification = world.store.add_notification(study, NotificationChannel.WEBHOOK, Priority.URGENT, payload)
    assert notification is not None
    report = world.retention.sweep()
    assert (report.results_removed, report.results_kept_pending) == (0, 1) and folder.is_dir()
    world.store.notification_attempt(notification, ok=True)
    assert world.retention.sweep().results_removed == 1 and not folder.exists()


def test_database_copies_go_with_age_even_when_their_writers_folder_is_gone(tmp_path: Path) -> None:
    """Issue 17 §4: replica A wrote results (file + database copy) and was scaled away with its volume; replica
    B's sweep removes the old copies from the database, but not one whose delivery is still pending, nor a
    young one. On the code before the database sweep the old copies stayed in the database for ever."""
    clock = {"now": NOW - timedelta(days=60)}
    with open_store(None, tmp_path, clock=lambda: clock["now"]) as store:
        from service.store.result_objects import ResultObjects

        writer = ResultsFolder(tmp_path / "a" / "results", ResultObjects(store))
        reader = ResultsFolder(tmp_path / "b" / "results", ResultObjects(store))
        old, pending = (generate_uid(), generate_uid()), (generate_uid(), generate_uid())
        for study, sop in (old, pending):
            store.receive(ReceivedInstance(sop_uid=sop, study_uid=study, series_uid=None, sop_class_uid=None,
                                           source="dicom:TEST", spool_path=None, received_at=clock["now"]))
            writer.write(study, sop, "SEG.dcm", b"segmentation with the patient module")
        store.add_delivery(pending[0], generate_uid(), DeliveryKind.SEG, "PACS",
                           str(writer.path(pending[0], pending[1], "SEG.dcm")))
        clock["now"] = NOW - timedelta(days=1)
        young = (generate_uid(), generate_uid())
        writer.write(*young, "SEG.dcm", b"a young segmentation")
        clock["now"] = NOW
        (tmp_path / "a").rename(tmp_path / "gone")  # A's volume went with it
        report = Retention(store, reader, Spool(tmp_path / "b" / "spool"), DAYS, clock=lambda: NOW).sweep()
        assert report.results_removed == 1
        assert not reader.has(*old, "SEG.dcm")
        assert reader.read(*pending, "SEG.dcm") == b"segmentation with the patient module"
        assert reader.read(*young, "SEG.dcm") == b"a young segmentation"
