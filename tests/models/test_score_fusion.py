"""The manifest's `fusion` section: a fusion of both models' evidence, or the classifier's probability calibrated
alone (issue 16), each refused with a message naming the field when its inputs and coefficients disagree."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.models.fusion import CALIBRATION_INPUTS, INPUTS, ScoreFusion
from service.models.manifest import ManifestError, load_manifest
from tests.models.test_manifest import write_model

CALIBRATION = {"inputs": list(CALIBRATION_INPUTS), "coefficients": [1.24], "intercept": 0.3,
               "training_prevalence": 0.51, "operating_point": 0.099, "target_sensitivity": 0.95,
               "fitted_on": "407 validation-fold films", "films": 407, "positives": 209}


def test_a_calibration_of_the_classifier_alone_loads_from_a_manifest(tmp_path: Path) -> None:
    directory = write_model(tmp_path, "ptx-cls", task="classification", fusion=CALIBRATION)
    fusion = load_manifest(directory).fusion
    assert fusion is not None and fusion.inputs == ("classifier_logit",) and not fusion.uses_segmenter
    assert ScoreFusion(**{**CALIBRATION, "inputs": list(INPUTS), "coefficients": [1.0, 2.0, 0.5]}).uses_segmenter


@pytest.mark.parametrize(("changes", "message"), [
    ({"coefficients": [1.24, 0.0, 0.0]}, r"3 coefficients for the 1 inputs \['classifier_logit'\]: one per input"),
    ({"inputs": list(INPUTS)}, r"1 coefficients for the 3 inputs \['classifier_logit', 'segmenter_peak', "),
    ({"inputs": ["classifier_logit", "segmenter_peak"], "coefficients": [1.0, 1.0]},
     (r"inputs must be \['classifier_logit', 'segmenter_peak', 'log1p_largest_area'\] \(fusion\) or "
      r"\['classifier_logit'\] \(calibration\), got \['classifier_logit', 'segmenter_peak'\]")),
    ({"coefficients": [float("inf")]}, "coefficients and intercept must be finite"),
])
def test_a_fusion_whose_inputs_and_coefficients_disagree_is_refused(tmp_path: Path, changes: dict,
                                                                    message: str) -> None:
    directory = write_model(tmp_path, "ptx-cls", task="classification", fusion={**CALIBRATION, **changes})
    with pytest.raises(ManifestError, match=message):
        load_manifest(directory)
