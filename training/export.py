"""Export a trained network as a model-repository entry: ONNX + FP16 (+ INT8) ONNX + state dict + manifest.json.

Why check numerically: an ONNX file that loads is not an ONNX file that computes what was validated.
Every export is run through ONNX Runtime (CPU) and compared with the PyTorch model in eval mode, on random
inputs and, when given, on real preprocessed radiographs, at batch sizes 1 and 3 (the batch axis is
dynamic, and a graph that bakes in the example batch size only shows it at another size). An export whose
error exceeds `tolerance` is refused, and nothing is written to `out_dir`.

Errors are measured on the raw outputs (logits, and a classifier's pooled `features`, which the
out-of-distribution distance reads): `max_abs_error` = max |ORT - PyTorch| over both, and
`max_rel_error` = max_abs_error / max |PyTorch output| over all checked batches. The export passes when
either is within `tolerance`, i.e. ``max_abs_error <= tolerance * max(1, max |PyTorch output|)``: absolute
for outputs of magnitude up to 1, relative beyond (large logits carry proportionally larger float error).

The FP16 variant (float16 weights and arithmetic, float32 input and output so callers never handle
float16) is for GPUs; its error is larger by nature, so it is measured on sigmoid probabilities -- the
quantity the thresholds apply to -- against its own looser `fp16_tolerance` (2e-2 by default: well
below the spacing of any threshold in a manifest). It is recorded in the manifest either way.

The INT8 variant (static QDQ, for the CPU; training/quantize.py) is written when calibration films are
given: the model's training films, preprocessed, never test films. It is checked against the FP32 file on
those films and its calibration recorded in the manifest (`export.int8`). `add_int8` does the same for a
model folder exported before.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.transformers.float16 import convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel
from torch import Tensor, nn

from service.models.fusion import ScoreFusion
from service.models.input_spec import InputSpec
from service.models.manifest import (
    ClassificationThresholds,
    Manifest,
    ModelInput,
    SegmentationThresholds,
    TrainingInfo,
    load_manifest,
    sha256_file,
    write_manifest,
)
from service.models.manifest import input_spec as manifest_input_spec
from service.models.networks import Classifier, UNet
from service.models.networks.encoder import OUTPUT_STRIDE, require_int
from service.models.ood import FEATURES_OUTPUT
from training.ood import OodFilms, statistics_for
from training.quantize import (
    INT8_FILE,
    INT8_TOLERANCE,
    calibration_batch,
    int8_variant,
    quantize_model_dir,
)

# --- ONNX export of the networks (here, not beside the networks: serving never exports) ---
# ONNX export of the networks with a dynamic batch axis.
#
# Why ONNX: the serving install runs models through ONNX Runtime and must not depend on torch.
#
# Why the TorchScript-based exporter (`dynamo=False`): for these purely convolutional graphs it produces the
# same operators as the dynamo exporter, is several times faster (which matters for the CPU-only tests) and
# takes `dynamic_axes` directly. Height and width are fixed at export time (the service resizes to the
# training resolution anyway); only the batch axis is dynamic.

INPUT_NAME = "image"
OPSET = 17
FEATURES = FEATURES_OUTPUT  # a classifier's second output: its pooled encoder features (service/models/ood.py)


class _LogitAndMask(nn.Module):
    """Adapter exporting a multi-task classifier's two outputs (logit, mask_logits)."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        return self.classifier.forward_with_mask(image)


