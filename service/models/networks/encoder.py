"""ResNet-18/34 encoder whose parameter names are torchvision's, without importing torchvision.

Why torchvision's names: the ImageNet weights every pneumothorax solution starts from are published as
torchvision state dicts. torchvision does not import in this environment (and the serving install never
has it), so the architecture is rewritten here in plain PyTorch with *exactly* the same module tree
(`conv1`, `bn1`, `layer1.0.conv1`, ..., `layer4.1.downsample.0`) so that a locally stored
`resnet18-f37072fd.pth` / `resnet34-b627a593.pth` loads with `strict=True` and nothing is silently left at
random initialisation. The classification head `fc` is deliberately absent: the networks in this package
put their own heads on the feature maps.

`width` is the base channel count (64 in torchvision). A narrow encoder (e.g. 16) gives a demo model small
enough to train on a CPU and to ship in a repository, but it has no pretrained weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

#: Blocks per stage for the supported depths (torchvision's `resnet18` / `resnet34`).
BLOCKS_PER_STAGE: dict[int, tuple[int, int, int, int]] = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}

#: The only base width for which torchvision ImageNet weights exist.
IMAGENET_WIDTH = 64

#: Total downsampling of the encoder; network inputs must be a multiple of it.
OUTPUT_STRIDE = 32


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 convolutions and an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        # Only blocks that change shape get a projection: that is where torchvision has `downsample`.
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def require_int(name: str, value: object, minimum: int) -> int:
    """Return `value` if it is an integer (not a bool) >= `minimum`, else raise ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class ResNetEncoder(nn.Module):
    """ResNet-18/34 trunk returning the feature map of every stage (for U-Net skips and heads).

    `forward` returns five maps, finest first:

    ====  ==============  ==========  ========
    idx   module          stride      channels
    ====  ==============  ==========  ========
    0     conv1/bn1/relu  2           width
    1     layer1          4           width
    2     layer2          8           2*width
    3     layer3          16          4*width
    4     layer4          32          8*width
    ====  ==============  ==========  ========
    """

    def __init__(self, depth: int = 18, in_channels: int = 1, width: int = IMAGENET_WIDTH) -> None:
        super().__init__()
        if depth not in BLOCKS_PER_STAGE:
            raise ValueError(f"encoder depth must be one of {sorted(BLOCKS_PER_STAGE)}, got {depth!r}")
        require_int("in_channels", in_channels, 1)
        require_int("width", width, 4)
        self.depth = depth
        self.in_channels = in_channels
        self.width = width
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stage_channels = [width, 2 * width, 4 * width, 8 * width]
        blocks = BLOCKS_PER_STAGE[depth]
        current = width
        for index, (channels, count) in enumerate(zip(stage_channels, blocks, strict=True)):
            stride = 1 if index == 0 else 2
            layers = [BasicBlock(current, channels, stride)]
            layers += [BasicBlock(channels, channels) for _ in range(count - 1)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*layers))
            current = channels
        self.out_channels: tuple[int, ...] = (width, *stage_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation, so that a randomly initialised encoder trains like the reference.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        stem = self.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(self.maxpool(stem))
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return [stem, f1, f2, f3, f4]


def check_input_size(x: Tensor) -> None:
    """Reject inputs the encoder/decoder cannot round-trip (skipped while tracing for ONNX export).

    Why: with a side that is not a multiple of 32, the upsampled decoder map and the skip differ by a
    pixel and the concatenation fails with an obscure message deep inside the decoder.
    """
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        return
    if x.dim() != 4:
        raise ValueError(f"input must be a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    height, width = x.shape[-2:]
    if height % OUTPUT_STRIDE or width % OUTPUT_STRIDE:
        raise ValueError(
            f"input height and width must be multiples of {OUTPUT_STRIDE}, got {height}x{width}"
        )


def _short(keys: set[str], limit: int = 8) -> str:
    ordered = sorted(keys)
    text = ", ".join(ordered[:limit])
    return text + (f", ... ({len(ordered) - limit} more)" if len(ordered) > limit else "")


def load_encoder_weights(encoder: ResNetEncoder, path: str | os.PathLike[str]) -> ResNetEncoder:
    """Load a torchvision ResNet state dict (e.g. ImageNet weights stored locally) into `encoder`.

    * `fc.*` (the ImageNet classifier) is ignored.
    * For a 1-channel encoder, the RGB `conv1.weight` is summed over its input channels: a grey image
      replicated to RGB gives the same first-layer response as the grey image through the summed kernel,
      so the pretrained features survive the change of input.
    * Anything else that does not match (missing or unexpected keys, e.g. ResNet-34 weights into a ResNet-18,
      or shapes) raises ValueError naming the keys; nothing is loaded partially.

    Returns the encoder, for chaining.
    """
    if encoder.width != IMAGENET_WIDTH:
        raise ValueError(
            f"ImageNet weights exist only for width={IMAGENET_WIDTH}; this encoder has width={encoder.width} "
            "and must be trained from scratch"
        )
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{os.fspath(path)!r} does not hold a state dict (got {type(loaded).__name__})")
    state = {key: value for key, value in loaded.items() if not key.startswith("fc.")}
    conv1 = state.get("conv1.weight")
    if isinstance(conv1, Tensor) and conv1.dim() == 4 and conv1.shape[1] != encoder.in_channels:
        if conv1.shape[1] == 3 and encoder.in_channels == 1:
            state["conv1.weight"] = conv1.sum(dim=1, keepdim=True)
        else:
            raise ValueError(
                f"conv1.weight has {conv1.shape[1]} input channels; the encoder has {encoder.in_channels} "
                "(only 3 -> 1 by summing over RGB is supported)"
            )
    expected = encoder.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        raise ValueError(
            f"{os.fspath(path)!r} does not match a torchvision ResNet-{encoder.depth}: "
            f"missing keys [{_short(missing)}]; unexpected keys [{_short(unexpected)}]"
        )
    wrong_shape = {
        f"{key} {tuple(state[key].shape)} != {tuple(value.shape)}"
        for key, value in expected.items()
        if tuple(state[key].shape) != tuple(value.shape)
    }
    if wrong_shape:
        raise ValueError(f"{os.fspath(path)!r}: shape mismatch for [{_short(wrong_shape)}]")
    encoder.load_state_dict(state, strict=True)
    return encoder
