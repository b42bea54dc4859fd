"""The figures issue 16 asks of the triage score, on one test set: the ablation of its evidence (classifier,
auxiliary head, segmenter; each alone and fused), AUC and specificity at sensitivity 0.90 / 0.95 / 0.98 with
bootstrap confidence intervals, ECE and reliability before and after the prior shift, and the share of films
each candidate gate sends to the segmenter at the site's prevalence.

Why a percentile bootstrap over films: the specificity read off the ROC curve at a sensitivity depends on a few
positives near the threshold; resampling the films (both classes together, as the test set was drawn) shows
how much. Every row but the raw classifier is a logistic fit on the validation films' evidence, so every row is
a calibrated probability fitted the same way, moved to the site's prevalence before its ECE is measured.

The evidence is collected with the segmenter run on every film (gate 0): the rows that model the service's
cascade zero the segmenter's evidence of the films their gate would not send, as the service would never have
it; one row keeps it everywhere, to show what the segmenter knows about the films the gate skips.

The gated share is stated at the site's prevalence: `prevalence · gate sensitivity + (1 - prevalence) · gate
false-positive rate` on the test films, each gate at the sensitivity the cascade's gate is chosen for
(training/choice.py: target + half the remaining misses) on the validation films.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.models.fusion import prior_shift
from training.aux_evidence import COLUMNS as AUX_COLUMNS
from training.fusion import Evidence, fit_logistic
from training.metrics import (
    expected_calibration_error,
    roc_auc,
    roc_curve,
    threshold_for_sensitivity,
)
from training.report import reliability_table

SENSITIVITIES = (0.90, 0.95, 0.98)
BOOTSTRAP = 1000
CALIBRATED = "classifier, calibrated"  # at the classifier manifest's own operating point
FUSION = "classifier + segmenter (the fusion)"
SERVED = {"calibrated": CALIBRATED, "fused": FUSION}  # refit-demo's --score → the row that is the served score


def specificity_at(scores: np.ndarray, labels: np.ndarray, sensitivity: float) -> float:
    """The best specificity among thresholds whose sensitivity is at least `sensitivity` (the ROC curve)."""
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(1 - fpr[tpr >= sensitivity].min())


def with_interval(statistic: Any, scores: np.ndarray, labels: np.ndarray, seed: int, draws: int) -> dict[str, Any]:
    """`statistic(scores, labels)` and its 95 % percentile bootstrap interval over films."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        pick = rng.integers(0, len(labels), len(labels))
        if 0 < labels[pick].sum() < len(pick):
            values.append(statistic(scores[pick], labels[pick]))
    low, high = np.percentile(values, [2.5, 97.5])
    return {"value": round(float(statistic(scores, labels)), 4), "ci95": [round(float(low), 4), round(float(high), 4)]}


def score_row(scores: np.ndarray, labels: np.ndarray, seed: int = 0, draws: int = BOOTSTRAP) -> dict[str, Any]:
    row = {"auc": with_interval(roc_auc, scores, labels, seed, draws)}
    for sensitivity in SENSITIVITIES:
        row[f"specificity_at_{sensitivity:.2f}"] = with_interval(
            lambda s, y, target=sensitivity: specificity_at(s, y, target), scores, labels, seed, draws)
    return row


def sent(gated: np.ndarray, labels: np.ndarray, prevalence: float) -> dict[str, float]:
    """What a gate sends to the segmenter: its sensitivity and the share of films at the site's prevalence."""
    hit, false_alarm = float(gated[labels == 1].mean()), float(gated[labels == 0].mean())
    return {"sensitivity": round(hit, 4),
            "gated_share_at_prevalence": round(prevalence * hit + (1 - prevalence) * false_alarm, 4)}


class _Table:
    """Evidence columns of both sets by name, and logistic fits of any of them on the validation films."""

    def __init__(self, validation: Evidence, test: Evidence, aux_validation: np.ndarray | None,
                 aux_test: np.ndarray | None) -> None:
        self.labels = {"validation": validation.labels, "test": test.labels}
        self.columns: dict[str, dict[str, np.ndarray]] = {}
        for role, evidence, aux in (("validation", validation, aux_validation), ("test", test, aux_test)):
            inputs = evidence.inputs()  # logit, segmenter peak, log1p area (every film segmented)
            self.columns[role] = {"logit": inputs[:, 0], "peak": inputs[:, 1], "area": inputs[:, 2]}
            if aux is not None:
                self.columns[role].update({column: aux[:, i] for i, column in enumerate(AUX_COLUMNS)})

    def gate_segmenter(self, name: str, gated: dict[str, np.ndarray]) -> list[str]:
        """The segmenter's evidence as a cascade gated by `gated` has it (zero for the films not sent): the names
        of its two new columns."""
        for role, mask in gated.items():
            columns = self.columns[role]
            columns[f"peak gated by {name}"] = columns["peak"] * mask
            columns[f"area gated by {name}"] = columns["area"] * mask
        return [f"peak gated by {name}", f"area gated by {name}"]

    def fitted(self, names: list[str]) -> dict[str, np.ndarray]:
        """A logistic model of `names` fitted on the validation films: its probabilities on both sets."""
        def stack(role: str) -> np.ndarray:
            return np.stack([self.columns[role][name] for name in names], axis=1)

        coefficients, intercept = fit_logistic(stack("validation"), self.labels["validation"])
        return {role: 1 / (1 + np.exp(-(stack(role) @ coefficients + intercept))) for role in ("validation", "test")}


