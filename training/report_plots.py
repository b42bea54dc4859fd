"""The report's figures: ROC, reliability diagram, Dice histogram and example overlays (matplotlib, Agg).

Only drawing lives here; every number comes from `training.report` or `training.metrics`. Each figure is
saved as a palette PNG (fixed 60-colour palette): the plots are flat colours and lines, so quantising loses nothing
visible and keeps the radiograph grid, whose grey gradients compress badly as RGBA, near 100 KB.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: the evaluation runs on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

from training.cascade_outputs import CascadeOutputs, positive_dice  # noqa: E402
from training.metrics import roc_curve  # noqa: E402

#: Largest side of one overlay tile, in pixels, both of the data and of the rendered tile.
TILE_PX = 256
_DPI = 100
_TRUE_COLOUR = "#00d000"  # ground truth outline
_PRED_COLOUR = "#ff2020"  # prediction outline
_KIND_TITLES = {"true_positive": "TP", "false_negative": "FN", "false_positive": "FP"}


def _palette() -> Image.Image:
    """A fixed palette: 48 greys plus the exact line colours used here.

    Fixed rather than adaptive because an adaptive palette spends its entries on the radiographs' greys
    and shifts the thin green/red outlines towards grey.
    """
    greys = [(v, v, v) for v in np.linspace(0, 255, 48).round().astype(int)]
    named = [_TRUE_COLOUR, _PRED_COLOUR, *(f"C{i}" for i in range(10))]
    colours = greys + [tuple(round(255 * c) for c in to_rgb(name)) for name in named]
    flat = [channel for colour in colours for channel in colour]
    palette = Image.new("P", (1, 1))
    palette.putpalette(flat + flat[-3:] * (256 - len(colours)))
    return palette


def _save(fig: Figure, path: Path) -> Path:
    """Render `fig` and save it as an optimised PNG on the fixed palette."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as rendered:
        quantised = rendered.convert("RGB").quantize(palette=_palette(), dither=Image.Dither.NONE)
        quantised.save(path, optimize=True)
    return path


def plot_roc(outputs: CascadeOutputs, summary: Mapping[str, Any], path: Path) -> Path | None:
    """ROC of the triage score (and of the classifier if it differs), operating point and gate marked.

    None when the set holds one class only (no ROC exists).
    """
    labels = outputs.label_array
    if labels.all() or not labels.any():
        return None
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    fpr, tpr, _ = roc_curve(outputs.scores, labels)
    ax.plot(fpr, tpr, color="C0", label=f"triage score (AUC {summary['triage']['auc']:.3f})")
    if "classifier_auc" in summary["triage"]:
        cfpr, ctpr, _ = roc_curve(outputs.classifier_scores, labels)
        ax.plot(cfpr, ctpr, color="C2", ls="--", label=f"classifier (AUC {summary['triage']['classifier_auc']:.3f})")
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8)
    op = summary["triage"]["operating_point"]
    if op["specificity"] is not None and op["sensitivity"] is not None:
        label = f"operating point (t={op['threshold']:.3g})"
        ax.plot(1 - op["specificity"], op["sensitivity"], "o", color="C3", label=label)
    gated = np.asarray(outputs.gated, dtype=bool)
    gate_fpr, gate_tpr = gated[~labels].mean(), gated[labels].mean()
    ax.plot(gate_fpr, gate_tpr, "s", color="C1", mfc="none", label=f"gate (t={outputs.gate_threshold:.3g})")
    ax.axhline(outputs.target_sensitivity, color="C3", lw=0.6, ls=":")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), title="ROC")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_reliability(summary: Mapping[str, Any], path: Path) -> Path:
    """Observed positive rate against mean score per bin, with the bin counts below."""
    table = summary["calibration"]["table"]
    filled = [row for row in table if row["count"]]
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(4.6, 4.8), sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, label="perfect calibration")
    ax.plot([r["mean_score"] for r in filled], [r["positive_rate"] for r in filled], "o-", color="C0", label="observed")
    ax.set(ylabel="positive rate", ylim=(-0.02, 1.02), title=f"Reliability (ECE {summary['calibration']['ece']:.3f})")
    ax.legend(loc="upper left", fontsize=7)
    width = table[0]["upper"] - table[0]["lower"]
    ax_n.bar([r["lower"] for r in table], [r["count"] for r in table], width=width, align="edge", color="0.6")
    ax_n.set(xlabel="triage score", ylabel="images", xlim=(0, 1))
    fig.tight_layout()
    return _save(fig, path)


