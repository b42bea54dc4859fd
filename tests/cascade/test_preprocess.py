"""Model input preparation and the way back to the radiograph's resolution."""

from __future__ import annotations

import numpy as np
import pytest

from service.cascade.preprocess import (
    mask_to_input,
    resize,
    to_batch,
    to_input,
    to_original,
)
from service.models.input_spec import InputSpec


def test_input_is_resized_and_normalised_per_spec():
    pixels = np.full((1024, 800), 0.75, dtype=np.float32)
    spec = InputSpec(size=256, mean=0.5, std=0.25, channels=3)
    batch = to_batch([pixels, pixels * 0], spec)
    assert batch.shape == (2, 3, 256, 256) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[0], 1.0, atol=1e-6)  # (0.75 - 0.5) / 0.25
    np.testing.assert_allclose(batch[1], -2.0, atol=1e-6)


def test_shrinking_is_antialiased():
    stripes = np.zeros((1024, 1024), dtype=np.float32)
    stripes[:, ::2] = 1.0  # one-pixel stripes: aliasing would keep 0/1 values
    small = resize(stripes, 256, 256)
    assert small.std() < 0.01 and small.mean() == pytest.approx(0.5, abs=0.01)


def test_mask_coverage_and_the_way_back():
    mask = np.zeros((1024, 1024), dtype=bool)
    mask[100:300, 400:600] = True
    coverage = mask_to_input(mask, 256)
    assert coverage.max() == pytest.approx(1.0) and coverage.sum() == pytest.approx(mask.sum() / 16, rel=0.01)
    back = to_original(coverage, 1024, 1024) > 0.5
    assert (back ^ mask).sum() / mask.sum() < 0.03, "geometry survives the round trip"


def test_single_film_input_shape():
    assert to_input(np.zeros((300, 400), np.float32), InputSpec(size=64)).shape == (1, 64, 64)


@pytest.mark.parametrize("kwargs,match", [({"size": 100}, "multiple of 32"), ({"size": 64, "std": 0}, "std must be positive"),
                                          ({"size": 64, "channels": 2}, "channels must be 1 or 3")])
def test_spec_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InputSpec(**kwargs)
