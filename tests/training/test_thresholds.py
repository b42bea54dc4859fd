"""Grid search of the triplet rule against a brute-force evaluation with TripletThreshold.apply."""

from __future__ import annotations

import numpy as np
import pytest

from service.models.thresholds import TripletThreshold
from training.metrics import mean_dice
from training.thresholds import search_triplet


def _data() -> tuple[list[np.ndarray], list[np.ndarray]]:
    positive = np.zeros((32, 32), dtype=bool)
    positive[8:20, 8:20] = True  # 144 px
    prob_pos = np.full((32, 32), 0.05)
    prob_pos[9:19, 9:19] = 0.9  # confident core, 100 px
    prob_pos[8:20, 8:20][prob_pos[8:20, 8:20] < 0.5] = 0.4  # faint rim, 44 px
    negative = np.zeros((32, 32), dtype=bool)
    prob_neg = np.full((32, 32), 0.05)
    prob_neg[0:4, 0:5] = 0.85  # a confident 20-px false positive
    prob_neg[20:30, 20:30] = 0.5  # a large faint blob
    return [prob_pos, prob_neg], [positive, negative]


def test_search_finds_the_rule_that_keeps_negatives_empty_and_draws_the_rim() -> None:
    probs, truths = _data()
    best, score, table = search_triplet(probs, truths, tops=[0.6, 0.8], areas=[0, 50], bottoms=[0.3, 0.6])
    # min_area 50 drops the 20-px false positive; bottom 0.3 recovers the rim: both images perfect.
    # (0.8, 50, 0.3) scores 1.0 too; ties keep the first combination in loop order.
    assert best == TripletThreshold(0.6, 50, 0.3)
    assert score == pytest.approx(1.0)
    assert len(table) == 2 * 2 * 2  # every bottom <= every top here
    for row in table:
        rule = TripletThreshold(row["top_score"], row["min_area"], row["bottom_score"])
        expected = mean_dice([rule.apply(p) for p in probs], truths)
        assert row["mean_dice"] == pytest.approx(expected)


def test_invalid_combinations_are_skipped() -> None:
    probs, truths = _data()
    _, _, table = search_triplet(probs, truths, tops=[0.5], areas=[0], bottoms=[0.3, 0.7])
    assert [row["bottom_score"] for row in table] == [0.3]


def test_errors() -> None:
    probs, truths = _data()
    with pytest.raises(ValueError, match=r"no valid combination"):
        search_triplet(probs, truths, tops=[0.5], areas=[0], bottoms=[0.7])
    with pytest.raises(ValueError, match=r"min_area must be an integer >= 0, got -1"):
        search_triplet(probs, truths, tops=[0.5], areas=[-1], bottoms=[0.3])
    with pytest.raises(ValueError, match=r"got 2 probability maps for 1 ground-truth masks"):
        search_triplet(probs, truths[:1], tops=[0.5], areas=[0], bottoms=[0.3])


def test_streamed_search_treats_an_ungated_film_as_an_empty_answer():
    from training.thresholds import TripletSearch

    rng = np.random.default_rng(1)
    probs = [rng.random((16, 16)).astype(np.float32) for _ in range(4)]
    truths = [rng.random((16, 16)) > 0.7, np.zeros((16, 16), bool), rng.random((16, 16)) > 0.5,
              np.zeros((16, 16), bool)]
    streamed = TripletSearch([0.5, 0.9], [0, 10], [0.3, 0.5])
    for index, (prob, truth) in enumerate(zip(probs, truths)):
        streamed.add(None if index % 2 else prob, truth)
    zeroed = [p if i % 2 == 0 else np.zeros_like(p) for i, p in enumerate(probs)]
    assert streamed.best() == search_triplet(zeroed, truths, [0.5, 0.9], [0, 10], [0.3, 0.5])
