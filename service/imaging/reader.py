"""DICOM (or greyscale PNG) → `Radiograph`: the one way an image enters the service and the training code.

    read_radiograph(source) = load bytes → parse → check header (structure, then policy) → decode pixels
                              (JPEG 2000 / JPEG at the models' resolution where the policy asks: `reduced`)
                              → grey-scale to display [0, 1], air dark (the file's window unless it hides the
                                film: `display`) → spacing → something to see? (else degenerate_image)
                              → plausibility (on those same pixels) → Radiograph

Training reads its data through this same function, so a model never sees pixels prepared differently from
the ones it will be served.
"""

from __future__ import annotations

import io
import logging
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from service.errors import WarningCode
from service.imaging import grayscale
from service.imaging.acceptance import AcceptancePolicy
from service.imaging.decoding import decode_pixels
from service.imaging.display import FILE_WINDOWS, check_visible, to_display
from service.imaging.header import (
    check_header,
    check_size,
    read_floats,
)
from service.imaging.radiograph import Radiograph, RadiographError, RejectionCode
from service.metrics import child, metrics

# Invalid values are reported by our own checks with the tag named; pydicom's own warnings would only
# repeat them in the log, sometimes quoting values, so reading validation is off for this process.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE

Source = Union[bytes, bytearray, memoryview, str, os.PathLike, BinaryIO]

log = logging.getLogger("ptx.decode")
DEFAULT_POLICY = AcceptancePolicy()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_SEQUENCE_DEPTH = 32  # nesting in an image header (real ones: a few levels)
_PIXEL_DATA_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)  # Float, Double Float, Pixel Data
_FIRST_GROUPS = (0x0000, 0x0002, 0x0008)  # where a dataset without a preamble (ACR-NEMA) starts


@dataclass(frozen=True)
class Film:
    """A radiograph with the header it was read from (pixel data dropped): for the DICOM result writers,
    which must copy the patient and study modules, so that they do not parse the file again."""

    radiograph: Radiograph
    header: Dataset | None  # None for a PNG


def read_radiograph(source: Source, policy: AcceptancePolicy = DEFAULT_POLICY) -> Radiograph:
    """Decode and validate one chest radiograph; raise `RadiographError` (with a stable `code`) otherwise."""
    return read_film(source, policy).radiograph


def read_film(source: Source, policy: AcceptancePolicy = DEFAULT_POLICY) -> Film:
    """`read_radiograph`, keeping the parsed header (without pixel data) beside the radiograph."""
    data = _load(source, policy.max_file_bytes)
    if data[: len(PNG_SIGNATURE)] == PNG_SIGNATURE:
        return Film(_read_png(data, policy), None)
    check_inflated_size(data, policy.max_file_bytes)
    ds, inferred_syntax = parse_dicom(data)
    try:
        header = check_header(ds, policy)
    except RadiographError as exc:
        raise _truncated_pixel_data(data, exc) from None
    decoded = decode_pixels(ds, policy.decode_timeout_s, policy.decode_memory_mb, policy.decode_workers,
                            policy.decode_min_side)
    if decoded.fallback is not None:  # counted here, in the edge's process (the decode may run in a worker)
        child(metrics().decode_fallbacks, reason=decoded.fallback).inc()
        log.info("reduced decode of %s fell back to a full decode (%s)", header.transfer_syntax.name, decoded.detail)
    pixels, window_source, window_warnings = to_display(decoded.stored, ds, header)
    spacing, spacing_source = pixel_spacing(ds)
    warnings = list(header.warnings) + window_warnings
    if inferred_syntax:
        warnings.append(WarningCode.TRANSFER_SYNTAX_INFERRED.value)
    if spacing is None:
        warnings.append(WarningCode.SPACING_UNKNOWN.value)
    # On what the model will see: after any window fallback. A window from the file that `to_display` kept has
    # passed `hides_film`, which includes this very check on these very pixels: not sorted through twice.
    checked = window_source in FILE_WINDOWS and WarningCode.WINDOW_MISMATCH.value not in window_warnings
    if policy.reject_degenerate and not checked:
        check_visible(pixels)
    _check_plausible(pixels, policy, warnings, frontal=header.view_position in policy.frontal_views)
    radiograph = Radiograph(
        pixels=pixels,
        spacing_mm=spacing,
        spacing_source=spacing_source,
        study_uid=_uid(ds, "StudyInstanceUID"),
        series_uid=_uid(ds, "SeriesInstanceUID"),
        sop_uid=_uid(ds, "SOPInstanceUID"),
        sop_class_uid=header.sop_class_uid or None,
        modality=header.modality or None,
        view_position=header.view_position or None,
        body_part=header.body_part or None,
        photometric=header.photometric,
        transfer_syntax=str(header.transfer_syntax),
        window_source=window_source,
        source_format="dicom",
        warnings=tuple(warnings),
        grid=decoded.grid,
    )
    for tag in _PIXEL_DATA_TAGS:  # the bytes are decoded; the header alone travels on
        if tag in ds:
            del ds[tag]
    return Film(radiograph, ds)


