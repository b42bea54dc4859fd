"""Pretrained encoder files in every layout we accept land tensor for tensor; anything else fails loudly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from service.models.networks import (
    Classifier,
    ResNetEncoder,
    UNet,
    load_encoder_weights,
)
from training.config import check_files, from_dict

torch.set_num_threads(1)


def _reference(depth: int) -> dict[str, torch.Tensor]:
    """An RGB encoder's state with every tensor distinct (random), plus an ImageNet head."""
    torch.manual_seed(depth)
    state = {key: (torch.randn_like(value.float()) if value.is_floating_point() else value + 7)
             for key, value in ResNetEncoder(depth, in_channels=3).state_dict().items()}
    width = 2048 if depth == 50 else 512
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, width), torch.randn(1000)
    return state


def _assert_landed(encoder: ResNetEncoder, reference: dict[str, torch.Tensor]) -> None:
    loaded = encoder.state_dict()
    assert set(loaded) == {key for key in reference if not key.startswith("fc.")}
    for key, value in loaded.items():
        expected = reference[key].sum(dim=1, keepdim=True) if key == "conv1.weight" else reference[key]
        assert torch.equal(value, expected.to(value.dtype)), key


def _torchvision(state, path):
    torch.save(state, path)


def _timm_checkpoint(state, path):  # timm's train.py: wrapped, DataParallel prefixes, an EMA copy beside it
    wrapped = {f"module.{key}": value for key, value in state.items()}
    torch.save({"epoch": 3, "arch": "resnet34", "state_dict": wrapped,
                "state_dict_ema": {key: torch.zeros_like(value) for key, value in wrapped.items()}}, path)


def _smp_unet(state, path):  # a whole segmentation model: the encoder under `encoder.`, a decoder beside it
    whole = {f"encoder.{key}": value for key, value in state.items() if not key.startswith("fc.")}
    whole["decoder.blocks.0.conv1.0.weight"] = torch.randn(8, 8, 3, 3)
    torch.save({"model_state_dict": whole}, path)


def _safetensors(state, path):  # timm on the Hugging Face hub: model.safetensors, torchvision names
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("layout,suffix", [(_torchvision, ".pth"), (_timm_checkpoint, ".pth.tar"),
                                           (_smp_unet, ".pt"), (_safetensors, ".safetensors")])
def test_every_tensor_lands(depth, layout, suffix, tmp_path) -> None:
    reference = _reference(depth)
    path = tmp_path / f"weights{suffix}"
    layout(reference, path)
    encoder = load_encoder_weights(ResNetEncoder(depth, in_channels=1), path)
    _assert_landed(encoder, reference)


def test_resnet50_matches_torchvision_parameter_count() -> None:
    # torchvision resnet50: 25,557,032 parameters, of which fc holds 2,049,000.
    assert sum(p.numel() for p in ResNetEncoder(50, 3).parameters()) == 25_557_032 - 2_049_000
    assert ResNetEncoder(50).out_channels == (64, 256, 512, 1024, 2048)
    x = torch.zeros(1, 1, 64, 64)
    assert UNet(50, width=8)(x).shape == (1, 1, 64, 64)
    assert Classifier(50, width=8, aux_segmentation=True).forward_with_mask(x)[1].shape == (1, 1, 64, 64)


def test_wrong_depth_and_missing_file_fail_loudly(tmp_path) -> None:
    path = tmp_path / "resnet34.safetensors"
    _safetensors(_reference(34), path)
    with pytest.raises(ValueError, match="does not match a torchvision ResNet-18"):
        load_encoder_weights(ResNetEncoder(18), path)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_encoder_weights(ResNetEncoder(18), tmp_path / "nowhere.pth")
    config = from_dict({"segmenter": {"network": {"width": 64, "encoder_weights": str(tmp_path / "nowhere.pth")},
                                      "init_from": str(tmp_path / "run0")}})
    with pytest.raises(ValueError, match=r"segmenter\.network\.encoder_weights: .*nowhere\.pth; segmenter\.init_from"):
        check_files(config)


