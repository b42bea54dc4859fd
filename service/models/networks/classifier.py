"""Image-level pneumothorax classifier (triage score) with an optional auxiliary segmentation head.

Why a separate classifier at all: the SIIM-ACR leaders found that a classifier deciding "any pneumothorax?"
and a segmenter drawing it are each better at their own job; the service triages on the classifier score
and only segments likely positives.

Why the auxiliary head: a small pneumothorax is a few hundred pixels of a 1024² image, so a single
image-level label gives the encoder very little signal about *where* to look. Training the same encoder
to also predict the (downsampled) mask -- multi-task learning -- supplies dense supervision on the
positives and measurably stabilises the classifier. The head is deliberately light (one conv block on the
stride-16/32 features) so that it shapes the encoder rather than becoming a segmenter of its own; it is not
used at inference and is left out of the ONNX export unless asked for.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from service.models.networks.encoder import (
    IMAGENET_WIDTH,
    ResNetEncoder,
    check_input_size,
)
from service.models.networks.unet import conv_bn_relu


class AuxSegmentationHead(nn.Module):
    """layer4 upsampled x2 + layer3 -> conv-BN-ReLU -> 1x1 conv -> bilinear x16 to input resolution."""

    def __init__(self, layer3_channels: int, layer4_channels: int, hidden: int) -> None:
        super().__init__()
        self.block = conv_bn_relu(layer3_channels + layer4_channels, hidden)
        self.out = nn.Conv2d(hidden, 1, 1)

    def forward(self, layer3: Tensor, layer4: Tensor) -> Tensor:
        x = torch.cat([layer3, F.interpolate(layer4, scale_factor=2.0, mode="nearest")], dim=1)
        x = self.out(self.block(x))
        return F.interpolate(x, scale_factor=16.0, mode="bilinear", align_corners=False)


class Classifier(nn.Module):
    """ResNet encoder + global average pooling + linear head -> one logit per image.

    Input (N, in_channels, H, W) with H and W multiples of 32 (as for the U-Net, so one preprocessing
    serves both models and the auxiliary head's upsampling lands exactly on the input grid).

    * ``forward(image)`` returns the logit, shape (N,), for inference and ONNX export.
    * ``forward_with_mask(image)`` returns ``(logit (N,), mask_logits (N, 1, H, W))`` for multi-task
      training; it requires ``aux_segmentation=True``.
    * ``forward_with_features(image)`` returns ``(logit (N,), features (N, C1 + C2 + C3))``: the encoder's
      stages 1-3, each averaged over the image, side by side -- what the out-of-distribution distance measures
      (service/models/ood.py). Why not the last stage, which the head reads: it is shaped by the label, so a
      large pneumothorax lies as far from the training films there as a film of another kind does (on the demo,
      real chest films fell below the threshold a large synthetic lesion set); stages 1-3 describe the film's
      appearance (texture, exposure, anatomy), and set every real chest film at 1.5x the threshold or more.

    Args:
        encoder_depth: 18, 34 or 50.
        in_channels: 1 for radiographs.
        encoder_kind: "resnet" or "seresnext" (depth 50), see `ResNetEncoder`.
        width: encoder base width (64 = torchvision-compatible).
        aux_segmentation: build the auxiliary segmentation head (see the module docstring).
        dropout: dropout before the linear head.
    """

    def __init__(
        self,
        encoder_depth: int = 18,
        in_channels: int = 1,
        width: int = IMAGENET_WIDTH,
        aux_segmentation: bool = False,
        dropout: float = 0.0,
        encoder_kind: str = "resnet",
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.encoder = ResNetEncoder(encoder_depth, in_channels, width, encoder_kind)
        self.aux_segmentation = bool(aux_segmentation)
        channels = self.encoder.out_channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels[4], 1)
        self.aux_head: AuxSegmentationHead | None = (
            AuxSegmentationHead(channels[3], channels[4], hidden=channels[1]) if aux_segmentation else None
        )

    def _logit(self, layer4: Tensor) -> Tensor:
        return self.fc(self.dropout(torch.flatten(self.pool(layer4), 1))).squeeze(1)

    def forward(self, image: Tensor) -> Tensor:
        check_input_size(image)
        return self._logit(self.encoder(image)[4])

    def forward_with_features(self, image: Tensor) -> tuple[Tensor, Tensor]:
        check_input_size(image)
        stages = self.encoder(image)
        features = torch.cat([torch.flatten(self.pool(stage), 1) for stage in stages[1:4]], dim=1)
        return self._logit(stages[4]), features

    def forward_with_mask(self, image: Tensor) -> tuple[Tensor, Tensor]:
        if self.aux_head is None:
            raise ValueError("forward_with_mask needs a Classifier built with aux_segmentation=True")
        check_input_size(image)
        features = self.encoder(image)
        return self._logit(features[4]), self.aux_head(features[3], features[4])
