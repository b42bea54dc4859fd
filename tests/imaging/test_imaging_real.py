"""read_radiograph on the real third-party files in ../shared/realdata (registry: tests/realdata.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_voi_lut

from service.imaging.acceptance import permissive_policy
from service.imaging.grayscale import appears_inverted
from service.imaging.radiograph import Radiograph, RadiographError
from service.imaging.reader import read_radiograph
from tests import realdata as registry


@pytest.mark.parametrize("entry", registry.CHEST, ids=registry.ids(registry.CHEST))
def test_chest_films_read_as_plausible_radiographs(realdata, entry):
    path = realdata / entry.path
    header = pydicom.dcmread(path, stop_before_pixels=True)
    radiograph = read_radiograph(path)

    assert radiograph.pixels.dtype == np.float32
    assert radiograph.pixels.shape == (header.Rows, header.Columns)
    assert 0.0 <= radiograph.pixels.min() and radiograph.pixels.max() <= 1.0
    assert radiograph.pixels.std() > 0.1, "a chest film has contrast"
    assert ("appears_inverted" in radiograph.warnings) is entry.inverted_flag
    assert "window_mismatch" not in radiograph.warnings, "the file's own window (if any) shows the film"
    assert appears_inverted(radiograph.pixels) is entry.inverted_flag
    if entry.spacing_mm is None:
        assert radiograph.spacing_mm is None and "spacing_unknown" in radiograph.warnings
    else:
        assert radiograph.spacing_mm == pytest.approx(entry.spacing_mm)
    assert radiograph.sop_uid == header.SOPInstanceUID
    assert radiograph.study_uid == header.StudyInstanceUID
    assert radiograph.series_uid == header.SeriesInstanceUID


@pytest.mark.parametrize("entry", registry.CHEST, ids=registry.ids(registry.CHEST))
def test_radiograph_carries_no_patient_identifiers(realdata, entry):
    header = pydicom.dcmread(realdata / entry.path, stop_before_pixels=True)
    radiograph = read_radiograph(realdata / entry.path)
    names = {f.name for f in dataclasses.fields(Radiograph)}
    assert not any("patient" in name or "birth" in name or "accession" in name for name in names)
    identifiers = [str(header.get(k, "")) for k in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber")]
    values = [str(getattr(radiograph, name)) for name in names if name != "pixels"]
    for identifier in filter(None, identifiers):
        assert not any(identifier in value for value in values)


def test_monochrome1_flag_inverts_exactly_once(realdata):
    original = read_radiograph(realdata / "chest/siim_cr_jpegbaseline_mono2.dcm").pixels
    flagged = read_radiograph(realdata / "chest/siim_cr_jpegbaseline_mono1_flagged.dcm").pixels
    np.testing.assert_allclose(flagged, 1.0 - original, atol=1e-6)


def test_monochrome1_with_inverse_presentation_lut_inverts_once(realdata):
    """Canon DX: MONOCHROME1 + Presentation LUT Shape INVERSE say the same thing; invert once, matching pydicom."""
    path = realdata / "chest/canon_dx_j2k_lossless_mono1_inverse.dcm"
    ds = pydicom.dcmread(path)
    windowed = apply_voi_lut(ds.pixel_array, ds)  # pydicom's exact window, in 0..2**BitsStored-1
    expected = 1.0 - windowed / (2**ds.BitsStored - 1)
    actual = read_radiograph(path).pixels
    np.testing.assert_allclose(actual, expected, atol=1e-4)
    # Both lung fields (mid-height, lateral) are darker than the spine (centre): not inverted twice.
    spine = actual[700:1300, 920:1080].mean()
    assert actual[700:1300, 300:600].mean() < spine and actual[700:1300, 1400:1700].mean() < spine


@pytest.mark.parametrize("entry", registry.OTHER + registry.CORRUPT, ids=registry.ids(registry.OTHER + registry.CORRUPT))
def test_non_chest_and_corrupt_files_are_rejected_with_their_code(realdata, entry):
    with pytest.raises(RadiographError) as caught:
        read_radiograph(realdata / entry.path)
    error = caught.value
    assert error.code.value == entry.code
    assert error.http_status in (400, 413, 422)
    assert "(" in error.message and ")" in error.message, "the message names a tag or transfer syntax"


@pytest.mark.parametrize("entry", registry.ALL, ids=registry.ids(registry.ALL))
def test_permissive_policy_shows_what_decoding_alone_yields(realdata, entry):
    """Every transfer syntax in the set decodes (big endian, implicit, deflated, RLE, JPEG-LS, J2K, JPEG);
    what is corrupt is reported as such once the policy no longer refuses it first."""
    path = realdata / entry.path
    if entry.permissive_code is None:
        radiograph = read_radiograph(path, permissive_policy())
        assert radiograph.pixels.shape == (pydicom.dcmread(path).Rows, pydicom.dcmread(path).Columns)
        assert np.isfinite(radiograph.pixels).all() and radiograph.pixels.std() > 0
    else:
        with pytest.raises(RadiographError) as caught:
            read_radiograph(path, permissive_policy())
        assert caught.value.code.value == entry.permissive_code


def test_corrupt_codestream_message_names_the_transfer_syntax(realdata):
    with pytest.raises(RadiographError, match=r"JPEG Extended \(Process 2 and 4\) \(1\.2\.840\.10008\.1\.2\.4\.51\)"):
        read_radiograph(realdata / "corrupt/cr_hip_jpeg_extended_bad_sos.dcm", permissive_policy())


def test_sources_bytes_path_and_file_object_agree(realdata):
    path = realdata / "chest/siim_cr_jpegbaseline_mono2.dcm"
    from_path = read_radiograph(path).pixels
    from_bytes = read_radiograph(path.read_bytes()).pixels
    with path.open("rb") as handle:
        from_file = read_radiograph(handle).pixels
    np.testing.assert_array_equal(from_path, from_bytes)
    np.testing.assert_array_equal(from_path, from_file)
