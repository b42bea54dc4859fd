"""Issue 16's ablation: the auxiliary head's evidence (training/aux_evidence.py), the report of every score's
figures (training/fusion_report.py) and its section of the report page (training/ablation_markdown.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.models.input_spec import InputSpec
from service.models.networks.classifier import Classifier
from training.ablation_markdown import ablation_section
from training.aux_evidence import aux_evidence, map_evidence
from training.fusion import Evidence
from training.fusion_report import fusion_report, sent


def test_map_evidence_on_a_known_map():
    logits = np.full((1, 16, 16), -60.0)  # sigmoid 0 everywhere ...
    logits[0, :4, :4] = 0.0  # ... but 16 pixels at 0.5, and one at 2
    logits[0, 0, 0] = 2.0
    evidence = map_evidence(logits, reference_size=32)  # a map pixel is 4 pixels of a 32² film
    area = (15 * 0.5 + 1 / (1 + np.exp(-2.0))) * 4
    np.testing.assert_allclose(evidence[0], [2.0, (2.0 + 15 * 0 - 48 * 60) / 64, np.log1p(area)], rtol=1e-9)
    with pytest.raises(ValueError, match="the head's map has 16 pixels, fewer than the 64 averaged"):
        map_evidence(np.zeros((1, 4, 4)))


def test_aux_evidence_needs_the_head(tmp_path):
    with pytest.raises(ValueError, match=r"no auxiliary segmentation head \(network.aux_segmentation: false\)"):
        aux_evidence(Classifier(18, width=8), [tmp_path / "film.dcm"], InputSpec(64, 0.5, 0.25, 1))
    torch.manual_seed(0)  # with the head, no films: an empty table of the three columns
    assert aux_evidence(Classifier(18, width=8, aux_segmentation=True), [], InputSpec(64, 0.5, 0.25, 1)).shape == (0, 3)


def test_sent_states_the_share_at_the_sites_prevalence():
    gated = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0], bool)
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    # 3 of 4 positives and 1 of 6 negatives: at 22 % prevalence 0.22 x 0.75 + 0.78 x 1/6
    assert sent(gated, labels, 0.22) == {"sensitivity": 0.75, "gated_share_at_prevalence": round(0.165 + 0.13, 4)}


def films(seed: int, count: int) -> tuple[Evidence, np.ndarray]:
    """Films whose auxiliary head knows what the classifier does not (so the ablation must show it)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(count) < 0.4).astype(int)
    scores = 1 / (1 + np.exp(-(rng.normal(size=count) + 1.0 * labels)))
    peaks = np.clip(rng.normal(0.3 + 0.3 * labels, 0.2), 0, 1)
    areas = np.where(peaks > 0.5, rng.integers(500, 20000, count), 0)
    aux = np.stack([rng.normal(size=count) + 2.5 * labels, rng.normal(size=count), rng.normal(size=count)], axis=1)
    return Evidence(scores, peaks, areas, np.full(count, 1024 * 1024), np.ones(count, bool), labels), aux


def test_the_report_ranks_the_evidence_and_its_page_checks_the_bars():
    (validation, aux_validation), (test, aux_test) = films(1, 500), films(2, 500)
    report = fusion_report(validation, test, 0.3, 0.45, aux_validation, aux_test, draws=50)
    rows = report["ablation"]
    assert list(rows) == ["classifier, calibrated", "segmenter evidence alone (gated films)",
                          "segmenter evidence alone (every film)", "classifier + segmenter (the fusion)",
                          "auxiliary-head evidence alone", "classifier + auxiliary head (gate candidate)",
                          "classifier + auxiliary head + segmenter (the candidate's gate)"]
    auc = {name: row["auc"]["value"] for name, row in rows.items()}
    assert auc["classifier + auxiliary head (gate candidate)"] > auc["classifier, calibrated"] + 0.05
    # calibrating the classifier is monotone: its AUC is the raw probability's
    assert auc["classifier, calibrated"] == report["raw_classifier"]["auc"]["value"]
    served_gate = rows["classifier, calibrated"]["gate"]
    assert served_gate == sent(test.classifier_scores >= 0.3, test.labels, 0.22) == report["raw_classifier"]["gate"]
    called = test.classifier_scores >= 0.45  # the served operating point is the classifier manifest's
    assert rows["classifier, calibrated"]["operating_point_from_validation"] == {
        "sensitivity": round(float(called[test.labels == 1].mean()), 4),
        "specificity": round(float((~called[test.labels == 0]).mean()), 4)}
    assert rows["segmenter evidence alone (every film)"]["gate"]["gated_share_at_prevalence"] == 1.0
    candidate = rows["classifier + auxiliary head (gate candidate)"]["gate"]
    assert candidate["gated_share_at_prevalence"] < served_gate["gated_share_at_prevalence"]
    low, high = rows["classifier, calibrated"]["specificity_at_0.95"]["ci95"]
    assert 0 <= low <= rows["classifier, calibrated"]["specificity_at_0.95"]["value"] <= high <= 1
    fitted_at = f"calibrated, at the validation films' prevalence ({validation.labels.mean():.2f})"
    assert set(report["reliability"]) == {"classifier probability (raw)", fitted_at,
                                          "calibrated and shifted to 0.22 (served)"}

    page = "\n".join(ablation_section(report))
    assert "| classifier + auxiliary head (gate candidate) | " in page
    best = max(auc, key=auc.get)
    assert f"* AUC ≥ 0.96: **{'met' if auc[best] >= 0.96 else 'not met'}** -- best: {auc[best]:.3f} ({best})" in page
    ece = rows["classifier, calibrated"]["ece_after_prior_shift"]
    verdict = "met" if ece <= 0.05 else "not met"
    assert f"* ECE of the served score ≤ 0.05: **{verdict}** -- served: {ece:.3f}" in page
    assert "| classifier, calibrated (served) | " in page and "| classifier + segmenter (the fusion) | " in page

    fused = fusion_report(validation, test, 0.3, 0.45, aux_validation, aux_test, draws=50, served="fused")
    assert fused["served"] == "classifier + segmenter (the fusion)"
    assert "the fusion, shifted to 0.22 (served)" in fused["reliability"]
    assert "calibrated and shifted to 0.22" in fused["reliability"]  # the calibration, no longer the served score
    page = "\n".join(ablation_section(fused))
    assert "| classifier + segmenter (the fusion) (served) | " in page and "| classifier, calibrated | " in page
    ece = fused["ablation"]["classifier + segmenter (the fusion)"]["ece_after_prior_shift"]
    assert f"served: {ece:.3f} (classifier + segmenter (the fusion))" in page
    with pytest.raises(ValueError, match="served must be one of"):
        fusion_report(validation, test, 0.3, 0.45, draws=10, served="classifier")
