"""Ensembles of fold models: the logit of the members' mean probability, on one batch, exported as one graph."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch

from service.models.networks import (
    Classifier,
    ClassifierEnsemble,
    UNet,
    UNetEnsemble,
    mean_probability_logit,
)
from training.export import export_onnx

torch.set_num_threads(1)


def test_mean_probability_logit_by_hand() -> None:
    # Members at p = 0.9 and 0.5: the ensemble's probability is 0.7, its logit ln(0.7 / 0.3).
    logits = torch.tensor([[math.log(9.0)], [0.0]])
    assert mean_probability_logit(logits).item() == pytest.approx(math.log(7 / 3), abs=1e-6)
    # One member: its own logit back.
    assert mean_probability_logit(torch.tensor([[2.5, -3.0]])).tolist() == pytest.approx([2.5, -3.0], abs=1e-5)


def test_confident_members_keep_finite_logits() -> None:
    logits = torch.tensor([[40.0, -60.0, 100.0, 30.0], [35.0, -90.0, -100.0, -30.0]])
    expected = torch.logit(torch.sigmoid(logits.double()).mean(0)).float()  # float64: exact where it is finite
    got = mean_probability_logit(logits)
    assert torch.isfinite(got).all()
    # 1 - p = (e^-40 + e^-35) / 2, so logit p = 35 - ln((1 + e^-5) / 2); p = (e^-60 + e^-90) / 2 likewise.
    by_hand = [35 - math.log((1 + math.exp(-5)) / 2), -60 + math.log((1 + math.exp(-30)) / 2)]
    torch.testing.assert_close(got[:2], torch.tensor(by_hand), atol=1e-4, rtol=0)
    torch.testing.assert_close(got[2:], expected[2:], atol=1e-5, rtol=0)
    # Through float32 probabilities the first would have rounded to 1: an infinite logit.
    assert torch.logit(torch.sigmoid(logits).mean(0))[0] == math.inf


@pytest.mark.parametrize("kind", ["classifier", "segmenter"])
def test_the_exported_graph_is_the_members_mean_probability(kind, tmp_path) -> None:
    torch.manual_seed(0)
    if kind == "classifier":
        members = [Classifier(18, width=8).eval() for _ in range(3)]
        ensemble = ClassifierEnsemble(members).eval()
    else:
        members = [UNet(18, width=8, decoder_blocks=3).eval() for _ in range(3)]
        ensemble = UNetEnsemble(members).eval()
    export_onnx(ensemble, tmp_path / "model.onnx", 64)
    images = np.random.default_rng(1).standard_normal((3, 1, 64, 64)).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": images})
    with torch.no_grad():
        mean = torch.stack([torch.sigmoid(member(torch.from_numpy(images))) for member in members]).mean(0)
    assert logits.shape == tuple(mean.shape)
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), mean.numpy(), atol=1e-5)
    # model.pt holds every member's weights, each under its own prefix.
    assert set(ensemble.state_dict()) == {f"members.{i}.{key}" for i in range(3) for key in members[0].state_dict()}


def test_members_are_checked_when_the_ensemble_is_built() -> None:
    with pytest.raises(ValueError, match="an ensemble needs at least one member"):
        ClassifierEnsemble([])
    with pytest.raises(ValueError, match="every member must be a UNet, got Classifier"):
        UNetEnsemble([Classifier(18, width=8)])
    with pytest.raises(ValueError, match=r"members take different input channels: \[1, 3\]"):
        ClassifierEnsemble([Classifier(18, width=8), Classifier(18, in_channels=3, width=8)])
    with pytest.raises(ValueError, match="train its members, not the ensemble"):
        ClassifierEnsemble([Classifier(18, width=8, aux_segmentation=True)]).forward_with_mask(
            torch.zeros(1, 1, 64, 64))
