"""Results from any replica (issue 17 §4): what replica A made is served, sent and notified by replica B.

Each replica has its own results folder (its own volume) and both share one store, SQLite or a real
PostgreSQL server (tests/pg.py). A real SEG and SR are built from the SIIM chest film by the service's own
builders; B's answers come from the worklist API's router (tests/http/worklist_router.py) and the reading
room's file route, its deliveries go to dcmtk's storescp, its notifications to an HL7 RIS (hl7apy). Where
the sending replica must not find A's folder, A's folder is moved away first, as on another machine.
"""

from __future__ import annotations

import copy
import io
import shutil
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi import FastAPI
from PIL import Image
from starlette.testclient import TestClient

from service.cascade.finding import Finding, Priority, PriorityBands, build_finding
from service.cascade.postprocess import CascadeResult
from service.http.pages import views
from service.imaging.reader import Film, read_film
from service.pacs.delivery import Dispatcher, make_senders, parse_destinations
from service.pacs.notify import IdentifierFiles, MllpSender, Notifier
from service.pacs.results import build_results
from service.settings import load_settings
from service.store import (
    DeliveryKind,
    DeliveryState,
    NotificationState,
    ResultsStore,
    utc_now,
)
from service.store.results_files import ResultsFolder
from tests.http.worklist_router import router_client
from tests.pacs.test_delivery import dataset_bytes, storescp
from tests.pacs.test_notifications import (
    ACCESSION,
    FAST,
    PATIENT_ID,
    Ris,
    found,
    record,
    settled,
    until,
)
from tests.realdata import CHEST
from tests.servers import free_port
from tests.store.test_result_objects import Replicas, two_replicas

MODELS = {"classifier": {"name": "ptx-classifier-demo", "version": "0.1.0", "backend": "onnxruntime-cpu"},
          "segmenter": {"name": "ptx-segmenter-demo", "version": "0.2.0", "backend": "onnxruntime-cpu"}}


@dataclass(frozen=True)
class Made:
    """A positive finding on a real film and its objects as the PACS side writes them."""

    finding: Finding
    seg: bytes
    seg_uid: str
    sr: bytes
    overlay_png: bytes

    @property
    def study(self) -> str:
        return str(self.finding.study_uid)

    @property
    def sop(self) -> str:
        return str(self.finding.sop_uid)


