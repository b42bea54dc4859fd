"""The cascade in one process (training's evaluation, tests), through the one flow (`flow.evaluate`).

Films go through `evaluate` concurrently on a private event loop; `_Batcher` gathers the model calls that
the films make in the same turn of that loop into one batch, as BentoML's adaptive batching does for the
served path. So the in-process cascade runs each model once per stage for the whole list of films (the gated
ones for the segmenter), with the same gate, TTA and mask rule as the service.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from service.cascade.flow import evaluate
from service.cascade.postprocess import CascadeResult
from service.cascade.preprocess import FilmImage, to_batch
from service.imaging.radiograph import Radiograph
from service.models.backends import Backend
from service.models.fusion import ScoreFusion
from service.models.inference import classify_rows, classify_scores, segment_maps
from service.models.input_spec import InputSpec
from service.models.ood import OodModel
from service.models.thresholds import TripletThreshold


class _Batcher:
    """An async model call that runs every call made in the same loop turn as one batch."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray]) -> None:
        self.run = run
        self.pending: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = []

    async def __call__(self, batch: np.ndarray) -> np.ndarray:
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        if not self.pending:
            asyncio.get_running_loop().call_soon(self._flush)  # after the other films' steps of this turn
        self.pending.append((batch, future))
        return await future

    def _flush(self) -> None:
        pending, self.pending = self.pending, []
        try:
            outputs = self.run(np.concatenate([batch for batch, _ in pending]))
        except Exception as exc:  # noqa: BLE001 -- every waiting film gets the model's failure
            for _, future in pending:
                future.set_exception(exc)
            return
        start = 0
        for batch, future in pending:
            future.set_result(outputs[start:start + len(batch)])
            start += len(batch)


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
    # From the classifier's manifest (issue 16): the score fusion, the OOD description, and the site's prevalence.
    fusion: ScoreFusion | None = None
    ood: OodModel | None = None
    prevalence: float | None = None

    @property
    def ood_threshold(self) -> float | None:
        return None if self.ood is None else self.ood.threshold

    def classify(self, films: Sequence[FilmImage]) -> np.ndarray:
        """The classifier's probabilities for a batch of films (display pixels, or radiographs)."""
        return classify_scores(self.classifier, to_batch(films, self.classifier_spec), self.hflip_tta)

    def run(self, films: Sequence[FilmImage]) -> list[CascadeResult]:
        """Every film through the flow; each model runs once per stage over the films that reach it. A film is
        its display pixels, or its `Radiograph` (pixels perhaps decoded at a reduced resolution)."""
        return asyncio.run(self._run(films))

    async def _run(self, films: Sequence[FilmImage]) -> list[CascadeResult]:
        classify = _Batcher(lambda batch: classify_rows(self.classifier, batch, self.hflip_tta, self.ood))
        segment = _Batcher(lambda batch: segment_maps(self.segmenter, batch, self.hflip_tta))
        return list(await asyncio.gather(*(evaluate(self, film if isinstance(film, Radiograph) else np.asarray(film),
                                                    classify, segment, prevalence=self.prevalence)
                                           for film in films)))
