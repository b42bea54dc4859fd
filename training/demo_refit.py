"""`python -m training refit-demo`: the bundled demo classifier re-exported with its out-of-distribution
description and its triage score's calibration or fusion (issue 16), from its own weights and its own training
films.

    films of the demo's training set (a prefix: `synth --seed <training seed> --prevalence <training
    prevalence> --uncompressed`) → their folds (training/demo_split.py)
      training-fold films        → OOD mean and covariance (training/ood.py)
      validation-fold films      → OOD threshold; through the in-process cascade → the score (training/fusion.py):
                                   `--score fused` (the default, what the demo ships) the classifier's
                                   evidence fused with the segmenter's; `calibrated` the classifier's
                                   probability calibrated, its decisions kept; `classifier` neither. The gate
                                   moves up to the classifier's operating point in every case, before the
                                   evidence is collected
      the set's first 128 films  → INT8 calibration, as before (its fingerprint must match the manifest's)
    → training/reexport.py replaces the classifier folder (FP32, FP16, INT8, model.pt, manifest)

Never a test film. The segmenter is unchanged: it has no features and the fusion lives in the classifier's
manifest.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from service.models import manifest as manifests
from service.models.fusion import ScoreFusion, fused_probability, fusion_inputs
from training import config as configs
from training.data import index_siim
from training.demo_split import demo_split
from training.fusion import collect_evidence, fit_calibration, fit_fusion
from training.ood import OodFilms
from training.quantize import CALIBRATION_FILMS, calibration_batch, cascade_at
from training.reexport import reexport_classifier
from training.synth.dicom_writer import uid_for

SCORES = ("fused", "calibrated", "classifier")
Score = Literal["fused", "calibrated", "classifier"]


def require_segmented_positives(fusion: ScoreFusion, gate: float) -> None:
    """Refuse a fusion that would call positive a film the gate never sent to the segmenter.

    Below the gate a film has no segmenter evidence (peak 0, no instance), and its fused score rises with the
    classifier's probability, so the highest such score is at the gate: it must stay under the fusion's
    operating point, or a positive would come without a mask ever looked for. A calibration (the classifier's
    probability alone, its own operating point at or above the gate) meets this by construction.
    """
    if not fusion.uses_segmenter:
        return
    highest = fused_probability(fusion, fusion_inputs(gate, 0.0, 0, 1, fusion.area_reference_size))
    if not highest < fusion.operating_point:
        raise ValueError(f"the fused score of a film just below the gate ({gate:.4g}) with no segmenter evidence is "
                         f"{highest:.4g}, not below the fusion's operating point {fusion.operating_point:.4g}: films "
                         "never segmented would be called positive; keep --score calibrated")


def refit_demo(config_path: Path, models_root: Path, films_dir: Path, score: Score = "fused",
               threads: int = 0) -> dict[str, Any]:
    """Re-export the demo classifier (see the module docstring); returns what was fitted, for the log."""
    config = configs.load(config_path)
    classifier_dir = Path(models_root) / f"ptx-classifier-{config.name}" / config.version
    segmenter_dir = Path(models_root) / f"ptx-segmenter-{config.name}" / config.version
    old = manifests.load_manifest(classifier_dir)
    spec = manifests.input_spec(old)
    split = demo_split(config)
    samples = {sample.image_id: sample for sample in index_siim(films_dir)}
    paths = sorted(sample.path for sample in samples.values())
    first = {str(uid_for(config.seed, index, "sop")) for index in range(CALIBRATION_FILMS)}
    calibration_films = sorted((path for path in paths if path.stem in first), key=lambda path: path.name)
    if len(calibration_films) != CALIBRATION_FILMS:
        raise ValueError(f"{films_dir} holds {len(calibration_films)} of the set's first {CALIBRATION_FILMS} films: "
                         f"synthesise at least {CALIBRATION_FILMS} films of the training seed")
    calibration = calibration_batch(calibration_films, spec)
    int8 = old.export.int8
    calibration_description = (
        f"the first {CALIBRATION_FILMS} films of the demo's own training set (seed {config.seed}; its training and "
        f"validation folds, never the test set, seed {config.demo.eval_seed}): python -m training synth --out DIR "
        f"--count {CALIBRATION_FILMS} --seed {config.seed} --prevalence {config.demo.train_prevalence} "
        "--uncompressed, films in file-name order")
    train, validation = split.films(paths, "train"), split.films(paths, "validation")
    where = (f"among the first {len(paths)} films of the demo's training set (python -m training synth --count "
             f"{len(paths)} --seed {config.seed} --prevalence {config.demo.train_prevalence} --size "
             f"{config.demo.image_size} --uncompressed; folds as training/demo_split.py, fold {split.validation} "
             "validates)")
    ood = OodFilms(calibration_batch(train, spec), f"{len(train)} training-fold films {where}",
                   calibration_batch(validation, spec), f"{len(validation)} validation-fold films {where}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {list(SCORES)}, got {score!r}")
    # The gate at the classifier's operating point, for every score, and the evidence collected through it: a film
    # below it is negative by the classifier, and segmenting it only costs time (0.2.0 on the demo's test set: 48 % of
    # films sent at the training run's gate, chosen for sensitivity 0.975, against 33 % at the operating point, the
    # same 130 of 133 positives reaching the segmenter either way). A fusion fitted on evidence gathered through a
    # lower gate would meet zero segmenter evidence for films it had seen segmented (0.1.0's fusion, fitted so,
    # lost sensitivity: docs/models.md).
    gate = old.thresholds.operating_point
    fusion = None
    if score != "classifier":
        cascade = dataclasses.replace(cascade_at(classifier_dir, segmenter_dir, "fp32", threads), gate=gate)
        evidence = collect_evidence(cascade, validation, [int(bool(samples[path.stem].rles)) for path in validation])
        description = (f"{len(validation)} validation-fold films {where}, through the in-process cascade (FP32, hflip "
                       "TTA, the gate at the classifier's operating point, the manifests' triplet)")
        target = config.evaluation.target_sensitivity
        fusion = (fit_fusion(evidence, description, target) if score == "fused" else
                  fit_calibration(evidence, description, old.thresholds.operating_point, target))
        require_segmented_positives(fusion, gate)
    manifest = reexport_classifier(classifier_dir, calibration, calibration_description, ood, fusion, gate)
    # The same films; a different fingerprint says the service's preprocessing moved since (float rounding)
    same_inputs = int8 is not None and int8.calibration.fingerprint == manifest.export.int8.calibration.fingerprint
    return {"classifier": str(classifier_dir), "int8_calibration_inputs_unchanged": same_inputs,
            "ood_threshold": manifest.ood.threshold if manifest.ood else None, "gate": manifest.thresholds.gate,
            "fusion": None if manifest.fusion is None else manifest.fusion.model_dump(mode="json")}
