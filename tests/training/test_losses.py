"""Hand-computed values of the segmentation and classification losses."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import (
    bce_with_logits,
    binary_focal_loss,
    classification_loss,
    multitask_loss,
    segmentation_loss,
    soft_dice_loss,
    soft_fbeta_loss,
)

LOG2 = math.log(2.0)


def test_soft_dice_half_probability() -> None:
    # p = 0.5 everywhere, 2 of 4 pixels positive: intersection 1, sum(p) 2, sum(t) 2.
    logits = torch.zeros(1, 1, 2, 2)
    targets = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    assert soft_dice_loss(logits, targets, smooth=0.0).item() == pytest.approx(1 - 2 / 4)
    assert soft_dice_loss(logits, targets, smooth=1.0).item() == pytest.approx(1 - 3 / 5)


def test_soft_dice_empty_mask_behaviour() -> None:
    empty = torch.zeros(1, 1, 2, 2)
    # Confidently empty prediction on an empty mask: loss 0 (smoothing avoids 0/0).
    assert soft_dice_loss(torch.full((1, 1, 2, 2), -100.0), empty).item() == pytest.approx(0.0, abs=1e-6)
    # p = 0.5 on 4 pixels of an empty mask: 1 - 1 / (2 + 1).
    assert soft_dice_loss(torch.zeros(1, 1, 2, 2), empty).item() == pytest.approx(2 / 3)


def test_soft_dice_is_a_mean_over_images() -> None:
    targets = torch.zeros(2, 1, 2, 2)
    targets[0] = 1.0
    logits = torch.full((2, 1, 2, 2), 100.0)  # predicts everything: perfect on image 0
    # image 0: loss 0; image 1 (empty truth, sum(p) = 4): 1 - 1/5.
    assert soft_dice_loss(logits, targets).item() == pytest.approx((0.0 + 0.8) / 2)


def test_bce_and_pos_weight() -> None:
    logits = torch.zeros(4)
    targets = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert bce_with_logits(logits, targets).item() == pytest.approx(LOG2)
    # The positive's term is multiplied by 3: (3 + 1 + 1 + 1) / 4 * log 2.
    assert bce_with_logits(logits, targets, pos_weight=3.0).item() == pytest.approx(1.5 * LOG2)


def test_focal_by_hand() -> None:
    logits = torch.zeros(2)
    targets = torch.tensor([1.0, 0.0])
    # p_t = 0.5 for both, (1 - p_t)^2 = 1/4; alpha_t = 0.25 for the positive, 0.75 for the negative.
    expected = (0.25 * 0.25 * LOG2 + 0.75 * 0.25 * LOG2) / 2
    assert binary_focal_loss(logits, targets, gamma=2.0, alpha=0.25).item() == pytest.approx(expected)
    assert binary_focal_loss(logits, targets, gamma=0.0, alpha=None).item() == pytest.approx(LOG2)


def test_focal_down_weights_easy_examples() -> None:
    targets = torch.tensor([1.0])
    easy, hard = torch.tensor([4.0]), torch.tensor([-4.0])
    ratio_focal = binary_focal_loss(easy, targets, alpha=None) / binary_focal_loss(hard, targets, alpha=None)
    assert ratio_focal < bce_with_logits(easy, targets) / bce_with_logits(hard, targets)


def test_segmentation_loss_is_the_weighted_sum() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8)
    targets = (torch.rand(2, 1, 8, 8) > 0.7).float()
    expected = (
        3 * bce_with_logits(logits, targets)
        + 1 * soft_dice_loss(logits, targets)
        + 4 * binary_focal_loss(logits, targets, alpha=None)
    )
    assert segmentation_loss(logits, targets).item() == pytest.approx(expected.item())
    only_dice = segmentation_loss(logits, targets, weights=(0.0, 2.0, 0.0))
    assert only_dice.item() == pytest.approx(2 * soft_dice_loss(logits, targets).item())


def test_losses_have_finite_gradients_for_extreme_logits() -> None:
    logits = torch.tensor([[[[-1e4, 1e4], [50.0, -50.0]]]], requires_grad=True)
    targets = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    segmentation_loss(logits, targets).backward()
    assert torch.isfinite(logits.grad).all()


def test_soft_fbeta_by_hand() -> None:
    # p = 0.5: tp = fp = fn = 0.5; F2 = 5 * 0.5 / (5 * 0.5 + 4 * 0.5 + 0.5) = 0.5.
    loss = soft_fbeta_loss(torch.zeros(2), torch.tensor([1.0, 0.0]), beta=2.0)
    assert loss.item() == pytest.approx(0.5, abs=1e-6)
    # A confident, correct prediction: soft F2 ~ 1, loss ~ 0.
    assert soft_fbeta_loss(torch.tensor([20.0, -20.0]), torch.tensor([1.0, 0.0])).item() == pytest.approx(0.0, abs=1e-6)


def test_classification_and_multitask_loss() -> None:
    logits = torch.zeros(2)
    labels = torch.tensor([1.0, 0.0])
    assert classification_loss(logits, labels, "bce").item() == pytest.approx(LOG2)
    assert classification_loss(logits, labels, "bce+fbeta").item() == pytest.approx(LOG2 + 0.5, abs=1e-6)
    mask_logits = torch.zeros(2, 1, 2, 2)
    masks = torch.zeros(2, 1, 2, 2)
    # aux term: BCE log 2 + Dice on empty masks 1 - 1/3.
    expected = LOG2 + 0.5 * (LOG2 + 2 / 3)
    assert multitask_loss(logits, labels, mask_logits, masks, aux_weight=0.5).item() == pytest.approx(expected)
    assert multitask_loss(logits, labels, mask_logits, masks, aux_weight=0.0).item() == pytest.approx(LOG2)


def test_argument_errors() -> None:
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"same shape, got \(1, 1, 2, 2\) and \(1, 1, 2\)"):
        soft_dice_loss(x, torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match=r"smooth must be a finite number >= 0, got -1"):
        soft_dice_loss(x, x, smooth=-1.0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\] or None, got 1.5"):
        binary_focal_loss(x, x, alpha=1.5)
    with pytest.raises(ValueError, match=r"at least one loss weight must be > 0"):
        segmentation_loss(x, x, weights=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match=r"kind must be 'bce', 'focal' or 'bce\+fbeta', got 'hinge'"):
        classification_loss(torch.zeros(2), torch.zeros(2), "hinge")
    with pytest.raises(ValueError, match=r"pos_weight must be a finite number > 0, got 0"):
        bce_with_logits(x, x, pos_weight=0.0)
