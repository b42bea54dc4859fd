"""Evaluation metrics for pneumothorax segmentation and triage: pure numpy (no sklearn).

Conventions:

* A score is predicted positive when ``score >= threshold`` (the sklearn convention), so a threshold taken
  from the data classifies that very sample as positive.
* Ratios whose denominator is zero (e.g. precision with no predicted positives) are ``nan``, never a silent
  0 or 1: an undefined metric should look undefined in a report.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two binary masks (nonzero = foreground); both empty -> 1.0, as in SIIM-ACR.

    One empty and the other not -> 0.0. The SIIM leaderboard scored an empty prediction on a negative image
    as a perfect 1, which is why predicting "nothing" on likely negatives matters so much.
    """
    pred = np.asarray(pred).astype(bool, copy=False)
    truth = np.asarray(truth).astype(bool, copy=False)
    if pred.shape != truth.shape:
        raise ValueError(f"pred and truth must have the same shape, got {pred.shape} and {truth.shape}")
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def dice_per_image(preds: Iterable[np.ndarray], truths: Iterable[np.ndarray]) -> np.ndarray:
    """Dice of each (pred, truth) pair; accepts two stacked (N, H, W) arrays or two sequences of masks."""
    preds, truths = list(preds), list(truths)
    if len(preds) != len(truths):
        raise ValueError(f"got {len(preds)} predictions for {len(truths)} ground-truth masks")
    return np.array([dice(p, t) for p, t in zip(preds, truths, strict=True)], dtype=np.float64)


def mean_dice(preds: Iterable[np.ndarray], truths: Iterable[np.ndarray]) -> float:
    """The SIIM-ACR metric: mean per-image Dice, empty/empty counting 1."""
    scores = dice_per_image(preds, truths)
    if scores.size == 0:
        raise ValueError("mean_dice needs at least one image")
    return float(scores.mean())


def mean_dice_positive(preds: Iterable[np.ndarray], truths: Iterable[np.ndarray]) -> float:
    """Mean Dice over images whose ground truth is non-empty; nan when there are none.

    Why: the SIIM mean is dominated by the ~78 % negatives; this isolates how well lesions are drawn.
    """
    preds, truths = list(preds), list(truths)
    if len(preds) != len(truths):
        raise ValueError(f"got {len(preds)} predictions for {len(truths)} ground-truth masks")
    pairs = [(p, t) for p, t in zip(preds, truths, strict=True) if np.asarray(t).any()]
    if not pairs:
        return math.nan
    return float(np.mean([dice(p, t) for p, t in pairs]))


def _scores_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels_in = np.asarray(labels).ravel()
    if scores.shape != labels_in.shape:
        raise ValueError(f"scores and labels must have the same length, got {scores.size} and {labels_in.size}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if not np.isin(labels_in, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got values {np.unique(labels_in)[:10].tolist()}")
    return scores, labels_in.astype(bool)


def _both_classes(labels: np.ndarray) -> tuple[int, int]:
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"needs both classes, got {n_pos} positives and {n_neg} negatives")
    return n_pos, n_neg


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Start index of each run of equal values, and the run each sorted element belongs to.
    starts = np.flatnonzero(np.concatenate(([True], sorted_values[1:] != sorted_values[:-1])))
    ends = np.concatenate((starts[1:], [values.size]))
    run_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic.

    Equals the probability that a random positive scores higher than a random negative, a tie counting
    one half (average ranks), which is also the trapezoidal area under `roc_curve`. Needs both classes.
    """
    scores, labels = _scores_labels(scores, labels)
    n_pos, n_neg = _both_classes(labels)
    ranks = _average_ranks(scores)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds decreasing; the first is +inf (nothing positive: (0, 0)).

    One point per distinct score, so tied scores form a diagonal segment (the half credit of `roc_auc`).
    """
    scores, labels = _scores_labels(scores, labels)
    n_pos, n_neg = _both_classes(labels)
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    last_of_run = np.flatnonzero(np.concatenate((sorted_scores[1:] != sorted_scores[:-1], [True])))
    tp = np.cumsum(sorted_labels)[last_of_run]
    fp = (last_of_run + 1) - tp
    tpr = np.concatenate(([0.0], tp / n_pos))
    fpr = np.concatenate(([0.0], fp / n_neg))
    thresholds = np.concatenate(([np.inf], sorted_scores[last_of_run]))
    return fpr, tpr, thresholds


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


