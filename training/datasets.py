"""PyTorch views of a `CachedSet`: augmented (image, mask, label) triples, and epoch sampling by positive rate."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from service.cascade.preprocess import resize
from service.models.input_spec import InputSpec
from training import augment
from training.config import SamplingConfig
from training.data import CachedSet


class RadiographDataset(Dataset):
    """Items of a cached set at the model's input size, normalised as its `InputSpec` says.

    The cache may be at a larger size than the model (one cache of 256² serves a 128² classifier and a
    256² segmenter); images are then resized with the service's own `resize`.
    """

    def __init__(self, cached: CachedSet, indices: Sequence[int], spec: InputSpec,
                 pipeline: augment.A.Compose | None = None) -> None:
        if spec.size > cached.size:
            raise ValueError(f"model input {spec.size} px is larger than the cache's {cached.size} px")
        self.cached, self.indices, self.spec, self.pipeline = cached, np.asarray(indices), spec, pipeline

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = int(self.indices[item])
        image = np.asarray(self.cached.images[index], dtype=np.float32)
        mask = np.asarray(self.cached.masks[index], dtype=np.float32) / 255.0
        if self.spec.size != self.cached.size:
            image = resize(image, self.spec.size, self.spec.size)
            mask = np.clip(resize(mask, self.spec.size, self.spec.size), 0.0, 1.0)
        image, mask = augment.apply(self.pipeline, image, mask)
        image = (image - self.spec.mean) / self.spec.std
        tensor = torch.from_numpy(np.repeat(image[None], self.spec.channels, axis=0))
        label = torch.tensor(float(self.cached.labels[index]))
        return tensor, torch.from_numpy(mask[None].copy()), label


def positive_rate(sampling: SamplingConfig, progress: float) -> float | None:
    """The share of positives for an epoch at `progress` in [0, 1] of training (None: natural rate)."""
    start, end = sampling.positive_rate_start, sampling.positive_rate_end
    if start is None:
        return None
    end = start if end is None else end
    return float(start + (end - start) * min(max(progress, 0.0), 1.0))


def epoch_indices(labels: np.ndarray, pool: np.ndarray, rate: float | None, rng: np.random.Generator) -> np.ndarray:
    """One epoch's sample order over `pool` (dataset positions), with `rate` positives if given.

    The epoch keeps the pool's size: positives and negatives are drawn with replacement in the requested
    proportion (all positives when rate is 1, the segmenter's "one case" training).
    """
    if rate is None:
        return rng.permutation(pool)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"positive rate must be in [0, 1], got {rate}")
    positives = pool[labels[pool] > 0]
    negatives = pool[labels[pool] == 0]
    n_pos = int(round(rate * len(pool))) if len(negatives) else len(pool)
    n_pos = n_pos if len(positives) else 0
    chosen = [rng.choice(positives, n_pos, replace=True)] if n_pos else []
    if len(pool) - n_pos and len(negatives):
        chosen.append(rng.choice(negatives, len(pool) - n_pos, replace=True))
    return rng.permutation(np.concatenate(chosen)) if chosen else rng.permutation(pool)
