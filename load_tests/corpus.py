"""The film corpus the Locust scenarios post: a positive pool, a negative pool and a few rejects.

    python -m load_tests.corpus [--out data/load/corpus] [--count 96] [--seed 7]

Why pools rather than a folder of films: the load mix is 22 % requests for films the service calls
positive (the design's prevalence), 75 % films it calls negative and 3 % requests it must refuse, and the
scenarios check every answer against what its film should get. A synthetic label is not enough for that:
the demo classifier is tuned for sensitivity, so many label-negative films score above its operating point.
So each synthetic film is scored once, in-process, with the service's own cascade (`service.cascade.postprocess.Cascade`
over the ONNX models and thresholds the service loads, the same engine and TTA, hence the same scores to
~1e-6), and kept only where label and score agree with a margin around the operating point:

* positive pool: a lesion in the synthetic label and score >= operating point + MARGIN;
* negative pool: no lesion and score < operating point - MARGIN;
* rejects, each with the answer it must get: a non-DICOM body (400 `not_dicom`), a synthetic film relabelled
  as a pelvis (422 `not_chest`) and the same film relabelled as CT (422 `not_radiograph`); each is checked
  in-process with `read_radiograph` when the corpus is built, so a policy change shows up here first.

The films come from `python -m training synth` with its default lossless encoding mix, which cycles by
index through Explicit VR Little Endian (uncompressed), RLE Lossless, JPEG-LS Lossless and JPEG 2000
Lossless: about a quarter of the films in each, all of which the service decodes (docs/benchmarks.md,
"Pixel decoding"). Generation is deterministic for (count, seed) and written under `data/load/` (ignored
by git); `manifest.json` records the options, the models the scores came from and every film with its
pool, encoding, score and expected answer. `ensure()` rebuilds only when those differ.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO / "data" / "load" / "corpus"
VERSION = 1  # bump when the selection rules change: ensure() then rebuilds
DEFAULT_COUNT = 128
DEFAULT_SEED = 7
SYNTH_PREVALENCE = 0.3  # a few more lesions than the mix wants, so the positive pool is not thin
MARGIN = 0.01  # score distance from the operating point for a film to enter a pool
# Request mix, per 100 requests: what share of the load each pool gets.
MIX = {"positive": 22, "negative": 75, "reject": 3}
# Mask asked for, among films: a worklist needs score and priority only; a viewer asks for the overlay.
MASKS = {"none": 16, "png": 3}
NOT_DICOM_BODY = b"not a radiograph, " * 64


@dataclass(frozen=True)
class Film:
    """One corpus file and the answer the service must give for it."""

    kind: str  # positive, negative, reject
    path: str  # relative to the corpus folder
    encoding: str  # transfer syntax name, or "none" for a non-DICOM body
    score: float | None  # the in-process cascade's score (films only)
    status: int  # expected HTTP status
    code: str | None  # expected error code (rejects) or None
    label: str | None  # expected label (films) or None


@dataclass
class Corpus:
    """A loaded corpus: the films of each pool with their bytes, read into memory once."""

    folder: Path
    manifest: dict
    pools: dict[str, list[tuple[Film, bytes]]]

    def composition(self) -> dict[str, dict[str, int]]:
        """Films per pool and encoding."""
        return {kind: dict(collections.Counter(film.encoding for film, _ in films))
                for kind, films in self.pools.items()}


def _options(count: int, seed: int) -> dict:
    return {"version": VERSION, "count": count, "seed": seed, "synth_prevalence": SYNTH_PREVALENCE,
            "margin": MARGIN}


def _models() -> dict:
    """Which models (and TTA) the service would run with this environment's settings (PTX_MODELS_DIR etc.)."""
    from service.models.model_set import resolve
    from service.settings import load_settings

    settings = load_settings()
    models = resolve(settings)
    return {"classifier": f"{models.classifier.manifest.name} {models.classifier.manifest.version}",
            "segmenter": f"{models.segmenter.manifest.name} {models.segmenter.manifest.version}",
            "hflip_tta": settings.hflip_tta}


def _cascade():
    """The cascade the service would run: same models, thresholds and TTA, ONNX Runtime on the CPU."""
    from service.models.model_set import resolve
    from service.settings import load_settings
    from training.evaluate import load_cascade

    settings = load_settings()
    models = resolve(settings)
    cascade, _ = load_cascade(models.classifier.directory, models.segmenter.directory,
                              hflip_tta=settings.hflip_tta, threads=0)
    return cascade


def _rejects(out: Path, template: Path) -> list[Film]:
    """Requests the service must refuse, each with its code; checked in-process against `read_radiograph`."""
    import pydicom
    from pydicom.uid import CTImageStorage

    from service.imaging.radiograph import RadiographError
    from service.imaging.reader import read_radiograph

    folder = out / "rejects"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "not_dicom.bin").write_bytes(NOT_DICOM_BODY)
    films = [Film("reject", "rejects/not_dicom.bin", "none", None, 400, "not_dicom", None)]
    pelvis = pydicom.dcmread(template)
    pelvis.BodyPartExamined = "PELVIS"
    pelvis.save_as(folder / "not_chest.dcm", enforce_file_format=True)
    films.append(Film("reject", "rejects/not_chest.dcm", pelvis.file_meta.TransferSyntaxUID.name, None, 422,
                      "not_chest", None))
    ct = pydicom.dcmread(template)
    ct.Modality, ct.SOPClassUID = "CT", CTImageStorage
    ct.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ct.save_as(folder / "not_radiograph.dcm", enforce_file_format=True)
    films.append(Film("reject", "rejects/not_radiograph.dcm", ct.file_meta.TransferSyntaxUID.name, None, 422,
                      "not_radiograph", None))
    for film in films:
        try:
            read_radiograph(out / film.path)
        except RadiographError as error:
            if (error.code.value, error.http_status) != (film.code, film.status):
                raise RuntimeError(f"{film.path}: the service would answer {error.http_status} {error.code.value}, "
                                   f"the corpus expects {film.status} {film.code}") from error
        else:
            raise RuntimeError(f"{film.path}: the service would accept it; the corpus expects {film.code}")
    return films


