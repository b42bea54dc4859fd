"""Train the cascade on one fold split, and choose its thresholds on the validation fold.

Thresholds are searched on validation data, never on the test set, and written into the manifests:
* operating point: the highest classifier threshold whose validation sensitivity reaches the target (0.95
  by default: in triage a miss costs more than an extra look);
* gate: a more sensitive threshold (target + half the remaining miss rate), never above the operating
  point, so the segmenter runs on every film the triage would flag and on some borderline ones;
* triplet (top score, minimum area, bottom score): searched over what the cascade really segments (the
  gated validation films, with the configured TTA), maximising SIIM mean Dice with empty-empty = 1; the
  search is streamed batch by batch (`TripletSearch`), so a 1024 px fold never sits in memory at once.

The segmenter's epochs are selected by SIIM mean Dice at 0.5 over *all* validation films (empty-empty = 1):
it trains on negatives too, and a model that paints lesions on them must not win on positives alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from service.models.thresholds import TripletThreshold, scale_min_area
from training import augment, metrics
from training.config import TrainConfig
from training.data import CachedSet, make_folds, write_folds
from training.datasets import RadiographDataset
from training.runs import init_from_run, run_identity
from training.tasks import (
    build_classifier,
    build_segmenter,
    classifier_task,
    input_spec,
    masks_at_size,
    predict,
    segmenter_task,
)
from training.thresholds import TripletSearch
from training.trainer import FitResult, fit

REFERENCE_SIZE = 1024  # the triplet's minimum area is stated at 1024², as the SIIM winner tuned it
STREAM_BATCH = 64  # validation films whose probability maps are held at once by the triplet search


@dataclass
class TrainedCascade:
    classifier: torch.nn.Module
    segmenter: torch.nn.Module
    gate: float
    operating_point: float
    triplet: TripletThreshold  # min_area at REFERENCE_SIZE²
    validation: dict[str, float] = field(default_factory=dict)
    fits: dict[str, FitResult] = field(default_factory=dict)


def split(config: TrainConfig, cached: CachedSet, out_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) positions from seeded, stratified, patient-grouped folds (written to folds.csv)."""
    folds = make_folds(cached.labels, cached.groups, config.data.folds, config.seed)
    write_folds(out_dir / "folds.csv", cached.image_ids, folds, config.seed)
    return np.flatnonzero(folds != config.data.fold), np.flatnonzero(folds == config.data.fold)


def train_cascade(config: TrainConfig, cached: CachedSet, out_dir: Path, progress: bool = True) -> TrainedCascade:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_idx, val_idx = split(config, cached, out_dir)
    identity = run_identity(config, cached)

    cls = config.classifier
    cls_spec = input_spec(cls)
    cls_val = RadiographDataset(cached, val_idx, cls_spec)
    classifier = build_classifier(cls)
    if cls.init_from:
        init_from_run(classifier, cls.init_from, "classifier")
    cls_fit = fit(classifier, classifier_task(cls, cls_val),
                  RadiographDataset(cached, train_idx, cls_spec, augment.build(cls.augment, cls_spec.size, config.seed)),
                  cls, out_dir / "classifier", config.seed, progress=progress, identity=identity)

    seg = config.segmenter
    seg_spec = input_spec(seg)
    seg_val = RadiographDataset(cached, val_idx, seg_spec)
    segmenter = build_segmenter(seg)
    if seg.network.encoder_from_classifier:
        segmenter.encoder.load_state_dict(classifier.encoder.state_dict())
    if seg.init_from:
        init_from_run(segmenter, seg.init_from, "segmenter")
    seg_fit = fit(segmenter, segmenter_task(seg, seg_val),
                  RadiographDataset(cached, train_idx, seg_spec, augment.build(seg.augment, seg_spec.size, config.seed + 1)),
                  seg, out_dir / "segmenter", config.seed + 1, progress=progress, identity=identity)

    trained = TrainedCascade(classifier, segmenter, 0.5, 0.5, TripletThreshold(),
                             fits={"classifier": cls_fit, "segmenter": seg_fit})
    choose_thresholds(trained, config, cached, val_idx)
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
    """Operating point, gate and triplet from the validation fold (see the module docstring)."""
    evaluation = config.evaluation
    labels = cached.labels[val_idx]
    scores = predict(trained.classifier, RadiographDataset(cached, val_idx, input_spec(config.classifier)),
                     hflip=evaluation.tta_hflip)  # the scores the service will compute
    target = evaluation.target_sensitivity
    operating_point = metrics.threshold_for_sensitivity(scores, labels, target)
    gate = min(operating_point, metrics.threshold_for_sensitivity(scores, labels, target + (1 - target) / 2))

    seg_spec = input_spec(config.segmenter)
    gated_flags = scores >= gate
    size = seg_spec.size
    areas = sorted({scale_min_area(area, REFERENCE_SIZE, size) for area in evaluation.triplet_areas})
    search = TripletSearch(evaluation.triplet_tops, areas, evaluation.triplet_bottoms)
    for start in range(0, len(val_idx), STREAM_BATCH):  # streamed: one batch of maps in memory at a time
        chunk, flags = val_idx[start:start + STREAM_BATCH], gated_flags[start:start + STREAM_BATCH]
        truths = masks_at_size(np.asarray(cached.masks[chunk]) > 127, size)
        maps = iter([])
        if flags.any():
            maps = iter(predict(trained.segmenter, RadiographDataset(cached, chunk[flags], seg_spec),
                                hflip=evaluation.tta_hflip)[:, 0])
        for flag, truth in zip(flags, truths, strict=True):
            search.add(next(maps) if flag else None, truth)  # an ungated film gets no mask: empty answer
    rule, dice, _ = search.best()
    gated = val_idx[gated_flags]
    trained.gate, trained.operating_point = float(gate), float(operating_point)
    trained.triplet = rule.at_size(REFERENCE_SIZE, from_size=size)  # manifests state min_area at 1024²
    trained.validation = {
        "classifier_auc": metrics.roc_auc(scores, labels),
        "operating_point_sensitivity": float(np.mean(scores[labels > 0] >= operating_point)),
        "operating_point_specificity": float(np.mean(scores[labels == 0] < operating_point)),
        "gated_share": float(len(gated) / len(val_idx)),
        "triplet_mean_dice": float(dice),
        "segmenter_siim_dice": trained.fits["segmenter"].final_metric if "segmenter" in trained.fits else float("nan"),
        "validation_images": int(len(val_idx)),
        "validation_positives": int(labels.sum()),
    }
