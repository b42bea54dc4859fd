"""The figures issue 16 asks of a fused score: AUC and specificity at sensitivity 0.90 / 0.95 / 0.98 with
bootstrap confidence intervals, ECE before and after, the share sent to the segmenter, and the ablation
(classifier alone, segmenter evidence alone, fused), all on one test set.

Why a percentile bootstrap over films: the specificity read off the ROC curve at a sensitivity depends on a few
positives near the threshold; resampling the films (both classes together, as the test set was drawn) shows
how much. The ablation's "alone" models are logistic fits on the validation evidence too, so every row is a
calibrated probability fitted the same way; ECE is measured after the prior shift to the test prevalence.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.models.fusion import prior_shift
from training.fusion import Evidence, fit_fusion, fit_logistic, fused_scores
from training.metrics import expected_calibration_error, roc_auc, roc_curve

SENSITIVITIES = (0.90, 0.95, 0.98)
BOOTSTRAP = 1000
_COLUMNS = {"classifier alone": [0], "segmenter evidence alone": [1, 2], "fused": [0, 1, 2]}


def specificity_at(scores: np.ndarray, labels: np.ndarray, sensitivity: float) -> float:
    """The best specificity among thresholds whose sensitivity is at least `sensitivity` (the ROC curve)."""
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(1 - fpr[tpr >= sensitivity].min())


def with_interval(statistic: Any, scores: np.ndarray, labels: np.ndarray, seed: int, draws: int) -> dict[str, Any]:
    """`statistic(scores, labels)` and its 95 % percentile bootstrap interval over films."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        pick = rng.integers(0, len(labels), len(labels))
        if 0 < labels[pick].sum() < len(pick):
            values.append(statistic(scores[pick], labels[pick]))
    low, high = np.percentile(values, [2.5, 97.5])
    return {"value": round(float(statistic(scores, labels)), 4), "ci95": [round(float(low), 4), round(float(high), 4)]}


def score_row(scores: np.ndarray, labels: np.ndarray, seed: int = 0, draws: int = BOOTSTRAP) -> dict[str, Any]:
    row = {"auc": with_interval(roc_auc, scores, labels, seed, draws)}
    for sensitivity in SENSITIVITIES:
        row[f"specificity_at_{sensitivity:.2f}"] = with_interval(
            lambda s, y, target=sensitivity: specificity_at(s, y, target), scores, labels, seed, draws)
    return row


def fusion_report(validation: Evidence, test: Evidence, seed: int = 0, draws: int = BOOTSTRAP) -> dict[str, Any]:
    """The ablation and operating-point table on `test`, every model fitted on `validation`."""
    test_prevalence = float(np.mean(test.labels))
    fusion = fit_fusion(validation, "validation films")
    report: dict[str, Any] = {"test_films": len(test), "test_positives": int(np.sum(test.labels)),
                              "gated_share": round(float(np.mean(test.gated)), 4), "ablation": {}}
    inputs_validation, inputs_test = validation.inputs(), test.inputs()
    for name, columns in _COLUMNS.items():
        coefficients, intercept = fit_logistic(inputs_validation[:, columns], validation.labels)
        fitted = 1 / (1 + np.exp(-(inputs_test[:, columns] @ coefficients + intercept)))
        shifted = np.array([prior_shift(p, fusion.training_prevalence, test_prevalence) for p in fitted])
        report["ablation"][name] = {**score_row(shifted, test.labels, seed, draws),
                                    "ece_after_prior_shift": round(expected_calibration_error(shifted, test.labels), 4)}
    report["ece_classifier_raw"] = round(expected_calibration_error(test.classifier_scores, test.labels), 4)
    report["classifier_raw"] = score_row(test.classifier_scores, test.labels, seed, draws)
    called = fused_scores(fusion, test) >= fusion.operating_point  # the validation-chosen point, on the test set
    positive = test.labels.astype(bool)
    report["fused_operating_point"] = {"threshold_at_training_prevalence": round(fusion.operating_point, 4),
                                       "sensitivity": round(float(called[positive].mean()), 4),
                                       "specificity": round(float((~called[~positive]).mean()), 4)}
    return report
