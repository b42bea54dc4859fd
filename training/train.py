"""Train the cascade on one fold split, and choose its thresholds on the validation fold.

Thresholds are searched on validation data, never on the test set or the held-out films, and written into
the manifests (operating point, gate and triplet: see `training.choice`). Held-out films (`data.holdout`)
are in neither the training nor the validation part of any fold.

Under `torchrun` every process runs this (`training.distributed`): each trains its share of every batch,
and process 0 alone writes the split and the saved run.

The segmenter's epochs are selected by SIIM mean Dice at 0.5 over *all* validation films (empty-empty = 1):
it trains on negatives too, and a model that paints lesions on them must not win on positives alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from service.models.thresholds import TripletThreshold
from training import augment, distributed
from training.choice import FoldModels, choose
from training.config import TrainConfig
from training.data import HELD_OUT, CachedSet, assign_folds, write_folds
from training.datasets import RadiographDataset
from training.runs import init_from_run, linked_stage, stage_dir, stage_identity
from training.tasks import (
    build_classifier,
    build_segmenter,
    classifier_task,
    input_spec,
    segmenter_task,
)
from training.trainer import FitResult, fit, seed_everything


@dataclass
class TrainedCascade:
    classifier: torch.nn.Module
    segmenter: torch.nn.Module
    gate: float
    operating_point: float
    triplet: TripletThreshold  # min_area at REFERENCE_SIZE²
    validation: dict[str, float] = field(default_factory=dict)
    fits: dict[str, FitResult] = field(default_factory=dict)


def folds_of(config: TrainConfig, cached: CachedSet) -> np.ndarray:
    """Fold per film (`HELD_OUT` for the held-out share): seeded, stratified, patient-grouped."""
    return assign_folds(cached.labels, cached.groups, config.data.folds, config.seed, config.data.holdout)


def split(config: TrainConfig, cached: CachedSet, out_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) positions of the fold, held-out films in neither (the split goes to folds.csv)."""
    folds = folds_of(config, cached)
    if distributed.world().is_main:
        write_folds(out_dir / "folds.csv", cached.image_ids, folds, config.seed)
    fold = config.data.fold
    return np.flatnonzero((folds != fold) & (folds != HELD_OUT)), np.flatnonzero(folds == fold)


def train_cascade(config: TrainConfig, cached: CachedSet, out_dir: Path, progress: bool = True,
                  stages: Path | None = None) -> TrainedCascade:
    """Both stages of a run into `out_dir` (folds.csv, cascade.pt). Each stage's checkpoints go to its own folder
    under `stages` (`training.runs.stage_dir`: a stage another run already trained is reused), or, without
    `stages`, to `out_dir/classifier` and `out_dir/segmenter`; each is checked against the stage's identity."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_idx, val_idx = split(config, cached, out_dir)

    def where(stage: str) -> Path:
        return out_dir / stage if stages is None else linked_stage(out_dir, stage_dir(stages, config, cached, stage))

    cls = config.classifier
    cls_spec = input_spec(cls)
    cls_val = RadiographDataset(cached, val_idx, cls_spec)
    # Seeded before it is built: PyTorch seeds its generator at random per process, so an unseeded build made
    # a run's starting weights depend on the process (fold 0 of `cv` came out different every time).
    seed_everything(config.seed)
    classifier = build_classifier(cls)
    if cls.init_from:
        init_from_run(classifier, cls.init_from, "classifier")
    cls_fit = fit(classifier, classifier_task(cls, cls_val),
                  RadiographDataset(cached, train_idx, cls_spec,
                                    augment.build(cls.augment, cls_spec.size, config.seed)),
                  cls, where("classifier"), config.seed, progress=progress,
                  identity=stage_identity(config, cached, "classifier"))

    seg = config.segmenter
    seg_spec = input_spec(seg)
    seg_val = RadiographDataset(cached, val_idx, seg_spec)
    seed_everything(config.seed + 1)
    segmenter = build_segmenter(seg)
    if seg.network.encoder_from_classifier:
        segmenter.encoder.load_state_dict(classifier.encoder.state_dict())
    if seg.init_from:
        init_from_run(segmenter, seg.init_from, "segmenter")
    seg_fit = fit(segmenter, segmenter_task(seg, seg_val),
                  RadiographDataset(cached, train_idx, seg_spec,
                                    augment.build(seg.augment, seg_spec.size, config.seed + 1)),
                  seg, where("segmenter"), config.seed + 1, progress=progress,
                  identity=stage_identity(config, cached, "segmenter"))

    trained = TrainedCascade(classifier, segmenter, 0.5, 0.5, TripletThreshold(),
                             fits={"classifier": cls_fit, "segmenter": seg_fit})
    choose_thresholds(trained, config, cached, val_idx)
    if distributed.world().is_main:
        save(trained, out_dir / "cascade.pt")
    return trained


def save(trained: TrainedCascade, path: Path) -> None:
    """The chosen weights and thresholds of a run, so `python -m training export` can redo the export."""
    torch.save({"classifier": trained.classifier.state_dict(), "segmenter": trained.segmenter.state_dict(),
                "gate": trained.gate, "operating_point": trained.operating_point,
                "triplet": [trained.triplet.top_score, trained.triplet.min_area, trained.triplet.bottom_score],
                "validation": trained.validation}, path)


def load(path: Path, config: TrainConfig) -> TrainedCascade:
    """A run saved by `save`, with networks rebuilt from `config`."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    classifier, segmenter = build_classifier(config.classifier), build_segmenter(config.segmenter)
    classifier.load_state_dict(state["classifier"])
    segmenter.load_state_dict(state["segmenter"])
    return TrainedCascade(classifier.eval(), segmenter.eval(), state["gate"], state["operating_point"],
                          TripletThreshold(*state["triplet"]), state["validation"])


def choose_thresholds(trained: TrainedCascade, config: TrainConfig, cached: CachedSet, val_idx: np.ndarray) -> None:
    """Operating point, gate and triplet from the validation fold (`choice.choose` with one fold)."""
    chosen = choose([FoldModels(trained.classifier, trained.segmenter, val_idx)], config, cached)
    trained.gate, trained.operating_point, trained.triplet = chosen.gate, chosen.operating_point, chosen.triplet
    segmenter = trained.fits.get("segmenter")
    trained.validation = {**chosen.validation,
                          "segmenter_siim_dice": segmenter.final_metric if segmenter else float("nan")}
