"""Build small DICOM files in memory for constructed test cases (each rejection, each grey-scale rule)."""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from service.imaging.acceptance import CR_IMAGE_STORAGE


def chest_like(rows: int = 256, columns: int = 256, bits: int = 12) -> np.ndarray:
    """Stored values that pass the plausibility check: bright centre (mediastinum), darker lateral lungs."""
    y, x = np.mgrid[0:rows, 0:columns]
    centre = np.exp(-(((x - columns / 2) / (0.12 * columns)) ** 2))
    body = np.exp(-(((y - rows / 2) / (0.6 * rows)) ** 4))
    top = 2**bits - 1
    return np.round(top * (0.15 + 0.6 * centre * body + 0.1 * (y / rows))).astype(np.uint16)


def offset_content(bits: int = 12, offset: int = 32768, rows: int = 256, columns: int = 256) -> np.ndarray:
    """`chest_like` content of `bits` bits stored at `offset` in 16 bits (what some detectors write: 12-bit
    values shifted up, Bits Stored 16), for films whose window was set for the unshifted values."""
    return (chest_like(rows, columns, bits).astype(np.int64) + offset).astype(np.uint16)


def voi_lut(entries: int, first_mapped: int = 0, bits: int = 16) -> Dataset:
    """A VOI LUT Sequence item: a linear ramp of `entries` values from `first_mapped` (values past its
    ends take its first or last entry, so a LUT that ends below the data saturates it to white)."""
    item = Dataset()
    item.LUTDescriptor = [entries, first_mapped, bits]
    ramp = np.round(np.linspace(0, 2**bits - 1, entries)).astype("<u2")
    item.add_new(0x00283006, "OW", ramp.tobytes())  # LUT Data
    return item


def dataset(pixels: np.ndarray | None = None, bits_stored: int = 12, **attributes: object) -> Dataset:
    """A CR chest dataset around `pixels` (uint16 stored values); keyword arguments set or override attributes.

    Passing an attribute as None deletes it.
    """
    if pixels is None:
        pixels = chest_like(bits=bits_stored)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Sentinel^Patient"
    ds.PatientID = "SENTINEL-ID-0001"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16 if pixels.dtype.itemsize == 2 else 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [0.15, 0.16]
    ds.PixelData = pixels.tobytes()
    for keyword, value in attributes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def to_bytes(ds: Dataset, *, acr_nema: bool = False) -> bytes:
    """Part 10 bytes; or, with `acr_nema`, a bare implicit-VR dataset: no preamble, no meta, no transfer syntax."""
    buffer = io.BytesIO()
    if acr_nema:
        ds = ds.copy()
        del ds.file_meta
        ds.save_as(buffer, implicit_vr=True, little_endian=True, enforce_file_format=False)
    else:
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


__all__ = ["chest_like", "dataset", "offset_content", "to_bytes", "voi_lut", "ImplicitVRLittleEndian"]
