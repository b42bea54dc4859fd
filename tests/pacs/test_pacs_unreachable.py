"""Results bound for PACSes that are down never hold up intake, through the real service.

Two destinations: one refuses connections (nothing listens), one is a black hole (the kernel completes the
TCP handshake from the listen backlog, nobody ever answers, so each association waits out its timeout).
A burst of C-STOREs must still be triaged promptly, every study reaching the worklist, while the deliveries
stay pending/failed with their attempts and reasons recorded and counted in the metrics.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

from tests.http.test_app_triage import metrics_text, sample
from tests.pacs.test_pacs_crash import _exists, burst, copies, get
from tests.servers import bento_server, free_port
from training.__main__ import main as training_main

FILMS = 12


def test_unreachable_destinations_never_block_intake(tmp_path):
    synth = tmp_path / "synth"
    assert training_main(["synth", "--out", str(synth), "--count", "1", "--seed", "5", "--size", "512",
                          "--uncompressed", "--quiet"]) == 0
    datasets = copies(next((synth / "dicom").glob("*.dcm")).read_bytes(), FILMS)
    refused_port = free_port()  # nothing listens there
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(64)  # never accepted, never answered
    port = free_port()
    env = {"PTX_DATA_DIR": str(tmp_path / "data"), "PTX_DICOM_PORT": str(port), "PTX_DICOM_HOST": "127.0.0.1",
           "PTX_DESTINATIONS": f"down=dicom://DOWN@127.0.0.1:{refused_port},"
                               f"hole=dicom://HOLE@127.0.0.1:{black_hole.getsockname()[1]}",
           "PTX_DELIVERY_BACKOFF_S": "1", "PTX_DELIVERY_MAX_ATTEMPTS": "1"}
    try:
        with bento_server(tmp_path / "server.log", env=env) as base:
            deadline = time.monotonic() + 60
            acknowledged: list[str] = []
            while not acknowledged:  # the listener starts once the models are ready
                assert time.monotonic() < deadline, "the DICOM listener never accepted the burst"
                burst(port, datasets, acknowledged, threading.Event())
                if not acknowledged:
                    time.sleep(0.5)
            assert len(acknowledged) == FILMS
            sent_at = time.monotonic()

            studies = {ds.StudyInstanceUID for ds in datasets}
            while True:
                done = {uid for uid in studies if _exists(base, uid) and get(base, f"/v1/studies/{uid}")["status"]
                        == "triaged"}
                if done == studies:
                    break
                assert time.monotonic() - sent_at < 60, f"{len(studies - done)} of {FILMS} studies not triaged"
                time.sleep(0.5)
            triaged_in = time.monotonic() - sent_at
            # Intake finished while the black hole still held the dispatcher (its association timeout is 30 s).
            assert triaged_in < 30, f"intake took {triaged_in:.1f} s: it waited for the deliveries"

            deliveries = [d for uid in studies for d in get(base, f"/v1/studies/{uid}")["deliveries"]]
            assert deliveries and {d["destination"] for d in deliveries} == {"down", "hole"}
            assert all(d["state"] in ("pending", "failed") and d["delivered_at"] is None for d in deliveries)
            down = [d for d in deliveries if d["destination"] == "down" and d["attempts"] > 0]
            assert down and all("refused" in d["last_error"] or "connect" in d["last_error"] for d in down), down[:2]
            assert sample(metrics_text(base), "ptx_delivery_attempts_total", destination="down",
                          outcome="failed") >= 1
            listed = {item["study_uid"] for item in get(base, "/v1/worklist?limit=100")["items"]}
            assert studies <= listed

            # An operator retries a delivery that failed (its 1 attempt at the refused destination): it is pending
            # again with a fresh budget, and the dispatcher takes it up by itself (within its 5 s poll).
            def failed_down() -> list[dict]:
                return [d for uid in studies for d in get(base, f"/v1/studies/{uid}")["deliveries"]
                        if d["destination"] == "down" and d["state"] == "failed"]

            deadline = time.monotonic() + 60
            while not failed_down():
                assert time.monotonic() < deadline, "no delivery to the refused destination failed in 60 s"
                time.sleep(0.5)
            chosen = failed_down()[0]
            assert chosen["attempts"] == 1
            request = urllib.request.Request(f"{base}/v1/deliveries/{chosen['id']}/retry", method="POST")
            with urllib.request.urlopen(request, timeout=30) as response:
                retried = json.loads(response.read())
            assert (retried["id"], retried["state"], retried["attempts"]) == (chosen["id"], "pending", 0)

            def attempts_now() -> int:
                study = next(uid for uid in studies if any(d["id"] == chosen["id"] for d in
                                                            get(base, f"/v1/studies/{uid}")["deliveries"]))
                return next(d["attempts"] for d in get(base, f"/v1/studies/{study}")["deliveries"]
                            if d["id"] == chosen["id"])

            deadline = time.monotonic() + 60
            while attempts_now() == 0:
                assert time.monotonic() < deadline, "the retried delivery was not attempted again within 60 s"
                time.sleep(0.5)
    finally:
        black_hole.close()