def part10(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def made(realdata: Path) -> Made:
    film = read_film(realdata / CHEST[0].path)
    assert film.header is not None
    mask = np.zeros(film.radiograph.pixels.shape, dtype=bool)
    rows, columns = mask.shape
    mask[rows // 8: rows // 3, columns // 5: columns // 2] = True
    result = CascadeResult(score=0.93, positive=True, gated=True, mask=mask, probability_max=0.93)
    finding = build_finding(film.radiograph, result, 0.5, PriorityBands(), models=MODELS)
    objects = build_results(film.header, finding, pixels=film.radiograph.pixels)
    assert objects.seg is not None
    png = io.BytesIO()
    Image.fromarray(np.full((300, 200), 128, dtype=np.uint8)).save(png, format="PNG")
    return Made(finding, part10(objects.seg), str(objects.seg.SOPInstanceUID), part10(objects.sr), png.getvalue())


@pytest.fixture(params=["sqlite", "postgresql"])
def replicas(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Replicas]:
    with two_replicas(request, tmp_path, clock=utc_now) as both:
        yield both


def write_on(folder: ResultsFolder, store: ResultsStore, made: Made) -> None:
    """What the PACS side of the replica owning `folder` does: the finding recorded, its objects written."""
    record(store, made.finding)
    folder.write(made.study, made.sop, "SEG.dcm", made.seg)
    folder.write(made.study, made.sop, "SR.dcm", made.sr)
    folder.write(made.study, made.sop, "overlay.png", made.overlay_png)


def study_links(client: TestClient, made: Made) -> dict[str, str]:
    answer = client.get(f"/v1/studies/{made.study}")
    assert answer.status_code == 200, answer.text
    (finding,) = answer.json()["findings"]
    return finding["links"]


def page_client(monkeypatch: pytest.MonkeyPatch, results: ResultsFolder) -> TestClient:
    """The reading room's file route alone (its gate is not what is tested here)."""
    monkeypatch.setattr(views, "_service", lambda: types.SimpleNamespace(results=results))
    app = FastAPI()
    app.include_router(views.router, prefix="/worklist")
    return TestClient(app)


def test_b_serves_and_links_the_seg_that_a_made(replicas: Replicas, made: Made,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The bug this fixes: B's answer linked nothing and its GET was a 404, the SEG being on A's volume."""
    write_on(replicas.a, replicas.a_store, made)
    b = replicas.b
    assert not b.root.exists(), "B's folder holds nothing of A's"
    client = router_client(monkeypatch, replicas.b_store, b)
    links = study_links(client, made)
    seg_link = f"/v1/results/{made.study}/{made.sop}/SEG.dcm"
    assert (links["seg"], links["sr"]) == (seg_link, f"/v1/results/{made.study}/{made.sop}/SR.dcm")
    answer = client.get(seg_link)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/dicom"
    assert answer.content == made.seg
    assert pydicom.dcmread(io.BytesIO(answer.content)).SOPInstanceUID == made.seg_uid
    finding = client.get(f"/v1/findings/{made.sop}").json()
    assert finding["links"]["overlay_png"] == f"/v1/results/{made.study}/{made.sop}/overlay.png"
    pages = page_client(monkeypatch, b)
    assert pages.get(f"/worklist/studies/{made.study}/{made.sop}/SR.dcm").content == made.sr
    thumb = pages.get(f"/worklist/studies/{made.study}/{made.sop}/thumbnail.png")
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).size == (85, 128)


def test_an_object_over_the_bound_is_a_404_on_b_that_says_why(replicas: Replicas, made: Made,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    a = replicas.folder("a", replicas.a_store, max_bytes=len(made.sr))  # the SEG is larger, the SR just fits
    assert len(made.seg) > len(made.sr)
    write_on(a, replicas.a_store, made)
    client = router_client(monkeypatch, replicas.b_store, replicas.b)
    links = study_links(client, made)
    assert "seg" not in links and "sr" in links, "B links only what it can serve"
    answer = client.get(f"/v1/results/{made.study}/{made.sop}/SEG.dcm")
    assert answer.status_code == 404
    error = answer.json()["error"]
    assert error["code"] == "not_on_this_replica" and "PTX_RESULTS_DATABASE_MAX_BYTES" in error["message"]
    page = page_client(monkeypatch, replicas.b).get(f"/worklist/studies/{made.study}/{made.sop}/SEG.dcm")
    assert (page.status_code, page.json()["error"]["code"]) == (404, "not_on_this_replica")
    own = router_client(monkeypatch, replicas.a_store, a).get(f"/v1/results/{made.study}/{made.sop}/SEG.dcm")
    assert own.status_code == 200 and own.content == made.seg, "A serves its own file as before"
    # B's dispatcher claiming its delivery cannot send it: a retryable attempt that says why (A may claim it next)
    senders = make_senders(parse_destinations(f"pacs=dicom://PACS@127.0.0.1:{free_port()}"), calling_ae="PTX_TEST")
    Dispatcher(replicas.a_store, senders, results=a).enqueue(made.study, made.seg_uid, DeliveryKind.SEG,
                                                             a.path(made.study, made.sop, "SEG.dcm"))
    shutil.move(a.root, replicas.root / "a-volume-elsewhere")
    assert Dispatcher(replicas.b_store, senders, results=replicas.b).run_once() == 1
    (attempt,) = replicas.b_store.deliveries(made.study)
    assert attempt.state is DeliveryState.PENDING and attempt.attempts == 1
    assert attempt.last_error == (f"SEG.dcm ({len(made.seg)} bytes) is over PTX_RESULTS_DATABASE_MAX_BYTES: only "
                                  f"the replica that made it can send it")


def test_without_the_database_copy_b_answers_404_as_before(replicas: Replicas, made: Made,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    off = {"PTX_DATABASE_URL": replicas.url, "PTX_RESULTS_IN_DATABASE": "false"}
    a = ResultsFolder.from_settings(load_settings(environ={**off, "PTX_DATA_DIR": str(replicas.root / "a")}),
                                    replicas.a_store)
    b = ResultsFolder.from_settings(load_settings(environ={**off, "PTX_DATA_DIR": str(replicas.root / "b")}),
                                    replicas.b_store)
    write_on(a, replicas.a_store, made)
    client = router_client(monkeypatch, replicas.b_store, b)
    assert set(study_links(client, made)) == {"finding"}
    answer = client.get(f"/v1/results/{made.study}/{made.sop}/SEG.dcm")
    assert (answer.status_code, answer.json()["error"]["code"]) == (404, "not_found")


def test_a_delivery_queued_by_a_is_sent_once_by_b(replicas: Replicas, made: Made, tmp_path: Path) -> None:
    """A writes the SEG and queues it; A's folder is then out of reach (another machine's volume) and B's
    dispatcher, which claims the row, sends the database's copy: storescp holds the SEG once, unchanged."""
    a, b = replicas.a, replicas.b
    write_on(a, replicas.a_store, made)
    port = free_port()
    with storescp(port, tmp_path / "pacs") as out:
        senders = {name: make_senders(parse_destinations(f"pacs=dicom://PACS@127.0.0.1:{port}"),
                                      calling_ae="PTX_TEST", connect_timeout_s=2.0, timeout_s=5.0)
                   for name in ("a", "b")}
        on_a = Dispatcher(replicas.a_store, senders["a"], results=a)
        on_b = Dispatcher(replicas.b_store, senders["b"], results=b)
        (queued,) = on_a.enqueue(made.study, made.seg_uid, DeliveryKind.SEG,
                                 a.path(made.study, made.sop, "SEG.dcm")).values()
        shutil.move(a.root, tmp_path / "a-volume-elsewhere")
        assert on_b.run_once() == 1
        assert on_a.run_once() == 0 and on_b.run_once() == 0, "delivered: due nowhere any more"
        arrived = sorted(out.iterdir())
    (record,) = replicas.a_store.deliveries(made.study)
    assert (record.id, record.state, record.attempts, record.last_error) == (queued, DeliveryState.DELIVERED, 1, None)
    assert len(arrived) == 1 and arrived[0].name.endswith(made.seg_uid), "the SEG arrives once"
    assert dataset_bytes(arrived[0].read_bytes()) == dataset_bytes(made.seg)
    assert (b.root / made.study / made.sop / "SEG.dcm").read_bytes() == made.seg, "B's copy, for a resend"


def test_a_notification_queued_by_a_is_sent_by_b_with_the_films_identifiers(replicas: Replicas,
                                                                            realdata: Path) -> None:
    """The film's Accession Number and Patient ID are written beside A's results; B's notifier, which
    claims the row, reads them from the database and the RIS gets a message that carries them."""
    read = read_film(realdata / CHEST[0].path)
    assert read.header is not None
    header = copy.deepcopy(read.header)
    header.PatientID, header.AccessionNumber = PATIENT_ID, ACCESSION
    study = "1.2.826.0.1.3680043.8.498.77"
    finding = found(Film(read.radiograph, header), study, f"{study}.1", Priority.STAT)
    with Ris() as ris:
        def notifier(store: ResultsStore, results: ResultsFolder) -> Notifier:
            files = IdentifierFiles(results)
            hl7 = MllpSender(ris.address, sending_facility="PTXTEST", identifiers=files.read, connect_timeout_s=2,
                             timeout_s=5)
            return Notifier(store, files, {"hl7": hl7}, priorities={Priority.STAT}, patient_ids=True,
                            backoff=FAST, poll_interval_s=0.1)

        on_a, on_b = notifier(replicas.a_store, replicas.a), notifier(replicas.b_store, replicas.b)
        record(replicas.a_store, finding)
        assert on_a.notify(finding)  # A queues it (never started: its dispatcher sends nothing)
        shutil.move(replicas.a.root, replicas.root / "a-volume-elsewhere")
        on_b.start()
        try:
            (row,) = until(lambda: settled(replicas.b_store, study, 1), "B to send A's notification")
        finally:
            on_b.close()
    assert row.state is NotificationState.SENT
    (message,) = ris.received
    assert f"PID|||{PATIENT_ID}" in message and ACCESSION in message, "the identifiers A kept reach the RIS"
