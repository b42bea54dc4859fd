"""SIIM-ACR run-length encoding of binary masks.

The format of the SIIM-ACR Pneumothorax challenge (`train-rle.csv`, stage 2):

* pixels are numbered **column-major** (down the first column, then the next), the order in which the
  challenge's `mask2rle` walked a transposed image;
* the string is pairs ``start length``; each ``start`` counts the background pixels since the **end of the
  previous run** (for the first run: since the first pixel), so every start is relative;
* an empty mask is ``-1``.

The reference `mask2rle` dropped a run that reaches the last pixel (it only emitted a run when the next
background pixel closed it). `encode` emits that run; `decode` reads strings the reference produced because
they are simply strings without that last run.

Everything here is vectorised: the whole 12,954-row label file round-trips in seconds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

from service.errors import ServiceError

EMPTY = "-1"


class RLEError(ServiceError, ValueError):
    """A run-length string that does not describe a mask of the given size."""

    code, http_status = "invalid_rle", 422


def encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask (nonzero = foreground) as a SIIM relative, column-major RLE string.

    Only the columns that hold foreground are scanned, so an empty or small mask costs little.
    """
    if mask.ndim != 2:
        raise RLEError(f"mask must be 2-D, got shape {mask.shape}")
    mask = np.asarray(mask, dtype=bool)
    columns = np.flatnonzero(mask.any(axis=0))
    if columns.size == 0:
        return EMPTY
    first, last = int(columns[0]), int(columns[-1])
    flat = mask[:, first : last + 1].ravel(order="F")
    padded = np.concatenate(([False], flat, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1]) + first * mask.shape[0]
    starts, ends = edges[0::2], edges[1::2]
    gaps = starts.copy()
    gaps[1:] -= ends[:-1]
    pairs = np.empty(2 * starts.size, dtype=np.int64)
    pairs[0::2] = gaps
    pairs[1::2] = ends - starts
    return " ".join(map(str, pairs.tolist()))


_INTEGER = re.compile(r"-?[0-9]+")


def _parse(rle: str, total: int) -> np.ndarray | None:
    """Parse the integers of an RLE string; None for the empty mask.

    Every value is checked against `total` (the mask's pixel count) before it becomes an int64: a start or
    length beyond the mask can never be valid, and refusing it here keeps the running sums far from int64
    overflow, so no crafted string can wrap a sum around and make `decode` allocate beyond the image.
    """
    if not isinstance(rle, str):
        raise RLEError(f"RLE must be a string, got {type(rle).__name__}")
    text = rle.strip()
    if text in ("", EMPTY):
        return None
    tokens = text.split()
    for token in tokens:
        if not _INTEGER.fullmatch(token):
            raise RLEError(f"RLE holds a token that is not an integer (decimal digits): {token[:20]!r}")
        if len(token) > 20 or abs(int(token)) > total:
            raise RLEError(f"RLE value {token[:20]}{'…' if len(token) > 20 else ''} exceeds the mask's "
                           f"{total} pixels")
    if len(tokens) % 2:
        raise RLEError(f"RLE must hold start/length pairs, got an odd count of {len(tokens)} integers")
    return np.array([int(token) for token in tokens], dtype=np.int64)


def runs(rle: str, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Absolute column-major ``(starts, ends)`` of the runs of `rle`, checked against the mask size."""
    if height <= 0 or width <= 0:
        raise RLEError(f"mask size must be positive, got {height}x{width}")
    total = height * width
    values = _parse(rle, total)
    if values is None:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    gaps, lengths = values[0::2], values[1::2]
    if (gaps < 0).any():
        raise RLEError(f"RLE start {int(gaps[gaps < 0][0])} is negative")
    if (lengths <= 0).any():
        raise RLEError(f"RLE run length {int(lengths[lengths <= 0][0])} is not positive")
    ends = np.cumsum(gaps + lengths)
    starts = ends - lengths
    if ends[-1] > total:
        raise RLEError(f"RLE runs reach pixel {int(ends[-1])}, beyond the {height}x{width} mask ({total} pixels)")
    return starts, ends


def decode(rle: str, height: int, width: int) -> np.ndarray:
    """Decode a SIIM RLE string into a boolean ``(height, width)`` mask.

    The mask is built in Fortran (column-major) order, the order the runs are in, so filling it costs the
    number of foreground pixels rather than the image size.
    """
    starts, ends = runs(rle, height, width)
    flat = np.zeros(height * width, dtype=bool)
    if starts.size:
        lengths = ends - starts
        offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
        flat[offsets + np.arange(int(lengths.sum()))] = True
    return flat.reshape((width, height)).T


def decode_union(rles: Iterable[str], height: int, width: int) -> np.ndarray:
    """The union of several rows of one image (one row per instance in `train-rle.csv`)."""
    mask = np.zeros((height, width), dtype=bool)
    for rle in rles:
        mask |= decode(rle, height, width)
    return mask
