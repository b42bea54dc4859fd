"""Augmentation moves the mask with the image, leaves photometric changes to the image, and can be off."""

from __future__ import annotations

import random

import numpy as np
import pytest

from training import augment


def _pair() -> tuple[np.ndarray, np.ndarray]:
    image = np.full((128, 128), 0.3, dtype=np.float32)
    mask = np.zeros((128, 128), dtype=np.float32)
    image[20:50, 10:40] = 0.9
    mask[20:50, 10:40] = 1.0
    return image, mask


def test_geometric_transforms_move_the_mask_with_the_image():
    random.seed(0)
    np.random.seed(0)
    pipeline = augment.build(augment.AugmentConfig(photometric=0, clahe=0, dropout=0), 128)
    for _ in range(20):
        image, mask = augment.apply(pipeline, *_pair())
        bright = image > 0.6
        assert mask.dtype == np.float32 and image.dtype == np.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        overlap = np.logical_and(bright, mask > 0.5).sum() / max(1, (mask > 0.5).sum())
        assert overlap > 0.9, "the lesion and its mask moved together"


def test_photometric_transforms_leave_the_mask_alone():
    pipeline = augment.build(augment.AugmentConfig(hflip=0, affine=0, distortion=0, dropout=0, photometric=1,
                                                   clahe=1), 128)
    image, mask = _pair()
    out_image, out_mask = augment.apply(pipeline, image, mask)
    np.testing.assert_array_equal(out_mask, mask)
    assert not np.array_equal(out_image, image)


def test_strength_zero_is_the_identity_and_bad_values_are_refused():
    assert augment.build(augment.AugmentConfig(strength=0), 128) is None
    image, mask = _pair()
    out_image, out_mask = augment.apply(None, image, mask)
    assert out_image is image and out_mask is mask
    with pytest.raises(ValueError, match="probability hflip must be <= 1"):
        augment.AugmentConfig(hflip=1.5)
    with pytest.raises(ValueError, match="rotate_deg must be a finite number >= 0"):
        augment.AugmentConfig(rotate_deg=-1)


def test_coarse_dropout_erases_the_same_holes_from_the_mask():
    pipeline = augment.build(augment.AugmentConfig(hflip=0, affine=0, photometric=0, clahe=0, distortion=0,
                                                   dropout=1), 128, seed=3)
    image, mask = np.full((128, 128), 0.3, np.float32), np.ones((128, 128), np.float32)
    out_image, out_mask = augment.apply(pipeline, image, mask)
    holes = out_image == 0.5
    assert holes.any()
    np.testing.assert_array_equal(out_mask == 0, holes)
