"""A film's triage score and out-of-distribution flag, from what the two models said about it (issue 16).

* The score: with a `fusion` in the classifier's manifest, the calibrated fusion of the classifier's probability
  with the segmenter's peak and largest instance (service/models/fusion.py) -- or, for a calibration, the
  classifier's probability calibrated alone -- moved to the site's prevalence (PTX_PREVALENCE); without one,
  the classifier's probability as before. The operating point moves with it (the prior shift is monotone), so
  the films called positive are the fusion's own at any prevalence.
* The gate stays on the classifier's probability: the segmenter's evidence is what the gate decides to fetch.
* The OOD flag: the classifier's feature distance (measured by the model worker, service/models/ood.py) beyond
  the manifest's threshold. A classifier exported without `ood` gives no distance: the answer says `ood: null`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.cascade.masks import find_instances
from service.models.fusion import (
    ScoreFusion,
    fused_probability,
    fusion_inputs,
    prior_shift,
)
from service.models.ood import NO_DISTANCE

#: PTX_PREVALENCE's default: the share of films with a pneumothorax in SIIM-ACR (2,669 of 12,047), which the
#: demo's test sets keep too. A site sets its own; the films called positive do not depend on it.
DEFAULT_PREVALENCE = 0.22


@dataclass(frozen=True)
class Ood:
    """How far the film's features lie from the training films', and whether that is beyond the threshold."""

    distance: float
    threshold: float

    @property
    def flag(self) -> bool:
        return self.distance > self.threshold

    def to_json(self) -> dict[str, object]:
        return {"distance": round(self.distance, 3), "threshold": round(self.threshold, 3), "flag": self.flag}


@dataclass(frozen=True)
class Scoring:
    """What turns the models' outputs into the triage score and the OOD flag (see the module docstring)."""

    fusion: ScoreFusion | None = None
    prevalence: float | None = None  # the site's; None: the probabilities stay at the fusion's training prevalence
    ood_threshold: float | None = None

    def operating_point(self, classifier_point: float) -> float:
        """The threshold on `score`: the manifest's classifier operating point, or the fusion's, shifted."""
        if self.fusion is None:
            return classifier_point
        return prior_shift(self.fusion.operating_point, self.fusion.training_prevalence, self.prevalence)

    def score(self, classifier_score: float, peak: float, mask: np.ndarray) -> float:
        """The triage score of a film: its mask (at the film's size, empty when not segmented) and map peak."""
        if self.fusion is None:
            return float(classifier_score)
        # largest instance first; a calibration reads the classifier alone, so no instances are counted for it
        largest = find_instances(mask, None)[0].area_px if self.fusion.uses_segmenter and mask.any() else 0
        inputs = fusion_inputs(classifier_score, peak, largest, mask.size, self.fusion.area_reference_size)
        return prior_shift(fused_probability(self.fusion, inputs), self.fusion.training_prevalence, self.prevalence)

    def ood(self, distance: float | None) -> Ood | None:
        """The film's OOD reading, None where the classifier has no description (or gave no distance)."""
        if self.ood_threshold is None or distance is None or distance == NO_DISTANCE:
            return None
        return Ood(float(distance), self.ood_threshold)
