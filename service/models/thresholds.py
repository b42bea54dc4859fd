"""Turning a segmentation probability map into the mask the service reports. Pure numpy (no torch).

For now only the SIIM-ACR 2019 winner's "triplet" rule. Why a triplet instead of one threshold: the
metric scores an empty prediction on a negative image as a perfect 1, and 78 % of images are negative, so
a few false-positive pixels on a negative cost a whole point. The rule first asks "is there *confidently*
enough pneumothorax?" (at least `min_area` pixels above `top_score`); only then does it draw the lesion,
generously, with the low `bottom_score`, which recovers the faint edges a single high threshold cuts off.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

#: Image side at which the winner's min_area of 2000 pixels was tuned.
WINNER_SIZE = 1024


def _size_area(name: str, size: int | tuple[int, int]) -> int:
    sides = (size, size) if isinstance(size, numbers.Integral) and not isinstance(size, bool) else size
    if (
        not isinstance(sides, tuple)
        or len(sides) != 2
        or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in sides)
    ):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair of positive ints, got {size!r}")
    return int(sides[0]) * int(sides[1])


def scale_min_area(
    min_area: int, from_size: int | tuple[int, int] = WINNER_SIZE, to_size: int | tuple[int, int] = WINNER_SIZE
) -> int:
    """Express a pixel-count threshold tuned at `from_size` at the resolution `to_size`.

    Area scales with the pixel count, i.e. the square of the side ratio: the winner's 2000 px at 1024² is
    500 px at 512² and 125 px at 256². Rounded to the nearest integer (halves to even), so at very low
    resolutions the rule becomes coarse. Sizes are a side (square images) or (height, width).
    """
    if isinstance(min_area, bool) or not isinstance(min_area, numbers.Integral) or min_area < 0:
        raise ValueError(f"min_area must be an integer >= 0, got {min_area!r}")
    ratio = _size_area("to_size", to_size) / _size_area("from_size", from_size)
    return int(round(min_area * ratio))


@dataclass(frozen=True)
class TripletThreshold:
    """The SIIM winner's rule: empty unless ``count(prob > top_score) >= min_area``, else ``prob > bottom_score``.

    Defaults are the winner's values; `min_area` is in pixels of the probability map handed to `apply`
    (2000 was tuned at 1024x1024 -- use `at_size` or `scale_min_area` for other resolutions).
    Requires ``0 < bottom_score <= top_score < 1`` and ``min_area >= 0``.
    """

    top_score: float = 0.75
    min_area: int = 2000
    bottom_score: float = 0.3

    def __post_init__(self) -> None:
        for name in ("top_score", "bottom_score"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number in (0, 1), got {value!r}")
        if not 0.0 < self.bottom_score <= self.top_score < 1.0:
            raise ValueError(
                "need 0 < bottom_score <= top_score < 1, got "
                f"bottom_score={self.bottom_score!r}, top_score={self.top_score!r}"
            )
        if isinstance(self.min_area, bool) or not isinstance(self.min_area, numbers.Integral) or self.min_area < 0:
            raise ValueError(f"min_area must be an integer >= 0, got {self.min_area!r}")

    def at_size(
        self, to_size: int | tuple[int, int], from_size: int | tuple[int, int] = WINNER_SIZE
    ) -> TripletThreshold:
        """The same rule with `min_area` rescaled from `from_size` to `to_size` (see `scale_min_area`)."""
        area = scale_min_area(int(self.min_area), from_size, to_size)
        return TripletThreshold(self.top_score, area, self.bottom_score)

    def apply(self, prob: np.ndarray) -> np.ndarray:
        """Boolean mask for one 2-D probability map (values are not required to be in [0, 1])."""
        prob = np.asarray(prob)
        if prob.ndim != 2:
            raise ValueError(f"prob must be a 2-D probability map, got shape {prob.shape}")
        if not np.issubdtype(prob.dtype, np.floating):
            raise ValueError(f"prob must be a floating-point array, got dtype {prob.dtype}")
        if np.isnan(prob).any():
            raise ValueError("prob contains NaN")
        if np.count_nonzero(prob > self.top_score) < self.min_area:
            return np.zeros(prob.shape, dtype=bool)
        return prob > self.bottom_score