def fusion_report(validation: Evidence, test: Evidence, gate: float, operating_point: float,
                  aux_validation: np.ndarray | None = None, aux_test: np.ndarray | None = None,
                  prevalence: float = 0.22, target_sensitivity: float = 0.95, seed: int = 0,
                  draws: int = BOOTSTRAP, served: str = "calibrated") -> dict[str, Any]:
    """The ablation, operating points, calibration and gated shares on `test`, every model fitted on `validation`
    (the segmenter run on every film of both); `gate` and `operating_point` the classifier manifest's, on its
    probability: the calibration's (it keeps the classifier's decisions), the other rows' operating points are
    chosen on the validation films. `served` says which row the service's score is (refit-demo's --score)."""
    if served not in SERVED:
        raise ValueError(f"served must be one of {list(SERVED)}, got {served!r}")
    table = _Table(validation, test, aux_validation, aux_test)
    fitted_prevalence = float(np.mean(validation.labels))
    gate_sensitivity = target_sensitivity + (1 - target_sensitivity) / 2
    by_classifier = table.gate_segmenter("the classifier", {"validation": validation.classifier_scores >= gate,
                                                            "test": test.classifier_scores >= gate})
    classifier_gate = sent(test.classifier_scores >= gate, test.labels, prevalence)
    rows = {  # name → (evidence, what its cascade sends to the segmenter)
        CALIBRATED: (["logit"], classifier_gate),
        "segmenter evidence alone (gated films)": (by_classifier, classifier_gate),
        "segmenter evidence alone (every film)": (["peak", "area"], {"sensitivity": 1.0,
                                                                     "gated_share_at_prevalence": 1.0}),
        FUSION: (["logit", *by_classifier], classifier_gate)}
    fits = {name: table.fitted(columns) for name, (columns, _) in rows.items()}
    if aux_validation is not None and aux_test is not None:
        for name, columns in (("auxiliary-head evidence alone", list(AUX_COLUMNS)),
                              ("classifier + auxiliary head (gate candidate)", ["logit", *AUX_COLUMNS])):
            fits[name] = table.fitted(columns)
            threshold = threshold_for_sensitivity(fits[name]["validation"], validation.labels, gate_sensitivity)
            rows[name] = (columns, sent(fits[name]["test"] >= threshold, test.labels, prevalence))
        candidate = fits["classifier + auxiliary head (gate candidate)"]
        by_aux = table.gate_segmenter("the candidate", {role: candidate[role] >= threshold
                                                        for role in ("validation", "test")})
        name = "classifier + auxiliary head + segmenter (the candidate's gate)"
        rows[name] = (["logit", *AUX_COLUMNS, *by_aux], rows["classifier + auxiliary head (gate candidate)"][1])
        fits[name] = table.fitted(rows[name][0])
    report: dict[str, Any] = {
        "test_films": len(test), "test_positives": int(np.sum(test.labels)), "validation_films": len(validation),
        "prevalence": prevalence, "gate_sensitivity_target": gate_sensitivity, "served": SERVED[served],
        "raw_classifier": {**score_row(test.classifier_scores, test.labels, seed, draws),
                           "ece": round(expected_calibration_error(test.classifier_scores, test.labels), 4),
                           "gate": classifier_gate},
        "ablation": {}}
    own_calls = test.classifier_scores >= operating_point  # the manifest's point, calibrated or not
    shifted_by_row: dict[str, np.ndarray] = {}  # each row's test scores at the site's prevalence
    for name, (columns, gated) in rows.items():
        shifted = shifted_by_row[name] = np.array([prior_shift(p, fitted_prevalence, prevalence)
                                                   for p in fits[name]["test"]])
        called = own_calls if name == CALIBRATED else fits[name]["test"] >= threshold_for_sensitivity(
            fits[name]["validation"], validation.labels, target_sensitivity)
        report["ablation"][name] = {
            "evidence": columns, "gate": gated, **score_row(shifted, test.labels, seed, draws),
            "ece_after_prior_shift": round(expected_calibration_error(shifted, test.labels), 4),
            "operating_point_from_validation": {"sensitivity": round(float(called[test.labels == 1].mean()), 4),
                                                "specificity": round(float((~called[test.labels == 0]).mean()), 4)}}
    report["raw_classifier"]["operating_point_from_validation"] = report["ablation"][CALIBRATED][
        "operating_point_from_validation"]
    fitted_at = f"calibrated, at the validation films' prevalence ({fitted_prevalence:.2f})"
    variants = [("classifier probability (raw)", test.classifier_scores), (fitted_at, fits[CALIBRATED]["test"]),
                (f"calibrated and shifted to {prevalence:.2f}{' (served)' if served == 'calibrated' else ''}",
                 shifted_by_row[CALIBRATED])]
    if served == "fused":
        variants.append((f"the fusion, shifted to {prevalence:.2f} (served)", shifted_by_row[FUSION]))
    report["reliability"] = {name: {"ece": round(expected_calibration_error(scores, test.labels), 4),
                                    "table": reliability_table(scores, test.labels)} for name, scores in variants}
    return report
