"""Films triaged over HTTP and put on the worklist (PTX_RECORD_HTTP) are pushed to the RIS as C-STORE'd films
are (issue 14 §5's gap): a real `bentoml serve`, a real MLLP receiver (hl7apy). Before, only the PACS side
had a notifier, so an HTTP film reached the worklist and no reader was told."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pydicom

from tests.http.test_app_triage import metrics_text, sample
from tests.pacs.test_notifications import Ris, until
from tests.servers import bento_server

PHILIPS = "chest/philips_cr_j2k_lossy_mono1.dcm"  # a real film with an Accession Number ("exam Number")


def post(base: str, data: bytes) -> int:
    request = urllib.request.Request(f"{base}/v1/triage?mask=none", data=data, method="POST",
                                     headers={"Content-Type": "application/dicom"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.status


def test_a_film_recorded_over_http_is_pushed_to_the_ris_once(tmp_path: Path, realdata: Path) -> None:
    data = (realdata / PHILIPS).read_bytes()
    header = pydicom.dcmread(realdata / PHILIPS, stop_before_pixels=True)
    with Ris() as ris, bento_server(tmp_path / "server.log", env={
            "PTX_DATA_DIR": str(tmp_path / "data"), "PTX_RECORD_HTTP": "true",
            "PTX_NOTIFY_PRIORITIES": "STAT,URGENT,ROUTINE", "PTX_NOTIFY_HL7": str(ris.address)}) as base:
        assert post(base, data) == 200
        until(lambda: ris.received, "the ORU^R01 at the RIS", 60)
        assert post(base, data) == 200  # the same film again: on the worklist once, pushed once
        until(lambda: sample(metrics_text(base), "ptx_notifications_total", channel="hl7", outcome="ok") == 1,
              "the attempt counted", 30)
        with urllib.request.urlopen(f"{base}/v1/studies/{header.StudyInstanceUID}", timeout=30) as response:
            queued = json.loads(response.read())["notifications"]
        assert [(n["channel"], n["state"]) for n in queued] == [("hl7", "sent")], "one row: the repeat queued none"
    (message,) = ris.received
    assert f"|110180^Study Instance UID^DCM||{header.StudyInstanceUID}|" in message
    assert f"|{header.AccessionNumber}" in message, "the Accession Number from the film's own header"
    assert "\rPID|" not in message, "no patient identifiers unless PTX_NOTIFY_HL7_PATIENT_IDS"