def _load(source: Source, max_bytes: int) -> bytes:
    """The raw bytes of `source`, refusing more than `max_bytes` before reading them all."""
    too_large = RadiographError(RejectionCode.TOO_LARGE, f"the file exceeds the limit of {max_bytes} bytes")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.stat().st_size > max_bytes:
            raise too_large
        data = path.read_bytes()
    elif hasattr(source, "read"):
        data = source.read(max_bytes + 1)
    else:
        raise TypeError(f"read_radiograph takes bytes, a path or a binary file object, not {type(source).__name__}")
    if len(data) > max_bytes:
        raise too_large
    return data


def check_inflated_size(data: bytes, max_bytes: int) -> None:
    """Refuse a Deflated Explicit VR Little Endian file whose dataset inflates beyond `max_bytes`.

    pydicom inflates the whole dataset in memory before parsing it; deflate reaches ~1000:1, so a 600 KB
    upload became a 1.5 GB allocation (found by fuzzing). The inflated size is counted here first, in
    bounded chunks whose output is discarded, so the limit on the body also bounds what it inflates to.
    """
    if data[128:132] != b"DICM":
        return  # no file meta group, so no deflated transfer syntax
    stream = io.BytesIO(data)
    try:
        read_preamble(stream, False)
        syntax = _read_file_meta_info(stream).get("TransferSyntaxUID")  # converted here: may raise too
    except Exception:  # noqa: BLE001 -- not a Part 10 file with a readable meta group: parse_dicom decides
        return
    if syntax != DeflatedExplicitVRLittleEndian:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated, chunk = 0, 1 << 20
    pending = stream.read()
    while pending and not inflater.eof:
        try:
            inflated += len(inflater.decompress(pending, chunk))
        except zlib.error:
            return  # corrupt deflate data: pydicom's own parse reports it
        if inflated > max_bytes:
            raise RadiographError(
                RejectionCode.TOO_LARGE,
                f"the deflated dataset inflates beyond the limit of {max_bytes} bytes (PTX_MAX_FILE_BYTES)",
            )
        pending = inflater.unconsumed_tail


def parse_dicom(data: bytes) -> tuple[Dataset, bool]:
    """Parse DICOM Part 10 bytes, or a dataset without preamble and meta (ACR-NEMA style).

    Returns the dataset and whether its transfer syntax had to be inferred: a file without (0002,0010) is
    read in the encoding pydicom detects (implicit VR little endian for ACR-NEMA), and that syntax is set.
    """
    try:
        ds = dcmread(io.BytesIO(data))
    except InvalidDicomError:
        ds = _read_without_preamble(data)
    except RecursionError:  # undefined-length sequences nested ~300 deep: pydicom's reader recurses per level
        raise RadiographError(
            RejectionCode.NOT_DICOM,
            "the DICOM header could not be parsed: sequences are nested deeper than the parser follows",
        ) from None
    except Exception as exc:  # pydicom raises many types on a broken header: all mean "not parseable DICOM"
        raise RadiographError(
            RejectionCode.NOT_DICOM, f"the DICOM header could not be parsed ({type(exc).__name__})"
        ) from exc
    _convert_elements(ds)
    if "TransferSyntaxUID" in ds.file_meta:
        return ds, False
    implicit, little = ds.original_encoding
    ds.file_meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    )
    return ds, True


def _convert_elements(ds: Dataset) -> None:
    """Convert every element now, so a value pydicom cannot read fails here, named by its tag.

    Sequences deeper than MAX_SEQUENCE_DEPTH are refused: converting a level re-reads everything below it,
    so depth costs quadratic time (20,000 levels in a 530 KB file took 2 s; the body limit allows 512 MB).

    pydicom converts raw elements on first access; left lazy, an unknown VR or an undecodable value would
    raise (NotImplementedError, for one) from whichever check touches it first, outside any handler meant
    for it (found by fuzzing). Sequence items are walked with a stack, not recursion: nesting depth is
    whatever the sender wrote.
    """
    pending: list[tuple[Dataset, int]] = [(ds, 0)]
    if hasattr(ds, "file_meta"):
        pending.append((ds.file_meta, 0))
    while pending:
        current, depth = pending.pop()
        for tag in list(current.keys()):
            try:
                element = current[tag]
            except Exception as exc:  # pydicom raises NotImplementedError, ValueError, KeyError... per VR
                raise RadiographError(
                    RejectionCode.INVALID_ATTRIBUTE,
                    f"element ({tag.group:04X},{tag.element:04X}) cannot be read ({type(exc).__name__})",
                ) from None
            if element.VR != "SQ" or not element.value:
                continue
            if depth >= MAX_SEQUENCE_DEPTH:
                raise RadiographError(
                    RejectionCode.INVALID_ATTRIBUTE,
                    f"sequence ({tag.group:04X},{tag.element:04X}) is nested deeper than {MAX_SEQUENCE_DEPTH} "
                    "levels; an image header needs far fewer",
                )
            pending.extend((item, depth + 1) for item in element.value if isinstance(item, Dataset))


