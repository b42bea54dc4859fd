"""The HTTP edge's CPU work around the models: bytes → model input, and model output → `Finding`.

    prepare:  bytes → Radiograph (decode, validate) → classifier input (and segmenter input if it differs)
    conclude: score (+ segmenter map if gated) → mask at film size → instances, RLE, priority → Finding

Both run in worker threads (never on the event loop) and are plain functions of their inputs, so the
DICOM listener and tests can use them as they are. The models themselves run in the model worker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from service.imaging.acceptance import AcceptancePolicy
from service.cascade.finding import Finding, PriorityBands, build_finding
from service.imaging.reader import read_radiograph
from service.cascade.masks import MillimetreMorphology
from service.models.model_set import ModelSet
from service.cascade.postprocess import film_result
from service.cascade.preprocess import to_batch
from service.imaging.radiograph import Radiograph
from service.settings import Settings


@dataclass
class Prepared:
    """One decoded film on its way through the cascade."""

    radiograph: Radiograph
    classifier_input: np.ndarray  # (1, C, S, S)
    segmenter_input: np.ndarray | None  # None: the same as the classifier's (same spec)
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Edge:
    """What the HTTP edge needs to prepare and conclude films, from settings and the model manifests."""

    models: ModelSet
    policy: AcceptancePolicy
    bands: PriorityBands
    morphology: MillimetreMorphology | None
    model_labels: dict[str, dict[str, str | None]]

    @classmethod
    def from_settings(cls, settings: Settings, models: ModelSet, backends: dict[str, str] | None = None) -> Edge:
        """`backends`: role → backend name as reported by the model worker (None until it has said)."""
        backends = backends or {}
        labels = {entry.role: {"name": entry.manifest.name, "version": entry.manifest.version,
                               "backend": backends.get(entry.role)} for entry in models.entries()}
        return cls(
            models=models,
            policy=AcceptancePolicy(max_file_bytes=settings.max_file_bytes, reject_inverted=settings.reject_inverted,
                                    decode_timeout_s=settings.decode_timeout_s or None,
                                    decode_memory_mb=settings.decode_memory_mb, decode_workers=settings.decode_threads),
            bands=PriorityBands(settings.stat_score, settings.stat_area_mm2),
            morphology=MillimetreMorphology() if settings.mm_morphology else None,
            model_labels=labels,
        )

    def prepare(self, payload: bytes) -> Prepared:
        """Decode and validate (raises `RadiographError`), then build the model inputs."""
        started = time.perf_counter()
        radiograph = read_radiograph(payload, self.policy)
        decoded = time.perf_counter()
        classifier_input = to_batch([radiograph.pixels], self.models.classifier_spec)
        segmenter_input = None
        if self.models.segmenter_spec != self.models.classifier_spec:
            segmenter_input = to_batch([radiograph.pixels], self.models.segmenter_spec)
        done = time.perf_counter()
        return Prepared(radiograph, classifier_input, segmenter_input,
                        {"decode": (decoded - started) * 1e3, "preprocess": (done - decoded) * 1e3})

    def needs_segmenter(self, score: float) -> bool:
        return score >= self.models.gate

    def conclude(self, prepared: Prepared, score: float, probability: np.ndarray | None) -> Finding:
        """The Finding for a film from its score and, if gated, the segmenter's map at its input size."""
        started = time.perf_counter()
        radiograph = prepared.radiograph
        models = self.models
        result = film_result(radiograph.rows, radiograph.columns, score, probability, models.operating_point,
                             models.triplet, models.triplet_reference_size)
        finding = build_finding(radiograph, result, models.operating_point, self.bands, self.morphology,
                                models=self.model_labels, timings_ms=prepared.timings_ms)
        finding.timings_ms["postprocess"] = (time.perf_counter() - started) * 1e3  # the Finding's own dict
        return finding