class _LogitAndFeatures(nn.Module):
    """Adapter exporting a classifier's logit and its pooled encoder features (for the OOD distance)."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        return self.classifier.forward_with_features(image)


def export_onnx(
    model: UNet | Classifier,
    path: str | os.PathLike[str],
    image_size: int | tuple[int, int],
    *,
    include_mask: bool = False,
    opset: int = OPSET,
    include_features: bool = False,
) -> list[str]:
    """Export `model` (in eval mode) to a self-contained ONNX file; return the output names.

    Input: ``image`` float32 (batch, in_channels, H, W). Outputs:

    * UNet: ``mask_logits`` (batch, 1, H, W);
    * Classifier: ``logit`` (batch,), plus ``mask_logits`` when ``include_mask=True`` (needs the auxiliary
      head; useful for inspecting what the classifier looked at, never needed for triage), or ``features``
      (batch, C), the pooled encoder features, when ``include_features=True`` (the OOD distance reads them).
      The logit is always the first output: every reader of the file takes it by position.

    The model is switched to eval mode (BatchNorm running statistics, no dropout) and left in it.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    for name, side in (("height", height), ("width", width)):
        require_int(f"image {name}", side, OUTPUT_STRIDE)
        if side % OUTPUT_STRIDE:
            raise ValueError(f"image {name} must be a multiple of {OUTPUT_STRIDE}, got {side}")
    require_int("opset", opset, 17)
    if isinstance(model, UNet):
        module: nn.Module = model
        outputs = ["mask_logits"]
    elif isinstance(model, Classifier):
        if include_mask and model.aux_head is None:
            raise ValueError("include_mask=True needs a Classifier built with aux_segmentation=True")
        if include_mask and include_features:
            raise ValueError("include_mask and include_features: one extra output at a time")
        module = _LogitAndMask(model) if include_mask else _LogitAndFeatures(model) if include_features else model
        outputs = ["logit", "mask_logits"] if include_mask else ["logit", FEATURES] if include_features else ["logit"]
    else:
        raise ValueError(f"model must be a UNet or a Classifier, got {type(model).__name__}")
    if (include_mask or include_features) and isinstance(model, UNet):
        raise ValueError("include_mask and include_features apply to a Classifier only; a UNet outputs mask_logits")
    # Eval mode on the exported module itself (not only `model`): the exporter restores the top module's
    # mode afterwards, and a wrapper left in train mode would switch `model` back to training.
    module.eval()
    example = torch.zeros(2, model.encoder.in_channels, height, width)
    dynamic_axes = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter announces its own deprecation on every call; the export is still exact.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            module,
            (example,),
            os.fspath(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
        )
    return outputs


FILES = {"onnx": "model.onnx", "onnx_fp16": "model.fp16.onnx", "checkpoint": "model.pt"}
CHECK_BATCH_SIZES = (1, 3)
FP16_TOLERANCE = 2e-2


class ExportCheckError(RuntimeError):
    """The exported file does not compute what the PyTorch model computes."""


def _batches(random: np.ndarray, real: np.ndarray | None) -> Iterator[tuple[str, np.ndarray]]:
    """Batches of 1 and 3 from the random inputs, then every real input (first alone, the rest in threes)."""
    yield "random, batch 1", random[:1]
    yield "random, batch 3", random[:3]
    if real is not None:
        yield "real, batch 1", real[:1]
        for start in range(0, len(real), 3):
            yield f"real, images {start}-{min(start + 3, len(real)) - 1}", real[start : start + 3]


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = min(4, os.cpu_count() or 1)
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def _outputs(model: torch.nn.Module, batch: np.ndarray, names: list[str]) -> list[np.ndarray]:
    """PyTorch's outputs for `batch`, in the order of the ONNX file's `names` (logit first)."""
    with torch.no_grad():
        image = torch.from_numpy(batch)
        if FEATURES in names:
            return [tensor.numpy() for tensor in model.forward_with_features(image)]
        return [model(image).numpy()]


def _compare(
    model: torch.nn.Module, path: Path, batches: list[tuple[str, np.ndarray]], probabilities: bool
) -> tuple[float, float, str]:
    """(max |ORT - torch|, max |torch|, the batch where the error peaked) over `batches` and every output of the
    file (the logit and, where exported, the pooled features); with `probabilities`, the logit's sigmoid only."""
    session = _session(path)
    names = [output.name for output in session.get_outputs()]
    if probabilities:
        names = names[:1]
    worst, scale, where = 0.0, 0.0, ""
    for label, batch in batches:
        actuals = session.run(names, {INPUT_NAME: batch})
        for name, expected, actual in zip(names, _outputs(model, batch, names), actuals, strict=True):
            if actual.shape != expected.shape or actual.dtype != np.float32:
                raise ExportCheckError(
                    f"{path.name} ({label}, {name}): ONNX Runtime returned {actual.dtype} {actual.shape}, "
                    f"PyTorch float32 {expected.shape}"
                )
            if probabilities:
                expected, actual = 1 / (1 + np.exp(-expected)), 1 / (1 + np.exp(-actual))
            error = float(np.max(np.abs(actual.astype(np.float64) - expected)))
            if not np.isfinite(error):
                raise ExportCheckError(f"{path.name} ({label}, {name}): non-finite output from ONNX Runtime")
            if error >= worst:
                worst, where = error, f"{label}, {name}"
            scale = max(scale, float(np.max(np.abs(expected))))
    return worst, scale, where


