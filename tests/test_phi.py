"""No patient identifiers in logs, metrics or error messages (#7): sentinel values in every patient tag,
fed through HTTP and C-STORE, then searched for everywhere the service reports.

Films are real chest radiographs (and a corrupt real film) whose patient module is replaced by sentinel
values that cannot occur by chance (`SNTL...`, a birth date of 1901-02-03); some carry values invalid for
their VR, so warnings about them are exercised too. They go through /v1/triage, /v1/inspect,
/v1/triage/batch (accepted and refused films: not a chest, corrupt pixel data, truncated pixel data) and
through C-STORE from an allowed calling AE (accepted and refused) and from one that is not allowed. Then
the sentinels are looked for in: the whole server log (every process: BentoML, edge, model worker, PACS
side, Python warnings), every HTTP answer (body and headers), /metrics, the worklist API (worklist,
studies, findings), the C-STORE statuses, and the SQLite store's files.

Not searched: the SEG / SR / SC objects the service writes back to the PACS. They must carry the patient
module to be filed with the patient's study (docs/security.md), so they hold the sentinels by design.
The same server checks the default access settings: health open, metrics and the API behind the token.
"""

from __future__ import annotations

import io
import json
import re
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE

from tests.dicom_factory import chest_like, dataset
from tests.servers import bento_server, free_port

TOKEN = "phi-test-token-6c0f2b9e8d7a4f13"
ALLOWED_AE = "PHISENDER"
# Every value starts SNTL (or is the birth date), so one pattern finds any of them or any part of them
# (a DICOM person name's components are found on their own: SNTLFAMILY, SNTLGIVEN).
SENTINEL_TAGS = {
    "PatientName": "SNTLFAMILY^SNTLGIVEN", "PatientID": "SNTLPID123", "PatientBirthDate": "19010203",
    "AccessionNumber": "SNTLACC9", "OtherPatientIDs": "SNTLOTHERPID", "OtherPatientNames": "SNTLOTHER^SNTLNAME",
    "PatientAddress": "SNTLADDRESS 1 MAIN ST", "PatientTelephoneNumbers": "SNTLPHONE555",
    "ReferringPhysicianName": "SNTLREFDOC^X", "MedicalRecordLocator": "SNTLMRN77", "IssuerOfPatientID": "SNTLISSUER",
}
# Values invalid for their VR (a date that is no date, a name over 64 characters per component group).
INVALID_TAGS = {"PatientBirthDate": "SNTLBADDOB", "PatientName": "SNTL" + "X" * 70, "PatientID": "SNTLPID\\SNTLPID2"}
FOUND = re.compile(r"SNTL|19010203|1901-02-03|01/02/1901|03\.02\.1901")


def with_sentinels(ds: Dataset, invalid: bool = False, **changes: object) -> bytes:
    """`ds` as a new instance (fresh UIDs) with the sentinel patient module, and any `changes`."""
    ds = pydicom.dcmread(io.BytesIO(encode(ds))) if not isinstance(ds, bytes) else pydicom.dcmread(io.BytesIO(ds))
    for keyword, value in {**SENTINEL_TAGS, **(INVALID_TAGS if invalid else {})}.items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return encode(ds)


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def films(realdata: Path) -> dict[str, bytes]:
    chest = pydicom.dcmread(realdata / "chest/siim_cr_jpegbaseline_mono2.dcm")
    hip = pydicom.dcmread(realdata / "corrupt/cr_hip_jpeg_extended_bad_sos.dcm")
    truncated = dataset(chest_like(128, 128))
    truncated.PixelData = truncated.PixelData[:5000]
    return {
        "chest": with_sentinels(chest),
        "chest_invalid_vr": with_sentinels(chest, invalid=True),
        "not_chest": with_sentinels(chest, BodyPartExamined="PELVIS"),
        "corrupt_pixels": with_sentinels(hip, BodyPartExamined="CHEST"),  # a JPEG with a bad SOS marker
        "truncated_pixels": with_sentinels(truncated),
        "no_pixels": with_sentinels(_without_pixels()),
    }