def _read_without_preamble(data: bytes) -> Dataset:
    not_dicom = RadiographError(
        RejectionCode.NOT_DICOM,
        "not a DICOM file (no 'DICM' prefix at byte 128, and not a dataset without preamble), nor a PNG",
    )
    try:
        ds = dcmread(io.BytesIO(data), force=True)
        tags = list(ds.keys())
    except Exception as exc:
        raise not_dicom from exc
    if not tags or tags[0].group not in _FIRST_GROUPS or not any(t.group == 0x7FE0 or t.group == 0x0028 for t in tags):
        raise not_dicom
    return ds


def _truncated_pixel_data(data: bytes, error: RadiographError) -> RadiographError:
    """NO_PIXEL_DATA for a file whose Pixel Data tag is there is a truncated file, not an image-less one.

    pydicom drops an element the file ends inside, so a transfer cut short inside the pixels would otherwise
    be reported as "no Pixel Data" (found by cutting a real film at every kilobyte).
    """
    if error.code is not RejectionCode.NO_PIXEL_DATA:
        return error
    if b"\xe0\x7f\x10\x00" not in data and b"\x7f\xe0\x00\x10" not in data:
        return error
    return RadiographError(
        RejectionCode.CORRUPT_PIXEL_DATA,
        "Pixel Data (7FE0,0010) is present but could not be read: the file ends inside it, or its length "
        "is wrong (a truncated transfer, usually)",
    )


def pixel_spacing(ds: Dataset) -> tuple[tuple[float, float] | None, str | None]:
    """(row, column) spacing in mm at the patient, and the attribute it came from; (None, None) if unknown.

    Pixel Spacing is calibrated at the patient and wins. Imager Pixel Spacing is at the detector: divided by
    the Estimated Radiographic Magnification Factor where present (PA chest ≈ 1.1), else taken as it is.
    Absent, zero, negative or non-finite values mean unknown: never a silent 1.0.
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        values = read_floats(ds, keyword)
        if not values or len(values) < 2 or not all(math.isfinite(v) and v > 0 for v in values[:2]):
            continue
        row, column = values[0], values[1]
        if keyword == "ImagerPixelSpacing":
            factor = read_floats(ds, "EstimatedRadiographicMagnificationFactor")
            if factor and math.isfinite(factor[0]) and factor[0] >= 1.0:
                return ((row / factor[0], column / factor[0]),
                        "ImagerPixelSpacing/EstimatedRadiographicMagnificationFactor")
        return (row, column), keyword
    return None, None


def _check_plausible(pixels: np.ndarray, policy: AcceptancePolicy, warnings: list[str], frontal: bool) -> None:
    if not frontal or not grayscale.appears_inverted(pixels):
        return
    if policy.reject_inverted:
        raise RadiographError(
            RejectionCode.APPEARS_INVERTED,
            "the mediastinum is darker than both lung fields: the image looks inverted "
            "(check Photometric Interpretation (0028,0004) and Presentation LUT Shape (2050,0020))",
        )
    warnings.append(WarningCode.APPEARS_INVERTED.value)


def _uid(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value) if value else None


def _read_png(data: bytes, policy: AcceptancePolicy) -> Radiograph:
    """An 8- or 16-bit greyscale PNG (public datasets ship them) as a radiograph of unknown spacing."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        mode, (columns, rows) = image.mode, image.size
    except (OSError, ValueError, SyntaxError) as exc:
        raise RadiographError(RejectionCode.CORRUPT_PIXEL_DATA, f"the PNG header is unreadable ({exc})") from exc
    if mode not in ("L", "I;16", "I;16B", "I;16L", "I"):
        raise RadiographError(
            RejectionCode.COLOUR, f"PNG mode is {mode}; only 8- or 16-bit greyscale PNG is accepted"
        )
    check_size(policy, rows, columns)
    try:
        stored = np.asarray(image)
    except (OSError, ValueError, SyntaxError) as exc:
        raise RadiographError(RejectionCode.CORRUPT_PIXEL_DATA, f"the PNG image data is corrupt ({exc})") from exc
    if mode == "L":
        affine, source = grayscale.range_window(0.0, 255.0), "full_range"
    else:
        affine, source = grayscale.range_window(*grayscale.percentile_range(stored)), "percentile"
    pixels = affine.apply(stored)
    if policy.reject_degenerate:
        check_visible(pixels)
    warnings = [WarningCode.SPACING_UNKNOWN.value]
    _check_plausible(pixels, policy, warnings, frontal=True)
    return Radiograph(
        pixels=pixels, spacing_mm=None, window_source=source, source_format="png", warnings=tuple(warnings)
    )