def _check_real_inputs(real_inputs: Any, spec: InputSpec) -> np.ndarray | None:
    if real_inputs is None:
        return None
    real = np.asarray(real_inputs)
    expected = (spec.channels, spec.size, spec.size)
    if real.ndim != 4 or real.shape[1:] != expected or len(real) == 0:
        raise ValueError(f"real_inputs must be (N >= 1, {', '.join(map(str, expected))}), got {real.shape}")
    if real.dtype != np.float32 or not np.isfinite(real).all():
        raise ValueError(f"real_inputs must be finite float32 (preprocessed images), got {real.dtype}")
    return np.ascontiguousarray(real)


def _write_fp16(source: Path, target: Path) -> None:
    """FP16 weights and compute with float32 I/O; nodes re-sorted (the converter appends its input Casts
    after their consumers, which onnx.checker and TensorRT's parser reject)."""
    converted = OnnxModel(convert_float_to_float16(onnx.load(os.fspath(source)), keep_io_types=True))
    converted.topological_sort()
    onnx.checker.check_model(converted.model, full_check=True)
    onnx.save(converted.model, os.fspath(target))


def _model_input(spec: InputSpec) -> ModelInput:
    return ModelInput(size=spec.size, mean=spec.mean, std=spec.std, channels=spec.channels, name=INPUT_NAME,
                      layout="NCHW")


def add_int8(model_dir: str | os.PathLike[str], calibration_films: list[Path], description: str, *,
             replace: bool = False, tolerance: float = INT8_TOLERANCE) -> Manifest:
    """Add the INT8 variant to an exported model folder, calibrated on `calibration_films` (training DICOMs).

    The films go through the service's reader and preprocessing at the model's own input spec; the manifest
    gains the `onnx_int8` file, its sha256 and `export.int8` (see training/quantize.py).
    """
    inputs = calibration_batch(calibration_films, manifest_input_spec(load_manifest(model_dir)))
    return quantize_model_dir(Path(model_dir), inputs, description, replace=replace, tolerance=tolerance)


