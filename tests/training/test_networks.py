"""Shapes, torchvision key compatibility, weight loading, trainability and ONNX export of the networks."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from service.models.networks import (
    Classifier,
    ResNetEncoder,
    UNet,
    load_encoder_weights,
)
from training.export import export_onnx
from training.losses import multitask_loss, segmentation_loss

torch.set_num_threads(1)

# torchvision.models.resnet18().state_dict() keys without fc.weight / fc.bias, in torchvision's order.
BN = "weight bias running_mean running_var num_batches_tracked"
TORCHVISION_RESNET18_MODULES = """
conv1:conv bn1:bn
layer1.0.conv1:conv layer1.0.bn1:bn layer1.0.conv2:conv layer1.0.bn2:bn
layer1.1.conv1:conv layer1.1.bn1:bn layer1.1.conv2:conv layer1.1.bn2:bn
layer2.0.conv1:conv layer2.0.bn1:bn layer2.0.conv2:conv layer2.0.bn2:bn
layer2.0.downsample.0:conv layer2.0.downsample.1:bn
layer2.1.conv1:conv layer2.1.bn1:bn layer2.1.conv2:conv layer2.1.bn2:bn
layer3.0.conv1:conv layer3.0.bn1:bn layer3.0.conv2:conv layer3.0.bn2:bn
layer3.0.downsample.0:conv layer3.0.downsample.1:bn
layer3.1.conv1:conv layer3.1.bn1:bn layer3.1.conv2:conv layer3.1.bn2:bn
layer4.0.conv1:conv layer4.0.bn1:bn layer4.0.conv2:conv layer4.0.bn2:bn
layer4.0.downsample.0:conv layer4.0.downsample.1:bn
layer4.1.conv1:conv layer4.1.bn1:bn layer4.1.conv2:conv layer4.1.bn2:bn
"""
TORCHVISION_RESNET18_KEYS = [
    f"{name}.{suffix}"
    for entry in TORCHVISION_RESNET18_MODULES.split()
    for name, kind in [entry.split(":")]
    for suffix in (["weight"] if kind == "conv" else BN.split())
]


@pytest.fixture(scope="module")
def rgb_resnet18() -> ResNetEncoder:
    torch.manual_seed(0)
    encoder = ResNetEncoder(18, in_channels=3, width=64)
    with torch.no_grad():  # non-trivial BN statistics, so that loading them is visible in the output
        for module in encoder.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    return encoder.eval()


def test_encoder_keys_are_torchvision_resnet18_keys(rgb_resnet18: ResNetEncoder) -> None:
    assert len(TORCHVISION_RESNET18_KEYS) == 120
    assert list(rgb_resnet18.state_dict()) == TORCHVISION_RESNET18_KEYS


def test_encoder_parameter_counts_match_torchvision_without_fc(rgb_resnet18: ResNetEncoder) -> None:
    # torchvision resnet18 / resnet34: 11,689,512 / 21,797,672 parameters, of which fc holds 513,000.
    assert sum(p.numel() for p in rgb_resnet18.parameters()) == 11_689_512 - 513_000
    assert sum(p.numel() for p in ResNetEncoder(34, 3).parameters()) == 21_797_672 - 513_000


def test_unet_and_classifier_share_encoder_key_names() -> None:
    names = {k.removeprefix("encoder.") for k in UNet(18, width=64).state_dict() if k.startswith("encoder.")}
    assert names == set(TORCHVISION_RESNET18_KEYS)
    names = {k.removeprefix("encoder.") for k in Classifier(18, width=64).state_dict() if k.startswith("encoder.")}
    assert names == set(TORCHVISION_RESNET18_KEYS)


def test_load_rgb_weights_into_grey_encoder_sums_conv1(rgb_resnet18: ResNetEncoder, tmp_path) -> None:
    state = dict(rgb_resnet18.state_dict())
    state["fc.weight"] = torch.zeros(1000, 512)
    state["fc.bias"] = torch.zeros(1000)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)

    grey = load_encoder_weights(ResNetEncoder(18, in_channels=1, width=64), path).eval()

    rgb_conv1 = rgb_resnet18.conv1.weight.detach()
    assert torch.equal(grey.conv1.weight.detach(), rgb_conv1.sum(dim=1, keepdim=True))
    # One weight by hand: w[0, 0, 3, 3] = r + g + b.
    r, g, b = rgb_conv1[0, :, 3, 3].tolist()
    assert grey.conv1.weight[0, 0, 3, 3].item() == pytest.approx(r + g + b, rel=1e-6)
    assert torch.equal(grey.layer4[1].bn2.running_var, rgb_resnet18.layer4[1].bn2.running_var)
    # A grey image through the summed kernel equals the grey image replicated to RGB through the original.
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        for ours, reference in zip(grey(x), rgb_resnet18(x.repeat(1, 3, 1, 1)), strict=True):
            torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_load_rejects_mismatched_keys(rgb_resnet18: ResNetEncoder, tmp_path) -> None:
    state = dict(rgb_resnet18.state_dict())
    del state["layer2.0.downsample.1.running_var"]
    state["layer1.2.conv1.weight"] = torch.zeros(64, 64, 3, 3)  # a ResNet-34 key
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    message = r"missing keys \[layer2\.0\.downsample\.1\.running_var\]; unexpected keys \[layer1\.2\.conv1\.weight\]"
    with pytest.raises(ValueError, match=message):
        load_encoder_weights(ResNetEncoder(18, 1), path)


def test_narrow_encoder_refuses_imagenet_weights(tmp_path) -> None:
    path = tmp_path / "unused.pth"
    torch.save({}, path)
    with pytest.raises(ValueError, match=r"ImageNet weights exist only for width=64; this encoder has width=16"):
        load_encoder_weights(UNet(18, width=16).encoder, path)


@pytest.mark.parametrize("batch", [1, 3])
def test_output_shapes(batch: int) -> None:
    x = torch.rand(batch, 1, 64, 96)
    with torch.no_grad():
        assert UNet(18, width=8, scse=True).eval()(x).shape == (batch, 1, 64, 96)
        classifier = Classifier(18, width=8, aux_segmentation=True).eval()
        assert classifier(x).shape == (batch,)
        logit, mask = classifier.forward_with_mask(x)
    assert logit.shape == (batch,)
    assert mask.shape == (batch, 1, 64, 96)


def test_unet34_and_custom_decoder_shapes() -> None:
    model = UNet(34, in_channels=2, width=4, decoder_channels=(16, 8, 8, 4, 4)).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 2, 64, 64)).shape == (2, 1, 64, 64)


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"multiples of 32, got 64x80"):
        UNet(18, width=8)(torch.rand(1, 1, 64, 80))
    with pytest.raises(ValueError, match=r"encoder depth must be one of \[18, 34, 50\], got 101"):
        UNet(101)
    with pytest.raises(ValueError, match=r"decoder_channels must have 5 entries"):
        UNet(18, width=8, decoder_channels=(8, 8))
    with pytest.raises(ValueError, match=r"width must be an integer >= 4, got 2"):
        Classifier(18, width=2)
    with pytest.raises(ValueError, match=r"needs a Classifier built with aux_segmentation=True"):
        Classifier(18, width=8).forward_with_mask(torch.rand(1, 1, 64, 64))


def _square_batch() -> tuple[torch.Tensor, torch.Tensor]:
    masks = torch.zeros(2, 1, 64, 64)
    masks[0, :, 16:40, 8:24] = 1.0
    images = torch.randn(2, 1, 64, 64) * 0.1 + masks
    return images, masks


def test_unet_loss_falls_on_fixed_batch() -> None:
    torch.manual_seed(0)
    model = UNet(18, width=8, scse=True)
    images, masks = _square_batch()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        optimiser.zero_grad()
        loss = segmentation_loss(model(images), masks)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_multitask_classifier_loss_falls_on_fixed_batch() -> None:
    torch.manual_seed(0)
    model = Classifier(18, width=8, aux_segmentation=True)
    images, masks = _square_batch()
    labels = torch.tensor([1.0, 0.0])
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        optimiser.zero_grad()
        logit, mask_logits = model.forward_with_mask(images)
        loss = multitask_loss(logit, labels, mask_logits, masks, aux_weight=0.5)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize(
    ("model", "include_mask", "names"),
    [
        (UNet(18, width=8, scse=True), False, ["mask_logits"]),
        (Classifier(18, width=8), False, ["logit"]),
        (Classifier(18, width=8, aux_segmentation=True), True, ["logit", "mask_logits"]),
    ],
    ids=["unet", "classifier", "classifier+mask"],
)
def test_onnx_export_matches_pytorch_for_two_batch_sizes(model, include_mask, names, tmp_path) -> None:
    torch.manual_seed(1)
    path = tmp_path / "model.onnx"
    assert export_onnx(model, path, 64, include_mask=include_mask) == names
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["image"]
    assert [o.name for o in graph.output] == names
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert not any(module.training for module in model.modules())  # export leaves the model in eval mode
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 2):
        x = torch.randn(batch, 1, 64, 64)
        with torch.no_grad():
            expected = model.forward_with_mask(x) if include_mask else (model(x),)
        got = session.run(names, {"image": x.numpy()})
        for ours, reference in zip(got, expected, strict=True):
            assert ours.shape == tuple(reference.shape)
            assert np.abs(ours - reference.numpy()).max() < 1e-4


def test_export_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"image height must be a multiple of 32, got 48"):
        export_onnx(UNet(18, width=8), tmp_path / "m.onnx", (48, 64))
    with pytest.raises(ValueError, match=r"include_mask=True needs a Classifier built with aux_segmentation=True"):
        export_onnx(Classifier(18, width=8), tmp_path / "m.onnx", 64, include_mask=True)
