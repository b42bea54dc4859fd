"""The SIIM winner's triplet rule: validation, the min_area boundary and resolution scaling."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from service.models.thresholds import TripletThreshold, scale_min_area


def _prob_map(n_confident: int, n_faint: int, shape: tuple[int, int] = (64, 64)) -> np.ndarray:
    """`n_confident` pixels at 0.8 (> top 0.75), then `n_faint` at 0.5 (between bottom and top), rest 0.1."""
    prob = np.full(shape[0] * shape[1], 0.1, dtype=np.float32)
    prob[:n_confident] = 0.8
    prob[n_confident : n_confident + n_faint] = 0.5
    return prob.reshape(shape)


def test_defaults_are_the_winners() -> None:
    rule = TripletThreshold()
    assert (rule.top_score, rule.min_area, rule.bottom_score) == (0.75, 2000, 0.3)


def test_min_area_boundary() -> None:
    rule = TripletThreshold(top_score=0.75, min_area=100, bottom_score=0.3)
    at_boundary = rule.apply(_prob_map(100, 50))
    assert at_boundary.dtype == bool and at_boundary.shape == (64, 64)
    assert at_boundary.sum() == 150  # drawn generously with the bottom score: confident + faint pixels
    assert not rule.apply(_prob_map(99, 50)).any()  # one confident pixel short: empty


def test_thresholds_are_strict() -> None:
    prob = np.full((8, 8), 0.75, dtype=np.float64)  # equal to top: not counted
    assert not TripletThreshold(0.75, 1, 0.3).apply(prob).any()
    prob[0, 0] = 0.76
    mask = TripletThreshold(0.75, 1, 0.75).apply(prob)  # bottom == top allowed; 0.75 itself excluded
    assert mask.sum() == 1 and mask[0, 0]


def test_min_area_zero_means_no_gate() -> None:
    mask = TripletThreshold(0.75, 0, 0.3).apply(_prob_map(0, 10))
    assert mask.sum() == 10


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_score": 1.0}, r"need 0 < bottom_score <= top_score < 1, got bottom_score=0.3, top_score=1.0"),
        ({"bottom_score": 0.0}, r"need 0 < bottom_score <= top_score < 1, got bottom_score=0.0"),
        ({"top_score": 0.5, "bottom_score": 0.6}, r"bottom_score=0.6, top_score=0.5"),
        ({"top_score": float("nan")}, r"top_score must be a finite number in \(0, 1\), got nan"),
        ({"min_area": -1}, r"min_area must be an integer >= 0, got -1"),
        ({"min_area": 2.5}, r"min_area must be an integer >= 0, got 2.5"),
    ],
)
def test_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TripletThreshold(**kwargs)


def test_apply_errors() -> None:
    rule = TripletThreshold()
    with pytest.raises(ValueError, match=r"prob must be a 2-D probability map, got shape \(1, 8, 8\)"):
        rule.apply(np.zeros((1, 8, 8)))
    with pytest.raises(ValueError, match=r"prob contains NaN"):
        rule.apply(np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match=r"floating-point array, got dtype bool"):
        rule.apply(np.zeros((4, 4), dtype=bool))


def test_frozen() -> None:
    with pytest.raises(AttributeError, match=r"cannot assign to field 'min_area'"):
        TripletThreshold().min_area = 5  # type: ignore[misc]


def test_scale_min_area() -> None:
    assert scale_min_area(2000, 1024, 1024) == 2000
    assert scale_min_area(2000, 1024, 512) == 500
    assert scale_min_area(2000, 1024, 256) == 125
    assert scale_min_area(2000, 1024, (512, 256)) == 250
    assert scale_min_area(125, 256, 1024) == 2000
    assert TripletThreshold().at_size(512) == TripletThreshold(0.75, 500, 0.3)
    with pytest.raises(ValueError, match=r"to_size must be a positive int or a \(height, width\) pair"):
        scale_min_area(2000, 1024, 0)
    with pytest.raises(ValueError, match=r"min_area must be an integer >= 0, got -5"):
        scale_min_area(-5, 1024, 512)


def test_serving_module_does_not_import_torch() -> None:
    code = "import sys, service.models.thresholds; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
