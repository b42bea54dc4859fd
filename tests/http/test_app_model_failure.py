"""A model that fails at run time, and a model whose files do not match their manifest, through a real server.

The failing model is real: the bundled demo classifier with a few ONNX nodes added that make ONNX Runtime
raise ("indices element out of data bounds") on any input brighter than the warm-up's zeros, i.e. on every
real film. So the start-up, the warm-up and the recovery probe succeed, and a real film reaches a real
runtime error. The service must answer 503 `model_unavailable` (no result rather than a wrong one), turn
/readyz unready, and come back by itself after the cool-down when the probe passes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from service.models.manifest import sha256_file
from tests.http.test_app_triage import metrics_text, post, sample
from tests.servers import REPO, bento_server, free_port

COOLDOWN_S = 4
MODELS = REPO / "models"


def _copy_models(root: Path) -> tuple[Path, Path]:
    """The bundled models copied under `root`; returns the classifier's and the segmenter's folders."""
    shutil.copytree(MODELS, root, ignore=shutil.ignore_patterns("*.md"))
    (classifier,) = root.glob("ptx-classifier-*/*")
    (segmenter,) = root.glob("ptx-segmenter-*/*")
    return classifier, segmenter


def _rehash(directory: Path, filename: str) -> None:
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["sha256"][filename] = sha256_file(directory / filename)
    manifest_path.write_text(json.dumps(manifest, indent=2))


def _fail_on_bright_input(path: Path) -> None:
    """Rewrite the classifier so its output depends on an out-of-bounds Gather for inputs with max > 1."""
    model = onnx.load(str(path))
    graph = model.graph
    output = graph.output[0]  # the logit (the classifier's second output, features, feeds the OOD distance)
    for node in graph.node:
        node.output[:] = ["logit_raw" if name == output.name else name for name in node.output]
    graph.initializer.extend([
        helper.make_tensor("fault_limit", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("fault_index", TensorProto.INT64, [], [7]),
        helper.make_tensor("fault_table", TensorProto.FLOAT, [2], [0.0, 0.0]),
    ])
    graph.node.extend([
        helper.make_node("ReduceMax", [graph.input[0].name], ["fault_max"], keepdims=0),
        helper.make_node("Greater", ["fault_max", "fault_limit"], ["fault_bright"]),
        helper.make_node("Cast", ["fault_bright"], ["fault_flag"], to=TensorProto.INT64),
        helper.make_node("Mul", ["fault_flag", "fault_index"], ["fault_at"]),
        helper.make_node("Gather", ["fault_table", "fault_at"], ["fault_zero"]),
        helper.make_node("Add", ["logit_raw", "fault_zero"], [output.name]),
    ])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _readyz(base: str) -> int:
    try:
        with urllib.request.urlopen(f"{base}/readyz", timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _ready_gauge(base: str, role: str) -> float:
    return sample(metrics_text(base), "ptx_model_ready", role=role)


@pytest.mark.parametrize("where", ["worker", "edge"])
def test_a_model_failing_at_run_time_turns_the_service_unready_and_recovers(tmp_path, realdata, where):
    """The same with the models in the model worker (default) and in the edge (PTX_MODELS_IN_EDGE)."""
    classifier, _ = _copy_models(tmp_path / "models")
    _fail_on_bright_input(classifier / "model.onnx")
    _rehash(classifier, "model.onnx")
    film = (realdata / "chest/siim_cr_jpegbaseline_mono2.dcm").read_bytes()
    env = {"PTX_DATA_DIR": str(tmp_path / "data"), "PTX_MODELS_DIR": str(tmp_path / "models"),
           "PTX_BACKEND": "onnxruntime", "PTX_MODEL_COOLDOWN_S": str(COOLDOWN_S), "PTX_RETRY_AFTER_S": "5",
           **({"PTX_MODELS_IN_EDGE": "true"} if where == "edge" else {})}
    log_path = tmp_path / "server.log"
    with bento_server(log_path, env=env) as base:
        assert _readyz(base) == 200 and _ready_gauge(base, "classifier") == 1

        failed_at = time.monotonic()
        status, body, headers = post(f"{base}/v1/triage?mask=none", film, "application/dicom")
        assert status == 503, body
        assert body["error"]["code"] == "model_unavailable" and "score" not in body
        assert headers["retry-after"] == "5"
        # Out of service during the cool-down: unready, and the next film is refused without a result.
        assert _readyz(base) == 503
        assert _ready_gauge(base, "classifier") == 0
        status, body, _ = post(f"{base}/v1/triage?mask=none", film, "application/dicom")
        assert status == 503 and body["error"]["code"] == "model_unavailable"
        assert time.monotonic() - failed_at < COOLDOWN_S, "the checks above must run inside the cool-down"

        # After the cool-down the probe (warm-up input, output as at start) passes: ready again.
        deadline = time.monotonic() + COOLDOWN_S + 30
        while _readyz(base) != 200:
            assert time.monotonic() < deadline, "the service did not come back after the cool-down"
            time.sleep(0.5)
        assert time.monotonic() - failed_at >= COOLDOWN_S
        assert _ready_gauge(base, "classifier") == 1
    log = log_path.read_text(errors="replace")
    assert "classifier taken out of service after a failed run" in log
    assert "classifier passed its probe; back in service" in log


@pytest.mark.parametrize("target", ["model.onnx", "manifest.json"])
def test_start_up_refuses_a_model_whose_files_do_not_match_the_manifest(tmp_path, target):
    """`bentoml serve` exits at once with one line naming the file and both digests."""
    _, segmenter = _copy_models(tmp_path / "models")
    if target == "model.onnx":
        data = bytearray((segmenter / "model.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights
        (segmenter / "model.onnx").write_bytes(bytes(data))
    else:  # the manifest claims another digest for an untouched file
        manifest = json.loads((segmenter / "manifest.json").read_text())
        manifest["sha256"]["model.onnx"] = "0" * 64
        (segmenter / "manifest.json").write_text(json.dumps(manifest))
    env = {"PTX_DATA_DIR": str(tmp_path / "data"), "PTX_MODELS_DIR": str(tmp_path / "models"),
           "BENTOML_HOME": str(tmp_path / "bentoml-home")}
    command = [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(free_port())]
    # The command itself stops (BentoML would respawn a failing worker forever): the check runs at import.
    result = subprocess.run(command, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True,
                            timeout=90)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-2000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("ptx-triage cannot start: ") and "Traceback" not in output, output[-2000:]
    assert f"{segmenter / 'model.onnx'}: sha256 is" in last and "manifest says" in last
