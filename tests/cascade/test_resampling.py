"""Model inputs from reduced pixels, and the film mask computed only where it can be (issue 15 §1, §3).

Pure functions on small arrays: the weights are Pillow's, the reduced path equals the full one where the
film is what the reduced pixels say it is, and the windowed mask equals the whole film's mask exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage

from service.cascade.postprocess import film_mask, mask_window
from service.cascade.preprocess import resize, to_batch, to_original
from service.cascade import resampling
from service.cascade.resampling import patches, pillow_bilinear, resample_grid
from service.imaging.radiograph import PixelGrid, Radiograph
from service.models.input_spec import InputSpec
from service.models.thresholds import TripletThreshold


@pytest.mark.parametrize(("in_size", "out_size"), [(1024, 256), (2000, 256), (1841, 512), (97, 256), (256, 256)])
def test_the_weights_are_pillows_own(in_size: int, out_size: int) -> None:
    image = np.random.default_rng(in_size).random((in_size, 7)).astype(np.float32)
    by_pillow = np.asarray(Image.fromarray(image, mode="F").resize((7, out_size), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(pillow_bilinear(in_size, out_size) @ image, by_pillow, atol=2e-7)


@pytest.mark.parametrize("centred", [False, True])
def test_every_film_pixel_belongs_to_its_patches_once(centred: bool) -> None:
    weights = patches(2001, 4, centred).toarray()
    assert weights.shape == (2001, 501)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    if centred:  # patch k is centred on film pixel 4k: [4k - 1.5, 4k + 2.5) in pixel-edge coordinates
        assert weights[4, 1] == 1.0 and weights[2, 0] == weights[2, 1] == 0.5 and weights[6, 1] == 0.5
    else:  # patch k is the block [4k, 4k + 4)
        assert (weights[4:8, 1] == 1.0).all() and weights[8, 1] == 0.0


@pytest.mark.parametrize(("rows", "columns", "factor"), [(1024, 1024, 4), (2128, 2000, 4), (1955, 1841, 2),
                                                         (1000, 1003, 8)])
def test_a_film_constant_on_blocks_gives_the_full_decodes_input(rows: int, columns: int, factor: int) -> None:
    """Where each reduced pixel is exactly its block's value (what libjpeg's DCT scaling approximates), the model
    input from the reduced pixels is the one Pillow makes from the whole film."""
    rng = np.random.default_rng(rows + factor)
    grid = PixelGrid(rows, columns, factor, centred=False)
    reduced = rng.random(grid.reduced_shape).astype(np.float32)
    film = np.repeat(np.repeat(reduced, factor, axis=0), factor, axis=1)[:rows, :columns]
    np.testing.assert_allclose(resample_grid(reduced, grid, 256, 256), resize(film, 256, 256), atol=2e-6)


def test_a_centred_grid_follows_the_film_half_a_patch_over() -> None:
    """A smooth film sampled at film pixels 0, 4, 8... (a JPEG 2000 level's low-pass band): resampled as centred
    patches it matches the full decode's input far better than taken as blocks, which sit 1.5 pixels off."""
    y, x = np.mgrid[0:2128, 0:2000].astype(np.float32)
    film = (0.5 + 0.4 * np.sin(x / 37.0) * np.cos(y / 23.0)).astype(np.float32)
    sampled = np.ascontiguousarray(film[::4, ::4])
    want = resize(film, 256, 256)
    centred = resample_grid(sampled, PixelGrid(2128, 2000, 4, centred=True), 256, 256)
    blocks = resample_grid(sampled, PixelGrid(2128, 2000, 4, centred=False), 256, 256)
    assert np.abs(centred - want).max() < 0.01 < np.abs(blocks - want).max()


def test_the_batch_takes_a_reduced_radiograph_through_its_grid() -> None:
    grid = PixelGrid(1024, 1024, 4, centred=False)
    pixels = np.random.default_rng(3).random(grid.reduced_shape).astype(np.float32)
    radiograph = Radiograph(pixels=pixels, spacing_mm=None, grid=grid)
    spec = InputSpec(size=256, mean=0.5, std=0.25, channels=3)
    batch = to_batch([radiograph, pixels], spec)
    np.testing.assert_allclose(batch[0, 0], (resample_grid(pixels, grid, 256, 256) - 0.5) / 0.25, atol=1e-6)
    np.testing.assert_array_equal(batch[0, 0], batch[0, 2])  # channels repeat
    np.testing.assert_allclose(batch[1, 0], (pixels - 0.5) / 0.25, atol=1e-6)  # a 256² array goes as it is


def full_mask(probability: np.ndarray, rows: int, columns: int, rule: TripletThreshold) -> np.ndarray:
    return rule.at_size((rows, columns), from_size=1024).apply(to_original(probability, rows, columns))


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10**6), rows=st.sampled_from([64, 250, 256, 300, 1024, 1955]),
       columns=st.sampled_from([64, 255, 256, 512, 1841]), spots=st.integers(0, 3),
       min_area=st.sampled_from([0, 1, 40, 2000]))
