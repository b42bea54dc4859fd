"""Pure grey-scale functions against pydicom's reference implementation and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import apply_windowing

from service.imaging import grayscale


def _pydicom_window(values: np.ndarray, center: float, width: float, function: str, bits: int = 12) -> np.ndarray:
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsStored, ds.PixelRepresentation = bits, 0
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = center, width, function
    return apply_windowing(values.astype(np.float64), ds) / (2**bits - 1)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT"])
@pytest.mark.parametrize("center,width", [(2048, 4096), (1000, 300), (40.5, 2), (3000, 1)])
def test_linear_window_equals_pydicom(function, center, width):
    if function == "LINEAR_EXACT" and width == 1:
        width = 0.5
    values = np.arange(0, 4096, dtype=np.float64)
    ours = grayscale.linear_window(center, width, function).apply(values)
    reference = _pydicom_window(values, center, width, function)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_window_refuses_bad_widths_and_functions():
    with pytest.raises(ValueError, match="must be >= 1 for LINEAR, got 0.5"):
        grayscale.linear_window(100, 0.5)
    with pytest.raises(ValueError, match="must be > 0 for LINEAR_EXACT"):
        grayscale.linear_window(100, 0, "LINEAR_EXACT")
    with pytest.raises(ValueError, match="'SIGMOID' is not linear"):
        grayscale.linear_window(100, 10, "SIGMOID")


def test_affine_composition_and_inversion():
    inner, outer = grayscale.rescale(2.0, -10.0), grayscale.range_window(0.0, 100.0)
    x = np.array([5.0, 10.0, 30.0, 55.0, 60.0])
    composed = outer.after(inner).apply(x)
    np.testing.assert_allclose(composed, np.clip((2 * x - 10) / 100, 0, 1), atol=1e-7)
    np.testing.assert_allclose(outer.after(inner).inverted().apply(x), 1 - composed, atol=1e-7)


def test_range_window_of_a_flat_image_is_black_not_nan():
    assert grayscale.range_window(7.0, 7.0).apply(np.full((3, 3), 7.0)).max() == 0.0


def test_percentile_range_ignores_the_tails():
    values = np.tile(np.linspace(0, 1000, 1000), (1000, 1))
    values[:2, :] = 1e6  # 0.2 % of burned-in white label
    low, high = grayscale.percentile_range(values)
    assert low == pytest.approx(5, abs=3) and high == pytest.approx(995, abs=3)


def test_appears_inverted_on_simple_films():
    y, x = np.mgrid[0:256, 0:256]
    film = (0.2 + 0.6 * np.exp(-(((x - 128) / 30.0) ** 2))).astype(np.float32)  # bright mediastinum
    assert not grayscale.appears_inverted(film)
    assert grayscale.appears_inverted(1.0 - film)
    assert not grayscale.appears_inverted(np.full((256, 256), 0.5, np.float32)), "flat: no evidence"


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16])
def test_counted_percentiles_are_numpys_for_stored_integers(dtype) -> None:
    """Stored values of up to 16 bits are counted, not sorted (issue 15 §3): the same quantiles as
    `np.percentile` of their float64 values, odd and even counts, sparse and dense value sets."""
    rng = np.random.default_rng(15)
    info = np.iinfo(dtype)
    for size in (1, 2, 3, 7, 1000, 300_000):
        values = rng.integers(info.min, info.max, size=size, endpoint=True).astype(dtype)
        sparse = (values // 97 * 97).astype(dtype)
        for sample in (values, sparse):
            expected = tuple(float(v) for v in np.percentile(sample[:: max(1, int(np.sqrt(size / (1 << 18))))]
                                                             .astype(np.float64), [0.5, 99.5]))
            assert grayscale.percentile_range(sample) == expected


def _degenerate_by_sorting(pixels: np.ndarray) -> str | None:
    """The check as it was written before issue 15: one sort of the subsample gives both figures."""
    sample = np.sort(grayscale._sample(pixels), axis=None)
    if sample.size == 0 or not np.isfinite(sample[0]) or not np.isfinite(sample[-1]):
        return "its pixels are not finite numbers"
    low, high = (float(sample[int(q * (sample.size - 1))]) for q in (0.01, 0.99))
    if high - low < grayscale.MIN_GREY_SPREAD:
        return (f"it is near-constant: 98 % of its pixels lie within {high - low:.3f} of the grey range, "
                f"under the minimum of {grayscale.MIN_GREY_SPREAD}")
    levels = 1 + int(np.count_nonzero(np.diff(sample)))
    if levels < grayscale.MIN_GREY_LEVELS:
        return f"it has {levels} grey levels, under the minimum of {grayscale.MIN_GREY_LEVELS}"
    return None


def test_the_degenerate_check_by_partition_says_what_sorting_says() -> None:
    rng = np.random.default_rng(16)
    films = [rng.random((1024, 1024), dtype=np.float32), np.full((512, 512), 0.3, np.float32),
             (rng.integers(0, 12, (600, 600)) / 11).astype(np.float32),  # 12 levels
             (rng.integers(0, 16, (600, 600)) / 15).astype(np.float32),  # 16 levels: enough
             (0.5 + 0.01 * rng.random((800, 800))).astype(np.float32),  # near-constant
             np.where(rng.random((700, 700)) < 0.999, 0.2, rng.random((700, 700))).astype(np.float32),  # rare levels
             np.array([[np.nan, 0.5], [0.1, 0.9]], np.float32), np.zeros((0, 0), np.float32)]
    for film in films:
        assert grayscale.degenerate_reason(film) == _degenerate_by_sorting(film)
