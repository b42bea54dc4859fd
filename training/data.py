"""Training data: SIIM-format folders and PNG folders → a preprocessed, memory-mapped cache → folds.

Images are read with `service.imaging.reader.read_radiograph` and resized with `service.cascade.preprocess`,
masks decoded with `service.cascade.rle` (mask PNGs with Pillow: `read_mask_png`): the very code that serves
them. Decoding a JPEG 2000 film costs ~110 ms, so it is done once into a cache (`images.npy` float16,
`masks.npy` uint8 coverage ×255, memory-mapped), whose key covers the files (name, size, mtime), the labels
and every preprocessing parameter: change any, get a new cache.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.cascade import rle
from service.cascade.preprocess import mask_to_input, resize
from service.imaging.acceptance import AcceptancePolicy
from service.imaging.reader import read_radiograph
from service.processes import safe_context

# Bump when what the cache holds changes meaning (resizing, quantisation, mask encoding).
CACHE_FORMAT = 1
# Training accepts what serving accepts; the SIIM set has a few films a chest policy must not drop.
TRAINING_POLICY = AcceptancePolicy()


class DataError(ValueError):
    """A training data set that cannot be used as it is; the message names the file or ImageId."""


@dataclass(frozen=True)
class Sample:
    """One labelled image: its file and its instance masks (SIIM RLE rows, or a PNG mask file)."""

    image_id: str
    path: Path
    rles: tuple[str, ...] = ()
    mask_path: Path | None = None

    @property
    def positive(self) -> bool:
        if self.mask_path is not None:
            return True  # decided when the mask is read; see `_load_one`
        return bool(self.rles)


def read_rle_csv(path: Path) -> dict[str, list[str]]:
    """ImageId → RLE rows of a SIIM `train-rle.csv` (`-1` rows give an empty list)."""
    if not path.is_file():
        raise DataError(f"{path} not found: a SIIM-format folder holds dicom/ and train-rle.csv")
    opener = gzip.open if path.suffix == ".gz" else open
    labels: dict[str, list[str]] = {}
    with opener(path, "rt", newline="") as handle:
        reader = csv.reader(handle)
        header = [column.strip() for column in next(reader, [])]
        if header != ["ImageId", "EncodedPixels"]:
            raise DataError(f"{path}: header must be 'ImageId, EncodedPixels', got {', '.join(header)!r}")
        for line, row in enumerate(reader, start=2):
            if len(row) != 2:
                raise DataError(f"{path}:{line}: expected 2 columns, got {len(row)}")
            image_id, encoded = row[0].strip(), row[1].strip()
            rows = labels.setdefault(image_id, [])
            if encoded != rle.EMPTY:
                rows.append(encoded)
    return labels


def index_siim(folder: Path) -> list[Sample]:
    """Samples of a SIIM-format folder: `dicom/**/<ImageId>.dcm` and `train-rle.csv`."""
    folder = Path(folder)
    labels = read_rle_csv(folder / "train-rle.csv")
    image_root = folder / "dicom" if (folder / "dicom").is_dir() else folder
    files = {path.stem: path for path in image_root.rglob("*.dcm")}
    missing = [image_id for image_id in labels if image_id not in files]
    if missing:
        raise DataError(
            f"{len(missing)} ImageId(s) in {folder / 'train-rle.csv'} have no DICOM file under {image_root}, "
            f"e.g. {', '.join(missing[:3])}"
        )
    return [Sample(image_id, files[image_id], tuple(rows)) for image_id, rows in sorted(labels.items())]


def index_png(folder: Path) -> list[Sample]:
    """Samples of a PNG folder: `images/<name>.png` with `masks/<name>.png` (all-zero mask = negative)."""
    images, masks = Path(folder) / "images", Path(folder) / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise DataError(f"{folder} must hold images/ and masks/ (PNG files with the same names)")
    samples = []
    for path in sorted(images.glob("*.png")):
        mask = masks / path.name
        if not mask.is_file():
            raise DataError(f"{path.name} has no mask {mask}")
        samples.append(Sample(path.stem, path, mask_path=mask))
    if not samples:
        raise DataError(f"no PNG images in {images}")
    return samples


def index_folder(folder: Path) -> list[Sample]:
    """A SIIM-format folder if it has train-rle.csv, else a PNG folder."""
    return index_siim(folder) if (Path(folder) / "train-rle.csv").exists() else index_png(folder)


@dataclass
class CachedSet:
    """Preprocessed images (N, S, S) float16 in [0, 1], masks (N, S, S) uint8 coverage ×255, labels (N,)."""

    directory: Path
    image_ids: list[str]
    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    groups: list[str]
    size: int

    def __len__(self) -> int:
        return len(self.image_ids)


def cache_key(samples: Sequence[Sample], size: int) -> str:
    """Hash of everything the cache depends on: files, labels, size and the cache format."""
    digest = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "size": size}).encode())
    for sample in samples:
        stat = sample.path.stat()
        digest.update(f"{sample.image_id}|{stat.st_size}|{stat.st_mtime_ns}|{'|'.join(sample.rles)}".encode())
        if sample.mask_path is not None:
            mask_stat = sample.mask_path.stat()
            digest.update(f"|{mask_stat.st_size}|{mask_stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def read_mask_png(path: Path) -> np.ndarray:
    """A binary mask PNG → bool (on above half the sample range). Read with Pillow, not `read_radiograph`: a
    mask is not a radiograph (two grey levels, often all zero), which the service rightly refuses."""
    from PIL import Image

    with Image.open(path) as image:
        values = np.asarray(image)
    if values.ndim == 3:
        values = values[..., 0]
    if values.dtype == bool:
        return values
    half = np.iinfo(values.dtype).max / 2 if np.issubdtype(values.dtype, np.integer) else 0.5
    return values > half


def _group_of(sample: Sample) -> str:
    """A patient key for grouped folds: a hash of PatientID (no identifier stored), else the image itself."""
    if sample.path.suffix.lower() == ".dcm":
        from pydicom import dcmread

        patient = dcmread(sample.path, stop_before_pixels=True, specific_tags=["PatientID"]).get("PatientID")
        if patient:
            return patient_group(str(patient))
    return f"image:{sample.image_id}"


def patient_group(patient_id: str) -> str:
    """The fold key of a patient: a hash, so that no identifier is stored in a cache or a folds file."""
    return hashlib.sha256(patient_id.encode()).hexdigest()[:16]


def _load_one(args: tuple[Sample, int]) -> tuple[np.ndarray, np.ndarray, bool, str]:
    sample, size = args
    radiograph = read_radiograph(sample.path, TRAINING_POLICY)
    if sample.mask_path is not None:
        mask = read_mask_png(sample.mask_path)
        if mask.shape != radiograph.pixels.shape:
            raise DataError(f"{sample.image_id}: mask is {mask.shape}, image is {radiograph.pixels.shape}")
    else:
        try:
            mask = rle.decode_union(sample.rles, radiograph.rows, radiograph.columns)
        except rle.RLEError as exc:
            raise DataError(f"{sample.image_id}: mask does not fit the {radiograph.rows}x{radiograph.columns} "
                            f"image: {exc}") from exc
    image = resize(radiograph.pixels, size, size).astype(np.float16)
    coverage = np.round(mask_to_input(mask, size) * 255).astype(np.uint8)
    return image, coverage, bool(mask.any()), _group_of(sample)


def build_cache(samples: Sequence[Sample], size: int, cache_root: Path, workers: int | None = None,
                progress: bool = True) -> CachedSet:
    """Decode and resize every sample once into `cache_root/<size>-<key>/`; reuse it when it exists."""
    directory = Path(cache_root) / f"{size}-{cache_key(samples, size)}"
    if (directory / "meta.json").is_file():
        return load_cache(directory)
    directory.mkdir(parents=True, exist_ok=True)
    count = len(samples)
    images = np.lib.format.open_memmap(directory / "images.npy", mode="w+", dtype=np.float16, shape=(count, size, size))
    masks = np.lib.format.open_memmap(directory / "masks.npy", mode="w+", dtype=np.uint8, shape=(count, size, size))
    labels = np.zeros(count, dtype=np.uint8)
    groups: list[str] = []
    jobs = [(sample, size) for sample in samples]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1, mp_context=safe_context()) as pool:
        results: Iterable = pool.map(_load_one, jobs, chunksize=8)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=count, desc="cache", unit="img")
        for index, (image, coverage, positive, group) in enumerate(results):
            images[index], masks[index], labels[index] = image, coverage, positive
            groups.append(group)
    images.flush()
    masks.flush()
    np.save(directory / "labels.npy", labels)
    meta = {"format": CACHE_FORMAT, "size": size, "image_ids": [s.image_id for s in samples], "groups": groups}
    temporary = directory / "meta.json.tmp"
    temporary.write_text(json.dumps(meta))
    temporary.replace(directory / "meta.json")  # written last: a cache without it is incomplete
    return load_cache(directory)


def load_cache(directory: Path) -> CachedSet:
    meta = json.loads((Path(directory) / "meta.json").read_text())
    return CachedSet(
        directory=Path(directory),
        image_ids=meta["image_ids"],
        images=np.load(directory / "images.npy", mmap_mode="r"),
        masks=np.load(directory / "masks.npy", mmap_mode="r"),
        labels=np.load(directory / "labels.npy"),
        groups=meta["groups"],
        size=int(meta["size"]),
    )


def make_folds(labels: np.ndarray, groups: Sequence[str], k: int, seed: int) -> np.ndarray:
    """Fold index per sample: stratified by label, never splitting a patient's images across folds.

    Groups holding any positive image are dealt round-robin over the folds after a seeded shuffle, then the
    negative-only groups likewise, so each fold gets an equal share (±1 group) of each.
    """
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    if len(members) < k:
        raise ValueError(f"{len(members)} patients cannot fill {k} folds")
    rng = np.random.default_rng(seed)
    folds = np.full(len(labels), -1, dtype=np.int64)
    positive = sorted(g for g, idx in members.items() if labels[idx].any())
    negative = sorted(g for g, idx in members.items() if not labels[idx].any())
    offset = 0
    for bucket in (positive, negative):
        order = rng.permutation(len(bucket))
        for rank, position in enumerate(order):
            folds[members[bucket[position]]] = (rank + offset) % k
        offset += len(bucket)
    return folds


#: The fold number of a held-out film in `assign_folds` and `folds.csv`.
HELD_OUT = -1


def holdout_mask(labels: np.ndarray, groups: Sequence[str], share: float, seed: int) -> np.ndarray:
    """True for the films set aside: `share` of the patients with a positive film and `share` of the others
    (rounded, whole patients), drawn by a seeded shuffle of their own, so the held-out films are the same
    whatever the number of folds. Why before the folds: a film any fold validates on has shaped a choice."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"holdout share must be in [0, 1), got {share!r}")
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    held = np.zeros(len(labels), dtype=bool)
    rng = np.random.default_rng([seed, 0x401D])  # a stream of its own: not the folds' shuffle
    for positive in (True, False):
        bucket = sorted(g for g, idx in members.items() if bool(labels[idx].any()) == positive)
        for position in rng.permutation(len(bucket))[: round(share * len(bucket))]:
            held[members[bucket[position]]] = True
    return held


