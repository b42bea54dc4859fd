"""Augmentation applied to image and mask together (albumentations), configured by strength.

The SIIM solutions leaned on heavy augmentation; the transforms here are theirs: horizontal flip,
shift-scale-rotate, brightness/contrast/gamma, CLAHE, grid/optical distortion, coarse dropout. Geometric
transforms move the mask with the image; photometric ones touch the image only; coarse dropout erases the
same holes from the mask (a lesion the image no longer shows must not be asked for). Everything runs on float32
images in [0, 1]: 8-bit quantisation would erase much of a 2 % lesion contrast.
"""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges; `strength` 0 disables everything (validation), 1 is the SIIM-style default."""

    strength: float = 1.0
    hflip: float = 0.5
    affine: float = 0.7
    rotate_deg: float = 10.0
    scale: float = 0.1
    shift: float = 0.0625
    photometric: float = 0.6
    clahe: float = 0.1
    distortion: float = 0.2
    dropout: float = 0.2

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"augmentation {name} must be a finite number >= 0, got {value}")
        for name in ("hflip", "affine", "photometric", "clahe", "distortion", "dropout"):
            if getattr(self, name) > 1:
                raise ValueError(f"augmentation probability {name} must be <= 1, got {getattr(self, name)}")


def build(config: AugmentConfig, size: int, seed: int = 0) -> A.Compose | None:
    """The pipeline for `size`-pixel training images, or None when `strength` is 0.

    albumentations keeps its own random generator per pipeline, untouched by numpy's or Python's seeds:
    `seed` is what makes a training run repeatable (DataLoader workers reseed their copies, see trainer).
    """
    s = config.strength
    if s <= 0:
        return None
    hole = max(2, size // 16)
    return A.Compose(
        [
            A.HorizontalFlip(p=config.hflip),
            A.Affine(
                scale=(1 - config.scale * s, 1 + config.scale * s),
                translate_percent=(-config.shift * s, config.shift * s),
                rotate=(-config.rotate_deg * s, config.rotate_deg * s),
                p=config.affine,
            ),
            A.OneOf(
                [
                    A.RandomBrightnessContrast(brightness_limit=0.1 * s, contrast_limit=0.15 * s),
                    A.RandomGamma(gamma_limit=(100 - 20 * s, 100 + 20 * s)),
                ],
                p=config.photometric,
            ),
            A.CLAHE(clip_limit=(1, 2), p=config.clahe),
            A.OneOf([A.GridDistortion(distort_limit=0.2 * s), A.OpticalDistortion(distort_limit=0.05 * s)],
                    p=config.distortion),
            A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(hole, 2 * hole),
                            hole_width_range=(hole, 2 * hole), fill=0.5, fill_mask=0.0, p=config.dropout),
        ],
        seed=seed,
    )


def apply(pipeline: A.Compose | None, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Augment one (image, mask) pair of float32 arrays; the identity when `pipeline` is None."""
    if pipeline is None:
        return image, mask
    out = pipeline(image=image, mask=mask)
    return np.clip(out["image"], 0.0, 1.0).astype(np.float32), out["mask"].astype(np.float32)
