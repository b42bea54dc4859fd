"""The cascade's pure steps: the film-mask shortcut is exact, TTA is one 2N run, gating picks by score."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from service.cascade.masks import find_instances
from service.cascade.postprocess import film_mask, gated
from service.cascade.preprocess import to_original
from service.models.inference import classify_scores, segment_maps
from service.models.thresholds import TripletThreshold


class Recording:
    """A fake backend (unit test of our own logic): logits = mean of each image's left half minus right."""

    name = "recording"
    provider = "cpu"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(len(batch))
        half = batch.shape[-1] // 2
        return (batch[..., :half].mean(axis=(1, 2, 3)) - batch[..., half:].mean(axis=(1, 2, 3))).astype(np.float32)


def test_tta_is_one_run_of_twice_the_batch_and_averages_the_mirror():
    backend = Recording()
    batch = np.random.default_rng(1).random((3, 1, 32, 32)).astype(np.float32)
    scores = classify_scores(backend, batch, hflip_tta=True)
    assert backend.calls == [6]
    assert scores == pytest.approx([0.5] * 3, abs=1e-6)  # the mirror's logit is the negation: sigmoid pair sums to 1
    assert not np.allclose(classify_scores(backend, batch, hflip_tta=False), 0.5)


def test_segment_maps_mirror_back():
    class Identity:
        name, provider = "identity", "cpu"

        def run(self, batch):
            return np.array(batch)  # an equivariant "model": its logits are its input

    ramp = np.broadcast_to(np.arange(8, dtype=np.float32) - 4, (2, 1, 8, 8))
    maps = segment_maps(Identity(), ramp, hflip_tta=True)
    assert maps.shape == (2, 8, 8)
    # The mirrored pass is flipped back before averaging, so an equivariant model gives its plain answer;
    # averaging without the flip back would give a symmetric map instead.
    assert np.allclose(maps[0, 0], 1 / (1 + np.exp(-(np.arange(8) - 4))))


def test_gated_picks_scores_at_or_above_the_gate():
    assert gated(np.array([0.1, 0.5, 0.2, 0.9]), 0.2).tolist() == [1, 2, 3]


@settings(max_examples=60, deadline=None)
@given(peak=st.floats(0.05, 0.99), rows=st.sampled_from([256, 300, 512]), seed=st.integers(0, 10**6))
def test_film_mask_shortcut_equals_the_full_computation(peak, rows, seed):
    rng = np.random.default_rng(seed)
    probability = (ndimage.gaussian_filter(rng.random((64, 64)), 3) * 0).astype(np.float32)
    probability[20:40, 10:30] = peak * rng.random((20, 20)).astype(np.float32)
    rule = TripletThreshold(0.5, 50, 0.3)
    mask, found_peak = film_mask(probability, rows, rows + 10, rule, reference_size=256)
    full = rule.at_size((rows, rows + 10), from_size=256).apply(to_original(probability, rows, rows + 10))
    assert np.array_equal(mask, full)
    assert found_peak == pytest.approx(float(probability.max()))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), density=st.floats(0.0, 0.3))
def test_instances_match_a_whole_image_reference(seed, density):
    rng = np.random.default_rng(seed)
    mask = np.zeros((64, 80), dtype=bool)
    mask[5:60, 7:70] = rng.random((55, 63)) < density
    found = find_instances(mask, (0.5, 0.25))
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    assert len(found) == count and sum(i.area_px for i in found) == int(mask.sum())
    reference = {}
    for number in range(1, count + 1):
        ys, xs = np.nonzero(labels == number)
        reference[(int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1, ys.size)] = (xs.mean(), ys.mean())
    for instance in found:
        key = (*instance.bbox_px, instance.area_px)
        assert key in reference
        assert instance.centroid_px == pytest.approx(reference[key])
        assert instance.area_mm2 == pytest.approx(instance.area_px * 0.125)
