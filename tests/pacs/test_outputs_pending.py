"""A fault after the finding loses nothing (issue 13 §9): when the SEG/SR/SC cannot be written, the finding
stays on the worklist, the film stays in the spool, the instance shows outputs_pending (in its study and the
ptx_outputs_pending gauge), and a later retry, with backoff and across restarts, makes the objects.

The fault is one the code cannot bypass even as root: the results folder's path is a regular file, so no
folder can be made there. Everything else is real: the PACS side (`Pacs`: listener, spool, intake, result
writers) with the service's flow in-process (`InProcessTriage`), C-STOREs over loopback, a SQLite store.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from prometheus_client import REGISTRY

from service.pacs import side
from service.pacs.intake import Intake
from service.settings import Settings, load_settings
from service.store import (
    DeliveryKind,
    InstanceStatus,
    ResultsStore,
    StudyStatus,
    open_store,
)
from service.store.results_files import RESULT_FILES, ResultsFolder
from tests.pacs.test_dicom_listener import InProcessTriage, spool_and_receive
from tests.pacs.test_parse_once import send
from tests.realdata import CHEST
from tests.servers import free_port

T0 = datetime(2030, 1, 1, 8, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def triage() -> InProcessTriage:
    return InProcessTriage()


def pacs_settings(data_dir: Path, **extra: str) -> Settings:
    return load_settings(environ={"PTX_DICOM_PORT": str(free_port()), "PTX_DICOM_HOST": "127.0.0.1",
                                  "PTX_DATA_DIR": str(data_dir), "PTX_RETENTION_DAYS": "0", **extra})


def blocked_results(data_dir: Path) -> ResultsFolder:
    """A results folder whose path is taken by a file: every write fails (FileExistsError) until it goes."""
    blocker = data_dir / "results"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(b"in the way")
    return ResultsFolder(blocker)


async def until(check: Callable[[], object], what: str, timeout_s: float = 60.0) -> object:
    """`check()`'s first truthy value, polled off the loop; fails naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def gauge() -> float | None:
    return REGISTRY.get_sample_value("ptx_outputs_pending")


def test_a_results_fault_keeps_finding_and_film_and_a_retry_makes_the_objects(tmp_path: Path, realdata: Path,
                                                                             triage: InProcessTriage) -> None:
    film = realdata / CHEST[0].path
    header = pydicom.dcmread(film, stop_before_pixels=True)
    sop, study = str(header.SOPInstanceUID), str(header.StudyInstanceUID)
    settings = pacs_settings(tmp_path, PTX_OUTPUTS_RETRY_S="1")
    results = blocked_results(tmp_path)

    async def scenario() -> None:
        with open_store(None, tmp_path) as store:
            pacs = side.Pacs.observed(settings, store, results, triage)
            await pacs.start()
            try:
                assert await asyncio.to_thread(send, settings.dicom_port, [film]) == [0x0000]
                pending = await until(lambda: _outputs_pending(store, sop), "the instance to be outputs_pending")
                assert pending.outputs_attempts >= 1 and pending.outputs_due_at is not None
                found = store.finding(sop)
                assert found is not None and found[0] == study, "the finding stands"
                record = store.study(study)
                assert record is not None and record.status is StudyStatus.TRIAGED and record.priority is not None
                assert [i.status for i in record.instances] == [InstanceStatus.OUTPUTS_PENDING]  # the study answer
                assert pacs.spool.exists(sop), "the film must stay in the spool until its objects are made"
                assert [r.sop_uid for r in store.due_outputs()] == [sop]
                await until(lambda: gauge() == 1.0, "ptx_outputs_pending to read 1", 15)

                results.root.unlink()  # the fault is gone: the next retry makes the objects
                done = await until(lambda: _done(store, sop), "the objects to be made after the fault", 30)
                assert done.outputs_due_at is None and done.error_code is None
                await until(lambda: not pacs.spool.exists(sop), "the spool file to go")
                assert results.present(study, sop) == list(RESULT_FILES)  # SEG, SR, SC and the overlay PNG
                assert store.finding(sop) == found, "the finding is kept as it was, not recorded again"
                await until(lambda: gauge() == 0.0, "ptx_outputs_pending back to 0", 15)
            finally:
                await pacs.stop()

    asyncio.run(scenario())


