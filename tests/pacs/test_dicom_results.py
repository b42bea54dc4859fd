"""DICOM results (SEG, SR TID 1500, SC) of findings on the real chest films, written and read back.

Every object is written with `dcmwrite`, read again with pydicom and with highdicom, and checked against
the finding it came from: the SEG's mask is the API's mask, the SR says what the finding says, the SC shows
the film with the outline exactly where the mask's rim is.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID
from scipy import ndimage

from service.cascade.finding import Finding, PriorityBands, build_finding
from service.cascade.postprocess import CascadeResult
from service.imaging.acceptance import permissive_policy
from service.imaging.radiograph import Radiograph
from service.imaging.reader import Film, read_radiograph
from service.pacs.results import (
    DicomResults,
    ResultIdentity,
    ResultKind,
    build_overlay,
    build_results,
    build_seg,
    build_sr,
)
from service.pacs.results.identity import ModelIdentity, package_version
from service.pacs.results.overlay import (
    OUTLINE_RGB,
    drawing_size,
    mask_at,
    outline,
    outline_width,
    shrink,
)
from service.pacs.results.seg import PLACEHOLDER_SLICE_THICKNESS_MM
from tests import realdata as registry

MODELS = {
    "classifier": {"name": "ptx-classifier-demo", "version": "0.1.0", "backend": "onnxruntime-cpu"},
    "segmenter": {"name": "ptx-segmenter-demo", "version": "0.2.0", "backend": "onnxruntime-cpu"},
}
FILES = [entry for entry in registry.CHEST if entry.path in (
    "chest/siim_cr_jpegbaseline_mono2.dcm",  # CR (as Secondary Capture), 1024², Pixel Spacing 0.168
    "chest/philips_cr_j2k_lossy_mono1.dcm",  # CR, Pixel Spacing 0\0: spacing unknown
    "chest/canon_dx_j2k_lossless_mono1_inverse.dcm",  # DX, 2128 x 2000, 0.16
)]
SIIM = FILES[0]
UNKNOWN_SPACING = FILES[1]


CANON = FILES[2]


@pytest.fixture(scope="module")
def films(realdata: Path) -> dict[str, tuple[Dataset, Radiograph]]:
    """Each chest film's original dataset (as the service keeps it) and its radiograph, decoded once per module."""
    return {entry.path: (pydicom.dcmread(realdata / entry.path), read_radiograph(realdata / entry.path))
            for entry in registry.CHEST}


def two_blobs(shape: tuple[int, int]) -> np.ndarray:
    """A crescent-like ellipse at the right apex and a rectangle at the left base, scaled to the film."""
    rows, columns = shape
    y, x = np.ogrid[:rows, :columns]
    apex = ((y - 0.2 * rows) / (0.08 * rows)) ** 2 + ((x - 0.3 * columns) / (0.12 * columns)) ** 2 <= 1.0
    base = np.zeros(shape, dtype=bool)
    base[int(0.7 * rows): int(0.8 * rows), int(0.62 * columns): int(0.7 * columns)] = True
    return apex | base


def finding_on(radiograph: Radiograph, mask: np.ndarray, score: float, positive: bool,
               models: dict | None = None) -> Finding:
    result = CascadeResult(score=score, positive=positive, gated=True, mask=mask, probability_max=score)
    return build_finding(radiograph, result, 0.5, PriorityBands(), models=MODELS if models is None else models)


def reread(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def segment_mask(seg: hd.seg.Segmentation, source: Dataset) -> np.ndarray:
    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1])
    assert pixels.shape == (1, source.Rows, source.Columns, 1)
    return pixels[0, :, :, 0].astype(bool)