def export_model(
    model: UNet | Classifier,
    out_dir: str | os.PathLike[str],
    *,
    name: str,
    version: str,
    task: str,
    input_spec: InputSpec,
    thresholds: Mapping[str, Any] | ClassificationThresholds | SegmentationThresholds,
    training_info: Mapping[str, Any] | TrainingInfo,
    metrics: Mapping[str, Any],
    intended_use: str,
    created: str,
    tolerance: float = 1e-4,
    real_inputs: np.ndarray | None = None,
    fp16_tolerance: float = FP16_TOLERANCE,
    seed: int = 0,
    calibration_inputs: np.ndarray | None = None,
    calibration_description: str | None = None,
    int8_tolerance: float = INT8_TOLERANCE,
    ood_films: OodFilms | None = None,
    fusion: ScoreFusion | None = None,
) -> Manifest:
    """Export, check and write `model` into `out_dir` (conventionally ``models/<name>/<version>``).

    `out_dir` must not exist or be empty: a released model is never overwritten. Files are written to a
    sibling temporary folder and moved into place only after every check passed. Raises ValueError for
    bad arguments and ExportCheckError when ONNX Runtime disagrees with PyTorch beyond the tolerances.
    Classifiers are exported with two outputs, `logit` and `features` (pooled encoder features); with
    `ood_films` the manifest's `ood` section is fitted on the exported file's features (training/ood.py), and
    `fusion` (training/fusion.py) is stored as given. With `calibration_inputs` ((N, C, S, S) float32
    preprocessed training films) and their `calibration_description`, `model.int8.onnx` is written too
    (see training/quantize.py); an INT8 error above `int8_tolerance` refuses the whole export.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not empty: refusing to overwrite a model")
    expected_type = {"classification": Classifier, "segmentation": UNet}.get(task)
    if expected_type is None:
        raise ValueError(f"task must be 'classification' or 'segmentation', got {task!r}")
    if not isinstance(model, expected_type):
        raise ValueError(f"a {task} model must be a {expected_type.__name__}, got {type(model).__name__}")
    if model.encoder.in_channels != input_spec.channels:
        raise ValueError(
            f"input_spec has {input_spec.channels} channel(s) but the model takes {model.encoder.in_channels}"
        )
    if not (tolerance >= 0 and fp16_tolerance >= 0):
        raise ValueError(f"tolerances must be >= 0, got {tolerance!r} and {fp16_tolerance!r}")
    if (calibration_inputs is None) != (calibration_description is None):
        raise ValueError("calibration_inputs and calibration_description go together (the INT8 variant needs both)")
    if task != "classification" and (ood_films is not None or fusion is not None):
        raise ValueError("ood_films and fusion describe a classifier: a segmenter has neither")
    # Validate the cheap parts before the expensive export, so a typo fails in milliseconds.
    threshold_type = ClassificationThresholds if task == "classification" else SegmentationThresholds
    thresholds = threshold_type.model_validate(thresholds)
    training_info = TrainingInfo.model_validate(training_info)
    real = _check_real_inputs(real_inputs, input_spec)

    model.eval()
    shape = (max(CHECK_BATCH_SIZES), input_spec.channels, input_spec.size, input_spec.size)
    random = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    batches = list(_batches(random, real))

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        outputs = export_onnx(model, staging / FILES["onnx"], input_spec.size, include_mask=False, opset=OPSET,
                              include_features=task == "classification")
        max_abs, scale, where = _compare(model, staging / FILES["onnx"], batches, probabilities=False)
        max_rel = max_abs / scale if scale > 0 else max_abs
        if max_abs > tolerance * max(1.0, scale):
            raise ExportCheckError(
                f"{FILES['onnx']}: ONNX Runtime differs from PyTorch by {max_abs:.3g} (max abs, logits, worst on "
                f"{where}), {max_rel:.3g} relative to max |PyTorch output| {scale:.3g}; tolerance {tolerance:g}: "
                "refusing the export"
            )
        _write_fp16(staging / FILES["onnx"], staging / FILES["onnx_fp16"])
        fp16_error, _, fp16_where = _compare(model, staging / FILES["onnx_fp16"], batches, probabilities=True)
        if fp16_error > fp16_tolerance:
            raise ExportCheckError(
                f"{FILES['onnx_fp16']}: FP16 probabilities differ from PyTorch by {fp16_error:.3g} (max abs, worst "
                f"on {fp16_where}); fp16_tolerance {fp16_tolerance:g}: refusing the export"
            )
        files = dict(FILES)
        int8 = None
        if calibration_inputs is not None and calibration_description is not None:
            int8 = int8_variant(staging / FILES["onnx"], staging / INT8_FILE, calibration_inputs,
                                _model_input(input_spec), calibration_description, int8_tolerance)
            files["onnx_int8"] = INT8_FILE
        ood = None if ood_films is None else statistics_for(staging / FILES["onnx"], ood_films)
        torch.save(model.state_dict(), staging / FILES["checkpoint"])

        manifest = Manifest(
            name=name,
            version=version,
            task=task,
            files=files,
            sha256={filename: sha256_file(staging / filename) for filename in files.values()},
            input=_model_input(input_spec),
            outputs=outputs,
            thresholds=thresholds,
            training=training_info,
            metrics=dict(metrics),
            export={
                "opset": OPSET,
                "exporter": f"torch {torch.__version__} torch.onnx.export(dynamo=False); FP16 by onnxruntime "
                f"{ort.__version__} convert_float_to_float16(keep_io_types=True)",
                "tolerance": tolerance,
                "max_abs_error": max_abs,
                "max_rel_error": max_rel,
                "fp16_tolerance": fp16_tolerance,
                "fp16_max_abs_error": fp16_error,
                "checked_batch_sizes": sorted({len(batch) for _, batch in batches}),
                "real_inputs_checked": 0 if real is None else len(real),
                "int8": int8,
            },
            intended_use=intended_use,
            created=created,
            ood=ood,
            fusion=fusion,
        )
        write_manifest(manifest, staging)
        staging.chmod(0o755)  # mkdtemp makes it private; a model folder is read by the service's user
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest
