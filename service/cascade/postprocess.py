"""Model outputs → the film's result: the gate, the mask at the film's own size (triplet rule), the peak.

`film_result` is the one place a score and a map become a `CascadeResult`: the flow
(`service.cascade.flow`), and through it the in-process cascade and the served path, call it.
At 22 % prevalence the gate spares the segmenter many films; it is chosen for sensitivity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.cascade.resampling import resample_window
from service.cascade.scoring import Ood, Scoring
from service.models.thresholds import TripletThreshold


def passes_gate(score: float, gate: float) -> bool:
    """Whether the segmenter must see a film with this triage score: the one place the gate is decided."""
    return bool(score >= gate)


def gated(scores: np.ndarray, gate: float) -> np.ndarray:
    """Indices of the films in a batch the segmenter must see (`passes_gate` of each)."""
    return np.flatnonzero([passes_gate(float(score), gate) for score in np.asarray(scores).reshape(-1)])


def film_mask(probability: np.ndarray, rows: int, columns: int, rule: TripletThreshold,
              reference_size: int = 1024) -> tuple[np.ndarray, float]:
    """The film's mask and the map's peak probability, from a model-resolution map.

    `rule.min_area` is in pixels at `reference_size`² and is rescaled to the film's pixel count, so it means
    the same fraction of the film at any resolution. Two shortcuts, both exact, because the full-size resize is
    the costly step (15 ms to 2128x2000; 34 ms with Pillow): bilinear upsampling never exceeds the source
    maximum, so a map whose peak is at or below the top score gives an empty mask at any size (when
    min_area ≥ 1) -- most gated films are negatives; and a film pixel is a weighted mean of the few map pixels
    around it, so only film pixels near map pixels above the bottom score can be in the mask: only that window
    is upsampled (`mask_window`).
    """
    peak = float(probability.max()) if probability.size else 0.0
    at_size = rule.at_size((rows, columns), from_size=reference_size)
    mask = np.zeros((rows, columns), dtype=bool)
    if peak <= at_size.top_score and at_size.min_area >= 1:
        return mask, peak
    window = mask_window(probability > at_size.bottom_score, rows, columns)
    if window is not None:  # none: no map pixel above the bottom score, so no film pixel either
        top, bottom, left, right = window
        mask[top:bottom, left:right] = at_size.apply(to_original_window(probability, rows, columns, window))
    return mask, peak


def mask_window(above: np.ndarray, rows: int, columns: int) -> tuple[int, int, int, int] | None:
    """The film pixels (top, bottom, left, right; end exclusive) whose bilinear resampling from the map reads any
    map pixel set in `above`, with a pixel to spare; None where `above` is empty.

    Pillow weighs map pixels within `support` (1, or the shrink factor) of a film pixel's centre in map
    coordinates, (y + 0.5) · map_rows / rows; the window holds every film pixel for which that reaches the box.
    """
    hit_rows, hit_columns = np.flatnonzero(above.any(axis=1)), np.flatnonzero(above.any(axis=0))
    if hit_rows.size == 0:
        return None
    spans = []
    for first, last, film, size in ((hit_rows[0], hit_rows[-1], rows, above.shape[0]),
                                    (hit_columns[0], hit_columns[-1], columns, above.shape[1])):
        scale = size / film
        support = max(scale, 1.0)
        # Film pixel y reads map pixel j with a weight where |j + 0.5 - (y + 0.5) · scale| < support.
        start = int(np.floor((first + 0.5 - support) / scale - 0.5)) - 1
        stop = int(np.ceil((last + 0.5 + support) / scale - 0.5)) + 2
        spans.append((max(start, 0), min(stop, film)))
    (top, bottom), (left, right) = spans
    return top, bottom, left, right


def to_original_window(probability: np.ndarray, rows: int, columns: int,
                       window: tuple[int, int, int, int]) -> np.ndarray:
    """`to_original(probability, rows, columns)[top:bottom, left:right]`, computing only that window (to the bit:
    `resampling.resample_window`)."""
    return np.clip(resample_window(probability, rows, columns, window), 0.0, 1.0)


@dataclass(frozen=True)
class CascadeResult:
    """What the models say about one film, before it becomes a `Finding` (priority, instances, RLE...).

    `score` is the triage score (the fused, calibrated one where the classifier's manifest has a fusion,
    `service.cascade.scoring`); `classifier_score` the classifier's probability, which the gate read (None:
    the same as `score`); `operating_point` the threshold `positive` was decided on (None: the caller's).
    """

    score: float
    positive: bool
    gated: bool
    mask: np.ndarray  # bool, the film's own rows x columns
    probability_max: float  # peak of the segmenter's map at its input size (0 when not segmented)
    classifier_score: float | None = None
    operating_point: float | None = None
    ood: Ood | None = None  # the out-of-distribution reading; None where the classifier has no description


def film_result(rows: int, columns: int, score: float, probability: np.ndarray | None, operating_point: float,
                rule: TripletThreshold, reference_size: int = 1024, scoring: Scoring | None = None,
                distance: float | None = None) -> CascadeResult:
    """A film's result from its classifier score and, if it was segmented, the map at the segmenter's input size
    (None: not gated, so an empty mask), and the classifier's OOD `distance`. The one place a score and a map
    become a result: the in-process cascade, the HTTP edge and the benchmark's baseline all call it. `scoring`
    (default: the classifier's probability, no OOD threshold) makes the triage score (`service.cascade.scoring`)."""
    if probability is None:
        mask, peak = np.zeros((rows, columns), dtype=bool), 0.0  # np.zeros: pages only where touched
    else:
        mask, peak = film_mask(probability, rows, columns, rule, reference_size)
    scoring = scoring or Scoring()
    triage, point = scoring.score(score, peak, mask), scoring.operating_point(operating_point)
    return CascadeResult(triage, bool(triage >= point), probability is not None, mask, peak, float(score), point,
                         scoring.ood(distance))
