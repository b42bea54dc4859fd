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
* `precision` (PTX_PRECISION, see `service.models.precision`): "auto" is the above; "fp32" the FP32 file on
  every provider (TensorRT without FP16); "fp16" the FP16 file, refused when only the CPU would run it;
  "int8" the QDQ INT8 file on the CPU provider only, GPU providers left out with a note. Why: INT8 was
  quantised for and measured on ONNX Runtime's CPU kernels (uint8 activations, the VNNI operand pair);
  TensorRT takes only symmetric INT8 activations (zero point 0), and the CUDA provider has few INT8
  kernels, so on a GPU the file would run half-emulated. FP16 on the GPU is the faster choice there.

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

import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from service.models.backends import BackendUnavailable
from service.models.backends.hardware_probe import (
    TRT_LIBRARIES,
    UNKNOWN_GPU,
    probe_gpu,
    probe_tensorrt_version,
)
from service.models.manifest import ModelInput, sha256_file
from service.models.ood import FEATURES_OUTPUT
from service.models.precision import SETTING, check_precision

LOG = logging.getLogger("ptx.backends")

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
#: The providers this backend knows, in the order "auto" prefers them, with their short names.
PROVIDERS: dict[str, str] = {TENSORRT: "tensorrt", CUDA: "cuda", CPU: "cpu"}
TRT_BATCH_PROFILE = (1, 8, 32)  # min, opt, max of the dynamic batch axis
TRT_WORKSPACE_BYTES = 2 << 30

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
    precision: str = "auto",
    int8_model_path: Path | None = None,
) -> SessionPlan:
    """Choose providers, model file and options (see the module docstring). Pure apart from `file_digest`.

    `providers` is "auto" (every known provider in `available`, best first) or an explicit list of ONNX
    Runtime provider names, each of which must be available. `trt_version` None means TensorRT cannot be
    loaded, which leaves the TensorRT provider out with a note. `precision`: see the module docstring.
    """
    wanted = _wanted(providers, available)
    if check_precision(precision) == "int8":
        return _int8_plan(wanted, int8_model_path)
    notes = []
    if TENSORRT in wanted and trt_version is None:
        wanted.remove(TENSORRT)
        notes.append(
            f"{TENSORRT} is listed by onnxruntime but TensorRT itself cannot be loaded (no `tensorrt` package, "
            f"none of {', '.join(TRT_LIBRARIES)} loadable): leaving it out"
        )
    if not wanted:
        raise ValueError(f"no usable execution provider among {providers!r} (available: {list(available)})")
    trt_fp16 = TENSORRT in wanted and major_version(trt_version or "") < 11 and precision != "fp32"
    needs_file = not (wanted[0] == TENSORRT and trt_fp16)  # TensorRT < 11 makes FP16 from the FP32 graph
    if precision == "fp16" and (wanted[0] == CPU or (needs_file and fp16_model_path is None)):
        raise BackendUnavailable(
            f"{SETTING}=fp16 needs a GPU provider and the manifest's FP16 file (providers {wanted}, FP16 file "
            f"{'given' if fp16_model_path else 'none'}); on the CPU FP16 is slower and less exact than FP32: "
            f"set {SETTING}=auto, fp32 or int8"
        )
    chosen = Path(model_path)
    fp16_file = fp16_model_path is not None and precision != "fp32"
    if fp16_file and (wanted[0] == CUDA or (wanted[0] == TENSORRT and not trt_fp16)):
        chosen = Path(fp16_model_path)
    elif wanted[0] == TENSORRT and not trt_fp16 and precision != "fp32":
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