@pytest.mark.parametrize("entry", FILES, ids=registry.ids(FILES))
def test_seg_reads_back_as_the_api_mask(films, entry):
    source, radiograph = films[entry.path]
    finding = finding_on(radiograph, two_blobs(radiograph.pixels.shape), 0.93, True)
    data = reread(build_seg(source, finding, ResultIdentity.from_models(MODELS)))

    seg = hd.seg.segread(io.BytesIO(data))
    np.testing.assert_array_equal(segment_mask(seg, source), finding.mask)
    np.testing.assert_array_equal(pydicom.dcmread(io.BytesIO(data)).pixel_array.astype(bool), finding.mask)
    assert seg.SegmentationType == "BINARY" and seg.NumberOfFrames == 1
    assert (source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID) in seg.get_source_image_uids()
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.PatientID == source.PatientID
    assert seg.SOPInstanceUID != source.SOPInstanceUID and seg.SeriesInstanceUID != source.SeriesInstanceUID
    measures = seg.SharedFunctionalGroupsSequence[0].get("PixelMeasuresSequence")
    if entry.spacing_mm is None:
        assert measures is None, "unknown spacing must not become pixel measures"
        assert "spacing unknown" in seg.ContentDescription and "no Pixel Measures" in seg.ImageComments
    else:
        assert [float(v) for v in measures[0].PixelSpacing] == pytest.approx(entry.spacing_mm)
        assert float(measures[0].SliceThickness) == PLACEHOLDER_SLICE_THICKNESS_MM
        assert "placeholder" in seg.ImageComments
        assert "FrameOfReferenceUID" not in seg, "a projection film has no frame of reference to share"
    # Type 2C without plane orientation: present; the film's, whose pixel grid the SEG shares, or empty.
    assert "PatientOrientation" in seg
    assert list(seg.PatientOrientation or []) == list(source.get("PatientOrientation") or [])


def test_seg_describes_the_segment_and_the_models(films):
    source, radiograph = films[SIIM.path]
    finding = finding_on(radiograph, two_blobs(radiograph.pixels.shape), 0.93, True)
    seg = hd.seg.segread(io.BytesIO(reread(build_seg(source, finding, ResultIdentity.from_models(MODELS)))))

    (segment,) = seg.SegmentSequence
    assert segment.segment_label == "Pneumothorax"
    assert segment.segmented_property_type == codes.SCT.Pneumothorax
    assert segment.segmented_property_type.value == "36118008"
    assert segment.segmented_property_category == codes.SCT.MorphologicallyAbnormalStructure
    assert segment.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    algorithm = segment.algorithm_identification
    assert (algorithm.name, algorithm.version) == ("ptx-segmenter-demo", "0.2.0")
    assert algorithm.family == codes.cid7162.ArtificialIntelligence
    assert algorithm.parameters == {"classifier": "ptx-classifier-demo 0.1.0", "operating_point": "0.5"}
    assert seg.Manufacturer == "ptx-triage" and seg.ManufacturerModelName
    assert list(seg.SoftwareVersions) == [f"ptx-triage {package_version()}", "ptx-classifier-demo 0.1.0",
                                          "ptx-segmenter-demo 0.2.0"]
    assert "AI" in seg.SeriesDescription and "not for diagnosis" in seg.SeriesDescription
    assert seg.SeriesNumber == ResultKind.SEG.series_number


def test_no_seg_for_negative_or_empty_findings(films):
    source, radiograph = films[SIIM.path]
    identity = ResultIdentity.from_models(MODELS)
    below_operating_point = finding_on(radiograph, two_blobs(radiograph.pixels.shape), 0.4, False)
    with pytest.raises(ValueError, match="no SEG for a negative finding"):
        build_seg(source, below_operating_point, identity)
    empty = finding_on(radiograph, np.zeros(radiograph.pixels.shape, dtype=bool), 0.8, True)
    with pytest.raises(ValueError, match="no SEG for an empty mask"):
        build_seg(source, empty, identity)
    results = build_results(source, below_operating_point)
    assert results.seg is None and [ds.Modality for ds in results.datasets()] == ["SR"]


def test_builders_refuse_a_finding_from_another_film_or_model(films):
    source, radiograph = films[SIIM.path]
    other_source, other_radiograph = films[UNKNOWN_SPACING.path]
    identity = ResultIdentity.from_models(MODELS)
    finding = finding_on(radiograph, two_blobs(radiograph.pixels.shape), 0.93, True)
    with pytest.raises(ValueError, match="the finding is for SOP Instance UID"):
        build_seg(other_source, finding, identity)
    with pytest.raises(ValueError, match=r"mask has shape \(10, 10\) but the source film is 1024 x 1024"):
        build_sr(source, dataclasses.replace(finding, mask=np.zeros((10, 10), bool)), None, identity)
    newer = {**MODELS, "segmenter": {**MODELS["segmenter"], "version": "0.3.0"}}
    with pytest.raises(ValueError, match="the identity names .* but the finding was made by"):
        build_seg(source, finding, ResultIdentity.from_models(newer))
    seg = build_seg(source, finding, identity)
    other_finding = finding_on(other_radiograph, two_blobs(other_radiograph.pixels.shape), 0.9, True)
    with pytest.raises(ValueError, match="does not segment the source"):
        build_sr(other_source, other_finding, seg, identity)


def sr_of(data: bytes) -> hd.sr.EnhancedSR:
    sr = hd.sr.srread(io.BytesIO(data))
    assert isinstance(sr, hd.sr.EnhancedSR)
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    return sr


