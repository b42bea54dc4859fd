"""Hand-computed and property tests of the evaluation metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.metrics import (
    ConfusionCounts,
    binary_metrics,
    confusion_counts,
    dice,
    dice_per_image,
    expected_calibration_error,
    mean_dice,
    mean_dice_positive,
    roc_auc,
    roc_curve,
    threshold_for_sensitivity,
)


def _mask(shape: tuple[int, int], *slices: tuple[slice, slice]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for rows, cols in slices:
        mask[rows, cols] = True
    return mask


def test_dice_known_masks() -> None:
    empty = np.zeros((4, 4), dtype=bool)
    a = _mask((4, 4), (slice(0, 2), slice(0, 2)))  # 4 pixels
    b = _mask((4, 4), (slice(0, 2), slice(1, 3)))  # 4 pixels, 2 shared with a
    assert dice(empty, empty) == 1.0
    assert dice(empty, a) == 0.0
    assert dice(a, empty) == 0.0
    assert dice(a, a) == 1.0
    assert dice(a, b) == pytest.approx(2 * 2 / (4 + 4))
    assert dice(a.astype(np.uint8) * 255, b) == pytest.approx(0.5)  # nonzero = foreground


def test_mean_dice_and_positive_only() -> None:
    empty = np.zeros((4, 4), dtype=bool)
    a = _mask((4, 4), (slice(0, 2), slice(0, 2)))
    b = _mask((4, 4), (slice(0, 2), slice(1, 3)))
    preds = [empty, a, empty]
    truths = [empty, b, a]  # dice 1, 0.5, 0
    np.testing.assert_allclose(dice_per_image(preds, truths), [1.0, 0.5, 0.0])
    assert mean_dice(preds, truths) == pytest.approx(0.5)
    assert mean_dice(np.stack(preds), np.stack(truths)) == pytest.approx(0.5)
    assert mean_dice_positive(preds, truths) == pytest.approx(0.25)
    assert math.isnan(mean_dice_positive([a], [empty]))


def test_dice_errors() -> None:
    with pytest.raises(ValueError, match=r"same shape, got \(2, 2\) and \(3, 3\)"):
        dice(np.zeros((2, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"got 1 predictions for 2 ground-truth masks"):
        mean_dice([np.zeros((2, 2))], [np.zeros((2, 2))] * 2)


def test_roc_auc_known_values() -> None:
    labels = np.array([0, 0, 1, 1])
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    # Pairs (pos, neg): (0.35, 0.1) win, (0.35, 0.4) loss, (0.8, *) two wins -> 3/4.
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), labels) == pytest.approx(0.75)


def test_roc_auc_ties_count_half() -> None:
    assert roc_auc(np.full(6, 0.3), np.array([0, 1, 0, 1, 1, 0])) == pytest.approx(0.5)
    assert roc_auc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)
    # One tie (0.5 vs 0.5) among 4 pairs, the other 3 won: (3 + 0.5) / 4.
    assert roc_auc(np.array([0.1, 0.5, 0.5, 0.9]), np.array([0, 0, 1, 1])) == pytest.approx(0.875)


def test_roc_curve_known_points() -> None:
    fpr, tpr, thresholds = roc_curve(np.array([0.1, 0.5, 0.5, 0.9]), np.array([0, 0, 1, 1]))
    np.testing.assert_allclose(thresholds, [np.inf, 0.9, 0.5, 0.1])
    np.testing.assert_allclose(tpr, [0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.5, 1.0])


def test_roc_errors() -> None:
    with pytest.raises(ValueError, match=r"needs both classes, got 0 positives and 3 negatives"):
        roc_auc(np.array([0.1, 0.2, 0.3]), np.zeros(3))
    with pytest.raises(ValueError, match=r"labels must be 0 or 1"):
        roc_auc(np.array([0.1, 0.2]), np.array([0, 2]))
    with pytest.raises(ValueError, match=r"scores contain NaN"):
        roc_curve(np.array([np.nan, 0.2]), np.array([0, 1]))


scores_and_labels = st.integers(min_value=2, max_value=40).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 10).map(lambda k: k / 10), min_size=n, max_size=n),  # coarse grid: many ties
        st.lists(st.integers(0, 1), min_size=n, max_size=n).filter(lambda ls: 0 < sum(ls) < len(ls)),
    )
)


@settings(max_examples=60, deadline=None)
@given(scores_and_labels)
def test_auc_properties(data: tuple[list[float], list[int]]) -> None:
    scores, labels = np.array(data[0]), np.array(data[1])
    auc = roc_auc(scores, labels)
    assert 0.0 <= auc <= 1.0
    assert roc_auc(-scores, labels) == pytest.approx(1.0 - auc)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auc == pytest.approx(pairwise)
    fpr, tpr, _ = roc_curve(scores, labels)
    assert float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)) == pytest.approx(auc)


def test_confusion_and_rates_by_hand() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1])
    labels = np.array([1, 1, 0, 1, 1, 0, 0, 0])
    counts = confusion_counts(scores, labels, threshold=0.6)  # >= 0.6: 0.9, 0.8, 0.7, 0.6
    assert counts == ConfusionCounts(tp=3, fp=1, tn=3, fn=1)
    assert counts.sensitivity == pytest.approx(3 / 4)
    assert counts.specificity == pytest.approx(3 / 4)
    assert counts.precision == pytest.approx(3 / 4)
    assert counts.f1 == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))  # 0.75
    assert counts.f2 == pytest.approx(5 * 3 / (5 * 3 + 4 * 1 + 1))  # 0.75
    uneven = ConfusionCounts(tp=2, fp=3, tn=4, fn=1)
    assert uneven.f1 == pytest.approx(4 / 8)  # P = 0.4, R = 2/3: 2PR/(P+R) = 0.5
    assert uneven.f2 == pytest.approx(10 / 17)  # 5PR/(4P+R) = (4/3) / (1.6 + 2/3) = 10/17
    metrics = binary_metrics(scores, labels, 0.85)  # only 0.9 flagged
    assert metrics["sensitivity"] == pytest.approx(0.25)
    assert metrics["specificity"] == 1.0
    assert metrics["precision"] == 1.0


def test_undefined_rates_are_nan() -> None:
    counts = confusion_counts(np.array([0.1, 0.2]), np.array([0, 0]), threshold=0.5)
    assert counts == ConfusionCounts(tp=0, fp=0, tn=2, fn=0)
    assert math.isnan(counts.sensitivity) and math.isnan(counts.precision) and math.isnan(counts.f1)
    with pytest.raises(ValueError, match=r"beta must be a finite number > 0, got 0"):
        counts.fbeta(0)


def test_threshold_for_sensitivity_tiny_set() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1])
    labels = np.array([1, 1, 0, 1, 1, 0, 0, 0])
    # Positives 0.9, 0.8, 0.6, 0.4: sensitivity 1/4, 2/4, 3/4, 4/4 at those thresholds.
    assert threshold_for_sensitivity(scores, labels, 0.95) == 0.4
    assert threshold_for_sensitivity(scores, labels, 0.75) == 0.6
    assert threshold_for_sensitivity(scores, labels, 0.7) == 0.6
    assert threshold_for_sensitivity(scores, labels, 0.5) == 0.8
    # Ties: two positives at 0.5; the threshold 0.5 flags both, so sensitivity 1 > target 0.5.
    tied = threshold_for_sensitivity(np.array([0.5, 0.5, 0.5]), np.array([1, 1, 0]), 0.5)
    assert tied == 0.5
    # 7 of 100 positives meet 0.07 (7 / 100 >= 0.07), although ceil(0.07 * 100) == 8 in floating point.
    assert threshold_for_sensitivity(np.arange(100) / 100, np.ones(100), 0.07) == pytest.approx(0.93)


@settings(max_examples=60, deadline=None)
@given(scores_and_labels, st.floats(0.05, 1.0))
def test_threshold_for_sensitivity_is_highest_meeting_target(data, target: float) -> None:
    scores, labels = np.array(data[0]), np.array(data[1])
    threshold = threshold_for_sensitivity(scores, labels, target)
    assert confusion_counts(scores, labels, threshold).sensitivity >= target
    higher = scores[scores > threshold]
    if higher.size:
        assert confusion_counts(scores, labels, higher.min()).sensitivity < target


def test_threshold_for_sensitivity_errors() -> None:
    with pytest.raises(ValueError, match=r"target sensitivity must be in \(0, 1\], got 0"):
        threshold_for_sensitivity(np.array([0.1]), np.array([1]), 0)
    with pytest.raises(ValueError, match=r"needs at least one positive"):
        threshold_for_sensitivity(np.array([0.1]), np.array([0]), 0.9)


def test_ece_by_hand() -> None:
    probs = np.array([0.1, 0.4, 0.6, 0.9])
    labels = np.array([0, 1, 1, 1])
    # 2 bins: [0, .5): mean p .25 vs mean y .5; [.5, 1]: .75 vs 1 -> 0.5 * .25 + 0.5 * .25.
    assert expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(0.25)
    # 10 bins: every sample alone: mean |p - y| = (.1 + .6 + .4 + .1) / 4.
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.3)
    # 1.0 falls in the last bin; a perfectly calibrated set scores 0.
    assert expected_calibration_error(np.array([1.0, 0.0]), np.array([1, 0]), n_bins=5) == pytest.approx(0.0)


def test_ece_errors() -> None:
    with pytest.raises(ValueError, match=r"probs must lie in \[0, 1\]"):
        expected_calibration_error(np.array([1.2]), np.array([1]))
    with pytest.raises(ValueError, match=r"n_bins must be an integer >= 1, got 0"):
        expected_calibration_error(np.array([0.2]), np.array([1]), n_bins=0)
