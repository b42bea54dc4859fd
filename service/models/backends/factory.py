"""Pick and load the backend for one model folder: ONNX Runtime or PyTorch, on the best device there is.

"auto" prefers, in order:

1. ONNX Runtime when this build has a GPU provider (TensorRT or CUDA): the ONNX files are what was
   validated at export, and it needs no torch;
2. PyTorch on CUDA in FP16 when torch is installed and sees a GPU and the model ships its checkpoint:
   the usual case of a GPU machine whose onnxruntime is the CPU build;
3. ONNX Runtime on the CPU, which warns loudly if a GPU is visible but unused.

PTX_PRECISION=int8 always means ONNX Runtime (the INT8 file is a QDQ ONNX graph; torch has no path for it):
"auto" picks it, and an explicit "torch" is refused at start. fp32 / fp16 set the torch backend's FP16 flag.

Which engine each kind needs is declared here in one place; the engines live in their own modules.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from service.models.backends import Backend, BackendUnavailable
from service.models.backends.onnxruntime import CUDA, TENSORRT, OnnxRuntimeBackend
from service.models.manifest import Manifest
from service.models.precision import SETTING, variant_path

LOG = logging.getLogger("ptx.backends")
KINDS = ("auto", "onnxruntime", "torch")


def choose_kind(kind: str, ort_providers: Sequence[str], torch_cuda: Callable[[], bool], has_checkpoint: bool) -> str:
    """The engine for `kind`, "onnxruntime" or "torch" (see the module docstring).

    `torch_cuda` is called only when it decides (it may import torch).
    """
    if kind not in KINDS:
        raise ValueError(f"backend kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    if kind != "auto":
        return kind
    if TENSORRT in ort_providers or CUDA in ort_providers:
        return "onnxruntime"
    if has_checkpoint and torch_cuda():
        return "torch"
    return "onnxruntime"


def torch_cuda_available() -> bool:
    """Whether torch is installed and sees a CUDA device (imports torch only if it is installed)."""
    if importlib.util.find_spec("torch") is None:
        return False
    try:
        import torch
    except (ImportError, OSError):
        return False
    return bool(torch.cuda.is_available())


def load_backend(
    model_dir: Path,
    manifest: Manifest,
    kind: str = "auto",
    *,
    intra_op_threads: int = 0,
    spinning: bool = False,
    inter_op_threads: int = 1,
    cache_dir: Path | None = None,
    precision: str = "auto",
) -> Backend:
    """The backend for `model_dir` (whose `manifest` was loaded, and its files verified, by `load_manifest`).

    `kind`: "auto", "onnxruntime" (best ONNX Runtime provider, CPU if none) or "torch" (CUDA FP16 if torch
    sees a GPU, else the CPU in FP32). `cache_dir` is the root of the TensorRT engine cache (default
    `onnxruntime.default_cache_dir()`). `precision`: PTX_PRECISION (see `service.models.precision`).
    """
    import onnxruntime as ort

    model_dir = Path(model_dir)
    int8_path = variant_path(model_dir, manifest, precision) if precision == "int8" else None
    if int8_path is not None and kind == "torch":
        raise BackendUnavailable(f"{SETTING}=int8 runs the manifest's QDQ INT8 ONNX file through ONNX Runtime; "
                                 "PTX_BACKEND=torch cannot: set PTX_BACKEND=auto or onnxruntime")
    chosen = "onnxruntime" if int8_path is not None else choose_kind(
        kind, ort.get_available_providers(), torch_cuda_available, "checkpoint" in manifest.files)
    if chosen == "torch":
        from service.models.backends.torch_backend import TorchBackend

        half = {"fp32": False, "fp16": True}.get(precision)  # None: torch's own default (FP16 on CUDA)
        backend: Backend = TorchBackend(model_dir, manifest, threads=intra_op_threads, fp16=half)
    else:
        fp16 = manifest.files.get("onnx_fp16")
        backend = OnnxRuntimeBackend(
            model_dir / manifest.files["onnx"],
            intra_op_threads=intra_op_threads,
            spinning=spinning,
            inter_op_threads=inter_op_threads,
            trt_cache_dir=None if cache_dir is None else Path(cache_dir),
            fp16_model_path=None if fp16 is None else model_dir / fp16,
            model_input=manifest.input,
            precision=precision,
            int8_model_path=int8_path,
        )
    LOG.info("%s %s: backend %s (kind %r, precision %r)", manifest.name, manifest.version, backend.name, kind,
             precision)
    return backend
