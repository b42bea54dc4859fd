"""Hand-computed tests of the cascade evaluation report: numbers, JSON, Markdown and figures.

The main case has 10 images with scores and labels small enough to count by hand (see `_ten`); every
expected value below is derived in the comments, not copied from a run.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.models.thresholds import TripletThreshold
from training.cascade_outputs import CascadeOutputs
from training.report import select_examples, summarise, wilson_interval, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _mask(rows: slice, cols: slice, shape: tuple[int, int] = (4, 4)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows, cols] = True
    return mask


EMPTY = np.zeros((4, 4), dtype=bool)
A = _mask(slice(0, 2), slice(0, 2))  # 4 px
B = _mask(slice(0, 2), slice(1, 3))  # 4 px, 2 shared with A: Dice 0.5
WIDE = _mask(slice(0, 2), slice(0, 4))  # 8 px containing A: Dice 2*4/12 = 2/3

# Positives are images 0-3, negatives 4-9.
LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
SCORES = np.array([0.9, 0.8, 0.55, 0.3, 0.7, 0.4, 0.2, 0.1, 0.05, 0.6])
GATED = np.array([True, True, True, False, True, True, False, False, False, True])
TRUE = [A, A, A, A] + [EMPTY] * 6
PRED = [B, A, EMPTY, WIDE, A] + [EMPTY] * 5  # Dice 0.5, 1, 0, 2/3 | 0, then 1 on five negatives


def _ten(**overrides: object) -> CascadeOutputs:
    fields: dict[str, object] = dict(
        image_ids=[f"im{i}" for i in range(10)],
        labels=LABELS,
        scores=SCORES,
        classifier_scores=SCORES,
        gated=GATED,
        masks_true=TRUE,
        masks_pred=PRED,
        threshold=0.5,
        gate_threshold=0.35,
        triplet=TripletThreshold(0.7, 10, 0.3),
        info={"score_definition": "Probability of pneumothorax from the classifier.", "seed": np.int64(7)},
    )
    fields.update(overrides)
    return CascadeOutputs(**fields)  # type: ignore[arg-type]


def test_triage_numbers_by_hand() -> None:
    s = summarise(_ten())
    # Positive > negative pairs: 0.9 and 0.8 beat all 6, 0.55 beats 4, 0.3 beats 3 -> 19 of 24.
    assert s["triage"]["auc"] == pytest.approx(19 / 24)
    assert "classifier_auc" not in s["triage"]  # classifier scores equal the triage scores
    op = s["triage"]["operating_point"]
    # score >= 0.5 flags 0.9, 0.8, 0.55 (positives) and 0.7, 0.6 (negatives).
    assert (op["tp"], op["fp"], op["tn"], op["fn"]) == (3, 2, 4, 1)
    assert op["sensitivity"] == pytest.approx(3 / 4)
    assert op["specificity"] == pytest.approx(4 / 6)
    assert op["precision"] == pytest.approx(3 / 5)
    assert op["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))
    assert op["f2"] == pytest.approx(5 * 3 / (5 * 3 + 4 * 1 + 2))
    assert op["flagged_share"] == pytest.approx(5 / 10)
    assert op["target_sensitivity"] == 0.95
    lo, hi = op["sensitivity_ci95"]
    assert lo < 3 / 4 < hi
    assert s["counts"] == {
        "images": 10, "positives": 4, "negatives": 6, "prevalence": 0.4,
        "positive_masks": 4, "label_mask_disagreements": 0,
    }


def test_classifier_auc_reported_when_it_differs() -> None:
    classifier = SCORES.copy()
    classifier[3] = 0.99  # the weakest positive now outranks every negative: 19 + 3 = 22 of 24
    s = summarise(_ten(classifier_scores=classifier))
    assert s["triage"]["classifier_auc"] == pytest.approx(22 / 24)
    assert s["triage"]["auc"] == pytest.approx(19 / 24)


def test_gate_numbers_by_hand() -> None:
    gate = summarise(_ten())["gate"]
    # Gated: positives 0, 1, 2 (not 3) and negatives 4, 5, 9.
    assert gate["sensitivity"] == pytest.approx(3 / 4)
    assert gate["gated"] == 6
    assert gate["gated_share"] == pytest.approx(0.6)
    assert gate["saved_share"] == pytest.approx(0.4)
    assert gate["positives_not_gated"] == 1
    assert gate["negatives_gated"] == 3
    assert gate["threshold"] == 0.35


def test_calibration_when_every_image_has_its_own_bin() -> None:
    cal = summarise(_ten())["calibration"]
    # One image per bin, so ECE is the mean |score - label|: (0.1+0.2+0.45+0.7 + 0.7+0.4+0.2+0.1+0.05+0.6)/10.
    assert cal["ece"] == pytest.approx(3.5 / 10)
    assert [row["count"] for row in cal["table"]] == [1] * 10


def test_calibration_with_shared_bins() -> None:
    scores = np.array([0.12, 0.18, 0.95, 1.0])
    labels = np.array([0, 1, 1, 1])
    masks = [EMPTY, A, A, A]
    out = CascadeOutputs(
        ["a", "b", "c", "d"], labels, scores, scores, scores > 0.5, masks, masks, 0.5, 0.5, TripletThreshold()
    )
    cal = summarise(out)["calibration"]
    table = cal["table"]
    assert len(table) == 10
    # Bin [0.1, 0.2): mean 0.15, rate 1/2; last bin holds 0.95 and 1.0 (closed): mean 0.975, rate 1.
    assert (table[1]["count"], table[1]["mean_score"], table[1]["positive_rate"]) == (2, pytest.approx(0.15), 0.5)
    assert (table[9]["count"], table[9]["mean_score"], table[9]["positive_rate"]) == (2, pytest.approx(0.975), 1.0)
    assert table[0]["count"] == 0 and table[0]["mean_score"] is None and table[0]["positive_rate"] is None
    assert cal["ece"] == pytest.approx((2 * 0.35 + 2 * 0.025) / 4)


def test_dice_by_hand_with_and_without_tta() -> None:
    s = summarise(_ten(masks_pred_no_tta=[EMPTY] * 10))
    cascade = s["segmentation"]["cascade"]
    positives = [0.5, 1.0, 0.0, 2 / 3]
    assert cascade["mean_dice"] == pytest.approx((sum(positives) + 0.0 + 5 * 1.0) / 10)
    assert cascade["mean_dice_positive"] == pytest.approx(sum(positives) / 4)
    assert cascade["mean_dice_negative"] == pytest.approx(5 / 6)
    assert cascade["positive_zero_share"] == pytest.approx(1 / 4)
    # Sorted positives 0, 0.5, 2/3, 1: the median averages the middle two; q0.25 sits 3/4 of the way to 0.5.
    assert cascade["positive_quantiles"]["0.5"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert cascade["positive_quantiles"]["0.25"] == pytest.approx(0.75 * 0.5)
    no_tta = s["segmentation"]["cascade_no_tta"]
    # Empty predictions: 0 on the 4 positives, 1 on the 6 negatives.
    assert no_tta["mean_dice"] == pytest.approx(0.6)
    assert no_tta["mean_dice_positive"] == 0.0
    assert no_tta["positive_zero_share"] == 1.0
    assert s["segmentation"]["tta_gain"] == pytest.approx(cascade["mean_dice"] - 0.6)


def test_no_tta_block_omitted_when_not_given() -> None:
    seg = summarise(_ten())["segmentation"]
    assert set(seg) == {"cascade"}


def test_single_class_gives_undefined_not_zero() -> None:
    negatives = [EMPTY] * 10
    s = summarise(_ten(labels=np.zeros(10, dtype=int), masks_true=negatives))
    assert s["triage"]["auc"] is None
    assert s["triage"]["operating_point"]["sensitivity"] is None
    assert s["triage"]["operating_point"]["sensitivity_ci95"] is None
    assert s["gate"]["sensitivity"] is None
    assert s["segmentation"]["cascade"]["mean_dice_positive"] is None
    assert s["segmentation"]["cascade"]["positive_quantiles"] is None
    json.dumps(s, allow_nan=False)


def test_label_mask_disagreement_is_counted() -> None:
    truths = list(TRUE)
    truths[3] = EMPTY  # image 3 is labelled positive but its mask vanished
    s = summarise(_ten(masks_true=truths))
    assert s["counts"]["label_mask_disagreements"] == 1
    assert s["counts"]["positive_masks"] == 3


def test_wilson_interval_matches_the_textbook_value() -> None:
    # 5/10: centre (0.5 + 1.92/10)/(1 + 3.84/10) = 0.5, half-width 1.96/1.384 * sqrt(0.025 + 0.0096) = 0.2634.
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) is None


def test_select_examples_by_outcome() -> None:
    out = _ten()
    # Flagged TPs 0, 1, 2 with Dice 0.5, 1, 0 -> best first: 1, 0, 2. FN: 3. FPs by score: 4 (0.7), 9 (0.6).
    assert select_examples(out, per_kind=3) == {"true_positive": [1, 0, 2], "false_negative": [3],
                                                "false_positive": [4, 9]}
    # Two per kind: the best and the worst true positive.
    assert select_examples(out, per_kind=2)["true_positive"] == [1, 2]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"labels": LABELS[:9]}, "labels has 9"),
        ({"labels": np.array([2] + [0] * 9)}, "labels must be 0 or 1"),
        ({"scores": np.r_[SCORES[:9], 1.5]}, "scores must be"),
        ({"gated": GATED.astype(int)}, "gated must be a bool"),
        ({"masks_pred": [np.zeros((4, 5), bool)] + PRED[1:]}, r"masks_pred\[0\]"),
        ({"masks_pred_no_tta": [EMPTY] * 9}, "masks_pred_no_tta has 9"),
        ({"threshold": math.nan}, "threshold must be"),
        ({"target_sensitivity": 1.5}, "target_sensitivity"),
        ({"triplet": (0.7, 10, 0.3)}, "TripletThreshold"),
    ],
)
def test_invalid_outputs_rejected(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _ten(**overrides)


def test_unserialisable_info_rejected() -> None:
    with pytest.raises(TypeError, match=r"info\.model"):
        summarise(_ten(info={"model": object()}))


def test_summarise_needs_no_matplotlib() -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from tests.training.test_report import _ten\n"
        "from training.report import summarise\n"
        "print(summarise(_ten())['triage']['auc'])\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) == pytest.approx(19 / 24)


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    """Radiograph-like test images (smooth shading plus noise), the hard case for PNG size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:300, :300]
    return [np.clip(0.5 + 0.3 * np.sin(xx / 20 + i) + 0.08 * rng.standard_normal((300, 300)), 0, 1) for i in range(n)]


