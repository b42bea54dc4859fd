"""Export to the model repository: ONNX checked against PyTorch, FP16 and INT8 variants, hashes, manifest;
TensorRT stubs."""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import training.export as export_module
from service.models.input_spec import InputSpec
from service.models.manifest import load_manifest, sha256_file
from service.models.networks import Classifier, UNet
from service.models.ood import OodModel
from training.export import ExportCheckError, export_model, export_onnx
from training.ood import OodFilms
from training.quantize import QuantizationCheckError, fingerprint, quantize_model_dir
from training.tensorrt import (
    NOT_INSTALLED,
    TensorRTUnavailable,
    build_engine,
    engine_cache_dir,
    is_available,
    ort_tensorrt_provider_options,
)

torch.set_num_threads(1)
SIZE = 64
SPEC = InputSpec(SIZE)
TRAINING = {"command": "python -m training train tiny.yaml", "config": {"width": 8}, "seed": 0,
            "data_fingerprint": "sha256:feed"}
CLASSIFICATION = {"gate": 0.1, "operating_point": 0.5}
SEGMENTATION = {"triplet": {"top_score": 0.75, "min_area": 2000, "bottom_score": 0.3},
                "min_area_reference_size": 1024}


def tiny(task: str) -> Classifier | UNet:
    torch.manual_seed(0)
    model = Classifier(18, width=8) if task == "classification" else UNet(18, width=8)
    with torch.no_grad():  # non-trivial BN statistics so eval mode differs visibly from train mode
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model


def export(task: str, out: Path, **changes):
    arguments = dict(
        name=f"tiny-{task}", version="0.1", task=task, input_spec=SPEC,
        thresholds=CLASSIFICATION if task == "classification" else SEGMENTATION,
        training_info=TRAINING, metrics={"val": {"score": 0.5}}, intended_use="Test model; not for clinical use.",
        created="2025-06-01",
    )
    arguments.update(changes)
    model = arguments.pop("model", None) or tiny(task)
    return model, export_model(model, out, **arguments)


@pytest.fixture(scope="module", params=["classification", "segmentation"])
def exported(request, tmp_path_factory):
    task = request.param
    out = tmp_path_factory.mktemp("models") / f"tiny-{task}" / "0.1"
    real = np.random.default_rng(1).uniform(-2, 2, (4, 1, SIZE, SIZE)).astype(np.float32)
    model, manifest = export(task, out, real_inputs=real)
    return task, model, manifest, out, real


@pytest.fixture(scope="module", params=["classification", "segmentation"])
def quantised(request, tmp_path_factory):
    """An export with calibration inputs: the INT8 variant is written beside the others."""
    task = request.param
    out = tmp_path_factory.mktemp("models") / f"tiny-{task}" / "0.1"
    calibration = np.random.default_rng(2).uniform(-2, 2, (16, 1, SIZE, SIZE)).astype(np.float32)
    _, manifest = export(task, out, calibration_inputs=calibration, calibration_description="16 tiny training inputs")
    return manifest, out, calibration


