"""The cascade in one process (training's evaluation, tests, benchmarks' baseline), through the one flow."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.cascade.postprocess import CascadeResult, film_result, gated
from service.cascade.preprocess import to_batch
from service.models.backends import Backend
from service.models.inference import classify_scores, segment_maps
from service.models.input_spec import InputSpec
from service.models.thresholds import TripletThreshold


@dataclass
class Cascade:
    """Two backends with their input specs and the thresholds from their manifests, run in-process."""

    classifier: Backend
    classifier_spec: InputSpec
    segmenter: Backend
    segmenter_spec: InputSpec
    gate: float
    operating_point: float
    triplet: TripletThreshold
    triplet_reference_size: int = 1024
    hflip_tta: bool = True  # mirrored pass averaged in, for both models

    def classify(self, films: Sequence[np.ndarray]) -> np.ndarray:
        """Triage scores for a batch of display-pixel films."""
        return classify_scores(self.classifier, to_batch(films, self.classifier_spec), self.hflip_tta)

    def segment(self, films: Sequence[np.ndarray]) -> np.ndarray:
        """Probability maps (N, S, S) at the segmenter's input size."""
        return segment_maps(self.segmenter, to_batch(films, self.segmenter_spec), self.hflip_tta)

    def result(self, film: np.ndarray, score: float, probability: np.ndarray | None) -> CascadeResult:
        """One film's result from its score and, if it was gated, its segmenter map."""
        return film_result(*film.shape, score, probability, self.operating_point, self.triplet,
                           self.triplet_reference_size)

    def run(self, films: Sequence[np.ndarray]) -> list[CascadeResult]:
        scores = self.classify(films)
        chosen = gated(scores, self.gate)
        maps = self.segment([films[i] for i in chosen]) if len(chosen) else np.zeros((0, 1, 1), np.float32)
        by_film = dict(zip(chosen.tolist(), maps))
        return [self.result(film, score, by_film.get(index)) for index, (film, score) in enumerate(zip(films, scores))]
