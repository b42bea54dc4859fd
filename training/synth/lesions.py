"""Placing real pneumothorax shapes in the synthetic lung and rendering them as a radiologist sees them.

A pneumothorax is air between the chest wall and a collapsed lung: no vessels cross it, it is a little
darker than the aerated lung next to it, and the collapsed lung's surface (visceral pleura) shows as a thin
bright line on the side facing the lung. The contrasts are calibrated on the final image (noise included)
so that what `contrast.py` measures lands in the target drawn for the lesion; the mask written to the CSV
is exactly the set of darkened, marking-free pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy import ndimage

from training.synth import contrast
from training.synth.anatomy import Anatomy
from training.synth.shapes import CANONICAL_LUNG_BOX, ProceduralShapes, ShapeBank

# Target ranges at `realistic` difficulty, in fractions of the display range (see contrast.py).
LESION_CONTRAST = (0.02, 0.10)
LINE_CONTRAST = (0.05, 0.15)
DIFFICULTY_SCALE = {"realistic": 1.0, "easy": 2.0, "hard": 0.5}
MAX_TRIES = 60


@dataclass
class Lesion:
    """One pneumothorax instance at the output size; `mask` is full-size and is what the CSV row encodes."""

    mask: np.ndarray
    side: int
    source: str
    line_width: int
    lesion_target: float
    line_target: float
    measured: dict = field(default_factory=dict)


def _lung_box(lung: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(lung.any(axis=1))
    cols = np.flatnonzero(lung.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _map_shape(shape, lung: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Affine map (scale + shift, jittered) from the canonical SIIM lung box onto this lung's box."""
    size = lung.shape[0]
    cx0, cy0, cx1, cy1 = CANONICAL_LUNG_BOX[shape.side]
    tx0, ty0, tx1, ty1 = _lung_box(lung)
    sx = (tx1 - tx0) / (cx1 - cx0) * rng.uniform(0.9, 1.1)
    sy = (ty1 - ty0) / (cy1 - cy0) * rng.uniform(0.9, 1.1)
    x0, y0, x1, y1 = shape.box
    nx0 = int(round(tx0 + (x0 - cx0) * sx + rng.normal(0, 0.01) * size))
    ny0 = int(round(ty0 + (y0 - cy0) * sy + rng.normal(0, 0.01) * size))
    nw, nh = max(1, int(round((x1 - x0) * sx))), max(1, int(round((y1 - y0) * sy)))
    small = cv2.resize(shape.mask.astype(np.uint8) * 255, (nw, nh), interpolation=cv2.INTER_LINEAR) > 127
    out = np.zeros_like(lung)
    ys, xs = slice(max(0, ny0), min(size, ny0 + nh)), slice(max(0, nx0), min(size, nx0 + nw))
    if ys.start < ys.stop and xs.start < xs.stop:
        out[ys, xs] = small[ys.start - ny0 : ys.stop - ny0, xs.start - nx0 : xs.stop - nx0]
    return out


def _acceptable(mask: np.ndarray, lung: np.ndarray, width: int, bands: contrast.Bands) -> bool:
    """Big enough, mostly inside the lung, and with enough lung around it to show a line and a ring."""
    size = lung.shape[0]
    if mask.sum() < 0.0015 * size * size:
        return False
    box = contrast.crop_box(mask, bands.margin(width))
    reg = contrast.regions(mask[box], lung[box], width, bands)
    return reg.line.sum() >= 0.02 * size and reg.ring.sum() >= 0.1 * size


def place_lesions(rng: np.random.Generator, anatomy: Anatomy, source: ShapeBank | ProceduralShapes,
                  count: int, difficulty: str) -> list[Lesion]:
    """Draw `count` disjoint, well-separated lesions; each keeps its own line width and contrast targets."""
    size = anatomy.base.shape[0]
    scale = DIFFICULTY_SCALE[difficulty]
    bands = contrast.Bands.for_size(size)
    lung_all = anatomy.lung_side > 0
    lesions: list[Lesion] = []
    for _ in range(MAX_TRIES):
        if len(lesions) == count:
            break
        shape = source.sample(rng)
        lung = anatomy.lung_side == shape.side + 1
        width = max(1, int(round(rng.uniform(1.0, 3.0) * size / 1024)))
        mapped = _map_shape(shape, lung, rng)
        mask = mapped & lung
        if mapped.sum() == 0 or mask.sum() < 0.6 * mapped.sum() or not _acceptable(mask, lung_all, width, bands):
            continue
        if lesions:
            taken = np.zeros_like(mask)
            for other in lesions:
                taken |= other.mask
            gap = 2 * bands.margin(max(width, max(o.line_width for o in lesions)))
            if ndimage.distance_transform_edt(~taken)[mask].min() <= gap:
                continue
        lesions.append(Lesion(mask=mask, side=shape.side, source=shape.source, line_width=width,
                              lesion_target=float(rng.uniform(*LESION_CONTRAST) * scale),
                              line_target=float(rng.uniform(*LINE_CONTRAST) * scale)))
    if not lesions:
        raise RuntimeError(f"no lesion shape fitted the synthetic lung in {MAX_TRIES} tries")
    return lesions


def compose(anatomy: Anatomy, lesions: list[Lesion], noise: np.ndarray) -> np.ndarray:
    """Final display image in [0, 1]: anatomy, markings except inside lesions, noise, calibrated lesions."""
    image = anatomy.base + anatomy.markings
    for lesion in lesions:
        image[lesion.mask] = anatomy.base[lesion.mask]
    image += noise
    np.clip(image, 0.0, 1.0, out=image)
    lung_all = anatomy.lung_side > 0
    bands = contrast.Bands.for_size(image.shape[0])
    for lesion in lesions:
        box = contrast.crop_box(lesion.mask, bands.margin(lesion.line_width))
        reg = contrast.regions(lesion.mask[box], lung_all[box], lesion.line_width, bands)
        view = image[box]
        for _ in range(4):  # additive and nearly linear: converges in one or two steps (clipping aside)
            view[reg.lesion] -= lesion.lesion_target - contrast.lesion_contrast(view, reg)
            np.clip(view, 0.0, 1.0, out=view)
            view[reg.line] += lesion.line_target - contrast.line_contrast(view, reg)
            np.clip(view, 0.0, 1.0, out=view)
    return image


def measure(display: np.ndarray, anatomy: Anatomy, lesions: list[Lesion]) -> None:
    """Record the contrasts measured on the final (quantised) display image into each lesion."""
    lung_all = anatomy.lung_side > 0
    bands = contrast.Bands.for_size(display.shape[0])
    for lesion in lesions:
        box = contrast.crop_box(lesion.mask, bands.margin(lesion.line_width))
        reg = contrast.regions(lesion.mask[box], lung_all[box], lesion.line_width, bands)
        lesion.measured = {"lesion_contrast": round(contrast.lesion_contrast(display[box], reg), 5),
                           "line_contrast": round(contrast.line_contrast(display[box], reg), 5),
                           "area_px": int(lesion.mask.sum())}
