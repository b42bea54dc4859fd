"""Model inputs from pixels decoded at a reduced resolution, matching the ones a full decode gives (issue 15 §1).

A full decode reaches the model through Pillow's bilinear resize, antialiased when shrinking: each input pixel
is a triangle-weighted mean of the film's pixels (`pillow_bilinear`, Pillow's own weights). Pixels decoded at
a reduced resolution (`PixelGrid`) each stand for a factor x factor patch of the film, so the input is built
from them with the same film-pixel weights, summed over each patch (`grid_weights`): the triangle the full
path would apply, on the patches the decoder averaged. Where a patch is centred (JPEG 2000's low-pass band
samples the even film pixels, not the middles of blocks) the patches are shifted half a factor: without that
the inputs sit 1.5 film pixels off at a quarter size.

Measured on the demo models (`python -m load_tests.bench_reduced_decode`, docs/benchmarks.md): from a JPEG 2000
level at the model input, Pillow's plain resize of the level moved synthetic films' scores by up to 0.23 and
left masks of Dice 0.74 to the full decode's; these weights, 0.06 and 0.97 (on a film whose score moves by 0.03
under input noise of a quarter of an 8-bit grey level); the real films' scores moved by 0.003 or less.

The weights are sparse (a few per input pixel) and cached per film size, factor and input size: an input is
two sparse products, ~0.2 ms from a 532x500 level. Every resize of the cascade runs this way
(`resample`: Pillow's weights, a film to a model input and a map back to a film): 1.0 ms against Pillow's own
1.6 ms from 1024², 1.3 against 6.4 ms from 2128x2000 (thread CPU time), the same values to within 2e-7 (sums in
float32, Pillow's in float64); and a window of a resize is the same window of the whole one, to the bit.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import sparse

from service.imaging.radiograph import PixelGrid


def pillow_bilinear(in_size: int, out_size: int) -> sparse.csr_matrix:
    """Pillow's bilinear resampling weights from `in_size` to `out_size` samples, (out_size, in_size).

    As Pillow's `precompute_coeffs` makes them (libImaging/Resample.c): the triangle filter widened by the
    shrink factor (antialiasing), centred on each output pixel, clipped to the image and normalised.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = filterscale  # the bilinear filter's support is 1.0, widened when shrinking
    center = (np.arange(out_size) + 0.5) * scale
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C's (int) truncates, as astype does
    stop = np.minimum((center + support + 0.5).astype(np.int64), in_size)
    taps = first[:, None] + np.arange(int((stop - first).max()))[None, :]
    weights = np.clip(1.0 - np.abs((taps - center[:, None] + 0.5) / filterscale), 0.0, None)
    weights[taps >= stop[:, None]] = 0.0
    weights /= weights.sum(axis=1, keepdims=True)
    rows = np.broadcast_to(np.arange(out_size)[:, None], taps.shape)
    keep = weights > 0
    return sparse.csr_matrix((weights[keep], (rows[keep], taps[keep])), shape=(out_size, in_size))


