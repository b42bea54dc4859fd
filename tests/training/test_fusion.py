"""The score fusion's fit (training/fusion.py), its prior shift (service/models/fusion.py), and the demo's folds
rebuilt without rendering (training/demo_split.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from service.cascade.scoring import Scoring
from service.models.fusion import fusion_inputs, prior_shift
from training import config as configs
from training.__main__ import main as training_main
from training.data import _group_of, assign_folds, index_siim
from training.demo_split import demo_split
from training.fusion import (
    Evidence,
    fit_calibration,
    fit_fusion,
    fit_logistic,
    fused_scores,
)
from training.metrics import expected_calibration_error, roc_auc


def test_the_logistic_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(20000, 3))
    truth, intercept = np.array([1.5, -0.7, 0.3]), -0.4
    labels = rng.random(20000) < 1 / (1 + np.exp(-(inputs @ truth + intercept)))
    coefficients, fitted = fit_logistic(inputs, labels, l2=0.0)
    np.testing.assert_allclose(coefficients, truth, atol=0.06)
    assert fitted == pytest.approx(intercept, abs=0.05)


def evidence(seed: int, count: int) -> Evidence:
    """Films whose classifier score and segmenter evidence both carry the label, the segmenter more."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(count) < 0.5).astype(int)
    scores = 1 / (1 + np.exp(-(rng.normal(size=count) + 1.2 * labels)))
    peaks = np.clip(rng.normal(0.3 + 0.4 * labels, 0.15), 0, 1)
    areas = np.where(peaks > 0.5, rng.integers(500, 20000, count), 0)
    return Evidence(scores, peaks, areas, np.full(count, 1024 * 1024), np.ones(count, bool), labels)


def test_the_fusion_beats_the_classifier_alone_and_keeps_its_sensitivity():
    fit, test = evidence(1, 600), evidence(2, 600)
    fusion = fit_fusion(fit, "600 synthetic validation films", target_sensitivity=0.95)
    fused = fused_scores(fusion, fit)
    assert np.mean(fused[fit.labels == 1] >= fusion.operating_point) >= 0.95
    assert roc_auc(fused_scores(fusion, test), test.labels) > roc_auc(test.classifier_scores, test.labels) + 0.05
    assert fusion.training_prevalence == pytest.approx(fit.labels.mean())


def test_the_prior_shift_moves_probabilities_not_decisions():
    fusion = fit_fusion(evidence(1, 400), "400 synthetic validation films")
    films = evidence(3, 200)
    for prevalence in (0.05, 0.22, 0.7):
        scoring = Scoring(fusion, prevalence)
        masks = [np.zeros((64, 64), bool) for _ in range(len(films))]
        scores = np.array([scoring.score(p, peak, mask) for p, peak, mask in zip(films.classifier_scores,
                                                                                   films.peaks, masks)])
        unshifted = np.array([Scoring(fusion).score(p, peak, mask) for p, peak, mask in zip(films.classifier_scores,
                                                                                            films.peaks, masks)])
        np.testing.assert_array_equal(scores >= scoring.operating_point(0.5),
                                      unshifted >= Scoring(fusion).operating_point(0.5))
        assert (np.mean(scores) < np.mean(unshifted)) == (prevalence < fusion.training_prevalence)
    assert prior_shift(0.3, 0.4, 0.4) == pytest.approx(0.3) and prior_shift(0.3, 0.4, None) == 0.3
    # the area counts at the reference size: the same share of a film twice as wide weighs the same
    assert fusion_inputs(0.5, 0.9, 4000, 2048 * 2048)[2] == pytest.approx(fusion_inputs(0.5, 0.9, 1000,
                                                                                          1024 * 1024)[2])


