"""Where lesion shapes come from: real SIIM-ACR instance masks, or procedural crescents and apical caps.

Why real shapes: a pneumothorax outline (thin lateral crescent, apical cap, basal/medial pockets, ragged
annotator edges) is hard to invent, and a detector trained on invented outlines learns the inventor's
habits. The SIIM label file holds 3,576 annotated instances. Decoding all of them at 1024x1024 would cost
gigabytes per worker, so the bank keeps only the RLE strings (about 5 MB) and decodes one when drawn.

Every shape is expressed in the SIIM frame: 1024x1024 pixels with the lungs of a typical SIIM film in the
`CANONICAL_LUNG_BOX` of each side. `lesions.py` maps that box onto the synthetic lung.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.cascade.rle import EMPTY, decode

SIIM_SIZE = 1024
HEADER = ["ImageId", " EncodedPixels"]
# (x0, y0, x1, y1) of the lung fields of a typical SIIM PA film, image-left then image-right; estimated from
# the envelope of the SIIM instance masks of each side (2nd-98th percentile of their bounding boxes).
CANONICAL_LUNG_BOX = ((110, 90, 500, 830), (530, 90, 920, 830))


class ShapeSourceError(ValueError):
    """The shape file is missing or is not a SIIM-format RLE CSV."""


@dataclass(frozen=True)
class Shape:
    """One instance mask cropped to its bounding box, `box` = (x0, y0, x1, y1) in the SIIM frame."""

    mask: np.ndarray
    box: tuple[int, int, int, int]
    side: int  # 0 image-left, 1 image-right
    source: str


def _crop(mask: np.ndarray, source: str) -> Shape:
    """Crop a full-frame mask to its bounding box and decide its side from the box centre."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    side = 0 if (x0 + x1) / 2 < SIIM_SIZE / 2 else 1
    return Shape(mask=mask[y0:y1, x0:x1].copy(), box=(x0, y0, x1, y1), side=side, source=source)


class ShapeBank:
    """The positive rows of a SIIM `train-rle.csv`, decoded lazily one instance at a time."""

    kind = "siim"

    def __init__(self, path: Path, rows: list[tuple[int, str]]):
        if not rows:
            raise ShapeSourceError(f"{path} holds no positive (non -1) rows to take lesion shapes from")
        self.path = path
        self.rows = rows

    @classmethod
    def from_csv(cls, path: Path) -> ShapeBank:
        """Read a .csv or .csv.gz in the SIIM layout; keep only the positive rows (line number, RLE)."""
        if not path.is_file():
            raise ShapeSourceError(f"shape file {path} does not exist")
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        reader = csv.reader(io.StringIO(raw.decode("utf-8")))
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != [h.strip() for h in HEADER]:
            raise ShapeSourceError(f"{path} does not start with the SIIM header 'ImageId, EncodedPixels': {header}")
        rows = [(n, rle) for n, (_, rle) in enumerate(reader, start=2) if rle.strip() not in ("", EMPTY)]
        return cls(path, rows)

    def sample(self, rng: np.random.Generator) -> Shape:
        """Decode one randomly drawn instance (a few ms at 1024x1024)."""
        line, rle = self.rows[int(rng.integers(len(self.rows)))]
        return _crop(decode(rle, SIIM_SIZE, SIIM_SIZE), f"{self.path.name}:line{line}")

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "positive_rows": len(self.rows)}


class ProceduralShapes:
    """Crescents along the lateral chest wall and apical caps, drawn in the SIIM frame.

    Each is the part of the canonical lung ellipse outside a smaller ellipse shifted away from the wall, so
    the lesion is thickest at the wall/apex and tapers to nothing, as a pneumothorax rim does.
    """

    kind = "procedural"

    def sample(self, rng: np.random.Generator) -> Shape:
        side = int(rng.integers(2))
        x0, y0, x1, y1 = CANONICAL_LUNG_BOX[side]
        w, h = x1 - x0, y1 - y0
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        u, v = (xx + 0.5) / w * 2 - 1, (yy + 0.5) / h * 2 - 1
        outer = u * u + v * v < 1.0
        depth = float(rng.uniform(0.08, 0.35))
        kind = "apical_cap" if rng.random() < 0.4 else "lateral_crescent"
        if kind == "apical_cap":
            du, dv = 0.0, 2 * depth
            keep = v < rng.uniform(-0.3, 0.2)
        else:
            du, dv = (2 * depth if side == 0 else -2 * depth), depth * rng.uniform(-0.5, 0.5)
            keep = v < rng.uniform(0.2, 0.8)
        scale = 1.0 - 0.5 * depth
        inner = ((u - du) / scale) ** 2 + ((v - dv) / scale) ** 2 < 1.0
        mask = np.zeros((SIIM_SIZE, SIIM_SIZE), dtype=bool)
        mask[y0:y1, x0:x1] = outer & ~inner & keep
        if not mask.any():
            mask[y0 : y0 + 4, (x0 + x1) // 2 : (x0 + x1) // 2 + 4] = True
        return _crop(mask, f"procedural:{kind}:depth={depth:.3f}")

    def describe(self) -> dict:
        return {"kind": self.kind, "shapes": ["lateral_crescent", "apical_cap"]}
