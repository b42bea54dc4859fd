"""Fuzzing `read_radiograph`: mutated real DICOMs and crafted worst cases.

The rule under test: the only outcomes are a `Radiograph` or a `RadiographError` with a known code and a
short message without patient data; never another exception, never unbounded time or memory. Budgets are
small and derandomised so CI is reproducible; `load_tests/fuzz_long.py` runs the same strategies with a
large budget (case counts in docs/service.md, "Limits").
"""

from __future__ import annotations

import collections
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless

from service.imaging.acceptance import AcceptancePolicy, permissive_policy
from service.imaging.radiograph import Radiograph, RadiographError, RejectionCode
from service.imaging.reader import MAX_SEQUENCE_DEPTH, read_radiograph
from tests.dicom_factory import dataset
from tests.fuzz_cases import (
    HUGE_LENGTHS,
    SUITE_FILES,
    apply_plan,
    check_outcome,
    deflate_bomb,
    length_fields,
    load_files,
    nested_sequences,
    patient_values,
    plans,
    set_length,
    to_bytes,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about every mangled element
SUITE_EXAMPLES = 300
FUZZ = settings(max_examples=SUITE_EXAMPLES, derandomize=True, database=None, deadline=10_000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
OUTCOMES: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="module")
def files(realdata: Path) -> dict[str, bytes]:
    return load_files(realdata, SUITE_FILES)


def test_mutated_real_files_give_a_radiograph_or_a_named_rejection(files: dict[str, bytes]) -> None:
    """Byte flips, insertions, deletions, truncation and huge length fields on 13 real files, under the
    default policy and a permissive one (which lets more mutants reach the pixel decoders)."""
    OUTCOMES.clear()

    @FUZZ
    @given(data=st.data(), permissive=st.booleans())
    def run(data: st.DataObject, permissive: bool) -> None:
        plan = data.draw(plans(tuple(files)))
        mutant, name = apply_plan(plan, files), plan.name
        started = time.perf_counter()
        outcome = check_outcome(mutant, permissive_policy() if permissive else None, patient_values(files[name]))
        assert time.perf_counter() - started < 10, "a single small file must never take 10 s"
        OUTCOMES["radiograph" if isinstance(outcome, Radiograph) else outcome.code.value] += 1

    run()
    assert sum(OUTCOMES.values()) == SUITE_EXAMPLES
    # The mutants reach both ends: some still decode to a radiograph, some are refused, for several reasons.
    assert OUTCOMES["radiograph"] > 0 and len(OUTCOMES) >= 5, OUTCOMES
    print(f"\nfuzz read_radiograph: {SUITE_EXAMPLES} cases, outcomes {dict(OUTCOMES)}")


@pytest.mark.parametrize("name", ["chest/siim_cr_jpegbaseline_mono2.dcm", "other/MR_small_RLE.dcm",
                                  "other/MR_small_implicit.dcm", "other/image_dfl.dcm",
                                  "other/MR_small_bigendian.dcm"])
def test_every_length_field_set_huge_stays_bounded(files: dict[str, bytes], name: str) -> None:
    """Every top-level element's value length set to 2^32-1 (undefined), 2^32-2 and 2^31-1 in turn: a named
    outcome each time, and no allocation beyond a small multiple of the file (the declared length is never
    trusted for a buffer)."""
    data = files[name]
    fields = length_fields(data)
    assert len(fields) >= 10, "the file's elements were not found"
    bound = 64 * 1024 * 1024 + 40 * len(data)  # decoded pixels as float32 + copies; far below the huge lengths
    cases = 0
    for field in fields:
        for value in HUGE_LENGTHS[:3]:
            mutant = set_length(data, field, value)
            tracemalloc.start()
            try:
                check_outcome(mutant, permissive_policy(), patient_values(data))
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak < bound, f"length {value:#x} at byte {field.offset} allocated {peak / 1e6:.0f} MB"
            cases += 1
    assert cases == 3 * len(fields)


@pytest.mark.parametrize("undefined_length", [False, True])
@pytest.mark.parametrize("depth", [MAX_SEQUENCE_DEPTH, 1000])
def test_deeply_nested_sequences(depth: int, undefined_length: bool) -> None:
    data = nested_sequences(depth, undefined_length)
    started = time.perf_counter()
    outcome = check_outcome(data)
    assert time.perf_counter() - started < 5
    if depth <= MAX_SEQUENCE_DEPTH:
        assert isinstance(outcome, Radiograph)
    else:
        assert isinstance(outcome, RadiographError)
        assert outcome.code in (RejectionCode.INVALID_ATTRIBUTE, RejectionCode.NOT_DICOM)
        assert "nested deeper" in outcome.message
        if not undefined_length:  # read level by level by us: the tag and the limit are named
            assert "(0040,A730)" in outcome.message and str(MAX_SEQUENCE_DEPTH) in outcome.message


def test_a_deflate_bomb_is_refused_without_inflating_it() -> None:
    bomb = deflate_bomb(600 * 1024 * 1024)
    assert len(bomb) < 1024 * 1024
    tracemalloc.start()
    try:
        outcome = check_outcome(bomb, AcceptancePolicy(max_file_bytes=64 * 1024 * 1024))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(outcome, RadiographError) and outcome.code is RejectionCode.TOO_LARGE
    assert "inflates beyond" in outcome.message and str(64 * 1024 * 1024) in outcome.message
    assert peak < 32 * 1024 * 1024, f"{peak / 1e6:.0f} MB allocated to refuse it"
    # A small deflated film still reads (the check does not refuse deflate itself).
    assert isinstance(check_outcome(deflate_bomb(1024)), RadiographError)  # no pixel data in it: refused as such


def test_a_real_deflated_file_still_reads(realdata: Path) -> None:
    outcome = check_outcome((realdata / "other/image_dfl.dcm").read_bytes(), permissive_policy())
    assert isinstance(outcome, Radiograph) and outcome.transfer_syntax == "1.2.840.10008.1.2.1.99"


def _edit(data: bytes, marker: bytes, offset: int, replacement: bytes) -> bytes:
    at = data.index(marker) + offset
    return data[:at] + replacement + data[at + len(replacement):]


@pytest.mark.parametrize("name, marker, offset, size", [
    ("other/cr_hip_jpegls_lossless.dcm", b"\xff\xf7", 5, b"\xff\xff\xff\xff"),  # JPEG-LS SOF55: 65535x65535
    ("chest/siim_cr_jpegbaseline_mono2.dcm", b"\xff\xc0", 5, b"\x30\x00\x30\x00"),  # JPEG SOF0: 12288x12288
    ("chest/canon_dx_j2k_lossless_mono1_inverse.dcm", b"\xff\x4f\xff\x51", 8,
     (60000).to_bytes(4, "big") * 2),  # JPEG 2000 SIZ: 60000x60000
])
def test_a_codestream_declaring_another_size_is_not_decoded(realdata: Path, name: str, marker: bytes, offset: int,
                                                            size: bytes) -> None:
    """Decoders allocate what the codestream declares: a JPEG-LS edited to 65535x65535 took 49 s and 3 GB
    before this check. Refused from the codestream header, in milliseconds, naming both sizes."""
    data = _edit((realdata / name).read_bytes(), marker, offset, size)
    started = time.perf_counter()
    outcome = check_outcome(data, permissive_policy())
    assert time.perf_counter() - started < 2
    assert isinstance(outcome, RadiographError) and outcome.code is RejectionCode.CORRUPT_PIXEL_DATA
    assert "codestream declares" in outcome.message and "Rows (0028,0010)" in outcome.message


@pytest.mark.parametrize("syntax", [JPEGBaseline8Bit, JPEGLSLossless, JPEG2000Lossless, RLELossless])
def test_raw_pixels_labelled_compressed_are_named_corrupt(syntax: str) -> None:
    ds = dataset()
    ds.file_meta.TransferSyntaxUID = syntax
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([ds.PixelData])  # raw bytes in one fragment, as a confused sender might
    ds["PixelData"].VR = "OB"
    outcome = check_outcome(to_bytes(ds))
    assert isinstance(outcome, RadiographError) and outcome.code is RejectionCode.CORRUPT_PIXEL_DATA
    assert "could not be decoded" in outcome.message or "decoded to shape" in outcome.message


def test_compressed_pixels_labelled_uncompressed_are_named_corrupt(realdata: Path) -> None:
    ds = pydicom.dcmread(realdata / "chest/siim_cr_jpegbaseline_mono2.dcm")
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    outcome = check_outcome(to_bytes(ds), None, patient_values((realdata / "chest/siim_cr_jpegbaseline_mono2.dcm").read_bytes()))
    assert isinstance(outcome, RadiographError) and outcome.code is RejectionCode.CORRUPT_PIXEL_DATA
    assert "truncated" in outcome.message  # 127 KB of JPEG cannot hold 1024x1024 native pixels


def _reencode(data: bytes, keyword: str, vr: bytes, value: bytes) -> bytes:
    """`data` (explicit VR little endian) with the element `keyword` written again with another VR / value."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    key = (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little")
    at = data.index(key, 132)
    if data[at + 4: at + 6] in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        end = at + 12 + int.from_bytes(data[at + 8: at + 12], "little")
    else:
        end = at + 8 + int.from_bytes(data[at + 6: at + 8], "little")
    if vr in (b"OB", b"OW", b"UN", b"UT"):
        element = key + vr + b"\x00\x00" + len(value).to_bytes(4, "little") + value
    else:
        element = key + vr + len(value).to_bytes(2, "little") + value
    return data[:at] + element + data[end:]


@pytest.mark.parametrize("keyword, vr, value", [
    ("Rows", b"LO", b"lots"), ("Columns", b"FD", b"\x00" * 8), ("BitsAllocated", b"UN", b"\x10"),
    ("Rows", b"TI", b"\x00\x01"), ("SOPClassUID", b"UI", b"Sentinel^Patient" * 8),
    ("Modality", b"CS", b"SENTINEL-ID-0001" * 4), ("BodyPartExamined", b"CS", b"\xff\xfe" * 9),
    ("TransferSyntaxUID", b"UM", b"1.2.840.10008.1.2.1\x00"),  # found by the long run: unknown VR in the meta
])
def test_wrong_vr_or_value_is_named(keyword: str, vr: bytes, value: bytes) -> None:
    """An element re-encoded with a wrong or unknown VR, or with a value that swallowed patient data: a
    named rejection (or a radiograph, where the value is still readable), never a quote of patient data."""
    data = _reencode(to_bytes(dataset()), keyword, vr, value)
    outcome = check_outcome(data)
    assert isinstance(outcome, RadiographError), outcome
    assert outcome.code in (RejectionCode.INVALID_ATTRIBUTE, RejectionCode.NOT_RADIOGRAPH,
                            RejectionCode.NOT_CHEST, RejectionCode.NOT_DICOM), outcome


def test_truncation_at_every_kilobyte(files: dict[str, bytes]) -> None:
    data = files["chest/siim_cr_jpegbaseline_mono2.dcm"]
    codes = collections.Counter()
    for end in range(0, len(data), 1024):
        outcome = check_outcome(data[:end], None, patient_values(data))
        assert isinstance(outcome, RadiographError), f"a film cut at {end} bytes was accepted"
        codes[outcome.code.value] += 1
    assert set(codes) <= {"not_dicom", "no_pixel_data", "corrupt_pixel_data", "invalid_attribute"}, codes
    assert codes["corrupt_pixel_data"] > 50  # cut inside the JPEG: named as corrupt data, not as "not DICOM"


def test_the_untouched_files_are_unchanged(files: dict[str, bytes]) -> None:
    """The fuzz oracle is not vacuous: the unmutated chest film is a radiograph with the expected pixels."""
    reference = read_radiograph(files["chest/siim_cr_jpegbaseline_mono2.dcm"])
    outcome = check_outcome(files["chest/siim_cr_jpegbaseline_mono2.dcm"])
    assert isinstance(outcome, Radiograph) and np.array_equal(outcome.pixels, reference.pixels)
