"""Reduced decoding against full decoding: equivalence of the answers and decode time, in one run (issue 15 §1).

    python -m load_tests.bench_reduced_decode [--count 120] [--seed 515] [--out DIR]

Every film is read twice through `read_radiograph`, in full and at the models' resolution (the service's
PTX_REDUCED_DECODE), and both go through the in-process cascade with the bundled demo models. Films: the real
chest films of ../shared/realdata, and a synthetic set with mixed encodings made here from `training synth`
films (its own lossless mix: uncompressed, RLE, JPEG-LS, JPEG 2000), each also re-encoded as JPEG 2000
lossless, JPEG 2000 lossy (9/7) and JPEG baseline (8-bit). Reported per encoding: films reduced, fallbacks,
decode ms full vs reduced (median), the largest score difference, the smallest and mean Dice of the reduced
answer's mask to the full one's (films where either has one), and over the whole set AUC and Dice on
positives of both, against the ground truth.

`tests/imaging/test_reduced_decode.py` runs the same comparison on a small set; this is the big run whose
figures docs/benchmarks.md gives.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def models_side(models_root: Path = REPO / "models") -> int:
    """What the service's flow asks of the decoder for the models in `models_root` (`ModelSet.decode_side`; 512
    for the bundled demo since its 0.2.0 classifier)."""
    from service.models.model_set import resolve
    from service.settings import load_settings

    return resolve(load_settings(environ={"PTX_MODELS_DIR": str(models_root)})).decode_side


def as_j2k(data: bytes, lossy: bool = False) -> bytes:
    """The film re-encoded as JPEG 2000: lossless (5/3), or lossy (9/7) at 20:1 as modality vendors send it."""
    ds = pydicom.dcmread(io.BytesIO(data))
    arr = ds.pixel_array
    if lossy:
        ds.compress(JPEG2000, arr, encoding_plugin="pylibjpeg", j2k_cr=[20])
    else:
        ds.compress(JPEG2000Lossless, arr, encoding_plugin="pylibjpeg")
    return _saved(ds)


def as_jpeg(data: bytes, display: np.ndarray) -> bytes:
    """The film's display image as an 8-bit JPEG baseline film (quality 95), without window or rescale."""
    ds = pydicom.dcmread(io.BytesIO(data))
    buffer = io.BytesIO()
    Image.fromarray(np.round(display * 255).astype(np.uint8)).save(buffer, format="JPEG", quality=95)
    for keyword in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "RescaleType",
                    "VOILUTFunction", "PresentationLUTShape"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression = "01"
    return _saved(ds)


