"""Secondary Capture for a PACS that cannot show SEG: the film, the mask outline and an AI banner burned in.

Decisions, and why:

* **RGB, 8 bits**: the outline is yellow, a colour no grey-scale anatomy takes, so it cannot be mistaken
  for a structure; the banner is white on black.
* **The banner is added above the film**, a strip `banner_rows` high, never drawn over it: apical
  pneumothoraces lie at the top of the film, where an overlaid banner would hide them. The SC is therefore
  (banner + film rows) x film columns; below the banner the film is at full resolution, pixel for pixel
  with the source, and unchanged except along the outline.
* **The outline is drawn for positive findings only**, as with the SEG; the banner always says the result
  ("Pneumothorax suspected" or "No pneumothorax detected"), the score and the priority. Its width grows
  with the film (2 px at 1024², 4 px at 2000²) so that it survives a PACS scaling the film to the screen.
* **The film as the service saw it**: the `Radiograph`'s display pixels (windowed, air dark) when the
  caller has them, else decoded again from the source through the same functions (`service.imaging.reader`).
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
        pixels = to_display(decode_pixels(source), source, check_header(source, permissive_policy()))[0]
    if pixels.shape != finding.mask.shape:
        raise ValueError(f"the display pixels have shape {pixels.shape}, the mask {finding.mask.shape}")
    film = np.repeat(np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)[..., None], 3, axis=2)
    if finding.positive:
        film[outline(finding.mask, outline_width(finding.mask.shape))] = OUTLINE_RGB
    image = np.concatenate([banner(banner_lines(finding, identity), film.shape[1]), film], axis=0)
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
