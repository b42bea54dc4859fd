"""Tests of `python -m training synth`: SIIM layout, determinism, masks, contrasts, encodings, CLI errors.

Contrasts are measured here with this file's own region definitions (lesion vs a lung ring just outside the
pleural line; line vs its immediate surroundings; fractions of the display range), never read from
synth.json. Tests that need the real SIIM label file skip when /work/shared/realdata is absent.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from service.cascade.rle import decode
from training.__main__ import main
from training.synth.generate import SynthConfig, load_shape_source, render_case

REALDATA = Path(os.environ.get("PTX_REALDATA") or Path(__file__).resolve().parents[2].parent / "shared" / "realdata")
SIIM_SHAPES = REALDATA / "labels" / "siim-pneumothorax-train-rle.csv.gz"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
LOSSLESS = {EXPLICIT_LE, "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"}


@pytest.fixture(scope="module")
def siim_shapes() -> Path:
    if not SIIM_SHAPES.is_file():
        pytest.skip(f"real SIIM labels not found at {SIIM_SHAPES} (set PTX_REALDATA to the realdata folder)")
    return SIIM_SHAPES


def synth(out: Path, *extra: str) -> int:
    return main(["synth", "--out", str(out), "--quiet", *extra])


def read_rows(out: Path) -> tuple[list[str], list[tuple[str, str]]]:
    with open(out / "train-rle.csv", newline="") as f:
        reader = csv.reader(f)
        return next(reader), [(a, b) for a, b in reader]


def digest(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def layout_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("layout")
    assert synth(out, "--count", "50", "--seed", "11", "--size", "256", "--workers", "1", "--procedural-shapes") == 0
    return out


def test_layout_matches_siim(layout_run: Path) -> None:
    header, rows = read_rows(layout_run)
    assert header == ["ImageId", " EncodedPixels"]
    assert (layout_run / "train-rle.csv").read_text().startswith("ImageId, EncodedPixels\n")
    files = {p.stem for p in (layout_run / "dicom").glob("*.dcm")}
    ids = [image_id for image_id, _ in rows]
    assert set(ids) == files and len(files) == 50
    for path in (layout_run / "dicom").glob("*.dcm"):
        assert pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID == path.stem
    meta = {m["image_id"]: m for m in json.loads((layout_run / "synth.json").read_text())["images"]}
    for image_id in files:
        image_rows = [rle for i, rle in rows if i == image_id]
        if meta[image_id]["instances"] == 0:
            assert image_rows == ["-1"]
        else:
            assert len(image_rows) == meta[image_id]["instances"] and "-1" not in image_rows
    positives = {i for i, rle in rows if rle != "-1"}
    assert 0.08 <= len(positives) / 50 <= 0.40  # 0.22 +- ~2.4 binomial standard deviations


def test_dicom_attributes(layout_run: Path) -> None:
    seen_sops = set()
    for path in sorted((layout_run / "dicom").glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.BodyPartExamined == "CHEST" and ds.ViewPosition in ("PA", "AP")
        assert ds.Modality in ("CR", "DX") and str(ds.PatientName).startswith("Synthetic^")
        assert ds.PatientID and ds.PatientBirthDate and ds.PatientSex in ("M", "F")
        assert all(0.14 <= float(v) <= 0.20 for v in ds.PixelSpacing)
        if ds.Modality == "DX":
            assert ds.ImagerPixelSpacing == ds.PixelSpacing
            assert ds.PresentationLUTShape == ("INVERSE" if ds.PhotometricInterpretation == "MONOCHROME1" else "IDENTITY")
        seen_sops.add(ds.SOPClassUID.name)
    assert len(seen_sops) == 3, seen_sops


def test_deterministic_across_workers(tmp_path: Path) -> None:
    args = ["--count", "8", "--seed", "5", "--size", "256", "--procedural-shapes", "--prevalence", "0.6"]
    assert synth(tmp_path / "a", *args, "--workers", "1") == 0
    assert synth(tmp_path / "b", *args, "--workers", "2") == 0
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    other = [a if a != "5" else "6" for a in args]
    assert synth(tmp_path / "c", *other, "--workers", "1") == 0
    a, c = digest(tmp_path / "a"), digest(tmp_path / "c")
    assert set(a) != set(c) and a["train-rle.csv"] != c["train-rle.csv"]


def _lung(config: SynthConfig, index: int, source) -> np.ndarray:
    return render_case(config, index, source).anatomy.lung_side > 0


def test_masks_in_bounds_disjoint_inside_lung(tmp_path: Path, siim_shapes: Path) -> None:
    out = tmp_path / "m"
    assert synth(out, "--count", "12", "--seed", "3", "--size", "256", "--workers", "1",
                 "--prevalence", "1.0", "--shapes", str(siim_shapes)) == 0
    _, rows = read_rows(out)
    config = SynthConfig(out=out, count=12, seed=3, prevalence=1.0, size=256, shapes=siim_shapes)
    source = load_shape_source(config)
    meta = json.loads((out / "synth.json").read_text())["images"]
    assert sum(m["instances"] > 1 for m in meta) >= 1, "expected at least one two-instance image"
    for m in meta:
        masks = [decode(rle, 256, 256) for i, rle in rows if i == m["image_id"]]
        assert masks and all(mask.any() for mask in masks)
        lung = _lung(config, m["index"], source)
        total = np.zeros((256, 256), dtype=int)
        for mask in masks:
            total += mask
            assert not (mask & ~lung).any(), "lesion outside the lung field"
        assert total.max() == 1, "instances of one image overlap"


def measure(display: np.ndarray, lesion: np.ndarray, lung: np.ndarray, width: int, size: int) -> tuple[float, float]:
    """(lesion darker than ring, line brighter than surroundings), independently of the generator's code."""
    gap, ring_w, near = max(1, round(2 * size / 1024)), max(3, round(12 * size / 1024)), max(2, round(4 * size / 1024))
    dist = ndimage.distance_transform_edt(~lesion)
    line = lung & ~lesion & (dist <= width)
    ring = lung & ~lesion & (dist > width + gap) & (dist <= width + gap + ring_w)
    surround = lung & ~line & (ndimage.distance_transform_edt(~line) <= near)
    assert ring.sum() > 10 and line.sum() > 3
    return float(display[ring].mean() - display[lesion].mean()), float(display[line].mean() - display[surround].mean())


