"""Open-ended load on `POST /v1/triage` with Locust: synthetic DICOMs from a folder, a realistic mix of asks.

    .venv/bin/python -m training synth --out data/bench/locust --count 100 --seed 5 --uncompressed
    BENCH_DICOM_DIR=data/bench/locust/dicom .venv/bin/locust -f load_tests/locustfile.py --headless \\
        --host http://127.0.0.1:3000 -u 16 -r 4 -t 3m --csv data/bench/locust-run --only-summary

Each simulated user posts one film after another (no think time), so `-u` is the number of requests in
flight. The mix, by weight: 16 `?mask=none` (a worklist only needs score and priority), 3 `?mask=png`
(a viewer overlay), 1 non-DICOM body that must be refused with 400 `not_dicom`. Requests are named by
kind, so Locust's table shows each kind's latency apart. A 200 with a score is a success; so is the
expected 400 for the invalid body; anything else is a failure, including a 503 (the service shedding load,
reported with its Retry-After) and a 200 that lacks a score.

`BENCH_DICOM_DIR` (required) is a folder of .dcm files (searched recursively); they are read into memory
once per Locust process. For a fixed-N comparison with a naive server and the models' limit, use
`python -m load_tests.bench_service` instead.
"""

from __future__ import annotations

import functools
import os
import random
from pathlib import Path

from locust import FastHttpUser, constant, task

DICOM_DIR_VARIABLE = "BENCH_DICOM_DIR"
HEADERS = {"Content-Type": "application/dicom"}


@functools.cache
def films() -> tuple[bytes, ...]:
    folder = os.environ.get(DICOM_DIR_VARIABLE)
    if not folder:
        raise RuntimeError(f"set {DICOM_DIR_VARIABLE} to a folder of .dcm files (python -m training synth ...)")
    payloads = tuple(path.read_bytes() for path in sorted(Path(folder).rglob("*.dcm")))
    if not payloads:
        raise RuntimeError(f"no .dcm files under {folder} ({DICOM_DIR_VARIABLE})")
    return payloads


class Radiologist(FastHttpUser):
    """A PACS router sending films for triage, one after another."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.films = films()

    def _triage(self, mask: str) -> None:
        with self.client.post(f"/v1/triage?mask={mask}", data=random.choice(self.films), headers=HEADERS,
                              name=f"triage mask={mask}", catch_response=True) as response:
            if response.status_code == 200:
                try:
                    body = response.json()
                except ValueError:
                    body = {}
                if isinstance(body, dict) and "score" in body:
                    response.success()
                else:
                    response.failure("200 without a score in the body")
            elif response.status_code == 503:
                response.failure(f"503 shed (Retry-After {response.headers.get('Retry-After')})")
            else:
                response.failure(f"{response.status_code}: {(response.text or '')[:200]}")

    @task(16)
    def triage_without_mask(self) -> None:
        self._triage("none")

    @task(3)
    def triage_with_png_mask(self) -> None:
        self._triage("png")

    @task(1)
    def refuse_non_dicom(self) -> None:
        with self.client.post("/v1/triage?mask=none", data=b"not a radiograph" * 64, headers=HEADERS,
                              name="triage invalid (expect 400)", catch_response=True) as response:
            code = None
            if response.status_code == 400:
                try:
                    code = response.json().get("error", {}).get("code")
                except (ValueError, AttributeError):
                    code = None
            if code == "not_dicom":
                response.success()
            else:
                response.failure(f"expected 400 not_dicom, got {response.status_code}: {(response.text or '')[:200]}")
