"""Loss functions for pneumothorax segmentation and classification: pure functions on tensors.

All functions take *logits* (pre-sigmoid) and float targets in {0, 1} of the same shape, and return a
scalar tensor (mean over the batch) so they can be summed with weights. Logits rather than probabilities
because the `*_with_logits` forms are numerically stable for confident predictions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

#: BCE / Dice / focal weights of the SIIM-ACR 2019 winner's segmentation loss.
SIIM_WINNER_WEIGHTS: tuple[float, float, float] = (3.0, 1.0, 4.0)


def _check_pair(logits: Tensor, targets: Tensor) -> None:
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits and targets must have the same shape, got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )


def _check_non_negative(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def soft_dice_loss(logits: Tensor, targets: Tensor, smooth: float = 1.0) -> Tensor:
    """Mean over images of ``1 - (2*sum(p*t) + smooth) / (sum(p) + sum(t) + smooth)``, p = sigmoid(logits).

    Per image (the first axis is the batch), because the SIIM metric is a per-image mean: a batch-level
    Dice would let one large pneumothorax hide a missed small one.

    Empty ground truth: the loss is ``1 - smooth / (sum(p) + smooth)``, i.e. 0 for an all-zero prediction and
    rising towards 1 as predicted area grows (with smooth=1, about 0.5 for one pixel's worth of probability).
    So on negatives the Dice term alone pushes hard towards an empty prediction; `smooth` > 0 is what keeps
    the empty/empty case defined (0 loss, matching Dice = 1 in the metric) instead of 0/0.
    """
    _check_pair(logits, targets)
    _check_non_negative("smooth", smooth)
    if logits.dim() < 2:
        raise ValueError(f"soft_dice_loss needs a batch axis and at least one more, got shape {tuple(logits.shape)}")
    probs = torch.sigmoid(logits).flatten(1)
    truth = targets.flatten(1).to(probs.dtype)
    intersection = (probs * truth).sum(dim=1)
    total = probs.sum(dim=1) + truth.sum(dim=1)
    return (1.0 - (2.0 * intersection + smooth) / (total + smooth)).mean()


def bce_with_logits(logits: Tensor, targets: Tensor, pos_weight: float | None = None) -> Tensor:
    """Mean binary cross-entropy; `pos_weight` > 1 up-weights positives (pneumothorax is ~22 % of SIIM)."""
    _check_pair(logits, targets)
    weight = None
    if pos_weight is not None:
        if not (math.isfinite(pos_weight) and pos_weight > 0):
            raise ValueError(f"pos_weight must be a finite number > 0, got {pos_weight!r}")
        weight = torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), pos_weight=weight)


def binary_focal_loss(logits: Tensor, targets: Tensor, gamma: float = 2.0, alpha: float | None = 0.25) -> Tensor:
    """Mean focal loss ``alpha_t * (1 - p_t)**gamma * BCE`` (Lin et al., 2017).

    Why: almost every pixel of a radiograph is easy background; focal loss down-weights those so the few
    hard pixels at the pleural line drive the gradient. gamma = 0 and alpha = None give plain BCE.
    `alpha` weights positives (alpha) against negatives (1 - alpha); None disables it.
    """
    _check_pair(logits, targets)
    _check_non_negative("gamma", gamma)
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] or None, got {alpha!r}")
    targets = targets.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    probs = torch.sigmoid(logits)
    p_t = probs * targets + (1.0 - probs) * (1.0 - targets)
    loss = bce * (1.0 - p_t).pow(gamma)
    if alpha is not None:
        loss = loss * (alpha * targets + (1.0 - alpha) * (1.0 - targets))
    return loss.mean()


def segmentation_loss(
    logits: Tensor,
    targets: Tensor,
    weights: tuple[float, float, float] = SIIM_WINNER_WEIGHTS,
    smooth: float = 1.0,
    gamma: float = 2.0,
    alpha: float | None = None,
) -> Tensor:
    """``w_bce * BCE + w_dice * soft Dice + w_focal * focal``; `weights` = (bce, dice, focal).

    The default (3, 1, 4) is the SIIM-ACR winner's mix: BCE/focal give dense per-pixel gradients (and
    teach "empty" on negatives), Dice optimises the overlap the metric rewards on the positives.
    """
    if len(weights) != 3:
        raise ValueError(f"weights must be (bce, dice, focal), got {weights!r}")
    for name, value in zip(("bce", "dice", "focal"), weights, strict=True):
        _check_non_negative(f"{name} weight", value)
    if sum(weights) == 0:
        raise ValueError(f"at least one loss weight must be > 0, got {weights!r}")
    w_bce, w_dice, w_focal = weights
    total = logits.new_zeros(())
    if w_bce:
        total = total + w_bce * bce_with_logits(logits, targets)
    if w_dice:
        total = total + w_dice * soft_dice_loss(logits, targets, smooth)
    if w_focal:
        total = total + w_focal * binary_focal_loss(logits, targets, gamma, alpha)
    return total


def soft_fbeta_loss(logits: Tensor, targets: Tensor, beta: float = 2.0, eps: float = 1e-7) -> Tensor:
    """``1 - soft F-beta`` over the whole batch of image-level predictions.

    Why: triage values sensitivity over precision (a missed pneumothorax costs more than a second look);
    F-beta with beta = 2 weights recall four times as much as precision. Computed over the batch (F-beta is
    not a per-sample quantity), so use batches that usually contain positives; combine with BCE for
    calibrated scores.
    """
    _check_pair(logits, targets)
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    probs = torch.sigmoid(logits)
    targets = targets.to(probs.dtype)
    tp = (probs * targets).sum()
    fp = (probs * (1.0 - targets)).sum()
    fn = ((1.0 - probs) * targets).sum()
    b2 = beta * beta
    return 1.0 - ((1.0 + b2) * tp + eps) / ((1.0 + b2) * tp + b2 * fn + fp + eps)


def classification_loss(
    logits: Tensor,
    labels: Tensor,
    kind: str = "bce",
    *,
    pos_weight: float | None = None,
    gamma: float = 2.0,
    alpha: float | None = 0.25,
    beta: float = 2.0,
) -> Tensor:
    """Image-level loss for the classifier; `kind` is "bce", "focal" or "bce+fbeta" (sum of the two)."""
    if kind == "bce":
        return bce_with_logits(logits, labels, pos_weight)
    if kind == "focal":
        return binary_focal_loss(logits, labels, gamma, alpha)
    if kind == "bce+fbeta":
        return bce_with_logits(logits, labels, pos_weight) + soft_fbeta_loss(logits, labels, beta)
    raise ValueError(f"kind must be 'bce', 'focal' or 'bce+fbeta', got {kind!r}")


def multitask_loss(
    logit: Tensor,
    labels: Tensor,
    mask_logits: Tensor,
    masks: Tensor,
    aux_weight: float = 0.5,
    kind: str = "bce",
) -> Tensor:
    """Classifier loss plus `aux_weight` times the segmentation loss of its auxiliary head.

    The auxiliary term uses BCE + Dice (weights 1, 1, 0): it only has to point the encoder at the lesion.
    """
    _check_non_negative("aux_weight", aux_weight)
    main = classification_loss(logit, labels, kind)
    if aux_weight == 0:
        return main
    return main + aux_weight * segmentation_loss(mask_logits, masks, weights=(1.0, 1.0, 0.0))
