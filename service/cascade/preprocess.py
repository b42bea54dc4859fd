"""Radiograph pixels → model input, and model output → the radiograph's own resolution.

Training and serving both call these functions (the design's "one way through"), so a model is trained on
exactly the input it is served. The input size and normalisation come from the model's manifest.

Films are resized to the square model input without letterboxing (chest films are near-square; SIIM's
are all 1024²), and probability maps are resized back the same way, so the round trip is exact in geometry.
Resizing is Pillow's bilinear filter on float32 images, antialiased when shrinking (~1.0 ms for 1024² → 256²).
A film decoded at a reduced resolution (a `Radiograph` whose pixels are on a coarser `grid`) is resampled with
the same film-pixel weights instead (`service.cascade.resampling`), so its input matches the full decode's.

Why bilinear and not a (faster) area resize: the models were trained on these inputs, and the demo models'
scores moved by up to 0.23 on synthetic films with Pillow's BOX filter in its place (0.07 with its two-step
`reducing_gap`): an input filter is part of the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.cascade.resampling import resample, resample_grid
from service.imaging.radiograph import Radiograph
from service.models.input_spec import InputSpec

FilmImage = np.ndarray | Radiograph  # display pixels at the film's size, or a radiograph (whose pixels may be reduced)


def resize(image: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Bilinear (antialiased when shrinking) resize of a 2-D float image to rows x columns: a new float32 array.

    Pillow's bilinear filter, its weights applied as sparse products (`resampling.resample`: faster than Pillow,
    the same values to within 2e-7, and a window of it exactly the window of the whole).
    """
    if image.shape == (rows, columns):
        return np.array(image, dtype=np.float32)
    return resample(image, rows, columns)


def film_at(film: FilmImage, rows: int, columns: int) -> np.ndarray:
    """A film's display pixels at rows x columns (a new float32 array), from whatever grid they were decoded on."""
    if isinstance(film, Radiograph):
        if film.grid is not None:
            return resample_grid(film.pixels, film.grid, rows, columns)
        film = film.pixels
    return resize(film, rows, columns)


def to_input(pixels: FilmImage, spec: InputSpec) -> np.ndarray:
    """One film's display pixels ([0, 1], air dark) → (channels, size, size) normalised float32."""
    resized = film_at(pixels, spec.size, spec.size)
    resized -= np.float32(spec.mean)
    resized /= np.float32(spec.std)
    return np.repeat(resized[None], spec.channels, axis=0)


def to_batch(films: Sequence[FilmImage], spec: InputSpec) -> np.ndarray:
    """A batch (N, channels, size, size) for a model from the films' display pixels (or radiographs)."""
    batch = np.empty((len(films), spec.channels, spec.size, spec.size), dtype=np.float32)
    for index, film in enumerate(films):
        first = batch[index, 0]
        first[...] = film_at(film, spec.size, spec.size)
        first -= np.float32(spec.mean)
        first /= np.float32(spec.std)
        batch[index, 1:] = first  # further channels repeat the first
    return batch


def mask_to_input(mask: np.ndarray, size: int) -> np.ndarray:
    """A full-resolution binary mask → its (size, size) coverage fraction in [0, 1] (a soft training target)."""
    return np.clip(resize(np.asarray(mask, dtype=np.float32), size, size), 0.0, 1.0)


def to_original(probability: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """A model's (size, size) probability map → the radiograph's rows x columns, float32 in [0, 1]."""
    return np.clip(resize(probability, rows, columns), 0.0, 1.0)
