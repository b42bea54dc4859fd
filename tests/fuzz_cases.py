"""Bad input for the fuzz tests and the long fuzz run: mutated real DICOMs, crafted worst cases, outcome checks.

Shared by `tests/test_fuzz_*.py` (small, derandomised budgets in CI) and `load_tests/fuzz_long.py` (a large
budget, run by hand), so both exercise the same mutations and hold the service to the same rule: the
only outcomes of `read_radiograph` are a `Radiograph` or a `RadiographError` with a known code.

Mutations are structure-aware where it matters: besides byte flips, insertions, deletions and truncation,
the value length fields of real elements (found by parsing the file once) are set huge or undefined, which
is how a hostile or broken sender reaches the allocation paths of a DICOM parser.
"""

from __future__ import annotations

import functools
import io
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import DeflatedExplicitVRLittleEndian

from service.imaging import grayscale
from service.imaging.radiograph import Radiograph, RadiographError, RejectionCode
from service.imaging.reader import read_radiograph
from tests.dicom_factory import dataset

KNOWN_CODES = frozenset(RejectionCode)
HUGE_LENGTHS = (0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF, 0x80000000, 0x10000000, 0xFFFF, 0x7FFF)
# Small and medium real files: quick enough to decode hundreds of times in CI. The 4 MB Canon film and the
# 1.6 MB hip film are in the long run (`ALL_FILES`).
SUITE_FILES = (
    "chest/siim_cr_jpegbaseline_mono2.dcm",
    "other/MR_small_RLE.dcm",
    "other/MR_small_jpeg_ls_lossless.dcm",
    "other/MR_small_bigendian.dcm",
    "other/MR_small_implicit.dcm",
    "other/image_dfl.dcm",
    "other/CT_small.dcm",
    "other/SC_rgb_jpeg_dcmtk.dcm",
    "other/reportsi.dcm",
    "corrupt/JPEG2000-embedded-sequence-delimiter.dcm",
    "corrupt/MR_truncated.dcm",
    "corrupt/badVR.dcm",
    "corrupt/meta_missing_tsyntax.dcm",
)
ALL_FILES = SUITE_FILES + (
    "chest/siim_cr_jpegbaseline_mono1_flagged.dcm",
    "chest/philips_cr_j2k_lossy_mono1.dcm",
    "chest/canon_dx_j2k_lossless_mono1_inverse.dcm",
    "other/cr_extremity_j2k_mono1.dcm",
    "other/cr_hip_jpegls_lossless.dcm",
    "other/examples_palette.dcm",
    "other/waveform_ecg.dcm",
    "corrupt/cr_hip_jpeg_extended_bad_sos.dcm",
)


@dataclass(frozen=True)
class LengthField:
    """Where a real element's value length is stored in the file, and how wide it is."""

    offset: int
    size: int  # 2 or 4 bytes
    little_endian: bool


@functools.lru_cache(maxsize=8)
def length_fields(data: bytes) -> tuple[LengthField, ...]:
    """The value length fields of the top-level elements of a file (empty when pydicom cannot parse it)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception:  # noqa: BLE001 -- a file pydicom cannot parse simply has no known fields
        return ()
    fields = []
    for raw in list(ds._dict.values()) + list(ds.file_meta._dict.values()):  # noqa: SLF001 -- raw offsets
        tell = getattr(raw, "value_tell", None)
        if tell is None:
            continue
        implicit = bool(getattr(raw, "is_implicit_VR", False))
        wide = implicit or raw.VR in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV")
        size = 4 if wide else 2
        if tell - size >= 0:
            fields.append(LengthField(tell - size, size, bool(getattr(raw, "is_little_endian", True))))
    return tuple(fields)


def set_length(data: bytes, field: LengthField, value: int) -> bytes:
    value &= (1 << (8 * field.size)) - 1
    encoded = value.to_bytes(field.size, "little" if field.little_endian else "big")
    return data[: field.offset] + encoded + data[field.offset + field.size:]


@dataclass(frozen=True)
class Plan:
    """Which file to mutate and how: small, so Hypothesis can keep thousands of them (it keeps what a
    strategy returns; returning the mutated bytes themselves grew a long run to gigabytes)."""

    name: str
    ops: tuple[tuple[str, int, int, bytes], ...]  # (kind, position seed, argument, inserted bytes)


OPERATIONS = ("flip", "set", "insert", "delete", "truncate", "length", "length", "u32")


@st.composite
def plans(draw: st.DrawFn, names: tuple[str, ...]) -> Plan:
    """1-4 mutations of one of `names`: flips, overwrites, insertions, deletions, truncation, huge lengths.

    A case is a function of its draws alone: draw a whole plan before deciding anything else (the long run
    draws it through @given, before its clock check), never a part of it depending on time or on what an
    earlier case did; Hypothesis replays and extends draw sequences and stops with FlakyStrategyDefinition
    when the same choices lead to different draws.
    """
    name = draw(st.sampled_from(sorted(names)))
    ops = tuple((draw(st.sampled_from(OPERATIONS)), draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**16)),
                 draw(st.binary(min_size=1, max_size=64))) for _ in range(draw(st.integers(1, 4))))
    return Plan(name, ops)


def apply_plan(plan: Plan, files: dict[str, bytes]) -> bytes:
    data = bytearray(files[plan.name])
    for kind, position, argument, inserted in plan.ops:
        if not data:
            break
        at = position % len(data)
        if kind == "flip":
            data[at] ^= 1 << (argument % 8)
        elif kind == "set":
            data[at] = (0x00, 0xFF, 0x7F, 0x80, 0xFE)[argument % 5]
        elif kind == "insert":
            data[at:at] = inserted
        elif kind == "delete":
            del data[at: at + 1 + argument % 4096]
        elif kind == "truncate":
            del data[at:]
        elif kind == "u32":  # any 4 bytes set to a huge integer (a length, an offset, a dimension)
            data[at: at + 4] = HUGE_LENGTHS[argument % len(HUGE_LENGTHS)].to_bytes(4, "little")
        else:
            fields = length_fields(bytes(data))
            if fields:
                field = fields[position % len(fields)]
                data = bytearray(set_length(bytes(data), field, HUGE_LENGTHS[argument % len(HUGE_LENGTHS)]))
    return bytes(data)


def mutated(files: dict[str, bytes]) -> st.SearchStrategy[bytes]:
    """A mutated real file (the bytes themselves: for strategies that build on them, e.g. multipart bodies)."""
    return plans(tuple(files)).map(lambda plan: apply_plan(plan, files))


PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "PatientAddress")


@functools.lru_cache(maxsize=64)
def patient_values(data: bytes) -> tuple[str, ...]:
    """The patient attribute values of an (unmutated) file: none of them may appear in a rejection."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
        values = [str(ds.get(keyword, "") or "") for keyword in PATIENT_KEYWORDS]
    except Exception:  # noqa: BLE001
        return ()
    return tuple(v for v in values if len(v) >= 6) + ("Sentinel", "SENTINEL-ID")


