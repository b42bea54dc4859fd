"""The demo models committed in models/: loadable through their manifests, and still doing their job.

They are re-evaluated on a freshly generated synthetic set (a seed used neither for training nor for the committed
report), through the same Cascade the service runs. The bounds sit below the committed report's figures (0.2.0 with
its fused score: AUC 0.984, specificity 0.897 at the operating point, 33 % of films gated, Dice on positives 0.588
on 600 films) to allow the sampling noise of 80 films, and far above what a broken model gives (AUC 0.5; Dice on
positives 0 for an empty answer) and above what 0.1.0 gave (AUC 0.901, specificity 0.328, 86 % gated).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from service.imaging.reader import read_radiograph
from service.models.manifest import find_models
from tests.servers import REPO
from training.__main__ import main as training_main
from training.data import index_siim
from training.evaluate import load_cascade, run
from training.metrics import mean_dice_positive, roc_auc

MODELS = REPO / "models"


def test_bundled_manifests_are_valid_and_say_demo():
    models = {manifest.task: (path, manifest) for path, manifest in find_models(MODELS)}  # verifies sha256
    assert set(models) == {"classification", "segmentation"}
    for _, manifest in models.values():
        assert "not for clinical use" in manifest.intended_use
        assert manifest.export.max_abs_error <= manifest.export.tolerance * 10
        int8 = manifest.export.int8  # the INT8 file is listed, hashed, and says what calibrated it
        assert manifest.files["onnx_int8"] == "model.int8.onnx" and int8 is not None
        assert int8.calibration.films >= 64 and "training" in int8.calibration.description
        assert "(seed 1" in int8.calibration.description  # the training seed; never the test set's
        assert int8.mean_abs_error <= int8.tolerance
    classifier = models["classification"][1]  # issue 16: features output, OOD description and score calibration
    assert classifier.outputs == ["logit", "features"] and classifier.ood is not None
    assert "training-fold films" in classifier.ood.fitted_on and "validation-fold" in classifier.ood.threshold_on
    # The demo ships the classifier's evidence fused with the segmenter's (training/demo_refit.py), fitted on films
    # gated at the classifier's operating point; a film below that gate has no segmenter evidence and the fusion
    # calls it negative (checked at the fit, and on films below)
    fusion = classifier.fusion
    assert fusion is not None and fusion.uses_segmenter and "validation-fold films" in fusion.fitted_on
    assert "the gate at the classifier's operating point" in fusion.fitted_on
    assert classifier.thresholds.gate == classifier.thresholds.operating_point
    total = sum(f.stat().st_size for f in MODELS.rglob("*") if f.is_file())
    assert total <= 25 * 1024 * 1024, f"bundled models take {total / 2**20:.1f} MB; the limit is 25 MB"


def test_bundled_cascade_on_fresh_synthetic_films(tmp_path, realdata):
    """Needs the SIIM label file (`realdata`): the demo models were trained on real SIIM lesion shapes."""
    data = tmp_path / "fresh"
    assert training_main(["synth", "--out", str(data), "--count", "80", "--seed", "424242", "--prevalence", "0.3",
                          "--uncompressed", "--quiet"]) == 0
    models = {manifest.task: path for path, manifest in find_models(MODELS)}
    cascade, _ = load_cascade(models["classification"], models["segmentation"])
    outputs, _ = run(cascade, index_siim(data), progress=False)
    # 0.2.0 here (fused score): AUC 0.999, Dice on positives 0.552, 50 % gated (at prevalence 0.3); 0.1.0's
    # classifier (AUC 0.90, specificity 0.33, 86 % gated on 600 films) fails these bounds
    flagged = outputs.scores >= outputs.threshold
    specificity = np.mean(~flagged[outputs.labels == 0])
    assert roc_auc(outputs.scores, outputs.labels) >= 0.95
    assert specificity >= 0.6 and np.mean(outputs.gated) <= 0.65, (specificity, np.mean(outputs.gated))
    assert mean_dice_positive(outputs.masks_pred, outputs.masks_true) >= 0.35
    # the fused score flags only films the gate sent to the segmenter (the classifier's own positives), never one
    # it did not look at; and the films it flags do not depend on the site's prevalence (0.22 or 0.05)
    own = outputs.classifier_scores >= cascade.operating_point
    assert flagged.any() and not own.all()
    np.testing.assert_array_equal(outputs.gated, own)
    assert not (flagged & ~outputs.gated).any()
    low = dataclasses.replace(cascade, prevalence=0.05).run([read_radiograph(s.path).pixels for s in index_siim(data)])
    np.testing.assert_array_equal([result.positive for result in low], flagged)
    assert np.mean([result.score for result in low]) < np.mean(outputs.scores)  # a rarer disease: lower probabilities


def test_bundled_cascade_on_the_real_films(realdata):
    """Real CR/DX films of other sizes run through (no claim of accuracy: the models never saw a real film)."""
    models = {manifest.task: path for path, manifest in find_models(MODELS)}
    cascade, _ = load_cascade(models["classification"], models["segmentation"])
    films = [read_radiograph(path).pixels for path in sorted((realdata / "chest").glob("*.dcm"))]
    results = cascade.run(films)
    for film, result in zip(films, results):
        assert 0.0 <= result.score <= 1.0
        assert result.mask.shape == film.shape
        assert result.gated == (result.classifier_score >= cascade.gate)  # the gate reads the classifier alone
