"""Pretrained encoder weights from a local file, whatever the layout they were published or saved in.

Nothing is ever downloaded: `network.encoder_weights` names a file on disk. What the loader accepts:

* **torchvision** ImageNet state dicts (`resnet18-f37072fd.pth`, `resnet34-b627a593.pth`,
  `resnet50-0676ba61.pth`): our encoder has exactly their parameter names.
* **timm** ResNet-18/34/50 and `seresnext50_32x4d` weights: timm's `ResNet` uses torchvision's parameter
  names too (`conv1`, `bn1`, `layerN.M.convK`, `downsample.0/1`, head `fc`; SE-ResNeXt adds `layerN.M.se.fc1`
  / `se.fc2`), so what differs is the packaging: `model.safetensors` from the Hugging Face hub, or a timm
  training checkpoint (`{"state_dict": ..., "state_dict_ema": ..., "epoch", "arch", ...}`), often with
  `module.` prefixes from DataParallel/DDP.
* **pretrainedmodels** (Cadene) `se_resnext50_32x4d`, the layout the SIIM-ACR 2019 leaders loaded through
  segmentation_models_pytorch: stem under `layer0.`, SE under `se_module.`, head `last_linear`; renamed to
  timm's names. (Its stem max-pool rounds up where timm's pads: same tensors, one-pixel shift of the grid.)
* **wrapped** checkpoints of any trainer: a `state_dict` / `model` / `model_state_dict` / `state_dict_ema`
  entry, `module.` and `_orig_mod.` (torch.compile) prefixes, and a whole model's state dict whose encoder
  sits under `encoder.` or `backbone.` (segmentation_models_pytorch U-Nets, our own `cascade.pt`).
* **safetensors** files (`.safetensors`), read with the `safetensors` package.

Why so strict about matching afterwards: a key that silently fails to load leaves that layer at random
initialisation and the run still "works", only worse. Every encoder tensor must come from the file; only the
ImageNet classification head (`fc`, `head.fc`, `classifier`, `last_linear`) may be left over.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from service.models.networks.encoder import IMAGENET_WIDTH, ResNetEncoder

#: Entries under which trainers store the state dict, in the order they are preferred. The raw weights come
#: before the EMA copy: the EMA is a choice, and who wants it can export it as a plain state dict.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "state_dict_ema")
#: Prefixes added by wrappers of the whole model (DataParallel/DDP, torch.compile).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: Where the encoder sits inside a whole segmentation or classification model's state dict.
ENCODER_PREFIXES = ("encoder.", "backbone.")
#: pretrainedmodels' SE-ResNeXt names → timm's (ours): the stem lives under `layer0.`, SE under `se_module.`.
CADENE_STEM = (("layer0.conv1.", "conv1."), ("layer0.bn1.", "bn1."))
CADENE_SE = (".se_module.", ".se.")
#: BatchNorm's update counter: absent from older published files, filled with 0 as BatchNorm itself does.
COUNTER_SUFFIX = ".num_batches_tracked"
#: ImageNet classification heads: present in published encoder weights, never used here.
HEAD_PREFIXES = ("fc.", "head.fc.", "classifier.", "last_linear.")


def read_state_file(path: str | os.PathLike[str]) -> Mapping[str, object]:
    """The raw contents of a `.pth`/`.pt`/`.bin` (torch, weights only) or `.safetensors` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file {os.fspath(path)!r} not found (network.encoder_weights)")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as error:  # pragma: no cover - the train extra installs it
            raise ValueError(f"{os.fspath(path)!r} is a safetensors file; install the `safetensors` package") from error
        return load_file(os.fspath(path), device="cpu")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping):
        # ValueError like every other unusable file: the training CLI reports those as one line.
        raise ValueError(  # noqa: TRY004
            f"{os.fspath(path)!r} does not hold a state dict (got {type(loaded).__name__})")
    return loaded