def _timm_seresnext50_32x4d() -> dict[str, torch.Tensor]:
    """timm's `seresnext50_32x4d` state dict, key for key and shape for shape, written out from timm's definition
    (ResNet(Bottleneck, [3, 4, 6, 3], cardinality=32, base_width=4, block_args=dict(attn_layer='se')), SEModule
    with rd = make_divisible(C / 16, 8) and biased 1x1 convolutions `fc1` / `fc2`), not from our encoder; RGB
    input, ImageNet head `fc`, every tensor random."""
    torch.manual_seed(50)
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(name: str, channels: int) -> None:
        shapes.update({f"{name}.{p}": (channels,) for p in ("weight", "bias", "running_mean", "running_var")})
        shapes[f"{name}.num_batches_tracked"] = ()

    shapes["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        width, out = planes * 4 // 64 * 32, planes * 4
        for block in range(blocks):
            name = f"layer{stage}.{block}"
            shapes[f"{name}.conv1.weight"] = (width, inplanes, 1, 1)
            bn(f"{name}.bn1", width)
            shapes[f"{name}.conv2.weight"] = (width, width // 32, 3, 3)
            bn(f"{name}.bn2", width)
            shapes[f"{name}.conv3.weight"] = (out, width, 1, 1)
            bn(f"{name}.bn3", out)
            rd = out // 16
            shapes.update({f"{name}.se.fc1.weight": (rd, out, 1, 1), f"{name}.se.fc1.bias": (rd,),
                           f"{name}.se.fc2.weight": (out, rd, 1, 1), f"{name}.se.fc2.bias": (out,)})
            if block == 0:
                shapes[f"{name}.downsample.0.weight"] = (out, inplanes, 1, 1)
                bn(f"{name}.downsample.1", out)
            inplanes = out
    shapes.update({"fc.weight": (1000, 2048), "fc.bias": (1000,)})
    return {key: (torch.randint(0, 99, shape) if key.endswith("num_batches_tracked") else torch.randn(shape))
            for key, shape in shapes.items()}


def _cadene(state, path):  # pretrainedmodels' se_resnext50_32x4d: layer0 stem, se_module, last_linear, no counters
    renamed = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        key = f"layer0.{key}" if key.startswith(("conv1.", "bn1.")) else key.replace(".se.", ".se_module.")
        renamed[key.replace("fc.", "last_linear.") if key.startswith("fc.") else key] = value
    torch.save(renamed, path)


@pytest.mark.parametrize("layout,suffix", [(_safetensors, ".safetensors"), (_timm_checkpoint, ".pth.tar"),
                                           (_cadene, ".pth")])
def test_seresnext50_from_timm_and_pretrainedmodels_files(layout, suffix, tmp_path) -> None:
    reference = _timm_seresnext50_32x4d()
    # timm lists seresnext50_32x4d at 27.56 M parameters, its 1000-class head included.
    assert sum(v.numel() for k, v in reference.items() if "running" not in k and "num_batches" not in k) == 27_559_896
    path = tmp_path / f"seresnext50{suffix}"
    layout(reference, path)
    encoder = load_encoder_weights(ResNetEncoder(50, in_channels=1, kind="seresnext"), path)
    loaded = encoder.state_dict()
    assert set(loaded) == {key for key in reference if not key.startswith("fc.")}
    for key, value in loaded.items():
        if key.endswith("num_batches_tracked") and layout is _cadene:
            assert int(value) == 0, key  # absent from the file: BatchNorm's own default
            continue
        expected = reference[key].sum(dim=1, keepdim=True) if key == "conv1.weight" else reference[key]
        assert torch.equal(value, expected.to(value.dtype)), key
    out = UNet(50, width=64, encoder_kind="seresnext", decoder_blocks=3)(torch.zeros(1, 1, 64, 64))
    assert out.shape == (1, 1, 64, 64)


def test_seresnext_refuses_resnet50_weights_and_bad_shapes(tmp_path) -> None:
    path = tmp_path / "resnet50.pth"
    torch.save(_reference(50), path)
    with pytest.raises(ValueError, match=r"does not match a timm seresnext50_32x4d: missing keys \[layer1.0.se.fc1"):
        load_encoder_weights(ResNetEncoder(50, kind="seresnext"), path)
    with pytest.raises(ValueError, match="an SE-ResNeXt encoder has depth 50, got 34"):
        ResNetEncoder(34, kind="seresnext")
    with pytest.raises(ValueError, match="encoder kind must be one of resnet, seresnext, got 'senet'"):
        ResNetEncoder(50, kind="senet")
    with pytest.raises(ValueError, match="needs width >= 16"):
        ResNetEncoder(50, width=8, kind="seresnext")
