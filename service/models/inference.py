"""What a model's raw outputs mean: logits → probabilities, with horizontal-flip test-time augmentation, and
the classifier's out-of-distribution distance beside its score.

Here, beside the backends, and not in the cascade: the model worker (`service.models.runner`) runs exactly
these steps inside one batched call, and the in-process cascade calls them too, so a score is computed
the same way wherever a model runs.
"""

from __future__ import annotations

import numpy as np

from service.models.backends import Backend
from service.models.ood import NO_DISTANCE, OodModel


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


def classify_rows(backend: Backend, batch: np.ndarray, hflip_tta: bool = True,
                  ood: OodModel | None = None) -> np.ndarray:
    """(N, 2) rows of [triage score, OOD distance] for a preprocessed batch; the distance is `NO_DISTANCE` when
    the classifier's manifest has no `ood` description (older exports).

    The distance is measured on the film as given (the plain pass), never on its mirror: the statistics were
    fitted that way (training/ood.py), whether or not the service averages in the mirrored score.
    """
    if ood is None:
        scores = classify_scores(backend, batch, hflip_tta)
        return np.stack([scores, np.full(len(batch), NO_DISTANCE, np.float32)], axis=1)
    count = len(batch)
    run_with_features = getattr(backend, "run_with_features", None)
    if run_with_features is None:
        raise TypeError(f"backend {backend.name} cannot return a classifier's features (run_with_features)")
    logits, features = run_with_features(np.concatenate([batch, batch[..., ::-1]]) if hflip_tta else batch)
    logits = np.asarray(logits).reshape(-1)
    scores = sigmoid(logits[:count])
    if hflip_tta:  # one run of 2N, as `_with_mirror`
        scores = (scores + sigmoid(logits[count:])) / 2
    return np.stack([scores, ood.distance(np.asarray(features)[:count]).astype(np.float32)], axis=1)


def segment_maps(backend: Backend, batch: np.ndarray, hflip_tta: bool = True) -> np.ndarray:
    """Probability maps (N, S, S) at the segmenter's input size for a preprocessed batch, hflip TTA if set."""
    plain, mirrored = _with_mirror(backend, batch, hflip_tta)
    maps = sigmoid(plain)[:, 0]
    if mirrored is not None:
        maps = (maps + sigmoid(mirrored)[:, 0, :, ::-1]) / 2
    return np.ascontiguousarray(maps, dtype=np.float32)
