"""Findings: priority bands, instances in px and mm, RLE and mask PNG in the JSON, morphology by spacing."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from service.cascade import rle
from service.cascade.finding import Priority, PriorityBands, build_finding, mask_png
from service.cascade.masks import MillimetreMorphology
from service.cascade.postprocess import CascadeResult
from service.imaging.radiograph import Radiograph


def film(spacing: tuple[float, float] | None = (0.2, 0.2)) -> Radiograph:
    return Radiograph(pixels=np.zeros((512, 512), np.float32), spacing_mm=spacing, study_uid="1.2", series_uid="1.2.3",
                      sop_uid="1.2.3.4", warnings=() if spacing else ("spacing_unknown",))


def result(mask: np.ndarray, score: float, positive: bool) -> CascadeResult:
    return CascadeResult(score=score, positive=positive, gated=True, mask=mask, probability_max=score)


def lesion(rows: int, columns: int) -> np.ndarray:
    mask = np.zeros((512, 512), dtype=bool)
    mask[10 : 10 + rows, 20 : 20 + columns] = True
    return mask


@pytest.mark.parametrize(
    "score,positive,size,expected",
    [(0.2, False, (30, 30), Priority.ROUTINE), (0.5, True, (30, 30), Priority.URGENT),
     (0.95, True, (30, 30), Priority.STAT), (0.5, True, (300, 300), Priority.STAT)],  # 300² px × 0.04 = 3600 mm²
)
def test_priority_bands(score, positive, size, expected):
    finding = build_finding(film(), result(lesion(*size), score, positive), 0.3, PriorityBands())
    assert finding.priority is expected


def test_unknown_spacing_never_makes_size_a_reason_for_stat():
    finding = build_finding(film(None), result(lesion(300, 300), 0.5, True), 0.3, PriorityBands())
    assert finding.priority is Priority.URGENT
    assert finding.instances[0].area_mm2 is None and "size_unknown_spacing" in finding.warnings


def test_priority_only_upgrades():
    assert Priority.ROUTINE.max(Priority.STAT) is Priority.STAT
    assert Priority.STAT.max(Priority.URGENT) is Priority.STAT
    assert Priority.URGENT.max(Priority.ROUTINE) is Priority.URGENT


def test_json_carries_rle_png_and_instances():
    mask = lesion(40, 30)
    body = build_finding(film(), result(mask, 0.7, True), 0.3, PriorityBands(),
                         models={"classifier": "c 1"}, timings_ms={"classify": 3.14159}).to_json()
    np.testing.assert_array_equal(rle.decode(body["rle"], 512, 512), mask)
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))))
    np.testing.assert_array_equal(png.astype(bool), mask)
    (instance,) = body["instances"]
    assert instance["bbox_px"] == [20, 10, 30, 40] and instance["bbox_mm"] == [4.0, 2.0, 6.0, 8.0]
    assert instance["area_mm2"] == pytest.approx(1200 * 0.04)
    assert body["label"] == "pneumothorax" and body["priority"] == "URGENT" and body["timings_ms"]["classify"] == 3.14
    assert "mask_png" not in build_finding(film(), result(mask, 0.7, True), 0.3, PriorityBands()).to_json("rle")
    with pytest.raises(ValueError, match="mask format must be png, rle or none"):
        build_finding(film(), result(mask, 0.7, True), 0.3, PriorityBands()).to_json("jpeg")


def test_morphology_needs_spacing_and_says_so():
    mask = lesion(40, 30)
    grown = build_finding(film(), result(mask, 0.7, True), 0.3, PriorityBands(), MillimetreMorphology())
    assert grown.mask.sum() > mask.sum()
    skipped = build_finding(film(None), result(mask, 0.7, True), 0.3, PriorityBands(), MillimetreMorphology())
    assert (skipped.mask == mask).all() and "mm_morphology_skipped_spacing_unknown" in skipped.warnings


def test_mask_png_is_small():
    assert len(base64.b64decode(mask_png(lesion(100, 60)))) < 2000


def test_bands_validate():
    with pytest.raises(ValueError, match="stat_score must be in"):
        PriorityBands(stat_score=0)
