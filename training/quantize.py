"""INT8 models for the CPU: static QDQ quantisation by ONNX Runtime, calibrated on training films, checked.

Why static quantisation: the activations' ranges are measured once, on films, so every convolution runs on
ONNX Runtime's integer kernels (QLinearConv) with no range computed at run time; on this CPU (AVX-512 VNNI)
that is 1.6-1.8x the FP32 speed of the demo models and about 3x that of ResNet-34 models at 512²
(load_tests/bench_int8.py). Why the QDQ format: the graph stays a plain ONNX graph
with QuantizeLinear / DequantizeLinear pairs that ONNX Runtime fuses into integer kernels itself.

The settings, and why (measured on the demo models and the 600-film synthetic test set; docs/models.md):

* per-channel INT8 weights, UINT8 activations (U8S8): VNNI's multiply-add takes exactly u8 x s8, and with
  INT8 activations ONNX Runtime ran the demo classifier 2x slower than with UINT8;
* MinMax calibration, the simplest: Percentile (99.99) or moving-average ranges, or the first convolution
  and the head left in FP32, kept AUC and Dice on positives within 0.002 of FP32 just as MinMax does (and
  the last cost about 30 % of the speed);
* every Conv and Gemm quantised;
* `quant_pre_process` first (shape inference and graph optimisation, as ONNX Runtime recommends), without
  symbolic shape inference, which stops on the U-Net ("Incomplete symbolic shape inference").

Calibration films are training films (e.g. `python -m training synth` with the training seed), decoded by the
service's reader and preprocessed by its `to_batch`: the very inputs the model is served. Never test films:
the INT8 model is judged on those. The check at export compares the INT8 and FP32 files' sigmoid outputs on
the calibration films; `compare_precisions` compares the two cascades on a held-out set (AUC, Dice).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from service.cascade import rle
from service.cascade.in_process import Cascade
from service.cascade.preprocess import to_batch
from service.imaging.reader import read_radiograph
from service.models import manifest as manifests
from service.models.backends.factory import load_backend
from service.models.input_spec import InputSpec
from service.models.manifest import INT8_ROLE, Int8Calibration, Int8Info, Manifest
from training.data import Sample
from training.metrics import dice, mean_dice_positive, roc_auc

CALIBRATION_FILMS = 128  # the demo's training films whose activations set the INT8 ranges (demo, refit-demo)

INT8_FILE = "model.int8.onnx"
CALIBRATION_METHOD = CalibrationMethod.MinMax
ACTIVATION_TYPE = QuantType.QUInt8
WEIGHT_TYPE = QuantType.QInt8
PER_CHANNEL = True
CALIBRATION_BATCH = 8
#: Largest mean |p_int8 - p_fp32| accepted on the calibration films. The demo models give 0.006 (classifier)
#: and 0.0004 (segmenter, mostly empty maps); a calibration on the wrong inputs gives several times more.
INT8_TOLERANCE = 0.02


class QuantizationCheckError(RuntimeError):
    """The INT8 file is further from the FP32 file than its tolerance allows: it is not written."""


class _Films(CalibrationDataReader):
    """The calibration batch in slices of `CALIBRATION_BATCH`, as ONNX Runtime's calibrator reads them."""

    def __init__(self, inputs: np.ndarray, input_name: str) -> None:
        self._slices = iter([{input_name: inputs[start:start + CALIBRATION_BATCH]}
                             for start in range(0, len(inputs), CALIBRATION_BATCH)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._slices, None)


def calibration_batch(films: Sequence[Path], spec: InputSpec) -> np.ndarray:
    """Films (DICOM files) → the (N, C, S, S) float32 model input, through the service's reader and preprocess."""
    if not films:
        raise ValueError("calibration needs at least one film")
    return to_batch([read_radiograph(path).pixels for path in films], spec)


def fingerprint(inputs: np.ndarray) -> str:
    """sha256 of the float32 calibration batch and its shape: the same films, preprocessed the same way."""
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    digest = hashlib.sha256(repr(inputs.shape).encode())
    digest.update(inputs.tobytes())
    return f"sha256:{digest.hexdigest()}"


def _check_inputs(inputs: np.ndarray, model_input: Any) -> np.ndarray:
    expected = (model_input.channels, model_input.size, model_input.size)
    inputs = np.asarray(inputs)
    if inputs.ndim != 4 or inputs.shape[1:] != expected or len(inputs) == 0:
        raise ValueError(f"calibration inputs must be (N >= 1, {', '.join(map(str, expected))}), got {inputs.shape}")
    if inputs.dtype != np.float32 or not np.isfinite(inputs).all():
        raise ValueError(f"calibration inputs must be finite float32 (preprocessed films), got {inputs.dtype}")
    return np.ascontiguousarray(inputs)


def quantize_onnx(fp32_path: Path, out_path: Path, inputs: np.ndarray, input_name: str = "image") -> None:
    """Write the static QDQ INT8 version of `fp32_path` to `out_path`, ranges measured on `inputs`."""
    with tempfile.TemporaryDirectory(prefix="ptx-quantize-") as work:
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(os.fspath(fp32_path), os.fspath(prepared), skip_symbolic_shape=True)
        quantize_static(os.fspath(prepared), os.fspath(out_path), _Films(inputs, input_name),
                        quant_format=QuantFormat.QDQ, per_channel=PER_CHANNEL, activation_type=ACTIVATION_TYPE,
                        weight_type=WEIGHT_TYPE, calibrate_method=CALIBRATION_METHOD)


def _probabilities(path: Path, inputs: np.ndarray, input_name: str) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = min(4, os.cpu_count() or 1)
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    logits = np.concatenate([session.run(None, {input_name: inputs[start:start + CALIBRATION_BATCH]})[0]
                             for start in range(0, len(inputs), CALIBRATION_BATCH)])
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


def probability_errors(fp32_path: Path, int8_path: Path, inputs: np.ndarray,
                       input_name: str = "image") -> tuple[float, float]:
    """(max, mean) |p_int8 - p_fp32| over every output value, p the sigmoid the thresholds apply to."""
    difference = np.abs(_probabilities(int8_path, inputs, input_name) - _probabilities(fp32_path, inputs, input_name))
    return float(difference.max()), float(difference.mean())


def int8_variant(fp32_path: Path, out_path: Path, inputs: np.ndarray, model_input: Any, description: str,
                 tolerance: float = INT8_TOLERANCE) -> Int8Info:
    """Quantise `fp32_path` into `out_path`, check it against FP32 on `inputs`, and say how (for the manifest).

    Raises QuantizationCheckError, removing `out_path`, when the mean probability error exceeds `tolerance`.
    """
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    if not description.strip():
        raise ValueError("description must say which films calibrated the model (a training set, never a test set)")
    inputs = _check_inputs(inputs, model_input)
    quantize_onnx(fp32_path, out_path, inputs, model_input.name)
    worst, mean = probability_errors(fp32_path, out_path, inputs, model_input.name)
    if not (np.isfinite(mean) and mean <= tolerance):
        Path(out_path).unlink(missing_ok=True)
        raise QuantizationCheckError(
            f"{Path(out_path).name}: INT8 probabilities differ from FP32 by {mean:.3g} on average (max {worst:.3g}) "
            f"over {len(inputs)} calibration films; tolerance {tolerance:g}: refusing the INT8 file"
        )
    return Int8Info(
        method=f"onnxruntime {ort.__version__} quantize_static after quant_pre_process(skip_symbolic_shape=True)",
        calibration_method=CALIBRATION_METHOD.name, activation_type=ACTIVATION_TYPE.name,
        weight_type=WEIGHT_TYPE.name, per_channel=PER_CHANNEL,
        calibration=Int8Calibration(description=description, films=len(inputs), fingerprint=fingerprint(inputs)),
        tolerance=tolerance, max_abs_error=worst, mean_abs_error=mean,
    )


def quantize_model_dir(model_dir: Path, inputs: np.ndarray, description: str, *, replace: bool = False,
                       tolerance: float = INT8_TOLERANCE) -> Manifest:
    """Add `model.int8.onnx` to an exported model folder and list it, with its hash, in the manifest.

    For models exported before INT8 existed (the bundled demo models); new exports do it in `export_model`.
    A folder that already lists an INT8 file is refused unless `replace`. The manifest is rewritten only
    after the INT8 file passed its check.
    """
    model_dir = Path(model_dir)
    manifest = manifests.load_manifest(model_dir)  # verifies every file first
    if INT8_ROLE in manifest.files and not replace:
        raise ValueError(f"{model_dir} already lists {manifest.files[INT8_ROLE]!r}: pass replace=True (--replace) "
                         "to redo it")
    staged = model_dir / f".{INT8_FILE}.partial"
    try:
        info = int8_variant(model_dir / manifest.files["onnx"], staged, inputs, manifest.input, description,
                            tolerance)
        old = manifest.files.get(INT8_ROLE)
        files = {**manifest.files, INT8_ROLE: INT8_FILE}
        digests = {name: value for name, value in manifest.sha256.items() if name != old}
        digests[INT8_FILE] = manifests.sha256_file(staged)
        updated = manifest.model_copy(update={
            "files": files, "sha256": digests, "export": manifest.export.model_copy(update={"int8": info})})
        staged.replace(model_dir / INT8_FILE)
        manifests.write_manifest(updated, model_dir)
    finally:
        staged.unlink(missing_ok=True)
    return manifests.load_manifest(model_dir)


@dataclass(frozen=True)
class PrecisionComparison:
    """The cascade at INT8 against itself at FP32, on the same films (see `compare_precisions`)."""

    films: int
    positives: int
    auc: tuple[float, float]  # (fp32, int8)
    dice_positive: tuple[float, float]
    max_score_difference: float
    mean_score_difference: float
    mask_dice: tuple[float, ...]  # per film with a mask at either precision: Dice(int8 mask, fp32 mask)
    decisions_agree: float  # share of films called the same at the operating point
    sensitivity: tuple[float, float]  # at the manifest's operating point (chosen on FP32 scores)
    specificity: tuple[float, float]

    @property
    def auc_delta(self) -> float:
        return self.auc[1] - self.auc[0]

    @property
    def dice_positive_delta(self) -> float:
        return self.dice_positive[1] - self.dice_positive[0]

    def summary(self) -> dict[str, float]:
        masks = np.asarray(self.mask_dice) if self.mask_dice else np.ones(1)
        return {"films": self.films, "positives": self.positives, "auc_fp32": self.auc[0], "auc_int8": self.auc[1],
                "auc_delta": self.auc_delta, "dice_positive_fp32": self.dice_positive[0],
                "dice_positive_int8": self.dice_positive[1], "dice_positive_delta": self.dice_positive_delta,
                "max_score_difference": self.max_score_difference,
                "mean_score_difference": self.mean_score_difference,
                "mask_dice_median": float(np.median(masks)), "mask_dice_mean": float(masks.mean()),
                "decisions_agree": self.decisions_agree, "sensitivity_fp32": self.sensitivity[0],
                "sensitivity_int8": self.sensitivity[1], "specificity_fp32": self.specificity[0],
                "specificity_int8": self.specificity[1]}


def cascade_at(classifier_dir: Path, segmenter_dir: Path, precision: str, threads: int = 0) -> Cascade:
    """The in-process cascade on the CPU with both models' files of `precision`, chosen by the service's factory."""
    entries = [(Path(directory), manifests.load_manifest(directory)) for directory in (classifier_dir, segmenter_dir)]
    (_, cls), (_, seg) = entries
    if cls.task != "classification" or seg.task != "segmentation":
        raise ValueError(f"expected a classifier and a segmenter, got {cls.task} and {seg.task}")
    classifier, segmenter = (load_backend(directory, manifest, "onnxruntime", intra_op_threads=threads,
                                          precision=precision) for directory, manifest in entries)
    return Cascade(classifier=classifier, classifier_spec=manifests.input_spec(cls), segmenter=segmenter,
                   segmenter_spec=manifests.input_spec(seg), gate=cls.thresholds.gate,
                   operating_point=cls.thresholds.operating_point, triplet=manifests.triplet(seg),
                   triplet_reference_size=seg.thresholds.min_area_reference_size)


def compare_precisions(classifier_dir: Path, segmenter_dir: Path, samples: Sequence[Sample], *,
                       low: str = "int8", reference: str = "fp32", chunk: int = 16,
                       threads: int = 0) -> PrecisionComparison:
    """The served cascade (TTA, gate, triplet) at `low` and at `reference` precision on the same films.

    Films are decoded once per chunk and run through both cascades, so memory stays at `chunk` full films.
    """
    cascades = [cascade_at(classifier_dir, segmenter_dir, precision, threads) for precision in (reference, low)]
    operating_point = cascades[0].operating_point
    labels: list[int] = []
    scores: tuple[list[float], list[float]] = ([], [])
    masks: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    truths: list[np.ndarray] = []
    pairs: list[float] = []
    for start in range(0, len(samples), chunk):
        batch = samples[start:start + chunk]
        films = [read_radiograph(sample.path).pixels for sample in batch]
        results = [cascade.run(films) for cascade in cascades]
        for sample, film, high, quantised in zip(batch, films, *results):
            truth = rle.decode_union(sample.rles, *film.shape)
            labels.append(int(truth.any()))
            if truth.any():
                truths.append(truth)
                masks[0].append(high.mask)
                masks[1].append(quantised.mask)
            scores[0].append(high.score)
            scores[1].append(quantised.score)
            if high.mask.any() or quantised.mask.any():
                pairs.append(dice(quantised.mask, high.mask))
    label_array = np.asarray(labels, dtype=bool)
    called = [np.asarray(values) >= operating_point for values in scores]
    difference = np.abs(np.asarray(scores[1]) - np.asarray(scores[0]))
    return PrecisionComparison(
        films=len(labels), positives=int(label_array.sum()),
        auc=(roc_auc(np.asarray(scores[0]), label_array.astype(int)),
             roc_auc(np.asarray(scores[1]), label_array.astype(int))),
        dice_positive=(mean_dice_positive(masks[0], truths), mean_dice_positive(masks[1], truths)),
        max_score_difference=float(difference.max()), mean_score_difference=float(difference.mean()),
        mask_dice=tuple(pairs), decisions_agree=float(np.mean(called[0] == called[1])),
        sensitivity=(float(called[0][label_array].mean()), float(called[1][label_array].mean())),
        specificity=(float((~called[0][~label_array]).mean()), float((~called[1][~label_array]).mean())))
