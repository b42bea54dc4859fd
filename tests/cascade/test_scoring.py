"""The triage score of a film (service/cascade/scoring.py) with the classifier's probability calibrated alone: the
films called positive are the classifier's at any site prevalence, and the segmenter's evidence is not read."""

from __future__ import annotations

import numpy as np

from service.cascade.postprocess import film_result
from service.cascade.scoring import Scoring
from service.models.fusion import (
    CALIBRATION_INPUTS,
    INPUTS,
    ScoreFusion,
    fused_probability,
    fusion_inputs,
)
from service.models.thresholds import TripletThreshold

CLASSIFIER_POINT = 0.1173


def calibration(slope: float = 1.24, intercept: float = 0.3) -> ScoreFusion:
    """A calibration whose operating point is the classifier's, calibrated (as training/fusion.py fits it)."""
    draft = ScoreFusion(inputs=CALIBRATION_INPUTS, coefficients=(slope,), intercept=intercept,
                        training_prevalence=0.51, operating_point=0.5, target_sensitivity=0.95,
                        fitted_on="validation films", films=407, positives=209)
    point = fused_probability(draft, fusion_inputs(CLASSIFIER_POINT, 0.0, 0, 1))
    return draft.model_copy(update={"operating_point": point})


def test_a_calibration_calls_positive_the_films_the_classifier_calls_positive_at_any_prevalence():
    # every film but those within float rounding of the threshold (1e-12 here): the one at it is called positive
    scores = np.concatenate([np.linspace(0.001, 0.999, 401), [CLASSIFIER_POINT, CLASSIFIER_POINT - 1e-12]])
    empty = np.zeros((8, 8), dtype=bool)
    for prevalence in (None, 0.02, 0.22, 0.6):
        scoring = Scoring(calibration(), prevalence)
        point = scoring.operating_point(CLASSIFIER_POINT)
        called = np.array([scoring.score(float(s), 0.0, empty) >= point for s in scores])
        np.testing.assert_array_equal(called, scores >= CLASSIFIER_POINT)
    # the probability moves with the prevalence: a rarer disease, lower probabilities
    rare, common = Scoring(calibration(), 0.05), Scoring(calibration(), 0.5)
    assert rare.score(0.6, 0.0, empty) < common.score(0.6, 0.0, empty)


def test_a_calibration_does_not_read_the_segmenter_but_a_fusion_does():
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:40, 10:40] = True
    calibrated = Scoring(calibration(), 0.22)
    assert calibrated.score(0.4, 0.95, mask) == calibrated.score(0.4, 0.0, np.zeros_like(mask))
    fused = Scoring(calibration().model_copy(update={"inputs": INPUTS, "coefficients": (1.24, 3.0, 0.5)}), 0.22)
    assert fused.score(0.4, 0.95, mask) > fused.score(0.4, 0.0, np.zeros_like(mask))


def test_film_result_with_a_calibration_keeps_the_classifier_score_for_the_gate():
    rule = TripletThreshold(0.8, 10, 0.5)
    result = film_result(32, 32, 0.3, None, CLASSIFIER_POINT, rule, 1024, Scoring(calibration(), 0.22))
    assert result.classifier_score == 0.3 and result.positive and not result.gated
    assert result.score != 0.3 and result.operating_point < CLASSIFIER_POINT  # the 0.22 prior is below 0.51
