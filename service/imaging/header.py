"""Reading and checking the header of a DICOM object before its pixels are decoded.

Checks run cheapest first and structure before meaning: the Image Pixel attributes must be present and
sane (and uncompressed pixel data long enough), then the acceptance policy decides whether the object is a
chest radiograph, and only then are pixels decoded. So a hip film is refused without decoding it, and a
truncated file is called corrupt whatever it shows.

Messages quote only image-description attributes (never patient attributes), cleaned and shortened.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID

from service.errors import WarningCode
from service.imaging.acceptance import DX_FOR_PROCESSING, AcceptancePolicy
from service.imaging.radiograph import RadiographError, RejectionCode
from service.imaging.uids import is_dicom_uid

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _tag(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    return f"{keyword} ({Tag(tag).group:04X},{Tag(tag).element:04X})" if tag is not None else keyword


def _quote(value: object, limit: int = 16) -> str:
    """A header value fit for an error message: printable ASCII only, shortened.

    Short by default (16, the longest CS value): a broken length field can make an element swallow the
    elements after it, patient name included, so a long value is never quoted whole.
    """
    text = "".join(ch for ch in str(value) if 32 <= ord(ch) < 127)
    return repr(text[:limit] + ("…" if len(text) > limit else ""))


_CODE_STRING = re.compile(r"[A-Z0-9 _\\.-]{1,16}")


def _code(value: str) -> str:
    """A code string (Modality, Body Part...) for a message: quoted when it looks like one, else described.

    Anything else (a value that swallowed other elements through a broken length) is not quoted at all.
    """
    if _CODE_STRING.fullmatch(value):
        return repr(value)
    return f"an invalid code string ({len(value)} characters)"


def uid_text(value: object) -> str:
    """A UID for a message: its registered name, the UID itself, or 'not a valid UID' (never the raw bytes)."""
    text = str(value).strip("\x00 ")
    if is_dicom_uid(text):
        return str(UID(text).name)
    return f"not a valid UID ({len(text)} characters)"


def _invalid(keyword: str, problem: str) -> RadiographError:
    return RadiographError(RejectionCode.INVALID_ATTRIBUTE, f"{_tag(keyword)} {problem}")


def read_int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    """An integer attribute; a missing required one or a malformed value is INVALID_ATTRIBUTE."""
    try:
        value = ds.get(keyword)
    except Exception as exc:  # a lazily parsed element can fail on first access, with any error type
        raise _invalid(keyword, f"cannot be read ({type(exc).__name__})") from exc
    if value is None or value == "":
        if default is None:
            raise _invalid(keyword, "is missing")
        return default
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None  # a multi-valued IS: the first value counts
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _invalid(keyword, f"value {_quote(value)} is not an integer") from None
    if not math.isfinite(number) or number != int(number):
        raise _invalid(keyword, f"value {_quote(value)} is not an integer")
    return int(number)


def read_text(ds: Dataset, keyword: str) -> str:
    """A code-string attribute, upper-cased and stripped ('' when absent or unreadable as text)."""
    try:
        value = ds.get(keyword)
    except Exception as exc:
        raise _invalid(keyword, f"cannot be read ({type(exc).__name__})") from exc
    if value is None:
        return ""
    if type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    return str(value).strip().upper()


def read_floats(ds: Dataset, keyword: str) -> list[float] | None:
    """A numeric multi-value (DS/FD) as floats; None when absent, empty or malformed."""
    try:
        value = ds.get(keyword)
    except Exception:
        return None  # callers treat an unreadable optional attribute as absent, which is what it is to them
    if value is None or value == "":
        return None
    items = list(value) if type(value).__name__ == "MultiValue" or isinstance(value, (list, tuple)) else [value]
    try:
        return [float(v) for v in items]
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class ImageHeader:
    """What the service needs from the header, read once and checked."""

    rows: int
    columns: int
    bits_allocated: int
    bits_stored: int
    photometric: str
    transfer_syntax: UID
    modality: str
    sop_class_uid: str
    body_part: str
    view_position: str
    presentation_lut_shape: str
    warnings: tuple[str, ...]

    @property
    def inverted(self) -> bool:
        """Whether display needs y ↦ 1 − y: MONOCHROME1, or a Presentation LUT Shape of INVERSE.

        The DX IOD pairs MONOCHROME1 with INVERSE to say the same thing once, so the two never stack
        (inverting twice would show the Canon film of the test set as a negative).
        """
        return self.photometric == "MONOCHROME1" or self.presentation_lut_shape == "INVERSE"


def _check_pixel_module(ds: Dataset) -> tuple[int, int, int, int, str]:
    if not any(keyword in ds for keyword in PIXEL_DATA_KEYWORDS):
        raise RadiographError(
            RejectionCode.NO_PIXEL_DATA,
            f"the object has no {_tag('PixelData')}"
            + (f" (SOP Class: {uid_text(ds.SOPClassUID)})" if "SOPClassUID" in ds else ""),
        )
    if "PixelData" not in ds:
        raise RadiographError(RejectionCode.NOT_RADIOGRAPH, "float pixel data is not a radiograph")
    rows, columns = read_int(ds, "Rows"), read_int(ds, "Columns")
    if rows <= 0 or columns <= 0:
        raise _invalid("Rows", f"x Columns is {rows}x{columns}; both must be positive")
    frames = read_int(ds, "NumberOfFrames", default=1)
    if frames > 1:
        raise RadiographError(
            RejectionCode.MULTI_FRAME, f"{_tag('NumberOfFrames')} is {frames}; a radiograph has one frame"
        )
    samples = read_int(ds, "SamplesPerPixel", default=1)
    photometric = read_text(ds, "PhotometricInterpretation")
    if samples != 1 or photometric not in MONOCHROME:
        raise RadiographError(
            RejectionCode.COLOUR,
            f"{_tag('PhotometricInterpretation')} is {_code(photometric) if photometric else 'absent'} with "
            f"{_tag('SamplesPerPixel')} {samples}; only single-sample MONOCHROME1/MONOCHROME2 is accepted",
        )
    bits_allocated = read_int(ds, "BitsAllocated")
    if bits_allocated not in (8, 16, 32):
        raise _invalid("BitsAllocated", f"is {bits_allocated}; 8, 16 or 32 is accepted")
    bits_stored = read_int(ds, "BitsStored", default=bits_allocated)
    if not 1 <= bits_stored <= bits_allocated:
        raise _invalid("BitsStored", f"is {bits_stored}; it must be 1..{bits_allocated} (Bits Allocated)")
    return rows, columns, bits_allocated, bits_stored, photometric


def _check_native_length(ds: Dataset, tsyntax: UID, rows: int, columns: int, bits_allocated: int) -> None:
    """Uncompressed pixel data shorter than the header promises is corrupt (a truncated transfer, usually)."""
    if tsyntax.is_compressed:
        return
    needed = rows * columns * (bits_allocated // 8)
    held = len(ds.PixelData)
    if held < needed:
        raise RadiographError(
            RejectionCode.CORRUPT_PIXEL_DATA,
            f"{_tag('PixelData')} holds {held} bytes; Rows x Columns x Bits Allocated "
            f"({rows}x{columns}x{bits_allocated}) need {needed}: the file is truncated or its header is wrong",
        )


def _check_policy(ds: Dataset, policy: AcceptancePolicy, modality: str, body_part: str) -> str:
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if policy.sop_classes is not None and sop_class and sop_class not in policy.sop_classes:
        raise RadiographError(
            RejectionCode.NOT_RADIOGRAPH,
            f"{_tag('SOPClassUID')} is {uid_text(sop_class)}; accepted: "
            + ", ".join(sorted(UID(uid).name for uid in policy.sop_classes)),
        )
    if policy.modalities is not None and modality not in policy.modalities:
        raise RadiographError(
            RejectionCode.NOT_RADIOGRAPH,
            f"{_tag('Modality')} is {_code(modality) if modality else 'absent'}; accepted: "
            + ", ".join(sorted(policy.modalities)),
        )
    if body_part and not policy.is_chest(body_part):
        raise RadiographError(
            RejectionCode.NOT_CHEST,
            f"{_tag('BodyPartExamined')} is {_code(body_part)}; a chest film names one of "
            + ", ".join(policy.body_part_tokens or ()),
        )
    return sop_class


def check_size(policy: AcceptancePolicy, rows: int, columns: int) -> None:
    """The policy's size limits, checked from the header before any pixel is decoded."""
    if min(rows, columns) < policy.min_side:
        raise RadiographError(
            RejectionCode.TOO_SMALL,
            f"image is {rows}x{columns} (Rows x Columns); each side must be at least {policy.min_side} px",
        )
    if max(rows, columns) > policy.max_side or rows * columns > policy.max_pixels:
        raise RadiographError(
            RejectionCode.TOO_LARGE,
            f"image is {rows}x{columns} (Rows x Columns); the limits are {policy.max_side} px a side "
            f"and {policy.max_pixels} pixels",
        )


