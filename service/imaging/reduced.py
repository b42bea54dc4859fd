"""Compressed films decoded only at the resolution the models need: JPEG 2000 by resolution level, JPEG by DCT
scaling (issue 15 §1).

Why: the models look at 256² (or 512²), and the real 2128x2000 lossless JPEG 2000 film takes ~500 ms to decode in
full against ~35 ms at a quarter of its size. Both codecs can stop early: a JPEG 2000 codestream is a wavelet
pyramid (each resolution level is the film low-passed and halved), a JPEG one is 8x8 DCT blocks whose low
frequencies make the film at 1/2, 1/4 or 1/8. The values are stored values on a coarser grid, so the grey scale
(the file's window, which applies to stored values) is unchanged.

How far: a lossless JPEG 2000 (5/3 wavelet) to the coarsest level still at least the model input a side; a
lossy one (9/7) and a JPEG to at least twice it (`LOSSY_MARGIN`, measured below). The model input is then
resampled from the coarser grid as from the film (`service.cascade.resampling`).

Pillow decodes both (its JPEG 2000 plugin honours `reduce`, its JPEG plugin `draft`); pylibjpeg-openjpeg
(2.6, what pydicom uses for the full decode) has no reduce option. Pillow's caveats, each handled here:

* it shifts 9- to 15-bit JPEG 2000 samples up to 16 bits: shifted back, and a sample with bits set below
  the shift is a `mismatch`;
* it sizes a reduced image by rounding (n + 2^(L-1)) / 2^L where OpenJPEG makes ceil(n / 2^L), and fails
  ("broken data stream": the real 1841-column Philips film at level 2) where the two differ: such a level is
  never asked for, the next finer one is;
* signed samples, several components, image or tile offsets, tiles that a level does not divide, a
  precision other than Bits Stored, a JP2 wrapper: not reduced (decoded in full, as before).

`reduced_stored` answers the stored values at the chosen level with its factor (2^level), None where no level
helps or the codestream is not one we reduce, and raises `ReducedDecodeFailed` (reason "decoder_error" or
"mismatch") where a reduction was tried and failed: the caller then decodes in full and counts the fallback
(ptx_reduced_decode_fallbacks_total).
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels.utils import _get_jpg_parameters
from pydicom.uid import (
    JPEG2000,
    UID,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)

JPEG_SYNTAXES = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit})  # 8-bit samples only (Pillow's libjpeg)
J2K_SYNTAXES = frozenset({JPEG2000Lossless, JPEG2000})
MAX_JPEG_LEVEL = 3  # DCT scaling: 1/2, 1/4, 1/8
# Lossy codestreams keep at least twice the model input; a lossless JPEG 2000 (5/3 wavelet), whose full decode is
# the costly one, goes to the model input itself. Measured on the demo models (load_tests/bench_reduced_decode.py):
# libjpeg's scaled IDCT drops each block's upper frequencies outright, and a lossy JPEG 2000's 9/7 low-pass band
# is not the patch mean the model input is resampled from (`service.cascade.resampling`); at the model input the
# real SIIM JPEG film's mask had a Dice of 0.934 to the full decode's, synthetic 20:1 JPEG 2000 films' scores
# moved by up to 0.36; at twice it 0.986 and 0.08. Both decode in a few ms in full, so the margin costs little.
LOSSY_MARGIN = 2
FALLBACK_REASONS = ("decoder_error", "mismatch")  # the metric's label values: a small fixed set


class ReducedDecodeFailed(Exception):
    """A reduced decode was tried and failed; `reason` is one of FALLBACK_REASONS (the metric's label)."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in FALLBACK_REASONS:
            raise ValueError(f"reason must be one of {FALLBACK_REASONS}, got {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class J2KHeader:
    """What the main header of a JPEG 2000 codestream says that decides whether and how far it can be reduced."""

    rows: int
    columns: int
    offset: bool  # an image or tile origin other than (0, 0)
    tile_rows: int
    tile_columns: int
    components: int
    precision: int
    signed: bool
    levels: int  # decomposition levels: the fewest of COD and any COC
    reversible: bool  # the 5/3 wavelet (lossless); False: the 9/7 (lossy)


def level_for(rows: int, columns: int, min_side: int, max_level: int,
              usable: Callable[[int], bool] | None = None) -> int:
    """The coarsest level L <= `max_level` whose image (ceil(side / 2^L) a side) is still at least `min_side` on
    both sides and which `usable(L)` allows; 0 where none is coarser than the film itself."""
    for level in range(max_level, 0, -1):
        factor = 1 << level
        if min(math.ceil(rows / factor), math.ceil(columns / factor)) < min_side:
            continue
        if usable is None or usable(level):
            return level
    return 0


def pillow_agrees(side: int, level: int) -> bool:
    """Whether Pillow's size for a reduced JPEG 2000 side, int((n + 2^(L-1)) / 2^L), is OpenJPEG's ceil(n / 2^L)."""
    factor = 1 << level
    return (side + (factor >> 1)) // factor == -(-side // factor)


def first_frame(ds: Dataset) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def j2k_header(frame: bytes) -> J2KHeader | None:
    """The main header of a raw codestream (SOC, SIZ, then COD/COC until the first tile), None if unreadable."""
    if frame[:4] != b"\xff\x4f\xff\x51":  # SOC, SIZ: a bare codestream (a JP2 wrapper is not reduced)
        return None
    try:
        (_, _, x, y, x0, y0, xt, yt, xt0, yt0, count) = struct.unpack(">HHIIIIIIIIH", frame[4:42])
        ssiz = frame[42] if count else 0
        levels: list[int] = []
        reversible = True
        position = 4 + struct.unpack(">H", frame[4:6])[0]  # SOC, SIZ marker, then Lsiz counts the rest
        while position + 4 <= len(frame):
            marker, length = struct.unpack(">HH", frame[position: position + 4])
            if marker == 0xFF90:  # SOT: the main header ends
                break
            body = frame[position + 4: position + 2 + length]
            if marker in (0xFF52, 0xFF53):  # COD: Scod, SGcod (4 bytes), SPcod; COC: Ccoc (1 or 2), Scoc, SPcoc
                start = 5 if marker == 0xFF52 else (1 if count < 257 else 2) + 1
                levels.append(body[start])  # SPcod/SPcoc: levels, block width, height, style, transform
                reversible = reversible and body[start + 4] == 1
            position += 2 + length
    except (struct.error, IndexError):
        return None
    if not levels:
        return None
    return J2KHeader(rows=y - y0, columns=x - x0, offset=bool(x0 or y0 or xt0 or yt0), tile_rows=yt,
                     tile_columns=xt, components=count, precision=(ssiz & 0x7F) + 1, signed=bool(ssiz & 0x80),
                     levels=min(levels), reversible=reversible)


def reduced_stored(ds: Dataset, min_side: int) -> tuple[np.ndarray, int] | None:
    """The stored values of `ds`'s single frame at the coarsest resolution still `min_side` a side, with the factor
    it is reduced by, or None where the film is not reduced (syntax, codestream or size). Raises
    `ReducedDecodeFailed` where a reduction was tried and failed.
    """
    tsyntax = UID(ds.file_meta.TransferSyntaxUID)
    if tsyntax not in J2K_SYNTAXES and tsyntax not in JPEG_SYNTAXES:
        return None
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or int(ds.get("PixelRepresentation", 0) or 0) != 0:
        return None
    try:
        frame = first_frame(ds)
    except Exception:  # noqa: BLE001 -- broken encapsulation: the full decode reports it, named
        return None
    rows, columns = int(ds.Rows), int(ds.Columns)
    if tsyntax in J2K_SYNTAXES:
        return _j2k(frame, rows, columns, int(ds.BitsStored), min_side)
    return _jpeg(frame, rows, columns, min_side)


def _j2k(frame: bytes, rows: int, columns: int, bits_stored: int, min_side: int) -> tuple[np.ndarray, int] | None:
    from PIL import Image, features

    header = j2k_header(frame)
    if (header is None or header.components != 1 or header.signed or header.offset or header.precision > 16
            or header.precision != bits_stored or (header.rows, header.columns) != (rows, columns)
            or not features.check_codec("jpg_2000")):
        return None

    def usable(level: int) -> bool:
        factor = 1 << level
        tiled = header.tile_rows < rows or header.tile_columns < columns
        return (pillow_agrees(rows, level) and pillow_agrees(columns, level)
                and not (tiled and (header.tile_rows % factor or header.tile_columns % factor)))

    margin = 1 if header.reversible else LOSSY_MARGIN
    level = level_for(rows, columns, margin * min_side, header.levels, usable)
    if level == 0:
        return None
    try:
        image = Image.open(io.BytesIO(frame))
        image.reduce = level  # Pillow's JPEG 2000 plugin: decode this many resolution levels fewer
        image.load()
        values = np.asarray(image)
    except Exception as exc:  # noqa: BLE001 -- OSError "broken data stream", ValueError...: a full decode follows
        raise ReducedDecodeFailed("decoder_error", f"Pillow JPEG 2000 at level {level}: {_short(exc)}") from None
    expected = (-(-rows // (1 << level)), -(-columns // (1 << level)))
    shift = (8 if header.precision <= 8 else 16) - header.precision
    if values.shape != expected or values.dtype not in (np.uint8, np.uint16):
        raise ReducedDecodeFailed("mismatch", f"level {level} gave {values.shape} {values.dtype}, expected {expected}")
    if shift:
        if np.bitwise_and(values, (1 << shift) - 1).any():
            raise ReducedDecodeFailed("mismatch", f"samples of {header.precision} bits are not shifted by {shift}")
        values = values >> shift
    return values, 1 << level


def _jpeg(frame: bytes, rows: int, columns: int, min_side: int) -> tuple[np.ndarray, int] | None:
    from PIL import Image

    try:
        info = _get_jpg_parameters(frame)
    except Exception:  # noqa: BLE001 -- an unreadable SOF: the full decode names the problem
        return None
    if info.get("precision") != 8 or info.get("components") != 1 or (info.get("height"), info.get("width")) != (
            rows, columns):
        return None
    level = level_for(rows, columns, LOSSY_MARGIN * min_side, MAX_JPEG_LEVEL)
    if level == 0:
        return None
    factor = 1 << level
    try:
        image = Image.open(io.BytesIO(frame))
        image.draft("L", (columns // factor, rows // factor))  # libjpeg's DCT scaling by 1/factor
        values = np.asarray(image)
    except Exception as exc:  # noqa: BLE001 -- see _j2k
        raise ReducedDecodeFailed("decoder_error", f"Pillow JPEG at 1/{factor}: {_short(exc)}") from None
    expected = (-(-rows // factor), -(-columns // factor))
    if values.shape != expected or values.dtype != np.uint8:
        raise ReducedDecodeFailed("mismatch", f"1/{factor} gave {values.shape} {values.dtype}, expected {expected}")
    return values, factor


def _short(exc: BaseException) -> str:
    """A decoder's message (pixel bytes only ever reach it, never patient data), one line, bounded."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]
