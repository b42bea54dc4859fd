"""SIGTERM to a real `bentoml serve` under load (issue 13 §10): every admitted request is answered, new ones
get 503 `shutting_down` with Retry-After while the edge drains, the findings of the admitted films are in
the store, and a request that never ends is cut at PTX_DRAIN_TIMEOUT_S, so the server still exits.

Admitted requests are held open by their own clients: each sends half its film, the test sends SIGTERM,
then the rest. Before the drain existed the model worker exited with the signal and such a film was
answered 503 `model_unavailable`, and a request after the signal got a connection reset. Later, with the
worker serving on, a film whose model call needed a new connection still got that 503: BentoML's supervisor
had deleted the worker's socket file at the signal (drain.supervisor_stops_workers_first); six films at once
need more connections than the edge holds.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.store import open_store
from tests.http.test_app_triage import metrics_text, sample
from tests.servers import bento_server

SIIM = "chest/siim_cr_jpegbaseline_mono2.dcm"
DRAIN_TIMEOUT_S = 8
HELD = 6  # admitted requests the test finishes after SIGTERM: more model calls at once than ever before it


def start_upload(port: int, data: bytes) -> http.client.HTTPConnection:
    """A POST /v1/triage that has sent half its body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.putrequest("POST", "/v1/triage?mask=none")
    connection.putheader("Content-Type", "application/dicom")
    connection.putheader("Content-Length", str(len(data)))
    connection.endheaders()
    connection.send(data[:len(data) // 2])
    return connection


def answer(connection: http.client.HTTPConnection) -> tuple[int, dict, str | None]:
    response = connection.getresponse()
    return response.status, json.loads(response.read()), response.getheader("Retry-After")


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for(condition, what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.1)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary folder with a short path: a Unix socket's path must stay under 108 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="ptx-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_sigterm_drains_admitted_requests_refuses_new_ones_and_stops_at_the_deadline(tmp_path, short_tmp, realdata):
    data = (realdata / SIIM).read_bytes()
    data_dir = tmp_path / "data"
    env = {"PTX_DATA_DIR": str(data_dir), "PTX_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S), "PTX_RETRY_AFTER_S": "4",
           "PTX_RECORD_HTTP": "true", "TMPDIR": str(short_tmp)}  # BentoML's sockets' folder goes there
    started: list = []
    log_path = tmp_path / "server.log"
    with bento_server(log_path, env=env, started=started) as base:
        server, port = started[0], int(base.rsplit(":", 1)[1])
        held = [start_upload(port, data) for _ in range(HELD)]
        stalled = start_upload(port, data)  # its client never sends the rest: the deadline ends it
        wait_for(lambda: sample(metrics_text(base), "ptx_in_flight") == HELD + 1, "the uploads admitted")

        signalled = time.monotonic()
        os.kill(server.pid, signal.SIGTERM)
        # While the admitted requests are open, a new one is refused with a reason and a time to come back.
        wait_for(lambda: get(f"{base}/readyz")[0] == 503, "/readyz answering 503 while draining")
        refused = urllib.request.Request(f"{base}/v1/triage", data=data, method="POST",
                                         headers={"Content-Type": "application/dicom"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(refused, timeout=10)
        assert caught.value.code == 503 and caught.value.headers["Retry-After"] == "4"
        assert json.loads(caught.value.read())["error"]["code"] == "shutting_down"
        assert get(f"{base}/livez")[0] == 200  # alive, only not taking work

        for connection in held:  # the admitted films complete after the signal, models included
            connection.send(data[len(data) // 2:])
        outcomes = [answer(connection) for connection in held]
        assert [status for status, _, _ in outcomes] == [200] * HELD, outcomes
        assert all(0 <= body["score"] <= 1 for _, body, _ in outcomes)

        server.wait(timeout=DRAIN_TIMEOUT_S + 30)  # the stalled request must not hold the server
        stopped_after = time.monotonic() - signalled
        status, body, retry_after = answer(stalled)
        assert (status, body["error"]["code"], retry_after) == (503, "shutting_down", "4")
    print(f"\nexit {server.returncode} {stopped_after:.1f} s after SIGTERM (drain timeout {DRAIN_TIMEOUT_S} s)")
    assert DRAIN_TIMEOUT_S - 1 < stopped_after < DRAIN_TIMEOUT_S + 20

    log = log_path.read_text()
    # The four uploads held admission slots; a /metrics poll may still have been finishing (a request too).
    assert re.search(rf"SIGTERM: draining [{HELD + 1}-9] request\(s\) and {HELD + 1} film\(s\)", log), log[-3000:]
    assert "drain deadline: 1 request(s) and 1 film(s)" in log
    assert "Traceback" not in log
    assert not list(short_tmp.glob("bentoml-uds-*")), "the supervisor left its sockets' folder behind"
    store = open_store(None, data_dir)  # the admitted films' findings were recorded before they were answered
    try:
        assert store.finding(outcomes[0][1]["sop_uid"]) is not None
    finally:
        store.close()
