"""`python -m training refit-demo`: the bundled demo classifier re-exported with its out-of-distribution
description and its triage score's calibration or fusion (issue 16), from its own weights and its own training
films.

    films of the demo's training set (a prefix: `synth --seed <training seed> --prevalence <training
    prevalence> --uncompressed`) → their folds (training/demo_split.py)
      training-fold films        → OOD mean and covariance (training/ood.py)
      validation-fold films      → OOD threshold; through the in-process cascade → the score (training/fusion.py):
                                   `--score calibrated` (the default, what the demo ships) the classifier's
                                   probability calibrated, its decisions kept, and the gate moved up to the
                                   operating point; `fused` with the segmenter's evidence (the gate kept);
                                   `classifier` neither (the gate moved up)
      the set's first 128 films  → INT8 calibration, as before (its fingerprint must match the manifest's)
    → training/reexport.py replaces the classifier folder (FP32, FP16, INT8, model.pt, manifest)

Never a test film. The segmenter is unchanged: it has no features and the fusion lives in the classifier's
manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from service.models import manifest as manifests
from training import config as configs
from training.data import index_siim
from training.demo_split import demo_split
from training.fusion import collect_evidence, fit_calibration, fit_fusion
from training.ood import OodFilms
from training.quantize import CALIBRATION_FILMS, calibration_batch, cascade_at
from training.reexport import reexport_classifier
from training.synth.dicom_writer import uid_for

SCORES = ("calibrated", "fused", "classifier")
Score = Literal["calibrated", "fused", "classifier"]


def refit_demo(config_path: Path, models_root: Path, films_dir: Path, score: Score = "calibrated",
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
    fusion = None
    if score != "classifier":
        evidence = collect_evidence(cascade_at(classifier_dir, segmenter_dir, "fp32", threads), validation,
                                    [int(bool(samples[path.stem].rles)) for path in validation])
        description = (f"{len(validation)} validation-fold films {where}, through the in-process cascade (FP32, hflip "
                       "TTA, the manifests' gate and triplet)")
        target = config.evaluation.target_sensitivity
        fusion = (fit_fusion(evidence, description, target) if score == "fused" else
                  fit_calibration(evidence, description, old.thresholds.operating_point, target))
    # A score without the segmenter's evidence gates at its operating point: the gate exists to give the segmenter
    # the films a fusion might still call positive; with no fusion, a film below the operating point is called
    # negative whatever its mask, and segmenting it only costs time (0.2.0 on the demo's test set: 48 % of films
    # sent at the training run's gate, chosen for sensitivity 0.975, against 33 % at the operating point, the same
    # 130 of 133 positives reaching the segmenter either way).
    gate = old.thresholds.operating_point if fusion is None or not fusion.uses_segmenter else None
    manifest = reexport_classifier(classifier_dir, calibration, calibration_description, ood, fusion, gate)
    # The same films; a different fingerprint says the service's preprocessing moved since (float rounding)
    same_inputs = int8 is not None and int8.calibration.fingerprint == manifest.export.int8.calibration.fingerprint
    return {"classifier": str(classifier_dir), "int8_calibration_inputs_unchanged": same_inputs,
            "ood_threshold": manifest.ood.threshold if manifest.ood else None, "gate": manifest.thresholds.gate,
            "fusion": None if manifest.fusion is None else manifest.fusion.model_dump(mode="json")}
