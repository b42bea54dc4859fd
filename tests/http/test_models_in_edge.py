"""`PTX_MODELS_IN_EDGE`: a real `bentoml serve` whose edge runs both models itself, with no model worker.

The same answers as the default two-process service gives (checked against the in-process cascade, as
tests/http/test_app_triage.py does for the default), concurrent films batched by the edge's own greedy
batcher (service/models/local_models.py), and one Python server process rather than two.
"""

from __future__ import annotations

import psutil
import pytest

from tests.http import test_app_triage as served
from tests.http.test_app_triage import concurrent_films_batched, sample
from tests.servers import bento_server


@pytest.fixture(scope="module")
def started(tmp_path_factory, realdata):
    data_dir = tmp_path_factory.mktemp("ptx-data")
    env = {"PTX_DATA_DIR": str(data_dir), "PTX_MAX_BATCH_SIZE": "8", "PTX_MODELS_IN_EDGE": "true",
           "PTX_MODEL_INSTANCES": "2", "PTX_INTRA_OP_THREADS": "1"}  # the small-CPU profile (docs/benchmarks.md)
    processes: list = []
    with bento_server(tmp_path_factory.mktemp("bento") / "server.log", env=env, started=processes) as base:
        yield base, processes[0]


@pytest.fixture(scope="module")
def server(started):
    return started[0]


def test_no_model_worker_process_is_started(started):
    _, process = started
    commands = [" ".join(child.cmdline()) for child in psutil.Process(process.pid).children(recursive=True)]
    assert any("--service-name ptx-triage" in command for command in commands), commands
    assert not any("--service-name ptx-models" in command for command in commands), commands


def test_real_chest_films_answered_as_the_in_process_cascade_would(server, realdata, in_process):
    """Scores, masks, RLE, boxes and timings as the default service answers them (the same checks)."""
    served.test_real_chest_films_answered_as_the_in_process_cascade_would(server, realdata, in_process)


def test_concurrent_films_are_batched_by_the_edge(server, realdata):
    _, after = concurrent_films_batched(server, realdata)
    assert sample(after, "ptx_queue_wait_seconds_count", model="classifier") >= 32
    assert "bentoml_service_adaptive_batch_size" not in after  # no BentoML batcher: there is no model worker