def algorithm_of(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> tuple[str, str]:
    """(Algorithm Name (DCM 111001), Algorithm Version (DCM 111003)) of a measurement group (TID 4019)."""
    texts = {item.ConceptNameCodeSequence[0].CodeValue: item.TextValue
             for item in group[0].ContentSequence if item.ValueType == "TEXT"}
    return texts["111001"], texts["111003"]


def film_group(sr: hd.sr.EnhancedSR) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    (group,) = sr.content.get_image_measurement_groups()
    assert group.finding_type == codes.SCT.Pneumothorax
    return group


@pytest.mark.parametrize("entry", FILES, ids=registry.ids(FILES))
def test_sr_reports_a_positive_finding(films, entry):
    source, radiograph = films[entry.path]
    identity = ResultIdentity.from_models(MODELS)
    finding = finding_on(radiograph, two_blobs(radiograph.pixels.shape), 0.93, True)
    seg = build_seg(source, finding, identity)
    sr = sr_of(reread(build_sr(source, finding, seg, identity)))

    group = film_group(sr)
    (presence,) = group.get_qualitative_evaluations(name=codes.SCT.Pneumothorax)
    assert presence.value == codes.SCT.Present
    (score,) = group.get_measurements(name=codes.SCT.Score)
    assert score.value == pytest.approx(finding.score) and score.unit == codes.UCUM.NoUnits
    assert [image.referenced_sop_instance_uid for image in group.source_images] == [source.SOPInstanceUID]
    assert algorithm_of(group) == ("ptx-classifier-demo", "0.1.0")

    (segment,) = sr.content.get_planar_roi_measurement_groups(reference_type=codes.DCM.ReferencedSegmentationFrame)
    assert algorithm_of(segment) == ("ptx-segmenter-demo", "0.2.0")
    reference = segment.referenced_segmentation_frame
    assert reference.referenced_sop_instance_uid == seg.SOPInstanceUID
    # The frame alone names the segment (PS3.3 C.18.4: frame numbers or segment numbers, not both) ...
    assert reference.referenced_frame_numbers == [1] and reference.referenced_segment_numbers is None
    # ... and frame 1 of the SEG is segment 1's.
    groups = seg.PerFrameFunctionalGroupsSequence[0]
    identification = groups.get("SegmentIdentificationSequence") or \
        seg.SharedFunctionalGroupsSequence[0].SegmentIdentificationSequence
    assert identification[0].ReferencedSegmentNumber == 1
    assert reference.source_image_for_segmentation.referenced_sop_instance_uid == source.SOPInstanceUID

    regions = sr.content.get_planar_roi_measurement_groups(reference_type=codes.DCM.ImageRegion)
    assert len(finding.instances) == 2 and len(regions) == 2
    (total,) = segment.get_measurements(name=codes.SCT.Area)
    if entry.spacing_mm is None:
        expected = [float(i.area_px) for i in finding.instances]
        unit = hd.sr.CodedConcept("{pixels}", "UCUM", "pixels")
    else:
        expected = [i.area_mm2 for i in finding.instances]
        unit = codes.UCUM.SquareMillimeter
        assert expected[0] == pytest.approx(finding.instances[0].area_px * entry.spacing_mm[0] * entry.spacing_mm[1])
    assert total.value == pytest.approx(sum(expected), rel=1e-6) and total.unit == unit
    for region, instance, area in zip(regions, finding.instances, expected):
        (measured,) = region.get_measurements(name=codes.SCT.Area)
        assert measured.value == pytest.approx(area, rel=1e-6) and measured.unit == unit
        x, y, w, h = instance.bbox_px
        np.testing.assert_allclose(region.roi.value, [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]])
        (selected_from,) = region.roi.ContentSequence  # SCOORD SELECTED FROM the source image
        assert selected_from.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID

    evidence = {sop for _, _, sop, _ in sr.get_evidence()}
    assert {source.SOPInstanceUID, seg.SOPInstanceUID} <= evidence
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    assert sr.PreliminaryFlag == "PRELIMINARY" and sr.VerificationFlag == "UNVERIFIED"


