"""The cascade's thresholds, chosen on films the models never trained on: one fold's validation films
(`train`), or every fold's, each predicted by its own fold's models (`cv`: out-of-fold).

* operating point: the highest classifier threshold whose sensitivity reaches the target (0.95 by default:
  in triage a miss costs more than an extra look);
* gate: a more sensitive threshold (target + half the remaining miss rate), never above the operating
  point, so the segmenter runs on every film the triage would flag and on some borderline ones;
* triplet (top score, minimum area, bottom score): searched over what the cascade really segments (the
  gated films, with the configured TTA), maximising SIIM mean Dice with empty-empty = 1; streamed batch by
  batch (`TripletSearch`), so a 1024 px fold never sits in memory at once.

Why out-of-fold for an ensemble: every film of the training set is then scored by a model that did not
train on it, so the thresholds rest on five times the films of one fold, none of them seen; the ensemble's
own scores on those films would be optimistic (each member trained on 4/5 of them). What they cannot show
is how the averaged ensemble behaves at these thresholds: that is what the held-out films are for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from service.models.thresholds import TripletThreshold, scale_min_area
from training import metrics
from training.config import TrainConfig
from training.data import CachedSet
from training.datasets import RadiographDataset
from training.tasks import input_spec, masks_at_size, predict
from training.thresholds import TripletSearch

REFERENCE_SIZE = 1024  # the triplet's minimum area is stated at 1024², as the SIIM winner tuned it
STREAM_BATCH = 64  # films whose probability maps are held at once by the triplet search


@dataclass(frozen=True)
class FoldModels:
    """One fold's trained models and the films they never trained on (its validation films, as positions)."""

    classifier: nn.Module
    segmenter: nn.Module
    films: np.ndarray


@dataclass(frozen=True)
class Choice:
    """The chosen thresholds and what they achieved on the films they were chosen on."""

    gate: float
    operating_point: float
    triplet: TripletThreshold  # min_area at REFERENCE_SIZE²
    validation: dict[str, float]


def choose(folds: Sequence[FoldModels], config: TrainConfig, cached: CachedSet) -> Choice:
    """Operating point, gate and triplet from the folds' unseen films (see the module docstring)."""
    evaluation = config.evaluation
    films = np.concatenate([fold.films for fold in folds])
    labels = cached.labels[films]
    cls_spec, seg_spec = input_spec(config.classifier), input_spec(config.segmenter)
    scores = np.concatenate([  # the scores the service will compute, each film by a model that never saw it
        predict(fold.classifier, RadiographDataset(cached, fold.films, cls_spec), hflip=evaluation.tta_hflip)
        for fold in folds])
    target = evaluation.target_sensitivity
    operating_point = metrics.threshold_for_sensitivity(scores, labels, target)
    gate = min(operating_point, metrics.threshold_for_sensitivity(scores, labels, target + (1 - target) / 2))

    size = seg_spec.size
    areas = sorted({scale_min_area(area, REFERENCE_SIZE, size) for area in evaluation.triplet_areas})
    search = TripletSearch(evaluation.triplet_tops, areas, evaluation.triplet_bottoms)
    start = 0
    for fold in folds:
        gated_flags = scores[start:start + len(fold.films)] >= gate
        start += len(fold.films)
        for first in range(0, len(fold.films), STREAM_BATCH):  # streamed: one batch of maps in memory at a time
            chunk, flags = fold.films[first:first + STREAM_BATCH], gated_flags[first:first + STREAM_BATCH]
            truths = masks_at_size(np.asarray(cached.masks[chunk]) > 127, size)
            maps = iter([])
            if flags.any():
                maps = iter(predict(fold.segmenter, RadiographDataset(cached, chunk[flags], seg_spec),
                                    hflip=evaluation.tta_hflip)[:, 0])
            for flag, truth in zip(flags, truths, strict=True):
                search.add(next(maps) if flag else None, truth)  # an ungated film gets no mask: empty answer
    rule, dice, _ = search.best()
    return Choice(float(gate), float(operating_point), rule.at_size(REFERENCE_SIZE, from_size=size), {
        "classifier_auc": metrics.roc_auc(scores, labels),
        "operating_point_sensitivity": float(np.mean(scores[labels > 0] >= operating_point)),
        "operating_point_specificity": float(np.mean(scores[labels == 0] < operating_point)),
        "gated_share": float(np.mean(scores >= gate)),
        "triplet_mean_dice": float(dice),
        "validation_images": len(films),
        "validation_positives": int(labels.sum()),
    })