def plot_dice_histogram(outputs: CascadeOutputs, path: Path) -> Path:
    """Per-image Dice on images with a lesion; the no-TTA run as an outline when it was given."""
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    bins = np.linspace(0.0, 1.0, 21)
    with_tta = positive_dice(outputs)
    if with_tta.size == 0:
        ax.text(0.5, 0.5, "no images with a lesion", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.hist(with_tta, bins=bins, color="C0", alpha=0.75, label="cascade")
        if outputs.masks_pred_no_tta is not None:
            no_tta = positive_dice(outputs, no_tta=True)
            ax.hist(no_tta, bins=bins, histtype="step", color="C3", lw=1.5, label="cascade without TTA")
        ax.legend(loc="upper center", fontsize=7)
    ax.set(xlabel="Dice", ylabel="images", xlim=(0, 1), title=f"Dice on positives (n={with_tta.size})")
    fig.tight_layout()
    return _save(fig, path)


def _resized(array: np.ndarray, side: int, resample: Image.Resampling) -> np.ndarray:
    """`array` scaled so its longer side is at most `side` (never enlarged), as float32."""
    h, w = array.shape
    scale = min(1.0, side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(np.asarray(array, dtype=np.float32)).resize(size, resample), dtype=np.float32)


def _draw_tile(ax: Any, image: np.ndarray, truth: np.ndarray, pred: np.ndarray, title: str) -> None:
    """Image in grey, true mask outlined in green, prediction in red, all scaled to one tile."""
    shown = _resized(np.clip(image, 0.0, 1.0), TILE_PX, Image.Resampling.BILINEAR)
    ax.imshow(shown, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    for mask, colour in ((truth, _TRUE_COLOUR), (pred, _PRED_COLOUR)):
        if np.asarray(mask).any():
            # Masks may be at another resolution than the image: scale each onto the shown grid.
            as_float = Image.fromarray(np.asarray(mask, dtype=np.float32))
            soft = np.asarray(as_float.resize((shown.shape[1], shown.shape[0]), Image.Resampling.BILINEAR))
            if soft.max() > 0.5:
                ax.contour(soft, levels=[0.5], colors=colour, linewidths=1.2)
    ax.set_title(title, fontsize=7)
    ax.set_axis_off()


def plot_examples(outputs: CascadeOutputs, examples: Mapping[str, Sequence[int]], path: Path) -> Path | None:
    """One row per outcome (TP, FN, FP) of example overlays; None without images or examples."""
    if outputs.images is None:
        return None
    rows = [(kind, list(examples.get(kind, ()))) for kind in _KIND_TITLES if examples.get(kind)]
    if not rows:
        return None
    n_cols = max(len(indices) for _, indices in rows)
    tile_in = TILE_PX / _DPI * 0.85
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(n_cols * tile_in, len(rows) * (tile_in + 0.3)), squeeze=False)
    scores = np.asarray(outputs.scores, dtype=np.float64)
    for r, (kind, indices) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            if c >= len(indices):
                ax.set_axis_off()
                continue
            i = indices[c]
            short_id = str(outputs.image_ids[i])[-10:]  # UIDs run to 64 characters: the tail identifies the film
            title = f"{_KIND_TITLES[kind]} …{short_id}  s={scores[i]:.2f}"
            _draw_tile(ax, np.asarray(outputs.images[i]), outputs.masks_true[i], outputs.masks_pred[i], title)
    fig.suptitle("green: ground truth, red: cascade mask", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def draw_figures(
    outputs: CascadeOutputs, summary: Mapping[str, Any], out_dir: Path, examples: Mapping[str, Sequence[int]]
) -> dict[str, str]:
    """Draw every figure that the data allow into `out_dir`; returns {figure key: file name}.

    Keys: ``roc`` (needs both classes), ``reliability``, ``dice_histogram``, ``examples`` (needs images).
    """
    drawn = {
        "roc": plot_roc(outputs, summary, out_dir / "roc.png"),
        "reliability": plot_reliability(summary, out_dir / "reliability.png"),
        "dice_histogram": plot_dice_histogram(outputs, out_dir / "dice_histogram.png"),
        "examples": plot_examples(outputs, examples, out_dir / "examples.png"),
    }
    return {key: path.name for key, path in drawn.items() if path is not None}
