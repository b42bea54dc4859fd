"""A tiny cascade trained end to end: data → cache → both models → thresholds → export → service cascade."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from service.models.manifest import find_models, load_manifest, sha256_file
from training.__main__ import main as training_main
from training.config import from_dict
from training.data import build_cache, index_siim
from training.demo import export_cascade
from training.evaluate import evaluate
from training.train import load, train_cascade

TINY = {
    "name": "tiny", "version": "0.0.1", "seed": 3,
    "data": {"folds": 3, "fold": 0},
    "classifier": {"input": {"size": 64}, "network": {"width": 8, "aux_segmentation": True},
                   "optim": {"epochs": 2, "batch_size": 8, "average_top_k": 2}, "augment": {"strength": 0.5}},
    "segmenter": {"input": {"size": 64}, "network": {"width": 8, "decoder_blocks": 3, "encoder_from_classifier": True},
                  "optim": {"epochs": 2, "batch_size": 8, "average_top_k": 2},
                  "sampling": {"positive_rate_start": 1.0, "positive_rate_end": 0.5}},
    "evaluation": {"triplet_tops": [0.5, 0.7], "triplet_areas": [0, 500], "triplet_bottoms": [0.3]},
}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    code = training_main(["synth", "--out", str(root / "train"), "--count", "30", "--seed", "5", "--size", "256",
                          "--prevalence", "0.5", "--procedural-shapes", "--quiet", "--workers", "1"])
    assert code == 0
    code = training_main(["synth", "--out", str(root / "test"), "--count", "8", "--seed", "6", "--size", "256",
                          "--prevalence", "0.5", "--procedural-shapes", "--quiet", "--workers", "1"])
    assert code == 0
    return root


def test_train_export_evaluate(tiny_data, tmp_path):
    torch.set_num_threads(1)
    config = from_dict(TINY)
    cached = build_cache(index_siim(tiny_data / "train"), 64, tmp_path / "cache", workers=1, progress=False)
    trained = train_cascade(config, cached, tmp_path / "run", progress=False)

    assert 0 < trained.gate <= trained.operating_point < 1
    assert trained.validation["validation_images"] == 10 and (tmp_path / "run" / "folds.csv").is_file()
    assert {f.name for f in (tmp_path / "run" / "classifier").glob("epoch*.pt")} <= {"epoch000.pt", "epoch001.pt"}
    torch.testing.assert_close(trained.segmenter.encoder.conv1.weight.shape, trained.classifier.encoder.conv1.weight.shape)

    reloaded = load(tmp_path / "run" / "cascade.pt", config)
    assert reloaded.gate == trained.gate and reloaded.triplet == trained.triplet

    directories = export_cascade(trained, config, tmp_path / "models", "pytest", cached)
    assert sorted(m.name for _, m in find_models(tmp_path / "models")) == ["ptx-classifier-tiny", "ptx-segmenter-tiny"]
    classifier = load_manifest(directories["classification"])
    assert classifier.thresholds.gate == pytest.approx(trained.gate)
    assert classifier.training.data_fingerprint == cached.directory.name
    for name, digest in classifier.sha256.items():
        assert sha256_file(directories["classification"] / name) == digest

    summary = evaluate(directories["classification"], directories["segmentation"], index_siim(tiny_data / "test"),
                       tmp_path / "report", "tiny", "8 films", progress=False)
    assert summary["counts"]["images"] == 8
    assert 0.0 <= summary["segmentation"]["cascade"]["mean_dice"] <= 1.0
    assert "cascade_no_tta" in summary["segmentation"]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["triage"]["operating_point"]["threshold"] == pytest.approx(trained.operating_point)


def test_cli_reports_bad_data_in_one_line(tmp_path, capsys):
    (tmp_path / "dicom").mkdir()
    (tmp_path / "train-rle.csv").write_text("ImageId, EncodedPixels\n1.2.3,-1\n")
    config = tmp_path / "c.yaml"
    config.write_text("name: x\n")
    assert training_main(["train", "--config", str(config), "--data", str(tmp_path)]) == 2
    assert "1 ImageId(s)" in capsys.readouterr().err
    config.write_text("name: x\nclassifier: {optim: {lrr: 1}}\n")
    assert training_main(["train", "--config", str(config), "--data", str(tmp_path)]) == 2
    assert "classifier.optim.lrr" in capsys.readouterr().err


def test_training_resumes_only_with_the_same_config(tiny_data, tmp_path):
    from training.data import build_cache
    from training.datasets import RadiographDataset
    from training.tasks import build_classifier, classifier_task, input_spec
    from training.trainer import fit

    torch.set_num_threads(1)
    config = from_dict(TINY).classifier
    cached = build_cache(index_siim(tiny_data / "train"), 64, tmp_path / "cache", workers=1, progress=False)
    spec = input_spec(config)
    train = RadiographDataset(cached, np.arange(20), spec)
    val = RadiographDataset(cached, np.arange(20, 30), spec)
    first = fit(build_classifier(config), classifier_task(config, val), train, config, tmp_path / "run", 1, progress=False)
    again = fit(build_classifier(config), classifier_task(config, val), train, config, tmp_path / "run", 1, progress=False)
    assert again.epochs == first.epochs and again.images_seen == first.images_seen, "finished run resumed, not redone"
    assert again.seconds >= first.history[-1]["seconds"] > 0, "a resumed run's training time includes its history's"
    changed = from_dict({**TINY, "classifier": {**TINY["classifier"], "optim": {"epochs": 3, "batch_size": 8}}}).classifier
    with pytest.raises(ValueError, match="another configuration"):
        fit(build_classifier(changed), classifier_task(changed, val), train, changed, tmp_path / "run", 1, progress=False)


def test_same_seed_same_weights(tiny_data, tmp_path):
    from training import augment as augmentation
    from training.datasets import RadiographDataset
    from training.tasks import build_classifier, classifier_task, input_spec
    from training.trainer import fit, seed_everything

    torch.set_num_threads(1)
    config = from_dict({**TINY, "classifier": {**TINY["classifier"], "optim": {"epochs": 1, "batch_size": 8}}}).classifier
    cached = build_cache(index_siim(tiny_data / "train"), 64, tmp_path / "cache", workers=1, progress=False)
    spec = input_spec(config)
    states = []
    for run in ("a", "b", "c"):
        seed_everything(7 if run != "c" else 8)  # the network's initialisation is seeded too
        model = build_classifier(config)
        train = RadiographDataset(cached, np.arange(20), spec,
                                  augmentation.build(config.augment, spec.size, 7 if run != "c" else 8))
        val = RadiographDataset(cached, np.arange(20, 30), spec)
        fit(model, classifier_task(config, val), train, config, tmp_path / run, 7 if run != "c" else 8, progress=False)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0] if states[0][k].is_floating_point())
