"""Stored pixel values → the display image the model sees, and the check that there is something to see.

    to_display(stored, ds, header) = modality transform → the file's VOI (window or LUT), unless it would hide
                                     the film → else a data-derived (percentile) window → inversion once

A window or VOI LUT is only a rendering hint from the sender. One that does not match the data (a 12-bit
window on values stored at an offset in 16 bits, a width of 1, a LUT that ends below the data) turns a good
film into a white, black or two-tone picture: the model would score nothing, and the score would look valid.
Such a window is set aside for the percentile window, with the `window_mismatch` warning; a model input that
is still degenerate (constant pixel data, a few grey levels) is refused with `degenerate_image`.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from service.errors import WarningCode
from service.imaging import grayscale
from service.imaging.header import ImageHeader, read_floats, read_text
from service.imaging.radiograph import RadiographError, RejectionCode

# Integer extremes: pydicom indexes VOI LUTs with integers (float input gives wrong results there).
_PROBE = np.array([-(2**31), 2**31 - 1], dtype=np.int64)
FILE_WINDOWS = ("window", "voi_lut")  # window sources taken from the file, which may not match its data


def to_display(stored: np.ndarray, ds: Dataset, header: ImageHeader) -> tuple[np.ndarray, str, list[str]]:
    """Stored values → float32 [0, 1], air dark. Returns pixels, where the window came from, warnings.

    The file's window or VOI LUT is used unless it hides the film (`grayscale.hides_film`: more than
    WINDOW_SATURATION_LIMIT of the pixels clipped, or a degenerate result); then the percentile window of the
    data is used instead and `window_mismatch` is reported, so that the reader knows the film was shown
    differently from what its sender asked for.
    """
    pixels, source, warnings = _file_display(stored, ds, header)
    if source in FILE_WINDOWS and grayscale.hides_film(pixels):
        pixels, source = percentile_display(stored, ds, header), "percentile"
        warnings.append(WarningCode.WINDOW_MISMATCH.value)
    return pixels, source, warnings


def check_visible(pixels: np.ndarray) -> None:
    """Refuse a model input that cannot hold anatomy (`degenerate_image`), whatever made it so.

    Runs on the pixels the model will see, after any window fallback: constant or near-constant pixel data,
    or too few grey levels (thresholds and their reasons: `service.imaging.grayscale`).
    """
    reason = grayscale.degenerate_reason(pixels)
    if reason is not None:
        raise RadiographError(
            RejectionCode.DEGENERATE_IMAGE,
            f"the image the model would see cannot show anatomy: {reason} (Pixel Data (7FE0,0010), after "
            "Window Center/Width (0028,1050)/(0028,1051) or a data-derived window)",
        )


def percentile_display(stored: np.ndarray, ds: Dataset, header: ImageHeader) -> np.ndarray:
    """The data-derived display: modality transform, then the 0.5-99.5 percentile range onto [0, 1]."""
    if ds.get("ModalityLUTSequence"):
        values = apply_modality_lut(stored, ds)
        affine = grayscale.range_window(*grayscale.percentile_range(values))
        return (affine.inverted() if header.inverted else affine).apply(values)
    modality = _modality(ds)
    low, high = grayscale.percentile_range(stored)
    low, high = sorted((modality.scale * low + modality.offset, modality.scale * high + modality.offset))
    affine = grayscale.range_window(low, high).after(modality)
    return (affine.inverted() if header.inverted else affine).apply(stored)


def _modality(ds: Dataset) -> grayscale.Affine:
    slope = read_floats(ds, "RescaleSlope")
    intercept = read_floats(ds, "RescaleIntercept")
    return grayscale.rescale(slope[0], intercept[0]) if slope and intercept else grayscale.IDENTITY


def _file_display(stored: np.ndarray, ds: Dataset, header: ImageHeader) -> tuple[np.ndarray, str, list[str]]:
    """The display the file asks for (its window or VOI LUT), or a data-derived one where it gives none.

    Linear chains (rescale + LINEAR window, or rescale + robust range) run as one float32 affine pass;
    LUT sequences and SIGMOID windows go through pydicom and are then mapped onto [0, 1] by their own range.
    """
    warnings: list[str] = []
    has_window = read_floats(ds, "WindowCenter") is not None and read_floats(ds, "WindowWidth") is not None
    function = read_text(ds, "VOILUTFunction") or "LINEAR"
    nonlinear = bool(ds.get("ModalityLUTSequence")) or bool(ds.get("VOILUTSequence")) or (
        has_window and function == "SIGMOID"
    )
    if nonlinear:
        try:
            values = apply_modality_lut(stored, ds)
            out = apply_voi_lut(values, ds)
            with np.errstate(over="ignore"):  # SIGMOID saturates at the extremes, which is the point
                probe = apply_voi_lut(_PROBE, ds)  # the output at both input extremes: the VOI's own range
            affine = grayscale.range_window(float(probe[0]), float(probe[1]))
            if header.inverted:
                affine = affine.inverted()
            return affine.apply(out), "voi_lut", warnings
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            warnings.append(WarningCode.INVALID_WINDOW.value)
            stored_values, source = apply_modality_lut(stored, ds), "percentile"
            affine = grayscale.range_window(*grayscale.percentile_range(stored_values))
            return (affine.inverted() if header.inverted else affine).apply(stored_values), source, warnings

    modality = _modality(ds)
    window: grayscale.Affine | None = None
    source = "window"
    if has_window:
        center = read_floats(ds, "WindowCenter")[0]  # type: ignore[index]  # several windows: the first is the default
        width = read_floats(ds, "WindowWidth")[0]  # type: ignore[index]
        try:
            window = grayscale.linear_window(center, width, function)
        except ValueError:
            warnings.append(WarningCode.INVALID_WINDOW.value)
    if window is None:
        if header.bits_stored <= 8 and modality == grayscale.IDENTITY:
            window, source = grayscale.range_window(0.0, float(2**header.bits_stored - 1)), "full_range"
        else:
            return percentile_display(stored, ds, header), "percentile", warnings
    affine = window.after(modality)
    if header.inverted:
        affine = affine.inverted()
    return affine.apply(stored), source, warnings