def check_header(ds: Dataset, policy: AcceptancePolicy) -> ImageHeader:
    """Validate `ds` as a single-frame greyscale chest radiograph, without decoding its pixels."""
    rows, columns, bits_allocated, bits_stored, photometric = _check_pixel_module(ds)
    tsyntax = UID(ds.file_meta.TransferSyntaxUID)
    if not tsyntax.is_transfer_syntax:
        raise RadiographError(
            RejectionCode.UNSUPPORTED_TRANSFER_SYNTAX,
            f"{_tag('TransferSyntaxUID')} is {uid_text(tsyntax)}, not a transfer syntax any installed decoder knows",
        )
    _check_native_length(ds, tsyntax, rows, columns, bits_allocated)
    modality = read_text(ds, "Modality")
    body_part = read_text(ds, "BodyPartExamined")
    sop_class = _check_policy(ds, policy, modality, body_part)
    check_size(policy, rows, columns)
    view = read_text(ds, "ViewPosition")
    warnings: list[str] = []
    if sop_class == DX_FOR_PROCESSING:
        warnings.append(WarningCode.FOR_PROCESSING.value)
    if view not in policy.frontal_views:
        warnings.append(WarningCode.NON_FRONTAL_VIEW.value)
    return ImageHeader(
        rows=rows,
        columns=columns,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        photometric=photometric,
        transfer_syntax=tsyntax,
        modality=modality,
        sop_class_uid=sop_class,
        body_part=body_part,
        view_position=view,
        presentation_lut_shape=read_text(ds, "PresentationLUTShape"),
        warnings=tuple(warnings),
    )
