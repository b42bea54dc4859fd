"""Issue 13 §1: a film the model cannot see never reaches it silently.

A window or VOI LUT that hides the film (everything white or black, a threshold, a sliver of grey) gives way to
the percentile window with the `window_mismatch` warning; a model input that is still degenerate (constant,
near-constant, a few grey levels) is refused with `degenerate_image`. Built with tests/dicom_factory.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.pixels import apply_voi_lut

from service.imaging import grayscale
from service.imaging.acceptance import AcceptancePolicy, permissive_policy
from service.imaging.reader import read_radiograph
from service.imaging.radiograph import Radiograph, RadiographError, RejectionCode
from tests.dicom_factory import chest_like, dataset, offset_content, to_bytes, voi_lut

MISMATCH = "window_mismatch"


def read(**attributes: object) -> Radiograph:
    return read_radiograph(to_bytes(dataset(**attributes)))


def assert_percentile_fallback(radiograph: Radiograph, reference: Radiograph) -> None:
    """The file's VOI was set aside, said so, and the film is shown as if it had none (`reference`)."""
    assert MISMATCH in radiograph.warnings
    assert radiograph.window_source == "percentile"
    assert radiograph.pixels.std() > 0.1, "the film is visible again"
    np.testing.assert_allclose(radiograph.pixels, reference.pixels, atol=1e-6)


def degenerate(data: bytes, policy: AcceptancePolicy | None = None) -> RadiographError:
    with pytest.raises(RadiographError) as caught:
        read_radiograph(data, policy) if policy else read_radiograph(data)
    error = caught.value
    assert error.code is RejectionCode.DEGENERATE_IMAGE and error.http_status == 422
    assert "(7FE0,0010)" in error.message and "minimum of" in error.message, "names the tag and the limit"
    assert "Sentinel" not in error.message
    return error


# --- windows that hide the film -------------------------------------------------------------------------


def test_the_issue_film_window_entirely_below_its_16_bit_values():
    """DX, 16 bits stored, MONOCHROME2 + IDENTITY, Window 2725/5310 under values 32,744-65,535: was all 1.0."""
    pixels = (chest_like(bits=15).astype(np.int64) + 32744).astype(np.uint16)
    common = {"bits_stored": 16, "Modality": "DX", "PresentationLUTShape": "IDENTITY"}
    radiograph = read(pixels=pixels, WindowCenter=2725, WindowWidth=5310, **common)
    assert_percentile_fallback(radiograph, read(pixels=pixels, **common))


def test_window_above_the_data():
    """A window centred above every stored value renders the film black."""
    assert_percentile_fallback(read(WindowCenter=60000, WindowWidth=4000), read())


@pytest.mark.parametrize("center,width", [(1800, 1500), (1100, 300)], ids=["inside", "narrow-inside"])
def test_a_window_inside_the_data_is_applied_as_the_file_says(center, width):
    """Guard (passes on the old code too): a window within the data, even one clipping most of the film
    (the narrow one saturates about 80 %, under the 90 % limit), is the sender's choice and is kept."""
    ds = dataset(WindowCenter=center, WindowWidth=width)
    radiograph = read_radiograph(to_bytes(ds))
    assert radiograph.window_source == "window" and MISMATCH not in radiograph.warnings
    expected = apply_voi_lut(ds.pixel_array.astype(np.float64), ds) / 4095
    np.testing.assert_allclose(radiograph.pixels, expected, atol=2e-5)


def test_window_width_1_is_a_threshold_not_a_film():
    """LINEAR width 1 is a hard threshold: a two-tone picture with no anatomy in it."""
    median = float(np.median(chest_like()))
    assert_percentile_fallback(read(WindowCenter=median, WindowWidth=1), read())


def test_a_window_so_wide_the_film_is_one_grey():
    """The other way to hide a film: the data occupies a sliver of a huge window (near-constant grey)."""
    assert_percentile_fallback(read(WindowCenter=2048, WindowWidth=10_000_000), read())


def test_a_voi_lut_that_ends_below_the_data_is_set_aside():
    """A 256-entry LUT (stored 0-255) on 12-bit data: every pixel past its end takes its last entry (white)."""
    assert_percentile_fallback(read(VOILUTSequence=[voi_lut(256)]), read())


def test_a_voi_lut_covering_the_data_is_applied():
    radiograph = read(VOILUTSequence=[voi_lut(4096)])
    assert radiograph.window_source == "voi_lut" and MISMATCH not in radiograph.warnings


def test_twelve_bit_content_stored_at_an_offset_in_16_bits():
    """12-bit values shifted up by 32768 with Bits Stored 16: read as they are (percentile: no warning), and
    a window written for the unshifted values (2048/4096, under the data) falls back to the same image."""
    pixels = offset_content(bits=12, offset=32768)
    plain = read(pixels=pixels, bits_stored=16)
    assert plain.window_source == "percentile" and MISMATCH not in plain.warnings
    np.testing.assert_allclose(plain.pixels, read(pixels=chest_like()).pixels, atol=1e-6)  # the shift is invisible
    assert_percentile_fallback(read(pixels=pixels, bits_stored=16, WindowCenter=2048, WindowWidth=4096), plain)