def _without_pixels() -> Dataset:
    ds = dataset(chest_like(64, 64))
    del ds.PixelData
    return ds


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, realdata: Path) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("phi")
    dicom_port = free_port()
    env = {"PTX_DATA_DIR": str(root / "data"), "PTX_API_TOKEN": TOKEN, "PTX_RECORD_HTTP": "true",
           "PTX_DICOM_PORT": str(dicom_port), "PTX_DICOM_HOST": "127.0.0.1",
           "PTX_DICOM_ALLOWED_AES": f"{ALLOWED_AE}@127.0.0.1", "PTX_MAX_BATCH_SIZE": "4"}
    log = root / "server.log"
    with bento_server(log, env=env, timeout_s=180) as base:
        yield SimpleNamespace(base=base, log=log, home=root / "server-bentoml-home", data=root / "data",
                              dicom_port=dicom_port, seen=[])


def request(server: SimpleNamespace, path: str, body: bytes | None = None, content_type: str = "application/dicom",
            token: str | None = TOKEN) -> tuple[int, bytes]:
    """One call; its body and headers are kept for the final search."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is not None:
        headers["Content-Type"] = content_type
    req = urllib.request.Request(f"{server.base}{path}", data=body, headers=headers,
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            status, raw, head = response.status, response.read(), str(response.headers)
    except urllib.error.HTTPError as exc:
        status, raw, head = exc.code, exc.read(), str(exc.headers)
    server.seen.append((path, head, raw))
    return status, raw


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b""
    for name, data in files:
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
                 "Content-Type: application/dicom\r\n\r\n").encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def c_store(port: int, data: bytes, calling_ae: str) -> tuple[bool, int | None, str]:
    """Send one file with pynetdicom in its own transfer syntax: (associated, status, error comment)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="PTXTRIAGE")
    if not assoc.is_established:
        return False, None, ""
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    return True, int(status.Status) if "Status" in status else None, str(status.get("ErrorComment", ""))


EXPECTED_HTTP = {"chest": (200, None), "chest_invalid_vr": (200, None), "not_chest": (422, "not_chest"),
                 "corrupt_pixels": (422, "corrupt_pixel_data"), "truncated_pixels": (422, "corrupt_pixel_data"),
                 "no_pixels": (422, "no_pixel_data")}


def test_defaults_health_open_metrics_and_api_behind_the_token(server: SimpleNamespace) -> None:
    for path in ("/healthz", "/livez", "/readyz"):
        assert request(server, path, token=None)[0] == 200, path
    for path in ("/metrics", "/v1/worklist"):
        assert request(server, path, token=None)[0] == 401, path
        assert request(server, path)[0] == 200, path
    status, raw = request(server, "/docs.json", token=None)
    spec = json.loads(raw)
    assert status == 200 and spec["paths"]["/readyz"]["get"]["security"] == []  # documented as open
    assert "security" not in spec["paths"]["/metrics"]["get"]


def test_http_answers_and_errors_carry_no_patient_data(server: SimpleNamespace, films: dict[str, bytes]) -> None:
    for name, data in films.items():
        status, expected_code = EXPECTED_HTTP[name]
        for path in ("/v1/triage?mask=rle", "/v1/inspect"):
            got, raw = request(server, path, data)
            answer = json.loads(raw)
            if path == "/v1/inspect" and name == "not_chest":
                assert got == 422 and answer["error"]["code"] == "not_chest"
                continue
            if path == "/v1/inspect" and expected_code is None:
                assert got == 200 and answer["sop_uid"] == pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID
                assert "patient_name" not in answer and "patient_id" not in answer
                continue
            assert got == status, (name, path, answer)
            if expected_code is not None:
                assert answer["error"]["code"] == expected_code, (name, path, answer)
    body, content_type = multipart([(f"film{i}.dcm", data) for i, data in enumerate(films.values())][:6])
    got, raw = request(server, "/v1/triage/batch?mask=none", body, content_type)
    assert got == 200
    codes = [item.get("error", {}).get("code") for item in json.loads(raw)["results"]]
    assert codes == [EXPECTED_HTTP[name][1] for name in films]
    # Garbage with sentinels in it: a "DICOM" that is not one, and a too-large declaration.
    got, raw = request(server, "/v1/triage", b"\x00" * 200 + b"DICM SNTLFAMILY^SNTLGIVEN 19010203")
    assert got == 400 and json.loads(raw)["error"]["code"] == "not_dicom"


