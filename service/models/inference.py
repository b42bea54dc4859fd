"""What a model's raw outputs mean: logits → probabilities, with horizontal-flip test-time augmentation.

Here, beside the backends, and not in the cascade: the model worker (`service.models.runner`) runs exactly
these steps inside one batched call, and the in-process cascade calls them too, so a score is computed
the same way wherever a model runs.
"""

from __future__ import annotations

import numpy as np

from service.models.backends import Backend


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))).astype(np.float32)


def _with_mirror(backend: Backend, batch: np.ndarray, hflip_tta: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Outputs for the batch and, with TTA, for its mirror image -- in one run of 2N, which batches better."""
    if not hflip_tta:
        return backend.run(batch), None
    both = backend.run(np.concatenate([batch, batch[..., ::-1]]))
    return both[: len(batch)], both[len(batch):]


def classify_scores(backend: Backend, batch: np.ndarray, hflip_tta: bool = True) -> np.ndarray:
    """Triage scores (classifier probabilities, shape (N,)) for a preprocessed batch, hflip TTA if set.

    TTA costs one more classifier pass and measured +0.013 AUC on a synthetic validation set (0.898 → 0.911).
    """
    plain, mirrored = _with_mirror(backend, batch, hflip_tta)
    scores = sigmoid(plain.reshape(len(batch)))
    if mirrored is not None:
        scores = (scores + sigmoid(mirrored.reshape(len(batch)))) / 2
    return scores


def segment_maps(backend: Backend, batch: np.ndarray, hflip_tta: bool = True) -> np.ndarray:
    """Probability maps (N, S, S) at the segmenter's input size for a preprocessed batch, hflip TTA if set."""
    plain, mirrored = _with_mirror(backend, batch, hflip_tta)
    maps = sigmoid(plain)[:, 0]
    if mirrored is not None:
        maps = (maps + sigmoid(mirrored)[:, 0, :, ::-1]) / 2
    return np.ascontiguousarray(maps, dtype=np.float32)
