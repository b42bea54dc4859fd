"""The training loop: early-stopped runs stay stopped, warm-up freezes the encoder, clipping bounds steps,
the segmenter is selected on all films, and the checkpoint holds everything a resume needs."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from tests.training.test_runs import TINY, synthetic_set
from training.config import from_dict
from training.datasets import RadiographDataset
from training.tasks import build_classifier, classifier_task, input_spec, segmenter_task
from training.trainer import Task, fit

torch.set_num_threads(1)


def _setup(tmp_path, **optim):
    base = from_dict(TINY).classifier
    config = dataclasses.replace(base, optim=dataclasses.replace(base.optim, **optim))
    cached = synthetic_set(tmp_path)
    spec = input_spec(config)
    return config, RadiographDataset(cached, np.arange(12), spec), RadiographDataset(cached, np.arange(12, 18), spec)


def test_an_early_stopped_run_trains_no_more_on_rerun(tmp_path) -> None:
    config, train, val = _setup(tmp_path, epochs=5, early_stopping=1, average_top_k=1)
    real = classifier_task(config, val)
    flat = Task("classifier", real.loss, lambda model: 0.5, "flat")  # never improves: stops after epoch 2
    first = fit(build_classifier(config), flat, train, config, tmp_path / "run", 1, progress=False)
    assert first.epochs == 2
    again = fit(build_classifier(config), flat, train, config, tmp_path / "run", 1, progress=False)
    assert (again.epochs, again.images_seen) == (first.epochs, first.images_seen)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert state["stopped"] and "scaler" in state and "cuda_rng" in state


def test_warm_up_freezes_the_encoder_then_releases_it(tmp_path) -> None:
    config, train, val = _setup(tmp_path, epochs=2, average_top_k=2, freeze_encoder_epochs=1)
    metrics = iter([0.1, 0.2, 0.3])
    task = Task("classifier", classifier_task(config, val).loss, lambda model: next(metrics), "rising")
    torch.manual_seed(0)
    model = build_classifier(config)
    initial = {key: value.clone() for key, value in model.encoder.state_dict().items()}
    fit(model, task, train, config, tmp_path / "run", 1, progress=False)
    after_warm_up = torch.load(tmp_path / "run" / "epoch000.pt", weights_only=True)
    after_release = torch.load(tmp_path / "run" / "epoch001.pt", weights_only=True)
    for key, value in initial.items():
        assert torch.equal(after_warm_up[f"encoder.{key}"], value), key
    assert not torch.equal(after_release["encoder.conv1.weight"], initial["conv1.weight"])
    assert not torch.equal(after_warm_up["fc.weight"], after_release["fc.weight"]), "the head trained throughout"
    assert all(p.requires_grad for p in model.parameters())


def test_gradient_clipping_bounds_the_steps(tmp_path) -> None:
    moved = {}
    for clip in (None, 1e-12):
        config, train, val = _setup(tmp_path / str(clip), epochs=1, weight_decay=0.0, clip_grad_norm=clip,
                                    schedule="constant")
        torch.manual_seed(0)
        model = build_classifier(config)
        before = model.fc.weight.detach().clone()
        fit(model, classifier_task(config, val), train, config, tmp_path / str(clip) / "run", 1, progress=False)
        moved[clip] = float((model.fc.weight.detach() - before).abs().max())
    assert moved[None] > 1e-4 and moved[1e-12] < moved[None] / 100


class _Constant(nn.Module):
    """A 'segmenter' answering the same logit everywhere."""

    def __init__(self, logit: float) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.tensor(logit))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logit.expand(images.shape[0], 1, *images.shape[-2:])


def test_segmenter_selection_counts_empty_films(tmp_path) -> None:
    config = from_dict(TINY).segmenter
    cached = synthetic_set(tmp_path)
    task = segmenter_task(config, RadiographDataset(cached, np.arange(18), input_spec(config)))
    paints_everything, answers_empty = task.validate(_Constant(9.0)), task.validate(_Constant(-9.0))
    assert answers_empty == 0.5  # the 9 negatives count 1 each, the 9 positives 0
    assert paints_everything < answers_empty
