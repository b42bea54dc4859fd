"""DICOM files the way chest films arrive at a PACS gateway: CR, DX and SIIM-style Secondary Capture.

Why the mix: the service must read every common lossless encoding, both photometric interpretations and
files with and without VOI windows and rescale tags. Only lossless transfer syntaxes are used so the stored
pixels, and hence the lesion masks, survive the round-trip exactly.

Pixel convention: the renderer's display image d in [0, 1] (air dark) becomes raw MONOCHROME2 values
round(lo + d * (hi - lo)); when a window is written it maps [lo, hi] back onto the full display range, so the
display contrasts are preserved; MONOCHROME1 stores max - raw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

# (transfer syntax, pydicom encoding plugin); the default mix cycles through them by image index.
ENCODINGS: tuple[tuple[UID, str | None], ...] = (
    (ExplicitVRLittleEndian, None),
    (RLELossless, "pylibjpeg"),
    (JPEGLSLossless, "pyjpegls"),
    (JPEG2000Lossless, "pylibjpeg"),
)
SOP_KINDS = {"CR": ComputedRadiographyImageStorage, "DX": DigitalXRayImageStorageForPresentation,
             "SC": SecondaryCaptureImageStorage}
FIXED_DATE = "20000101"  # no wall-clock dates in files: output must be byte-identical for a seed


@dataclass
class FileFormat:
    """Everything about how one image is stored, drawn per image and recorded in synth.json."""

    sop: str
    transfer_syntax: UID
    plugin: str | None
    photometric: str
    bits: int
    raw_range: tuple[int, int]
    window: tuple[float, float] | None
    rescale: tuple[float, float] | None
    spacing: float
    view: str

    @property
    def max_value(self) -> int:
        return (1 << self.bits) - 1

    def describe(self) -> dict:
        return {"sop_class": str(SOP_KINDS[self.sop]), "sop_kind": self.sop, "modality": self.modality,
                "transfer_syntax": str(self.transfer_syntax), "encoding": self.transfer_syntax.name,
                "photometric": self.photometric, "bits_stored": self.bits, "raw_range": list(self.raw_range),
                "window": list(self.window) if self.window else None,
                "rescale": list(self.rescale) if self.rescale else None,
                "spacing_mm": [self.spacing, self.spacing], "view_position": self.view}

    @property
    def modality(self) -> str:
        return "DX" if self.sop == "DX" else "CR"


def choose_format(rng: np.random.Generator, index: int, uncompressed: bool) -> FileFormat:
    """Draw a storage format; the transfer syntax cycles by index so every run of 4+ images has each."""
    sop = str(rng.choice(["CR", "DX", "SC"], p=[0.4, 0.3, 0.3]))
    bits = 8 if sop == "SC" else 12
    top = (1 << bits) - 1
    photometric = "MONOCHROME1" if sop != "SC" and rng.random() < 0.35 else "MONOCHROME2"
    window_kind = str(rng.choice(["none", "full", "sub"], p=[0.35, 0.35, 0.3])) if sop != "SC" else "none"
    lo, hi = (0, top)
    if window_kind == "sub" or (window_kind == "none" and rng.random() < 0.5):
        lo = int(rng.integers(0, top // 8))
        hi = int(rng.integers(top - top // 6, top + 1))
    rescale = None
    if sop != "SC" and rng.random() < 0.3:
        rescale = (float(rng.choice([1.0, 2.0])), float(rng.choice([0.0, -1024.0, 100.0])))
    window = None
    if window_kind != "none":
        centre, width = (lo + hi) / 2 + 0.5, float(hi - lo + 1)
        if photometric == "MONOCHROME1":
            centre = top - (lo + hi) / 2 + 0.5
        slope, intercept = rescale or (1.0, 0.0)
        window = (slope * centre + intercept, slope * width)
    spacing = round(float(rng.uniform(0.14, 0.20)), 3)
    view = str(rng.choice(["PA", "AP"], p=[0.7, 0.3]))
    ts, plugin = ENCODINGS[0] if uncompressed else ENCODINGS[index % len(ENCODINGS)]
    return FileFormat(sop=sop, transfer_syntax=ts, plugin=plugin, photometric=photometric, bits=bits,
                      raw_range=(lo, hi), window=window, rescale=rescale, spacing=spacing, view=view)


def to_stored(display: np.ndarray, fmt: FileFormat) -> np.ndarray:
    """Quantise the display image into the stored integers of `fmt` (inverted once for MONOCHROME1)."""
    lo, hi = fmt.raw_range
    raw = np.rint(lo + np.clip(display, 0.0, 1.0) * (hi - lo))
    if fmt.photometric == "MONOCHROME1":
        raw = fmt.max_value - raw
    return raw.astype(np.uint8 if fmt.bits == 8 else np.uint16)


def to_display(stored: np.ndarray, fmt: FileFormat) -> np.ndarray:
    """Inverse of `to_stored`: the display values the stored pixels stand for (used to measure contrast)."""
    raw = stored.astype(np.float32)
    if fmt.photometric == "MONOCHROME1":
        raw = fmt.max_value - raw
    lo, hi = fmt.raw_range
    return (raw - lo) / (hi - lo)


def uid_for(seed: int, index: int, what: str) -> UID:
    """Deterministic UIDs: the same seed and index always give the same study, series and instance."""
    return generate_uid(entropy_srcs=["ptx-synth", str(seed), str(index), what])


def patient_id(seed: int, index: int) -> str:
    """The synthetic patient of image `index`: one patient per image (the folds group by patient)."""
    return f"SYN-{seed}-{index:06d}"


def build_dataset(stored: np.ndarray, fmt: FileFormat, seed: int, index: int, rng: np.random.Generator) -> Dataset:
    """A complete dataset with fake patient attributes (so privacy checks have something to find)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SOP_KINDS[fmt.sop]
    ds.SOPInstanceUID = uid_for(seed, index, "sop")
    ds.StudyInstanceUID = uid_for(seed, index, "study")
    ds.SeriesInstanceUID = uid_for(seed, index, "series")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = FIXED_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "000000"
    ds.Modality = fmt.modality
    if fmt.sop == "SC":
        ds.ConversionType = "WSD"
    ds.Manufacturer = "ptx-triage synthetic"
    ds.SeriesDescription = f"view: {fmt.view}"
    ds.PatientName = f"Synthetic^{index:04d}"
    ds.PatientID = patient_id(seed, index)
    ds.PatientBirthDate = f"{int(rng.integers(1930, 2005))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    ds.PatientSex = str(rng.choice(["M", "F"]))
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = fmt.view
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.PatientOrientation = ["L", "F"] if fmt.view == "AP" else ["R", "F"]
    spacing = [f"{fmt.spacing:.3f}", f"{fmt.spacing:.3f}"]
    ds.PixelSpacing = spacing
    if fmt.sop == "DX":
        ds.ImagerPixelSpacing = spacing
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PresentationLUTShape = "INVERSE" if fmt.photometric == "MONOCHROME1" else "IDENTITY"
    if fmt.window:
        ds.WindowCenter, ds.WindowWidth = f"{fmt.window[0]:.1f}", f"{fmt.window[1]:.1f}"
    if fmt.rescale:
        ds.RescaleSlope, ds.RescaleIntercept = f"{fmt.rescale[0]:g}", f"{fmt.rescale[1]:g}"
        ds.RescaleType = "US"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = fmt.photometric
    ds.BitsAllocated = 8 if fmt.bits == 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = fmt.bits, fmt.bits - 1, 0
    if fmt.plugin is None:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = stored.tobytes()
    else:
        ds.compress(fmt.transfer_syntax, stored, encoding_plugin=fmt.plugin, generate_instance_uid=False)
    return ds


def write(ds: Dataset, path: Path) -> None:
    """Write a DICOM Part 10 file (preamble and file meta), as a PACS would send it."""
    ds.save_as(path, enforce_file_format=True)
