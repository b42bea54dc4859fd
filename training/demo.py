"""`python -m training demo`: the bundled demo models, end to end, on a 2-core CPU.

synthetic training set → cache → classifier, then segmenter (encoder from the classifier) → thresholds on
the validation fold → ONNX + FP16 + INT8 + manifests in `models/` → the classifier refitted with its OOD
description and a score fused with the segmenter's evidence (training/demo_refit.py) → a separately seeded
synthetic test set at the generator's default (realistic) difficulty → the cascade evaluated as the service runs
it, with the score's ablation → report (training/demo_report.py).

Why refit and report here and not as later commands: the bundled models and docs/demo-report are then what this
one command makes (`make models`), so nobody has to know the order of three commands to reproduce them.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from service.cascade.preprocess import to_batch
from service.models.manifest import load_manifest, write_manifest
from training import config as configs
from training import films
from training.choice import REFERENCE_SIZE
from training.data import HELD_OUT, CachedSet, build_cache, index_siim
from training.demo_refit import refit_demo
from training.demo_report import demo_report
from training.export import export_model
from training.model_folder import attach
from training.quantize import CALIBRATION_FILMS
from training.runs import run_dir
from training.synth.generate import SynthConfig, default_shapes_path
from training.synth.generate import run as synthesise
from training.tasks import input_spec
from training.train import TrainedCascade, folds_of, train_cascade

REPO_ROOT = Path(__file__).resolve().parents[1]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _synth(out: Path, count: int, seed: int, prevalence: float, size: int, uncompressed: bool, progress: bool) -> None:
    if (out / "train-rle.csv").is_file():
        return  # generation is deterministic for its parameters; the folder name carries them
    shapes = default_shapes_path(REPO_ROOT)
    # every core: the films are the same whatever the worker count (training/synth/generate.py)
    synthesise(SynthConfig(out=out, count=count, seed=seed, prevalence=prevalence, size=size,
                           uncompressed=uncompressed, shapes=shapes if shapes.is_file() else None,
                           workers=os.cpu_count() or 1),
               progress=progress)


def run_demo(config_path: Path, models_root: Path, work_dir: Path, report_dir: Path, command: str,
             progress: bool = True) -> dict[str, Any]:
    """Train, export and evaluate; returns the evaluation summary (also written beside the models)."""
    started = time.monotonic()
    config = configs.load(config_path)
    demo = config.demo
    work_dir = Path(work_dir)
    train_dir = work_dir / f"train-{demo.train_images}-s{config.seed}-p{demo.train_prevalence}-{demo.image_size}"
    eval_dir = work_dir / f"eval-{demo.eval_images}-s{demo.eval_seed}-p{demo.eval_prevalence}-{demo.image_size}"
    _synth(train_dir, demo.train_images, config.seed, demo.train_prevalence, demo.image_size, True, progress)
    _synth(eval_dir, demo.eval_images, demo.eval_seed, demo.eval_prevalence, demo.image_size, False, progress)
    timings = {"synthesis_s": time.monotonic() - started}

    cached = build_cache(index_siim(train_dir), demo.cache_size, work_dir / "cache", progress=progress)
    timings["cache_s"] = time.monotonic() - started - timings["synthesis_s"]
    runs = work_dir / "runs"
    trained = train_cascade(config, cached, run_dir(runs, config, cached), progress=progress, stages=runs)
    timings["training_s"] = sum(fit.seconds for fit in trained.fits.values())

    directories = export_cascade(trained, config, Path(models_root), command, cached)
    # What ships is the refitted classifier (OOD description, fused score: issue 16), so the report is of it
    refit_demo(config_path, models_root, train_dir)
    summary = demo_report(config_path, models_root, train_dir, eval_dir, report_dir, progress=progress)
    timings["total_s"] = time.monotonic() - started
    for directory in directories.values():
        manifest = load_manifest(directory)
        metrics = {**manifest.metrics, "test": headline(summary), "timings": timings}
        write_manifest(manifest.model_copy(update={"metrics": metrics}), directory)
    return {"summary": summary, "timings": timings, "models": {k: str(v) for k, v in directories.items()}}


def export_cascade(trained: TrainedCascade, config: configs.TrainConfig, models_root: Path, command: str,
                   cached: CachedSet, name: str | None = None,
                   metrics: dict[str, Any] | None = None) -> dict[str, Path]:
    """Both models into `models_root/ptx-<role>-<name>/<version>/` with manifests; returns the two directories.

    `name` defaults to the config's; `metrics` to the run's validation figures and fits. Each folder also
    records the films the models were trained or tuned on (`training.films`: every film not held out).
    """
    training_info = {"command": command, "config": json.loads(json.dumps(configs.to_dict(config))),
                     "seed": config.seed, "data_fingerprint": cached.directory.name, "git_commit": _git_commit()}
    common = {"version": config.version, "training_info": training_info, "intended_use": config.intended_use,
              "created": datetime.date.today().isoformat()}
    if metrics is None:
        metrics = {"validation": trained.validation,
                   "fits": {role: {"best": fit.best_metric, "final": fit.final_metric, "epochs": fit.epochs,
                                   "images_seen": fit.images_seen, "seconds": round(fit.seconds, 1),
                                   "top_k_average_kept": fit.averaged}
                            for role, fit in trained.fits.items()}}
    seen = [image_id for image_id, fold in zip(cached.image_ids, folds_of(config, cached), strict=True)
            if fold != HELD_OUT]
    real = np.asarray(cached.images[:4], dtype=np.float32)
    # INT8 ranges from training films only (never held-out or test films): the first CALIBRATION_FILMS seen
    tuning = [i for i, fold in enumerate(folds_of(config, cached)) if fold != HELD_OUT][:CALIBRATION_FILMS]
    films_in = np.asarray([cached.images[i] for i in tuning], dtype=np.float32)
    calibrated = (f"{len(tuning)} training films of the cache {cached.directory.name} (seed {config.seed}; "
                  "training and validation folds, never held-out or test films)")
    directories = {}
    for task, model, model_config, thresholds in (
        ("classification", trained.classifier, config.classifier,
         {"gate": trained.gate, "operating_point": trained.operating_point}),
        ("segmentation", trained.segmenter, config.segmenter,
         {"triplet": {"top_score": trained.triplet.top_score, "min_area": trained.triplet.min_area,
                      "bottom_score": trained.triplet.bottom_score},
          "min_area_reference_size": REFERENCE_SIZE}),
    ):
        spec = input_spec(model_config)
        model_name = f"ptx-{'classifier' if task == 'classification' else 'segmenter'}-{name or config.name}"
        out = models_root / model_name / config.version
        # the service's own preprocessing: a 512 px cache serves the 512 px classifier and, resized, the 256 px
        # segmenter (as RadiographDataset resizes it for training), so every model gets real and INT8 inputs
        export_model(model.cpu().eval(), out, name=model_name, task=task, input_spec=spec, thresholds=thresholds,
                     metrics=metrics, real_inputs=to_batch(real, spec), calibration_inputs=to_batch(films_in, spec),
                     calibration_description=calibrated, **common)
        attach(out, {films.ROLE: films.write_record(out, seen)})
        directories[task] = out
    return directories


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The figures the acceptance bar reads, copied into both manifests."""
    triage, segmentation = summary["triage"], summary["segmentation"]["cascade"]
    return {"triage_auc": triage["auc"], "operating_point": triage["operating_point"],
            "siim_mean_dice": segmentation["mean_dice"], "dice_positive": segmentation["mean_dice_positive"]}