def test_demo_split_gives_the_folds_of_the_rendered_set(tmp_path):
    """The folds rebuilt from the generator equal those `assign_folds` gives on the rendered films' labels and
    patients (read back from the files, as the cache does)."""
    data = tmp_path / "train"
    assert training_main(["synth", "--out", str(data), "--count", "30", "--seed", "7", "--prevalence", "0.5",
                          "--size", "256", "--uncompressed", "--quiet", "--workers", "1"]) == 0
    config = configs.TrainConfig(seed=7, demo=configs.DemoConfig(train_images=30, train_prevalence=0.5,
                                                                 image_size=256))
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, folds=3))
    samples = index_siim(data)
    folds = assign_folds(np.array([bool(s.rles) for s in samples], dtype=np.uint8),
                         [_group_of(s) for s in samples], 3, 7)
    split = demo_split(config)
    assert {s.image_id: split.folds[s.image_id] for s in samples} == dict(zip([s.image_id for s in samples],
                                                                               folds.tolist()))
    paths = [s.path for s in samples]
    assert sorted(split.films(paths, "train") + split.films(paths, "validation")) == sorted(paths)
    with pytest.raises(ValueError, match="not films of the demo's training set"):
        split.films([tmp_path / "other.dcm"], "train")


def test_the_calibration_keeps_the_classifiers_decisions_and_calibrates_at_the_sites_prevalence():
    """Platt scaling of an over-confident classifier, fitted on balanced films, measured on films at 0.22."""
    rng = np.random.default_rng(5)

    def films(count: int, prevalence: float) -> Evidence:
        labels = (rng.random(count) < prevalence).astype(int)
        true_logit = rng.normal(-1.0, 1.5, count) + 2.5 * labels  # the classifier says 2x the true log-odds
        scores = 1 / (1 + np.exp(-2.0 * true_logit))
        return Evidence(scores, np.zeros(count), np.zeros(count, int), np.full(count, 1024 * 1024),
                        np.ones(count, bool), labels)

    fit, test = films(4000, 0.5), films(4000, 0.22)
    point = 0.2
    calibration = fit_calibration(fit, "4000 synthetic validation films", point)
    assert calibration.inputs == ("classifier_logit",) and 0.3 < calibration.coefficients[0] < 0.7  # halves it
    assert "operating point: the classifier's (0.2), calibrated" in calibration.fitted_on
    scoring = Scoring(calibration, 0.22)
    empty = np.zeros((4, 4), bool)
    served = np.array([scoring.score(p, 0.0, empty) for p in test.classifier_scores])
    np.testing.assert_array_equal(served >= scoring.operating_point(point), test.classifier_scores >= point)
    assert expected_calibration_error(served, test.labels) < 0.03
    assert expected_calibration_error(test.classifier_scores, test.labels) > 0.08


def test_a_calibration_that_would_reverse_the_classifier_is_refused():
    films = evidence(1, 300)
    backwards = dataclasses.replace(films, labels=1 - films.labels)
    with pytest.raises(ValueError, match=r"the calibration's slope is -[0-9.]+: the classifier's scores do not rank"):
        fit_calibration(backwards, "backwards films", 0.3)


def test_a_fusion_that_would_call_a_never_segmented_film_positive_is_refused():
    """`refit-demo --score fused`: below the gate a film has no segmenter evidence; it must stay negative."""
    import math

    from service.models.fusion import CALIBRATION_INPUTS, ScoreFusion
    from training.demo_refit import require_segmented_positives

    def fusion(intercept: float, inputs: tuple[str, ...] = ("classifier_logit", "segmenter_peak",
                                                             "log1p_largest_area")) -> ScoreFusion:
        return ScoreFusion(inputs=inputs, coefficients=(2.0, 1.0, 0.5)[:len(inputs)], intercept=intercept,
                           training_prevalence=0.5, operating_point=0.5, target_sensitivity=0.95, fitted_on="films",
                           films=100, positives=50)

    gate = 0.2  # logit -1.386: fused score at the gate with no evidence is sigmoid(2 * -1.386 + intercept)
    require_segmented_positives(fusion(2.0), gate)  # sigmoid(-0.77) = 0.32 < 0.5: fine
    with pytest.raises(ValueError, match=r"films never segmented would be called positive"):
        require_segmented_positives(fusion(3.0), gate)  # sigmoid(0.23) = 0.56 >= 0.5
    assert 1 / (1 + math.exp(-(2 * math.log(0.2 / 0.8) + 3.0))) >= 0.5
    require_segmented_positives(fusion(3.0, CALIBRATION_INPUTS), gate)  # a calibration reads the classifier alone
