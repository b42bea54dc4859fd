"""Listener identity (issue 17 §1): DICOM listeners sharing one store each own their spool and their instances.

Two PACS sides (`Pacs`: listener, spool, intake, result writers) in this process, each with its own folder
and PTX_LISTENER_NAME, on one store: a real PostgreSQL (tests/pg.py) or one SQLite file both open. Films are
copies of a real chest film sent over loopback C-STORE (pynetdicom), triaged by the service's flow in-process
(`InProcessTriage`) behind a gate, so that a listener's films stay received / processing while the other
listener restarts. Before issue 17 a restarted listener failed the other's acknowledged films (spool_missing:
their files are in the other's spool) and triaged films whose copy it held but the other had recorded.
"""

from __future__ import annotations

import asyncio
import io
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest

from service.cascade.finding import Finding
from service.pacs import side
from service.pacs.retention import Retention
from service.pacs.spool import Spool
from service.settings import Settings, load_settings
from service.store import (
    InstanceStatus,
    ReceivedInstance,
    ResultsStore,
    open_store,
    utc_now,
)
from service.store.results_files import ResultsFolder
from tests.pacs.test_dicom_listener import InProcessTriage
from tests.pacs.test_outputs_pending import until
from tests.pacs.test_pacs_crash import copies
from tests.pacs.test_parse_once import send_datasets as send
from tests.servers import free_port

SIIM = "chest/siim_cr_jpegbaseline_mono2.dcm"


@pytest.fixture(scope="module")
def triage() -> InProcessTriage:
    return InProcessTriage()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """One database both listeners open, each with its own connections (as two replicas would)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    return str(request.getfixturevalue("postgres_server").create_database())


class Held:
    """The service's triage behind a gate: a film waits in triage (processing) until the gate opens. Records
    the SOP Instance UIDs it was asked to triage."""

    def __init__(self, triage: InProcessTriage, open_now: bool = False) -> None:
        self.triage, self.seen = triage, list[str]()
        self.gate = asyncio.Event()
        if open_now:
            self.gate.set()

    async def __call__(self, data: bytes) -> Finding:
        self.seen.append(str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID))
        await self.gate.wait()
        return await self.triage(data)


def settings_for(name: str, data_dir: Path) -> Settings:
    return load_settings(environ={"PTX_DICOM_PORT": str(free_port()), "PTX_DICOM_HOST": "127.0.0.1",
                                  "PTX_DATA_DIR": str(data_dir), "PTX_RETENTION_DAYS": "0",
                                  "PTX_INTAKE_WORKERS": "1", "PTX_LISTENER_NAME": name})


async def started(settings: Settings, store: ResultsStore, triage: Held) -> side.Pacs:
    pacs = side.Pacs(settings, store, ResultsFolder(settings.data_dir / "results"), triage)
    pacs.intake.poll_interval_s = 0.1  # the poll is where an intake would take up another listener's rows
    await pacs.start()
    return pacs


def statuses(store: ResultsStore, uids: list[str]) -> Counter[str]:
    records = [store.instance(uid) for uid in uids]
    return Counter("missing" if r is None else r.status.value for r in records)


def film_copies(realdata: Path, count: int) -> list[pydicom.Dataset]:
    return copies((realdata / SIIM).read_bytes(), count)


def test_a_restarted_listener_leaves_the_other_listeners_films_alone(database_url: str, tmp_path: Path,
                                                                     realdata: Path, triage: InProcessTriage) -> None:
    films_a, films_b = film_copies(realdata, 2), film_copies(realdata, 2)
    uids_a = [str(ds.SOPInstanceUID) for ds in films_a]
    uids_b = [str(ds.SOPInstanceUID) for ds in films_b]
    in_triage = Counter({"processing": 1, "received": 1})  # one intake worker each: one held, one waiting

    async def scenario() -> None:
        with open_store(database_url, tmp_path / "a") as store_a, open_store(database_url, tmp_path / "b") as store_b:
            held_a, held_b = Held(triage), Held(triage)
            a = await started(settings_for("edge-a", tmp_path / "a"), store_a, held_a)
            b = await started(settings_for("edge-b", tmp_path / "b"), store_b, held_b)
            try:
                assert await asyncio.to_thread(send, a.listener.port, films_a) == [0, 0]
                assert await asyncio.to_thread(send, b.listener.port, films_b) == [0, 0]
                await until(lambda: statuses(store_a, uids_a) == in_triage, "A's films in triage")
                await until(lambda: statuses(store_a, uids_b) == in_triage, "B's films in triage")
                before = {uid: store_a.instance(uid) for uid in uids_a}
                # The same film reached both listeners at once and both spooled it; A recorded it first.
                waiting = next(uid for uid, r in before.items() if r is not None and r.status.value == "received")
                b.spool.write(waiting, a.spool.read(waiting))

                await b.stop()  # B's film in triage stays processing: its next start resumes it
                b = await started(settings_for("edge-b", tmp_path / "b"), store_b, again := Held(triage, True))
                await until(lambda: statuses(store_b, uids_b) == Counter(done=2), "B's films done after B's restart")
                await asyncio.sleep(0.5)  # a few of the restarted intake's polls

                after = {uid: store_b.instance(uid) for uid in uids_a}
                assert after == before, "B's restart changed A's instances (failed or took them)"
                assert sorted(again.seen) == sorted(uids_b), "B triaged only its own films"
                assert not b.spool.exists(waiting), "B's copy of A's film was dropped, not kept or triaged"
                assert sorted(a.spool.pending()) == sorted(uids_a)
                assert {r.listener for r in after.values()} == {"edge-a"}  # type: ignore[union-attr]

                held_a.gate.set()
                await until(lambda: statuses(store_a, uids_a) == Counter(done=2), "A's films done")
                await until(lambda: not a.spool.pending(), "A's spool emptied once its films' results were made")
                assert sorted(held_a.seen) == sorted(uids_a)
                assert {store_a.instance(uid).listener for uid in uids_b} == {"edge-b"}  # type: ignore[union-attr]
            finally:
                held_a.gate.set()
                await b.stop()
                await a.stop()

    asyncio.run(scenario())


def legacy_row(store: ResultsStore, spool: Spool, dataset: pydicom.Dataset) -> str:
    """An instance received before listener names (store migration 7): listener NULL, its file in `spool`."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    sop_uid = str(dataset.SOPInstanceUID)
    path = spool.write(sop_uid, buffer.getvalue())
    assert store.receive(ReceivedInstance(sop_uid=sop_uid, study_uid=str(dataset.StudyInstanceUID),
                                          series_uid=None, sop_class_uid=None, source="dicom:MODALITY",
                                          spool_path=str(path), received_at=utc_now()))
    return sop_uid


