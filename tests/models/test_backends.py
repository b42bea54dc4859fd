"""Inference backends: ONNX Runtime (provider plan, CPU session, idle-GPU warning), PyTorch on the CPU, factory.

The GPU paths cannot run here (CPU-only onnxruntime and torch): their choice is tested as a plan with
injected facts (providers listed, GPU name, TensorRT version), and the sessions on the bundled demo models.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from scipy.ndimage import gaussian_filter

from service.cascade.preprocess import to_batch
from service.models.backends import BackendUnavailable, factory
from service.models.backends.factory import choose_kind, load_backend
from service.models.backends.hardware_probe import decode_tensorrt_version
from service.models.backends.onnxruntime import (
    CPU,
    CUDA,
    TENSORRT,
    OnnxRuntimeBackend,
    gpu_slug,
    plan_session,
)
from service.models.backends.onnxruntime_cpu import OnnxRuntimeCPU
from service.models.backends.torch_backend import (
    TorchBackend,
    batch_bucket,
    network_spec,
)
from service.models.manifest import ManifestError, input_spec, load_manifest
from tests.dicom_factory import chest_like
from tests.servers import REPO

MODELS = {
    "classifier": REPO / "models" / "ptx-classifier-demo" / "0.2.0",
    "segmenter": REPO / "models" / "ptx-segmenter-demo" / "0.2.0",
}
H100 = "NVIDIA H100 80GB HBM3"
ALL_GPU = ["AzureExecutionProvider", TENSORRT, CUDA, CPU]
LOGGER = "ptx.backends"


@pytest.fixture(scope="module")
def manifests():
    return {role: load_manifest(path) for role, path in MODELS.items()}


def films(count: int) -> list[np.ndarray]:
    """Chest-like films of different sizes with smooth random texture (display pixels in [0, 1])."""
    rng = np.random.default_rng(7)
    result = []
    for index in range(count):
        base = chest_like(320 + 64 * index, 288 + 32 * index).astype(np.float32) / 4095
        texture = gaussian_filter(rng.normal(size=base.shape), sigma=6)
        result.append(np.clip(base + 0.025 * texture / texture.std(), 0, 1).astype(np.float32))
    return result


def batch_for(manifest, count: int) -> np.ndarray:
    return to_batch(films(count), input_spec(manifest))


def plain_session_output(path: Path, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=[CPU])
    return session.run(None, {session.get_inputs()[0].name: batch})[0]


# --- ONNX Runtime on the CPU -------------------------------------------------------------------------------

@pytest.mark.parametrize("role", ["classifier", "segmenter"])
def test_onnxruntime_backend_matches_a_plain_session(role, manifests):
    manifest = manifests[role]
    batch = batch_for(manifest, 3)
    backend = OnnxRuntimeBackend(MODELS[role] / "model.onnx", gpu_probe=lambda: None)
    output = backend.run(batch)
    expected = plain_session_output(MODELS[role] / "model.onnx", batch)
    assert (backend.name, backend.provider) == ("onnxruntime-cpu", "cpu")
    assert output.dtype == np.float32
    assert output.shape == ((3,) if role == "classifier" else (3, 1, 256, 256))
    np.testing.assert_allclose(output, expected, rtol=0, atol=1e-6)
    assert np.ptp(output.reshape(3, -1).mean(axis=1)) > 0  # three different films give three different outputs


def test_onnxruntime_cpu_keeps_its_positional_signature(manifests):
    batch = batch_for(manifests["classifier"], 1)
    backend = OnnxRuntimeCPU(MODELS["classifier"] / "model.onnx", 1, 1)
    assert (backend.name, backend.provider, backend.input_name) == ("onnxruntime-cpu", "cpu", "image")
    np.testing.assert_allclose(backend.run(batch), plain_session_output(MODELS["classifier"] / "model.onnx", batch),
                               rtol=0, atol=1e-6)


def test_the_provider_used_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        OnnxRuntimeBackend(MODELS["classifier"] / "model.onnx", gpu_probe=lambda: None)
    assert any("ONNX Runtime on CPUExecutionProvider" in record.getMessage() for record in caplog.records)


# --- The provider plan (pure; facts injected) --------------------------------------------------------------

def plan(tmp_path: Path, available, **facts):
    defaults = dict(fp16_model_path=tmp_path / "model.fp16.onnx", trt_cache_dir=tmp_path / "cache",
                    gpu_name=H100, trt_version="10.9.0", model_input=load_manifest(MODELS["classifier"]).input,
                    file_digest=lambda path: ("ab" if path.name == "model.onnx" else "cd") * 32)
    return plan_session(tmp_path / "model.onnx", providers=facts.pop("providers", "auto"), available=available,
                        **{**defaults, **facts})


def test_plan_prefers_tensorrt_then_cuda_then_cpu(tmp_path):
    assert plan(tmp_path, ALL_GPU).names == [TENSORRT, CUDA, CPU]
    assert plan(tmp_path, [CPU, CUDA]).names == [CUDA, CPU]
    assert plan(tmp_path, ["AzureExecutionProvider", CPU]).names == [CPU]


def test_plan_tensorrt_caches_engines_per_gpu_tensorrt_and_file(tmp_path):
    result = plan(tmp_path, ALL_GPU)
    options = dict(result.providers)[TENSORRT]
    expected = tmp_path / "cache" / "nvidia-h100-80gb-hbm3-trt10.9.0" / f"model-{'ab' * 8}"
    assert options["trt_engine_cache_enable"] is True
    assert options["trt_engine_cache_path"] == str(expected) == options["trt_timing_cache_path"]
    assert options["trt_fp16_enable"] is True  # TensorRT 10 picks FP16 kernels from the FP32 graph ...
    assert result.model_path.name == "model.onnx"  # ... so it loads the FP32 file
    side = load_manifest(MODELS["classifier"]).input.size  # one profile for the model's own input (512 px)
    assert (options["trt_profile_min_shapes"], options["trt_profile_max_shapes"]) == (
        f"image:1x1x{side}x{side}", f"image:32x1x{side}x{side}")
    other_gpu = dict(plan(tmp_path, ALL_GPU, gpu_name="NVIDIA A10", trt_version="10.3.1").providers)[TENSORRT]
    assert other_gpu["trt_engine_cache_path"].endswith(f"nvidia-a10-trt10.3.1/model-{'ab' * 8}")


def test_plan_tensorrt_11_uses_the_fp16_file(tmp_path):
    result = plan(tmp_path, ALL_GPU, trt_version="11.2.0")
    options = dict(result.providers)[TENSORRT]
    assert result.model_path.name == "model.fp16.onnx"
    assert options["trt_fp16_enable"] is False  # strongly typed: precision comes from the graph
    assert options["trt_engine_cache_path"].endswith(f"trt11.2.0/model.fp16-{'cd' * 8}")


def test_plan_cuda_uses_the_fp16_file_and_the_cpu_the_fp32_one(tmp_path):
    assert plan(tmp_path, [CUDA, CPU]).model_path.name == "model.fp16.onnx"
    assert dict(plan(tmp_path, [CUDA, CPU]).providers)[CUDA] == {"device_id": 0}
    assert plan(tmp_path, [CUDA, CPU], fp16_model_path=None).model_path.name == "model.onnx"
    assert plan(tmp_path, [CPU]).model_path.name == "model.onnx"


def test_plan_leaves_tensorrt_out_when_its_library_cannot_load(tmp_path):
    result = plan(tmp_path, ALL_GPU, trt_version=None)
    assert result.names == [CUDA, CPU]
    assert len(result.notes) == 1 and "TensorRT itself cannot be loaded" in result.notes[0]


def test_plan_explicit_providers(tmp_path):
    assert plan(tmp_path, ALL_GPU, providers=[CPU]).names == [CPU]
    assert plan(tmp_path, ALL_GPU, providers=[CUDA, CPU]).names == [CUDA, CPU]
    with pytest.raises(ValueError, match=r"\['CUDAExecutionProvider'\] are not in this onnxruntime.*onnxruntime-gpu"):
        plan(tmp_path, [CPU], providers=[CUDA, CPU])
    with pytest.raises(ValueError, match=r"unknown execution provider\(s\) \['cuda'\]"):
        plan(tmp_path, ALL_GPU, providers=["cuda"])
    with pytest.raises(ValueError, match="providers must be 'auto' or a list"):
        plan(tmp_path, ALL_GPU, providers="gpu")


def test_plan_int8_runs_the_int8_file_on_the_cpu_even_beside_a_gpu(tmp_path):
    int8 = tmp_path / "model.int8.onnx"
    for available in (ALL_GPU, [CUDA, CPU], [CPU]):
        result = plan(tmp_path, available, precision="int8", int8_model_path=int8)
        assert (result.names, result.model_path) == ([CPU], int8)
        assert bool(result.notes) == (available != [CPU])
    [note] = plan(tmp_path, ALL_GPU, precision="int8", int8_model_path=int8).notes
    assert "PTX_PRECISION=int8" in note and "symmetric INT8 activations" in note and "PTX_PRECISION=auto" in note
    with pytest.raises(ValueError, match="PTX_PRECISION=int8 runs on CPUExecutionProvider only"):
        plan(tmp_path, ALL_GPU, providers=[CUDA], precision="int8", int8_model_path=int8)
    with pytest.raises(ValueError, match="PTX_PRECISION=int8 needs int8_model_path"):
        plan(tmp_path, [CPU], precision="int8")


def test_plan_fp32_keeps_the_fp32_file_and_tensorrt_without_fp16(tmp_path):
    assert plan(tmp_path, [CUDA, CPU], precision="fp32").model_path.name == "model.onnx"
    result = plan(tmp_path, ALL_GPU, precision="fp32")
    assert result.model_path.name == "model.onnx" and dict(result.providers)[TENSORRT]["trt_fp16_enable"] is False
    assert plan(tmp_path, ALL_GPU, precision="fp32", trt_version="11.2.0").model_path.name == "model.onnx"


def test_plan_fp16_needs_a_gpu_and_its_file(tmp_path):
    assert plan(tmp_path, [CUDA, CPU], precision="fp16").model_path.name == "model.fp16.onnx"
    assert dict(plan(tmp_path, ALL_GPU, precision="fp16").providers)[TENSORRT]["trt_fp16_enable"] is True
    with pytest.raises(BackendUnavailable,
                       match=r"PTX_PRECISION=fp16 needs a GPU provider.*\['CPUExecutionProvider'\]"):
        plan(tmp_path, [CPU], precision="fp16")
    with pytest.raises(BackendUnavailable, match="FP16 file none"):
        plan(tmp_path, ALL_GPU, precision="fp16", trt_version="11.2.0", fp16_model_path=None)
    with pytest.raises(ValueError, match="PTX_PRECISION must be one of auto, fp32, fp16, int8, got 'int4'"):
        plan(tmp_path, [CPU], precision="int4")


def test_int8_beside_a_gpu_that_fails_to_start_stays_on_the_int8_file(caplog, manifests):
    """onnxruntime is told CUDA is available (it is not) and an H100 is visible: int8 plans the CPU anyway, says
    once why the GPU is left unused (not "install onnxruntime-gpu"), and never switches to the FP32 file (the
    fall-back meant for a GPU session that failed)."""
    directory = MODELS["classifier"]
    with caplog.at_level(logging.INFO, logger=LOGGER):
        backend = OnnxRuntimeBackend(directory / "model.onnx", fp16_model_path=directory / "model.fp16.onnx",
                                     available_providers=[CUDA, CPU], gpu_probe=lambda: H100, precision="int8",
                                     int8_model_path=directory / "model.int8.onnx")
    assert (backend.model_path.name, backend.name) == ("model.int8.onnx", "onnxruntime-cpu-int8")
    [warning] = warnings_of(caplog)
    assert "PTX_PRECISION=int8" in warning and "['CUDAExecutionProvider'] left unused" in warning


@pytest.mark.parametrize(("code", "version"), [(8601, "8.6.1"), (100900, "10.9.0"), (110203, "11.2.3")])
def test_decode_tensorrt_version(code, version):
    assert decode_tensorrt_version(code) == version


def test_gpu_slug():
    assert gpu_slug(H100) == "nvidia-h100-80gb-hbm3"
    assert gpu_slug("  Tesla T4 ") == "tesla-t4"
    assert gpu_slug(None) == "unknown-nvidia-gpu"


# --- The idle-GPU warning ----------------------------------------------------------------------------------

def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_warns_loudly_when_a_gpu_is_visible_but_onnxruntime_has_no_gpu_provider(caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        backend = OnnxRuntimeBackend(MODELS["classifier"] / "model.onnx", gpu_probe=lambda: H100,
                                     available_providers=["AzureExecutionProvider", CPU])
    assert backend.provider == "cpu"
    [message] = warnings_of(caplog)
    assert message.startswith("GPU NOT USED")
    assert H100 in message and "on the CPU" in message and "onnxruntime-gpu" in message


def test_no_warning_without_a_gpu_nor_when_the_cpu_is_asked_for(caplog):
    probed = []

    def probe() -> str:
        probed.append(True)
        return H100

    with caplog.at_level(logging.INFO, logger=LOGGER):
        OnnxRuntimeBackend(MODELS["classifier"] / "model.onnx", gpu_probe=lambda: None)
        OnnxRuntimeBackend(MODELS["classifier"] / "model.onnx", providers=[CPU], gpu_probe=probe)
    assert warnings_of(caplog) == []
    assert probed == []  # an explicit CPU session does not even look for a GPU


def test_a_gpu_provider_that_fails_to_start_falls_back_to_the_fp32_file_with_a_warning(caplog, manifests):
    """onnxruntime is told CUDA is available (it is not): the session comes up on the CPU, which must then
    load the FP32 file rather than the FP16 one planned for CUDA, and say that the GPU is not used."""
    directory = MODELS["segmenter"]
    batch = batch_for(manifests["segmenter"], 1)
    with caplog.at_level(logging.INFO, logger=LOGGER), pytest.warns(UserWarning, match="not in available provider"):
        backend = OnnxRuntimeBackend(directory / "model.onnx", fp16_model_path=directory / "model.fp16.onnx",
                                     available_providers=[CUDA, CPU], gpu_probe=lambda: None)
    assert backend.plan.model_path.name == "model.fp16.onnx"
    assert (backend.model_path.name, backend.provider, backend.name) == ("model.onnx", "cpu", "onnxruntime-cpu")
    [message] = warnings_of(caplog)
    assert "could not start ['CUDAExecutionProvider']" in message
    np.testing.assert_allclose(backend.run(batch), plain_session_output(directory / "model.onnx", batch),
                               rtol=0, atol=1e-6)


# --- PyTorch on the CPU ------------------------------------------------------------------------------------

@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("role", ["classifier", "segmenter"])
def test_torch_cpu_matches_onnxruntime(role, count, manifests):
    """Same weights, same FP32 arithmetic: only the kernels' summation order differs (oneDNN vs MLAS). The bound
    is the manifest's export tolerance on logits (1e-4), the one the ONNX file itself was accepted under against
    PyTorch; the export measured 4e-6 (classifier) and 1.1e-5 (segmenter), while a wrong weight, layer or
    normalisation moves logits by whole units."""
    manifest = manifests[role]
    batch = batch_for(manifest, count)
    torch_backend = TorchBackend(MODELS[role], manifest, device="cpu")
    ort_output = OnnxRuntimeCPU(MODELS[role] / "model.onnx").run(batch)
    output = torch_backend.run(batch)
    assert (torch_backend.name, torch_backend.provider) == ("torch-cpu", "cpu")
    assert not torch_backend.fp16 and not torch_backend.channels_last
    assert output.dtype == np.float32 and output.shape == ort_output.shape
    np.testing.assert_allclose(output, ort_output, rtol=0, atol=manifest.export.tolerance)


def test_torch_refuses_what_it_cannot_do_on_this_device(manifests):
    manifest = manifests["classifier"]
    with pytest.raises(ValueError, match="fp16 needs device 'cuda'"):
        TorchBackend(MODELS["classifier"], manifest, device="cpu", fp16=True)
    with pytest.raises(ValueError, match="cuda_graphs needs compile=True and device 'cuda'"):
        TorchBackend(MODELS["classifier"], manifest, device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu' or 'cuda', got 'gpu'"):
        TorchBackend(MODELS["classifier"], manifest, device="gpu")
    backend = TorchBackend(MODELS["classifier"], manifest, device="cpu")
    side = manifest.input.size
    expected = rf"batch must be \(N, 1, {side}, {side}\) float32, got shape \(2, 1, 128, 128\)"
    with pytest.raises(ValueError, match=expected):
        backend.run(np.zeros((2, 1, 128, 128), np.float32))


def test_torch_cuda_without_a_gpu_is_a_clear_error(manifests):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: nothing to refuse")
    with pytest.raises(BackendUnavailable, match="device 'cuda' asked for, but torch .* sees no CUDA device"):
        TorchBackend(MODELS["classifier"], manifests["classifier"], device="cuda")


def copy_model(role: str, tmp_path: Path) -> Path:
    target = tmp_path / role
    shutil.copytree(MODELS[role], target)
    return target


def test_missing_checkpoint_file_is_a_clear_error(tmp_path, manifests):
    directory = copy_model("segmenter", tmp_path)
    (directory / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.pt: the checkpoint listed in the manifest of ptx-segmenter"):
        TorchBackend(directory, manifests["segmenter"], device="cpu")


def test_tampered_checkpoint_is_refused(tmp_path, manifests):
    directory = copy_model("classifier", tmp_path)
    with open(directory / "model.pt", "ab") as stream:
        stream.write(b"\0")
    with pytest.raises(ManifestError, match="refusing a checkpoint that differs from its manifest"):
        TorchBackend(directory, manifests["classifier"], device="cpu")


def test_manifest_without_a_checkpoint_is_a_clear_error(manifests):
    manifest = manifests["classifier"]
    files = {role: name for role, name in manifest.files.items() if role != "checkpoint"}
    stripped = manifest.model_copy(update={"files": files})
    with pytest.raises(ManifestError, match="lists no 'checkpoint' file.*use the onnxruntime backend"):
        TorchBackend(MODELS["classifier"], stripped, device="cpu")


def test_network_spec_from_the_manifest_and_its_errors(manifests):
    spec = network_spec(manifests["segmenter"])
    assert (spec.task, spec.encoder_depth, spec.width, spec.decoder_blocks, spec.scse) == (
        "segmentation", 18, 16, 3, False)
    assert network_spec(manifests["classifier"]).aux_segmentation is True
    config = {**manifests["segmenter"].training.config, "segmenter": {"network": {"width": 16}}}
    broken = manifests["segmenter"].model_copy(
        update={"training": manifests["segmenter"].training.model_copy(update={"config": config})})
    with pytest.raises(ManifestError, match=r"training\.config\.segmenter\.network cannot describe.*'encoder_depth'"):
        network_spec(broken)


def test_torch_absent_is_a_clear_error(monkeypatch, manifests):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(BackendUnavailable, match="PyTorch is not installed: the torch backend needs it"):
        TorchBackend(MODELS["classifier"], manifests["classifier"], device="cpu")


@pytest.mark.parametrize(
    ("size", "bucket"), [(0, 0), (1, 1), (2, 2), (3, 4), (5, 8), (17, 32), (32, 32), (33, 64), (65, 96)])
def test_batch_bucket(size, bucket):
    assert batch_bucket(size) == bucket


# --- The factory -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("available", "torch_cuda", "checkpoint", "expected"),
    [
        ([TENSORRT, CUDA, CPU], True, True, "onnxruntime"),  # a GPU build of onnxruntime wins
        ([CUDA, CPU], False, True, "onnxruntime"),
        ([CPU], True, True, "torch"),  # CPU onnxruntime, CUDA torch: the GPU through torch
        ([CPU], True, False, "onnxruntime"),  # ... unless there are no weights for torch
        ([CPU], False, True, "onnxruntime"),
    ],
)
def test_choose_kind_auto(available, torch_cuda, checkpoint, expected):
    assert choose_kind("auto", available, lambda: torch_cuda, checkpoint) == expected


def test_choose_kind_explicit_and_unknown():
    assert choose_kind("torch", [TENSORRT, CUDA, CPU], lambda: False, True) == "torch"
    assert choose_kind("onnxruntime", [CPU], lambda: True, True) == "onnxruntime"
    with pytest.raises(ValueError, match="backend kind must be one of 'auto', 'onnxruntime', 'torch', got 'tensorrt'"):
        choose_kind("tensorrt", [CPU], lambda: False, True)


def test_factory_auto_here_is_onnxruntime_cpu(manifests):
    if factory.torch_cuda_available() or {CUDA, TENSORRT} & set(ort.get_available_providers()):
        pytest.skip("a GPU is usable here: auto rightly picks it")
    backend = load_backend(MODELS["segmenter"], manifests["segmenter"])
    assert isinstance(backend, OnnxRuntimeBackend)
    assert (backend.name, backend.provider, backend.model_path.name) == ("onnxruntime-cpu", "cpu", "model.onnx")


def test_factory_kinds_and_errors(manifests):
    assert isinstance(load_backend(MODELS["classifier"], manifests["classifier"], "torch"), TorchBackend)
    with pytest.raises(ValueError, match="backend kind must be one of 'auto', 'onnxruntime', 'torch', got 'trt'"):
        load_backend(MODELS["classifier"], manifests["classifier"], "trt")


def test_factory_gives_onnxruntime_the_fp16_file_for_cuda(monkeypatch, tmp_path, manifests):
    """With CUDA listed (a pretend onnxruntime-gpu), the plan loads the FP16 file; the session, on this
    CPU-only build, then falls back to the FP32 one."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    with pytest.warns(UserWarning, match="not in available provider"):
        backend = load_backend(MODELS["classifier"], manifests["classifier"], cache_dir=tmp_path)
    assert isinstance(backend, OnnxRuntimeBackend)
    assert backend.plan.names == [CUDA, CPU] and backend.plan.model_path.name == "model.fp16.onnx"
    assert backend.model_path.name == "model.onnx"


def test_spinning_is_off_unless_asked():
    from service.models.backends.onnxruntime import session_options

    assert session_options(1, 1).get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options(1, 1, spinning=True).get_session_config_entry("session.intra_op.allow_spinning") == "1"
