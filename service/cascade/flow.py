"""The one flow of the cascade: decode → preprocess → classify → gate → segment → mask → conclude.

    Flow.run(payload)          decode (imaging) ─▶ evaluate ─▶ conclude (instances, RLE, priority) → Finding
    evaluate(spec, film)       preprocess ─▶ classify ─▶ gate ─▶ segment (gated only) ─▶ film_result

Everything between the bytes and the `Finding` is chained here once. The callers only say *how* the models
run and where CPU work goes:

* the served path (`service.cascade.served`) hands async calls that go through the BentoML model worker,
  which batches concurrent films, and an `offload` that runs CPU steps in threads;
* the in-process cascade (`service.cascade.in_process`: training's evaluation, tests) hands calls that
  batch concurrent films in this process, and runs CPU steps inline.

So a model is evaluated exactly as it is served. Timings are collected in one place (`Timings`), under the
stage names the API answers with (decode, preprocess, classify, segment, postprocess; `total` is the
caller's, around admission and waiting).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from service.cascade.finding import (
    Finding,
    Priority,
    PriorityBands,
    build_finding,
)
from service.cascade.masks import MillimetreMorphology
from service.cascade.postprocess import CascadeResult, film_result, passes_gate
from service.cascade.preprocess import FilmImage, to_batch
from service.cascade.scoring import Scoring
from service.imaging.acceptance import AcceptancePolicy
from service.imaging.radiograph import Radiograph
from service.imaging.reader import read_film
from service.models.fusion import ScoreFusion
from service.models.input_spec import InputSpec
from service.models.model_set import ModelSet
from service.models.thresholds import TripletThreshold
from service.settings import Settings

ModelCall = Callable[[np.ndarray], Awaitable[np.ndarray]]  # (1, C, S, S) input → that film's output row(s)
Offload = Callable[..., Awaitable[Any]]  # offload(function, *args) → its result, wherever CPU work runs


async def inline(function: Callable[..., Any], *args: Any) -> Any:
    """An `Offload` that runs the step in the caller (in-process use: no threads to hand work to)."""
    return function(*args)


class CascadeSpec(Protocol):
    """What the flow needs to know about the two models: their inputs and thresholds (from manifests)."""

    @property
    def classifier_spec(self) -> InputSpec: ...
    @property
    def segmenter_spec(self) -> InputSpec: ...
    @property
    def gate(self) -> float: ...
    @property
    def operating_point(self) -> float: ...
    @property
    def triplet(self) -> TripletThreshold: ...
    @property
    def triplet_reference_size(self) -> int: ...
    @property
    def fusion(self) -> ScoreFusion | None: ...
    @property
    def ood_threshold(self) -> float | None: ...


@dataclass
class Timings:
    """Milliseconds per stage for one film; a stage entered twice adds up."""

    ms: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - started) * 1e3


async def evaluate(spec: CascadeSpec, film: FilmImage, classify: ModelCall, segment: ModelCall,
                   offload: Offload = inline, timings: Timings | None = None,
                   prevalence: float | None = None) -> CascadeResult:
    """One film (its display pixels, or its `Radiograph`, whose pixels may be decoded at a reduced resolution)
    → its `CascadeResult`: score, the gate's decision, the mask at the film's own size, the OOD reading.

    `classify` answers [score, OOD distance] per film (`service.models.inference.classify_rows`); a bare score
    is taken as one with no distance. `prevalence`: the site's, for the fused score (`service.cascade.scoring`)."""
    timings = timings or Timings()
    rows, columns = film.shape if isinstance(film, Radiograph) else film.shape[:2]
    with timings.stage("preprocess"):
        classifier_input = await offload(to_batch, [film], spec.classifier_spec)
    with timings.stage("classify"):
        row = np.asarray(await classify(classifier_input)).reshape(-1)
    score, distance = float(row[0]), (float(row[1]) if row.size > 1 else None)
    probability = None
    if passes_gate(score, spec.gate):
        segmenter_input = classifier_input
        if spec.segmenter_spec != spec.classifier_spec:
            with timings.stage("preprocess"):
                segmenter_input = await offload(to_batch, [film], spec.segmenter_spec)
        with timings.stage("segment"):
            probability = np.asarray(await segment(segmenter_input))[0]
    with timings.stage("postprocess"):
        return await offload(film_result, rows, columns, score, probability, spec.operating_point, spec.triplet,
                             spec.triplet_reference_size, Scoring(spec.fusion, prevalence, spec.ood_threshold),
                             distance)


@dataclass(frozen=True)
class Flow:
    """The served cascade's configuration: the models, the acceptance rules, priority bands, morphology."""

    models: ModelSet
    policy: AcceptancePolicy
    bands: PriorityBands
    morphology: MillimetreMorphology | None
    model_labels: dict[str, dict[str, Any]]
    prevalence: float | None = None  # the site's (PTX_PREVALENCE), for the fused score's prior shift

    @classmethod
    def from_settings(cls, settings: Settings, models: ModelSet, backends: dict[str, str] | None = None) -> Flow:
        """`backends`: role → backend name as reported by the model worker (None until it has said)."""
        backends = backends or {}
        labels: dict[str, dict[str, Any]] = {
            entry.role: {"name": entry.manifest.name, "version": entry.manifest.version,
                         "backend": backends.get(entry.role), **({"members": list(entry.members)} if entry.members
                                                                 else {})}  # an ensemble names every member
            for entry in models.entries()}
        policy = AcceptancePolicy.from_settings(settings)
        if settings.reduced_decode:  # JPEG 2000 / JPEG decoded at the models' input size (issue 15)
            policy = replace(policy, decode_min_side=models.decode_side)
        # PTX_PREVALENCE and PTX_OOD_MAX_PRIORITY (issue 16)
        ceiling = Priority(settings.ood_max_priority)
        return cls(models=models, policy=policy, bands=PriorityBands(
            settings.stat_score, settings.stat_area_mm2, ceiling), morphology=MillimetreMorphology()
            if settings.mm_morphology else None, model_labels=labels,
            prevalence=settings.prevalence)

    def with_backends(self, backends: dict[str, str]) -> Flow:
        """The same flow, its answers naming the engine that runs each model."""
        labels = {role: {**label, "backend": backends.get(role)} for role, label in self.model_labels.items()}
        return replace(self, model_labels=labels)

    async def run(self, payload: bytes, classify: ModelCall, segment: ModelCall, offload: Offload = inline,
                  keep_source: bool = False) -> Finding:
        """A film's bytes → its `Finding`; raises `RadiographError` for a film that cannot be triaged.

        `keep_source` (the DICOM side): the parsed header and the display pixels stay on the Finding, so the
        SEG/SR/SC writers neither parse nor decode the film again.
        """
        timings = Timings()
        with timings.stage("decode"):
            film = await offload(read_film, payload, self.policy)
        radiograph = film.radiograph
        result = await evaluate(self.models, radiograph, classify, segment, offload, timings, self.prevalence)
        with timings.stage("postprocess"):
            finding: Finding = await offload(build_finding, radiograph, result, result.operating_point,
                                             self.bands, self.morphology, self.model_labels, timings.ms)
        finding.timings_ms.update(timings.ms)  # with the post-processing just measured
        if keep_source:
            finding = replace(finding, source=film)
        return finding