def test_rows_from_before_listener_names_are_adopted_only_where_their_file_is(
        database_url: str, tmp_path: Path, realdata: Path, triage: InProcessTriage) -> None:
    in_a, in_b = film_copies(realdata, 2)

    async def scenario() -> None:
        with open_store(database_url, tmp_path) as store:
            settings_a, settings_b = settings_for("edge-a", tmp_path / "a"), settings_for("edge-b", tmp_path / "b")
            sop_a = legacy_row(store, Spool(settings_a.data_dir / "spool"), in_a)
            sop_b = legacy_row(store, Spool(settings_b.data_dir / "spool"), in_b)
            b = side.Pacs(settings_b, store, ResultsFolder(tmp_path / "b" / "results"), Held(triage, True))
            b.intake.poll_interval_s = 0.1
            await b.intake.start()  # the intake alone: no C-STORE in this test
            try:
                await until(lambda: statuses(store, [sop_b]) == Counter(done=1), "B's own legacy film done")
                await asyncio.sleep(0.5)  # a few polls
                untouched = store.instance(sop_a)
                assert untouched is not None and untouched.status is InstanceStatus.RECEIVED, untouched
                assert (untouched.attempts, untouched.listener) == (0, None)
                assert store.instance(sop_b).listener == "edge-b"  # type: ignore[union-attr]
            finally:
                await b.intake.stop()
            a = side.Pacs(settings_a, store, ResultsFolder(tmp_path / "a" / "results"), Held(triage, True))
            await a.intake.start()
            try:
                await until(lambda: statuses(store, [sop_a]) == Counter(done=1), "A's legacy film done by A")
                assert store.instance(sop_a).listener == "edge-a"  # type: ignore[union-attr]
            finally:
                await a.intake.stop()

    asyncio.run(scenario())


def test_the_store_lists_a_listeners_own_instances_and_the_unowned_spooled_ones(database_url: str,
                                                                                  tmp_path: Path) -> None:
    with open_store(database_url, tmp_path) as store:
        def receive(sop: str, listener: str | None, spooled: bool = True) -> None:
            store.receive(ReceivedInstance(sop_uid=sop, study_uid="1.2.3", series_uid=None, sop_class_uid=None,
                                           source="dicom:M" if spooled else "http", received_at=utc_now(),
                                           spool_path=f"/spool/{sop}.dcm" if spooled else None, listener=listener))

        receive("1.1", "edge-a"), receive("1.2", "edge-b"), receive("1.3", None), receive("1.4", None, False)
        assert {r.sop_uid for r in store.pending_instances(listener="edge-a")} == {"1.1", "1.3"}
        assert {r.sop_uid for r in store.pending_instances()} == {"1.1", "1.2", "1.3", "1.4"}
        assert store.adopt_instance("1.3", "edge-b").listener == "edge-b"  # type: ignore[union-attr]
        assert store.adopt_instance("1.3", "edge-a") is None, "an owned instance is never taken over"
        assert store.adopt_instance("1.4", "edge-a") is None, "an HTTP film has no spool file to own"
        assert {r.sop_uid for r in store.pending_instances(listener="edge-a")} == {"1.1"}
        with pytest.raises(ValueError, match="PTX_LISTENER_NAME"):
            store.adopt_instance("1.2", "")


def test_retention_on_one_listener_never_removes_the_others_files(database_url: str, tmp_path: Path,
                                                                  realdata: Path) -> None:
    """Every file is past the limit: B's sweep removes its own finished leftover and nothing of A's."""
    film = (realdata / SIIM).read_bytes()
    with open_store(database_url, tmp_path) as store:
        spools = {name: Spool(tmp_path / name / "spool") for name in ("edge-a", "edge-b")}
        files: dict[str, str] = {}
        for name, spool in spools.items():
            for state in ("pending", "finished"):
                sop = f"1.2.826.0.1.{len(files) + 1}"
                path = spool.write(sop, film)
                store.receive(ReceivedInstance(sop_uid=sop, study_uid="1.2.3", series_uid=None, sop_class_uid=None,
                                               source="dicom:M", spool_path=str(path), received_at=utc_now(),
                                               listener=name))
                if state == "finished":
                    store.mark_instance(sop, InstanceStatus.FAILED, "not_chest")
                files[f"{name} {state}"] = sop
        later = utc_now() + timedelta(days=10)
        report = Retention(store, ResultsFolder(tmp_path / "edge-b" / "results"), spools["edge-b"], 1,
                           clock=lambda: later, listener="edge-b").sweep()
        assert (report.spool_removed, report.spool_kept) == (1, 1)
        assert sorted(spools["edge-a"].pending()) == sorted([files["edge-a pending"], files["edge-a finished"]])
        assert spools["edge-b"].pending() == [files["edge-b pending"]]
