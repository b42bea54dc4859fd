"""`python -m training demo-report` end to end on small sets: the bundled models' report with its section on what
the triage score is made of, the ablation fitted on validation-fold films of the demo's training set."""

from __future__ import annotations

import json

from tests.servers import REPO
from training.__main__ import main as training_main


def test_demo_report_writes_the_ablation_beside_the_report(tmp_path, realdata):
    """Needs the SIIM label file (`realdata`), as the demo's films are drawn with real lesion shapes."""
    films, test, report = tmp_path / "train-prefix", tmp_path / "test", tmp_path / "report"
    for out, count, seed, prevalence, extra in ((films, 80, 1, 0.5, ["--uncompressed"]), (test, 30, 31, 0.3, [])):
        assert training_main(["synth", "--out", str(out), "--count", str(count), "--seed", str(seed), "--prevalence",
                              str(prevalence), "--size", "256", "--quiet", "--workers", "1", *extra]) == 0
    assert training_main(["demo-report", "--films", str(films), "--test", str(test), "--report", str(report),
                          "--models", str(REPO / "models"), "--quiet"]) == 0
    summary = json.loads((report / "report.json").read_text())
    ablation = summary["score_ablation"]
    assert ablation["test_films"] == 30 and 8 <= ablation["validation_films"] <= 30
    assert "classifier + auxiliary head (gate candidate)" in ablation["ablation"]
    # the bundled classifier's manifest holds the fusion with the segmenter's evidence: the report says so and marks
    # it as the served row; the calibration alone ranks the films as the classifier's probability does
    assert ablation["served"] == "classifier + segmenter (the fusion)"
    calibrated = ablation["ablation"]["classifier, calibrated"]["auc"]["value"]
    assert abs(calibrated - ablation["raw_classifier"]["auc"]["value"]) < 1e-3
    page = (report / "report.md").read_text()
    assert "## What the triage score is made of (issue 16)" in page
    assert "The triage score is the calibrated fusion of the classifier's probability" in page
    assert "| classifier + segmenter (the fusion) (served) | " in page
    assert "30 synthetic films, seed 31, prevalence 0.3, 256 px" in page