def test_sr_observer_is_our_device(films):
    source, radiograph = films[SIIM.path]
    identity = ResultIdentity.from_models(MODELS)
    finding = finding_on(radiograph, np.zeros(radiograph.pixels.shape, bool), 0.1, False)
    sr = sr_of(reread(build_sr(source, finding, None, identity)))
    (observer,) = sr.content.get_observer_contexts(observer_type=codes.cid270.Device)
    device = observer.observer_identifying_attributes
    assert device.uid == identity.device_uid and device.model_name == identity.manufacturer_model_name
    assert device.manufacturer_name == "ptx-triage"
    assert sr.Manufacturer == "ptx-triage" and "ptx-classifier-demo 0.1.0" in sr.SoftwareVersions
    assert "AI" in sr.SeriesDescription and sr.SeriesNumber == ResultKind.SR.series_number


@pytest.mark.parametrize("mask_kind", ["empty", "below_operating_point"])
def test_sr_reports_a_negative_finding_as_absent_without_regions(films, mask_kind):
    source, radiograph = films[SIIM.path]
    mask = np.zeros(radiograph.pixels.shape, bool) if mask_kind == "empty" else two_blobs(radiograph.pixels.shape)
    finding = finding_on(radiograph, mask, 0.31, False)
    identity = ResultIdentity.from_models(MODELS)
    sr = sr_of(reread(build_sr(source, finding, None, identity)))

    group = film_group(sr)
    (presence,) = group.get_qualitative_evaluations(name=codes.SCT.Pneumothorax)
    assert presence.value == codes.SCT.Absent
    assert group.get_measurements(name=codes.SCT.Score)[0].value == pytest.approx(0.31)
    assert sr.content.get_planar_roi_measurement_groups() == []
    assert {sop for _, _, sop, _ in sr.get_evidence()} == {source.SOPInstanceUID}
    with pytest.raises(ValueError, match="a negative finding has no SEG"):
        positive = finding_on(radiograph, two_blobs(radiograph.pixels.shape), 0.9, True)
        build_sr(source, finding, build_seg(source, positive, identity), identity)


