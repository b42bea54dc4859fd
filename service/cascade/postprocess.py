"""Model outputs → the film's result: the gate, the mask at the film's own size (triplet rule), the peak.

`film_result` is the one place a score and a map become a `CascadeResult`: the flow
(`service.cascade.flow`), and through it the in-process cascade and the served path, call it.
At 22 % prevalence the gate spares the segmenter many films; it is chosen for sensitivity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.cascade.preprocess import to_original
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
    the same fraction of the film at any resolution. Why the shortcut: bilinear upsampling never exceeds the
    source maximum, so a map whose peak is at or below the top score gives an empty mask at any size
    (when min_area ≥ 1) -- most gated films are negatives, and the full-size resize is the costly step.
    """
    peak = float(probability.max()) if probability.size else 0.0
    at_size = rule.at_size((rows, columns), from_size=reference_size)
    if peak <= at_size.top_score and at_size.min_area >= 1:
        return np.zeros((rows, columns), dtype=bool), peak
    return at_size.apply(to_original(probability, rows, columns)), peak


@dataclass(frozen=True)
class CascadeResult:
    """What the models say about one film, before it becomes a `Finding` (priority, instances, RLE...)."""

    score: float
    positive: bool
    gated: bool
    mask: np.ndarray  # bool, the film's own rows x columns
    probability_max: float  # peak of the segmenter's map at its input size (0 when not segmented)


def film_result(rows: int, columns: int, score: float, probability: np.ndarray | None, operating_point: float,
                rule: TripletThreshold, reference_size: int = 1024) -> CascadeResult:
    """A film's result from its score and, if it was segmented, the map at the segmenter's input size
    (None: not gated, so an empty mask). The one place a score and a map become a result: the in-process
    cascade, the HTTP edge and the benchmark's baseline all call it."""
    if probability is None:
        mask, peak = np.zeros((rows, columns), dtype=bool), 0.0
    else:
        mask, peak = film_mask(probability, rows, columns, rule, reference_size)
    return CascadeResult(float(score), bool(score >= operating_point), probability is not None, mask, peak)
