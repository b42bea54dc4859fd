"""`python -m training cv`: the whole recipe -- every fold through every stage, thresholds chosen out of fold,
one ensemble exported, and that ensemble evaluated on the held-out films as the service runs it.

1. Stages are configs in order (e.g. siim-gpu.yaml → -1024 → -final); each fold's stage N starts from the
   same fold's stage N-1 run (`init_from`). Each (stage, fold) is exactly the run `python -m training train
   --config <stage> --fold K [--init-from <previous run>]` would make, in the same run folder: a finished run
   (`cascade.pt`) is loaded, an interrupted one resumes from its `last.pt`, so `cv` is resumable per fold and
   a fold trained by hand (or on another machine, with `--fold`) is picked up.
2. Checkpoints are selected inside each run (classifier: validation AUC; segmenter: SIIM mean Dice at 0.5
   over all its validation films, empty-empty = 1; best-k averaging); the fold's model is its last stage's.
3. Thresholds (operating point, gate, triplet) are chosen on out-of-fold predictions: each film of the
   training set scored by the one fold model that did not train on it (`training.choice`).
4. Export: one ONNX graph per role that runs every fold's model on the same batch and outputs the logit of
   their mean probability (`service.models.networks.ensemble`), so the service serves it unchanged; each
   model folder lists its members in `members.json` (fold, run key, stage runs, version), hashed in the
   manifest, and the films it was trained or tuned on (`training.films`).
5. The held-out films (`data.holdout`, set aside before the folds and never used for a choice) are
   evaluated through the service's in-process cascade; the report goes to `--report`, its headline figures
   into both manifests (`metrics.holdout`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.models.networks import ClassifierEnsemble, UNetEnsemble
from training import config as configs
from training.choice import FoldModels, choose
from training.data import HELD_OUT, CachedSet, Sample, build_cache, index_folder
from training.demo import export_cascade, headline
from training.evaluate import evaluate
from training.model_folder import attach, write_json
from training.runs import run_dir
from training.train import TrainedCascade, folds_of, load, train_cascade

MEMBERS_FILE = "members.json"
MEMBERS_ROLE = "members"
#: What `members.json` says the ensemble computes (the service's answer can quote it).
ENSEMBLE_RULE = ("mean probability: every member runs on the same batch; the output is the logit of the mean of "
                 "the members' sigmoid outputs")


@dataclass(frozen=True)
class Stage:
    """One stage of the recipe: its config and the data cache at its input size."""

    config: configs.TrainConfig
    cached: CachedSet


@dataclass(frozen=True)
class FoldRuns:
    """One fold through every stage: the run folder of each stage and the last stage's trained cascade."""

    fold: int
    runs: list[Path]
    trained: TrainedCascade


def cache_size(config: configs.TrainConfig) -> int:
    """One cache serves both models of a stage: the larger input size (the smaller model resizes from it)."""
    return max(config.classifier.input.size, config.segmenter.input.size)


def check_stages(stages: Sequence[configs.TrainConfig]) -> None:
    """Refuse stages that would split the films differently: every stage must hold out and fold the same."""
    if not stages:
        raise ValueError("cv needs at least one --config")
    first = stages[0]
    for number, stage in enumerate(stages[1:], start=2):
        for what, mine, theirs in (("seed", stage.seed, first.seed), ("data.folds", stage.data.folds, first.data.folds),
                                   ("data.holdout", stage.data.holdout, first.data.holdout)):
            if mine != theirs:
                raise ValueError(f"stage {number} ({stage.name}) has {what} {mine}, stage 1 ({first.name}) {theirs}: "
                                 "every stage must split the films the same way")
    names = [stage.name for stage in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must differ (they name the run folders), got {', '.join(names)}")


def load_configs(config_paths: Sequence[Path], only_folds: Sequence[int]) -> list[configs.TrainConfig]:
    """The stages' configs, checked against each other, with the files they name present and `only_folds`
    among their folds: every mistake is found before anything is cached or trained."""
    loaded = [configs.load(path) for path in config_paths]
    check_stages(loaded)
    for config in loaded:
        configs.check_files(config)
    count = loaded[0].data.folds
    wrong = [fold for fold in only_folds if not 0 <= fold < count]
    if wrong:
        raise ValueError(f"--fold {wrong[0]} is not one of the {count} folds (data.folds)")
    return loaded


def load_stages(loaded: Sequence[configs.TrainConfig], data: Path | None, cache: Path | None,
                progress: bool) -> tuple[list[Stage], list[Sample]]:
    """The stages with their caches (under `cache`, else each stage's data.cache), and the data set's samples."""
    samples = index_folder(data or Path(loaded[0].data.folder))
    stages = [Stage(config, build_cache(samples, cache_size(config), cache or Path(config.data.cache),
                                        progress=progress)) for config in loaded]
    return stages, samples


def stage_for_fold(config: configs.TrainConfig, fold: int, previous: Path | None) -> configs.TrainConfig:
    """`config` for fold `fold`, both models started from `previous` (the same fold's earlier stage run).

    `init_from` names the run's `cascade.pt`, not its folder, so the file's sha256 enters this run's identity:
    a stage 1 trained again gives stage 2 a new run folder instead of resuming one started from the old weights.
    """
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, fold=fold))
    if previous is None:
        return config
    start = str(previous / "cascade.pt")
    return dataclasses.replace(config, classifier=dataclasses.replace(config.classifier, init_from=start),
                               segmenter=dataclasses.replace(config.segmenter, init_from=start))