def test_c_store_and_its_worklist_carry_no_patient_data(server: SimpleNamespace, films: dict[str, bytes]) -> None:
    refused, _, _ = c_store(server.dicom_port, films["chest"], calling_ae="STRANGER")
    assert not refused  # not on the allowlist: rejected at association
    sent = {}
    for name, data in films.items():
        fresh = with_sentinels(data)  # new UIDs: not the instances HTTP already put on the worklist
        associated, status, comment = c_store(server.dicom_port, fresh, ALLOWED_AE)
        assert associated and status == 0x0000, (name, status, comment)
        server.seen.append(("c-store", "", comment.encode()))
        ds = pydicom.dcmread(io.BytesIO(fresh), stop_before_pixels=True)
        sent[name] = (str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
    deadline = time.monotonic() + 180
    pending = dict(sent)
    while pending and time.monotonic() < deadline:
        for name, (study_uid, sop_uid) in list(pending.items()):
            status, raw = request(server, f"/v1/studies/{study_uid}")
            if status != 200:
                continue
            study = json.loads(raw)
            instance = next(i for i in study["instances"] if i["sop_uid"] == sop_uid)
            finished = instance["status"] == "failed" or (
                instance["status"] == "done" and all("sr" in f["links"] for f in study["findings"]))
            if finished:
                expected = EXPECTED_HTTP[name][1]
                assert (instance["status"], instance.get("error_code")) == (
                    ("done", None) if expected is None else ("failed", expected)), (name, instance)
                for finding in study["findings"]:
                    request(server, finding["links"]["finding"])
                del pending[name]
        time.sleep(0.5)
    assert not pending, f"not finished in time: {sorted(pending)}"
    request(server, "/v1/worklist?limit=500")


def test_no_sentinel_in_logs_metrics_answers_or_the_store(server: SimpleNamespace) -> None:
    """Runs last: searches everything the service said or kept outside its result objects."""
    request(server, "/metrics")
    places: dict[str, str] = {}
    for i, (path, headers, body) in enumerate(server.seen):
        places[f"answer {i} {path}"] = headers + body.decode("latin-1")
    time.sleep(1)  # let the last log lines reach the file
    places["server log"] = server.log.read_text(errors="replace")
    for path in server.home.rglob("*"):  # BentoML's home: its log files (if any) and the metrics files
        if path.is_file():
            places[str(path)] = path.read_bytes().decode("latin-1")
    for path in server.data.iterdir():  # the store (SQLite and its WAL); not results/ (SEG/SR) nor spool/
        if path.is_file():
            places[str(path)] = path.read_bytes().decode("latin-1")
    assert any("SQLite" in text[:16] for text in places.values()), "the store's file was not searched"
    assert "/metrics" in " ".join(places) and len(server.seen) > 30
    assert "C-STORE" in places["server log"] and "STRANGER" in places["server log"]  # it is the real log
    # Positive control: the sentinels did reach the service: its result objects for the PACS carry them.
    result_objects = [path.read_bytes() for path in (server.data / "results").rglob("SR.dcm")]
    assert result_objects and all(b"SNTLFAMILY^SNTLGIVEN" in data for data in result_objects)
    leaks = {where: sorted(set(FOUND.findall(text))) for where, text in places.items() if FOUND.search(text)}
    assert leaks == {}, leaks