def _check_report(out_dir: Path, summary: dict, md_path: Path, json_path: Path) -> tuple[str, list[Path]]:
    assert json.loads(json_path.read_text(encoding="utf-8")) == summary
    markdown = md_path.read_text(encoding="utf-8")
    pngs = sorted(out_dir.glob("*.png"))
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(png) as image:
            image.verify()
        assert png.stat().st_size < 150_000, png
        assert f"]({png.name})" in markdown  # linked and embedded by name
    return markdown, pngs


def test_write_report_with_tta_and_images(tmp_path: Path) -> None:
    out = _ten(masks_pred_no_tta=[EMPTY] * 10, images=_images(10))
    summary = summarise(out)
    json_path, md_path = write_report(out, summary, tmp_path / "report", "Held-out evaluation")
    markdown, pngs = _check_report(tmp_path / "report", summary, md_path, json_path)
    assert {p.name for p in pngs} == {"roc.png", "reliability.png", "dice_histogram.png", "examples.png"}
    with Image.open(tmp_path / "report" / "examples.png") as grid:
        # At most 3 tiles of <= 256 px across (plus margins), 3 outcome rows.
        assert grid.width <= 3 * 256 + 100 and grid.height <= 3 * 256 + 150
    assert markdown.startswith("# Held-out evaluation\n")
    assert "Probability of pneumothorax from the classifier." in markdown
    assert "Cascade without TTA" in markdown and "Cascade (hflip TTA)" in markdown
    assert "at least 0.5" in markdown and "95.0 %" in markdown
    assert "at least 10 pixels exceed 0.7" in markdown and "above 0.3" in markdown


def test_write_report_without_tta_or_images(tmp_path: Path) -> None:
    out = _ten()
    summary = summarise(out)
    json_path, md_path = write_report(out, summary, tmp_path, "Plain cascade")
    markdown, pngs = _check_report(tmp_path, summary, md_path, json_path)
    assert {p.name for p in pngs} == {"roc.png", "reliability.png", "dice_histogram.png"}
    assert "examples.png" not in markdown
    assert "TTA" not in markdown


def test_write_report_single_class_draws_no_roc(tmp_path: Path) -> None:
    out = _ten(labels=np.zeros(10, dtype=int), masks_true=[EMPTY] * 10, info={})
    summary = summarise(out)
    json_path, md_path = write_report(out, summary, tmp_path, "Negatives only")
    markdown, pngs = _check_report(tmp_path, summary, md_path, json_path)
    assert "roc.png" not in {p.name for p in pngs} and "roc.png" not in markdown
    assert "Triage AUC | n/a" in markdown
    assert "no `info['score_definition']`" in markdown
