"""Admission control through a real server: beyond PTX_MAX_IN_FLIGHT films the edge answers 503 at once,
with Retry-After, and serves normally again when the flood stops."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from tests.servers import bento_server
from tests.test_app_triage import metrics_text, post, sample


def test_flood_beyond_capacity_gets_503_with_retry_after_and_recovers(tmp_path, realdata):
    data = (realdata / "chest/canon_dx_j2k_lossless_mono1_inverse.dcm").read_bytes()  # ~0.2 s to decode
    env = {"PTX_DATA_DIR": str(tmp_path / "data"), "PTX_MAX_IN_FLIGHT": "2", "PTX_RETRY_AFTER_S": "3"}
    with bento_server(tmp_path / "server.log", env=env) as base:
        with ThreadPoolExecutor(max_workers=12) as pool:
            started = time.monotonic()
            answers = list(pool.map(lambda _: (post(f"{base}/v1/triage?mask=none", data, "application/dicom"),
                                               time.monotonic() - started), range(12)))
        statuses = [status for (status, _, _), _ in answers]
        assert set(statuses) <= {200, 503}
        refused = [(body, headers, elapsed) for (status, body, headers), elapsed in answers if status == 503]
        assert refused and statuses.count(200) >= 2
        for body, headers, _ in refused:
            assert body["error"]["code"] == "overloaded" and "PTX_MAX_IN_FLIGHT" in body["error"]["message"]
            assert headers["retry-after"] == "3"
        # Refusals are immediate, not queued behind the admitted films.
        slowest_admitted = max(elapsed for (status, _, _), elapsed in answers if status == 200)
        assert min(elapsed for _, _, elapsed in refused) < slowest_admitted
        assert sample(metrics_text(base), "ptx_overloaded_total") == len(refused)
        status, _, _ = post(f"{base}/v1/triage?mask=none", data, "application/dicom")
        assert status == 200