def train_fold(stages: Sequence[Stage], fold: int, work: Path, progress: bool) -> FoldRuns:
    """Fold `fold` through every stage; finished runs are loaded, interrupted ones resume."""
    previous: Path | None = None
    runs: list[Path] = []
    trained: list[TrainedCascade] = []
    for number, stage in enumerate(stages, start=1):
        config = stage_for_fold(stage.config, fold, previous)
        out = run_dir(work, config, stage.cached)
        if (out / "cascade.pt").is_file():
            print(f"fold {fold} stage {number} ({config.name}): finished run {out}", flush=True)
            trained.append(load(out / "cascade.pt", config))
        else:
            print(f"fold {fold} stage {number} ({config.name}): run folder {out}", flush=True)
            trained.append(train_cascade(config, stage.cached, out, progress=progress, stages=work))
        previous = out
        runs.append(out)
    return FoldRuns(fold, runs, trained[-1])


def members(folds: Sequence[FoldRuns], work: Path, version: str) -> dict[str, Any]:
    """`members.json`: what the ensemble computes and, per member, its fold, run key and stage runs."""
    return {"rule": ENSEMBLE_RULE, "members": [{
        "fold": fold.fold,
        "run_key": fold.runs[-1].name.rsplit("-", 1)[-1],
        "version": f"{version}+fold{fold.fold}",
        "runs": [str(run.relative_to(work)) for run in fold.runs],
        "validation": _finite(fold.trained.validation),
    } for fold in folds]}


def _finite(values: dict[str, float]) -> dict[str, float | None]:
    """Metrics for a manifest: an undefined (nan) figure is None, as the schema wants."""
    return {key: (None if isinstance(value, float) and math.isnan(value) else value) for key, value in values.items()}


def export_ensemble(folds: Sequence[FoldRuns], final: Stage, work: Path, models_root: Path, name: str,
                    command: str) -> dict[str, Path]:
    """Thresholds out of fold, both ensembles exported, `members.json` attached; returns the two folders."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fold_of = folds_of(final.config, final.cached)
    parts = [FoldModels(fold.trained.classifier.to(device), fold.trained.segmenter.to(device),
                        np.flatnonzero(fold_of == fold.fold)) for fold in folds]
    chosen = choose(parts, final.config, final.cached)
    print(f"out-of-fold: {chosen.validation}", flush=True)
    ensemble = TrainedCascade(ClassifierEnsemble([fold.trained.classifier for fold in folds]),
                              UNetEnsemble([fold.trained.segmenter for fold in folds]),
                              chosen.gate, chosen.operating_point, chosen.triplet, chosen.validation)
    listed = members(folds, work, final.config.version)
    metrics = {"out_of_fold": _finite(chosen.validation),
               "members": {f"fold{member['fold']}": member["validation"] for member in listed["members"]}}
    directories = export_cascade(ensemble, final.config, models_root, command, final.cached, name=name,
                                 metrics=metrics)
    for directory in directories.values():
        attach(directory, {MEMBERS_ROLE: write_json(directory, MEMBERS_FILE, listed)})
    return directories


def evaluate_holdout(directories: dict[str, Path], final: Stage, samples: Sequence[Sample], report: Path,
                     progress: bool) -> dict[str, Any] | None:
    """The exported ensemble on the held-out films, as the service runs it; None when nothing is held out."""
    held = [samples[index] for index in np.flatnonzero(folds_of(final.config, final.cached) == HELD_OUT)]
    if not held:
        print("no held-out films (data.holdout is 0): the ensemble is not evaluated", flush=True)
        return None
    positives = sum(sample.positive for sample in held)
    summary = evaluate(directories["classification"], directories["segmentation"], held, report,
                       f"Ensemble {final.config.name} {final.config.version} on its held-out films",
                       f"{len(held)} held-out films ({positives} positive) of {len(samples)}, seed "
                       f"{final.config.seed}, share {final.config.data.holdout}", progress=progress)
    for directory in directories.values():
        attach(directory, {}, metrics={"holdout": headline(summary)})
    return summary


def run_cv(config_paths: Sequence[Path], data: Path | None, cache: Path | None, work: Path, models_root: Path,
           report: Path | None, name: str | None, only_folds: Sequence[int], command: str,
           progress: bool = True) -> dict[str, Any]:
    """The recipe (see the module docstring). With `only_folds`, train those folds and stop (no export)."""
    loaded = load_configs(config_paths, only_folds)
    name = name or f"{loaded[-1].name}-ensemble"
    taken = [folder for role in ("classifier", "segmenter")
             if (folder := Path(models_root) / f"ptx-{role}-{name}" / loaded[-1].version).exists()]
    if taken and not only_folds:  # found now, not after hours of training
        raise ValueError(f"{taken[0]} already exists: a released model is never overwritten; pass another --name "
                         "or raise the last stage's version")
    stages, samples = load_stages(loaded, data, cache, progress)
    final = stages[-1]
    trained = [train_fold(stages, fold, work, progress) for fold in (only_folds or range(final.config.data.folds))]
    if only_folds:
        return {"folds": {fold.fold: [str(run) for run in fold.runs] for fold in trained}}
    directories = export_ensemble(trained, final, work, models_root, name, command)
    summary = evaluate_holdout(directories, final, samples, report or work / name / "holdout-report", progress)
    return {"models": {task: str(path) for task, path in directories.items()},
            "holdout": headline(summary) if summary else None}
