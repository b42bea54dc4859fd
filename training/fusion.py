"""Fit the triage score's fusion (service/models/fusion.py) on validation films, as the served cascade sees them.

The films go through the in-process cascade -- the service's reader, preprocessing, gate, TTA and triplet -- and
each gives its evidence: the classifier's probability, the peak of the segmenter's map (0 when the gate did not
send it) and the area of the largest instance of its mask. A logistic regression of the three (a small L2
penalty keeps it finite on separable data) is the calibrated fused probability at the validation films'
prevalence; the operating point is the highest fused probability that keeps `target_sensitivity` on them.

`fit_calibration` is the same regression on the classifier's logit alone (Platt scaling), its operating point the
classifier's own, calibrated, so the films called positive do not change. The bundled demo shipped it until 0.1.0's
fusion, fitted through a gate below the classifier's operating point, lost sensitivity on fresh test sets; 0.2.0
ships the fusion, fitted through the gate at the classifier's operating point (training/demo_refit.py), which kept
the classifier's sensitivity and raised specificity (docs/models.md).

Why validation films: the classifier's probabilities on its own training films are overconfident, so a
calibration fitted there would be wrong exactly where it matters; the validation fold chose the thresholds
and trained neither model. Never test films.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from service.cascade.in_process import Cascade
from service.cascade.masks import find_instances
from service.imaging.reader import read_radiograph
from service.models.fusion import (
    CALIBRATION_INPUTS,
    ScoreFusion,
    fused_probability,
    fusion_inputs,
)
from training.metrics import threshold_for_sensitivity

L2 = 1e-3  # on the coefficients, not the intercept, per film: keeps the fit finite when the evidence separates
CHUNK = 16  # films decoded at once


@dataclass(frozen=True)
class Evidence:
    """Per film: what the cascade saw (arrays of the same length)."""

    classifier_scores: np.ndarray
    peaks: np.ndarray
    largest_areas: np.ndarray  # pixels of the film
    film_pixels: np.ndarray
    gated: np.ndarray
    labels: np.ndarray  # 1: any lesion

    def __len__(self) -> int:
        return len(self.labels)

    def inputs(self, reference_size: int = 1024) -> np.ndarray:
        """(N, 3) fusion inputs (service/models/fusion.py's order)."""
        return np.stack([fusion_inputs(p, peak, area, pixels, reference_size) for p, peak, area, pixels in
                         zip(self.classifier_scores, self.peaks, self.largest_areas, self.film_pixels, strict=True)])

    def subset(self, index: np.ndarray) -> Evidence:
        return Evidence(*(np.asarray(values)[index] for values in (self.classifier_scores, self.peaks,
                          self.largest_areas, self.film_pixels, self.gated, self.labels)))


def collect_evidence(cascade: Cascade, films: Sequence[Path], labels: Sequence[int], chunk: int = CHUNK) -> Evidence:
    """Each film (a DICOM file) through the in-process cascade; its evidence and label."""
    rows = []
    for start in range(0, len(films), chunk):
        radiographs = [read_radiograph(path) for path in films[start:start + chunk]]
        for radiograph, result in zip(radiographs, cascade.run(radiographs), strict=True):
            instances = find_instances(result.mask, None)
            classifier_score = result.score if result.classifier_score is None else result.classifier_score
            rows.append((classifier_score, result.probability_max, instances[0].area_px if instances else 0,
                         radiograph.rows * radiograph.columns, result.gated))
    scores, peaks, areas, pixels, gated = (np.asarray(column) for column in zip(*rows))
    return Evidence(scores.astype(float), peaks.astype(float), areas.astype(int), pixels.astype(int),
                    gated.astype(bool), np.asarray(labels, dtype=int))


def fit_logistic(inputs: np.ndarray, labels: np.ndarray, l2: float = L2) -> tuple[np.ndarray, float]:
    """(coefficients, intercept) of a logistic regression by L-BFGS on the mean log-loss + l2·|coefficients|²."""
    x, y = np.asarray(inputs, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if len(np.unique(y)) != 2:
        raise ValueError("the fusion needs positive and negative films")

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        z = x @ theta[:-1] + theta[-1]
        p = 1 / (1 + np.exp(-np.clip(z, -60, 60)))
        value = float(np.mean(np.logaddexp(0, z) - y * z) + l2 * theta[:-1] @ theta[:-1])
        gradient = np.append(x.T @ (p - y) / len(y) + 2 * l2 * theta[:-1], np.mean(p - y))
        return value, gradient

    result = minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B")
    if not result.success:
        raise RuntimeError(f"the logistic fit did not converge: {result.message}")
    return result.x[:-1], float(result.x[-1])


def fit_fusion(evidence: Evidence, description: str, target_sensitivity: float = 0.95,
               reference_size: int = 1024) -> ScoreFusion:
    """The manifest's `fusion` section fitted on `evidence` (validation films; see the module docstring)."""
    coefficients, intercept = fit_logistic(evidence.inputs(reference_size), evidence.labels)
    draft = ScoreFusion(coefficients=tuple(float(c) for c in coefficients), intercept=intercept,
                        area_reference_size=reference_size, training_prevalence=float(np.mean(evidence.labels)),
                        operating_point=0.5, target_sensitivity=target_sensitivity, fitted_on=description,
                        films=len(evidence), positives=int(np.sum(evidence.labels)))
    fused = fused_scores(draft, evidence)
    point = threshold_for_sensitivity(fused, evidence.labels, target_sensitivity)
    return draft.model_copy(update={"operating_point": min(max(point, 1e-6), 1 - 1e-6)})


def fit_calibration(evidence: Evidence, description: str, classifier_operating_point: float,
                    target_sensitivity: float = 0.95) -> ScoreFusion:
    """The manifest's `fusion` section as a calibration of the classifier's probability alone, fitted on
    `evidence` (validation films), its operating point `classifier_operating_point` calibrated: the same films
    are called positive as by the classifier's threshold (to float rounding), at any site prevalence."""
    coefficients, intercept = fit_logistic(evidence.inputs()[:, :1], evidence.labels)
    if coefficients[0] <= 0:
        raise ValueError(f"the calibration's slope is {coefficients[0]:.3g}: the classifier's scores do not rank the "
                         "validation films the right way round, so no calibration can keep its decisions")
    draft = ScoreFusion(inputs=CALIBRATION_INPUTS, coefficients=(float(coefficients[0]),), intercept=intercept,
                        training_prevalence=float(np.mean(evidence.labels)), operating_point=0.5,
                        target_sensitivity=target_sensitivity,
                        fitted_on=f"{description}; operating point: the classifier's ({classifier_operating_point:.6g})"
                                  ", calibrated", films=len(evidence), positives=int(np.sum(evidence.labels)))
    point = fused_probability(draft, fusion_inputs(classifier_operating_point, 0.0, 0, 1))
    return ScoreFusion.model_validate({**draft.model_dump(), "operating_point": point})  # validated: 0 < point < 1


def fused_scores(fusion: ScoreFusion, evidence: Evidence) -> np.ndarray:
    """The fused probability of each film at the fusion's training prevalence."""
    return np.asarray([fused_probability(fusion, row) for row in evidence.inputs(fusion.area_reference_size)])