def assign_folds(labels: np.ndarray, groups: Sequence[str], k: int, seed: int, holdout: float = 0.0) -> np.ndarray:
    """Fold per film, `HELD_OUT` for the held-out share; the folds are `make_folds` over the rest.

    With no holdout this is `make_folds` itself, so runs made before the holdout existed keep their split.
    """
    held = holdout_mask(labels, groups, holdout, seed) if holdout else np.zeros(len(labels), dtype=bool)
    rest = np.flatnonzero(~held)
    folds = np.full(len(labels), HELD_OUT, dtype=np.int64)
    folds[rest] = make_folds(np.asarray(labels)[rest], [groups[i] for i in rest], k, seed)
    return folds


def write_folds(path: Path, image_ids: Sequence[str], folds: np.ndarray, seed: int) -> None:
    """The split as a CSV (`image_id,fold`, `holdout` for a held-out film), with the seed in a comment line,
    so a run can be reproduced."""
    held = int(np.sum(folds == HELD_OUT))
    lines = [f"# folds seed={seed} k={int(folds.max()) + 1} held_out={held}", "image_id,fold"]
    lines += [f"{image_id},{'holdout' if fold == HELD_OUT else int(fold)}"
              for image_id, fold in zip(image_ids, folds, strict=True)]
    Path(path).write_text("\n".join(lines) + "\n")
