"""Issue #5's done-when, end to end with a real Orthanc and the real service (`bentoml serve`):

films are uploaded to Orthanc, Orthanc sends them to our DICOM listener (its REST API, C-STORE), our
worklist fills in priority order, and the SEG and SR come back into Orthanc (C-STORE delivery), where
QIDO-RS finds them; the SEG read back with highdicom gives the same mask as the JSON API. The results
store runs on PostgreSQL here (a real server from Debian's packages); the crash test runs on SQLite.
"""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.request
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image

from service.cascade.finding import Priority
from tests import realdata as registry
from tests.http.test_app_triage import post
from tests.orthanc import orthanc_server
from tests.servers import bento_server, free_port
from training.__main__ import main as training_main


def get(base: str, path: str) -> dict:
    with urllib.request.urlopen(f"{base}{path}", timeout=30) as response:
        return json.loads(response.read())


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture(scope="module")
def films(tmp_path_factory, realdata) -> list[Path]:
    """The real chest films (one of the two SIIM copies: they share a SOP Instance UID) and synthetic ones."""
    synth = tmp_path_factory.mktemp("synth")
    assert training_main(["synth", "--out", str(synth), "--count", "6", "--seed", "77", "--prevalence", "0.5",
                          "--size", "512", "--uncompressed", "--quiet"]) == 0
    real = [realdata / entry.path for entry in registry.CHEST if "flagged" not in entry.path]
    return real + sorted((synth / "dicom").glob("*.dcm"))


def test_orthanc_sends_films_worklist_fills_and_seg_sr_come_back(tmp_path, films, postgres_server):
    listener_port = free_port()
    with orthanc_server(tmp_path / "orthanc", {"ptx": ("PTXTRIAGE", "127.0.0.1", listener_port)}) as pacs:
        env = {"PTX_DATA_DIR": str(tmp_path / "data"), "PTX_DATABASE_URL": postgres_server.create_database(),
               "PTX_DICOM_PORT": str(listener_port), "PTX_DICOM_HOST": "127.0.0.1",
               "PTX_DICOM_ALLOWED_AES": pacs.aet,
               "PTX_DESTINATIONS": f"orthanc=dicom://{pacs.aet}@127.0.0.1:{pacs.dicom_port}"}
        with bento_server(tmp_path / "service.log", env=env) as base:
            expected = {}
            for path in films:
                data = path.read_bytes()
                ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
                status, answer, _ = post(f"{base}/v1/triage?mask=png", data, "application/dicom")
                assert status == 200, (path.name, answer)
                expected[ds.SOPInstanceUID] = answer
                uploaded = pacs.post("/instances", data, "application/dicom")
                assert uploaded["Status"] in ("Success", "AlreadyStored")
            ids = pacs.get("/instances")
            pacs.post("/modalities/ptx/store", {"Resources": ids, "Synchronous": True})

            studies = {answer["study_uid"] for answer in expected.values()}
            def triaged() -> list[dict] | None:
                items = get(base, "/v1/worklist?limit=100")["items"]
                done = [i for i in items if i["status"] == "triaged"]
                return items if len(done) == len(studies) == len(items) else None

            items = wait_for(triaged, 180, "every study triaged on the worklist")
            assert {i["study_uid"] for i in items} == studies
            ranks = [Priority(i["priority"]).rank for i in items]
            assert ranks == sorted(ranks)  # priority first (arrival within a priority is the store's test)
            for item in items:
                best = min((a for a in expected.values() if a["study_uid"] == item["study_uid"]),
                           key=lambda a: Priority(a["priority"]).rank)
                assert item["priority"] == best["priority"]

            positives = {sop: a for sop, a in expected.items() if a["label"] == "pneumothorax" and a["instances"]}
            assert positives, "no positive film among the test films: the SEG path would not be exercised"

            def results_in_orthanc() -> dict[str, list[str]] | None:
                found: dict[str, list[str]] = {}
                for study in studies:
                    series = pacs.get(f"/dicom-web/studies/{study}/series")
                    found[study] = [s["00080060"]["Value"][0] for s in series]
                complete = all("SR" in modalities for modalities in found.values()) and all(
                    "SEG" in found[a["study_uid"]] for a in positives.values())
                return found if complete else None

            wait_for(results_in_orthanc, 120, "SEG and SR objects back in Orthanc")

            for sop, answer in positives.items():
                study = get(base, f"/v1/studies/{answer['study_uid']}")
                finding = next(f for f in study["findings"] if f["sop_uid"] == sop)
                assert "seg" in finding["links"] and "sr" in finding["links"]
                assert all(d["state"] == "delivered" for d in study["deliveries"])
                seg_uid = pydicom.dcmread(io.BytesIO(urllib.request.urlopen(
                    f"{base}{finding['links']['seg']}", timeout=30).read())).SOPInstanceUID
                match = pacs.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": seg_uid}})
                assert len(match) == 1, "the SEG is not in Orthanc"
                seg = hd.seg.segread(io.BytesIO(pacs.get_bytes(f"/instances/{match[0]}/file")))
                mask = seg.get_pixels_by_source_instance([sop], segment_numbers=[1])[0, ..., 0].astype(bool)
                api_mask = np.array(Image.open(io.BytesIO(base64.b64decode(answer["mask_png"]))), dtype=bool)
                assert np.array_equal(mask, api_mask), sop

            def gauges() -> str | None:  # gauges are refreshed every 5 s: wait for a reading after the work
                text = urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode()
                return text if 'ptx_deliveries{state="pending"} 0.0' in text and "ptx_spool_depth 0.0" in text \
                    else None

            text = wait_for(gauges, 30, "the spool and delivery gauges to settle at 0")
            assert f"ptx_time_to_notification_seconds_count {len(expected)}.0" in text
            assert 'ptx_delivery_attempts_total{destination="orthanc",outcome="ok"}' in text
            assert 'ptx_deliveries{state="failed"} 0.0' in text