def test_int8_variant_is_qdq_hashed_and_its_calibration_recorded(quantised) -> None:
    manifest, out, calibration = quantised
    assert load_manifest(out) == manifest
    assert manifest.files["onnx_int8"] == "model.int8.onnx"
    assert manifest.sha256["model.int8.onnx"] == sha256_file(out / "model.int8.onnx")
    int8 = manifest.export.int8
    assert (int8.quant_format, int8.calibration_method, int8.activation_type, int8.weight_type, int8.per_channel) == (
        "QDQ", "MinMax", "QUInt8", "QInt8", True)
    assert int8.calibration.model_dump() == {"description": "16 tiny training inputs", "films": 16,
                                             "fingerprint": fingerprint(calibration)}
    operators = Counter(node.op_type for node in onnx.load(str(out / "model.int8.onnx")).graph.node)
    assert operators["QuantizeLinear"] > 0 and operators["DequantizeLinear"] > operators["Conv"] > 0
    fp32 = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    int8_session = ort.InferenceSession(str(out / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    expected, actual = fp32.run(None, {"image": calibration})[0], int8_session.run(None, {"image": calibration})[0]
    error = np.abs(1 / (1 + np.exp(-actual.astype(np.float64))) - 1 / (1 + np.exp(-expected.astype(np.float64))))
    assert error.max() == pytest.approx(int8.max_abs_error, rel=1e-5) and 0 < int8.max_abs_error
    assert int8.mean_abs_error <= int8.tolerance


def test_an_int8_error_above_its_tolerance_is_refused(tmp_path: Path) -> None:
    calibration = np.random.default_rng(3).uniform(-2, 2, (4, 1, SIZE, SIZE)).astype(np.float32)
    out = tmp_path / "tiny" / "0.1"
    with pytest.raises(QuantizationCheckError, match=r"model\.int8\.onnx: INT8 probabilities differ from FP32 by .* "
                                                     r"over 4 calibration films; tolerance 0: refusing"):
        export("classification", out, calibration_inputs=calibration, calibration_description="x",
               int8_tolerance=0.0)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_int8_added_to_an_exported_folder_once(exported, tmp_path: Path) -> None:
    """`quantize_model_dir`: for folders exported before INT8 (the bundled demo models)."""
    _, _, manifest, out, real = exported
    folder = tmp_path / "m"
    shutil.copytree(out, folder)
    updated = quantize_model_dir(folder, real, "4 real inputs")
    assert updated.files == {**manifest.files, "onnx_int8": "model.int8.onnx"}
    assert updated.export.model_copy(update={"int8": None}) == manifest.export  # the rest is untouched
    assert sorted(path.name for path in folder.iterdir()) == sorted([*manifest.files.values(), "model.int8.onnx",
                                                                      "manifest.json"])
    with pytest.raises(ValueError, match="already lists 'model.int8.onnx': pass replace=True"):
        quantize_model_dir(folder, real, "4 real inputs")
    again = quantize_model_dir(folder, real[:2], "2 real inputs", replace=True)
    assert again.export.int8.calibration.films == 2 and load_manifest(folder) == again


def test_manifest_is_valid_and_hashes_match_files(exported) -> None:
    task, _, manifest, out, _ = exported
    assert load_manifest(out) == manifest
    assert set(manifest.files.values()) == {"model.onnx", "model.fp16.onnx", "model.pt"}
    for filename, digest in manifest.sha256.items():
        assert sha256_file(out / filename) == digest
    assert manifest.outputs == (["logit", "features"] if task == "classification" else ["mask_logits"])
    assert manifest.export.real_inputs_checked == 4 and manifest.export.checked_batch_sizes == [1, 3]
    assert sorted(p.name for p in out.parent.iterdir()) == ["0.1"]  # no staging folder left behind


def test_onnx_matches_torch_at_batch_1_and_3(exported) -> None:
    _, model, manifest, out, real = exported
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    for batch in (real[:1], real[:3]):
        with torch.no_grad():
            expected = model(torch.from_numpy(batch)).numpy()
        actual = session.run(None, {"image": batch})[0]  # the logit first, then a classifier's features
        assert actual.shape == expected.shape
        assert np.max(np.abs(actual - expected)) <= 1e-4
    assert 0 < manifest.export.max_abs_error <= manifest.export.tolerance
    assert manifest.export.max_rel_error >= 0


def test_classifier_features_match_torch_and_give_the_ood_description(tmp_path: Path) -> None:
    """The second output is the network's pooled stages 1-3, and `ood_films` fits the manifest's `ood` on it."""
    rng = np.random.default_rng(3)
    films = OodFilms(rng.uniform(-2, 2, (40, 1, SIZE, SIZE)).astype(np.float32), "40 tiny training inputs",
                     rng.uniform(-2, 2, (10, 1, SIZE, SIZE)).astype(np.float32), "10 tiny held-out inputs")
    model, _ = export("classification", tmp_path / "tiny", ood_films=films)
    session = ort.InferenceSession(str(tmp_path / "tiny" / "model.onnx"), providers=["CPUExecutionProvider"])
    logit, features = session.run(["logit", "features"], {"image": films.held_out})
    with torch.no_grad():
        expected_logit, expected = model.forward_with_features(torch.from_numpy(films.held_out))
    assert features.shape == (10, 8 + 16 + 32)
    np.testing.assert_allclose(features, expected.numpy(), atol=1e-4)
    np.testing.assert_allclose(logit, expected_logit.numpy(), atol=1e-4)
    ood = load_manifest(tmp_path / "tiny").ood
    assert ood is not None and (ood.films, ood.threshold_films, ood.dimensions) == (40, 10, 56)
    assert ood.threshold == pytest.approx(np.quantile(OodModel.from_statistics(ood).distance(features), 0.99),
                                          rel=1e-4)
    with pytest.raises(ValueError, match="a segmenter has neither"):
        export("segmentation", tmp_path / "seg", ood_films=films)


def test_fp16_variant_runs_with_float32_io_and_its_error_is_recorded(exported) -> None:
    _, model, manifest, out, real = exported
    session = ort.InferenceSession(str(out / "model.fp16.onnx"), providers=["CPUExecutionProvider"])
    assert [i.type for i in session.get_inputs()] == ["tensor(float)"]
    actual = session.run(None, {"image": real[:3]})[0]
    assert actual.dtype == np.float32
    with torch.no_grad():
        expected = torch.sigmoid(model(torch.from_numpy(real[:3]))).numpy()
    error = np.max(np.abs(1 / (1 + np.exp(-actual)) - expected))
    # The manifest's figure is the max over more batches (and in float64): at least this one, up to rounding.
    assert error <= manifest.export.fp16_max_abs_error + 1e-6
    assert manifest.export.fp16_max_abs_error <= manifest.export.fp16_tolerance
    assert manifest.export.fp16_max_abs_error > 0  # FP16 really is reduced precision


def test_checkpoint_loads_into_a_fresh_network(exported) -> None:
    task, model, _, out, _ = exported
    fresh = Classifier(18, width=8) if task == "classification" else UNet(18, width=8)
    fresh.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_an_export_that_differs_from_torch_is_refused(tmp_path: Path, monkeypatch) -> None:
    def export_other_weights(model, path, *args, **kwargs):
        other = tiny("segmentation")
        with torch.no_grad():
            other.head.bias.add_(0.5)  # the file no longer computes what `model` computes
        return export_onnx(other, path, *args, **kwargs)

    monkeypatch.setattr(export_module, "export_onnx", export_other_weights)
    out = tmp_path / "tiny-segmentation" / "0.1"
    with pytest.raises(ExportCheckError, match=r"model\.onnx: ONNX Runtime differs from PyTorch by 0\.5.*refusing"):
        export("segmentation", out)
    assert not out.exists() and list(out.parent.iterdir()) == []  # nothing half-written


def test_an_fp16_error_above_its_tolerance_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportCheckError, match=r"model\.fp16\.onnx: FP16 probabilities differ .* fp16_tolerance 0"):
        export("classification", tmp_path / "m", fp16_tolerance=0.0)


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"task": "segmentation", "model": Classifier(18, width=8)}, ValueError,
         "a segmentation model must be a UNet, got Classifier"),
        ({"thresholds": {"gate": 0.1}}, ValueError, "operating_point"),
        ({"input_spec": InputSpec(SIZE, channels=3)}, ValueError, "3 channel"),
        ({"real_inputs": np.zeros((2, 1, 32, 32), np.float32)}, ValueError, r"real_inputs must be \(N >= 1, 1, 64"),
        ({"real_inputs": np.zeros((2, 1, SIZE, SIZE))}, ValueError, "finite float32"),
        ({"intended_use": ""}, ValueError, "intended_use must say"),
        ({"calibration_inputs": np.zeros((2, 1, SIZE, SIZE), np.float32)}, ValueError,
         "calibration_inputs and calibration_description go together"),
        ({"calibration_inputs": np.zeros((2, 1, 32, 32), np.float32), "calibration_description": "x"}, ValueError,
         r"calibration inputs must be \(N >= 1, 1, 64, 64\)"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, changes: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        export(changes.pop("task", "classification"), tmp_path / "m", **changes)


def test_an_existing_model_is_never_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "m"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        export("classification", out)


def test_tensorrt_absent_gives_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now raises ImportError
    assert not is_available()
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed: pip install tensorrt") as info:
        build_engine(tmp_path / "model.onnx", tmp_path, gpu_name="NVIDIA H100", image_size=SIZE)
    assert str(info.value) == NOT_INSTALLED and isinstance(info.value.__cause__, ImportError)


def test_ort_tensorrt_provider_options(tmp_path: Path) -> None:
    options = ort_tensorrt_provider_options(tmp_path, "NVIDIA H100 80GB HBM3", "10.9.0", image_size=256)
    cache = str(tmp_path / "NVIDIA_H100_80GB_HBM3" / "trt-10.9.0")
    assert options == {
        "device_id": 0,
        "trt_fp16_enable": True,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": cache,
        "trt_max_workspace_size": 2 << 30,
        "trt_profile_min_shapes": "image:1x1x256x256",
        "trt_profile_opt_shapes": "image:8x1x256x256",
        "trt_profile_max_shapes": "image:32x1x256x256",
    }
    # TensorRT 11 has no FP16 builder flag: FP16 comes from the FP16 ONNX, so the EP flag is off.
    assert ort_tensorrt_provider_options(tmp_path, "A10", "11.4.0", image_size=256)["trt_fp16_enable"] is False
    assert engine_cache_dir(tmp_path, "A10", "10.9.0") != engine_cache_dir(tmp_path, "A10", "11.4.0")
    with pytest.raises(ValueError, match="1 <= min <= opt <= max"):
        ort_tensorrt_provider_options(tmp_path, "A10", "10.9.0", image_size=256, batches=(8, 1, 32))
    with pytest.raises(ValueError, match="version must look like"):
        ort_tensorrt_provider_options(tmp_path, "A10", "ten", image_size=256)
    with pytest.raises(ValueError, match="gpu_name must name the GPU"):
        ort_tensorrt_provider_options(tmp_path, " ", "10.9.0", image_size=256)
