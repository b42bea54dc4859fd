"""TensorRT engines from the exported ONNX files, and the ONNX Runtime TensorRT EP options the service uses.

UNVERIFIED: TensorRT cannot be installed where this project is developed and tested (no CUDA), so
`build_engine` has never run. It is written against TensorRT's documented Python API for TensorRT 10 and
11 and checked by reading only; the tests cover the "not installed" error and the provider options dict.
Treat a first run on a GPU as the test, and compare the engine's outputs with the ONNX Runtime CPU path
(the manifest's ONNX file) before trusting it.

Why two ways to use TensorRT: the service normally lets ONNX Runtime's TensorRT execution provider build
and cache engines itself (`ort_tensorrt_provider_options`), which keeps one backend interface. A
standalone `.engine` (`build_engine`) is for deployments that run TensorRT directly or want the engine
built ahead of time, outside the serving process.

Why engines are cached per GPU name and TensorRT version: an engine is a plan of kernels tuned for one GPU
model and one TensorRT build; loading it elsewhere fails or, worse, runs slowly. The key also carries the
ONNX file's sha256, so a new model never picks up a stale engine.

FP16: TensorRT 10 uses "weak typing": the FP32 ONNX plus `BuilderFlag.FP16` lets it choose FP16 kernels.
TensorRT 11 removed weak typing; every network is strongly typed and precision comes from the graph, so
FP16 needs the FP16 ONNX (`model.fp16.onnx` from training/export.py, float32 input/output).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import ModuleType

from service.models.manifest import sha256_file

NOT_INSTALLED = (
    "TensorRT is not installed: pip install tensorrt on a CUDA machine; "
    "the ONNX Runtime CPU/CUDA paths do not need it"
)
INPUT_NAME = "image"
BATCH_PROFILE = (1, 8, 32)  # min, opt, max batch of the dynamic batch axis
WORKSPACE_BYTES = 2 << 30


class TensorRTUnavailable(RuntimeError):
    """TensorRT (the `tensorrt` Python package and its CUDA libraries) cannot be imported."""


def _import_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except (ImportError, OSError) as error:  # OSError: the wheel is there but libnvinfer/CUDA is not
        raise TensorRTUnavailable(NOT_INSTALLED) from error
    return tensorrt


def is_available() -> bool:
    """Whether `import tensorrt` works here (it says nothing about a usable GPU)."""
    try:
        _import_tensorrt()
    except TensorRTUnavailable:
        return False
    return True


def major_version(trt_version: str) -> int:
    match = re.match(r"^(\d+)\.", trt_version)
    if match is None:
        raise ValueError(f"TensorRT version must look like '10.9.0', got {trt_version!r}")
    return int(match.group(1))


def engine_cache_dir(cache_root: str | os.PathLike[str], gpu_name: str, trt_version: str) -> Path:
    """`cache_root/<gpu name>/trt-<version>`: engines are only valid for one GPU model and TensorRT build."""
    if not gpu_name.strip():
        raise ValueError("gpu_name must name the GPU (e.g. torch.cuda.get_device_name()), got an empty string")
    major_version(trt_version)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", gpu_name.strip())
    return Path(cache_root) / slug / f"trt-{trt_version}"


def _profile_shapes(image_size: int, channels: int, batches: tuple[int, int, int]) -> list[tuple[int, ...]]:
    low, opt, high = batches
    if not 1 <= low <= opt <= high:
        raise ValueError(f"batch profile must satisfy 1 <= min <= opt <= max, got {batches}")
    if image_size < 32 or image_size % 32 or channels not in (1, 3):
        raise ValueError(f"image_size must be a multiple of 32 and channels 1 or 3, got {image_size}, {channels}")
    return [(batch, channels, image_size, image_size) for batch in batches]


def ort_tensorrt_provider_options(
    cache_dir: str | os.PathLike[str],
    gpu_name: str,
    trt_version: str,
    *,
    image_size: int,
    channels: int = 1,
    batches: tuple[int, int, int] = BATCH_PROFILE,
    workspace_bytes: int = WORKSPACE_BYTES,
    device_id: int = 0,
) -> dict[str, object]:
    """Options for ``("TensorrtExecutionProvider", options)`` in an ONNX Runtime session.

    An explicit profile (min/opt/max batch) makes ORT build one engine for the whole batch range at load
    time instead of rebuilding whenever a larger batch arrives. Engines and the timing cache persist in
    `engine_cache_dir(...)`, so only the first start on a given GPU pays the build (minutes).
    With TensorRT >= 11 `trt_fp16_enable` is off: load `model.fp16.onnx` for FP16 there (see module doc).
    """
    directory = os.fspath(engine_cache_dir(cache_dir, gpu_name, trt_version))
    shapes = [
        f"{INPUT_NAME}:{'x'.join(map(str, shape))}" for shape in _profile_shapes(image_size, channels, batches)
    ]
    if workspace_bytes < 1 << 20:
        raise ValueError(f"workspace_bytes must be at least 1 MiB, got {workspace_bytes}")
    return {
        "device_id": device_id,
        "trt_fp16_enable": major_version(trt_version) < 11,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": directory,
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": directory,
        "trt_max_workspace_size": workspace_bytes,
        "trt_profile_min_shapes": shapes[0],
        "trt_profile_opt_shapes": shapes[1],
        "trt_profile_max_shapes": shapes[2],
    }


def build_engine(
    onnx_path: str | os.PathLike[str],
    cache_root: str | os.PathLike[str],
    *,
    gpu_name: str,
    image_size: int,
    channels: int = 1,
    fp16: bool = True,
    batches: tuple[int, int, int] = BATCH_PROFILE,
    workspace_bytes: int = WORKSPACE_BYTES,
) -> Path:
    """Build (or reuse) a serialized engine for `onnx_path`; return the `.engine` path. UNVERIFIED.

    With TensorRT 10, pass the FP32 ONNX and `fp16=True` sets `BuilderFlag.FP16`. With TensorRT 11,
    pass `model.fp16.onnx` for FP16; `fp16=True` then checks that the parsed network carries FP16 tensors.
    """
    trt = _import_tensorrt()
    onnx_path = Path(onnx_path)
    shapes = _profile_shapes(image_size, channels, batches)
    directory = engine_cache_dir(cache_root, gpu_name, trt.__version__)
    precision = "fp16" if fp16 else "fp32"
    low, opt, high = batches
    engine_path = directory / (
        f"{onnx_path.stem}-{sha256_file(onnx_path)[:16]}-{precision}-b{low}-{opt}-{high}.engine"
    )
    if engine_path.is_file():
        return engine_path
    major = major_version(trt.__version__)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode from TensorRT 10 on
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16 and major < 11:
        config.set_flag(trt.BuilderFlag.FP16)
    elif fp16 and not _has_half_tensors(trt, network):
        raise ValueError(
            f"TensorRT {trt.__version__} builds strongly typed networks only and {onnx_path.name} has no "
            "FP16 tensors: pass the FP16 ONNX (model.fp16.onnx) for an FP16 engine"
        )
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, *shapes)
    config.add_optimization_profile(profile)

    timing_path = directory / "timing.cache"
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomically(engine_path, bytes(serialized))
    _write_atomically(timing_path, bytes(config.get_timing_cache().serialize()))
    return engine_path


def _has_half_tensors(trt: ModuleType, network: object) -> bool:
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if any(layer.get_output(out).dtype == trt.DataType.HALF for out in range(layer.num_outputs)):
            return True
    return False


def _write_atomically(path: Path, data: bytes) -> None:
    """Write then rename, so a concurrent reader never loads half an engine."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)
