"""The numbers of a held-out evaluation of the whole cascade, and the report that presents them.

The lead's evaluation run produces a `CascadeOutputs`; `summarise` turns it into a JSON-ready dict (pure
numpy, no matplotlib, so it runs wherever the metrics do), and `write_report` writes that dict as
``report.json`` beside a ``report.md`` page whose figures `training.report_plots` draws.

Conventions follow `training.metrics`: an image is flagged when ``score >= threshold``; an undefined ratio
(no positives, no predicted positives) is ``None`` in the summary -- ``nan`` is not valid JSON, and a
report must show an undefined metric as undefined, never as 0 or 1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.cascade_outputs import CascadeOutputs
from training.metrics import (
    confusion_counts,
    dice_per_image,
    expected_calibration_error,
    roc_auc,
)

#: Quantiles of the per-image Dice on positives reported in the summary.
DICE_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
#: Reliability bins: ten, the usual choice, and the one `expected_calibration_error` is quoted with here.
CALIBRATION_BINS = 10
#: Two-sided 95 % normal quantile, for the Wilson intervals.
_Z95 = 1.959963984540054


def _num(value: float | int | np.generic) -> float | None:
    """A JSON-ready float: nan becomes None (undefined), numpy scalars become Python floats."""
    value = float(value)
    return None if math.isnan(value) else value


def wilson_interval(successes: int, trials: int, z: float = _Z95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion; None with no trials.

    Why Wilson and not p ± z·se: held-out sets hold few positives and sensitivity sits near 1, where the
    normal interval overshoots 1 and collapses to a point at 100 %.
    """
    if trials == 0:
        return None
    p = successes / trials
    z2n = z * z / trials
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z / (1.0 + z2n) * math.sqrt(p * (1.0 - p) / trials + z2n / (4.0 * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def _interval(successes: int, trials: int) -> list[float] | None:
    bounds = wilson_interval(successes, trials)
    return None if bounds is None else [bounds[0], bounds[1]]


def _auc_or_none(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """AUC, or None when the set holds a single class (the AUC is undefined, not an error of the report)."""
    if labels.all() or not labels.any():
        return None
    return roc_auc(scores, labels)


def reliability_table(probs: np.ndarray, labels: np.ndarray, n_bins: int = CALIBRATION_BINS) -> list[dict[str, Any]]:
    """One row per equal-width bin, binned exactly as `expected_calibration_error` bins (last bin closed).

    Empty bins keep their row (count 0, means None) so the table always has `n_bins` rows.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.float64)
    bins = np.minimum((probs * n_bins).astype(np.int64), n_bins - 1)
    rows = []
    for b in range(n_bins):
        members = bins == b
        count = int(members.sum())
        rows.append(
            {
                "lower": b / n_bins,
                "upper": (b + 1) / n_bins,
                "count": count,
                "mean_score": float(probs[members].mean()) if count else None,
                "positive_rate": float(labels[members].mean()) if count else None,
            }
        )
    return rows


def _dice_block(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], positive: np.ndarray) -> dict[str, Any]:
    """SIIM mean Dice (empty-empty = 1), Dice on positive masks and its distribution."""
    per_image = dice_per_image(preds, truths)
    on_pos = per_image[positive]
    block: dict[str, Any] = {
        "mean_dice": float(per_image.mean()),
        "mean_dice_negative": _num(per_image[~positive].mean()) if (~positive).any() else None,
        "mean_dice_positive": _num(on_pos.mean()) if on_pos.size else None,
        "positive_quantiles": {f"{q:g}": float(np.quantile(on_pos, q)) for q in DICE_QUANTILES}
        if on_pos.size
        else None,
        # A Dice of exactly 0 on a positive is a lesion not drawn at all (or drawn entirely elsewhere).
        "positive_zero_share": float((on_pos == 0.0).mean()) if on_pos.size else None,
    }
    return block


def _jsonable(value: Any, where: str) -> Any:
    """Deep copy of `info` with numpy scalars/arrays and paths made JSON types; anything else is an error."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist(), where)
    if isinstance(value, np.generic):
        return _jsonable(value.item(), where)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if value is None or isinstance(value, (str, int, bool)):
        return value
    raise TypeError(f"{where} is a {type(value).__name__}, which the JSON report cannot hold")


def summarise(outputs: CascadeOutputs) -> dict[str, Any]:
    """All the report's numbers as a JSON-ready dict (Python floats/ints/None only).

    Sections: counts, triage (AUC and the operating point), gate, calibration, segmentation (``cascade``
    and, only when given, ``cascade_no_tta`` plus ``tta_gain``), triplet, info.
    """
    labels = outputs.label_array
    scores = np.asarray(outputs.scores, dtype=np.float64)
    classifier = np.asarray(outputs.classifier_scores, dtype=np.float64)
    gated = np.asarray(outputs.gated, dtype=bool)
    has_mask = np.array([np.asarray(t).any() for t in outputs.masks_true], dtype=bool)
    n, n_pos = labels.size, int(labels.sum())

    cc = confusion_counts(scores, labels, outputs.threshold)
    operating_point = {
        "threshold": float(outputs.threshold),
        "target_sensitivity": float(outputs.target_sensitivity),
        "tp": cc.tp,
        "fp": cc.fp,
        "tn": cc.tn,
        "fn": cc.fn,
        "sensitivity": _num(cc.sensitivity),
        "sensitivity_ci95": _interval(cc.tp, cc.tp + cc.fn),
        "specificity": _num(cc.specificity),
        "specificity_ci95": _interval(cc.tn, cc.tn + cc.fp),
        "precision": _num(cc.precision),
        "f1": _num(cc.f1),
        "f2": _num(cc.f2),
        "flagged_share": (cc.tp + cc.fp) / n,
    }
    triage: dict[str, Any] = {"auc": _auc_or_none(scores, labels), "operating_point": operating_point}
    if not np.array_equal(scores, classifier):
        triage["classifier_auc"] = _auc_or_none(classifier, labels)

    gate_tp = int((gated & labels).sum())
    gate = {
        "threshold": float(outputs.gate_threshold),
        "gated": int(gated.sum()),
        "gated_share": float(gated.mean()),
        # The share of segmenter runs the gate saves compared with segmenting every image.
        "saved_share": float(1.0 - gated.mean()),
        "sensitivity": _num(gate_tp / n_pos) if n_pos else None,
        "positives_not_gated": n_pos - gate_tp,
        "negatives_gated": int((gated & ~labels).sum()),
    }

    calibration = {
        "ece": expected_calibration_error(scores, labels, n_bins=CALIBRATION_BINS),
        "n_bins": CALIBRATION_BINS,
        "table": reliability_table(scores, labels, CALIBRATION_BINS),
    }

    segmentation: dict[str, Any] = {"cascade": _dice_block(outputs.masks_pred, outputs.masks_true, has_mask)}
    if outputs.masks_pred_no_tta is not None:
        no_tta = _dice_block(outputs.masks_pred_no_tta, outputs.masks_true, has_mask)
        segmentation["cascade_no_tta"] = no_tta
        segmentation["tta_gain"] = segmentation["cascade"]["mean_dice"] - no_tta["mean_dice"]

    return {
        "counts": {
            "images": n,
            "positives": n_pos,
            "negatives": n - n_pos,
            "prevalence": n_pos / n,
            "positive_masks": int(has_mask.sum()),
            # Label says lesion but the evaluation-resolution mask is empty, or the reverse.
            "label_mask_disagreements": int((has_mask != labels).sum()),
        },
        "triage": triage,
        "gate": gate,
        "calibration": calibration,
        "segmentation": segmentation,
        "triplet": {
            "top_score": float(outputs.triplet.top_score),
            "min_area": int(outputs.triplet.min_area),
            "bottom_score": float(outputs.triplet.bottom_score),
        },
        "info": _jsonable(dict(outputs.info), "info"),
    }


def select_examples(outputs: CascadeOutputs, per_kind: int = 3) -> dict[str, list[int]]:
    """Indices of the images shown in the overlay grid, by triage outcome at the operating point.

    Why these: false negatives with the lowest scores and false positives with the highest are the
    cascade's most confident mistakes, the ones a reader must see; true positives span the Dice range
    (best, median, worst, ...) so the grid shows how well found lesions are drawn, not only the easy ones.
    """
    if per_kind < 1:
        raise ValueError(f"per_kind must be >= 1, got {per_kind!r}")
    labels, flagged = outputs.label_array, outputs.flagged
    scores = np.asarray(outputs.scores, dtype=np.float64)
    tp = np.flatnonzero(labels & flagged)
    fn = np.flatnonzero(labels & ~flagged)
    fp = np.flatnonzero(~labels & flagged)
    tp_dice = dice_per_image([outputs.masks_pred[i] for i in tp], [outputs.masks_true[i] for i in tp])
    tp_sorted = tp[np.argsort(-tp_dice, kind="mergesort")]
    if tp_sorted.size > per_kind:
        picks = np.unique(np.round(np.linspace(0, tp_sorted.size - 1, per_kind)).astype(int))
        tp_sorted = tp_sorted[picks]
    return {
        "true_positive": [int(i) for i in tp_sorted],
        "false_negative": [int(i) for i in fn[np.argsort(scores[fn], kind="mergesort")][:per_kind]],
        "false_positive": [int(i) for i in fp[np.argsort(-scores[fp], kind="mergesort")][:per_kind]],
    }


def write_report(
    outputs: CascadeOutputs, summary: Mapping[str, Any], out_dir: str | Path, title: str
) -> tuple[Path, Path]:
    """Write ``report.json`` (the summary, verbatim), ``report.md`` and its PNG figures into `out_dir`.

    The summary is passed in rather than recomputed so the caller can log or compare it first and the
    report shows exactly those numbers. matplotlib is imported here, not at module level, so `summarise`
    works without it.
    """
    from training.report_markdown import render_markdown
    from training.report_plots import draw_figures

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "report.json"
    json_path.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    figures = draw_figures(outputs, summary, out, select_examples(outputs))
    md_path = out / "report.md"
    md_path.write_text(render_markdown(summary, figures, title), encoding="utf-8")
    return json_path, md_path
