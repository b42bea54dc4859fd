"""The Markdown page of the evaluation report, written from the summary dict of `training.report`.

Plain text only (no matplotlib, no numpy): every number on the page is read from the summary, so the page
and ``report.json`` cannot disagree.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from training.ablation_markdown import ablation_section

#: Figure keys of `training.report_plots.draw_figures`, with the caption the page gives each.
FIGURE_CAPTIONS = {
    "roc": "ROC curve of the triage score; the operating point and the gate are marked",
    "reliability": "Reliability diagram of the triage score (observed positive rate per score bin)",
    "dice_histogram": "Per-image Dice on images with a lesion",
    "examples": "Example overlays: true positives, false negatives, false positives at the operating point",
}


def _fmt(value: float | None, digits: int = 3) -> str:
    """A number for a table cell; None (an undefined metric) is shown as 'n/a', never as 0."""
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _ci(bounds: list[float] | None) -> str:
    return "n/a" if bounds is None else f"{100 * bounds[0]:.1f}–{100 * bounds[1]:.1f} %"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _triage_section(summary: Mapping[str, Any]) -> list[str]:
    op = summary["triage"]["operating_point"]
    score_definition = summary["info"].get("score_definition")
    lines = ["## Triage", ""]
    if score_definition:
        lines += [f"**What the triage score is.** {score_definition}", ""]
    else:
        lines += ["**What the triage score is.** Not stated: the run supplied no `info['score_definition']`.", ""]
    lines += [
        (f"**Operating point.** An image is flagged when its triage score is at least {op['threshold']:.4g}. "
        f"The threshold was chosen for a target sensitivity of {_pct(op['target_sensitivity'])}: a missed "
        "pneumothorax can be fatal, while a false flag costs a radiologist one extra look, so the threshold "
        "is the highest one that still finds the target share of pneumothoraces, which keeps the false "
        f"flags as few as that allows. Here it flags {_pct(op['flagged_share'])} of the images."),
        "",
    ]
    auc_rows = [("Triage AUC", _fmt(summary["triage"]["auc"]))]
    if "classifier_auc" in summary["triage"]:
        auc_rows.append(("Classifier AUC", _fmt(summary["triage"]["classifier_auc"])))
    rows = auc_rows + [
        ("Sensitivity", f"{_pct(op['sensitivity'])} (95 % CI {_ci(op['sensitivity_ci95'])})"),
        ("Specificity", f"{_pct(op['specificity'])} (95 % CI {_ci(op['specificity_ci95'])})"),
        ("Precision (PPV)", _pct(op["precision"])),
        ("F1", _fmt(op["f1"])),
        ("F2 (sensitivity weighted)", _fmt(op["f2"])),
        ("TP / FP / TN / FN", f"{op['tp']} / {op['fp']} / {op['tn']} / {op['fn']}"),
    ]
    return lines + _table(("Metric", "Value"), rows)


def _gate_section(summary: Mapping[str, Any]) -> list[str]:
    gate = summary["gate"]
    lines = [
        "## Gate",
        "",
        (f"The segmenter runs only on images whose classifier score is at least {gate['threshold']:.4g}. "
        f"It ran on {gate['gated']} images ({_pct(gate['gated_share'])}), saving {_pct(gate['saved_share'])} "
        f"of the segmenter work; {gate['positives_not_gated']} image(s) with pneumothorax never reached it."),
        "",
    ]
    rows = [
        ("Gate sensitivity", _pct(gate["sensitivity"])),
        ("Images gated", f"{gate['gated']} ({_pct(gate['gated_share'])})"),
        ("Negatives gated", str(gate["negatives_gated"])),
        ("Segmenter work saved", _pct(gate["saved_share"])),
    ]
    return lines + _table(("Metric", "Value"), rows)


def _segmentation_section(summary: Mapping[str, Any]) -> list[str]:
    seg, trip = summary["segmentation"], summary["triplet"]
    lines = [
        "## Segmentation",
        "",
        (f"Masks use the triplet rule: a lesion is drawn only when at least {trip['min_area']} pixels "
        f"exceed {trip['top_score']:.3g}, and then every pixel above {trip['bottom_score']:.3g} is drawn "
        "(top_score, min_area, bottom_score as found on validation data). SIIM mean Dice counts an empty "
        "prediction on an image without lesion as 1."),
        "",
    ]
    runs = [("Cascade", seg["cascade"])]
    if "cascade_no_tta" in seg:
        runs = [("Cascade (hflip TTA)", seg["cascade"]), ("Cascade without TTA", seg["cascade_no_tta"])]
    rows = [
        (
            name,
            _fmt(block["mean_dice"]),
            _fmt(block["mean_dice_positive"]),
            _fmt(block["mean_dice_negative"]),
            _pct(block["positive_zero_share"]),
        )
        for name, block in runs
    ]
    lines += _table(("Run", "SIIM mean Dice", "Dice on positives", "Dice on negatives", "Positives with Dice 0"), rows)
    if "tta_gain" in seg:
        lines += [f"TTA changes the SIIM mean Dice by {seg['tta_gain']:+.4f}.", ""]
    quantiles = [(name, block["positive_quantiles"]) for name, block in runs if block["positive_quantiles"]]
    if quantiles:
        keys = list(quantiles[0][1])
        lines += ["Quantiles of the per-image Dice on positives:", ""]
        lines += _table(("Run", *(f"q{k}" for k in keys)), [(n, *(_fmt(q[k]) for k in keys)) for n, q in quantiles])
    return lines


def _calibration_section(summary: Mapping[str, Any]) -> list[str]:
    cal = summary["calibration"]
    lines = [
        "## Calibration",
        "",
        f"Expected calibration error of the triage score over {cal['n_bins']} equal-width bins: {cal['ece']:.4f}.",
        "",
    ]
    rows = [
        (f"[{r['lower']:.1f}, {r['upper']:.1f}{']' if r['upper'] >= 1 else ')'}", str(r["count"]),
         _fmt(r["mean_score"]), _fmt(r["positive_rate"]))
        for r in cal["table"]
    ]
    return lines + _table(("Score bin", "Images", "Mean score", "Positive rate"), rows)


def _info_section(info: Mapping[str, Any]) -> list[str]:
    rows = [(f"`{key}`", value if isinstance(value, str) else json.dumps(value)) for key, value in info.items()
            if key != "score_definition"]
    if not rows:
        return []
    rows = [(k, v.replace("|", "\\|").replace("\n", " ")) for k, v in rows]
    return ["## Run", "", *_table(("Item", "Value"), rows)]


def render_markdown(summary: Mapping[str, Any], figures: Mapping[str, str], title: str) -> str:
    """The whole page; `figures` maps figure keys (see `FIGURE_CAPTIONS`) to file names beside the page."""
    counts = summary["counts"]
    lines = [
        f"# {title}",
        "",
        (f"{counts['images']} held-out images, {counts['positives']} with pneumothorax "
        f"(prevalence {_pct(counts['prevalence'])})."),
        "",
    ]
    if counts["label_mask_disagreements"]:
        lines += [
            (f"**Warning:** {counts['label_mask_disagreements']} image label(s) disagree with their mask at the "
            "evaluation resolution (e.g. a tiny lesion lost in resizing); triage uses the labels, Dice the masks."),
            "",
        ]
    lines += _triage_section(summary) + _gate_section(summary)
    lines += _segmentation_section(summary) + _calibration_section(summary)
    if "score_ablation" in summary:  # issue 16: the evidence the triage score is made of, and its calibration
        lines += ablation_section(summary["score_ablation"])
    lines += ["## Figures", ""]
    lines += _table(("Figure", "File"), [(FIGURE_CAPTIONS[k], f"[{name}]({name})") for k, name in figures.items()])
    for key, name in figures.items():
        lines += [f"![{FIGURE_CAPTIONS[key]}]({name})", ""]
    lines += _info_section(summary["info"])
    return "\n".join(lines).rstrip() + "\n"
