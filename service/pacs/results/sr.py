"""DICOM SR (TID 1500 Measurement Report) of one finding: present or absent, the score, the areas, the SEG.

The report, observed by a device (our software, `ResultIdentity.device_uid`), holds measurement groups:

1. the film (TID 1501, always): qualitative evaluation Pneumothorax (SCT 36118008) = Present (SCT 52101004)
   or Absent (SCT 272519000), following `Finding.positive`, and the triage score as Score (SCT 246262008)
   in UCUM "1" (no units), with the classifier's algorithm identification (TID 4019), referencing the
   source image. "Score", not "Probability": the API calls it a score, and nothing here claims calibration;
2. the segment (TID 1410, where a SEG was made): a Referenced Segmentation Frame to the SEG's one frame
   (segment 1's; the reference gives the frame number alone, as PS3.3 C.18.4 asks) and the total area,
   with the segmenter's algorithm identification (as have the instance groups);
3. one per instance (TID 1410, positive findings only): the instance's bounding box, the same box as
   `bbox_px` in the API, as a closed polyline on the source image, and the instance's area (its pixels,
   not its box).

Areas are in mm² (UCUM mm2) where the spacing is known and in pixels (UCUM {pixels}) where it is not: a
count of pixels is still a size, and the unit says which it is. A negative finding has no region groups,
even where its mask is not empty (see `service.pacs.results.seg`).

Enhanced SR, not Comprehensive 3D SR: the content has only 2-D coordinates, and Enhanced SR is the most
widely accepted SR storage class that holds them.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from service.cascade.finding import Finding
from service.cascade.masks import Instance
from service.pacs.results.identity import ResultIdentity, ResultKind
from service.pacs.results.seg import SEG_FRAME_NUMBER, SEGMENT_NUMBER
from service.pacs.results.source import check_source, finish, source_header

PLAIN_CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
PIXELS = hd.sr.CodedConcept("{pixels}", "UCUM", "pixels")
NO_UNITS = codes.UCUM.NoUnits  # "1"


def build_sr(source: Dataset, finding: Finding, seg: hd.seg.Segmentation | None,
             identity: ResultIdentity) -> hd.sr.EnhancedSR:
    """The TID 1500 report of `finding` on `source`, referencing `seg` where one was made.

    Raises ValueError where `seg` is given for a negative finding or segments another film.
    """
    identity.check(finding.models)
    check_source(source, finding)
    header = source_header(source)
    if seg is not None:
        _check_seg(seg, header, finding)
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]
    groups = [_film_group(header, finding, identity)]
    if finding.positive:
        if seg is not None:
            groups.append(_segment_group(seg, header, finding, identity))
        groups.extend(_instance_group(header, finding, number, instance, identity)
                      for number, instance in enumerate(finding.instances, start=1))
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=identity.device_uid, name=identity.manufacturer, manufacturer_name=identity.manufacturer,
        model_name=identity.manufacturer_model_name, serial_number=identity.device_serial_number,
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.cid270.Device, observer_identifying_attributes=device)),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=groups,
    )
    sr = hd.sr.EnhancedSR(
        evidence=[header] if seg is None else [header, seg],
        content=report,
        series_instance_uid=identity.uid(finding, "SR series"),
        series_number=ResultKind.SR.series_number,
        sop_instance_uid=identity.uid(finding, "SR"),
        instance_number=1,
        is_complete=True,  # everything the algorithm has to say about this film
        is_final=False,  # PRELIMINARY: AI output awaiting a reader, never the definitive report
        is_verified=False,
        series_description=ResultKind.SR.series_description,
        **identity.equipment(),
    )
    finish(sr, source, identity.software_versions[0])
    return sr


def _check_seg(seg: Dataset, header: Dataset, finding: Finding) -> None:
    if not finding.positive:
        raise ValueError("a negative finding has no SEG to reference (build_seg refuses one)")
    referenced = {str(item.ReferencedSOPInstanceUID)
                  for series in seg.get("ReferencedSeriesSequence", [])
                  for item in series.get("ReferencedInstanceSequence", [])}
    if str(header.SOPInstanceUID) not in referenced:
        raise ValueError(f"the SEG {seg.SOPInstanceUID} does not segment the source {header.SOPInstanceUID}")


def _area(pixels: int, area_mm2: float | None) -> hd.sr.Measurement:
    """Area in mm² where the spacing is known (`area_mm2` is set), else the count of pixels."""
    value, unit = (float(pixels), PIXELS) if area_mm2 is None else (area_mm2, codes.UCUM.SquareMillimeter)
    return hd.sr.Measurement(name=codes.SCT.Area, value=value, unit=unit)


def _film_group(header: Dataset, finding: Finding,
                identity: ResultIdentity) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=identity.uid(finding, "SR triage group"),
                                                     identifier="pneumothorax triage"),
        finding_type=codes.SCT.Pneumothorax,
        algorithm_id=identity.sr_algorithm("classifier"),
        measurements=[hd.sr.Measurement(name=codes.SCT.Score, value=float(finding.score), unit=NO_UNITS)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            name=codes.SCT.Pneumothorax, value=codes.SCT.Present if finding.positive else codes.SCT.Absent)],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(header)],
    )


def _segment_group(seg: Dataset, header: Dataset, finding: Finding,
                   identity: ResultIdentity) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    # Instances are the mask's connected components, so together they are the segment: their sum is its area.
    areas_mm2 = [instance.area_mm2 for instance in finding.instances]
    area_mm2 = None if None in areas_mm2 else sum(areas_mm2)
    # Built by hand: highdicom's `from_segmentation` looks for the segment number per frame, where a
    # one-segment SEG keeps it in the shared functional groups; and the source is a single-frame image,
    # so its reference carries no frame numbers.
    reference = hd.sr.ReferencedSegmentationFrame(
        sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, frame_number=SEG_FRAME_NUMBER,
        segment_number=SEGMENT_NUMBER,
        source_image=hd.sr.SourceImageForSegmentation(header.SOPClassUID, header.SOPInstanceUID))
    # The Image Reference Macro (PS3.3 C.18.4) names a SEG's frames or its segments, not both: Referenced
    # Segment Number is for references without frame numbers. TID 1410 references a frame, and the frame
    # identifies its segment (the SEG's Segment Identification), so the segment number highdicom adds goes.
    for item in reference[0].ReferencedSOPSequence:
        del item.ReferencedSegmentNumber
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=identity.uid(finding, "SR segment group"),
                                                     identifier="pneumothorax segment"),
        referenced_segment=reference,
        finding_type=codes.SCT.Pneumothorax,
        finding_category=codes.SCT.MorphologicallyAbnormalStructure,
        algorithm_id=identity.sr_algorithm("segmenter"),
        measurements=[_area(sum(i.area_px for i in finding.instances), area_mm2)],
    )


def _instance_group(header: Dataset, finding: Finding, number: int, instance: Instance,
                    identity: ResultIdentity) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    x, y, width, height = instance.bbox_px
    # SCOORD image coordinates put (0, 0) at the top-left corner of the top-left pixel: the box's edges.
    box = np.array([[x, y], [x + width, y], [x + width, y + height], [x, y + height], [x, y]], dtype=float)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=identity.uid(finding, f"SR instance group {number}"),
                                                     identifier=f"pneumothorax instance {number}"),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=box,
            source_image=hd.sr.SourceImageForRegion.from_source_image(header)),
        finding_type=codes.SCT.Pneumothorax,
        finding_category=codes.SCT.MorphologicallyAbnormalStructure,
        algorithm_id=identity.sr_algorithm("segmenter"),
        measurements=[_area(instance.area_px, instance.area_mm2)],
    )
