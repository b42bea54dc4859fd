"""Instances from masks (boxes, areas, centroids in px and mm) and millimetre morphology."""

from __future__ import annotations

import numpy as np
import pytest

from service.cascade.masks import MillimetreMorphology, find_instances, remove_small


def test_instances_boxes_areas_centroids_in_px_and_mm():
    mask = np.zeros((100, 200), dtype=bool)
    mask[10:20, 30:70] = True  # 10 rows x 40 columns = 400 px
    mask[50:54, 100:103] = True  # 12 px
    big, small = find_instances(mask, spacing_mm=(0.2, 0.1))
    assert big.bbox_px == (30, 10, 40, 10)
    assert big.area_px == 400
    assert big.centroid_px == pytest.approx((49.5, 14.5))
    assert big.bbox_mm == pytest.approx((3.0, 2.0, 4.0, 2.0))  # x by column spacing, y by row spacing
    assert big.area_mm2 == pytest.approx(400 * 0.02)
    assert small.bbox_px == (100, 50, 3, 4) and small.area_px == 12


def test_unknown_spacing_gives_no_millimetres():
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:4, 2:4] = True
    (instance,) = find_instances(mask, spacing_mm=None)
    assert instance.bbox_mm is None and instance.area_mm2 is None and instance.area_px == 4


def test_diagonal_pixels_are_one_instance_and_empty_mask_none():
    mask = np.eye(6, dtype=bool)
    assert len(find_instances(mask, None)) == 1
    assert find_instances(np.zeros((4, 4), bool), None) == []


def test_min_area_filter():
    mask = np.zeros((10, 10), dtype=bool)
    mask[0, 0] = True
    mask[5:8, 5:8] = True
    assert [i.area_px for i in find_instances(mask, None, min_area_px=2)] == [9]
    assert remove_small(mask, 2).sum() == 9


def test_dilation_is_a_disc_in_millimetres_even_for_anisotropic_pixels():
    mask = np.zeros((201, 201), dtype=bool)
    mask[100, 100] = True
    grown = MillimetreMorphology(dilate_mm=2.0, erode_mm=0.0, min_area_mm2=0.0).apply(mask, (0.1, 0.2))
    rows = np.flatnonzero(grown[:, 100])
    cols = np.flatnonzero(grown[100, :])
    assert (rows.min(), rows.max()) == (80, 120)  # 2 mm / 0.1 mm = 20 px up and down
    assert (cols.min(), cols.max()) == (90, 110)  # 2 mm / 0.2 mm = 10 px left and right


def test_basel_defaults_close_a_gap_and_drop_specks():
    spacing = (0.2, 0.2)
    mask = np.zeros((400, 400), dtype=bool)
    mask[100:200, 100:140] = True
    mask[100:200, 145:185] = True  # a 1 mm gap: closed by dilate 10 mm / erode 7 mm
    mask[350:353, 350:353] = True  # 9 px = 0.36 mm²: grows by ~3 mm net, still < 80 mm² → dropped
    refined = MillimetreMorphology().apply(mask, spacing)
    assert refined[150, 142], "gap closed"
    assert not refined[340:360, 340:360].any(), "speck dropped"
    assert refined.sum() > mask[:300].sum(), "net growth of about 3 mm"
    assert refined[100:200, 100:185].all(), "the two halves and the gap form one filled block"


def test_lesion_touching_the_border_is_not_eroded_from_outside():
    mask = np.zeros((300, 300), dtype=bool)
    mask[0:100, 0:60] = True
    refined = MillimetreMorphology(dilate_mm=5.0, erode_mm=5.0, min_area_mm2=0).apply(mask, (0.2, 0.2))
    assert refined[0, 0] and refined[0:100, 0:60].all()


def test_morphology_refuses_unknown_spacing_and_bad_parameters():
    with pytest.raises(ValueError, match="needs a positive pixel spacing"):
        MillimetreMorphology().apply(np.ones((4, 4), bool), None)
    with pytest.raises(ValueError, match="dilate_mm must be a finite number >= 0, got -1"):
        MillimetreMorphology(dilate_mm=-1)