def test_outputs_retries_back_off_across_restarts_and_end_once_the_fault_is_gone(
        tmp_path: Path, realdata: Path, triage: InProcessTriage, monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry time is the store's: `outputs_retry_s` doubling per failure up to the cap, counted across
    restarts; each start tries every outputs_pending instance at once. The intake runs with the PACS side's
    own result writers (`Pacs._on_finding`) and a clock the test moves. The study answer of the worklist
    API (its real router, in-process on this store) shows the state."""
    now = [T0]
    settings = pacs_settings(tmp_path)
    results = blocked_results(tmp_path)

    async def run_once(store: ResultsStore, pacs: side.Pacs, notify: str | None = None) -> None:
        intake = Intake(pacs.spool, store, triage, workers=1, poll_interval_s=600, outputs_retry_s=30,
                        max_outputs_retry_s=100, on_finding=pacs._on_finding, clock=lambda: now[0])
        await intake.start()
        if notify is not None:
            intake.notify(notify)
        await asyncio.sleep(0)
        await intake.wait_idle(60)
        await intake.stop()

    async def scenario() -> None:
        with open_store(None, tmp_path) as store:
            pacs = side.Pacs(settings, store, results, triage)  # its writers only: never started
            sop = spool_and_receive(pacs.spool, store, realdata / CHEST[0].path)
            await run_once(store, pacs, notify=sop)
            waits = [_wait_s(store, sop, now[0])]
            for _ in range(3):  # three restarts with the fault still there
                now[0] += timedelta(minutes=5)
                await run_once(store, pacs)
                waits.append(_wait_s(store, sop, now[0]))
            assert waits == [30, 60, 100, 100]  # doubled, then capped (max_outputs_retry_s)
            record = store.instance(sop)
            assert record is not None and (record.status, record.outputs_attempts) == (
                InstanceStatus.OUTPUTS_PENDING, 4)
            assert record.attempts == 1, "triaged once; the retries only remake the objects"
            assert pacs.spool.exists(sop)
            answer = study_answer(monkeypatch, store, results, record.study_uid)
            assert [(i["sop_uid"], i["status"]) for i in answer["instances"]] == [(sop, "outputs_pending")]
            assert answer["status"] == "triaged" and answer["findings"][0]["sop_uid"] == sop

            results.root.unlink()
            await run_once(store, pacs)  # the restart after the fix
            record = store.instance(sop)
            assert record is not None and (record.status, record.outputs_due_at) == (InstanceStatus.DONE, None)
            assert not pacs.spool.exists(sop) and store.due_outputs() == []
            assert results.present(record.study_uid, sop) == list(RESULT_FILES)
            await run_once(store, pacs)  # nothing pending any more: nothing made again
            assert (store.instance(sop).outputs_attempts, store.instance(sop).status) == (4, InstanceStatus.DONE)

    asyncio.run(scenario())


def test_an_outputs_pending_instance_whose_film_is_gone_is_settled_not_retried_forever(
        tmp_path: Path, realdata: Path, triage: InProcessTriage) -> None:
    """Its objects can never be made without the film: done with error spool_missing, its finding kept."""
    settings = pacs_settings(tmp_path)
    results = blocked_results(tmp_path)

    async def scenario() -> None:
        with open_store(None, tmp_path) as store:
            pacs = side.Pacs(settings, store, results, triage)
            sop = spool_and_receive(pacs.spool, store, realdata / CHEST[0].path)
            intake = Intake(pacs.spool, store, triage, workers=1, poll_interval_s=600, on_finding=pacs._on_finding)
            await intake.start()
            intake.notify(sop)
            await asyncio.sleep(0)
            await intake.wait_idle(60)
            await intake.stop()
            assert store.instance(sop).status is InstanceStatus.OUTPUTS_PENDING
            pacs.spool.remove(sop)  # removed by hand, say
            await intake.start()
            await intake.wait_idle(60)
            await intake.stop()
            record = store.instance(sop)
            assert record is not None and (record.status, record.error_code) == (InstanceStatus.DONE, "spool_missing")
            assert store.due_outputs() == [] and store.finding(sop) is not None

    asyncio.run(scenario())


def study_answer(monkeypatch: pytest.MonkeyPatch, store: ResultsStore, results: ResultsFolder,
                 study_uid: str) -> dict:
    """GET /v1/studies/{study_uid} from the worklist API's own router on this store (as
    tests/http/test_api_worklist.py's `api_on_store` serves it)."""
    from tests.http.worklist_router import router_client

    answer = router_client(monkeypatch, store, results).get(f"/v1/studies/{study_uid}")
    assert answer.status_code == 200, answer.text
    return answer.json()


class LockedStore:
    """A real store that, while `locked`, fails as a SQLite store whose lock another writer holds past its
    busy timeout, on the two writes of the outputs path: queueing a delivery and recording outputs_pending."""

    def __init__(self, store: ResultsStore) -> None:
        self.store, self.locked = store, True

    def _write(self, name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.locked:
                raise sqlite3.OperationalError("database is locked")
            return getattr(self.store, name)(*args, **kwargs)
        return call

    def __getattr__(self, name: str) -> Any:
        if name in ("add_delivery", "defer_outputs"):
            return self._write(name)
        return getattr(self.store, name)


def test_a_store_locked_while_queueing_the_deliveries_is_retried_from_memory(tmp_path: Path, realdata: Path,
                                                                           triage: InProcessTriage) -> None:
    """The store is locked both when the deliveries are queued and when the intake would record
    outputs_pending: the film stays in the spool and the retry runs from the intake's own timer; once the
    lock is gone the objects are queued for the destination and the film goes."""
    settings = pacs_settings(tmp_path, PTX_DESTINATIONS="pacs=dicom://PACS@127.0.0.1:9")  # never started

    async def scenario() -> None:
        with open_store(None, tmp_path) as real:
            store = LockedStore(real)
            pacs = side.Pacs(settings, store, ResultsFolder(tmp_path / "results"), triage)  # type: ignore[arg-type]
            sop = spool_and_receive(pacs.spool, real, realdata / CHEST[0].path)
            intake = Intake(pacs.spool, store, triage, workers=1,  # type: ignore[arg-type]
                            poll_interval_s=600, outputs_retry_s=0.2, on_finding=pacs._on_finding)
            await intake.start()
            try:
                intake.notify(sop)
                await until(lambda: real.finding(sop), "the finding")
                await asyncio.sleep(0.5)  # at least one retry, still locked
                assert pacs.spool.exists(sop) and real.deliveries() == []
                store.locked = False
                await until(lambda: not pacs.spool.exists(sop), "the retry after the lock")
            finally:
                await intake.stop()
            record = real.instance(sop)
            assert record is not None and (record.status, record.error_code) == (InstanceStatus.DONE, None)
            assert sorted(d.kind for d in real.deliveries()) == [DeliveryKind.SEG, DeliveryKind.SR]

    asyncio.run(scenario())


def _outputs_pending(store: ResultsStore, sop: str) -> object:
    record = store.instance(sop)
    return record if record is not None and record.status is InstanceStatus.OUTPUTS_PENDING else None


def _done(store: ResultsStore, sop: str) -> object:
    record = store.instance(sop)
    return record if record is not None and record.status is InstanceStatus.DONE else None


def _wait_s(store: ResultsStore, sop: str, now: datetime) -> float:
    """How long after the intake's `now` the store has the next outputs try (the intake's backoff)."""
    record = store.instance(sop)
    assert record is not None and record.outputs_due_at is not None
    return (record.outputs_due_at - now).total_seconds()
