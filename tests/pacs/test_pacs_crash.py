"""Issue #5's crash test through the real service: SIGKILL in the middle of a burst of C-STOREs, restart,
and every instance that got a success status has its worklist entry (SQLite store, the default)."""

from __future__ import annotations

import io
import json
import threading
import time
import urllib.error
import urllib.request

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from tests.servers import bento_server, free_port, kill_tree
from training.__main__ import main as training_main

BURST = 60


def get(base: str, path: str) -> dict:
    with urllib.request.urlopen(f"{base}{path}", timeout=30) as response:
        return json.loads(response.read())


def copies(template: bytes, count: int) -> list[pydicom.Dataset]:
    """Distinct instances (each its own study) of one synthetic film."""
    out = []
    for _ in range(count):
        ds = pydicom.dcmread(io.BytesIO(template))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out.append(ds)
    return out


def burst(port: int, datasets: list[pydicom.Dataset], acknowledged: list[str], stop: threading.Event) -> None:
    """Send until done or the peer dies; keep the UIDs answered with 0x0000."""
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(datasets[0].SOPClassUID, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    association = ae.associate("127.0.0.1", port, ae_title="PTXTRIAGE")
    if not association.is_established:
        return
    try:
        for ds in datasets:
            if stop.is_set() or not association.is_established:
                break
            status = association.send_c_store(ds)
            if status and status.Status == 0x0000:
                acknowledged.append(ds.SOPInstanceUID)
    finally:
        if association.is_established:
            association.release()


def test_sigkill_mid_burst_loses_no_acknowledged_instance(tmp_path):
    synth = tmp_path / "synth"
    assert training_main(["synth", "--out", str(synth), "--count", "1", "--seed", "5", "--size", "512",
                          "--uncompressed", "--quiet"]) == 0
    template = next((synth / "dicom").glob("*.dcm")).read_bytes()
    datasets = copies(template, BURST)
    port = free_port()
    env = {"PTX_DATA_DIR": str(tmp_path / "data"), "PTX_DICOM_PORT": str(port), "PTX_DICOM_HOST": "127.0.0.1"}
    acknowledged: list[str] = []
    stop = threading.Event()

    started: list = []
    with bento_server(tmp_path / "first.log", env=env, started=started) as base:
        wait_listening = time.monotonic() + 60
        while "ptx_model_info" not in urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode():
            assert time.monotonic() < wait_listening
            time.sleep(0.5)
        time.sleep(1.0)  # the listener starts once the models are ready
        sender = threading.Thread(target=burst, args=(port, datasets, acknowledged, stop))
        sender.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < BURST // 3:
            assert time.monotonic() < deadline, f"only {len(acknowledged)} C-STOREs acknowledged"
            time.sleep(0.02)
        kill_tree(started[0])  # the whole service: arbiter, edge worker (listener, intake), model worker
        stop.set()
        sender.join(timeout=30)
    acked = list(acknowledged)
    assert BURST // 3 <= len(acked) < BURST, "the kill came too late to interrupt the burst"

    with bento_server(tmp_path / "second.log", env=env) as base:
        by_sop = {ds.SOPInstanceUID: ds.StudyInstanceUID for ds in datasets}

        def all_done() -> bool:
            for sop in acked:
                study = get(base, f"/v1/studies/{by_sop[sop]}") if _exists(base, by_sop[sop]) else None
                if study is None or study["status"] != "triaged":
                    return False
                if not any(i["sop_uid"] == sop and i["status"] == "done" for i in study["instances"]):
                    return False
            return True

        deadline = time.monotonic() + 120
        while not all_done():
            assert time.monotonic() < deadline, "acknowledged instances missing from the worklist after restart"
            time.sleep(1.0)
        worklist = get(base, "/v1/worklist?limit=500")["items"]
        listed = {item["study_uid"] for item in worklist}
        assert {by_sop[sop] for sop in acked} <= listed


def _exists(base: str, study_uid: str) -> bool:
    try:
        urllib.request.urlopen(f"{base}/v1/studies/{study_uid}", timeout=30).close()
        return True
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return False
        raise
