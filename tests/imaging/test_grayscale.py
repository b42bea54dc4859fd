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