def patches(side: int, factor: int, centred: bool) -> sparse.csr_matrix:
    """Which reduced pixel each film pixel belongs to, (side, ceil(side / factor)), by overlap.

    Reduced pixel k covers [k·factor, (k+1)·factor) in film pixel coordinates, shifted by 1/2 - factor/2 where
    `centred`; film pixels beyond the first or last patch belong to it (decoders extend the edge).
    """
    count = -(-side // factor)
    shift = 0.5 - factor / 2 if centred else 0.0
    left = np.arange(side, dtype=np.float64)
    first = np.clip(np.floor((left - shift) / factor), 0, count - 1).astype(np.int64)
    second = np.clip(first + 1, 0, count - 1)
    boundary = (first + 1) * factor + shift  # where the first patch ends
    in_second = np.clip(left + 1 - boundary, 0.0, 1.0) * (second != first)
    rows = np.concatenate([np.arange(side), np.arange(side)])
    columns = np.concatenate([first, second])
    values = np.concatenate([1.0 - in_second, in_second])
    keep = values > 0
    return sparse.csr_matrix((values[keep], (rows[keep], columns[keep])), shape=(side, count))


@lru_cache(maxsize=64)
def bilinear_weights(in_size: int, out_size: int) -> sparse.csr_matrix:
    """`pillow_bilinear` in float32, cached: the weights from a film side to a model input side, or back."""
    return sparse.csr_matrix(pillow_bilinear(in_size, out_size).astype(np.float32))


def resample(image: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Pillow's bilinear resize of a 2-D float image (`preprocess.resize`), as two sparse products."""
    return resample_window(image, rows, columns, (0, rows, 0, columns))


def resample_window(image: np.ndarray, rows: int, columns: int, window: tuple[int, int, int, int]) -> np.ndarray:
    """`resample(image, rows, columns)[top:bottom, left:right]`, computing only that window: each output pixel is
    summed from the same weights in the same order as in the whole resize, so the window is the same to the bit."""
    top, bottom, left, right = window
    down = bilinear_weights(image.shape[0], rows)[top:bottom] @ np.asarray(image, dtype=np.float32)
    if image.shape[1] % columns == 0 and image.shape[1] > columns:  # shrinking by an integer factor
        return _across_by_views(down, columns, left, right)
    across = bilinear_weights(image.shape[1], columns)[left:right] @ down.T
    return np.ascontiguousarray(across.T, dtype=np.float32)


@lru_cache(maxsize=64)
def _column_plan(in_size: int, out_size: int) -> tuple[tuple[tuple[tuple[int, float], ...], ...], int, int, int]:
    """For shrinking `in_size` columns to `out_size` by an integer factor: per output column its (input column,
    weight) pairs in the CSR product's order (rising input column), the factor, and the outputs [first, stop)
    around the middle whose pairs are the middle's shifted by the factor per column (cached: the same for
    every film of a size)."""
    weights = bilinear_weights(in_size, out_size)
    taps = tuple(tuple(zip(weights.indices[start:stop].tolist(), weights.data[start:stop].tolist()))
                 for start, stop in zip(weights.indptr[:-1], weights.indptr[1:]))
    factor, middle = in_size // out_size, out_size // 2

    def regular(column: int) -> bool:
        return (len(taps[column]) == len(taps[middle]) and all(
            (a + factor * (column - middle), w) == (b, v) for (a, w), (b, v) in zip(taps[middle], taps[column])))

    first, stop = middle, middle
    while first > 0 and regular(first - 1):
        first -= 1
    while stop < out_size and regular(stop):
        stop += 1
    return taps, factor, first, stop


def _across_by_views(down: np.ndarray, columns: int, left: int, right: int) -> np.ndarray:
    """`(bilinear_weights(W, columns)[left:right] @ down.T).T` for W a multiple of `columns`, the same to the bit.

    Why: the sparse product needs `down.T` contiguous, and that transposed copy (plus the one back) cost 2 ms of
    the 3.5 ms of a 1024² film's resize to 512² (cProfile: `ndarray.ravel` in scipy's `_matmul_multivector`).
    Shrinking by an integer factor f, every output column away from the edges takes the same weights from
    input columns f further on than its neighbour's, so each weight is one strided view of `down`. The sums
    run as the CSR product's do (zero, then each product rounded to float32 and added in rising column
    order), so the values are identical; the few edge columns are summed one by one in the same order.
    """
    taps, factor, first, stop = _column_plan(down.shape[1], columns)
    first, stop = min(max(first, left), right), max(min(stop, right), left)
    stop = max(stop, first)
    out = np.zeros((down.shape[0], right - left), dtype=np.float32)
    product = np.empty((down.shape[0], stop - first), dtype=np.float32)
    run = out[:, first - left:stop - left]
    for tap, weight in taps[first] if stop > first else ():
        np.multiply(down[:, tap:tap + factor * (stop - first - 1) + 1:factor], np.float32(weight), out=product)
        run += product
    for column in (*range(left, first), *range(stop, right)):
        for tap, weight in taps[column]:
            out[:, column - left] += down[:, tap] * np.float32(weight)
    return out


@lru_cache(maxsize=64)
def grid_weights(side: int, factor: int, centred: bool, out_size: int) -> sparse.csr_matrix:
    """Weights from a reduced axis (`side` film pixels by `factor`) to `out_size` model-input pixels, float32."""
    weights = (pillow_bilinear(side, out_size) @ patches(side, factor, centred)).astype(np.float32)
    return sparse.csr_matrix(weights)


def resample_grid(pixels: np.ndarray, grid: PixelGrid, rows: int, columns: int) -> np.ndarray:
    """Reduced `pixels` on `grid` → rows x columns as Pillow's bilinear resize of the full film would make them."""
    down = grid_weights(grid.rows, grid.factor, grid.centred, rows) @ np.asarray(pixels, dtype=np.float32)
    across = grid_weights(grid.columns, grid.factor, grid.centred, columns) @ down.T
    return np.ascontiguousarray(across.T, dtype=np.float32)
