"""POST /v1/triage through a real `bentoml serve` (edge + model worker): answers, errors, batching, metrics.

One server for the module (start-up ~10-20 s). Its answers are checked against the same cascade run
in-process, so the test proves the service runs the pipeline it claims, not just that it answers.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import io
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pydicom
import pytest
from PIL import Image

from load_tests.bench_reduced_decode import models_side
from service.cascade import rle
from service.http.schemas import BatchOut, ErrorOut, TriageOut
from service.imaging.acceptance import AcceptancePolicy
from service.imaging.reader import read_radiograph
from tests import realdata as registry
from tests.servers import bento_server

SIIM = "chest/siim_cr_jpegbaseline_mono2.dcm"


@pytest.fixture(scope="module")
def server(tmp_path_factory, realdata):
    data_dir = tmp_path_factory.mktemp("ptx-data")
    env = {"PTX_DATA_DIR": str(data_dir), "PTX_MAX_BATCH_SIZE": "8", "PTX_MAX_FILES_PER_REQUEST": "4"}
    with bento_server(tmp_path_factory.mktemp("bento") / "server.log", env=env) as base:
        yield base


def post(url: str, body: bytes, content_type: str) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read()), {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), {k.lower(): v for k, v in exc.headers.items()}


def multipart(files: list[tuple[str, bytes]], field: str = "file") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b""
    for name, data in files:
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n"
                 f"Content-Type: application/dicom\r\n\r\n").encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def metrics_text(base: str) -> str:
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as response:
        return response.read().decode()


def sample(text: str, metric: str, /, **labels: str) -> float:
    """The value of one Prometheus sample (summed over series matching `labels`)."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(metric + "{") and not line.startswith(metric + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"no sample {metric}{labels} in /metrics"
    return total


def test_real_chest_films_answered_as_the_in_process_cascade_would(server, realdata, in_process):
    side = models_side()  # the service decodes compressed films at its models' input size (issue 15)
    for entry in registry.CHEST:
        data = (realdata / entry.path).read_bytes()
        status, body, _ = post(f"{server}/v1/triage", data, "application/dicom")
        assert status == 200, (entry.path, body)
        TriageOut.model_validate(body)  # the documented schema is what is sent
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        assert (body["sop_uid"], body["study_uid"]) == (ds.SOPInstanceUID, ds.StudyInstanceUID)

        film = read_radiograph(data, dataclasses.replace(AcceptancePolicy(), decode_min_side=side))  # as served
        expected = in_process.run([film])[0]
        assert body["score"] == pytest.approx(expected.score, abs=1e-4), entry.path
        assert (body["label"] == "pneumothorax") == (body["score"] >= body["threshold"])
        assert (body["priority"] == "ROUTINE") == (body["label"] == "no_pneumothorax")

        png = np.array(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))), dtype=bool)
        assert png.shape == (ds.Rows, ds.Columns)
        assert np.array_equal(png, expected.mask), entry.path
        assert np.array_equal(rle.decode(body["rle"], ds.Rows, ds.Columns), png)
        assert sum(i["area_px"] for i in body["instances"]) == int(png.sum())
        for instance in body["instances"]:
            x, y, w, h = instance["bbox_px"]
            assert 0 <= x and 0 <= y and x + w <= ds.Columns and y + h <= ds.Rows
            if entry.spacing_mm is None:
                assert instance["bbox_mm"] is None and instance["area_mm2"] is None
            else:
                assert instance["bbox_mm"][2] == pytest.approx(w * entry.spacing_mm[1], abs=0.01)
                assert instance["area_mm2"] == pytest.approx(
                    instance["area_px"] * entry.spacing_mm[0] * entry.spacing_mm[1], abs=0.1)
        assert {"decode", "preprocess", "classify", "postprocess", "total"} <= set(body["timings_ms"])
        assert ("segment" in body["timings_ms"]) == expected.gated  # the gate reads the classifier alone
        assert body["models"]["classifier"]["name"] == "ptx-classifier-demo"
        assert body["models"]["segmenter"]["backend"] == "onnxruntime-cpu"


def test_other_and_corrupt_files_refused_with_their_code_and_the_service_stays_up(server, realdata):
    for entry in registry.OTHER + registry.CORRUPT:
        status, body, _ = post(f"{server}/v1/triage", (realdata / entry.path).read_bytes(), "application/dicom")
        ErrorOut.model_validate(body)
        assert body["error"]["code"] == entry.code, entry.path
        assert status == (413 if entry.code == "too_large" else 400 if entry.code == "not_dicom" else 422)
    status, body, _ = post(f"{server}/v1/triage", b"\x00" * 4096, "application/dicom")
    assert (status, body["error"]["code"]) == (400, "not_dicom")
    status, _, _ = post(f"{server}/v1/triage", (realdata / SIIM).read_bytes(), "application/dicom")
    assert status == 200


