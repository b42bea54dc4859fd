"""Secondary Capture for a PACS that cannot show SEG: the film, the mask outline and an AI banner burned in.

Decisions, and why:

* **RGB, 8 bits**: the outline is yellow, a colour no grey-scale anatomy takes, so it cannot be mistaken
  for a structure; the banner is white on black.
* **The banner is added above the film**, a strip `banner_rows` high, never drawn over it: apical
  pneumothoraces lie at the top of the film, where an overlaid banner would hide them. Below the banner the
  film is unchanged except along the outline.
* **At a bounded size**: the film is drawn at the size of the pixels triage decoded where that is at most
  `SC_FILM_SIDE` (1024) a side (pixel for pixel with a 1024² film; a JPEG 2000 film decoded at the models'
  resolution is drawn at that resolution, issue 15), else shrunk to it by area. A reader looks at it on a
  screen; measurements belong to the film and the SEG/SR. The overlay PNG (at most 1024 a side,
  `service.pacs.side`) is made from it, and a 2128x2000 film no longer costs a 4 Mpx RGB image. The mask
  is brought to the same size by area (a drawn pixel is inside where more than half of it is).
* **The outline is drawn for positive findings only**, as with the SEG; the banner always says the result
  ("Pneumothorax suspected" or "No pneumothorax detected"), the score and the priority. Its width grows
  with the film (2 px at 1024², 4 px at 2000²) so that it survives a PACS scaling the film to the screen.
* **The film as the service saw it**: the `Radiograph`'s display pixels (windowed, air dark; the film's
  grid or a reduced one) when the caller has them, else decoded again from the source through the same
  functions (`service.imaging.reader`).
* **No Pixel Spacing**: the SC is for looking at; measurements belong to the film and the SEG/SR.
* **The film's anatomy**: Body Part Examined, Image Laterality and Laterality are the film's, where it has
  them; without either laterality, and unless the body part is the (unpaired) chest, Laterality (Type 2C)
  is present and empty: unknown. Patient Orientation is the film's as well (the banner adds rows above).
* A source that was lossy-compressed makes a lossy-derived SC (Lossy Image Compression "01"), as
  PS3.3 C.7.6.1.1.5 asks of derived images.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGExtended12Bit
from scipy import ndimage

from service.cascade.finding import Finding
from service.imaging.acceptance import permissive_policy
from service.imaging.decoding import decode_pixels
from service.imaging.header import check_header
from service.imaging.reader import to_display
from service.pacs.results.identity import AI_NOTICE, ResultIdentity, ResultKind
from service.pacs.results.source import (
    check_source,
    copy_attributes,
    finish,
    patient_orientation,
    source_header,
)

SC_FILM_SIDE = 1024  # pixels a side of the film in the SC at most (the banner adds rows above it)
OUTLINE_RGB = (255, 255, 0)
TEXT_RGB = (255, 255, 255)
_LOSSY_SYNTAXES = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit})
# The SC shows the film's anatomy, so what the film says of it holds for the SC.
_SAME_ANATOMY = ("BodyPartExamined", "ImageLaterality", "Laterality")
_UNPAIRED = frozenset({"CHEST"})  # Body Part Examined values needing no Laterality (the films we accept)


def build_overlay(source: Dataset, finding: Finding, identity: ResultIdentity,
                  pixels: np.ndarray | None = None) -> hd.sc.SCImage:
    """The SC of `finding` on `source`. `pixels` are the film's display pixels in [0, 1] (air dark), as in
    `Radiograph.pixels`; where None they are decoded from `source` (which must then carry its pixel data).
    """
    identity.check(finding.models)
    check_source(source, finding)
    if pixels is None:
        pixels = to_display(decode_pixels(source).stored, source, check_header(source, permissive_policy()))[0]
    check_grid(pixels.shape, finding.mask.shape)
    rows, columns = drawing_size(pixels.shape)
    film = np.repeat(np.round(np.clip(shrink(pixels, rows, columns), 0.0, 1.0) * 255.0).astype(np.uint8)[..., None],
                     3, axis=2)
    if finding.positive:
        mask = mask_at(finding.mask, rows, columns)
        film[outline(mask, outline_width(mask.shape))] = OUTLINE_RGB
    image = np.concatenate([banner(banner_lines(finding, identity), columns), film], axis=0)
    header = source_header(source)
    orientation = patient_orientation(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=image,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=identity.uid(finding, "SC series"),
        series_number=ResultKind.SC.series_number,
        sop_instance_uid=identity.uid(finding, "SC"),
        instance_number=1,
        # highdicom insists on a Patient Orientation for a patient image; a film that gives none gets a
        # stand-in here, emptied below (the attribute is Type 2C: present, empty when unknown).
        patient_orientation=orientation or ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=ResultKind.SC.series_description,
        **identity.equipment(),
    )
    if orientation is None:
        sc.PatientOrientation = None
    sc.copy_patient_and_study_information(header)  # all of both modules, as SEG and SR get them
    copy_attributes(sc, source, _SAME_ANATOMY)
    _describe_derivation(sc, header)
    finish(sc, source, identity.software_versions[0])
    if not sc.get("Laterality") and not sc.get("ImageLaterality") and sc.get("BodyPartExamined") not in _UNPAIRED:
        sc.Laterality = None  # Type 2C: required for a paired (or unknown) body part; empty, as it is unknown
    return sc


def check_grid(pixels: tuple[int, ...], film: tuple[int, ...]) -> None:
    """The display pixels must be the film's (Rows x Columns of the mask), or a reduced decode of it:
    ceil(side / 2^k) a side (`PixelGrid`)."""
    for factor in (1, 2, 4, 8, 16, 32):
        if tuple(pixels) == (-(-film[0] // factor), -(-film[1] // factor)):
            return
    raise ValueError(f"the display pixels have shape {tuple(pixels)}, which is neither the film's {tuple(film)} "
                     "nor a reduced decode of it")


def drawing_size(pixels: tuple[int, ...]) -> tuple[int, int]:
    """Rows x columns to draw the film at: the pixels' own size where it is at most SC_FILM_SIDE a side, else
    shrunk to that, keeping the film's proportions."""
    rows, columns = int(pixels[0]), int(pixels[1])
    scale = min(1.0, SC_FILM_SIDE / max(rows, columns))
    return max(1, round(rows * scale)), max(1, round(columns * scale))


