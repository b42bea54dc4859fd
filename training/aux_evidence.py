"""The classifier's auxiliary segmentation head read as evidence at the gate: issue 16's hypothesis, measured.

The demo classifier was trained with an auxiliary head (service/models/networks/classifier.py) that its ONNX
export leaves out. Were its map to carry evidence the classifier's logit does not, a fusion of the two would
sharpen the gate for the cost of the classifier alone, and the export would gain a compact output for it. This
module reads the head from the checkpoint (torch: the service never runs it) so that the ablation
(training/fusion_report.py) can say whether it does. On the demo it does not: fused with the logit it moved the
AUC by 0.001 or less on both test sets, and the share of films gated at the same sensitivity by 0.04 or less
(docs/training.md), since head and logit read the same encoder features. So the export stays without it.

Per film, from the head's mask logits averaged over the film and its mirror (the served TTA): the largest
logit, the mean of the 64 largest, and log1p of the soft area (the sum of the sigmoid, in pixels of a film of
1024², as the fusion counts areas). Logits, not probabilities: the head saturates -- most negatives' maps
round to 0 everywhere at 8 bits -- so probabilities tie where logits still rank the films.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from service.cascade.preprocess import to_batch
from service.imaging.reader import read_radiograph
from service.models.input_spec import InputSpec

COLUMNS = ("aux_max_logit", "aux_top64_logit", "aux_log1p_soft_area")
TOP = 64
REFERENCE_SIZE = 1024  # areas in pixels of a film of this size², as service/models/fusion.py counts them
CHUNK = 16  # films decoded at once


def map_evidence(mask_logits: np.ndarray, reference_size: int = REFERENCE_SIZE) -> np.ndarray:
    """(N, 3) evidence (`COLUMNS`) of (N, S, S) mask logits."""
    flat = np.asarray(mask_logits, dtype=np.float64).reshape(len(mask_logits), -1)
    if flat.shape[1] < TOP:
        raise ValueError(f"the head's map has {flat.shape[1]} pixels, fewer than the {TOP} averaged")
    top = -np.sort(-flat, axis=1)[:, :TOP]
    soft_area = (1 / (1 + np.exp(-np.clip(flat, -60, 60)))).sum(axis=1) * reference_size ** 2 / flat.shape[1]
    return np.stack([top[:, 0], top.mean(axis=1), np.log1p(soft_area)], axis=1)


def aux_evidence(network: torch.nn.Module, films: Sequence[Path], spec: InputSpec, hflip_tta: bool = True,
                 chunk: int = CHUNK) -> np.ndarray:
    """(N, 3) evidence of the films (DICOM files), decoded and preprocessed as the service does."""
    if getattr(network, "aux_head", None) is None:
        raise ValueError("the classifier has no auxiliary segmentation head (network.aux_segmentation: false)")
    rows = []
    for start in range(0, len(films), chunk):
        batch = to_batch([read_radiograph(path) for path in films[start:start + chunk]], spec)
        count = len(batch)
        inputs = np.concatenate([batch, batch[..., ::-1]]) if hflip_tta else batch
        with torch.no_grad():
            _, masks = network.eval().forward_with_mask(torch.from_numpy(np.ascontiguousarray(inputs)))
        logits = masks.numpy()[:, 0]
        if hflip_tta:
            logits = (logits[:count] + logits[count:, :, ::-1]) / 2
        rows.append(map_evidence(logits))
    return np.concatenate(rows) if rows else np.zeros((0, len(COLUMNS)))