@pytest.mark.parametrize("difficulty,lesion_range,line_range", [
    ("realistic", (0.02, 0.10), (0.05, 0.15)), ("easy", (0.04, 0.20), (0.10, 0.30))])
def test_contrast_on_rendered_images(siim_shapes: Path, difficulty, lesion_range, line_range) -> None:
    config = SynthConfig(out=Path("unused"), count=8, seed=21, prevalence=1.0, size=512, shapes=siim_shapes,
                         difficulty=difficulty)
    source = load_shape_source(config)
    lesion_values, line_values = [], []
    for index in range(6):
        case = render_case(config, index, source)
        lung = case.anatomy.lung_side > 0
        for lesion in case.lesions:
            les, line = measure(case.display, lesion.mask, lung, lesion.line_width, 512)
            lesion_values.append(les)
            line_values.append(line)
            # no vessel markings inside the lesion: what is left above the anatomy there is noise only
            residual = case.display[lesion.mask] - case.anatomy.base[lesion.mask]
            markings_there = case.anatomy.markings[lesion.mask]
            if markings_there.std() > 0.005:
                assert abs(np.corrcoef(residual, markings_there)[0, 1]) < 0.2
    tol = 2e-3  # quantisation to 12 bits and rounding of the ring edge
    assert min(lesion_values) >= lesion_range[0] - tol and max(lesion_values) <= lesion_range[1] + tol, lesion_values
    assert min(line_values) >= line_range[0] - tol and max(line_values) <= line_range[1] + tol, line_values
    assert len(set(np.round(lesion_values, 3))) > 1  # targets are drawn, not a constant


def _display_from_file(ds) -> np.ndarray | None:
    """Display values of a file whose window spans the whole stored range (None for other files)."""
    top = (1 << ds.BitsStored) - 1
    slope, intercept = float(getattr(ds, "RescaleSlope", 1)), float(getattr(ds, "RescaleIntercept", 0))
    if "WindowWidth" not in ds or abs(float(ds.WindowWidth) - slope * (top + 1)) > 1e-3:
        return None
    stored = ds.pixel_array.astype(np.float64)
    if abs(float(ds.WindowCenter) - (slope * (top + 1) / 2 + intercept)) > 1e-3:
        return None
    display = stored / top
    return 1.0 - display if ds.PhotometricInterpretation == "MONOCHROME1" else display


def test_encoding_mix_decodes_exactly_and_contrast_in_dicom(tmp_path: Path, siim_shapes: Path) -> None:
    out = tmp_path / "mix"
    assert synth(out, "--count", "20", "--seed", "8", "--size", "256", "--workers", "2",
                 "--prevalence", "1.0", "--shapes", str(siim_shapes)) == 0
    config = SynthConfig(out=out, count=20, seed=8, prevalence=1.0, size=256, shapes=siim_shapes)
    source = load_shape_source(config)
    _, rows = read_rows(out)
    syntaxes, photometrics, full_range_checked = set(), set(), 0
    for m in json.loads((out / "synth.json").read_text())["images"]:
        ds = pydicom.dcmread(out / "dicom" / f"{m['image_id']}.dcm")
        syntaxes.add(str(ds.file_meta.TransferSyntaxUID))
        photometrics.add(ds.PhotometricInterpretation)
        case = render_case(config, m["index"], source)
        np.testing.assert_array_equal(ds.pixel_array, case.stored)
        display = _display_from_file(ds)
        masks = [decode(rle, 256, 256) for i, rle in rows if i == m["image_id"] and rle != "-1"]
        if display is not None and masks:
            for mask, lesion in zip(masks, case.lesions):
                les, line = measure(display, mask, case.anatomy.lung_side > 0, lesion.line_width, 256)
                assert 0.02 - 2e-3 <= les <= 0.10 + 2e-3 and 0.05 - 2e-3 <= line <= 0.15 + 2e-3
                full_range_checked += 1
    assert syntaxes == LOSSLESS
    assert "MONOCHROME1" in photometrics
    assert full_range_checked >= 1, "no positive file with a full-range window in this run"


