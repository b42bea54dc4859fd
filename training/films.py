"""Which films a model was trained or tuned on, recorded in its folder, so `evaluate` can refuse them.

A model evaluated on films it was trained on, or whose thresholds were chosen on them, reports figures it
will never reach in use. Every export writes `training-films.txt` (role `training_films`, hashed in the
manifest): one key per film of the training set that is not held out (training *and* validation films,
since the validation films chose epochs and thresholds). A key is the first 16 hex digits of the SHA-256
of the film's ImageId, so no identifier of the data set ships with the model. `refuse_overlap` compares the
keys of the films to evaluate -- their ImageId and, for DICOM files, their SOP Instance UID (a training
film copied under another name is still caught when it was named by its UID, as SIIM's are) -- with the
records of both models and refuses any overlap, naming how many films and which.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from service.models.manifest import load_manifest
from training.data import DataError, Sample

FILE = "training-films.txt"
ROLE = "training_films"
KEY_DIGITS = 16  # 64 bits: no accidental collision among a few hundred thousand films
HEADER = ("# sha256(ImageId)[:16] of every film this model was trained or tuned on (held-out films excluded); "
          "`python -m training evaluate` refuses these films")


def film_key(identifier: str) -> str:
    """The record's key for an ImageId or a SOP Instance UID."""
    return hashlib.sha256(identifier.strip().encode()).hexdigest()[:KEY_DIGITS]


def write_record(directory: Path, image_ids: Iterable[str]) -> str:
    """Write the record of `image_ids` into a model folder; returns its file name (for `model_folder.attach`)."""
    keys = sorted({film_key(image_id) for image_id in image_ids})
    (Path(directory) / FILE).write_text("\n".join([HEADER, *keys]) + "\n", encoding="utf-8")
    return FILE


def read_record(directory: Path) -> tuple[str, set[str] | None]:
    """The model's "name version" and the keys its folder records (hash-verified), None if it records none."""
    manifest = load_manifest(directory)
    label, name = f"{manifest.name} {manifest.version}", manifest.files.get(ROLE)
    if name is None:
        return label, None
    lines = (Path(directory) / name).read_text(encoding="utf-8").splitlines()
    return label, {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def sample_keys(sample: Sample) -> set[str]:
    """The keys a film to evaluate is known by: its ImageId and, for a DICOM file, its SOP Instance UID."""
    keys = {film_key(sample.image_id)}
    if sample.path.suffix.lower() == ".dcm":
        from pydicom import dcmread

        uid = dcmread(sample.path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).get("SOPInstanceUID")
        if uid:
            keys.add(film_key(str(uid)))
    return keys


def refuse_overlap(model_dirs: Sequence[Path], samples: Sequence[Sample]) -> list[str]:
    """Raise DataError if any of `samples` is among the films a model in `model_dirs` was trained or tuned on.

    Returns the models that record no training films (older exports), for the report to say they were not
    checked.
    """
    records = dict(read_record(directory) for directory in model_dirs)
    unchecked = [label for label, record in records.items() if record is None]
    known = set().union(*(record for record in records.values() if record is not None))
    if not known:
        return unchecked
    overlap = [sample.image_id for sample in samples if sample_keys(sample) & known]
    if overlap:
        names = " and ".join(label for label, record in records.items() if record is not None)
        raise DataError(
            f"{len(overlap)} of the {len(samples)} films to evaluate were used to train or tune {names} "
            f"(e.g. ImageId {', '.join(overlap[:3])}): evaluate on films the models never saw, such as the "
            "held-out films of `python -m training cv` (data.holdout) or a separate set")
    return unchecked
