"""Pixel data decoding: the fastest installed pydicom decoding plugin for each transfer syntax.

pydicom tries its plugins in a fixed order, which is not the fastest for every syntax. Measured against that
default order on real films (`python load_tests/bench_decode.py`, figures in docs/benchmarks.md): Pillow
decodes JPEG Baseline ~4× faster, pyjpegls decodes JPEG-LS ~3.3× faster. For RLE the default already picks
pylibjpeg-rle (~10× faster than pydicom's pure-Python RLE decoder; named here so it stays so), and JPEG 2000
is a tie (both plugins wrap OpenJPEG). If the preferred plugin fails on a file, every available plugin is
tried before the data is called corrupt.

Asked for a `min_side`, JPEG 2000 and JPEG films are decoded only at the resolution the models need
(`service.imaging.reduced`); where that fails the film is decoded in full, and `Decoded.fallback` says why, so
that the caller (in the edge's process: decodes may run in a worker) counts it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import _get_jpg_parameters
from pydicom.uid import (
    JPEG2000,
    UID,
    JPEG2000Lossless,
    JPEG2000TransferSyntaxes,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLELossless,
)

from service.imaging import decode_pool
from service.imaging.radiograph import PixelGrid, RadiographError, RejectionCode
from service.imaging.reduced import J2K_SYNTAXES, ReducedDecodeFailed, reduced_stored

PREFERRED_PLUGIN: dict[UID, str] = {
    JPEGBaseline8Bit: "pillow",
    JPEGExtended12Bit: "pillow",
    JPEGLSLossless: "pyjpegls",
    JPEGLSNearLossless: "pyjpegls",
    RLELossless: "pylibjpeg",
    JPEG2000Lossless: "pylibjpeg",
    JPEG2000: "pylibjpeg",
}

_MAX_REASON = 300


@dataclass(frozen=True)
class Decoded:
    """A frame's stored values (no grey-scale transform), on the film's grid or a coarser one (`grid`), and why a
    reduced decode fell back to the full one ("decoder_error", "mismatch"; None: it did not, or none was asked)."""

    stored: np.ndarray
    grid: PixelGrid | None = None
    fallback: str | None = None
    detail: str | None = None  # the decoder's words for the fallback (pixel data only: no patient data)


def plugin_for(transfer_syntax: UID) -> str:
    """The plugin to try first for a syntax ('' = pydicom's own order), given what is installed."""
    preferred = PREFERRED_PLUGIN.get(transfer_syntax, "")
    if not preferred or not transfer_syntax.is_compressed:
        return ""
    return preferred if preferred in get_decoder(transfer_syntax).available_plugins else ""


def _describe(tsyntax: UID) -> str:
    return f"{tsyntax.name} ({tsyntax})" if tsyntax.is_transfer_syntax else f"unknown transfer syntax {tsyntax!r}"


def _reason(exc: BaseException) -> str:
    """A short reason from a decoder exception. Decoders only ever see pixel bytes, never patient data."""
    text = " ".join(str(exc).split())
    return (text[:_MAX_REASON] + "…") if len(text) > _MAX_REASON else text or type(exc).__name__


class DecoderPanic(Exception):
    """A decoder written in Rust panicked (pyo3 raises PanicException, a BaseException, which `except
    Exception` lets through: found by fuzzing pylibjpeg-rle with a corrupt RLE segment)."""


def _decode_with(ds: Dataset, plugin: str) -> np.ndarray:
    ds.pixel_array_options(decoding_plugin=plugin)
    try:
        return ds.pixel_array
    except BaseException as exc:
        if isinstance(exc, Exception) or type(exc).__name__ != "PanicException":
            raise
        raise DecoderPanic(f"the decoder failed ({_reason(exc)})") from None


def codestream_size(tsyntax: UID, frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) that a JPEG / JPEG-LS (SOF) or JPEG 2000 (SIZ) codestream declares; None if unknown.

    Decoders allocate what the codestream declares, not what the DICOM header says: a JPEG-LS frame edited
    to declare 65535x65535 made CharLS allocate until a 3 GB limit stopped it, 49 s later; a JPEG to
    12288x12288, 940 MB and 6 s (found by fuzzing). Comparing with Rows x Columns first costs nothing.
    """
    try:
        if tsyntax in JPEG2000TransferSyntaxes:
            start = 0
            if frame.startswith(b"\x00\x00\x00\x0cjP  "):  # a JP2 wrapper: find the codestream box
                start = frame.find(b"jp2c") + 4
            if frame[start: start + 4] != b"\xff\x4f\xff\x51":  # SOC, then SIZ
                return None
            x, y, x0, y0 = struct.unpack(">IIII", frame[start + 8: start + 24])
            return y - y0, x - x0
        if tsyntax in JPEGTransferSyntaxes or tsyntax in JPEGLSTransferSyntaxes:
            info = _get_jpg_parameters(frame)
            return (int(info["height"]), int(info["width"])) if "height" in info else None
    except (struct.error, ValueError, KeyError, IndexError, TypeError):
        return None
    return None


def _check_codestream(ds: Dataset, tsyntax: UID) -> None:
    if not tsyntax.is_encapsulated or tsyntax == RLELossless:
        return  # RLE decodes into the size the header gives, which the policy has bounded
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception:  # noqa: BLE001 -- broken encapsulation: the decoder reports it as corrupt data
        return
    declared = codestream_size(tsyntax, frame)
    expected = (int(ds.Rows), int(ds.Columns))
    if declared is not None and declared != expected and declared[0] > 0:
        raise RadiographError(
            RejectionCode.CORRUPT_PIXEL_DATA,
            f"the {_describe(tsyntax)} codestream declares {declared[0]}x{declared[1]} pixels, but Rows (0028,0010) "
            f"x Columns (0028,0011) is {expected[0]}x{expected[1]}; not decoded",
        )


def decode_pixels(ds: Dataset, timeout_s: float | None = None, memory_mb: int = 2048, workers: int = 2,
                  min_side: int | None = None) -> Decoded:
    """Decode the single frame of `ds` to its stored values (no grey-scale transform applied).

    With `timeout_s`, compressed pixel data is decoded in a worker process (`service.imaging.decode_pool`) that is
    killed if it takes longer (answered DECODE_TIMEOUT), with its address space capped at `memory_mb` more
    than it holds after start-up, at most `workers` of them per process; uncompressed data is always read in this thread
    (reading it costs a copy, bounded by the size limits already checked). With `min_side`, a JPEG 2000 or
    JPEG frame is decoded at the coarsest resolution still `min_side` a side where it can be (`Decoded.grid`).

    Raises RadiographError: UNSUPPORTED_TRANSFER_SYNTAX when no installed plugin handles the syntax,
    CORRUPT_PIXEL_DATA when the data does not decode or decodes to the wrong shape.
    """
    tsyntax = UID(ds.file_meta.TransferSyntaxUID)
    if tsyntax.is_compressed:
        _check_codestream(ds, tsyntax)
    if timeout_s is not None and tsyntax.is_compressed:
        pool = decode_pool.shared_pool(timeout_s, memory_mb, workers, decode_here)
        return pool.decode(ds, min_side)  # type: ignore[no-any-return]
    return decode_here(ds, min_side)


def decode_here(ds: Dataset, min_side: int | None = None) -> Decoded:
    """`decode_pixels` in the calling thread (and in the decode pool's worker processes)."""
    if min_side:
        try:
            reduced = reduced_stored(ds, min_side)
        except ReducedDecodeFailed as failed:
            return Decoded(_full(ds), fallback=failed.reason, detail=str(failed))
        if reduced is not None:
            values, factor = reduced
            grid = PixelGrid(int(ds.Rows), int(ds.Columns), factor,
                             centred=UID(ds.file_meta.TransferSyntaxUID) in J2K_SYNTAXES)
            return Decoded(values, grid)
    return Decoded(_full(ds))


def _full(ds: Dataset) -> np.ndarray:
    """The frame's stored values at full size."""
    tsyntax = UID(ds.file_meta.TransferSyntaxUID)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise RadiographError(
            RejectionCode.UNSUPPORTED_TRANSFER_SYNTAX,
            f"Transfer Syntax UID (0002,0010) is {_describe(tsyntax)}, for which no pixel decoder exists",
        ) from None
    if not decoder.is_available:
        raise RadiographError(
            RejectionCode.UNSUPPORTED_TRANSFER_SYNTAX,
            f"no installed plugin decodes {_describe(tsyntax)}; missing: {'; '.join(decoder.missing_dependencies)}",
        )
    plugin = plugin_for(tsyntax)
    try:
        pixels = _decode_with(ds, plugin)
    except Exception as first:  # decoders raise RuntimeError, ValueError, OSError...: all mean "corrupt"
        if not plugin:
            raise RadiographError(
                RejectionCode.CORRUPT_PIXEL_DATA,
                f"pixel data could not be decoded as {_describe(tsyntax)}: {_reason(first)}",
            ) from first
        try:
            pixels = _decode_with(ds, "")
        except Exception as second:
            raise RadiographError(
                RejectionCode.CORRUPT_PIXEL_DATA,
                f"pixel data could not be decoded as {_describe(tsyntax)}: {plugin}: {_reason(first)}; "
                f"other plugins: {_reason(second)}",
            ) from second
    expected = (int(ds.Rows), int(ds.Columns))
    if pixels.shape != expected:
        raise RadiographError(
            RejectionCode.CORRUPT_PIXEL_DATA,
            f"pixel data of {_describe(tsyntax)} decoded to shape {pixels.shape}, "
            f"but Rows (0028,0010) x Columns (0028,0011) is {expected[0]}x{expected[1]}",
        )
    return pixels
