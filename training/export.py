"""Export a trained network as a model-repository entry: ONNX + FP16 ONNX + state dict + manifest.json.

Why check numerically: an ONNX file that loads is not an ONNX file that computes what was validated.
Every export is run through ONNX Runtime (CPU) and compared with the PyTorch model in eval mode, on random
inputs and, when given, on real preprocessed radiographs, at batch sizes 1 and 3 (the batch axis is
dynamic, and a graph that bakes in the example batch size only shows it at another size). An export whose
error exceeds `tolerance` is refused, and nothing is written to `out_dir`.

Errors are measured on the raw outputs (logits): `max_abs_error` = max |ORT - PyTorch|, and
`max_rel_error` = max_abs_error / max |PyTorch output| over all checked batches. The export passes when
either is within `tolerance`, i.e. ``max_abs_error <= tolerance * max(1, max |PyTorch output|)``: absolute
for outputs of magnitude up to 1, relative beyond (large logits carry proportionally larger float error).

The FP16 variant (float16 weights and arithmetic, float32 input and output so callers never handle
float16) is for GPUs; its error is larger by nature, so it is measured on sigmoid probabilities -- the
quantity the thresholds apply to -- against its own looser `fp16_tolerance` (2e-2 by default: well
below the spacing of any threshold in a manifest). It is recorded in the manifest either way.
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

from service.models.input_spec import InputSpec
from service.models.manifest import (
    ClassificationThresholds,
    Manifest,
    SegmentationThresholds,
    TrainingInfo,
    sha256_file,
    write_manifest,
)
from service.models.networks import Classifier, UNet
from service.models.networks.encoder import OUTPUT_STRIDE, require_int

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


class _LogitAndMask(nn.Module):
    """Adapter exporting a multi-task classifier's two outputs (logit, mask_logits)."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        return self.classifier.forward_with_mask(image)


def export_onnx(
    model: UNet | Classifier,
    path: str | os.PathLike[str],
    image_size: int | tuple[int, int],
    *,
    include_mask: bool = False,
    opset: int = OPSET,
) -> list[str]:
    """Export `model` (in eval mode) to a self-contained ONNX file; return the output names.

    Input: ``image`` float32 (batch, in_channels, H, W). Outputs:

    * UNet: ``mask_logits`` (batch, 1, H, W);
    * Classifier: ``logit`` (batch,), plus ``mask_logits`` when ``include_mask=True`` (needs the auxiliary
      head; useful for inspecting what the classifier looked at, never needed for triage).

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
        module = _LogitAndMask(model) if include_mask else model
        outputs = ["logit", "mask_logits"] if include_mask else ["logit"]
    else:
        raise ValueError(f"model must be a UNet or a Classifier, got {type(model).__name__}")
    if include_mask and isinstance(model, UNet):
        raise ValueError("include_mask applies to a Classifier only; a UNet always outputs mask_logits")
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


def _compare(
    model: torch.nn.Module, path: Path, batches: list[tuple[str, np.ndarray]], probabilities: bool
) -> tuple[float, float, str]:
    """(max |ORT - torch|, max |torch|, the batch where the error peaked) over `batches`."""
    session = _session(path)
    worst, scale, where = 0.0, 0.0, ""
    for label, batch in batches:
        with torch.no_grad():
            expected = model(torch.from_numpy(batch)).numpy()
        (actual,) = session.run(None, {INPUT_NAME: batch})
        if actual.shape != expected.shape or actual.dtype != np.float32:
            raise ExportCheckError(
                f"{path.name} ({label}): ONNX Runtime returned {actual.dtype} {actual.shape}, "
                f"PyTorch float32 {expected.shape}"
            )
        if probabilities:
            expected, actual = 1 / (1 + np.exp(-expected)), 1 / (1 + np.exp(-actual))
        error = float(np.max(np.abs(actual.astype(np.float64) - expected)))
        if not np.isfinite(error):
            raise ExportCheckError(f"{path.name} ({label}): non-finite output from ONNX Runtime")
        if error >= worst:
            worst, where = error, label
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
) -> Manifest:
    """Export, check and write `model` into `out_dir` (conventionally ``models/<name>/<version>``).

    `out_dir` must not exist or be empty: a released model is never overwritten. Files are written to a
    sibling temporary folder and moved into place only after every check passed. Raises ValueError for
    bad arguments and ExportCheckError when ONNX Runtime disagrees with PyTorch beyond the tolerances.
    Classifiers are exported with the logit output only.
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
        outputs = export_onnx(model, staging / FILES["onnx"], input_spec.size, include_mask=False, opset=OPSET)
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
        torch.save(model.state_dict(), staging / FILES["checkpoint"])

        manifest = Manifest(
            name=name,
            version=version,
            task=task,
            files=dict(FILES),
            sha256={filename: sha256_file(staging / filename) for filename in FILES.values()},
            input={
                "size": input_spec.size,
                "mean": input_spec.mean,
                "std": input_spec.std,
                "channels": input_spec.channels,
                "name": INPUT_NAME,
                "layout": "NCHW",
            },
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
            },
            intended_use=intended_use,
            created=created,
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