def test_the_windowed_mask_equals_the_whole_films(seed: int, rows: int, columns: int, spots: int,
                                                  min_area: int) -> None:
    """Only the window around map pixels above the bottom score is upsampled; the mask is the same to the pixel,
    for films larger and smaller than the map, spots at its edges and corners, any min_area."""
    rng = np.random.default_rng(seed)
    probability = (rng.random((128, 128)) * 0.2).astype(np.float32)
    for _ in range(spots):
        y, x = int(rng.integers(0, 128)), int(rng.integers(0, 128))
        probability[max(y - 3, 0): y + int(rng.integers(1, 20)), max(x - 3, 0): x + int(rng.integers(1, 20))] = \
            rng.uniform(0.2, 1.0)
    probability = ndimage.gaussian_filter(probability, 1.0).astype(np.float32)
    rule = TripletThreshold(0.6, min_area, 0.3)
    mask, peak = film_mask(probability, rows, columns, rule)
    np.testing.assert_array_equal(mask, full_mask(probability, rows, columns, rule))
    assert peak == pytest.approx(float(probability.max()))


@pytest.mark.parametrize(("rows", "columns"), [(1024, 1024), (2128, 2000), (200, 300)])
@pytest.mark.parametrize("spot", [(0, 0), (0, 127), (64, 64), (127, 5)])
def test_the_window_holds_every_film_pixel_a_map_pixel_reaches_and_little_more(rows, columns, spot) -> None:
    above = np.zeros((128, 128), dtype=bool)
    above[spot] = True
    reached = np.argwhere(to_original(above.astype(np.float32), rows, columns) > 0)
    top, bottom, left, right = mask_window(above, rows, columns)
    assert top <= reached[:, 0].min() and reached[:, 0].max() < bottom
    assert left <= reached[:, 1].min() and reached[:, 1].max() < right
    assert bottom - top <= np.ptp(reached[:, 0]) + 1 + 4 and right - left <= np.ptp(reached[:, 1]) + 1 + 4
    assert mask_window(np.zeros((128, 128), dtype=bool), rows, columns) is None


@pytest.mark.parametrize(("shape", "size"), [((1024, 1024), (512, 512)), ((1024, 1024), (256, 256)),
                                             ((1023, 1024), (512, 512)), ((600, 768), (512, 256)),
                                             ((9, 7), (3, 7)), ((2000, 2128), (512, 532))])
def test_shrinking_by_an_integer_factor_through_strided_views_is_the_sparse_product_to_the_bit(shape, size):
    """The fast path for whole factors (`_across_by_views`) against the plain sparse product, whole and windowed."""
    image = np.random.default_rng(7).random(shape, dtype=np.float32) * 3 - 1  # values beyond [0, 1] too
    rows, columns = size
    for window in [(0, rows, 0, columns), (1, rows // 2 + 1, 1, max(columns - 2, 2)), (0, 1, 0, 1),
                   (rows - 1, rows, max(columns - 3, 0), columns), (0, rows, columns // 2, columns // 2 + 1)]:
        top, bottom, left, right = window
        down = resampling.bilinear_weights(shape[0], rows)[top:bottom] @ image
        expected = np.ascontiguousarray((resampling.bilinear_weights(shape[1], columns)[left:right] @ down.T).T)
        got = resampling.resample_window(image, rows, columns, window)
        assert got.dtype == np.float32 and got.flags.c_contiguous
        assert np.array_equal(got, expected), (shape, size, window)
