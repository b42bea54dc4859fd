"""The geometry of the two contrasts a synthetic pneumothorax must carry, and how they are measured.

Why a module of its own: the generator calibrates each lesion so that the contrast *measured on the final
image* lands in the sampled target, and that only means something if the measurement is pinned down.
All contrasts are fractions of the display range [0, 1] (not ratios of grey levels):

* lesion contrast = mean(ring) - mean(lesion), where the ring is aerated-lung pixels at a distance
  (w + gap, w + gap + ring] from the lesion (w = pleural line width), i.e. lung just outside the lesion,
  beyond the pleural line;
* line contrast = mean(line) - mean(surround), where the line is lung pixels at distance (0, w] from the
  lesion (the visceral pleura on the side facing the collapsed lung; the chest-wall side has no lung, so
  it gets no line), and the surround is lung-or-lesion pixels within `surround` px of the line.

Distances are Euclidean (scipy.ndimage.distance_transform_edt); widths scale with the image size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Bands:
    """Band widths in pixels for one image size."""

    gap: int
    ring: int
    surround: int

    @classmethod
    def for_size(cls, size: int) -> Bands:
        """Widths chosen at 1024 px (gap 2, ring 12, surround 4) and scaled, with a floor that keeps them visible."""
        return cls(gap=max(1, round(2 * size / 1024)), ring=max(3, round(12 * size / 1024)),
                   surround=max(2, round(4 * size / 1024)))

    def margin(self, width: int) -> int:
        """How far from a lesion its measurement bands reach."""
        return width + self.gap + self.ring + self.surround + 1


@dataclass
class Regions:
    """Boolean masks (all the same shape, usually a crop) of one lesion's measurement regions."""

    lesion: np.ndarray
    line: np.ndarray
    ring: np.ndarray
    surround: np.ndarray


def regions(lesion: np.ndarray, lung: np.ndarray, width: int, bands: Bands) -> Regions:
    """Line, ring and line-surround of `lesion` inside the aerated `lung` (lesion must be a subset of lung)."""
    outside = ndimage.distance_transform_edt(~lesion)
    line = lung & ~lesion & (outside <= width)
    ring = lung & ~lesion & (outside > width + bands.gap) & (outside <= width + bands.gap + bands.ring)
    to_line = ndimage.distance_transform_edt(~line) if line.any() else np.full(line.shape, np.inf)
    surround = lung & ~line & (to_line <= bands.surround)
    return Regions(lesion=lesion, line=line, ring=ring, surround=surround)


def lesion_contrast(image: np.ndarray, reg: Regions) -> float:
    """How much darker the lesion is than the lung ring around it (fraction of the display range)."""
    return float(image[reg.ring].mean() - image[reg.lesion].mean())


def line_contrast(image: np.ndarray, reg: Regions) -> float:
    """How much brighter the pleural line is than its immediate surroundings (fraction of the display range)."""
    return float(image[reg.line].mean() - image[reg.surround].mean())


def crop_box(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    """The bounding box of `mask` grown by `margin` pixels, clipped to the image: where morphology must run."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("crop_box needs a non-empty mask")
    h, w = mask.shape
    return (slice(max(0, rows[0] - margin), min(h, rows[-1] + margin + 1)),
            slice(max(0, cols[0] - margin), min(w, cols[-1] + margin + 1)))
