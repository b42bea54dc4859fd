"""Out of distribution: how far a film's classifier features lie from those of the films the model learnt on.

Why: a classifier is confident on films unlike anything it was trained on -- every real chest film came out of
the synthetic demo models as a STAT pneumothorax (issue 16) -- so its score alone cannot say "I do not know
this kind of film". The pooled encoder features its head reads (the ONNX output `features`) summarise what
the model saw; a film whose features lie far from the training films', in the Mahalanobis distance under their
covariance, is outside what the model's scores were validated on, whatever the score.

The manifest stores the description compactly (`ood`, written by training/ood.py): the training films' mean
feature vector, the top `k` principal axes of their Ledoit-Wolf shrunk covariance with those axes' variances,
and the mean variance of the remaining axes (a low-rank-plus-isotropic covariance: the exact Mahalanobis
distance when k equals the feature count, a small file when features are many), as base64 float32; and the
threshold, a high quantile of the distance on held-out training films. Pure numpy: the model worker computes
the distance in its batched call, the edge compares it with the threshold.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

FEATURES_OUTPUT = "features"
NO_DISTANCE = -1.0  # in the model worker's packed rows: the classifier has no `ood` description


def encode_array(values: np.ndarray) -> str:
    """float32, C order, little-endian, base64: compact and exact for the manifest."""
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f4").tobytes()).decode("ascii")


def decode_array(text: str, shape: tuple[int, ...]) -> np.ndarray:
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    expected = int(np.prod(shape)) * 4
    if len(raw) != expected:
        raise ValueError(f"expected {expected} bytes of float32 for shape {shape}, got {len(raw)}")
    return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float64)


class OodStatistics(BaseModel):
    """The manifest's `ood` section (classifiers exported with the `features` output); see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["mahalanobis-lowrank-ledoit-wolf"] = "mahalanobis-lowrank-ledoit-wolf"
    output: str = FEATURES_OUTPUT
    dimensions: int = Field(ge=1)
    mean: str = Field(description="base64 float32 (dimensions,)")
    components: str = Field(description="base64 float32 (k, dimensions), orthonormal rows")
    variances: list[float] = Field(min_length=1, description="variance along each component, > 0")
    residual_variance: float = Field(ge=0, description="mean variance of the other axes; 0 when k = dimensions")
    shrinkage: float = Field(ge=0, le=1, description="Ledoit-Wolf shrinkage towards a scaled identity")
    threshold: float = Field(gt=0, description="distance beyond which a film is out of distribution")
    quantile: float = Field(gt=0, lt=1, description="quantile of the held-out films' distances taken as threshold")
    fitted_on: str = Field(min_length=1)
    films: int = Field(ge=2)
    threshold_on: str = Field(min_length=1)
    threshold_films: int = Field(ge=1)

    @model_validator(mode="after")
    def _shapes(self) -> OodStatistics:
        k = len(self.variances)
        if k > self.dimensions:
            raise ValueError(f"{k} components for {self.dimensions} feature dimensions")
        if not all(math.isfinite(v) and v > 0 for v in self.variances):
            raise ValueError("variances must be finite and > 0")
        if k < self.dimensions and not self.residual_variance > 0:
            raise ValueError(f"residual_variance must be > 0 with {k} of {self.dimensions} components kept")
        mean = decode_array(self.mean, (self.dimensions,))
        components = decode_array(self.components, (k, self.dimensions))
        if not (np.isfinite(mean).all() and np.isfinite(components).all()):
            raise ValueError("mean and components must be finite")
        return self


@dataclass(frozen=True)
class OodModel:
    """The decoded statistics: `distance(features)` for a batch, `threshold` to compare it with."""

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (k, D)
    variances: np.ndarray  # (k,)
    residual_variance: float
    threshold: float

    @classmethod
    def from_statistics(cls, stats: OodStatistics) -> OodModel:
        k = len(stats.variances)
        return cls(decode_array(stats.mean, (stats.dimensions,)), decode_array(stats.components, (k, stats.dimensions)),
                   np.asarray(stats.variances, dtype=np.float64), float(stats.residual_variance), stats.threshold)

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance (N,) of feature rows (N, D): the principal axes by their own variances, the rest
        of the difference by the residual variance."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != len(self.mean):
            raise ValueError(f"features must be (N, {len(self.mean)}), got {features.shape}")
        centred = features - self.mean
        projected = centred @ self.components.T
        squared = np.sum(projected**2 / self.variances, axis=1)
        if self.residual_variance > 0:
            rest = np.maximum(np.sum(centred**2, axis=1) - np.sum(projected**2, axis=1), 0.0)
            squared += rest / self.residual_variance
        return np.sqrt(squared)

