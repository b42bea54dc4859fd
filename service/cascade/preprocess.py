"""Radiograph pixels → model input, and model output → the radiograph's own resolution.

Training and serving both call these functions (the design's "one way through"), so a model is trained on
exactly the input it is served. The input size and normalisation come from the model's manifest.

Films are resized to the square model input without letterboxing (chest films are near-square; SIIM's
are all 1024²), and probability maps are resized back the same way, so the round trip is exact in geometry.
Resizing uses Pillow on float32 images: antialiased when shrinking, ~3 ms for 1024² → 256².
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from service.models.input_spec import InputSpec


def resize(image: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Bilinear (antialiased when shrinking) resize of a 2-D float image to rows x columns: a new float32 array."""
    if image.shape == (rows, columns):
        return np.array(image, dtype=np.float32)
    resized = Image.fromarray(np.asarray(image, dtype=np.float32), mode="F").resize(
        (columns, rows), Image.Resampling.BILINEAR
    )
    return np.array(resized, dtype=np.float32)


def to_input(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """One film's display pixels ([0, 1], air dark) → (channels, size, size) normalised float32."""
    resized = resize(pixels, spec.size, spec.size)
    resized -= np.float32(spec.mean)
    resized /= np.float32(spec.std)
    return np.repeat(resized[None], spec.channels, axis=0)


def to_batch(films: Sequence[np.ndarray], spec: InputSpec) -> np.ndarray:
    """A batch (N, channels, size, size) for a model from the films' display pixels."""
    batch = np.empty((len(films), spec.channels, spec.size, spec.size), dtype=np.float32)
    for index, pixels in enumerate(films):
        batch[index] = to_input(pixels, spec)
    return batch


def mask_to_input(mask: np.ndarray, size: int) -> np.ndarray:
    """A full-resolution binary mask → its (size, size) coverage fraction in [0, 1] (a soft training target)."""
    return np.clip(resize(np.asarray(mask, dtype=np.float32), size, size), 0.0, 1.0)


def to_original(probability: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """A model's (size, size) probability map → the radiograph's rows x columns, float32 in [0, 1]."""
    return np.clip(resize(probability, rows, columns), 0.0, 1.0)
