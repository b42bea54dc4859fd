"""Registry of the real third-party files in ../shared/realdata with the outcome the service owes each.

One place says what every real file must give, so tests over them are a loop, and a new file is one line.
`code` is the rejection under the default policy (None = accepted); `permissive_code` is the outcome when
modality/body-part/size rules are switched off, i.e. what decoding alone yields (None = decodes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest


def realdata_dir() -> Path:
    """$PTX_REALDATA, else ../shared/realdata beside the repository root."""
    override = os.environ.get("PTX_REALDATA")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1].parent / "shared" / "realdata"


def require_realdata() -> Path:
    root = realdata_dir()
    if not root.is_dir():
        pytest.skip(f"real test data not found at {root} (set PTX_REALDATA or place shared/ beside the repo)")
    return root


@dataclass(frozen=True)
class RealFile:
    path: str
    code: str | None
    permissive_code: str | None
    inverted_flag: bool = False
    spacing_mm: tuple[float, float] | None = None


CHEST = [
    RealFile("chest/siim_cr_jpegbaseline_mono2.dcm", None, None, spacing_mm=(0.168, 0.168)),
    RealFile("chest/siim_cr_jpegbaseline_mono1_flagged.dcm", None, None, inverted_flag=True, spacing_mm=(0.168, 0.168)),
    RealFile("chest/philips_cr_j2k_lossy_mono1.dcm", None, None, spacing_mm=None),  # PixelSpacing is 0
    RealFile("chest/canon_dx_j2k_lossless_mono1_inverse.dcm", None, None, spacing_mm=(0.16, 0.16)),
]

OTHER = [
    RealFile("other/CT_small.dcm", "not_radiograph", None),
    RealFile("other/MR_small_RLE.dcm", "not_radiograph", None),
    RealFile("other/MR_small_bigendian.dcm", "not_radiograph", None),
    RealFile("other/MR_small_implicit.dcm", "not_radiograph", None),
    RealFile("other/MR_small_jpeg_ls_lossless.dcm", "not_radiograph", None),
    RealFile("other/image_dfl.dcm", "not_radiograph", None),  # deflated Secondary Capture, Modality OT
    RealFile("other/SC_rgb_jpeg_dcmtk.dcm", "colour", "colour"),
    RealFile("other/examples_palette.dcm", "colour", "colour"),
    RealFile("other/reportsi.dcm", "no_pixel_data", "no_pixel_data"),
    RealFile("other/waveform_ecg.dcm", "no_pixel_data", "no_pixel_data"),
    RealFile("other/cr_hip_jpegls_lossless.dcm", "not_chest", None),
    RealFile("other/cr_extremity_j2k_mono1.dcm", "not_chest", None),
]

# A hip film is refused as not_chest before its (corrupt) JPEG is ever decoded: decoding is the costly step.
# With the policy relaxed, the corruption itself is what is reported.
CORRUPT = [
    RealFile("corrupt/MR_truncated.dcm", "corrupt_pixel_data", "corrupt_pixel_data"),
    RealFile("corrupt/badVR.dcm", "invalid_attribute", "invalid_attribute"),
    RealFile("corrupt/meta_missing_tsyntax.dcm", "invalid_attribute", "invalid_attribute"),
    RealFile("corrupt/JPEG2000-embedded-sequence-delimiter.dcm", "not_radiograph", "corrupt_pixel_data"),
    RealFile("corrupt/cr_hip_jpeg_extended_bad_sos.dcm", "not_chest", "corrupt_pixel_data"),
]

ALL = CHEST + OTHER + CORRUPT


def ids(files: list[RealFile]) -> list[str]:
    return [f.path for f in files]
