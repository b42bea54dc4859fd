"""Orchestration: one deterministic case per index, a worker pool, and the SIIM-layout outputs.

Determinism: every image draws from its own `SeedSequence([seed, index])`, split into independent streams
(anatomy, lesions, file format, noise, patient), so an image depends only on (seed, index, options) and the
output is byte-identical whatever the worker count or scheduling. Results come back in index order, so
`train-rle.csv` and `synth.json` are ordered too.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.cascade.rle import EMPTY, encode
from service.processes import safe_context
from training.synth import dicom_writer, lesions
from training.synth.anatomy import Anatomy, render_anatomy
from training.synth.shapes import ProceduralShapes, ShapeBank

SHAPES_RELATIVE = Path("labels") / "siim-pneumothorax-train-rle.csv.gz"
TWO_INSTANCE_RATE = 0.2  # SIIM: 3,576 positive rows over 2,669 positive images


@dataclass(frozen=True)
class SynthConfig:
    """The options of one `synth` run (also written to synth.json)."""

    out: Path
    count: int
    seed: int
    prevalence: float = 0.22
    size: int = 1024
    uncompressed: bool = False
    difficulty: str = "realistic"
    workers: int = 1
    shapes: Path | None = None  # None = procedural shapes


@dataclass
class Case:
    """One rendered image with everything needed to write it and to check it."""

    index: int
    anatomy: Anatomy
    lesions: list[lesions.Lesion]
    display: np.ndarray  # the float image before quantisation
    stored: np.ndarray
    fmt: dicom_writer.FileFormat
    dataset: object


def default_shapes_path(repo_root: Path) -> Path:
    """$PTX_REALDATA/labels/... if set, else <repo root>/../shared/realdata/labels/..."""
    env = os.environ.get("PTX_REALDATA")
    base = Path(env) if env else repo_root.parent / "shared" / "realdata"
    return base / SHAPES_RELATIVE


def load_shape_source(config: SynthConfig) -> ShapeBank | ProceduralShapes:
    return ShapeBank.from_csv(config.shapes) if config.shapes else ProceduralShapes()


def _streams(config: SynthConfig, index: int) -> list[np.random.Generator]:
    """Image `index`'s independent streams: anatomy, lesions, file format, noise, patient."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence([config.seed, index]).spawn(5)]


def _draws_positive(lesion_rng: np.random.Generator, prevalence: float) -> bool:
    return bool(lesion_rng.random() < prevalence)


def case_positive(config: SynthConfig, index: int) -> bool:
    """Whether image `index` has a lesion, known without rendering it (the first draw of its lesion stream):
    the labels of a whole run, hence its folds, for the price of a few random draws (training/demo_split.py)."""
    return _draws_positive(_streams(config, index)[1], config.prevalence)


def render_case(config: SynthConfig, index: int, source: ShapeBank | ProceduralShapes) -> Case:
    """Render image `index` of the run: a pure function of (config options, index, shape source)."""
    anatomy_rng, lesion_rng, format_rng, noise_rng, patient_rng = _streams(config, index)
    anatomy = render_anatomy(anatomy_rng, config.size)
    positive = _draws_positive(lesion_rng, config.prevalence)
    count = (2 if lesion_rng.random() < TWO_INSTANCE_RATE else 1) if positive else 0
    placed = lesions.place_lesions(lesion_rng, anatomy, source, count, config.difficulty) if count else []
    sigma = noise_rng.uniform(0.006, 0.016)
    noise = noise_rng.standard_normal((config.size, config.size), dtype=np.float32) * np.float32(sigma)
    display = lesions.compose(anatomy, placed, noise)
    fmt = dicom_writer.choose_format(format_rng, index, config.uncompressed)
    stored = dicom_writer.to_stored(display, fmt)
    lesions.measure(dicom_writer.to_display(stored, fmt), anatomy, placed)
    dataset = dicom_writer.build_dataset(stored, fmt, config.seed, index, patient_rng)
    return Case(index, anatomy, placed, display, stored, fmt, dataset)


_SOURCE: ShapeBank | ProceduralShapes | None = None
_CONFIG: SynthConfig | None = None


def _init_worker(config: SynthConfig) -> None:
    """Load the shape bank once per worker process."""
    global _SOURCE, _CONFIG
    _CONFIG, _SOURCE = config, load_shape_source(config)


def _work(index: int) -> tuple[list[str], dict]:
    """Render and write one image; return its CSV rows and its synth.json entry."""
    case = render_case(_CONFIG, index, _SOURCE)
    uid = str(case.dataset.SOPInstanceUID)
    dicom_writer.write(case.dataset, _CONFIG.out / "dicom" / f"{uid}.dcm")
    rles = [encode(lesion.mask) for lesion in case.lesions] or [EMPTY]
    meta = {"index": index, "image_id": uid, **case.fmt.describe(), "instances": len(case.lesions), "lesions": [
                {"side": ["image_left", "image_right"][l.side], "shape_source": l.source,
                 "line_width_px": l.line_width, "lesion_contrast_target": round(l.lesion_target, 5),
                 "line_contrast_target": round(l.line_target, 5), **l.measured} for l in case.lesions]}
    return [f"{uid},{rle}" for rle in rles], meta


def run(config: SynthConfig, progress: bool = True) -> dict:
    """Generate the whole data set into `config.out`; returns the synth.json content."""
    (config.out / "dicom").mkdir(parents=True, exist_ok=True)
    if config.workers <= 1:
        _init_worker(config)
        results = map(_work, range(config.count))
        pool = None
    else:
        context = safe_context()
        pool = context.Pool(config.workers, initializer=_init_worker, initargs=(config,))
        chunk = max(1, min(8, config.count // (config.workers * 8)))
        results = pool.imap(_work, range(config.count), chunksize=chunk)
    rows, images = [], []
    try:
        for image_rows, meta in tqdm(results, total=config.count, desc="synth", unit="img", disable=not progress):
            rows.extend(image_rows)
            images.append(meta)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    (config.out / "train-rle.csv").write_text("ImageId, EncodedPixels\n" + "".join(r + "\n" for r in rows))
    source = load_shape_source(config).describe() if config.shapes is None else {
        "kind": "siim", "path": str(config.shapes),
        "sha256": hashlib.sha256(Path(config.shapes).read_bytes()).hexdigest()}  # the path means nothing elsewhere
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items() if k not in ("out", "workers")}
    summary = {"generator": "training.synth", "options": options, "shape_source": source,
               "contrast_ranges_realistic": {"lesion": list(lesions.LESION_CONTRAST), "line": list(lesions.LINE_CONTRAST)},
               "difficulty_scale": lesions.DIFFICULTY_SCALE[config.difficulty],
               "contrast_definition": "fractions of the display range; see training/synth/contrast.py",
               "positives": sum(1 for m in images if m["instances"]), "images": images}
    (config.out / "synth.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary
