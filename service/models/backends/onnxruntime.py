"""ONNX Runtime with the best execution provider this install has: TensorRT > CUDA > CPU.

Why one class for the three: in ONNX Runtime the device is a session option, and the session falls back
along the provider list on its own (a node TensorRT cannot take runs on CUDA, then on the CPU), so one
backend with an ordered list is simpler than three that would each re-implement the fall-back.

Why a plan (`plan_session`) apart from the session: which providers, which model file and which TensorRT
options is pure logic over a few facts (the providers this onnxruntime build lists, the GPU's name, the
TensorRT version, the model file's hash), so it is tested on a CPU-only machine with injected facts;
creating the session is the only step that needs the hardware.

What the plan decides, and why:

* TensorRT: FP16 on (TensorRT < 11 chooses FP16 kernels from the FP32 graph; TensorRT >= 11 builds strongly
  typed networks only, so FP16 there needs the FP16 ONNX file). Engines and the timing cache persist in
  `<cache>/<gpu-name-slug>-trt<version>/<model file>-<sha256 prefix>/`: an engine is tuned for one GPU model
  and one TensorRT build, and ONNX Runtime's own cache key does not cover the weights (a retrained model of
  the same architecture could pick up the old engine), hence the file's hash in the path. An explicit
  optimisation profile (batch 1/8/32) makes one engine serve the whole batch range; `run` splits larger
  batches. TensorRT is left out when its library cannot be loaded: onnxruntime-gpu lists the TensorRT
  provider whether or not TensorRT is installed.
* CUDA: the FP16 ONNX file where there is one (float32 input and output, FP16 weights and arithmetic).
* CPU: always the FP32 file (FP16 on a CPU is slower and less exact). If a GPU provider was planned but the
  session came up on the CPU (CUDA or cuDNN libraries missing), the session is re-made from the FP32 file.

A GPU that is visible but unused is logged as a WARNING on "ptx.backends": a triage service running 20-50x
slower than it could is a deployment error (usually `onnxruntime` installed instead of `onnxruntime-gpu`),
not a detail.

UNVERIFIED: only the CPU path and the planning logic have run. onnxruntime-gpu and TensorRT cannot be
installed where this project is developed and tested, and no GPU machine with them was available, so the
CUDA and TensorRT sessions, the provider options' effect, the TensorRT version probe (`libnvinfer`'s
`getInferLibVersion`) and the engine cache have never been exercised. Compare a first GPU run's outputs with
the CPU path (the manifest's FP32 ONNX file) before trusting it.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from service.models.manifest import ModelInput, sha256_file

LOG = logging.getLogger("ptx.backends")

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
#: The providers this backend knows, in the order "auto" prefers them, with their short names.
PROVIDERS: dict[str, str] = {TENSORRT: "tensorrt", CUDA: "cuda", CPU: "cpu"}
TRT_BATCH_PROFILE = (1, 8, 32)  # min, opt, max of the dynamic batch axis
TRT_WORKSPACE_BYTES = 2 << 30
_TRT_LIBRARIES = ("libnvinfer.so.11", "libnvinfer.so.10", "libnvinfer.so")
_UNKNOWN_GPU = "unknown NVIDIA GPU"

GpuProbe = Callable[[], "str | None"]
Providers = Literal["auto"] | Sequence[str]


@dataclass(frozen=True)
class SessionPlan:
    """What to load and how: the model file, providers with their options in order, and notes for the log."""

    model_path: Path
    providers: tuple[tuple[str, dict[str, object]], ...]
    notes: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.providers]


def plan_session(
    model_path: Path,
    *,
    providers: Providers,
    available: Sequence[str],
    fp16_model_path: Path | None = None,
    trt_cache_dir: Path | None = None,
    gpu_name: str | None = None,
    trt_version: str | None = None,
    model_input: ModelInput | None = None,
    file_digest: Callable[[Path], str] = sha256_file,
    device_id: int = 0,
) -> SessionPlan:
    """Choose providers, model file and options (see the module docstring). Pure apart from `file_digest`.

    `providers` is "auto" (every known provider in `available`, best first) or an explicit list of ONNX
    Runtime provider names, each of which must be available. `trt_version` None means TensorRT cannot be
    loaded, which leaves the TensorRT provider out with a note.
    """
    wanted = _wanted(providers, available)
    notes = []
    if TENSORRT in wanted and trt_version is None:
        wanted.remove(TENSORRT)
        notes.append(
            f"{TENSORRT} is listed by onnxruntime but TensorRT itself cannot be loaded (no `tensorrt` package, "
            f"none of {', '.join(_TRT_LIBRARIES)} loadable): leaving it out"
        )
    if not wanted:
        raise ValueError(f"no usable execution provider among {providers!r} (available: {list(available)})")
    trt_fp16 = TENSORRT in wanted and major_version(trt_version or "") < 11
    chosen = Path(model_path)
    if fp16_model_path is not None and (wanted[0] == CUDA or (wanted[0] == TENSORRT and not trt_fp16)):
        chosen = Path(fp16_model_path)
    elif wanted[0] == TENSORRT and not trt_fp16:
        notes.append(f"TensorRT {trt_version} needs the FP16 ONNX file for FP16 and none was given: FP32 engine")
    options: list[tuple[str, dict[str, object]]] = []
    for name in wanted:
        if name == TENSORRT:
            if trt_cache_dir is None:
                raise ValueError("trt_cache_dir is required when the TensorRT provider is planned")
            directory = tensorrt_cache_dir(trt_cache_dir, gpu_name, trt_version or "", chosen, file_digest(chosen))
            options.append((name, tensorrt_options(directory, trt_fp16, model_input, device_id)))
        elif name == CUDA:
            options.append((name, {"device_id": device_id}))
        else:
            options.append((name, {}))
    return SessionPlan(chosen, tuple(options), tuple(notes))


def _wanted(providers: Providers, available: Sequence[str]) -> list[str]:
    if isinstance(providers, str):
        if providers != "auto":
            raise ValueError(f"providers must be 'auto' or a list of provider names, got {providers!r}")
        return [name for name in PROVIDERS if name in available]
    unknown = [name for name in providers if name not in PROVIDERS]
    if unknown:
        raise ValueError(f"unknown execution provider(s) {unknown}; this backend knows {list(PROVIDERS)}")
    missing = [name for name in providers if name not in available]
    if missing:
        raise ValueError(
            f"execution provider(s) {missing} are not in this onnxruntime build (available: {list(available)}); "
            "the CUDA and TensorRT providers come with the onnxruntime-gpu package"
        )
    return list(dict.fromkeys(providers))


def major_version(version: str) -> int:
    match = re.match(r"^(\d+)\.", version)
    if match is None:
        raise ValueError(f"TensorRT version must look like '10.9.0', got {version!r}")
    return int(match.group(1))


def gpu_slug(gpu_name: str | None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (a folder name)."""
    slug = re.sub(r"[^a-z0-9.]+", "-", (gpu_name or _UNKNOWN_GPU).strip().lower()).strip("-.")
    return slug or re.sub(r"\s+", "-", _UNKNOWN_GPU)