def _int8_plan(wanted: list[str], int8_model_path: Path | None) -> SessionPlan:
    """The INT8 file on the CPU provider (see the module docstring for why never on a GPU provider)."""
    if int8_model_path is None:
        raise ValueError(f"{SETTING}=int8 needs int8_model_path (the manifest's 'onnx_int8' file)")
    if CPU not in wanted:
        raise ValueError(f"{SETTING}=int8 runs on {CPU} only, which the providers asked for ({wanted}) leave out")
    gpu = [name for name in wanted if name != CPU]
    note = (f"{SETTING}=int8: the QDQ INT8 file runs on {CPU}, where it was quantised and measured; {gpu} left "
            f"unused (TensorRT needs symmetric INT8 activations, CUDA has few INT8 kernels): set {SETTING}=auto "
            "for FP16 on the GPU")
    return SessionPlan(Path(int8_model_path), ((CPU, {}),), (note,) if gpu else ())


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
    slug = re.sub(r"[^a-z0-9.]+", "-", (gpu_name or UNKNOWN_GPU).strip().lower()).strip("-.")
    return slug or re.sub(r"\s+", "-", UNKNOWN_GPU)


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
        precision, int8_model_path: PTX_PRECISION and the manifest's "onnx_int8" file (see `plan_session`).
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
        precision: str = "auto",
        int8_model_path: Path | None = None,
    ) -> None:
        model_path = Path(model_path)
        available = list(ort.get_available_providers() if available_providers is None else available_providers)
        trt_possible = (TENSORRT in available and (providers == "auto" or TENSORRT in providers)
                        and precision != "int8")
        self.plan = plan_session(
            model_path,
            providers=providers,
            available=available,
            fp16_model_path=fp16_model_path,
            trt_cache_dir=(trt_cache_dir or default_cache_dir()) if trt_possible else None,
            gpu_name=gpu_probe() if trt_possible else None,
            trt_version=tensorrt_probe() if trt_possible else None,
            model_input=model_input,
            precision=precision,
            int8_model_path=int8_model_path,
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
        if used == CPU and self.plan.names[0] != CPU:  # a GPU provider failed to start: FP32 on the CPU
            if precision == "fp16":
                raise BackendUnavailable(f"{SETTING}=fp16: no GPU provider of {self.plan.names} started for "
                                         f"{model_path} (see onnxruntime's log above); FP16 is not run on the CPU")
            self.model_path = model_path
            self.session = ort.InferenceSession(os.fspath(model_path), self._options, providers=[CPU])
        # A GPU failure in the middle of a run must raise, not silently continue on the CPU under a GPU name.
        self.session.disable_fallback()
        self.provider = PROVIDERS.get(used, used)
        self.name = f"onnxruntime-{self.provider}" + ("-int8" if precision == "int8" else "")
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.output_names = [output.name for output in self.session.get_outputs()]
        self.max_batch = TRT_BATCH_PROFILE[-1] if used == TENSORRT and model_input is not None else None
        LOG.info("%s: ONNX Runtime on %s (planned %s, file %s)", model_path, used, self.plan.names,
                 self.model_path.name)
        if used == CPU and precision != "int8":  # int8 leaves a GPU unused on purpose, and the plan's note says so
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
        return self._run([self.output_name], batch)[0]

    def run_with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The first output and a classifier's pooled `features` (see `FeatureBackend`)."""
        if FEATURES_OUTPUT not in self.output_names:
            raise ValueError(f"{self.model_path.name} has no {FEATURES_OUTPUT!r} output (outputs {self.output_names}): "
                             "a classifier exported before issue 16; its manifest must not list `ood`")
        logits, features = self._run([self.output_name, FEATURES_OUTPUT], batch)
        return logits, features

    def _run(self, names: list[str], batch: np.ndarray) -> list[np.ndarray]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.max_batch is not None and len(batch) > self.max_batch:  # beyond the TensorRT profile
            parts = [self._run(names, batch[start:start + self.max_batch])
                     for start in range(0, len(batch), self.max_batch)]
            return [np.concatenate(outputs) for outputs in zip(*parts)]
        return [np.asarray(output, dtype=np.float32) for output in self.session.run(names, {self.input_name: batch})]
