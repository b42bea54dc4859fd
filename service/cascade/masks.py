"""Binary masks → instances (connected components with boxes, areas, centroids), and millimetre morphology.

Sizes in millimetres need the radiograph's pixel spacing; where it is unknown the mm fields are None and
mm morphology is not applied (the caller records why), never computed with an invented 1.0 mm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# 8-connectivity: a pneumothorax rim one pixel wide running diagonally is still one instance.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Instance:
    """One connected component of a mask. Boxes are [x, y, width, height] (x = column, y = row)."""

    bbox_px: tuple[int, int, int, int]
    area_px: int
    centroid_px: tuple[float, float]
    bbox_mm: tuple[float, float, float, float] | None
    area_mm2: float | None


def find_instances(mask: np.ndarray, spacing_mm: tuple[float, float] | None, min_area_px: int = 1) -> list[Instance]:
    """Connected components of `mask`, largest first. `spacing_mm` is (row, column) spacing or None.

    Labels only the mask's bounding box: a lesion covers a few % of a 1024² film, and labelling plus
    per-component statistics over the whole film cost ~40 ms where the crop costs ~1 ms.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    rows_hit, columns_hit = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows_hit.size == 0:
        return []
    top, left = int(rows_hit[0]), int(columns_hit[0])
    crop = mask[top: int(rows_hit[-1]) + 1, left: int(columns_hit[-1]) + 1]
    labels, _ = ndimage.label(crop, structure=_EIGHT_CONNECTED)
    instances = []
    for number, slices in enumerate(ndimage.find_objects(labels), start=1):
        ys, xs = np.nonzero(labels[slices] == number)
        area = int(ys.size)
        if area < min_area_px:
            continue
        rows, cols = slices
        x, y = left + cols.start, top + rows.start
        w, h = cols.stop - cols.start, rows.stop - rows.start
        cx, cy = x + float(xs.mean()), y + float(ys.mean())
        bbox_mm = area_mm2 = None
        if spacing_mm is not None:
            dy, dx = spacing_mm
            bbox_mm = (x * dx, y * dy, w * dx, h * dy)
            area_mm2 = float(area) * dx * dy
        instances.append(
            Instance(
                bbox_px=(int(x), int(y), int(w), int(h)),
                area_px=area,
                centroid_px=(cx, cy),
                bbox_mm=bbox_mm,
                area_mm2=area_mm2,
            )
        )
    instances.sort(key=lambda inst: inst.area_px, reverse=True)
    return instances


@dataclass(frozen=True)
class MillimetreMorphology:
    """Post-processing in physical units (Basel pneumothorax paper: dilate 10 mm, erode 7 mm, drop < 80 mm²).

    Dilation then erosion closes gaps along a thin rim and grows the mask by ~3 mm net; removing small
    components drops specks. Done with Euclidean distance transforms sampled at the pixel spacing, so the
    structuring element is an exact disc in millimetres even for anisotropic pixels, at O(pixels) cost
    (a 10 mm disc at 0.14 mm is 143 px wide: far too slow as a binary_dilation structure).
    """

    dilate_mm: float = 10.0
    erode_mm: float = 7.0
    min_area_mm2: float = 80.0

    def __post_init__(self) -> None:
        for name in ("dilate_mm", "erode_mm", "min_area_mm2"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")

    def apply(self, mask: np.ndarray, spacing_mm: tuple[float, float]) -> np.ndarray:
        """The refined mask; `spacing_mm` (row, column) must be known."""
        if spacing_mm is None or not all(s > 0 for s in spacing_mm):
            raise ValueError(f"millimetre morphology needs a positive pixel spacing, got {spacing_mm}")
        out = np.asarray(mask, dtype=bool)
        if not out.any():
            return out.copy()
        if self.dilate_mm > 0:
            out = ndimage.distance_transform_edt(~out, sampling=spacing_mm) <= self.dilate_mm
        if self.erode_mm > 0:
            # Outside the image counts as foreground, so a lesion touching the border is not eaten from that side.
            padded = np.pad(out, 1, mode="edge")
            out = (ndimage.distance_transform_edt(padded, sampling=spacing_mm) > self.erode_mm)[1:-1, 1:-1]
        if self.min_area_mm2 > 0:
            out = remove_small(out, self.min_area_mm2 / (spacing_mm[0] * spacing_mm[1]))
        return out


def remove_small(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    """Drop 8-connected components smaller than `min_area_px` pixels."""
    labels, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if count == 0:
        return np.zeros_like(mask, dtype=bool)
    areas = np.bincount(labels.ravel())
    keep = areas >= min_area_px
    keep[0] = False
    return keep[labels]
