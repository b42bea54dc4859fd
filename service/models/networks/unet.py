"""U-Net with a ResNet encoder for pneumothorax segmentation, with optional scSE decoder attention.

The layout follows segmentation_models_pytorch's `Unet` (which the SIIM-ACR 2019 leaders used) so that
results and hyper-parameters from that literature transfer: five decoder blocks, each doubling the
resolution, concatenating the encoder map of the same stride and applying two 3x3 conv-BN-ReLU. That
library cannot be used here (it needs torchvision), hence this plain-PyTorch rewrite.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from service.models.networks.encoder import (
    IMAGENET_WIDTH,
    ResNetEncoder,
    check_input_size,
    require_int,
)


class SCSE(nn.Module):
    """Concurrent spatial and channel squeeze & excitation (Roy et al., 2018).

    Why: pneumothoraces are thin rims along the pleura; the channel gate (cSE) re-weights feature types,
    the spatial gate (sSE) lets the decoder emphasise *where* the rim is. Several top SIIM solutions
    reported a small, consistent Dice gain from scSE in the decoder for a negligible parameter cost.
    Output is ``x * cSE(x) + x * sSE(x)``.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.cse = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )
        self.sse = nn.Sequential(nn.Conv2d(channels, 1, 1), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.cse(x) + x * self.sse(x)


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 convolution (no bias: BN follows), batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DecoderBlock(nn.Module):
    """Upsample x2 (nearest), concatenate the skip (if any), two conv-BN-ReLU, optional scSE."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, scse: bool) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(in_channels + skip_channels, out_channels)
        self.conv2 = conv_bn_relu(out_channels, out_channels)
        self.attention: nn.Module = SCSE(out_channels) if scse else nn.Identity()

    def forward(self, x: Tensor, skip: Tensor | None) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.attention(self.conv2(self.conv1(x)))


def default_decoder_channels(width: int) -> tuple[int, int, int, int, int]:
    """(256, 128, 64, 32, 16) for width 64 (the SMP default), scaled linearly with the encoder width."""
    return (4 * width, 2 * width, width, max(1, width // 2), max(1, width // 4))


class UNet(nn.Module):
    """ResNet-18/34/50 or SE-ResNeXt-50 U-Net: image (N, in_channels, H, W) -> mask logits (N, 1, H, W).

    H and W must be multiples of 32. The output are logits (apply a sigmoid for probabilities) so that the
    losses can use the numerically stable `*_with_logits` forms.

    Args:
        encoder_depth: 18, 34 (BasicBlock) or 50 (Bottleneck), as torchvision builds them.
        encoder_kind: "resnet", or "seresnext" for timm's SE-ResNeXt-50 32x4d (depth 50).
        in_channels: 1 for radiographs; 3-channel ImageNet weights are adapted by `load_encoder_weights`.
        width: encoder base width; 64 is torchvision-compatible, smaller values give a demo-sized model.
        decoder_channels: five output widths of the decoder blocks, coarse to fine; default scales
            (256, 128, 64, 32, 16) with `width`.
        scse: add scSE attention at the end of every decoder block.
        decoder_blocks: how many decoder blocks run (5 = up to full resolution). 3 stops at 1/4 and
            upsamples the logits bilinearly: on a CPU the full-resolution blocks cost most of the training
            time (thin convolutions at high resolution), for detail a 1024² film rarely needs from 256².
    """

    def __init__(
        self,
        encoder_depth: int = 18,
        in_channels: int = 1,
        width: int = IMAGENET_WIDTH,
        decoder_channels: Sequence[int] | None = None,
        scse: bool = False,
        decoder_blocks: int = 5,
        encoder_kind: str = "resnet",
    ) -> None:
        super().__init__()
        if decoder_blocks not in (3, 4, 5):
            raise ValueError(f"decoder_blocks must be 3, 4 or 5, got {decoder_blocks!r}")
        self.encoder = ResNetEncoder(encoder_depth, in_channels, width, encoder_kind)
        channels = tuple(decoder_channels) if decoder_channels is not None else default_decoder_channels(width)
        if len(channels) != 5:
            raise ValueError(f"decoder_channels must have 5 entries (one per decoder block), got {channels!r}")
        for index, value in enumerate(channels):
            require_int(f"decoder_channels[{index}]", value, 1)
        stem, c1, c2, c3, c4 = self.encoder.out_channels
        # Finest skip last; the last block restores full resolution and has no skip.
        skips = (c3, c2, c1, stem, 0)
        inputs = (c4, *channels[:-1])
        blocks = list(zip(inputs, skips, channels, strict=True))[:decoder_blocks]
        self.decoder = nn.ModuleList(DecoderBlock(i, s, o, scse) for i, s, o in blocks)
        self.head = nn.Conv2d(channels[decoder_blocks - 1], 1, 3, padding=1)

    def forward(self, image: Tensor) -> Tensor:
        check_input_size(image)
        features = self.encoder(image)
        x = features[4]
        skips: list[Tensor | None] = [features[3], features[2], features[1], features[0], None]
        for block, skip in zip(self.decoder, skips):
            x = block(x, skip)
        logits = self.head(x)
        if len(self.decoder) < 5:  # fixed by the architecture, so the exported graph is the same for any size
            logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return logits
