"""read_radiograph on DICOM and PNG files constructed for each rule: every rejection, every grey-scale path."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_voi_lut
from pydicom.uid import JPEGLSLossless, RLELossless

from service.imaging.acceptance import SECONDARY_CAPTURE, AcceptancePolicy
from service.imaging.radiograph import RadiographError, RejectionCode
from service.imaging.reader import read_radiograph
from tests.dicom_factory import chest_like, dataset, to_bytes

SENTINELS = ("Sentinel", "SENTINEL-ID-0001")


def rejected(data: bytes, code: RejectionCode, match: str, policy: AcceptancePolicy | None = None) -> RadiographError:
    with pytest.raises(RadiographError, match=match) as caught:
        read_radiograph(data, policy) if policy else read_radiograph(data)
    assert caught.value.code is code
    assert not any(s in caught.value.message for s in SENTINELS), "no patient identifiers in errors"
    return caught.value


# --- what is not a DICOM file -------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"hello world, not an image", b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(500), np.random.default_rng(1).bytes(4096)],
    ids=["empty", "text", "jpeg", "random"],
)
def test_not_dicom(data):
    error = rejected(data, RejectionCode.NOT_DICOM, "not a DICOM file")
    assert error.http_status == 400


def test_acr_nema_dataset_without_preamble_or_transfer_syntax_is_read_as_implicit_little_endian():
    ds = dataset()
    radiograph = read_radiograph(to_bytes(ds, acr_nema=True))
    reference = read_radiograph(to_bytes(ds))
    assert "transfer_syntax_inferred" in radiograph.warnings
    assert radiograph.transfer_syntax == "1.2.840.10008.1.2"
    np.testing.assert_array_equal(radiograph.pixels, reference.pixels)


# --- structure ----------------------------------------------------------------------------------


def test_no_pixel_data():
    ds = dataset()
    del ds.PixelData
    rejected(to_bytes(ds), RejectionCode.NO_PIXEL_DATA, r"no PixelData \(7FE0,0010\)")


def test_multi_frame():
    pixels = chest_like()
    ds = dataset(pixels, NumberOfFrames=2)
    ds.PixelData = pixels.tobytes() * 2
    rejected(to_bytes(ds), RejectionCode.MULTI_FRAME, r"NumberOfFrames \(0028,0008\) is 2")


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL", "PALETTE COLOR"])
def test_colour(photometric):
    samples = 1 if photometric == "PALETTE COLOR" else 3
    ds = dataset(PhotometricInterpretation=photometric, SamplesPerPixel=samples)
    rejected(to_bytes(ds), RejectionCode.COLOUR, f"PhotometricInterpretation \\(0028,0004\\) is '{photometric}'")


def test_missing_rows_is_an_invalid_attribute():
    rejected(to_bytes(dataset(Rows=None)), RejectionCode.INVALID_ATTRIBUTE, r"Rows \(0028,0010\) is missing")


def test_bits_stored_above_bits_allocated_is_an_invalid_attribute():
    rejected(to_bytes(dataset(BitsStored=17)), RejectionCode.INVALID_ATTRIBUTE, r"BitsStored \(0028,0101\) is 17")


def test_truncated_uncompressed_pixel_data_is_corrupt():
    ds = dataset()
    ds.PixelData = ds.PixelData[:-1000]
    rejected(to_bytes(ds), RejectionCode.CORRUPT_PIXEL_DATA, r"holds \d+ bytes; .* need \d+")


def test_damaged_jpeg_ls_codestream_is_corrupt_and_names_the_syntax():
    ds = dataset()
    ds.compress(JPEGLSLossless, encoding_plugin="pyjpegls")
    frame = bytearray(ds.PixelData[16:])  # past the basic offset table item
    ds.PixelData = encapsulate([bytes(frame[:40]) + b"\x00" * 64])
    rejected(to_bytes(ds), RejectionCode.CORRUPT_PIXEL_DATA, r"JPEG-LS Lossless Image Compression \(1\.2\.840\.10008\.1\.2\.4\.80\)")


def test_syntax_without_a_decoder_is_unsupported():
    ds = dataset()
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9.7433.99.1"  # a vendor's private compressed syntax
    ds.PixelData = encapsulate([b"\xff\x0a" + bytes(100)])
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True, enforce_file_format=True)
    rejected(buffer.getvalue(), RejectionCode.UNSUPPORTED_TRANSFER_SYNTAX, r"1\.2\.826\.0\.1\.3680043\.9\.7433\.99\.1")


def test_rle_and_jpeg_ls_decode_to_the_stored_values():
    pixels = chest_like()
    reference = read_radiograph(to_bytes(dataset(pixels))).pixels
    for syntax in (RLELossless, JPEGLSLossless):
        ds = dataset(pixels)
        ds.compress(syntax)
        np.testing.assert_array_equal(read_radiograph(to_bytes(ds)).pixels, reference)


# --- policy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["MR", "CT", "US", "OT"])
def test_other_modalities_are_not_radiographs(modality):
    rejected(to_bytes(dataset(Modality=modality)), RejectionCode.NOT_RADIOGRAPH, f"Modality \\(0008,0060\\) is '{modality}'")


def test_secondary_capture_is_accepted_only_with_a_radiographic_modality():
    sc = {"SOPClassUID": SECONDARY_CAPTURE}
    assert read_radiograph(to_bytes(dataset(Modality="CR", **sc))).modality == "CR"
    rejected(to_bytes(dataset(Modality="OT", **sc)), RejectionCode.NOT_RADIOGRAPH, "Modality")


def test_unlisted_sop_class_is_refused_even_with_modality_cr():
    ds = dataset(SOPClassUID="1.2.840.10008.5.1.4.1.1.481.2")  # RT Dose
    rejected(to_bytes(ds), RejectionCode.NOT_RADIOGRAPH, r"SOPClassUID \(0008,0016\) is RT Dose Storage")


@pytest.mark.parametrize("body_part,accepted", [("HIP", False), ("HAND", False), ("THORAX", True), ("chest pa", True), (None, True)])
def test_body_part(body_part, accepted):
    data = to_bytes(dataset(BodyPartExamined=body_part))
    if accepted:
        assert read_radiograph(data).pixels.size
    else:
        rejected(data, RejectionCode.NOT_CHEST, f"BodyPartExamined \\(0018,0015\\) is '{body_part}'")


def test_policy_can_widen_body_parts():
    policy = AcceptancePolicy(body_part_tokens=("CHEST", "ABDOMEN"))
    assert read_radiograph(to_bytes(dataset(BodyPartExamined="ABDOMEN")), policy).body_part == "ABDOMEN"


def test_too_small_and_too_large():
    small = chest_like(200, 300)
    rejected(to_bytes(dataset(small)), RejectionCode.TOO_SMALL, "200x300 .* at least 256 px")
    policy = AcceptancePolicy(max_side=300)
    error = rejected(to_bytes(dataset(chest_like(320, 256))), RejectionCode.TOO_LARGE, "320x256 .* 300 px a side", policy)
    assert error.http_status == 413


def test_file_size_limit():
    policy = AcceptancePolicy(max_file_bytes=10_000)
    rejected(to_bytes(dataset()), RejectionCode.TOO_LARGE, "exceeds the limit of 10000 bytes", policy)


# --- grey scale -----------------------------------------------------------------------------------


def _normalised_pydicom(ds: Dataset) -> np.ndarray:
    out = apply_voi_lut(ds.pixel_array.astype(np.float64), ds)
    with np.errstate(over="ignore"):
        lo, hi = apply_voi_lut(np.array([-(2**31), 2**31 - 1]), ds)
    return (out - lo) / (hi - lo)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_window_from_the_file_matches_pydicom(function):
    ds = dataset(WindowCenter=1800, WindowWidth=1500, VOILUTFunction=function)
    radiograph = read_radiograph(to_bytes(ds))
    assert radiograph.window_source == ("voi_lut" if function == "SIGMOID" else "window")
    np.testing.assert_allclose(radiograph.pixels, _normalised_pydicom(ds), atol=2e-5)


def test_rescale_then_window_matches_pydicom():
    ds = dataset(RescaleSlope=2.0, RescaleIntercept=-1000.0, WindowCenter=2500, WindowWidth=3000)
    from pydicom.pixels import apply_modality_lut

    expected = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    lo, hi = apply_voi_lut(np.array([-(2**31), 2**31 - 1]), ds)
    np.testing.assert_allclose(read_radiograph(to_bytes(ds)).pixels, (expected - lo) / (hi - lo), atol=2e-5)


def test_voi_lut_sequence_is_applied():
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.add_new(0x00283006, "OW", (np.sqrt(np.arange(4096) / 4095) * 65535).astype("<u2").tobytes())  # LUT Data
    ds = dataset(VOILUTSequence=[lut])
    radiograph = read_radiograph(to_bytes(ds))
    assert radiograph.window_source == "voi_lut"
    np.testing.assert_allclose(radiograph.pixels, np.sqrt(ds.pixel_array / 4095), atol=1e-4)


def test_invalid_window_falls_back_to_percentiles_with_a_warning():
    radiograph = read_radiograph(to_bytes(dataset(WindowCenter=1000, WindowWidth=0)))
    assert radiograph.window_source == "percentile"
    assert "invalid_window" in radiograph.warnings


def test_percentile_window_without_voi():
    pixels = chest_like()
    radiograph = read_radiograph(to_bytes(dataset(pixels)))
    assert radiograph.window_source == "percentile"
    lo, hi = np.percentile(pixels, [0.5, 99.5])
    assert np.mean(radiograph.pixels == 0.0) == pytest.approx(np.mean(pixels <= lo), abs=0.01)
    assert np.mean(radiograph.pixels == 1.0) == pytest.approx(np.mean(pixels >= hi), abs=0.01)


def test_eight_bit_without_voi_uses_the_full_range():
    pixels = (chest_like(bits=8)).astype(np.uint8)
    radiograph = read_radiograph(to_bytes(dataset(pixels, bits_stored=8)))
    assert radiograph.window_source == "full_range"
    np.testing.assert_allclose(radiograph.pixels, pixels / 255.0, atol=1e-6)


@pytest.mark.parametrize(
    "photometric,shape,inverted",
    [("MONOCHROME2", None, False), ("MONOCHROME1", None, True), ("MONOCHROME1", "INVERSE", True),
     ("MONOCHROME2", "INVERSE", True), ("MONOCHROME2", "IDENTITY", False)],
)
def test_inversion_happens_exactly_once(photometric, shape, inverted):
    window = {"WindowCenter": 2048, "WindowWidth": 4096}
    plain = read_radiograph(to_bytes(dataset(**window))).pixels
    ds = dataset(PhotometricInterpretation=photometric, PresentationLUTShape=shape, **window)
    pixels = read_radiograph(to_bytes(ds), AcceptancePolicy()).pixels
    np.testing.assert_allclose(pixels, 1.0 - plain if inverted else plain, atol=1e-6)


def test_plausibility_check_warns_or_rejects_by_setting():
    inverted = (4095 - chest_like()).astype(np.uint16)
    assert "appears_inverted" not in read_radiograph(to_bytes(dataset())).warnings
    assert "appears_inverted" in read_radiograph(to_bytes(dataset(inverted))).warnings
    rejected(to_bytes(dataset(inverted)), RejectionCode.APPEARS_INVERTED, "looks inverted", AcceptancePolicy(reject_inverted=True))


def test_lateral_view_warns_and_skips_the_frontal_plausibility_check():
    inverted = (4095 - chest_like()).astype(np.uint16)
    radiograph = read_radiograph(to_bytes(dataset(inverted, ViewPosition="LL")))
    assert "non_frontal_view" in radiograph.warnings and "appears_inverted" not in radiograph.warnings


# --- spacing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attributes,expected,source",
    [
        ({}, (0.15, 0.16), "PixelSpacing"),
        ({"PixelSpacing": [0, 0], "ImagerPixelSpacing": [0.2, 0.2]}, (0.2, 0.2), "ImagerPixelSpacing"),
        ({"PixelSpacing": None, "ImagerPixelSpacing": [0.2, 0.175], "EstimatedRadiographicMagnificationFactor": 1.25},
         (0.16, 0.14), "ImagerPixelSpacing/EstimatedRadiographicMagnificationFactor"),
        ({"PixelSpacing": None}, None, None),
        ({"PixelSpacing": [0, 0]}, None, None),
        ({"PixelSpacing": [-0.1, 0.1]}, None, None),
    ],
)
def test_spacing(attributes, expected, source):
    radiograph = read_radiograph(to_bytes(dataset(**attributes)))
    assert radiograph.spacing_source == source
    if expected is None:
        assert radiograph.spacing_mm is None and "spacing_unknown" in radiograph.warnings
    else:
        assert radiograph.spacing_mm == pytest.approx(expected)


# --- PNG ------------------------------------------------------------------------------------------


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_eight_bit_png_is_a_radiograph_of_unknown_spacing():
    pixels = chest_like(bits=8).astype(np.uint8)
    radiograph = read_radiograph(_png(pixels))
    assert radiograph.source_format == "png" and radiograph.spacing_mm is None
    np.testing.assert_allclose(radiograph.pixels, pixels / 255.0, atol=1e-6)


def test_sixteen_bit_png_is_windowed_by_percentiles():
    pixels = chest_like(bits=16)
    radiograph = read_radiograph(_png(pixels))
    assert radiograph.window_source == "percentile" and radiograph.pixels.shape == pixels.shape
    assert radiograph.pixels.min() == 0.0 and radiograph.pixels.max() == 1.0


def test_colour_png_and_broken_png_are_refused():
    rgb = np.stack([chest_like(bits=8).astype(np.uint8)] * 3, axis=-1)
    rejected(_png(rgb), RejectionCode.COLOUR, "PNG mode is RGB")
    rejected(_png(chest_like(bits=8).astype(np.uint8))[:200], RejectionCode.CORRUPT_PIXEL_DATA, "PNG")
    rejected(_png(chest_like(100, 400, bits=8).astype(np.uint8)), RejectionCode.TOO_SMALL, "100x400")
