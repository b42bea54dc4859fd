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


class TripletSearch:
    """The triplet search, fed one image at a time: memory O(images x (tops + bottoms)), not O(pixels).

    Why streamed: a 1024 px validation fold of ~2,400 SIIM films is ~10 GB of float32 probability maps; the
    rule only needs, per image, its above-top pixel counts and its Dice at each bottom, so that is all this
    keeps. The mask the rule draws is either empty or ``prob > bottom``, which is what makes this exact.
    """

    def __init__(self, tops: Sequence[float], areas: Sequence[int], bottoms: Sequence[float]) -> None:
        if not (len(tops) and len(areas) and len(bottoms)):
            raise ValueError(f"tops, areas and bottoms must be non-empty, got {len(tops)}, {len(areas)}, "
                             f"{len(bottoms)}")
        for top in tops:  # validates every value up front (and the error names the bad one)
            for bottom in bottoms:
                TripletThreshold(top, 0, min(bottom, top))
        for area in areas:
            TripletThreshold(min_area=area)
        self.tops, self.areas, self.bottoms = list(tops), list(areas), list(bottoms)
        self._empty: list[float] = []
        self._counts: list[list[int]] = []
        self._dice: list[list[float]] = []

    def add(self, prob: np.ndarray | None, truth: np.ndarray) -> None:
        """One image: its probability map, or None where the cascade never segments it (an empty answer)."""
        truth = np.asarray(truth)
        empty = 0.0 if truth.any() else 1.0
        self._empty.append(empty)
        if prob is None:
            self._counts.append([0] * len(self.tops))
            self._dice.append([empty] * len(self.bottoms))
            return
        prob = np.asarray(prob)
        self._counts.append([int(np.count_nonzero(prob > top)) for top in self.tops])
        self._dice.append([dice(prob > bottom, truth) for bottom in self.bottoms])

    def __len__(self) -> int:
        return len(self._empty)

    def best(self) -> tuple[TripletThreshold, float, list[dict[str, float]]]:
        """(best rule, its mean Dice, the full table); see `search_triplet` for the order and ties."""
        if not self._empty:
            raise ValueError("search_triplet needs at least one image")
        empty_dice, counts, bottom_dice = np.array(self._empty), np.array(self._counts), np.array(self._dice)
        table: list[dict[str, float]] = []
        best: tuple[TripletThreshold, float] | None = None
        for ti, top in enumerate(self.tops):
            for area in self.areas:
                drawn = counts[:, ti] >= area
                for bi, bottom in enumerate(self.bottoms):
                    if bottom > top:
                        continue
                    score = float(np.where(drawn, bottom_dice[:, bi], empty_dice).mean())
                    row = {"top_score": float(top), "min_area": int(area), "bottom_score": float(bottom)}
                    table.append({**row, "mean_dice": score})
                    if best is None or score > best[1]:
                        best = (TripletThreshold(float(top), int(area), float(bottom)), score)
        if best is None:
            raise ValueError(f"no valid combination: every bottom in {self.bottoms} exceeds every top in {self.tops}")
        return best[0], best[1], table


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
    For maps that do not fit in memory together, feed a `TripletSearch` instead.
    """
    if len(probs) != len(truths):
        raise ValueError(f"got {len(probs)} probability maps for {len(truths)} ground-truth masks")
    search = TripletSearch(tops, areas, bottoms)
    for prob, truth in zip(probs, truths, strict=True):
        search.add(prob, truth)
    return search.best()
