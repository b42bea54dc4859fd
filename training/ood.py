"""The out-of-distribution description a classifier's manifest carries (service/models/ood.py reads it).

At export: the pooled encoder features (the ONNX file's `features` output, the very file served, on the
service's own preprocessing, no test-time augmentation) of training films give the mean and the Ledoit-Wolf
covariance; the features of films held out from that fit -- the validation fold, which the classifier never
trained on either -- give the threshold, a high quantile (0.99 by default) of their distance. Why held-out
films for the threshold: the training films' own distances are smaller than a new in-distribution film's (the
statistics were fitted to them), so a threshold from them would flag ordinary new films.

Why low rank: a real classifier has 512-2048 features, whose full covariance would be megabytes of JSON. The
top `max_components` principal axes of the shrunk covariance keep their own variances; the others share their
mean variance (see `OodModel.distance`). For the demo's 128 features, 32 axes carry most of the variance and
the distance is measured on every axis all the same.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.models.ood import FEATURES_OUTPUT, OodModel, OodStatistics, encode_array

QUANTILE = 0.99
MAX_COMPONENTS = 32
BATCH = 16


@dataclass(frozen=True)
class OodFilms:
    """Preprocessed films (N, C, S, S) float32: `fit` (training films) and `held_out` (never fitted on)."""

    fit: np.ndarray
    fit_description: str
    held_out: np.ndarray
    held_out_description: str
    quantile: float = QUANTILE

    def __post_init__(self) -> None:
        if len(self.fit) < 2 or len(self.held_out) < 1:
            raise ValueError(f"the OOD fit needs >= 2 training films and >= 1 held-out film, got {len(self.fit)} "
                             f"and {len(self.held_out)}")
        if not 0 < self.quantile < 1:
            raise ValueError(f"quantile must be in (0, 1), got {self.quantile!r}")
        if not (self.fit_description.strip() and self.held_out_description.strip()):
            raise ValueError("say which films fitted the statistics and which set the threshold")


def features_of(onnx_path: Path, inputs: np.ndarray, threads: int = 0) -> np.ndarray:
    """The `features` output (N, D) of an ONNX classifier for preprocessed films, on the CPU."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
    session = ort.InferenceSession(os.fspath(onnx_path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    if FEATURES_OUTPUT not in [output.name for output in session.get_outputs()]:
        raise ValueError(f"{Path(onnx_path).name} has no {FEATURES_OUTPUT!r} output: re-export the classifier")
    return np.concatenate([session.run([FEATURES_OUTPUT], {name: np.ascontiguousarray(inputs[start:start + BATCH],
                                                                                      dtype=np.float32)})[0]
                           for start in range(0, len(inputs), BATCH)]).astype(np.float64)


def ledoit_wolf(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean, shrunk covariance, shrinkage) of feature rows, after Ledoit & Wolf (2004), "A well-conditioned
    estimator for large-dimensional covariance matrices": the sample covariance pulled towards its mean variance
    times the identity by the amount that minimises the expected squared error. Why shrink: with a few hundred
    films and 128+ features the sample covariance is near-singular, and its inverse (the Mahalanobis metric)
    would blow up along axes where the training films happen not to vary."""
    x = np.asarray(features, dtype=np.float64)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"need at least 2 feature rows, got {n}")
    mean = x.mean(axis=0)
    centred = x - mean
    sample = centred.T @ centred / n
    mu = float(np.trace(sample)) / d
    delta = float(np.sum((sample - mu * np.eye(d)) ** 2)) / d
    # sum_k ||x_k x_k' - S||_F^2 = sum_k ||x_k||^4 - n ||S||_F^2, since sum_k x_k x_k' = n S
    beta = (float(np.sum(np.sum(centred**2, axis=1) ** 2)) - n * float(np.sum(sample**2))) / (n * n * d)
    shrinkage = 0.0 if delta == 0 else min(max(beta, 0.0), delta) / delta
    return mean, shrinkage * mu * np.eye(d) + (1 - shrinkage) * sample, shrinkage


def fit_statistics(fit_features: np.ndarray, held_out_features: np.ndarray, films: OodFilms,
                   max_components: int = MAX_COMPONENTS) -> OodStatistics:
    """The manifest's `ood` section from training films' features and held-out films' features."""
    mean, covariance, shrinkage = ledoit_wolf(fit_features)
    values, vectors = np.linalg.eigh(covariance)
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    dimensions = len(mean)
    k = min(max_components, dimensions)
    residual = float(values[k:].mean()) if k < dimensions else 0.0
    draft = {"dimensions": dimensions, "mean": encode_array(mean), "components": encode_array(vectors[:, :k].T),
             "variances": [float(v) for v in values[:k].astype(np.float32)], "residual_variance": residual,
             "shrinkage": shrinkage, "quantile": films.quantile, "fitted_on": films.fit_description,
             "films": len(fit_features), "threshold_on": films.held_out_description,
             "threshold_films": len(held_out_features)}
    # The threshold from the statistics as stored (float32), so the service measures exactly what was measured here.
    stored = OodModel.from_statistics(OodStatistics(**draft, threshold=1.0))
    distances = stored.distance(held_out_features)
    return OodStatistics(**draft, threshold=float(np.quantile(distances, films.quantile)))


def statistics_for(onnx_path: Path, films: OodFilms) -> OodStatistics:
    """`fit_statistics` on the features the exported file computes for `films`."""
    return fit_statistics(features_of(onnx_path, films.fit), features_of(onnx_path, films.held_out), films)
