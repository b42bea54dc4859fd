"""A clean stop of the intake (issue 13 §10): films being triaged finish within the grace, nothing new starts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from service.cascade.finding import Finding
from service.pacs.intake import Intake
from service.pacs.spool import Spool
from service.store import InstanceStatus, open_store
from tests.pacs.test_dicom_listener import (
    CHEST,
    InProcessTriage,
    all_instances,
    sop_uid_of,
    spool_and_receive,
)


@pytest.fixture(scope="module")
def triage() -> InProcessTriage:
    return InProcessTriage()


def run_stop(tmp_path: Path, realdata: Path, triage: InProcessTriage, grace_s: float
             ) -> tuple[dict[str, InstanceStatus], list[str], str]:
    """Two films, one worker whose triage takes 1 s; stop with `grace_s` once the first is inside triage."""
    started = asyncio.Event()

    async def slow(payload: bytes) -> Finding:
        started.set()
        await asyncio.sleep(1.0)
        return await triage(payload)

    async def scenario() -> tuple[dict[str, InstanceStatus], list[str], str]:
        with open_store(None, tmp_path) as store:
            spool = Spool(tmp_path / "spool")
            for item in (CHEST[0], CHEST[2]):
                spool_and_receive(spool, store, realdata / item.path)
            intake = Intake(spool, store, slow, workers=1, poll_interval_s=60)
            await intake.start()
            await asyncio.wait_for(started.wait(), 10)
            await intake.stop(grace_s)
            statuses = {uid: record.status for uid, record in all_instances(store).items()}
            return statuses, spool.pending(), sop_uid_of(realdata / CHEST[0].path)

    return asyncio.run(scenario())


def test_stop_with_a_grace_lets_the_film_in_triage_finish_and_takes_up_no_other(
        tmp_path: Path, realdata: Path, triage: InProcessTriage) -> None:
    statuses, pending, _ = run_stop(tmp_path, realdata, triage, grace_s=10)
    assert sorted(statuses.values(), key=str) == sorted([InstanceStatus.DONE, InstanceStatus.RECEIVED], key=str)
    (waiting,) = [uid for uid, status in statuses.items() if status is InstanceStatus.RECEIVED]
    assert pending == [waiting]  # the one not started keeps its spool file for the next start


def test_stop_without_a_grace_cancels_the_film_in_triage_which_stays_for_the_next_start(
        tmp_path: Path, realdata: Path, triage: InProcessTriage) -> None:
    statuses, pending, _ = run_stop(tmp_path, realdata, triage, grace_s=0)
    assert InstanceStatus.DONE not in statuses.values()
    assert sorted(pending) == sorted(statuses)  # both films still spooled, nothing half-recorded