def test_request_errors_have_their_status_and_code(server, realdata):
    data = (realdata / SIIM).read_bytes()
    status, body, _ = post(f"{server}/v1/triage", data, "text/plain")
    assert (status, body["error"]["code"]) == (415, "unsupported_media_type")
    status, body, _ = post(f"{server}/v1/triage?mask=jpeg", data, "application/dicom")
    assert (status, body["error"]["code"]) == (400, "invalid_parameter") and "jpeg" in body["error"]["message"]
    body_bytes, content_type = multipart([("film.dcm", data)], field="image")
    status, body, _ = post(f"{server}/v1/triage", body_bytes, content_type)
    assert (status, body["error"]["code"]) == (400, "missing_file")

    # A client announcing a body over the limit is refused before it is read.
    host, port = urllib.parse.urlsplit(server).netloc.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/v1/triage")
    connection.putheader("Content-Type", "application/dicom")
    connection.putheader("Content-Length", str(10**12))
    connection.endheaders()
    connection.send(data[:1024])
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    assert (response.status, answer["error"]["code"]) == (413, "too_large")
    assert "PTX_MAX_FILE_BYTES" in answer["error"]["message"]


def test_mask_formats(server, realdata):
    data = (realdata / SIIM).read_bytes()
    _, as_png, _ = post(f"{server}/v1/triage?mask=png", data, "application/dicom")
    _, as_rle, _ = post(f"{server}/v1/triage?mask=rle", data, "application/dicom")
    _, bare, _ = post(f"{server}/v1/triage?mask=none", data, "application/dicom")
    assert "mask_png" in as_png and "rle" in as_png
    assert "mask_png" not in as_rle and as_rle["rle"] == as_png["rle"]
    assert "mask_png" not in bare and "rle" not in bare
    assert bare["score"] == as_png["score"] and bare["instances"] == as_png["instances"]


def test_batch_form_answers_each_file_in_order(server, realdata):
    chest = (realdata / SIIM).read_bytes()
    ct = (realdata / "other/CT_small.dcm").read_bytes()
    canon = (realdata / "chest/canon_dx_j2k_lossless_mono1_inverse.dcm").read_bytes()
    body, content_type = multipart([("a.dcm", chest), ("b.dcm", ct), ("c.dcm", canon)])
    status, answer, _ = post(f"{server}/v1/triage/batch?mask=none", body, content_type)
    assert status == 200
    BatchOut.model_validate(answer)
    first, second, third = answer["results"]
    assert [r["filename"] for r in answer["results"]] == ["a.dcm", "b.dcm", "c.dcm"]
    _, single, _ = post(f"{server}/v1/triage?mask=none", chest, "application/dicom")
    assert first["score"] == pytest.approx(single["score"], abs=1e-6) and first["sop_uid"] == single["sop_uid"]
    assert second["error"]["code"] == "not_radiograph" and "score" not in second
    assert third["sop_uid"] == pydicom.dcmread(io.BytesIO(canon), stop_before_pixels=True).SOPInstanceUID

    body, content_type = multipart([(f"{i}.dcm", chest) for i in range(5)])  # PTX_MAX_FILES_PER_REQUEST=4
    status, answer, _ = post(f"{server}/v1/triage/batch", body, content_type)
    assert (status, answer["error"]["code"]) == (400, "invalid_multipart")
    status, answer, _ = post(f"{server}/v1/triage/batch", chest, "application/dicom")
    assert (status, answer["error"]["code"]) == (415, "unsupported_media_type")


def concurrent_films_batched(server: str, realdata, requests: int = 32) -> tuple[str, str]:
    """Post one real film `requests` times, 16 at once; check every answer is the same 200 and that the classifier
    ran them all in fewer batches than films (ptx_batch_size in /metrics). The /metrics text before and after."""
    before = metrics_text(server)
    films_before = sample(before, "ptx_batch_size_sum", model="classifier")
    batches_before = sample(before, "ptx_batch_size_count", model="classifier")
    data = (realdata / SIIM).read_bytes()
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda _: post(f"{server}/v1/triage?mask=none", data, "application/dicom"),
                                range(requests)))
    assert [status for status, _, _ in answers] == [200] * requests
    assert len({body["score"] for _, body, _ in answers}) == 1  # batching does not change a film's answer
    after = metrics_text(server)
    films = sample(after, "ptx_batch_size_sum", model="classifier") - films_before
    batches = sample(after, "ptx_batch_size_count", model="classifier") - batches_before
    assert films == requests
    assert batches < requests, f"{requests} concurrent films ran in {batches} batches: no batching"
    return before, after