def tensorrt_cache_dir(root: Path, gpu_name: str | None, trt_version: str, model_path: Path, digest: str) -> Path:
    """`root/<gpu-slug>-trt<version>/<model file stem>-<sha256[:16]>`: one GPU model, one TensorRT, one file."""
    major_version(trt_version)
    return Path(root) / f"{gpu_slug(gpu_name)}-trt{trt_version}" / f"{Path(model_path).stem}-{digest[:16]}"


def tensorrt_options(
    directory: Path, fp16: bool, model_input: ModelInput | None, device_id: int = 0
) -> dict[str, object]:
    """Options of ONNX Runtime's TensorRT provider: FP16, engine and timing caches, the batch profile.

    Without `model_input` (its name, channels, size) there is no explicit profile and ONNX Runtime builds
    an engine for each new input shape it meets, at run time.
    """
    options: dict[str, object] = {
        "device_id": device_id,
        "trt_fp16_enable": fp16,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": os.fspath(directory),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": os.fspath(directory),
        "trt_max_workspace_size": TRT_WORKSPACE_BYTES,
    }
    if model_input is not None:
        for key, batch in zip(("min", "opt", "max"), TRT_BATCH_PROFILE):
            shape = f"{batch}x{model_input.channels}x{model_input.size}x{model_input.size}"
            options[f"trt_profile_{key}_shapes"] = f"{model_input.name}:{shape}"
    return options


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/ptx-triage/tensorrt` (default `~/.cache/...`), read when called, not at import."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ptx-triage" / "tensorrt"


def probe_gpu() -> str | None:
    """The name of a visible NVIDIA GPU, or None. Tries nvidia-smi, then torch (if installed), then /dev/nvidia0."""
    name = _nvidia_smi_gpu_name() or _torch_gpu_name()
    if name is None and Path("/dev/nvidia0").exists():
        return _UNKNOWN_GPU
    return name


def _nvidia_smi_gpu_name() -> str | None:
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return None
    try:
        result = subprocess.run([executable, "--query-gpu=name", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    return names[0] if result.returncode == 0 and names else None


def _torch_gpu_name() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return None
    try:
        import torch
    except (ImportError, OSError):  # OSError: a torch wheel whose CUDA libraries are broken
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def probe_tensorrt_version() -> str | None:
    """TensorRT's version from the `tensorrt` package or from libnvinfer itself; None if neither loads.

    UNVERIFIED (no TensorRT here): the libnvinfer fall-back reads `getInferLibVersion()`.
    """
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except (ImportError, OSError):
        pass
    for library in _TRT_LIBRARIES:
        try:
            function = ctypes.CDLL(library).getInferLibVersion
        except (OSError, AttributeError):
            continue
        function.restype = ctypes.c_int32
        return decode_tensorrt_version(int(function()))
    return None


def decode_tensorrt_version(code: int) -> str:
    """`getInferLibVersion()` -> "major.minor.patch": major*10000 + ... from TensorRT 10 on, major*1000 + ... before."""
    if code <= 0:
        raise ValueError(f"TensorRT version code must be positive, got {code}")
    major, rest = divmod(code, 10000 if code >= 100000 else 1000)
    minor, patch = divmod(rest, 100)
    return f"{major}.{minor}.{patch}"


def session_options(intra_op_threads: int, inter_op_threads: int, spinning: bool = False) -> ort.SessionOptions:
    """Explicit threads (2-core boxes oversubscribe easily; 0 = ONNX Runtime's default), all graph optimisations.

    Spin-waiting is off by default: ONNX Runtime's idle intra-op threads otherwise busy-wait for the next
    run, and in the service the model worker shares the cores with the HTTP edge's decoding, which they
    starve (PTX_ORT_SPINNING=true restores it for a box that runs nothing else).
    """
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class OnnxRuntimeBackend:
    """One InferenceSession on the best provider available (see the module docstring), created once.

    Args:
        model_path: the FP32 ONNX file (the manifest's "onnx" role).
        providers: "auto", or ONNX Runtime provider names in order (each must be available).
        intra_op_threads, inter_op_threads: ONNX Runtime thread pools (0 = its default).
        spinning: let idle pool threads spin-wait (see `session_options`).
        trt_cache_dir: root of the TensorRT engine cache (default `default_cache_dir()`).
        fp16_model_path: the FP16-weights ONNX file (the manifest's "onnx_fp16" role), used on CUDA.
        model_input: the manifest's input description, for TensorRT's batch profile.
        gpu_probe: name of a visible GPU or None (for the TensorRT cache key and the idle-GPU warning).
        tensorrt_probe: TensorRT's version or None. available_providers: defaults to onnxruntime's list.
            The three are injectable so that the choice is testable without the hardware.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        providers: Providers = "auto",
        intra_op_threads: int = 0,
        spinning: bool = False,
        inter_op_threads: int = 1,
        trt_cache_dir: Path | None = None,
        fp16_model_path: Path | None = None,
        model_input: ModelInput | None = None,
        gpu_probe: GpuProbe = probe_gpu,
        tensorrt_probe: Callable[[], str | None] = probe_tensorrt_version,
        available_providers: Sequence[str] | None = None,
    ) -> None:
        model_path = Path(model_path)
        available = list(ort.get_available_providers() if available_providers is None else available_providers)
        trt_possible = TENSORRT in available and (providers == "auto" or TENSORRT in providers)
        self.plan = plan_session(
            model_path,
            providers=providers,
            available=available,
            fp16_model_path=fp16_model_path,
            trt_cache_dir=(trt_cache_dir or default_cache_dir()) if trt_possible else None,
            gpu_name=gpu_probe() if trt_possible else None,
            trt_version=tensorrt_probe() if trt_possible else None,
            model_input=model_input,
        )
        for note in self.plan.notes:
            LOG.warning("%s: %s", model_path, note)
        for name, options in self.plan.providers:
            if name == TENSORRT:
                Path(str(options["trt_engine_cache_path"])).mkdir(parents=True, exist_ok=True)
        self._options = session_options(intra_op_threads, inter_op_threads, spinning)
        self.model_path = self.plan.model_path
        self.session = ort.InferenceSession(os.fspath(self.model_path), self._options,
                                            providers=list(self.plan.providers))
        used = self.session.get_providers()[0]
        if used == CPU and self.model_path != model_path:  # a GPU provider failed to start: FP32 on the CPU
            self.model_path = model_path
            self.session = ort.InferenceSession(os.fspath(model_path), self._options, providers=[CPU])
        # A GPU failure in the middle of a run must raise, not silently continue on the CPU under a GPU name.
        self.session.disable_fallback()
        self.provider = PROVIDERS.get(used, used)
        self.name = f"onnxruntime-{self.provider}"
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.max_batch = TRT_BATCH_PROFILE[-1] if used == TENSORRT and model_input is not None else None
        LOG.info("%s: ONNX Runtime on %s (planned %s, file %s)", model_path, used, self.plan.names,
                 self.model_path.name)
        if used == CPU:
            self._warn_if_gpu_idle(model_path, providers, available, gpu_probe)

    def _warn_if_gpu_idle(self, model_path: Path, providers: Providers, available: list[str],
                          gpu_probe: GpuProbe) -> None:
        planned_gpu = [name for name in self.plan.names if name != CPU]
        if planned_gpu:
            LOG.warning(
                "GPU NOT USED: ONNX Runtime could not start %s for %s and runs it on the CPU: the CUDA, cuDNN "
                "or TensorRT libraries are missing or of the wrong version (see onnxruntime's own log above)",
                planned_gpu, model_path,
            )
            return
        if providers != "auto":
            return  # the CPU was asked for
        gpu = gpu_probe()
        if gpu is not None:
            LOG.warning(
                "GPU NOT USED: %s is visible, yet ONNX Runtime runs %s on the CPU because this onnxruntime "
                "build has no CUDA or TensorRT execution provider (available: %s). Install onnxruntime-gpu "
                "instead of onnxruntime (same version), or use the torch backend, to run on the GPU.",
                gpu, model_path, available,
            )

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.max_batch is not None and len(batch) > self.max_batch:  # beyond the TensorRT profile
            return np.concatenate([self.run(batch[start:start + self.max_batch])
                                   for start in range(0, len(batch), self.max_batch)])
        output = self.session.run([self.output_name], {self.input_name: batch})[0]
        return np.asarray(output, dtype=np.float32)