def test_uncompressed_only_explicit_le(tmp_path: Path) -> None:
    assert synth(tmp_path, "--count", "6", "--seed", "2", "--size", "256", "--workers", "1",
                 "--procedural-shapes", "--uncompressed") == 0
    syntaxes = {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
                for p in (tmp_path / "dicom").glob("*.dcm")}
    assert syntaxes == {EXPLICIT_LE}


def test_full_size_1024_writes_1024(tmp_path: Path) -> None:
    assert synth(tmp_path, "--count", "2", "--seed", "4", "--workers", "1", "--procedural-shapes",
                 "--prevalence", "1.0", "--uncompressed") == 0
    for path in (tmp_path / "dicom").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        assert ds.pixel_array.shape == (1024, 1024) and ds.BitsStored in (8, 12)
    _, rows = read_rows(tmp_path)
    assert all(decode(rle, 1024, 1024).any() for _, rle in rows)


@pytest.mark.parametrize("argv,fragment", [
    (["--count", "0", "--seed", "1"], "--count"),
    (["--count", "x", "--seed", "1"], "--count"),
    (["--count", "2", "--seed", "1", "--size", "300"], "multiple of 32"),
    (["--count", "2", "--seed", "1", "--size", "128"], "--size"),
    (["--count", "2", "--seed", "1", "--shapes", "/nonexistent/train-rle.csv.gz"], "--procedural-shapes"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path: Path, capsys, argv, fragment) -> None:
    assert synth(tmp_path / "o", *argv) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o" / "train-rle.csv").exists()


def test_default_shapes_missing_is_a_clear_error(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PTX_REALDATA", str(tmp_path / "nowhere"))
    assert synth(tmp_path / "o", "--count", "1", "--seed", "1") == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "--shapes" in err and "--procedural-shapes" in err


def test_service_reader_sees_air_dark_and_lesions_darker(tmp_path: Path) -> None:
    """The service's own reader (VOI window or percentile window, MONOCHROME1 inverted once) must show
    the body brighter than the air outside it and each lesion darker than the lung ring around it."""
    imaging = pytest.importorskip("service.imaging.reader", reason="service.imaging.reader not written yet")
    assert synth(tmp_path, "--count", "8", "--seed", "9", "--size", "256", "--workers", "1",
                 "--procedural-shapes", "--prevalence", "1.0") == 0
    config = SynthConfig(out=tmp_path, count=8, seed=9, prevalence=1.0, size=256)
    source = load_shape_source(config)
    for m in json.loads((tmp_path / "synth.json").read_text())["images"]:
        radiograph = imaging.read_radiograph(tmp_path / "dicom" / f"{m['image_id']}.dcm")
        assert radiograph.spacing_mm is not None and 0.14 <= radiograph.spacing_mm[0] <= 0.20
        case = render_case(config, m["index"], source)
        pixels, lung = radiograph.pixels, case.anatomy.lung_side > 0
        assert pixels[:12, :12].mean() < pixels[lung].mean() < pixels[128:200, 120:136].mean()
        for lesion in case.lesions:
            assert measure(pixels, lesion.mask, lung, lesion.line_width, 256)[0] > 0


def test_anatomy_outlines_are_chest_like() -> None:
    """Lungs fill most of the thorax, are widest at the base with a narrow apex, the image-right (patient
    left) lung is smaller (cardiac notch), and vessel markings are clearly stronger near the hila."""
    from training.synth.anatomy import render_anatomy

    for seed in range(6):
        anatomy = render_anatomy(np.random.default_rng(seed), 256)
        areas = []
        for label in (1, 2):
            lung = anatomy.lung_side == label
            rows = np.flatnonzero(lung.any(axis=1))
            first, last = lung[rows].argmax(axis=1), 255 - lung[rows, ::-1].argmax(axis=1)
            span, lateral = last - first + 1, (-first if label == 1 else last)
            cols = np.flatnonzero(lung.any(axis=0))
            assert 0.25 <= (cols[-1] - cols[0] + 1) / 256 <= 0.5, "lung width outside the SIIM-like range"
            assert lateral.argmax() > 0.5 * len(rows), "lateral lung border not widest in the lower half"
            assert span[int(0.05 * len(rows))] < 0.65 * span.max(), "apex not narrow"
            areas.append(lung.sum())
            # markings: medial (hilar) half of the lung much stronger than the lateral (peripheral) half
            mid = (cols[0] + cols[-1]) / 2
            xs = np.nonzero(lung)[1]
            medial = (xs > mid) if label == 1 else (xs < mid)
            values = anatomy.markings[lung]
            assert values[medial].mean() > 1.4 * values[~medial].mean(), "markings do not fade to the periphery"
        assert areas[1] < areas[0], "image-right lung should be the smaller one (heart)"