def test_concurrent_requests_are_merged_into_batches(server, realdata):
    """The done-when test: concurrent requests reach the models in batches larger than 1 (seen in /metrics)."""
    before, after = concurrent_films_batched(server, realdata)
    batches = (sample(after, "ptx_batch_size_count", model="classifier")
               - sample(before, "ptx_batch_size_count", model="classifier"))
    single_batches = (sample(after, "ptx_batch_size_bucket", model="classifier", le="1.0")
                      - sample(before, "ptx_batch_size_bucket", model="classifier", le="1.0"))
    assert batches - single_batches >= 1  # at least one batch of 2 or more films
    # BentoML's own adaptive-batching histogram agrees that batches above 1 happened.
    assert re.search(r'bentoml_service_adaptive_batch_size_bucket\{[^}]*le="1.0"[^}]*method_name="classify"', after)


def test_metrics_cover_stages_models_and_rejections_without_identifiers(server, realdata):
    post(f"{server}/v1/triage", (realdata / "other/CT_small.dcm").read_bytes(), "application/dicom")
    status, body, _ = post(f"{server}/v1/triage", (realdata / SIIM).read_bytes(), "application/dicom")
    assert status == 200
    text = metrics_text(server)
    for stage in ("decode", "preprocess", "classify", "postprocess", "total"):
        assert sample(text, "ptx_stage_seconds_count", stage=stage) >= 1
    assert sample(text, "ptx_rejections_total", code="not_radiograph") >= 1
    assert sample(text, "ptx_triage_score_count") >= 1
    assert sample(text, "ptx_queue_wait_seconds_count", model="classifier") >= 1
    assert sample(text, "ptx_model_info", role="classifier", name="ptx-classifier-demo",
                  backend="onnxruntime-cpu", provider="cpu") == 1
    assert sample(text, "ptx_findings_total", label="positive" if body["label"] == "pneumothorax" else "negative") >= 1
    for uid in (body["sop_uid"], body["study_uid"], body["series_uid"]):
        assert uid not in text


def test_openapi_page_documents_the_api(server):
    with urllib.request.urlopen(f"{server}/docs.json", timeout=30) as response:
        spec = json.loads(response.read())
    operation = spec["paths"]["/v1/triage"]["post"]
    assert "application/dicom" in operation["requestBody"]["content"]
    assert {"200", "400", "413", "415", "422", "503"} <= set(operation["responses"])
    assert {p["name"] for p in operation["parameters"]} == {"mask", "record"}
    assert "multipart/form-data" in spec["paths"]["/v1/triage/batch"]["post"]["requestBody"]["content"]


def test_health_endpoints(server):
    for path in ("/healthz", "/readyz", "/livez"):
        with urllib.request.urlopen(f"{server}{path}", timeout=30) as response:
            assert response.status == 200, path


def test_after_a_saturating_burst_a_lone_film_is_not_held_back(server, realdata):
    """Greedy batching (service/batching.py): BentoML's own policy learns to hold batches back for company
    after a burst and keeps idling the model for a lone film (measured: 49 → 138 ms per film)."""
    data = (realdata / SIIM).read_bytes()
    url = f"{server}/v1/triage?mask=none"

    def lone_films(count: int) -> tuple[float, float]:
        """Median latency (s) and mean classifier queue wait (s) of `count` films sent one after another."""
        text = metrics_text(server)
        waits = sample(text, "ptx_queue_wait_seconds_sum", model="classifier")
        calls = sample(text, "ptx_queue_wait_seconds_count", model="classifier")
        times = []
        for _ in range(count):
            started = time.perf_counter()
            assert post(url, data, "application/dicom")[0] == 200
            times.append(time.perf_counter() - started)
        text = metrics_text(server)
        waited = sample(text, "ptx_queue_wait_seconds_sum", model="classifier") - waits
        return float(np.median(times)), waited / (sample(text, "ptx_queue_wait_seconds_count", model="classifier")
                                                  - calls)

    assert post(url, data, "application/dicom")[0] == 200  # the queue-wait series exists from here on
    before, _ = lone_films(8)
    stop = time.monotonic() + 6
    with ThreadPoolExecutor(max_workers=24) as pool:
        list(pool.map(lambda _: [post(url, data, "application/dicom") for _ in iter(lambda: time.monotonic() < stop,
                                                                                   False)], range(24)))
    after, queue_wait = lone_films(8)
    # Nothing else is queued: the film's wait is the trip to the model worker and back (~5 ms idle, up to ~30 on a
    # shared 2-core runner), not a batch held back for company (~90 ms with BentoML's own policy).
    assert queue_wait < 0.050, f"lone films waited {queue_wait * 1e3:.0f} ms for an idle model after the burst"
    assert after < 1.5 * before + 0.020, f"lone film {before * 1e3:.0f} ms before the burst, {after * 1e3:.0f} after"