def _saved(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@dataclass
class Film:
    """One film of the comparison: its bytes, its encoding's name, and its ground truth (None: real, unknown)."""

    name: str
    encoding: str
    data: bytes
    truth: np.ndarray | None = None


def synthetic_films(count: int, seed: int, folder: Path) -> list[Film]:
    """`count` synthetic films in the generator's lossless mix, each also as JPEG 2000 (lossless, lossy) and JPEG."""
    from service.cascade import rle
    from service.imaging.reader import read_radiograph
    from training.data import index_siim

    if not (folder / "synth.json").is_file():
        subprocess.run([sys.executable, "-m", "training", "synth", "--out", str(folder), "--count", str(count),
                        "--seed", str(seed), "--prevalence", "0.4", "--quiet"], cwd=REPO, check=True)
    films = []
    for sample in index_siim(folder)[:count]:
        data = sample.path.read_bytes()
        ds = pydicom.dcmread(io.BytesIO(data))
        truth = rle.decode_union(sample.rles, int(ds.Rows), int(ds.Columns))
        films.append(Film(sample.image_id, f"synth: {ds.file_meta.TransferSyntaxUID.name}", data, truth))
        films.append(Film(sample.image_id, "synth as JPEG 2000 lossless", as_j2k(data), truth))
        films.append(Film(sample.image_id, "synth as JPEG 2000 lossy 20:1", as_j2k(data, lossy=True), truth))
        films.append(Film(sample.image_id, "synth as JPEG baseline q95", as_jpeg(data, read_radiograph(data).pixels),
                          truth))
    return films


def real_films(root: Path) -> list[Film]:
    return [Film(path.name, f"real: {path.name}", path.read_bytes()) for path in sorted((root / "chest").glob("*.dcm"))]


@dataclass
class Outcome:
    """One film read both ways: decode ms, grids, scores and masks of both answers."""

    film: Film
    full_ms: float
    reduced_ms: float
    reduced_shape: tuple[int, int]
    full_score: float
    reduced_score: float
    full_mask: np.ndarray
    reduced_mask: np.ndarray


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _timed(function: Callable[[], object], repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = function()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times), result


def compare(films: Sequence[Film], cascade: object, repeat: int = 1, min_side: int | None = None) -> list[Outcome]:
    """Each film read in full and reduced (decode timed, median of `repeat`), then through `cascade` both ways;
    reduced for `min_side` (default: the bundled models' side, as the service asks)."""
    from service.imaging.acceptance import permissive_policy
    from service.imaging.reader import read_radiograph

    full_policy = permissive_policy()
    reduced_policy = dataclasses.replace(full_policy, decode_min_side=min_side or models_side())
    outcomes = []
    for film in films:
        full_ms, full = _timed(lambda film=film: read_radiograph(film.data, full_policy), repeat)
        reduced_ms, reduced = _timed(lambda film=film: read_radiograph(film.data, reduced_policy), repeat)
        a, b = cascade.run([full, reduced])  # type: ignore[attr-defined]
        outcomes.append(Outcome(film, full_ms, reduced_ms, reduced.pixels.shape, a.score, b.score, a.mask, b.mask))
    return outcomes


@dataclass
class Summary:
    """Equivalence of a group of films: the worst and mean of each figure."""

    films: int
    reduced: int
    full_ms: float
    reduced_ms: float
    max_score_difference: float
    mean_score_difference: float
    min_mask_dice: float | None
    mean_mask_dice: float | None
    low_dice: list[str] = field(default_factory=list)


def summarise(outcomes: Sequence[Outcome]) -> Summary:
    differences = [abs(o.full_score - o.reduced_score) for o in outcomes]
    masked = [o for o in outcomes if o.full_mask.any() or o.reduced_mask.any()]
    dices = [dice(o.full_mask, o.reduced_mask) for o in masked]
    return Summary(
        films=len(outcomes),
        reduced=sum(o.reduced_shape != o.full_mask.shape for o in outcomes),
        full_ms=statistics.median(o.full_ms for o in outcomes),
        reduced_ms=statistics.median(o.reduced_ms for o in outcomes),
        max_score_difference=max(differences),
        mean_score_difference=float(np.mean(differences)),
        min_mask_dice=min(dices) if dices else None,
        mean_mask_dice=float(np.mean(dices)) if dices else None,
        low_dice=[f"{o.film.name[-12:]} {d:.3f}" for o, d in zip(masked, dices) if d < 0.98],
    )


def accuracy(outcomes: Sequence[Outcome]) -> dict[str, float]:
    """AUC and Dice on positives against the ground truth, of the full and of the reduced answers."""
    from training.metrics import mean_dice_positive, roc_auc

    known = [o for o in outcomes if o.film.truth is not None]
    labels = np.array([int(o.film.truth.any()) for o in known])  # type: ignore[union-attr]
    truths = [o.film.truth for o in known]
    return {
        "auc_full": roc_auc(np.array([o.full_score for o in known]), labels),
        "auc_reduced": roc_auc(np.array([o.reduced_score for o in known]), labels),
        "dice_pos_full": mean_dice_positive([o.full_mask for o in known], truths),
        "dice_pos_reduced": mean_dice_positive([o.reduced_mask for o in known], truths),
    }


def demo_cascade(threads: int = 0) -> object:
    from service.models.manifest import find_models
    from training.evaluate import load_cascade

    models = {manifest.task: path for path, manifest in find_models(REPO / "models")}
    return load_cascade(models["classification"], models["segmentation"], threads=threads)[0]


def table(groups: dict[str, Summary]) -> str:
    lines = ["| films | n | reduced | decode ms full | reduced | max Δscore | mean Δscore | min Dice | mean Dice |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in groups.items():
        low = "–" if s.min_mask_dice is None else f"{s.min_mask_dice:.3f}"
        mean = "–" if s.mean_mask_dice is None else f"{s.mean_mask_dice:.3f}"
        lines.append(f"| {name} | {s.films} | {s.reduced} | {s.full_ms:.1f} | {s.reduced_ms:.1f} | "
                     f"{s.max_score_difference:.4f} | {s.mean_score_difference:.4f} | {low} | {mean} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from tests.realdata import realdata_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=120, help="synthetic films (each in 4 encodings)")
    parser.add_argument("--seed", type=int, default=515)
    parser.add_argument("--repeat", type=int, default=3, help="decodes timed per film and way (median)")
    parser.add_argument("--out", type=Path, default=REPO / "data" / "bench" / "reduced-decode")
    args = parser.parse_args(argv)
    cascade = demo_cascade()
    films = real_films(realdata_dir()) + synthetic_films(args.count, args.seed,
                                                         args.out / f"synth-n{args.count}-s{args.seed}")
    outcomes = compare(films, cascade, args.repeat)
    groups: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        groups.setdefault(outcome.film.encoding, []).append(outcome)
    summaries = {name: summarise(found) for name, found in groups.items()}
    summaries["all synthetic"] = summarise([o for o in outcomes if o.film.truth is not None])
    print(table(summaries))
    for name, summary in summaries.items():
        if summary.low_dice:
            print(f"{name}: mask Dice under 0.98: {', '.join(summary.low_dice)}")
    figures = accuracy(outcomes)
    print("synthetic, against the ground truth: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))
    print(f"ΔAUC {abs(figures['auc_full'] - figures['auc_reduced']):.4f}, "
          f"ΔDice on positives {abs(figures['dice_pos_full'] - figures['dice_pos_reduced']):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
