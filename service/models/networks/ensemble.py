"""Ensembles of fold models as one network: every member runs on the same batch, probabilities are averaged.

Why one network: the SIIM-ACR leaders averaged the predictions of their five fold models. Exported as one
ONNX graph, the ensemble is a model like any other to the service: one file, one manifest, one batched call,
the same output name and meaning. The output stays a logit -- the logit of the members' *mean probability*
-- because the service applies a sigmoid to whatever the model returns; averaging logits instead would be a
different (geometric-mean-like) rule from the one the thresholds were chosen for.

Why subclasses of `Classifier` and `UNet`: an ensemble is used wherever one model is (export, ONNX checks,
prediction in training); `encoder` names the first member's, whose input channels every member shares
(`MeanOfMembers`, which both ensembles put first).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from service.models.networks.classifier import Classifier
from service.models.networks.encoder import ResNetEncoder, check_input_size
from service.models.networks.unet import UNet


def mean_probability_logit(logits: Tensor) -> Tensor:
    """logit(mean_k sigmoid(logits[k])) over the first axis, computed in log space.

    With p = mean sigmoid and 1 - p = mean sigmoid(-x), logit(p) = logsumexp(log sigmoid x) -
    logsumexp(log sigmoid -x) (the 1/K cancels); log sigmoid x = -softplus(-x). No probability is formed, so
    confident members (|logit| > 17, where float32 sigmoid is exactly 1) keep their logit instead of
    overflowing to inf. (No argument checks here: they would be frozen into the exported graph; the
    ensembles check their members when built.)
    """
    return _logsumexp(-F.softplus(-logits)) - _logsumexp(-F.softplus(logits))


def _logsumexp(values: Tensor) -> Tensor:
    """log sum exp over axis 0, written out (max subtracted) so every exporter emits plain, stable operators."""
    peak = values.max(dim=0).values
    return peak + torch.log(torch.exp(values - peak.unsqueeze(0)).sum(dim=0))


def _members(members: Sequence[nn.Module], kind: type) -> nn.ModuleList:
    if not members:
        raise ValueError("an ensemble needs at least one member")
    wrong = [type(member).__name__ for member in members if not isinstance(member, kind)]
    if wrong:
        raise ValueError(f"every member must be a {kind.__name__}, got {', '.join(wrong)}")
    channels = {member.encoder.in_channels for member in members}
    if len(channels) != 1:
        raise ValueError(f"members take different input channels: {sorted(channels)}")
    return nn.ModuleList(members)


class MeanOfMembers:
    """What both ensembles share: the first member's encoder, and a forward that averages probabilities. Listed
    first among the bases, so it overrides the single network's `encoder` and `forward`."""

    members: nn.ModuleList

    @property
    def encoder(self) -> ResNetEncoder:
        return self.members[0].encoder

    def forward(self, image: Tensor) -> Tensor:
        check_input_size(image)
        return mean_probability_logit(torch.stack([member(image) for member in self.members]))


class ClassifierEnsemble(MeanOfMembers, Classifier):  # type: ignore[misc]
    """K classifiers -> one logit per image, the logit of their mean probability."""

    def __init__(self, members: Sequence[Classifier]) -> None:
        nn.Module.__init__(self)  # no encoder or head of its own: the members hold every weight
        self.members = _members(members, Classifier)
        self.aux_segmentation = False
        self.aux_head = None

    def forward_with_mask(self, image: Tensor) -> tuple[Tensor, Tensor]:
        raise ValueError("a ClassifierEnsemble is for inference: train its members, not the ensemble")

    def forward_with_features(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """The ensemble's logit and its members' pooled features side by side (N, K·C): each member has its own
        feature space, so they are concatenated, never averaged."""
        check_input_size(image)
        logits, features = zip(*(member.forward_with_features(image) for member in self.members))
        return mean_probability_logit(torch.stack(logits)), torch.cat(features, dim=1)


class UNetEnsemble(MeanOfMembers, UNet):  # type: ignore[misc]
    """K U-Nets -> mask logits (N, 1, H, W), pixel by pixel the logit of their mean probability."""

    def __init__(self, members: Sequence[UNet]) -> None:
        nn.Module.__init__(self)
        self.members = _members(members, UNet)
