"""The model worker's logic and the edge's CPU steps, in-process: the same answers as `Cascade.run`."""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import pytest

from service.cascade.finding import PriorityBands, build_finding
from service.cascade.flow import Flow
from service.cascade.preprocess import to_batch
from service.imaging.reader import read_radiograph
from service.models.backends.onnxruntime_cpu import OnnxRuntimeCPU
from service.models.manifest import ManifestError, load_manifest, write_manifest
from service.models.model_set import resolve
from service.models.runner import CLASSIFY_ROW, ModelRunner, pack, unpack
from service.settings import load_settings
from tests.servers import REPO
from training.evaluate import load_cascade


def ort_loader(entry, settings):
    return OnnxRuntimeCPU(entry.directory / entry.manifest.files["onnx"], intra_op_threads=1)


@pytest.fixture(scope="module")
def settings():
    return load_settings(environ={})


@pytest.fixture(scope="module")
def models(settings):
    return resolve(settings)


@pytest.fixture(scope="module")
def cascade(models):
    return load_cascade(models.classifier.directory, models.segmenter.directory, threads=1)[0]


def test_pack_round_trip_and_shape_check():
    maps = np.random.default_rng(0).random((3, 4, 4)).astype(np.float32)
    unpacked = unpack(pack(maps, 0.25), (4, 4))
    assert np.array_equal(unpacked.outputs, maps)
    assert unpacked.seconds.tolist() == [0.25] * 3 and unpacked.batch_sizes.tolist() == [3] * 3
    assert unpack(pack(np.array([0.1, 0.9]), 1.0), ()).outputs.tolist() == pytest.approx([0.1, 0.9])
    with pytest.raises(ValueError, match="expected"):
        unpack(pack(maps, 0.1), (4, 5))


def test_resolve_finds_the_bundled_pair(models):
    assert models.classifier.manifest.name == "ptx-classifier-demo"
    assert models.segmenter.manifest.task == "segmentation"
    assert 0 < models.gate <= models.operating_point < 1


def test_resolve_refuses_ambiguity_wrong_task_and_tampering(tmp_path, settings):
    root = tmp_path / "models"
    shutil.copytree(REPO / "models", root)
    second = root / "ptx-classifier-other" / "0.2.0"
    shutil.copytree(root / "ptx-classifier-demo" / "0.2.0", second)
    write_manifest(load_manifest(second).model_copy(update={"name": "ptx-classifier-other"}), second)
    custom = settings.model_copy(update={"models_dir": root})
    with pytest.raises(ManifestError, match="2 classification models.*PTX_CLASSIFIER"):
        resolve(custom)
    assert resolve(custom.model_copy(update={"classifier": "ptx-classifier-other"})).classifier.directory == second
    with pytest.raises(ManifestError, match="segmentation model"):
        resolve(custom.model_copy(update={"classifier": "ptx-segmenter-demo"}))
    with (second / "model.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ManifestError, match="model.onnx"):
        resolve(custom.model_copy(update={"classifier": "ptx-classifier-demo"}))


def test_runner_and_edge_give_the_cascade_answer(realdata, settings, models, cascade):
    runner = ModelRunner(models, settings, loader=ort_loader)
    flow = Flow.from_settings(settings, models, {"classifier": "x", "segmenter": "y"})
    paths = sorted((realdata / "chest").glob("*.dcm"))
    films = [read_radiograph(path, flow.policy) for path in paths]  # decoded as the flow does (reduced)
    expected = cascade.run(films)
    side = models.segmenter_spec.size
    inputs: list[np.ndarray] = []

    async def classify(batch: np.ndarray) -> np.ndarray:
        inputs.append(batch)
        return unpack(runner.classify(batch), CLASSIFY_ROW).outputs

    async def segment(batch: np.ndarray) -> np.ndarray:
        return unpack(runner.segment(batch), (side, side)).outputs

    findings = [asyncio.run(flow.run(path.read_bytes(), classify, segment)) for path in paths]
    batch = np.concatenate(inputs)
    scores = [finding.score for finding in findings]
    assert scores == pytest.approx([r.score for r in expected], abs=1e-5)
    assert np.allclose(batch, to_batch(films, models.classifier_spec))
    for path, finding, want in zip(paths, findings, expected):
        assert np.array_equal(finding.mask, want.mask)
        reference = build_finding(read_radiograph(path, flow.policy), want, models.operating_point, PriorityBands())
        assert finding.priority == reference.priority and finding.rle == reference.rle
        assert finding.models["classifier"] == {"name": "ptx-classifier-demo", "version": "0.2.0", "backend": "x"}
        assert {"decode", "preprocess", "postprocess"} <= set(finding.timings_ms)


def test_runner_refuses_wrong_input_size_and_warms_up(settings, models):
    runner = ModelRunner(models, settings, loader=ort_loader)
    with pytest.raises(ValueError, match="model input must be"):
        runner.classify(np.zeros((1, 1, 64, 64), np.float32))
    timings = runner.warmup((1, 2))
    assert set(timings) == {"classifier", "segmenter"} and all(t > 0 for t in timings.values())
