"""ResNet-18/34/50 and SE-ResNeXt-50 encoders with torchvision's / timm's parameter names, in plain PyTorch.

Why torchvision's names: the ImageNet weights every pneumothorax solution starts from are published as
torchvision state dicts. torchvision does not import in this environment (and the serving install never
has it), so the architecture is rewritten here in plain PyTorch with *exactly* the same module tree
(`conv1`, `bn1`, `layer1.0.conv1`, ..., `layer4.1.downsample.0`) so that a locally stored
`resnet18-f37072fd.pth` / `resnet34-b627a593.pth` / `resnet50-0676ba61.pth` loads with `strict=True` and
nothing is silently left at random initialisation (the loader is `weights.load_encoder_weights`). The
classification head `fc` is deliberately absent: the networks in this package put their own heads on the
feature maps.

SE-ResNeXt-50 (32x4d) is the encoder of the SIIM-ACR 2019 winner. Its module tree is timm's
`seresnext50_32x4d`: the ResNet-50 tree with grouped 3x3 convolutions (32 groups of 4 channels per 64 planes)
and a squeeze-and-excitation module `se.fc1` / `se.fc2` after `bn3`, so timm's ImageNet weights load
tensor for tensor (`weights.load_encoder_weights` also renames the older `pretrainedmodels` layout).

`width` is the base channel count (64 in torchvision). A narrow encoder (e.g. 16) gives a demo model small
enough to train on a CPU and to ship in a repository, but it has no pretrained weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: Blocks per stage for the supported depths (torchvision's `resnet18` / `resnet34` / `resnet50`).
BLOCKS_PER_STAGE: dict[int, tuple[int, int, int, int]] = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}

#: Depths built from bottleneck blocks (1x1-3x3-1x1, four times wider out than in), as in torchvision.
BOTTLENECK_DEPTHS = frozenset({50})
BOTTLENECK_EXPANSION = 4

#: Encoder families: "resnet" (torchvision's ResNets) and "seresnext" (timm's SE-ResNeXt, 32 groups x 4d).
ENCODER_KINDS = ("resnet", "seresnext")
#: SE-ResNeXt's grouped convolution: 32 groups ("cardinality") of 4 channels per 64 planes ("32x4d").
SERESNEXT_GROUPS = 32
SERESNEXT_BASE_WIDTH = 4
#: Squeeze-and-excitation: hidden channels 1/16 of the block's output, rounded to a multiple of 8 (timm).
SE_REDUCTION = 16
SE_DIVISOR = 8

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


def se_hidden_channels(channels: int) -> int:
    """timm's `make_divisible(channels / 16, 8)`: what its `seresnext50_32x4d` weights were trained with."""
    value = channels / SE_REDUCTION
    return max(SE_DIVISOR, int(value + SE_DIVISOR / 2) // SE_DIVISOR * SE_DIVISOR)


class SqueezeExcite(nn.Module):
    """timm's `SEModule`: x * sigmoid(fc2(relu(fc1(mean over H, W of x)))), 1x1 convolutions with bias.

    Why: the channel gate re-weights feature types per film from its global content, which is what set the
    SE-ResNeXt encoders of the SIIM leaders apart from plain ResNets at equal depth.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = se_hidden_channels(channels)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.fc2(self.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet "v1.5": the stride sits on the 3x3 convolution), for ResNet-50; with
    `groups`, `base_width` and `se` it is timm's SE-ResNeXt block (`se` after `bn3`, before the sum).

    Why v1.5: it is what torchvision's and timm's `resnet50` ImageNet weights were trained with; the
    stride on the 1x1 convolution (v1) would load the same tensors into a different function.
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1, groups: int = 1, base_width: int = 64,
                 se: bool = False) -> None:
        super().__init__()
        out_channels = channels * BOTTLENECK_EXPANSION
        inner = int(channels * base_width / 64) * groups  # torchvision's and timm's width of the 3x3 stage
        if inner < groups:
            raise ValueError(f"{channels} planes are too few for {groups} groups of base width {base_width}; "
                             "an SE-ResNeXt encoder needs width >= 16")
        self.conv1 = nn.Conv2d(in_channels, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, inner, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = nn.Conv2d(inner, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.se: SqueezeExcite | None = SqueezeExcite(out_channels) if se else None
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        return self.relu(out + identity)


def require_int(name: str, value: object, minimum: int) -> int:
    """Return `value` if it is an integer (not a bool) >= `minimum`, else raise ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class ResNetEncoder(nn.Module):
    """ResNet-18/34/50 or SE-ResNeXt-50 trunk returning the feature map of every stage (for U-Net skips and heads).

    `kind` "resnet" builds torchvision's ResNets; "seresnext" (depth 50 only) timm's `seresnext50_32x4d`.
    `forward` returns five maps, finest first (channels for 18/34; the 50-layer stages are 4x wider:
    4, 8, 16 and 32 times `width`, see `out_channels`):

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

    def __init__(self, depth: int = 18, in_channels: int = 1, width: int = IMAGENET_WIDTH,
                 kind: str = "resnet") -> None:
        super().__init__()
        if depth not in BLOCKS_PER_STAGE:
            raise ValueError(f"encoder depth must be one of {sorted(BLOCKS_PER_STAGE)}, got {depth!r}")
        if kind not in ENCODER_KINDS:
            raise ValueError(f"encoder kind must be one of {', '.join(ENCODER_KINDS)}, got {kind!r}")
        if kind == "seresnext" and depth not in BOTTLENECK_DEPTHS:
            raise ValueError(f"an SE-ResNeXt encoder has depth 50, got {depth!r}")
        require_int("in_channels", in_channels, 1)
        require_int("width", width, 4)
        self.depth = depth
        self.kind = kind
        self.in_channels = in_channels
        self.width = width
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        planes = [width, 2 * width, 4 * width, 8 * width]
        block: type[BasicBlock | Bottleneck] = Bottleneck if depth in BOTTLENECK_DEPTHS else BasicBlock
        expansion = BOTTLENECK_EXPANSION if block is Bottleneck else 1
        blocks = BLOCKS_PER_STAGE[depth]
        current = width
        extra = ({"groups": SERESNEXT_GROUPS, "base_width": SERESNEXT_BASE_WIDTH, "se": True}
                 if kind == "seresnext" else {})
        for index, (channels, count) in enumerate(zip(planes, blocks, strict=True)):
            stride = 1 if index == 0 else 2
            layers = [block(current, channels, stride, **extra)]
            layers += [block(channels * expansion, channels, **extra) for _ in range(count - 1)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*layers))
            current = channels * expansion
        self.out_channels: tuple[int, ...] = (width, *(channels * expansion for channels in planes))
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation, so that a randomly initialised encoder trains like the reference.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def description(self) -> str:
        """What published weights this tree matches, for error messages."""
        return "timm seresnext50_32x4d" if self.kind == "seresnext" else f"torchvision ResNet-{self.depth}"

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
