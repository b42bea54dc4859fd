"""DICOM Segmentation for a positive finding: one binary segment, "Pneumothorax", on the source film's grid.

Decisions, and why:

* **Only for a positive finding with a non-empty mask**; `build_seg` refuses anything else with a
  `ValueError`. An empty SEG says nothing the SR does not ("absent"), adds a PACS object for most films, and
  some viewers list an empty "Pneumothorax" segment as if it were a finding. A negative film can still
  carry a mask in the API (segmented because its score passed the gate, but below the operating point);
  a SEG labelled "Pneumothorax" on a film the SR calls absent would read as a detection, so none is made.
* **Geometry.** CR and DX films have no Frame of Reference, so neither has the SEG: its single frame
  matches the source pixel for pixel through the Derivation Image functional group (PS3.3 A.51.5.1), which
  highdicom writes because the mask has the film's rows x columns (`check_source`).
* **Pixel measures** come from `service.imaging.reader.pixel_spacing` (the spacing behind every millimetre in the
  API), so the SEG and the API never disagree. highdicom cannot read back Pixel Measures without a Slice
  Thickness, and a projection radiograph has no slice: the SEG carries a nominal
  `PLACEHOLDER_SLICE_THICKNESS_MM` and says so in Image Comments. Note that PS3.3 Table A.51-2 asks for
  Pixel Measures only where a patient Frame of Reference exists; we keep them because a SEG read without
  its film can then still be measured, and highdicom writes them for such films itself.
* **Unknown spacing** (no usable Pixel Spacing or Imager Pixel Spacing): no Pixel Measures at all, never
  an invented 1.0; Content Description and Image Comments say so. The mask still reads back exactly.
* **Patient Orientation** (Type 2C: needed without a Frame of Reference) is the film's, as the grids match;
  empty ("unknown", as Type 2 allows) where the film has none or an invalid one.
* Binary, 1 bit, Explicit VR Little Endian: a 1024² mask is 128 kB, and every SEG reader handles it.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from service.cascade.finding import Finding
from service.imaging.reader import pixel_spacing
from service.pacs.results.identity import AI_NOTICE, ResultIdentity, ResultKind
from service.pacs.results.source import (
    check_source,
    finish,
    patient_orientation,
    source_header,
)

SEGMENT_NUMBER = 1
SEG_FRAME_NUMBER = 1  # the one frame: segment 1 on the film's grid
SEGMENT_LABEL = "Pneumothorax"
CONTENT_LABEL = "PNEUMOTHORAX"  # Code String, at most 16 characters
# Depth of the volume a frame represents. A projection has none; this nominal value exists only because
# highdicom's reader requires the attribute, and the SEG's Image Comments say so.
PLACEHOLDER_SLICE_THICKNESS_MM = 1.0

_SPACING_NOTES = {
    "PixelSpacing": "Pixel Spacing (0028,0030) of the source",
    "ImagerPixelSpacing": "Imager Pixel Spacing (0018,1164) of the source, at the detector (no magnification "
                          "factor given)",
    "ImagerPixelSpacing/EstimatedRadiographicMagnificationFactor":
        "Imager Pixel Spacing (0018,1164) divided by the Estimated Radiographic Magnification Factor (0018,1114)",
}


def build_seg(source: Dataset, finding: Finding, identity: ResultIdentity) -> hd.seg.Segmentation:
    """The SEG of `finding` on `source` (the film's original dataset; its pixels are not needed).

    Raises ValueError for a negative finding, an empty mask, a mask not on the film's grid, a finding from
    another film, or an identity naming other models than the finding's.
    """
    identity.check(finding.models)
    check_source(source, finding)
    if not finding.positive:
        raise ValueError("no SEG for a negative finding: the SR reports pneumothorax absent")
    if not finding.mask.any():
        raise ValueError("no SEG for an empty mask: the SR reports the finding without a region")
    # The spacing triage measured with (the same function), where the finding kept it; else read from `source`.
    kept = None if finding.source is None else finding.source.radiograph
    spacing, spacing_source = (kept.spacing_mm, kept.spacing_source) if kept is not None else pixel_spacing(source)
    measures = None
    if spacing is not None:
        measures = hd.PixelMeasuresSequence(pixel_spacing=spacing, slice_thickness=PLACEHOLDER_SLICE_THICKNESS_MM)
    segment = hd.seg.SegmentDescription(
        segment_number=SEGMENT_NUMBER,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Pneumothorax,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=identity.segment_algorithm(
            {"classifier": identity.model("classifier").label, "operating_point": f"{finding.threshold:.6g}"}
        ),
    )
    seg = hd.seg.Segmentation(
        source_images=[source_header(source)],
        pixel_array=np.asarray(finding.mask, dtype=bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=identity.uid(finding, "SEG series"),
        series_number=ResultKind.SEG.series_number,
        sop_instance_uid=identity.uid(finding, "SEG"),
        instance_number=1,
        content_label=CONTENT_LABEL,
        content_description="AI pneumothorax mask" + ("" if spacing else ", spacing unknown") + " - not for diagnosis",
        pixel_measures=measures,
        series_description=ResultKind.SEG.series_description,
        **identity.equipment(),
    )
    seg.ImageComments = _geometry_comment(spacing_source)
    # Patient Orientation is Type 2C in General Image: required where the image needs no Image Orientation
    # (Patient), as here without a Frame of Reference. The SEG's frame is the film's pixel grid, so the film's
    # orientation is the SEG's; where the film gives none (or an invalid one) it is empty, "unknown".
    orientation = patient_orientation(source)
    seg.PatientOrientation = list(orientation) if orientation else None
    finish(seg, source, identity.software_versions[0])
    return seg


def _geometry_comment(spacing_source: str | None) -> str:
    """Image Comments: that this is AI output, and where the pixel measures came from (or why there are none)."""
    if spacing_source is None:
        spacing = ("The source gives no usable pixel spacing, so this SEG has no Pixel Measures; its pixels "
                   "match the source film's pixel for pixel.")
    else:
        spacing = (f"Pixel Measures: spacing from {_SPACING_NOTES.get(spacing_source, spacing_source)}; Slice "
                   f"Thickness {PLACEHOLDER_SLICE_THICKNESS_MM:g} mm is a placeholder (a projection radiograph "
                   "has no slice).")
    return f"{AI_NOTICE}. {spacing}"
