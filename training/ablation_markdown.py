"""The report page's section on what the triage score is made of (issue 16), from `training.fusion_report`'s dict.

Plain text, every number read from the summary, as `training.report_markdown`. The issue's bars are checked
here against the rows, so the page says which are met and which are not, in the same words on every run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Issue 16's bars on a fresh test set: (what, threshold, higher is better).
BARS = {"auc": ("AUC", 0.96, True), "specificity_at_0.95": ("specificity at sensitivity 0.95", 0.85, True),
        "ece": ("ECE of the served score", 0.05, False), "gated": ("share of films sent to the segmenter", 0.45, False)}


def _cell(entry: Mapping[str, Any]) -> str:
    return f"{entry['value']:.3f} ({entry['ci95'][0]:.2f}–{entry['ci95'][1]:.2f})"


def _row(name: str, row: Mapping[str, Any], ece: float | None) -> tuple[str, ...]:
    point = row["operating_point_from_validation"]
    gate = row.get("gate")
    return (name, _cell(row["auc"]), *(_cell(row[f"specificity_at_{s}"]) for s in ("0.90", "0.95", "0.98")),
            "n/a" if ece is None else f"{ece:.3f}",
            f"{point['sensitivity']:.3f} / {point['specificity']:.3f}",
            "n/a" if gate is None else f"{gate['gated_share_at_prevalence']:.2f} ({gate['sensitivity']:.3f})")


def _bars(report: Mapping[str, Any]) -> list[str]:
    rows, served = report["ablation"], report["served"]
    best_auc = max(rows, key=lambda name: rows[name]["auc"]["value"])
    best_spec = max(rows, key=lambda name: rows[name]["specificity_at_0.95"]["value"])
    gated = {name: row["gate"]["gated_share_at_prevalence"] for name, row in rows.items() if row.get("gate")}
    least = min(gated, key=gated.get)
    least_label = f"{least}, its gate's sensitivity {rows[least]['gate']['sensitivity']:.3f}"
    found = {"auc": (rows[best_auc]["auc"]["value"], best_auc),
             "specificity_at_0.95": (rows[best_spec]["specificity_at_0.95"]["value"], best_spec),
             "ece": (rows[served]["ece_after_prior_shift"], served), "gated": (gated[least], least_label)}
    lines = ["**The issue's bars on this test set:**", ""]
    for key, (what, bar, higher) in BARS.items():
        value, name = found[key]
        met = value >= bar if higher else value <= bar
        lines.append(f"* {what} {'≥' if higher else '≤'} {bar}: **{'met' if met else 'not met'}** -- "
                     f"{'best' if key != 'ece' else 'served'}: {value:.3f} ({name})")
    return lines + [""]


def ablation_section(report: Mapping[str, Any]) -> list[str]:
    """The section: the ablation and operating-point table, the bars, the reliability before and after."""
    lines = [
        "## What the triage score is made of (issue 16)",
        "",
        (f"Every row but the first is a logistic model fitted on the {report['validation_films']} validation-fold "
        "films (films neither model trained on), moved to the site's prevalence "
        f"({report['prevalence']:.2f}) by prior shift, and evaluated on the {report['test_films']} test films "
        f"({report['test_positives']} positives). Specificity at a sensitivity is read off the ROC curve; the "
        "intervals are 95 % percentile bootstraps over films. The operating point of the first two rows is the "
        "classifier manifest's (the calibration keeps its decisions), the others' is chosen on the validation "
        "films for sensitivity 0.95. The gated share is the share of films the row's cascade sends to the "
        f"segmenter at prevalence {report['prevalence']:.2f}, its gate chosen for sensitivity "
        f"{report['gate_sensitivity_target']:.3f} on the validation films (the gate's sensitivity on the test "
        "films in brackets); the segmenter's evidence is zero for the films a row's gate does not send."),
        "",
    ]
    header = ("Score", "AUC (95 % CI)", "Spec. at sens. 0.90", "at 0.95", "at 0.98", "ECE",
              "Op. point sens. / spec.", "Gated share (gate sens.)")
    table = [_row("classifier probability, raw (as served before)", report["raw_classifier"],
                  report["raw_classifier"]["ece"])]
    table += [_row(f"{name} (served)" if name == report["served"] else name, row, row["ece_after_prior_shift"])
              for name, row in report["ablation"].items()]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table] + [""]
    lines += _bars(report)
    variants = list(report["reliability"].items())
    lines += [("Reliability of the classifier's probability before and after its calibration and prior shift, and of "
               "the served score (mean score / observed positive rate, images in the bin):"), ""]
    lines += ["| Score bin | " + " | ".join(f"{name} (ECE {block['ece']:.3f})" for name, block in variants) + " |",
              "|---|" + "---|" * len(variants)]
    for index, first in enumerate(variants[0][1]["table"]):
        cells = []
        for _, block in variants:
            row = block["table"][index]
            cells.append("–" if not row["count"] else
                         f"{row['mean_score']:.3f} / {row['positive_rate']:.3f} ({row['count']})")
        upper = "]" if first["upper"] >= 1 else ")"
        lines.append(f"| [{first['lower']:.1f}, {first['upper']:.1f}{upper} | " + " | ".join(cells) + " |")
    return lines + [""]
