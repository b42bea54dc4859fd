"""The radiograph as the rest of the service sees it, and the one way a radiograph is refused.

Everything downstream (preprocessing, models, post-processing, DICOM outputs, training) starts from a
`Radiograph`: display-oriented float pixels plus the few attributes the service needs. Patient identifiers
never enter it, so nothing downstream can leak them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from service.errors import ServiceError


class RejectionCode(str, Enum):
    """Stable machine codes for refused input; each carries the HTTP status the API answers with."""

    NOT_DICOM = "not_dicom"
    INVALID_ATTRIBUTE = "invalid_attribute"
    NO_PIXEL_DATA = "no_pixel_data"
    MULTI_FRAME = "multi_frame"
    COLOUR = "colour"
    NOT_RADIOGRAPH = "not_radiograph"
    NOT_CHEST = "not_chest"
    TOO_SMALL = "too_small"
    TOO_LARGE = "too_large"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    CORRUPT_PIXEL_DATA = "corrupt_pixel_data"
    DECODE_TIMEOUT = "decode_timeout"
    APPEARS_INVERTED = "appears_inverted"
    DEGENERATE_IMAGE = "degenerate_image"  # the model input is (near-)constant or has too few grey levels

    @property
    def http_status(self) -> int:
        """400 for what is not an image file at all, 413 for what exceeds a size limit, else 422."""
        if self is RejectionCode.NOT_DICOM:
            return 400
        if self is RejectionCode.TOO_LARGE:
            return 413
        return 422


class RadiographError(ServiceError, ValueError):
    """Input that cannot be triaged. `code` is stable for machines; the message names the tag and the limit.

    Messages never quote patient attributes: only image-description tags (modality, body part, sizes,
    transfer syntax) and UIDs appear in them.
    """

    code: RejectionCode

    def __init__(self, code: RejectionCode, message: str) -> None:
        super().__init__(message, code=code, http_status=code.http_status)

    def __reduce__(self) -> tuple[type[RadiographError], tuple[RejectionCode, str]]:
        return type(self), (self.code, self.message)


@dataclass(frozen=True)
class PixelGrid:
    """How pixels decoded at a reduced resolution sample the film (`service.imaging.reduced`).

    Each pixel stands for a `factor` x `factor` patch of the film's `rows` x `columns`: the block starting at
    film pixel k·factor for JPEG's DCT scaling (`centred` False), the patch centred on film pixel k·factor for a
    JPEG 2000 resolution level (`centred` True: the wavelet's low-pass band samples the even positions). The
    model inputs are resampled with that in mind (`service.cascade.resampling`), so they match the ones a full
    decode gives.
    """

    rows: int
    columns: int
    factor: int
    centred: bool

    def __post_init__(self) -> None:
        if self.rows < 1 or self.columns < 1 or self.factor < 2 or self.factor & (self.factor - 1):
            raise ValueError(f"a reduced grid needs positive rows and columns and a factor that is a power of 2 "
                             f"above 1, got {self.rows}x{self.columns} by {self.factor}")

    @property
    def reduced_shape(self) -> tuple[int, int]:
        """The pixels' shape: ceil(side / factor), as JPEG 2000 levels and libjpeg's scaling make it."""
        return -(-self.rows // self.factor), -(-self.columns // self.factor)


@dataclass(frozen=True, eq=False)
class Radiograph:
    """A decoded, validated, display-oriented chest radiograph.

    `pixels` are float32 in [0, 1] with air dark (MONOCHROME1 already inverted, modality and VOI transforms
    applied), read-only: at the film's own resolution, or coarser where the film was decoded only at the
    resolution the models need (`grid`, issue 15). The film's geometry is `rows` x `columns` (`shape`) either
    way, and it alone sizes the mask, RLE, boxes and SEG; `pixels.shape` sizes only what is drawn from the
    pixels. `spacing_mm` is the film's (row spacing, column spacing) in mm, or None when the file does not say:
    never a silent 1.0, because every millimetre figure depends on it.
    """

    pixels: np.ndarray
    spacing_mm: tuple[float, float] | None
    spacing_source: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    sop_class_uid: str | None = None
    modality: str | None = None
    view_position: str | None = None
    body_part: str | None = None
    photometric: str | None = None
    transfer_syntax: str | None = None
    window_source: str = "unknown"
    source_format: str = "dicom"
    warnings: tuple[str, ...] = field(default=())
    grid: PixelGrid | None = None  # how coarser pixels sample the film; None: pixel for pixel

    def __post_init__(self) -> None:
        pixels = self.pixels
        if not isinstance(pixels, np.ndarray) or pixels.ndim != 2:
            raise ValueError(f"Radiograph pixels must be a 2-D array, got {getattr(pixels, 'shape', type(pixels))}")
        if pixels.dtype != np.float32:
            raise ValueError(f"Radiograph pixels must be float32, got {pixels.dtype}")
        if self.spacing_mm is not None:
            if len(self.spacing_mm) != 2 or not all(math.isfinite(s) and s > 0 for s in self.spacing_mm):
                raise ValueError(f"spacing_mm must be two positive finite numbers or None, got {self.spacing_mm}")
        if self.grid is not None and pixels.shape != self.grid.reduced_shape:
            raise ValueError(f"Radiograph pixels of shape {pixels.shape} do not match their grid {self.grid}")
        if pixels.flags.writeable:
            pixels.flags.writeable = False

    @property
    def shape(self) -> tuple[int, int]:
        """The film's rows x columns (Rows (0028,0010) x Columns (0028,0011)), whatever grid the pixels are on."""
        return (self.grid.rows, self.grid.columns) if self.grid is not None else (
            int(self.pixels.shape[0]), int(self.pixels.shape[1]))

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def columns(self) -> int:
        return self.shape[1]

    @property
    def pixel_area_mm2(self) -> float | None:
        """Area of one pixel in mm², or None where the spacing is unknown."""
        if self.spacing_mm is None:
            return None
        return self.spacing_mm[0] * self.spacing_mm[1]

    def metadata(self) -> dict[str, object]:
        """JSON-ready description without pixels: what an API answer or a log line may carry (no PHI here)."""
        return {
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "sop_uid": self.sop_uid,
            "sop_class_uid": self.sop_class_uid,
            "modality": self.modality,
            "view_position": self.view_position,
            "body_part": self.body_part,
            "rows": self.rows,
            "columns": self.columns,
            "spacing_mm": list(self.spacing_mm) if self.spacing_mm else None,
            "spacing_source": self.spacing_source,
            "photometric": self.photometric,
            "transfer_syntax": self.transfer_syntax,
            "window_source": self.window_source,
            "source_format": self.source_format,
            "warnings": list(self.warnings),
        }
