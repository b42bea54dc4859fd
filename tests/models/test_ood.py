"""The OOD description: its distance is the Mahalanobis distance, the manifest refuses an inconsistent one, and a
classifier without it (an older export) still classifies, with no distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.models.backends.onnxruntime import OnnxRuntimeBackend
from service.models.inference import classify_rows, classify_scores
from service.models.manifest import Manifest, load_manifest
from service.models.networks import Classifier
from service.models.ood import NO_DISTANCE, OodModel, OodStatistics, encode_array
from tests.servers import REPO
from training.export import export_onnx
from training.ood import OodFilms, fit_statistics, ledoit_wolf

FILMS = OodFilms(np.zeros((2, 1, 32, 32), np.float32), "fit", np.zeros((1, 1, 32, 32), np.float32), "held out")


def features(seed: int, count: int, dimensions: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dimensions, dimensions))
    return rng.normal(size=(count, dimensions)) @ mixing + 3.0


def test_full_rank_distance_is_the_mahalanobis_distance_under_the_shrunk_covariance():
    fit, probe = features(0, 400), features(1, 5)
    stats = fit_statistics(fit, features(2, 100), FILMS, max_components=12)
    mean, covariance, _ = ledoit_wolf(fit)
    centred = probe - mean
    expected = np.sqrt(np.einsum("ij,jk,ik->i", centred, np.linalg.inv(covariance), centred))
    np.testing.assert_allclose(OodModel.from_statistics(stats).distance(probe), expected, rtol=1e-4)


def test_the_threshold_is_the_quantile_of_the_held_out_distances_as_stored():
    held_out = features(2, 200)
    stats = fit_statistics(features(0, 400), held_out, FILMS, max_components=4)  # low rank: 4 of 12 axes
    distances = OodModel.from_statistics(stats).distance(held_out)
    assert stats.threshold == pytest.approx(np.quantile(distances, 0.99))
    assert np.mean(distances > stats.threshold) <= 0.01 and len(stats.variances) == 4
    far = OodModel.from_statistics(stats).distance(features(2, 20) * 3.0)  # the same films, three times as bright
    assert np.all(far > stats.threshold)


def test_ledoit_wolf_makes_a_singular_sample_covariance_invertible():
    few = features(3, 6, dimensions=20)  # fewer films than features: the sample covariance has rank 5
    _, covariance, shrinkage = ledoit_wolf(few)
    assert 0 < shrinkage <= 1 and np.linalg.eigvalsh(covariance).min() > 0
    _, _, plenty = ledoit_wolf(features(3, 5000, dimensions=4))
    assert plenty < 0.01  # with many films the sample covariance is trusted


def bundled() -> Manifest:
    return load_manifest(REPO / "models" / "ptx-classifier-demo" / "0.2.0")


def test_the_manifest_refuses_an_inconsistent_description():
    manifest = bundled()
    assert manifest.ood is not None and manifest.outputs == ["logit", "features"]
    data = manifest.model_dump(mode="json")
    with pytest.raises(ValueError, match="lack"):
        Manifest.model_validate({**data, "outputs": ["logit"]})
    with pytest.raises(ValueError, match="segmentation manifest has neither"):
        Manifest.model_validate({**data, "task": "segmentation"})
    short = {**data["ood"], "mean": encode_array(np.zeros(manifest.ood.dimensions - 1))}
    with pytest.raises(ValueError, match="bytes of float32"):
        Manifest.model_validate({**data, "ood": short})
    with pytest.raises(ValueError, match="residual_variance must be > 0"):
        OodStatistics.model_validate({**data["ood"], "residual_variance": 0.0})


def test_a_classifier_without_features_classifies_with_no_distance(tmp_path):
    torch.manual_seed(0)
    network = Classifier(encoder_depth=18, width=8).eval()
    export_onnx(network, tmp_path / "old.onnx", 64)  # the single-output export of before issue 16
    backend = OnnxRuntimeBackend(tmp_path / "old.onnx", providers=["CPUExecutionProvider"],
                                 available_providers=["CPUExecutionProvider"])
    batch = np.random.default_rng(0).normal(size=(3, 1, 64, 64)).astype(np.float32)
    rows = classify_rows(backend, batch, True, None)
    np.testing.assert_allclose(rows[:, 0], classify_scores(backend, batch, True))
    assert np.all(rows[:, 1] == NO_DISTANCE)
    stats = fit_statistics(np.random.default_rng(1).normal(size=(50, 56)), np.zeros((5, 56)), FILMS)
    with pytest.raises(ValueError, match="no 'features' output"):
        classify_rows(backend, batch, True, OodModel.from_statistics(stats))
