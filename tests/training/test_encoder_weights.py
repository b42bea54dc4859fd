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