def build(out: Path, count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED, quiet: bool = True) -> dict:
    """Generate, score and sort the corpus into `out` (replaced); returns the manifest it wrote."""
    from service.imaging.reader import read_radiograph
    from training.__main__ import main as training_main

    if out.exists():
        shutil.rmtree(out)
    synth = out / "synth"
    arguments = ["synth", "--out", str(synth), "--count", str(count), "--seed", str(seed),
                 "--prevalence", str(SYNTH_PREVALENCE), "--workers", "2"]
    if training_main(arguments + (["--quiet"] if quiet else [])) != 0:
        raise RuntimeError(f"python -m training {' '.join(arguments)} failed")
    images = json.loads((synth / "synth.json").read_text())["images"]
    cascade = _cascade()
    films: list[Film] = []
    template = None
    for image in images:
        relative = f"synth/dicom/{image['image_id']}.dcm"
        score = float(cascade.classify([read_radiograph(out / relative).pixels])[0])
        lesion = image["instances"] > 0
        if lesion and score >= cascade.operating_point + MARGIN:
            films.append(Film("positive", relative, image["encoding"], score, 200, None, "pneumothorax"))
        elif not lesion and score < cascade.operating_point - MARGIN:
            films.append(Film("negative", relative, image["encoding"], score, 200, None, "no_pneumothorax"))
            if template is None and image["encoding"] == "Explicit VR Little Endian":
                template = out / relative
    chosen = {film.path for film in films}
    for path in (synth / "dicom").glob("*.dcm"):  # films in no pool: not needed, not kept
        if f"synth/dicom/{path.name}" not in chosen:
            path.unlink()
    if template is None:
        raise RuntimeError(f"no uncompressed negative film among {count} (seed {seed}) to derive rejects from")
    films += _rejects(out, template)
    counts = collections.Counter(film.kind for film in films)
    if counts["positive"] < 4 or counts["negative"] < 4:
        raise RuntimeError(f"pools too small ({dict(counts)}) from {count} films: use a larger --count")
    manifest = {"options": _options(count, seed), "models": _models(),
                "operating_point": cascade.operating_point, "gate": cascade.gate,
                "mix": MIX, "masks": MASKS, "pools": dict(counts),
                "films": [asdict(film) for film in films]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def ensure(out: Path = DEFAULT_DIR, count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED) -> dict:
    """The manifest of the corpus in `out`, built first if absent or made with other options or models."""
    path = out / "manifest.json"
    if path.is_file():
        manifest = json.loads(path.read_text())
        if manifest.get("options") == _options(count, seed) and manifest.get("models") == _models():
            return manifest
    return build(out, count, seed)


def load(folder: Path) -> Corpus:
    """Read a built corpus (every film into memory) for a load generator."""
    path = folder / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no corpus at {folder}: run `python -m load_tests.corpus --out {folder}`")
    manifest = json.loads(path.read_text())
    pools: dict[str, list[tuple[Film, bytes]]] = {kind: [] for kind in MIX}
    for entry in manifest["films"]:
        film = Film(**entry)
        pools[film.kind].append((film, (folder / film.path).read_bytes()))
    empty = [kind for kind, films in pools.items() if not films]
    if empty:
        raise RuntimeError(f"corpus {folder} has no {', '.join(empty)} films")
    return Corpus(folder, manifest, pools)


def parse_mix(text: str) -> dict[str, float]:
    """`positive=22,negative=75,reject=3` → weights by pool; every pool named once, weights >= 0, some > 0."""
    weights: dict[str, float] = {}
    for item in text.split(","):
        kind, _, value = item.partition("=")
        kind = kind.strip()
        if kind not in MIX or kind in weights:
            raise ValueError(f"mix {text!r}: {kind!r} is not one of {', '.join(MIX)} or is repeated")
        weights[kind] = float(value)
    if set(weights) != set(MIX) or min(weights.values()) < 0 or not sum(weights.values()) > 0:
        raise ValueError(f"mix {text!r}: give a weight >= 0 for each of {', '.join(MIX)}, not all 0")
    return weights


def pick(rng: random.Random, corpus: Corpus, mix: dict[str, float] = MIX) -> tuple[Film, bytes, str]:
    """One request of the mix: a film (or reject) and the mask to ask for, drawn from `rng`."""
    kind = rng.choices(list(mix), weights=list(mix.values()))[0]
    film, payload = rng.choice(corpus.pools[kind])
    mask = "none" if kind == "reject" else rng.choices(list(MASKS), weights=list(MASKS.values()))[0]
    return film, payload, mask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help="corpus folder (default %(default)s)")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="synthetic films to draw the pools from")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--force", action="store_true", help="rebuild even if an identical corpus is there")
    args = parser.parse_args(argv)
    manifest = build(args.out, args.count, args.seed) if args.force else ensure(args.out, args.count, args.seed)
    corpus = load(args.out)
    print(f"corpus {args.out}: pools {manifest['pools']}, operating point {manifest['operating_point']:.4f}")
    for kind, encodings in corpus.composition().items():
        print(f"  {kind}: " + ", ".join(f"{name} {n}" for name, n in sorted(encodings.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
