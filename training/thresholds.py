"""Grid search of the SIIM winner's triplet post-processing rule on validation predictions.

Why a search: the triplet's three numbers interact (a lower `top_score` needs a larger `min_area` to keep
negatives empty) and depend on the model and the resolution, so they are tuned jointly on out-of-fold
probability maps, maximising exactly the metric the rule exists for: SIIM mean Dice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.models.thresholds import TripletThreshold
from training.metrics import dice


def search_triplet(
    probs: Sequence[np.ndarray] | np.ndarray,
    truths: Sequence[np.ndarray] | np.ndarray,
    tops: Sequence[float],
    areas: Sequence[int],
    bottoms: Sequence[float],
) -> tuple[TripletThreshold, float, list[dict[str, float]]]:
    """Try every valid (top, area, bottom) and return (best rule, its mean Dice, the full table).

    Combinations with ``bottom > top`` are skipped (not a valid `TripletThreshold`). The table holds one
    dict per evaluated combination (keys top_score, min_area, bottom_score, mean_dice) in loop order
    (tops, then areas, then bottoms). Ties in mean Dice keep the first combination in that order.

    Cost: the rule's mask is either empty or ``prob > bottom``, so each image's Dice is computed once per
    bottom and its above-top pixel count once per top; every combination is then an array lookup. That
    keeps a few hundred combinations over a full validation fold cheap.
    """
    probs, truths = list(probs), list(truths)
    if len(probs) != len(truths):
        raise ValueError(f"got {len(probs)} probability maps for {len(truths)} ground-truth masks")
    if not probs:
        raise ValueError("search_triplet needs at least one image")
    if not (len(tops) and len(areas) and len(bottoms)):
        raise ValueError(f"tops, areas and bottoms must be non-empty, got {len(tops)}, {len(areas)}, {len(bottoms)}")
    # Validates every value up front (and the error names the bad one).
    for top in tops:
        for bottom in bottoms:
            TripletThreshold(top, 0, min(bottom, top))
    for area in areas:
        TripletThreshold(min_area=area)

    empty_dice = np.array([0.0 if np.asarray(t).any() else 1.0 for t in truths])
    counts = np.array([[np.count_nonzero(np.asarray(p) > top) for top in tops] for p in probs])  # (N, T)
    bottom_dice = np.array([[dice(np.asarray(p) > b, t) for b in bottoms] for p, t in zip(probs, truths, strict=True)])

    table: list[dict[str, float]] = []
    best: tuple[TripletThreshold, float] | None = None
    for ti, top in enumerate(tops):
        for area in areas:
            drawn = counts[:, ti] >= area
            for bi, bottom in enumerate(bottoms):
                if bottom > top:
                    continue
                score = float(np.where(drawn, bottom_dice[:, bi], empty_dice).mean())
                row = {"top_score": float(top), "min_area": int(area), "bottom_score": float(bottom)}
                table.append({**row, "mean_dice": score})
                if best is None or score > best[1]:
                    best = (TripletThreshold(float(top), int(area), float(bottom)), score)
    if best is None:
        raise ValueError(f"no valid combination: every bottom in {list(bottoms)} exceeds every top in {list(tops)}")
    return best[0], best[1], table
