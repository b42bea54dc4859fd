"""What the cascade produced on a held-out set: the data the report's summary and its figures both read.

A module of its own so that `report` (numbers) and `report_plots` (figures) both import it and neither
imports the other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.models.thresholds import TripletThreshold
from training.metrics import dice_per_image


@dataclass(frozen=True)
class CascadeOutputs:
    """Everything the cascade produced on a held-out set, one entry per image in every sequence.

    `labels` are the image-level ground truth (any lesion); Dice uses `masks_true` instead, so an image
    whose small lesion vanished when its mask was resized to the evaluation resolution is counted (see
    ``counts.label_mask_disagreements``) rather than silently mis-scored. `gated` says whether the
    segmenter ran on the image (``classifier_score >= gate_threshold`` in the lead's cascade, but the
    recorded decision is what is evaluated). `masks_pred` are the cascade's final masks (with hflip TTA when
    the cascade used it), `masks_pred_no_tta` the same run without it. `images` (floats in [0, 1], any
    resolution) are only for the overlay figure. `info` is free, JSON-serialisable metadata; its
    ``score_definition`` entry is quoted in the report as the meaning of the triage score.
    """

    image_ids: Sequence[str]
    labels: np.ndarray
    scores: np.ndarray
    classifier_scores: np.ndarray
    gated: np.ndarray
    masks_true: Sequence[np.ndarray]
    masks_pred: Sequence[np.ndarray]
    threshold: float
    gate_threshold: float
    triplet: TripletThreshold
    target_sensitivity: float = 0.95
    masks_pred_no_tta: Sequence[np.ndarray] | None = None
    images: Sequence[np.ndarray] | None = None
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.image_ids)
        if n == 0:
            raise ValueError("CascadeOutputs needs at least one image")
        for name in ("labels", "scores", "classifier_scores", "gated", "masks_true", "masks_pred"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} image_ids")
        for name in ("masks_pred_no_tta", "images"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} image_ids")
        labels = np.asarray(self.labels)
        if not np.isin(labels, (0, 1)).all():
            raise ValueError(f"labels must be 0 or 1, got values {np.unique(labels)[:10].tolist()}")
        for name in ("scores", "classifier_scores"):
            values = np.asarray(getattr(self, name), dtype=np.float64)
            if not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
                raise ValueError(f"{name} must be finite and in [0, 1]")
        if np.asarray(self.gated).dtype != bool:
            raise ValueError(f"gated must be a bool array, got dtype {np.asarray(self.gated).dtype}")
        for name in ("threshold", "gate_threshold", "target_sensitivity"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0.0 < self.target_sensitivity <= 1.0:
            raise ValueError(f"target_sensitivity must be in (0, 1], got {self.target_sensitivity!r}")
        if not isinstance(self.triplet, TripletThreshold):
            raise ValueError(f"triplet must be a TripletThreshold, got {type(self.triplet).__name__}")
        preds = [("masks_pred", self.masks_pred)]
        if self.masks_pred_no_tta is not None:
            preds.append(("masks_pred_no_tta", self.masks_pred_no_tta))
        for name, masks in preds:
            for i, (pred, truth) in enumerate(zip(masks, self.masks_true, strict=True)):
                if np.shape(pred) != np.shape(truth) or np.ndim(truth) != 2:
                    raise ValueError(
                        f"{name}[{i}] ({self.image_ids[i]}) has shape {np.shape(pred)}, "
                        f"its 2-D true mask {np.shape(truth)}"
                    )

    @property
    def label_array(self) -> np.ndarray:
        return np.asarray(self.labels).astype(bool)

    @property
    def flagged(self) -> np.ndarray:
        """The triage decision at the operating point."""
        return np.asarray(self.scores, dtype=np.float64) >= self.threshold


def positive_dice(outputs: CascadeOutputs, no_tta: bool = False) -> np.ndarray:
    """Per-image Dice on the images whose true mask is non-empty (for the histogram)."""
    preds = outputs.masks_pred_no_tta if no_tta else outputs.masks_pred
    if preds is None:
        raise ValueError("these outputs carry no masks_pred_no_tta")
    positive = np.array([np.asarray(t).any() for t in outputs.masks_true], dtype=bool)
    return dice_per_image(preds, outputs.masks_true)[positive]
