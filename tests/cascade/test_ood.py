"""Out of distribution (issue 16 §4): films unlike the demo's training films are flagged, capped and counted.

Through the served flow with the model worker's own runner (the distance is measured in its batched call and
packed beside the score, as over BentoML): the real chest films of ../shared/realdata, which the synthetic demo
models never saw and used to call STAT pneumothoraces, come out flagged, never STAT; fresh synthetic films
(another seed than any the demo was fitted on) are not flagged; non-chest images given as PNG are.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from service.cascade.finding import Priority, PriorityBands, build_finding
from service.cascade.flow import Flow
from service.cascade.postprocess import CascadeResult
from service.cascade.scoring import Ood
from service.cascade.served import count_ood
from service.errors import WarningCode
from service.imaging.radiograph import Radiograph
from service.metrics import metrics
from service.models.model_set import resolve
from service.models.runner import CLASSIFY_ROW, ModelRunner, unpack
from service.settings import load_settings
from training.__main__ import main as training_main

OOD = WarningCode.OUT_OF_DISTRIBUTION.value


@pytest.fixture(scope="module")
def served():
    """(flow, classify, segment) as the edge runs them, the runner standing in for the BentoML worker."""
    settings = load_settings(environ={"PTX_INTRA_OP_THREADS": "1"})
    models = resolve(settings)
    runner = ModelRunner(models, settings)
    side = models.segmenter_spec.size

    async def classify(batch: np.ndarray) -> np.ndarray:
        return unpack(runner.classify(batch), CLASSIFY_ROW).outputs

    async def segment(batch: np.ndarray) -> np.ndarray:
        return unpack(runner.segment(batch), (side, side)).outputs

    return Flow.from_settings(settings, models), classify, segment


def triage(served, payload: bytes):
    flow, classify, segment = served
    return asyncio.run(flow.run(payload, classify, segment))


def test_real_chest_films_are_out_of_distribution_and_never_stat(served, realdata):
    """The defect: every real chest film came out STAT or URGENT with no warning (scores 0.74-0.999)."""
    for path in sorted((realdata / "chest").glob("*.dcm")):
        finding = triage(served, path.read_bytes())
        body = finding.to_json("none")
        assert body["ood"]["flag"] is True and body["ood"]["distance"] > body["ood"]["threshold"], path.name
        assert OOD in finding.warnings and body["needs_review"] is True, path.name
        assert finding.priority != Priority.STAT, path.name


def test_fresh_synthetic_films_are_in_distribution(served, tmp_path):
    """A seed the demo never saw, mixed encodings: the threshold is the 99th percentile of held-out training
    films, so at most one film in 32 may pass it."""
    data = tmp_path / "fresh"
    assert training_main(["synth", "--out", str(data), "--count", "32", "--seed", "161616", "--quiet",
                          "--workers", "1"]) == 0
    findings = [triage(served, path.read_bytes()) for path in sorted((data / "dicom").glob("*.dcm"))]
    assert all(finding.ood is not None for finding in findings)
    flagged = [finding for finding in findings if finding.ood.flag]
    assert len(flagged) <= 1, [round(finding.ood.distance, 1) for finding in findings]
    assert all(OOD not in finding.warnings for finding in findings if not finding.ood.flag)


def png_of(path: Path) -> bytes:
    """A real non-chest film's pixels (air dark) as a 16-bit greyscale PNG."""
    dataset = pydicom.dcmread(path)
    pixels = dataset.pixel_array.astype(np.float64)
    pixels = (pixels - pixels.min()) / np.ptp(pixels)
    if dataset.PhotometricInterpretation == "MONOCHROME1":
        pixels = 1 - pixels
    buffer = io.BytesIO()
    Image.fromarray((pixels * 65535).astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_non_chest_images_as_png_are_out_of_distribution(served, realdata):
    rows, columns = np.mgrid[0:512, 0:512]
    pattern = io.BytesIO()
    Image.fromarray(((np.sin(columns / 9) * np.cos(rows / 13) * 0.5 + 0.5) * 255).astype(np.uint8)).save(pattern, "PNG")
    payloads = {name: png_of(realdata / "other" / name) for name in ("cr_hip_jpegls_lossless.dcm",
                                                                    "cr_extremity_j2k_mono1.dcm")}
    payloads["pattern"] = pattern.getvalue()
    for name, payload in payloads.items():
        finding = triage(served, payload)
        assert finding.ood is not None and finding.ood.flag, name
        assert OOD in finding.warnings and finding.priority != Priority.STAT, name


def film() -> Radiograph:
    return Radiograph(pixels=np.zeros((512, 512), np.float32), spacing_mm=(0.2, 0.2), study_uid="1.2",
                      series_uid="1.2.3", sop_uid="1.2.3.4")


def result(ood: Ood | None, score: float = 0.97) -> CascadeResult:
    mask = np.zeros((512, 512), dtype=bool)
    mask[10:40, 20:50] = True
    return CascadeResult(score=score, positive=True, gated=True, mask=mask, probability_max=score, ood=ood)


@pytest.mark.parametrize("ceiling,expected", [(Priority.URGENT, Priority.URGENT), (Priority.ROUTINE, Priority.ROUTINE),
                                              (Priority.STAT, Priority.STAT)])
def test_an_out_of_distribution_film_is_capped_at_the_ceiling(ceiling, expected):
    bands = PriorityBands(ood_ceiling=ceiling)
    flagged = build_finding(film(), result(Ood(40.0, 15.9)), 0.5, bands)
    assert flagged.priority == expected and OOD in flagged.warnings and flagged.needs_review
    within = build_finding(film(), result(Ood(9.0, 15.9)), 0.5, bands)
    assert within.priority == Priority.STAT and OOD not in within.warnings and not within.needs_review
    assert within.to_json("none")["ood"] == {"distance": 9.0, "threshold": 15.9, "flag": False}


def test_no_description_answers_ood_null_and_is_not_counted():
    finding = build_finding(film(), result(None), 0.5, PriorityBands())
    assert finding.to_json("none")["ood"] is None and not finding.needs_review and finding.priority == Priority.STAT

    class Registry:  # a unit test of the counting rule; the family itself is metrics.py's
        ood = metrics().findings.__class__("ptx_test_ood", "test", ["flag"], registry=None)

    count_ood(Registry, finding)
    count_ood(Registry, build_finding(film(), result(Ood(40.0, 15.9)), 0.5, PriorityBands()))
    count_ood(Registry, build_finding(film(), result(Ood(1.0, 15.9)), 0.5, PriorityBands()))
    assert Registry.ood.labels(flag="out")._value.get() == 1 and Registry.ood.labels(flag="in")._value.get() == 1