def unwrap_state(loaded: Mapping[str, object], path: str = "") -> dict[str, Tensor]:
    """The tensors of a state dict, out of trainer wrappers and whole-model prefixes (see the module docstring)."""
    state: Mapping[str, object] = loaded
    while not any(isinstance(value, Tensor) for value in state.values()):
        inner = next((state[key] for key in WRAPPER_KEYS if isinstance(state.get(key), Mapping)), None)
        if inner is None:
            raise ValueError(f"{path!r} holds no tensors and none of the entries {', '.join(WRAPPER_KEYS)}; "
                             f"top-level keys: {', '.join(sorted(map(str, state))[:8])}")
        state = inner
    tensors = {str(key): value for key, value in state.items() if isinstance(value, Tensor)}
    for prefix in WRAPPER_PREFIXES:
        if tensors and all(key.startswith(prefix) for key in tensors):
            tensors = {key.removeprefix(prefix): value for key, value in tensors.items()}
    stems = ("conv1.weight", "layer0.conv1.weight")
    if not any(stem in tensors for stem in stems):
        for prefix in ENCODER_PREFIXES:
            inner = {key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(prefix)}
            if any(stem in inner for stem in stems):
                tensors = inner
                break
    if "layer0.conv1.weight" in tensors:
        tensors = {_cadene_to_timm(key): value for key, value in tensors.items()}
    return {key: value for key, value in tensors.items() if not key.startswith(HEAD_PREFIXES)}


def _cadene_to_timm(key: str) -> str:
    """A pretrainedmodels SE-ResNeXt key under timm's name (`layer0.conv1.weight` -> `conv1.weight`)."""
    for old, new in CADENE_STEM:
        if key.startswith(old):
            key = new + key.removeprefix(old)
    return key.replace(*CADENE_SE)


def _short(keys: set[str], limit: int = 8) -> str:
    ordered = sorted(keys)
    text = ", ".join(ordered[:limit])
    return text + (f", ... ({len(ordered) - limit} more)" if len(ordered) > limit else "")


def adapt_first_conv(state: dict[str, Tensor], in_channels: int) -> dict[str, Tensor]:
    """RGB `conv1.weight` summed over its input channels for a 1-channel encoder.

    A grey image replicated to RGB gives the same first-layer response as the grey image through the summed
    kernel, so the pretrained features survive the change of input.
    """
    conv1 = state.get("conv1.weight")
    if isinstance(conv1, Tensor) and conv1.dim() == 4 and conv1.shape[1] != in_channels:
        if conv1.shape[1] == 3 and in_channels == 1:
            return {**state, "conv1.weight": conv1.sum(dim=1, keepdim=True)}
        raise ValueError(f"conv1.weight has {conv1.shape[1]} input channels; the encoder has {in_channels} "
                         "(only 3 -> 1 by summing over RGB is supported)")
    return state


def load_encoder_weights(encoder: ResNetEncoder, path: str | os.PathLike[str]) -> ResNetEncoder:
    """Load pretrained weights from `path` into `encoder`, every tensor or nothing.

    Missing or unexpected keys (e.g. ResNet-34 weights into a ResNet-18) or shapes raise ValueError naming
    them; nothing is loaded partially. Returns the encoder, for chaining.
    """
    if encoder.width != IMAGENET_WIDTH:
        raise ValueError(
            f"ImageNet weights exist only for width={IMAGENET_WIDTH}; this encoder has width={encoder.width} "
            "and must be trained from scratch"
        )
    state = adapt_first_conv(unwrap_state(read_state_file(path), os.fspath(path)), encoder.in_channels)
    expected = encoder.state_dict()
    for key in set(expected) - set(state):
        if key.endswith(COUNTER_SUFFIX):  # a counter, not a learned tensor: what BatchNorm does for old files
            state[key] = torch.zeros_like(expected[key])
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        raise ValueError(
            f"{os.fspath(path)!r} does not match a {encoder.description}: "
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