def display_rgb(radiograph: Radiograph, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The film as the SC draws it: its display pixels, shrunk by area to `shape` where that is smaller."""
    pixels = radiograph.pixels if shape is None else shrink(radiograph.pixels, *shape)
    grey = np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


@pytest.mark.parametrize("entry", FILES, ids=registry.ids(FILES))
def test_overlay_burns_the_outline_into_the_film(films, entry):
    source, radiograph = films[entry.path]
    finding = finding_on(radiograph, two_blobs(radiograph.pixels.shape), 0.93, True)
    data = reread(build_overlay(source, finding, ResultIdentity.from_models(MODELS), radiograph.pixels))
    sc = pydicom.dcmread(io.BytesIO(data))

    rows, columns = drawing_size(radiograph.pixels.shape)
    assert max(rows, columns) == min(1024, max(radiograph.pixels.shape)), "drawn at the film's size, at most 1024"
    assert abs(rows / columns - radiograph.rows / radiograph.columns) < 0.01, "in the film's proportions"
    banner_rows = sc.Rows - rows
    assert sc.Columns == columns and 0 < banner_rows < rows // 5, "the banner is a strip above the whole film"
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3 and sc.BitsAllocated == 8
    pixels = sc.pixel_array
    film, banner = pixels[banner_rows:], pixels[:banner_rows]
    changed = (film != display_rgb(radiograph, (rows, columns))).any(axis=2)
    drawn = mask_at(finding.mask, rows, columns)
    rim = outline(drawn, outline_width(drawn.shape))
    np.testing.assert_array_equal(changed, rim)  # the film is untouched except along the outline
    assert (film[rim] == OUTLINE_RGB).all()
    edge = drawn & ~ndimage.binary_erosion(drawn)
    assert edge.any() and rim[edge].all(), "the outline covers the mask's boundary"
    assert not rim[~drawn].any(), "the outline lies inside the region"
    assert (banner > 128).mean() > 0.01, "the banner carries text"
    assert sc.BurnedInAnnotation == "YES" and sc.Modality == "OT"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.PatientID == source.PatientID
    assert "AI" in sc.SeriesDescription and sc.SeriesNumber == ResultKind.SC.series_number
    orientation = source.get("PatientOrientation")
    assert list(sc.get("PatientOrientation") or []) == (list(orientation) if orientation else [])


def test_the_overlay_of_a_film_decoded_at_the_models_resolution_is_drawn_from_those_pixels(films, realdata):
    """A JPEG 2000 film triaged at a reduced resolution (issue 15): the SC is drawn from the reduced pixels, at
    their size, with the film-sized mask brought down to it; the SEG stays on the film's full grid."""
    source, _ = films[CANON.path]
    reduced = read_radiograph(realdata / CANON.path, dataclasses.replace(permissive_policy(), decode_min_side=256))
    assert reduced.grid is not None and reduced.pixels.shape == (532, 500) and reduced.shape == (2128, 2000)
    finding = finding_on(reduced, two_blobs(reduced.shape), 0.93, True)
    assert finding.mask.shape == (2128, 2000)
    results = build_results(source, finding, overlay=True, pixels=reduced.pixels)
    sc = pydicom.dcmread(io.BytesIO(reread(results.overlay)))
    banner_rows = sc.Rows - 532
    assert sc.Columns == 500 and 0 < banner_rows < 532 // 5
    drawn = mask_at(finding.mask, 532, 500)
    film = sc.pixel_array[banner_rows:]
    changed = (film != display_rgb(reduced)).any(axis=2)
    np.testing.assert_array_equal(changed, outline(drawn, outline_width(drawn.shape)))
    np.testing.assert_array_equal(segment_mask(results.seg, source), finding.mask)


def test_the_mask_is_drawn_by_area_majority_computed_on_its_box_only():
    """`mask_at` resamples only the mask's box; it equals the whole mask brought down by area (Pillow's BOX),
    a drawn pixel inside where more than half of it is."""
    rng = np.random.default_rng(7)
    for shape, size in (((2128, 2000), (532, 500)), ((1955, 1841), (1024, 964)), ((1024, 1024), (256, 256)),
                        ((997, 1003), (333, 335))):
        mask = np.zeros(shape, dtype=bool)
        top, left = int(rng.integers(0, shape[0] - 300)), int(rng.integers(0, shape[1] - 300))
        mask[top:top + 300, left:left + 300] = rng.random((300, 300)) < 0.7
        mask = ndimage.binary_opening(mask, iterations=2)
        whole = Image.fromarray(mask.astype(np.float32), mode="F").resize(size[::-1], Image.Resampling.BOX)
        np.testing.assert_array_equal(mask_at(mask, *size), np.asarray(whole) > 0.5)
    assert not mask_at(np.zeros((2128, 2000), dtype=bool), 532, 500).any()


def test_the_overlay_refuses_pixels_that_are_not_the_film_or_a_reduced_decode_of_it(films):
    source, radiograph = films[SIIM.path]
    finding = finding_on(radiograph, two_blobs(radiograph.pixels.shape), 0.93, True)
    with pytest.raises(ValueError, match=r"shape \(300, 300\), which is neither the film's \(1024, 1024\)"):
        build_overlay(source, finding, ResultIdentity.from_models(MODELS), np.zeros((300, 300), np.float32))


def test_overlay_of_a_negative_finding_has_no_outline_and_decodes_the_source_itself(films):
    source, radiograph = films[SIIM.path]
    finding = finding_on(radiograph, two_blobs(radiograph.pixels.shape), 0.31, False)
    sc = build_overlay(source, finding, ResultIdentity.from_models(MODELS))  # pixels decoded from the source
    banner_rows = sc.Rows - radiograph.pixels.shape[0]
    np.testing.assert_array_equal(sc.pixel_array[banner_rows:], display_rgb(radiograph))
    assert sc.LossyImageCompression == "01", "the SIIM film is JPEG baseline: the SC is lossy-derived"


def test_objects_get_their_own_uids_the_same_when_made_again_in_the_source_study(films):
    """Made again for the same film, software and operating point (after a crash, or the film sent again):
    the same UIDs, so a PACS stores them once. Another model version or operating point: new UIDs. UIDs
    inside the SR (tracking identifiers) follow the same rule; every UID is distinct from the others."""
    source, radiograph = films[SIIM.path]
    finding = finding_on(radiograph, two_blobs(radiograph.pixels.shape), 0.93, True)
    first = build_results(source, finding, overlay=True, pixels=radiograph.pixels)
    again = build_results(source, finding, overlay=True, pixels=radiograph.pixels)
    assert isinstance(first, DicomResults) and [ds.Modality for ds in first.datasets()] == ["SEG", "SR", "OT"]

    def uids(results: DicomResults) -> list[str]:
        def tracking(items) -> list[str]:  # UIDREF content items: the measurement groups' tracking UIDs
            return [uid for item in items for uid in ([str(item.UID)] if item.get("ValueType") == "UIDREF"
                                                      and item.ConceptNameCodeSequence[0].CodeValue == "112040"
                                                      else []) + tracking(item.get("ContentSequence", []))]

        found = tracking(results.sr.ContentSequence)
        assert len(found) >= 2  # the film's group, the segment's group, one per instance
        return ([str(ds.SOPInstanceUID) for ds in results.datasets()]
                + [str(ds.SeriesInstanceUID) for ds in results.datasets()] + found)

    assert uids(first) == uids(again)
    newer = dict(MODELS, segmenter={**MODELS["segmenter"], "version": MODELS["segmenter"]["version"] + ".1"})
    other_model = build_results(source, finding_on(radiograph, two_blobs(radiograph.pixels.shape), 0.93, True,
                                                   models=newer), overlay=True, pixels=radiograph.pixels)
    other_point = build_results(source, dataclasses.replace(finding, threshold=0.6), overlay=True,
                                pixels=radiograph.pixels)
    every = uids(first) + uids(other_model) + uids(other_point)
    assert len(set(every)) == len(every), [u for u in every if every.count(u) > 1]
    assert all(UID(uid).is_valid and len(uid) <= 64 for uid in every)
    assert not {source.SOPInstanceUID, source.SeriesInstanceUID} & set(every)
    assert first.sr.CurrentRequestedProcedureEvidenceSequence  # the SR still names the SEG it cites
    cited = {item.ReferencedSOPInstanceUID for study in first.sr.CurrentRequestedProcedureEvidenceSequence
             for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    assert first.seg.SOPInstanceUID in cited
    objects = first.datasets()
    assert {ds.StudyInstanceUID for ds in objects} == {source.StudyInstanceUID}
    for ds in objects:
        reread_ds = pydicom.dcmread(io.BytesIO(reread(ds)))
        assert reread_ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    # Not from a DICOM film (no SOP Instance UID): random UIDs every time.
    anonymous = dataclasses.replace(finding, sop_uid=None)
    identity = ResultIdentity.from_models(finding.models)
    assert identity.uid(anonymous, "SR") != identity.uid(anonymous, "SR")


@pytest.mark.parametrize("entry", FILES[1:], ids=registry.ids(FILES[1:]))
def test_names_are_copied_verbatim_but_never_logged_and_the_source_is_untouched(films, entry):
    source, radiograph = films[entry.path]  # anonymised: one-component names, a hash as birth date (Canon)
    before = copy.deepcopy(source)
    finding = finding_on(radiograph, two_blobs(radiograph.pixels.shape), 0.93, True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = build_results(source, finding, overlay=True, pixels=radiograph.pixels)
    names = [str(source[k].value) for k in ("PatientName", "ReferringPhysicianName") if source.get(k)]
    assert names and not [w for w in caught if any(name in str(w.message) for name in names)]
    for ds in results.datasets():
        assert ds.PatientName == source.PatientName and ds.PatientID == source.PatientID
        assert ds.ReferringPhysicianName == source.get("ReferringPhysicianName")
        birth_date = source.get("PatientBirthDate") or ""
        assert (ds.PatientBirthDate or "") == (birth_date if birth_date.isdigit() else ""), "a hash is no date"
    assert source == before


def test_identity_names_package_and_models():
    identity = ResultIdentity.from_models(MODELS)
    assert identity.software_versions == (f"ptx-triage {package_version()}", "ptx-classifier-demo 0.1.0",
                                          "ptx-segmenter-demo 0.2.0")
    assert identity.device_uid == ResultIdentity.from_models(MODELS).device_uid
    assert identity.device_uid != ResultIdentity.from_models(MODELS, device_serial_number="ward-7").device_uid
    assert identity.model("segmenter") == ModelIdentity("segmenter", "ptx-segmenter-demo", "0.2.0")
    with pytest.raises(ValueError, match="no segmenter model in this identity"):
        ResultIdentity.from_models({"classifier": MODELS["classifier"]}).model("segmenter")
    with pytest.raises(ValueError, match="model version must be a non-empty string"):
        ResultIdentity.from_models({"classifier": {"name": "c", "version": ""}})
    with pytest.raises(ValueError, match="does not fit a DICOM Long String"):
        ModelIdentity("classifier", "a\\b", "1")


def test_seg_needs_the_segmenter_named(films):
    source, radiograph = films[SIIM.path]
    only_classifier = {"classifier": MODELS["classifier"]}
    finding = finding_on(radiograph, two_blobs(radiograph.pixels.shape), 0.93, True, models=only_classifier)
    with pytest.raises(ValueError, match="no segmenter model in this identity"):
        build_seg(source, finding, ResultIdentity.from_models(only_classifier))


# dciodvfy warnings that come from the film's own values, which our objects copy as they are: names in the
# one-component (retired) form, and Study ID / Study Date / Study Time that the film leaves empty.
SOURCE_WARNINGS = re.compile(r"Retired Person Name form|needed to build DICOMDIR - Study (ID|Date|Time)$")
IOD_NAMES = {"SEG": "Segmentation", "SR": "EnhancedSR", "OT": "SCImage"}


def dciodvfy(path: Path) -> tuple[str, list[str], list[str]]:
    """(output, errors, warnings) of dicom3tools' dciodvfy on `path`; fails the test where it is missing."""
    executable = shutil.which("dciodvfy")
    if executable is None:
        pytest.fail("dciodvfy is not installed: it comes with the Debian package dicom3tools, which .ci/run "
                    "installs (locally: apt-get install dicom3tools)")
    report = subprocess.run([executable, str(path)], capture_output=True, text=True, check=False, timeout=60)
    output = report.stdout + report.stderr
    # Its messages go to stderr, and one may follow another on the same line.
    messages = [m.strip() for line in output.splitlines()
                for m in re.split(r"(?=\b(?:Error|Warning) - )", line) if m.strip()]
    return (output, [m for m in messages if m.startswith("Error")], [m for m in messages if m.startswith("Warning")])


@pytest.mark.parametrize("positive", [True, False], ids=["positive", "negative"])
@pytest.mark.parametrize("entry", registry.CHEST, ids=registry.ids(registry.CHEST))
def test_objects_pass_dciodvfy(films, entry, positive, tmp_path):
    """Every object for every chest film: no dciodvfy errors, and no warnings but the film's own."""
    source, radiograph = films[entry.path]
    finding = finding_on(radiograph, two_blobs(radiograph.pixels.shape), 0.93 if positive else 0.31, positive)
    datasets = build_results(source, finding, overlay=True, pixels=radiograph.pixels).datasets()
    assert [ds.Modality for ds in datasets] == (["SEG", "SR", "OT"] if positive else ["SR", "OT"])
    for ds in datasets:
        path = tmp_path / f"{ds.Modality}.dcm"
        path.write_bytes(reread(ds))
        output, errors, warnings_ = dciodvfy(path)
        assert IOD_NAMES[ds.Modality] in output.split(), f"{ds.Modality}: dciodvfy did not check the IOD:\n{output}"
        assert errors == [], f"{ds.Modality} of {entry.path}: {errors}"
        unexpected = [w for w in warnings_ if not SOURCE_WARNINGS.search(w)]
        assert unexpected == [], f"{ds.Modality} of {entry.path}: {unexpected}"


def recorded(ds: Dataset) -> list[tuple[str, int]]:
    """(keyword, value length) of each attribute the object says it emptied (Original Attributes Sequence)."""
    return [(element.keyword, len(element.value or ""))
            for item in ds.get("OriginalAttributesSequence", [])
            for element in item.ModifiedAttributesSequence[0]]


@pytest.mark.parametrize("entry", registry.CHEST, ids=registry.ids(registry.CHEST))
def test_invalid_source_values_are_emptied_and_recorded_without_the_value(films, entry):
    source, radiograph = films[entry.path]
    finding = finding_on(radiograph, two_blobs(radiograph.pixels.shape), 0.93, True)
    results = build_results(source, finding, overlay=True, pixels=radiograph.pixels)
    # The Canon film's Accession Number and Birth Date are one 56-character hash (SH: 16, DA: a date); the
    # SIIM films give Patient's Age "62" (AS: "062Y"); the Philips film is valid.
    expected = {CANON.path: ["AccessionNumber", "PatientBirthDate"], UNKNOWN_SPACING.path: []}.get(
        entry.path, ["PatientAge"])
    for ds in results.datasets():
        data = reread(ds)
        written = pydicom.dcmread(io.BytesIO(data))
        assert recorded(written) == [(keyword, 0) for keyword in expected], ds.Modality
        for keyword in expected:
            assert keyword in written and not written[keyword].value, "Type 2 stays present, and empty"
            value = str(source[keyword].value).encode()
            assert len(value) < 8 or value not in data, "the invalid value is nowhere in the object"
        if expected:
            (item,) = written.OriginalAttributesSequence
            assert item.ReasonForTheAttributeModification == "CORRECT"
            assert item.ModifyingSystem == f"ptx-triage {package_version()}" and item.AttributeModificationDateTime
        assert written.AccessionNumber == ("" if entry is CANON else source.AccessionNumber)


def test_invalid_values_are_never_shortened_or_guessed(films):
    source, radiograph = films[SIIM.path]
    film = copy.deepcopy(source)
    film.AccessionNumber = "A" * 17  # one character too long: "A" * 16 would look valid, and be wrong
    film.PatientSex = "U"  # not M, F or O
    film.PatientOrientation = ["X", "F"]  # not a direction
    film.StudyDate = "20241399"  # no 13th month
    film.OtherPatientIDsSequence = [Dataset()]
    film.OtherPatientIDsSequence[0].PatientID = "B" * 65  # LO: 64; a sequence is copied whole or not at all
    film.PatientAge = "062Y"  # valid: copied
    finding = finding_on(radiograph, two_blobs(radiograph.pixels.shape), 0.93, True)
    before = copy.deepcopy(film)
    results = build_results(film, finding, overlay=True, pixels=radiograph.pixels)
    assert film == before, "the caller's dataset is untouched"
    for ds in results.datasets():
        written = pydicom.dcmread(io.BytesIO(reread(ds)))
        emptied = {keyword for keyword, _ in recorded(written)}
        assert {"AccessionNumber", "PatientSex", "StudyDate", "OtherPatientIDsSequence"} <= emptied, ds.Modality
        assert written.AccessionNumber == "" and written.PatientSex == "" and written.StudyDate == ""
        assert list(written.OtherPatientIDsSequence) == []
        assert written.PatientAge == "062Y" and "PatientAge" not in emptied
        if ds.Modality != "SR":  # images only: Patient Orientation of the same pixel grid
            assert "PatientOrientation" in emptied and not written.PatientOrientation
    assert ("PatientOrientation", 0) not in recorded(results.sr)


def test_overlay_carries_the_film_anatomy(films):
    source, radiograph = films[CANON.path]  # DX chest film: Image Laterality R (as the film says)
    finding = finding_on(radiograph, two_blobs(radiograph.pixels.shape), 0.93, True)
    sc = pydicom.dcmread(io.BytesIO(reread(build_overlay(source, finding, ResultIdentity.from_models(MODELS),
                                                         radiograph.pixels))))
    assert sc.BodyPartExamined == "CHEST" and sc.ImageLaterality == source.ImageLaterality
    assert list(sc.PatientOrientation) == list(source.PatientOrientation)
    assert "Laterality" not in sc, "a chest is unpaired and the film says its laterality"


def kept(source, radiograph) -> Film:
    """What the intake's triage keeps on a Finding (`Flow.run(keep_source=True)`)."""
    return Film(radiograph, source)


@pytest.mark.parametrize("entry", FILES, ids=registry.ids(FILES))
def test_the_overlay_drawn_on_the_triaged_pixels_equals_the_one_decoded_again(films, entry):
    """The DICOM side hands the SC builder the pixels triage already decoded (`Finding.source`) instead of
    letting it decode the film again: the same image to the byte, for each real chest film."""
    source, radiograph = films[entry.path]
    finding = dataclasses.replace(finding_on(radiograph, two_blobs(radiograph.pixels.shape), 0.93, True),
                                  source=kept(source, radiograph))
    given = build_overlay(source, finding, ResultIdentity.from_models(MODELS), finding.source.radiograph.pixels)
    decoded = build_overlay(source, finding, ResultIdentity.from_models(MODELS))
    assert given.PixelData == decoded.PixelData


def test_the_dicom_side_writes_the_overlay_without_decoding_the_film_again(films, tmp_path, monkeypatch):
    """`Pacs._write_results` with a Finding carrying its display pixels never calls the decoder; without
    them it decodes (the fallback stays)."""
    from service.pacs import side as pacs_module
    from service.pacs.results import overlay as overlay_module
    from service.settings import load_settings
    from service.store import open_store
    from service.store.results_files import ResultsFolder

    source, radiograph = films[SIIM.path]
    data = reread(source)
    finding = dataclasses.replace(finding_on(radiograph, two_blobs(radiograph.pixels.shape), 0.93, True),
                                  source=kept(source, radiograph))
    decodes: list[str] = []
    real_decode = overlay_module.decode_pixels
    monkeypatch.setattr(overlay_module, "decode_pixels", lambda ds: decodes.append("decode") or real_decode(ds))
    settings = load_settings(environ={"PTX_DICOM_PORT": "11112", "PTX_DATA_DIR": str(tmp_path)})

    async def never(_: bytes):  # pragma: no cover -- nothing is triaged here
        raise AssertionError("no triage in this test")

    with open_store(None, tmp_path) as store:
        pacs = pacs_module.Pacs(settings, store, ResultsFolder(tmp_path / "results"), never)
        written = pacs._write_results(data, finding)
        assert [kind for kind, _, _ in written] == ["SEG", "SR", "SC"] and decodes == []
        pacs._write_results(data, dataclasses.replace(finding, source=None))
        assert decodes == ["decode"]
