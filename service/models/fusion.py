"""The triage score from both models: a calibrated fusion of the classifier's probability and the segmenter's
evidence -- or the classifier's probability calibrated alone -- corrected to the site's prevalence.

Why: the classifier's probability alone flagged two normal films in three at sensitivity 0.95 on the demo's
test set, while the segmenter's evidence on the same films (the peak of its map, the area of what it drew)
separates them much better (issue 16). A small logistic model of

    [logit(classifier probability), segmenter peak probability, log1p(largest instance area)]

fitted on the validation fold (training/fusion.py) turns the three into one calibrated probability; its
coefficients live in the classifier's manifest (`fusion`) and the cascade applies them to every film. A film
the gate did not send to the segmenter has peak 0 and area 0: that is what the model was fitted with too.

The area is counted in pixels of a film of `area_reference_size`² (the film's own count rescaled), so that a
lesion covering the same share of the film weighs the same at any resolution, as the triplet's min_area does.

A calibration alone (`inputs: ["classifier_logit"]`, Platt scaling) is the same model without the segmenter's
two inputs: it keeps the classifier's decisions -- its operating point is the classifier's, calibrated -- and only
makes the probability mean what it says. The bundled 0.2.0 demo ships the fusion, fitted with the gate at the
classifier's operating point, so that a film below it (never segmented) stays negative and the fusion can only
clear films the classifier flagged: on the demo's test set sensitivity 0.977 kept, specificity 0.850 → 0.897
(docs/models.md). 0.1.0's fusion, fitted through a lower gate, had lost sensitivity instead.

Prior shift (Saerens et al. 2002): the fitted probability is calibrated to the prevalence of the films it was
fitted on (`training_prevalence`, 0.5 for the demo); a site's prevalence (PTX_PREVALENCE) moves the odds by
the ratio of the two priors' odds. The shift is monotone, so the operating point is shifted with it and the
films called positive do not change: only the probability shown, and so the STAT band, does.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

INPUTS = ("classifier_logit", "segmenter_peak", "log1p_largest_area")  # `fusion_inputs`' order
CALIBRATION_INPUTS = INPUTS[:1]  # the classifier's probability calibrated alone
_EPS = 1e-6


class ScoreFusion(BaseModel):
    """The manifest's `fusion` section (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["logistic"] = "logistic"
    inputs: tuple[str, ...] = INPUTS
    coefficients: tuple[float, ...]
    intercept: float
    area_reference_size: int = Field(default=1024, ge=1)
    training_prevalence: float = Field(gt=0, lt=1, description="share of positives among the films fitted on")
    operating_point: float = Field(gt=0, lt=1, description="fused probability (at training_prevalence) at or "
                                                           "above which a film is called positive")
    target_sensitivity: float = Field(gt=0, le=1)
    fitted_on: str = Field(min_length=1)
    films: int = Field(ge=2)
    positives: int = Field(ge=1)

    @model_validator(mode="after")
    def _valid(self) -> ScoreFusion:
        if self.inputs not in (INPUTS, CALIBRATION_INPUTS):
            raise ValueError(f"inputs must be {list(INPUTS)} (fusion) or {list(CALIBRATION_INPUTS)} (calibration), "
                             f"got {list(self.inputs)}")
        if len(self.coefficients) != len(self.inputs):
            raise ValueError(f"{len(self.coefficients)} coefficients for the {len(self.inputs)} inputs "
                             f"{list(self.inputs)}: one per input")
        if not all(math.isfinite(value) for value in (*self.coefficients, self.intercept)):
            raise ValueError("coefficients and intercept must be finite")
        return self

    @property
    def uses_segmenter(self) -> bool:
        """Whether the score reads the segmenter's evidence (a fusion), or the classifier's alone (a calibration)."""
        return self.inputs != CALIBRATION_INPUTS


def fusion_inputs(classifier_probability: float, peak: float, largest_area_px: int, film_pixels: int,
                  reference_size: int = 1024) -> np.ndarray:
    """The model's three inputs for one film (see the module docstring)."""
    p = min(max(float(classifier_probability), _EPS), 1 - _EPS)
    area = float(largest_area_px) * reference_size * reference_size / max(int(film_pixels), 1)
    return np.array([math.log(p / (1 - p)), float(peak), math.log1p(area)])


def prior_shift(probability: float, from_prevalence: float, to_prevalence: float | None) -> float:
    """`probability`, calibrated at `from_prevalence`, at `to_prevalence` (None: unchanged)."""
    if to_prevalence is None:
        return float(probability)
    p = min(max(float(probability), _EPS), 1 - _EPS)
    ratio = (to_prevalence / (1 - to_prevalence)) / (from_prevalence / (1 - from_prevalence))
    odds = p / (1 - p) * ratio
    return odds / (1 + odds)


def fused_probability(fusion: ScoreFusion, inputs: np.ndarray) -> float:
    """The calibrated probability at the training prevalence for one film's `fusion_inputs` (all three: a
    calibration reads the first, the classifier's logit)."""
    z = float(np.dot(fusion.coefficients, np.asarray(inputs)[: len(fusion.coefficients)])) + fusion.intercept
    return 1.0 / (1.0 + math.exp(-min(max(z, -60.0), 60.0)))