def test_monochrome1_with_a_mismatched_window_is_inverted_once():
    inverted = (4095 - chest_like()).astype(np.uint16)
    reference = read(pixels=inverted, PhotometricInterpretation="MONOCHROME1")
    radiograph = read(pixels=inverted, PhotometricInterpretation="MONOCHROME1", WindowCenter=9000, WindowWidth=100)
    assert_percentile_fallback(radiograph, reference)
    assert not grayscale.appears_inverted(radiograph.pixels)


def test_plausibility_is_checked_on_what_the_model_sees_after_the_fallback():
    """An inverted-looking film behind a mismatched window was all white, so the check saw nothing."""
    inverted = (4095 - chest_like()).astype(np.uint16)
    data = to_bytes(dataset(inverted, WindowCenter=20000, WindowWidth=1000))
    radiograph = read_radiograph(data)
    assert MISMATCH in radiograph.warnings and "appears_inverted" in radiograph.warnings
    with pytest.raises(RadiographError) as caught:
        read_radiograph(data, AcceptancePolicy(reject_inverted=True))
    assert caught.value.code is RejectionCode.APPEARS_INVERTED


# --- degenerate model input ----------------------------------------------------------------------------


@pytest.mark.parametrize("window", [{}, {"WindowCenter": 2048, "WindowWidth": 4096},
                                    {"WindowCenter": 100, "WindowWidth": 50}],
                         ids=["no-window", "window-over-it", "window-below-it"])
def test_constant_pixel_data_is_degenerate(window):
    """Whatever the window (none, one over the value, one that would make it white), a constant film is refused."""
    error = degenerate(to_bytes(dataset(np.full((256, 256), 2000, np.uint16), **window)))
    assert "near-constant" in error.message


def test_near_constant_pixel_data_is_degenerate():
    """A constant film with 0.5 % of scattered pixels elsewhere (dead pixels, a burned-in dot): nothing to see."""
    pixels = np.full((256, 256), 2000, np.uint16)
    pixels.ravel()[:: 200] = 4000
    degenerate(to_bytes(dataset(pixels)))


def test_a_few_stored_levels_stretched_by_the_window_are_degenerate():
    """Noise of 4 stored values around a constant: the percentile window stretches it to full contrast, but
    it holds 4 grey levels, not anatomy."""
    noise = np.random.default_rng(13).integers(0, 4, (256, 256))
    error = degenerate(to_bytes(dataset((2000 + noise).astype(np.uint16))))
    assert "4 grey levels" in error.message and str(grayscale.MIN_GREY_LEVELS) in error.message


def test_a_binary_film_is_degenerate_under_the_permissive_policy_too():
    pixels = np.where(chest_like() > 2000, 4095, 0).astype(np.uint16)
    degenerate(to_bytes(dataset(pixels)), permissive_policy())


def test_a_constant_png_is_degenerate_unless_the_caller_reads_a_mask():
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(buffer, format="PNG")
    degenerate(buffer.getvalue())
    mask = read_radiograph(buffer.getvalue(), AcceptancePolicy(min_side=1, reject_degenerate=False))
    assert mask.pixels.max() == 0.0


def test_degenerate_thresholds_sit_far_from_real_chest_films(realdata: Path):
    """The margins the thresholds claim: real chest films saturate under 2 % with their own windows, span
    over 0.6 of the grey range and show over 150 grey levels."""
    for path in sorted((realdata / "chest").glob("*.dcm")):
        pixels = read_radiograph(path).pixels
        sample = pixels[::4, ::4]
        assert grayscale.saturated_fraction(pixels) < 0.02
        assert np.subtract(*np.percentile(sample, [99, 1])) > 0.6
        assert np.unique(sample).size > 150
        assert grayscale.degenerate_reason(pixels) is None and not grayscale.hides_film(pixels)


def test_synthetic_training_films_are_neither_rejected_nor_warned(tmp_path: Path):
    """Every format the training generator writes (8/12 bit, windows full or partial, rescale, MONOCHROME1,
    each encoding) reads without `window_mismatch` and without `degenerate_image`."""
    from training.__main__ import main

    assert main(["synth", "--out", str(tmp_path), "--quiet", "--count", "24", "--seed", "5", "--size", "256",
                 "--workers", "1", "--procedural-shapes"]) == 0
    images = json.loads((tmp_path / "synth.json").read_text())["images"]
    windows = set()
    for image in images:
        radiograph = read_radiograph(tmp_path / "dicom" / f"{image['image_id']}.dcm")
        assert MISMATCH not in radiograph.warnings, image
        windows.add(radiograph.window_source)
    assert windows == {"window", "percentile", "full_range"}, "the generator's window kinds are all covered"