def shrink(pixels: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Display pixels at rows x columns by area (Pillow's BOX filter): each pixel the mean of what it covers."""
    if pixels.shape == (rows, columns):
        return pixels
    image = Image.fromarray(np.asarray(pixels, dtype=np.float32), mode="F")
    return np.asarray(image.resize((columns, rows), Image.Resampling.BOX), dtype=np.float32)


def mask_at(mask: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """The film's mask at rows x columns: a pixel is inside where more than half of what it covers is.

    Only the mask's box (with a margin of one drawn pixel) is resampled: a lesion covers a few % of a film.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape == (rows, columns):
        return mask
    small = np.zeros((rows, columns), dtype=bool)
    hit_rows, hit_columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if hit_rows.size == 0:
        return small
    step_r, step_c = mask.shape[0] / rows, mask.shape[1] / columns
    top, bottom = max(int(hit_rows[0] / step_r) - 1, 0), min(int(hit_rows[-1] / step_r) + 2, rows)
    left, right = max(int(hit_columns[0] / step_c) - 1, 0), min(int(hit_columns[-1] / step_c) + 2, columns)
    y0, x0 = int(top * step_r), int(left * step_c)  # the film pixels those drawn pixels cover
    y1, x1 = min(int(np.ceil(bottom * step_r)), mask.shape[0]), min(int(np.ceil(right * step_c)), mask.shape[1])
    image = Image.fromarray(mask[y0:y1, x0:x1].astype(np.float32), mode="F")
    box = (left * step_c - x0, top * step_r - y0, right * step_c - x0, bottom * step_r - y0)
    fraction = np.asarray(image.resize((right - left, bottom - top), Image.Resampling.BOX, box=box))
    small[top:bottom, left:right] = fraction > 0.5
    return small


def outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The mask's inner rim, `width` pixels wide: drawn inside the region, so it never hides what is outside."""
    mask = np.asarray(mask, dtype=bool)
    rim = np.zeros_like(mask)
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return rim
    # Erode only the region's box (plus a margin): a few ms instead of tens on a full 2000² film.
    top, bottom = max(rows[0] - width, 0), min(rows[-1] + width + 1, mask.shape[0])
    left, right = max(columns[0] - width, 0), min(columns[-1] + width + 1, mask.shape[1])
    crop = mask[top:bottom, left:right]
    rim[top:bottom, left:right] = crop & ~ndimage.binary_erosion(crop, iterations=width)
    return rim


def outline_width(shape: tuple[int, ...]) -> int:
    return max(2, round(max(shape) / 500))


def banner_lines(finding: Finding, identity: ResultIdentity) -> list[str]:
    verdict = "Pneumothorax suspected" if finding.positive else "No pneumothorax detected"
    return [AI_NOTICE,
            f"{verdict} - score {finding.score:.2f} - priority {finding.priority.value}",
            "; ".join(identity.software_versions)]


def banner(lines: list[str], columns: int) -> np.ndarray:
    """A black strip `columns` wide with `lines` in white, the first (the notice) largest; uint8 RGB."""
    size = max(12, columns // 40)
    margin = size // 2
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    fonts = []
    for number, line in enumerate(lines):
        line_size = size if number < 2 else max(10, size * 2 // 3)
        while line_size > 6 and probe.textlength(line, font=ImageFont.load_default(line_size)) > columns - 2 * margin:
            line_size -= 1  # shrink a line until it fits the film's width
        fonts.append(ImageFont.load_default(line_size))
    heights = [int(font.size * 1.3) for font in fonts]  # type: ignore[union-attr]
    strip = Image.new("RGB", (columns, margin * 2 + sum(heights)), (0, 0, 0))
    draw = ImageDraw.Draw(strip)
    y = margin
    for line, font, height in zip(lines, fonts, heights):
        draw.text((margin, y), line, fill=TEXT_RGB, font=font)
        y += height
    return np.asarray(strip, dtype=np.uint8)


def _describe_derivation(sc: Dataset, header: Dataset) -> None:
    """Say what was burned in, from which film, and carry over lossy compression of the source."""
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = f"{AI_NOTICE}: AI mask outline and result banner burned into the source film"
    reference = Dataset()
    reference.ReferencedSOPClassUID = header.SOPClassUID
    reference.ReferencedSOPInstanceUID = header.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    syntax = getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", None)
    if header.get("LossyImageCompression") == "01" or syntax in _LOSSY_SYNTAXES:
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in header:
                setattr(sc, keyword, header[keyword].value)
        if "LossyImageCompressionMethod" not in sc and syntax in _LOSSY_SYNTAXES:
            sc.LossyImageCompressionMethod = "ISO_10918_1"  # both lossy syntaxes listed are JPEG (ISO 10918-1)
