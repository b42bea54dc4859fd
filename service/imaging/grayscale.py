"""Grey-scale transforms from stored pixel values to display values in [0, 1], air dark.

Pure functions on arrays and numbers: no DICOM parsing here (that is `service.imaging.reader`).

The common chain (Modality rescale → linear VOI window → MONOCHROME1 inversion) is affine up to the final
clipping, so it is composed into one `Affine` and applied in a single float32 pass. pydicom's
`apply_modality_lut` + `apply_voi_lut` compute the same values in float64 with boolean masks and cost
~260 ms on a 4 Mpx radiograph against ~15 ms here; the tests check both agree. pydicom is still used for
the non-linear cases (VOI LUT Sequence, SIGMOID, Modality LUT Sequence).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Affine:
    """y = scale · x + offset, then clipped to [0, 1] when applied."""

    scale: float
    offset: float

    def after(self, inner: Affine) -> Affine:
        """The composition self ∘ inner (apply `inner` first)."""
        return Affine(self.scale * inner.scale, self.scale * inner.offset + self.offset)

    def inverted(self) -> Affine:
        """Followed by y ↦ 1 − y (MONOCHROME1 / Presentation LUT Shape INVERSE)."""
        return Affine(-self.scale, 1.0 - self.offset)

    def apply(self, stored: np.ndarray) -> np.ndarray:
        """Apply to an array in one float32 pass, clipped to [0, 1]."""
        out = stored.astype(np.float32, copy=True)
        out *= np.float32(self.scale)
        out += np.float32(self.offset)
        np.clip(out, 0.0, 1.0, out=out)
        return out


IDENTITY = Affine(1.0, 0.0)


def rescale(slope: float, intercept: float) -> Affine:
    """Modality LUT given as Rescale Slope / Intercept (PS3.3 C.11.1)."""
    return Affine(float(slope), float(intercept))


def linear_window(center: float, width: float, function: str = "LINEAR") -> Affine:
    """VOI window (PS3.3 C.11.2.1.2.1 LINEAR, C.11.2.1.3.2 LINEAR_EXACT) mapped onto [0, 1].

    LINEAR: x ≤ c − 0.5 − (w − 1)/2 → 0; x > c − 0.5 + (w − 1)/2 → 1; else ((x − (c − 0.5)) / (w − 1) + 0.5).
    A LINEAR width of exactly 1 is a hard threshold at c − 0.5, approximated by a very steep ramp.
    """
    function = function.upper()
    if function == "LINEAR":
        if width < 1:
            raise ValueError(f"Window Width (0028,1051) must be >= 1 for LINEAR, got {width}")
        span = max(width - 1.0, 1e-6)
        return Affine(1.0 / span, 0.5 - (center - 0.5) / span)
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"Window Width (0028,1051) must be > 0 for LINEAR_EXACT, got {width}")
        return Affine(1.0 / width, 0.5 - center / width)
    raise ValueError(f"VOI LUT Function (0028,1056) {function!r} is not linear")


def range_window(low: float, high: float) -> Affine:
    """Map [low, high] onto [0, 1]: the window for data with no VOI in the file."""
    if not high > low:
        return Affine(0.0, 0.0)
    return Affine(1.0 / (high - low), -low / (high - low))


def percentile_range(values: np.ndarray, low: float = 0.5, high: float = 99.5,
                     max_samples: int = 1 << 18) -> tuple[float, float]:
    """Robust grey range of an image from a strided subsample (the full image is not needed for two quantiles).

    Collimator borders and burned-in labels sit in the tails, which is why quantiles beat min/max here.
    Stored values of up to 16 bits are counted (`np.bincount`) instead of sorted: the same quantiles as
    `np.percentile`'s on their float64 values, at a tenth of the cost (~0.3 ms against ~3 ms on a 1024² film).
    (`np.percentile` on int16 itself overflows for spans beyond 32767; counting does not.)
    """
    step = max(1, int(np.sqrt(values.size / max_samples)))
    sample = values[::step, ::step] if values.ndim == 2 else values.ravel()[::step]
    if sample.size and sample.dtype.kind in "ui" and sample.dtype.itemsize <= 2:
        return _counted_percentiles(sample, low, high)
    lo, hi = np.percentile(sample, [low, high])
    return float(lo), float(hi)


def _counted_percentiles(sample: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """`np.percentile(sample, [low, high])` (linear interpolation) for integers of at most 16 bits, by counting."""
    values, offset = sample.ravel(), 0
    if values.dtype.kind == "i":  # signed: the unsigned view with its sign bit flipped is value + offset
        unsigned = np.dtype(f"u{values.dtype.itemsize}")
        offset = 1 << (8 * values.dtype.itemsize - 1)
        values = values.view(unsigned) ^ unsigned.type(offset)
    counts = np.cumsum(np.bincount(values))  # counted as unsigned: ~5x faster than as int32 on a film
    last = sample.size - 1
    found = []
    for q in (low, high):
        index = q / 100 * last
        below = int(np.floor(index))
        a, b = (float(np.searchsorted(counts, k, side="right") - offset) for k in (below, min(below + 1, last)))
        t = index - below
        found.append(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)  # numpy's own lerp, both halves
    return found[0], found[1]


def appears_inverted(pixels: np.ndarray, margin: float = 0.02) -> bool:
    """Plausibility check for a frontal chest film: the lateral lung fields should be darker than the mediastinum.

    Compares the median of a central vertical strip (mediastinum, spine) with the medians of two lateral strips
    at mid-height (lung fields), on a coarse subsample. A film whose centre is darker than both lung strips by
    more than `margin` looks inverted (a MONOCHROME1 flag set wrongly, or inverted twice).
    """
    rows, cols = pixels.shape
    step = max(1, min(rows, cols) // 256)
    small = pixels[::step, ::step]
    h, w = small.shape
    band = small[int(0.25 * h) : int(0.70 * h)]
    centre = float(np.median(band[:, int(0.44 * w) : int(0.56 * w)]))
    right = float(np.median(band[:, int(0.14 * w) : int(0.30 * w)]))
    left = float(np.median(band[:, int(0.70 * w) : int(0.86 * w)]))
    return centre + margin < right and centre + margin < left


# --- is there anything left to see? ----------------------------------------------------------------------------
#
# Thresholds, measured on what the service must accept: the 4 real chest films in shared/realdata/chest and
# the training generator's films (`python -m training synth`, every format it writes: 8/12 bit, windows, rescale,
# MONOCHROME1) as the model sees them. They saturate at most 1.8 % of their pixels, their central 98 % spans
# at least 0.63 of the grey scale, and they show at least 175 distinct grey levels. Each limit sits far from that.

# A file's window or VOI LUT is set aside when more than this fraction of the film lands on its two extremes
# (black or white). The lung fields alone are a quarter to a third of a PA film and a legitimate window clips
# only collimator borders and direct exposure (real films: under 2 %), so a window leaving under 10 % of the
# film in grey shows no lung at all: it was meant for other data (e.g. 12-bit values stored at an offset).
WINDOW_SATURATION_LIMIT = 0.90
# A model input whose 1st to 99th percentile span less than this of [0, 1] is near-constant: less than 13 of
# 256 display levels for 98 % of the film, less contrast in total than the edge of one subtle synthetic lesion
# ("hard": 1-5 % of the display range). Real chest films span 0.69 or more, synthetic ones 0.63.
MIN_GREY_SPREAD = 0.05
# Fewer distinct grey levels than this (4 bits) is a thresholded or mask-like image, or a few stored values of
# noise stretched by a window: ribs, vessels and a pleural line need gradations. Real 8-bit films show 175 or
# more; the least varied real non-chest image in shared/realdata (a deflated 8-bit test pattern) shows 24.
MIN_GREY_LEVELS = 16
# Pixels the checks below look at: a strided subsample. 16,384 place the 1st and 99th percentiles within 0.1 % of
# rank of the film's (one standard error), far inside the limits' margins, and an order statistic costs ~0.05 ms on
# them, in cache (65,536: 0.7 ms; the 262,144 sorted before issue 15: ~7 ms a film).
_SAMPLES = 1 << 14
_LEVEL_PROBE = 4096  # a first look for MIN_GREY_LEVELS distinct levels (a film has hundreds among a few thousand)


def _sample(pixels: np.ndarray) -> np.ndarray:
    """A strided subsample of at most about `_SAMPLES` pixels: enough for fractions and quantiles."""
    step = max(1, int(np.sqrt(pixels.size / _SAMPLES)))
    return pixels[::step, ::step] if pixels.ndim == 2 else pixels.ravel()[::step]


def saturated_fraction(pixels: np.ndarray) -> float:
    """Fraction of display pixels (in [0, 1]) on either extreme: what a window clipped to black or white."""
    sample = _sample(pixels)
    return float(np.count_nonzero((sample <= 0.0) | (sample >= 1.0))) / max(1, sample.size)


def degenerate_reason(pixels: np.ndarray) -> str | None:
    """Why display pixels (in [0, 1]) cannot hold anatomy, or None when they can.

    Near-constant (1st-99th percentile span under MIN_GREY_SPREAD, which includes constant) or too few grey
    levels (under MIN_GREY_LEVELS). The percentiles are order statistics found by partition, not a sort; the
    levels are counted on the whole subsample only where a first look at a few thousand of them finds too few.
    """
    sample = _sample(pixels).ravel()
    last = sample.size - 1
    if last < 0:
        return "its pixels are not finite numbers"
    ranks = (int(0.01 * last), int(0.99 * last))
    ordered = np.partition(sample, (0, *ranks, last))  # NaN goes last, as in a sort
    if not np.isfinite(ordered[0]) or not np.isfinite(ordered[last]):
        return "its pixels are not finite numbers"
    low, high = float(ordered[ranks[0]]), float(ordered[ranks[1]])
    if high - low < MIN_GREY_SPREAD:
        return (f"it is near-constant: 98 % of its pixels lie within {high - low:.3f} of the grey range, "
                f"under the minimum of {MIN_GREY_SPREAD}")
    if np.unique(sample[:: max(1, sample.size // _LEVEL_PROBE)]).size >= MIN_GREY_LEVELS:
        return None  # a subsample's levels are some of the sample's: enough already
    levels = int(np.unique(sample).size)
    if levels < MIN_GREY_LEVELS:
        return f"it has {levels} grey levels, under the minimum of {MIN_GREY_LEVELS}"
    return None


def hides_film(pixels: np.ndarray) -> bool:
    """Whether a window from the file left (nearly) nothing of the film visible: saturated or degenerate."""
    return saturated_fraction(pixels) > WINDOW_SATURATION_LIMIT or degenerate_reason(pixels) is not None
