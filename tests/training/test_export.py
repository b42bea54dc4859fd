"""Export to the model repository: ONNX checked against PyTorch, FP16 variant, hashes, manifest; TensorRT stubs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import training.export as export_module
from service.models.input_spec import InputSpec
from service.models.manifest import load_manifest, sha256_file
from service.models.networks import Classifier, UNet
from training.export import ExportCheckError, export_model, export_onnx
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


def test_manifest_is_valid_and_hashes_match_files(exported) -> None:
    task, _, manifest, out, _ = exported
    assert load_manifest(out) == manifest
    assert set(manifest.files.values()) == {"model.onnx", "model.fp16.onnx", "model.pt"}
    for filename, digest in manifest.sha256.items():
        assert sha256_file(out / filename) == digest
    assert manifest.outputs == (["logit"] if task == "classification" else ["mask_logits"])
    assert manifest.export.real_inputs_checked == 4 and manifest.export.checked_batch_sizes == [1, 3]
    assert sorted(p.name for p in out.parent.iterdir()) == ["0.1"]  # no staging folder left behind


def test_onnx_matches_torch_at_batch_1_and_3(exported) -> None:
    _, model, manifest, out, real = exported
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    for batch in (real[:1], real[:3]):
        with torch.no_grad():
            expected = model(torch.from_numpy(batch)).numpy()
        (actual,) = session.run(None, {"image": batch})
        assert actual.shape == expected.shape
        assert np.max(np.abs(actual - expected)) <= 1e-4
    assert 0 < manifest.export.max_abs_error <= manifest.export.tolerance
    assert manifest.export.max_rel_error >= 0


def test_fp16_variant_runs_with_float32_io_and_its_error_is_recorded(exported) -> None:
    _, model, manifest, out, real = exported
    session = ort.InferenceSession(str(out / "model.fp16.onnx"), providers=["CPUExecutionProvider"])
    assert [i.type for i in session.get_inputs()] == ["tensor(float)"]
    (actual,) = session.run(None, {"image": real[:3]})
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