def check_outcome(data: bytes, policy=None, secrets: tuple[str, ...] = ("Sentinel", "SENTINEL-ID")
                  ) -> Radiograph | RadiographError:
    """Run `read_radiograph`; return its Radiograph or its named rejection. Anything else propagates (a bug).

    A rejection must carry a known code and a short message without any of `secrets` (patient values).
    """
    try:
        radiograph = read_radiograph(data, policy) if policy is not None else read_radiograph(data)
    except RadiographError as exc:
        assert exc.code in KNOWN_CODES, f"unknown rejection code {exc.code!r}"
        assert exc.message and len(exc.message) < 1000, f"a rejection must say why, briefly: {exc.message[:300]!r}"
        leaked = [s for s in secrets if s in exc.message]
        assert not leaked, f"the rejection quotes patient data: {exc.message!r}"
        return exc
    assert isinstance(radiograph, Radiograph)
    pixels = radiograph.pixels
    assert pixels.ndim == 2 and pixels.dtype == np.float32 and np.isfinite(pixels).all()
    if policy is None or policy.reject_degenerate:  # what reaches a model always has something to see
        assert grayscale.degenerate_reason(pixels) is None, "a degenerate image was accepted"
    return radiograph


# --------------------------------------------------------------------------------------------------------------
# Crafted worst cases (each a deterministic test, and part of the long run's corpus)


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _item(elements: bytes) -> bytes:
    return b"\xfe\xff\x00\xe0" + len(elements).to_bytes(4, "little") + elements


def nested_sequences(depth: int, undefined_length: bool = False) -> bytes:
    """A chest film with a Content Sequence nested `depth` levels deep, encoded by hand (pydicom's writer
    recurses per level, so it cannot write what we want to read)."""
    leaf = b"\x08\x00\x00\x01SH\x02\x00X "  # (0008,0100) Code Value
    body = leaf
    for _ in range(depth):
        item = _item(body)
        if undefined_length:  # undefined length sequence and item, closed by delimiters
            item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + body + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
            body = b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff" + item + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
        else:
            body = b"\x40\x00\x30\xa7SQ\x00\x00" + len(item).to_bytes(4, "little") + item
    film = to_bytes(dataset())
    # (0040,A730) sorts before (7FE0,0010): insert it just before Pixel Data.
    at = film.index(b"\xe0\x7f\x10\x00")
    return film[:at] + body + film[at:]


def deflate_bomb(inflated_bytes: int) -> bytes:
    """A Deflated Explicit VR Little Endian file whose dataset inflates to about `inflated_bytes` of zeros."""
    ds = dataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    # One private OB element holding the zeros: (0009,0010) OB, 4-byte length.
    chunks = [compressor.compress(b"\x09\x00\x10\x00OB\x00\x00" + inflated_bytes.to_bytes(4, "little"))]
    zeros, left = bytes(1 << 20), inflated_bytes
    while left > 0:
        chunks.append(compressor.compress(zeros[: min(left, len(zeros))]))
        left -= len(zeros)
    chunks.append(compressor.flush())
    return _file_meta_bytes(ds) + b"".join(chunks)


def _file_meta_bytes(ds: Dataset) -> bytes:
    """Preamble, 'DICM' and the file meta group of `ds`, as pydicom writes them."""
    from pydicom.filewriter import write_file_meta_info

    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    buffer.write(b"\x00" * 128 + b"DICM")
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    write_file_meta_info(buffer, ds.file_meta, enforce_standard=True)
    return buffer.getvalue()


def load_files(root: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name in names if (root / name).is_file()}