@dataclass(frozen=True)
class ConfusionCounts:
    """Counts of a binary decision; the derived rates are nan where their denominator is zero."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def sensitivity(self) -> float:
        """Recall / true-positive rate: the fraction of pneumothoraces flagged."""
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    def fbeta(self, beta: float) -> float:
        """``(1 + b²) TP / ((1 + b²) TP + b² FN + FP)``; beta > 1 favours sensitivity."""
        if not (math.isfinite(beta) and beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
        b2 = beta * beta
        return _ratio((1 + b2) * self.tp, (1 + b2) * self.tp + b2 * self.fn + self.fp)

    @property
    def f1(self) -> float:
        return self.fbeta(1.0)

    @property
    def f2(self) -> float:
        """F2: the triage summary, weighting sensitivity 4x precision (missed findings cost more)."""
        return self.fbeta(2.0)


def confusion_counts(scores: np.ndarray, labels: np.ndarray, threshold: float) -> ConfusionCounts:
    """Counts of ``score >= threshold`` against the 0/1 labels."""
    scores, labels = _scores_labels(scores, labels)
    predicted = scores >= threshold
    return ConfusionCounts(
        tp=int(np.sum(predicted & labels)),
        fp=int(np.sum(predicted & ~labels)),
        tn=int(np.sum(~predicted & ~labels)),
        fn=int(np.sum(~predicted & labels)),
    )


def binary_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, precision, F1 and F2 at `threshold`, as a flat dict for reports."""
    counts = confusion_counts(scores, labels, threshold)
    return {
        "sensitivity": counts.sensitivity,
        "specificity": counts.specificity,
        "precision": counts.precision,
        "f1": counts.f1,
        "f2": counts.f2,
    }


def threshold_for_sensitivity(scores: np.ndarray, labels: np.ndarray, target: float = 0.95) -> float:
    """The highest threshold whose sensitivity (``score >= threshold``) is at least `target`.

    Why the highest: among operating points meeting the sensitivity requirement it flags the fewest
    images, i.e. it has the best specificity.

    The result is always the score of a positive sample: the k-th highest positive score, k the smallest
    count with ``k / n_pos >= target``. Ties: every sample scoring exactly the threshold is flagged (>=), so
    when positives tie at the threshold the achieved sensitivity can exceed `target`, and negatives tied with
    it are flagged too. Needs at least one positive.
    """
    scores, labels = _scores_labels(scores, labels)
    if not (0.0 < target <= 1.0):
        raise ValueError(f"target sensitivity must be in (0, 1], got {target!r}")
    positives = np.sort(scores[labels])[::-1]
    if positives.size == 0:
        raise ValueError("threshold_for_sensitivity needs at least one positive label")
    achieved = np.arange(1, positives.size + 1) / positives.size
    k = int(np.argmax(achieved >= target))  # achieved[-1] == 1.0 >= target, so a match exists
    return float(positives[k])


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> float:
    """ECE with `n_bins` equal-width bins on [0, 1]: ``sum_b (n_b / N) * |mean(prob_b) - mean(label_b)|``.

    Bins are [i/n, (i+1)/n) except the last, which includes 1.0. Empty bins contribute nothing.
    """
    probs, labels = _scores_labels(probs, labels)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    if probs.size == 0:
        raise ValueError("expected_calibration_error needs at least one sample")
    if probs.min() < 0.0 or probs.max() > 1.0:
        raise ValueError(f"probs must lie in [0, 1], got range [{probs.min()}, {probs.max()}]")
    bins = np.minimum((probs * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    prob_sums = np.bincount(bins, weights=probs, minlength=n_bins)
    label_sums = np.bincount(bins, weights=labels.astype(np.float64), minlength=n_bins)
    filled = counts > 0
    gaps = np.abs(prob_sums[filled] - label_sums[filled])  # = n_b * |mean prob - mean label|
    return float(gaps.sum() / probs.size)
