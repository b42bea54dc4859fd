"""Training data: indexing SIIM-format and PNG folders, the cache, and the folds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.cascade import rle
from tests.dicom_factory import chest_like, dataset, to_bytes
from training.data import (
    HELD_OUT,
    DataError,
    assign_folds,
    build_cache,
    holdout_mask,
    index_folder,
    index_siim,
    make_folds,
    read_rle_csv,
    write_folds,
)


def siim_folder(root: Path, masks: dict[str, np.ndarray | None], patient: dict[str, str] | None = None) -> Path:
    """A SIIM-format folder: dicom/<id>.dcm + train-rle.csv (None mask = negative)."""
    (root / "dicom").mkdir(parents=True)
    lines = ["ImageId, EncodedPixels"]
    for image_id, mask in masks.items():
        ds = dataset(chest_like(), SOPInstanceUID=image_id, PatientID=(patient or {}).get(image_id, image_id))
        (root / "dicom" / f"{image_id}.dcm").write_bytes(to_bytes(ds))
        lines.append(f"{image_id},-1" if mask is None else f"{image_id},{rle.encode(mask)}")
    (root / "train-rle.csv").write_text("\n".join(lines) + "\n")
    return root


def lesion(top: int, left: int) -> np.ndarray:
    mask = np.zeros((256, 256), dtype=bool)
    mask[top : top + 40, left : left + 30] = True
    return mask


def test_index_and_cache_a_siim_folder(tmp_path):
    folder = siim_folder(tmp_path / "siim", {"1.2.3": lesion(20, 20), "1.2.4": None, "1.2.5": lesion(100, 150)})
    samples = index_folder(folder)
    assert [s.image_id for s in samples] == ["1.2.3", "1.2.4", "1.2.5"]
    assert [s.positive for s in samples] == [True, False, True]
    cached = build_cache(samples, 64, tmp_path / "cache", workers=1, progress=False)
    assert cached.images.shape == (3, 64, 64) and cached.images.dtype == np.float16
    assert cached.labels.tolist() == [1, 0, 1]
    assert cached.masks[0].max() == 255 and cached.masks[1].max() == 0
    assert cached.masks[0].sum() / 255 == pytest.approx(40 * 30 / 16, rel=0.05)
    again = build_cache(samples, 64, tmp_path / "cache", workers=1, progress=False)
    assert again.directory == cached.directory, "same inputs reuse the cache"
    other = build_cache(samples, 32, tmp_path / "cache", workers=1, progress=False)
    assert other.directory != cached.directory, "the size is part of the key"


def test_several_rows_of_one_image_are_one_union(tmp_path):
    folder = siim_folder(tmp_path / "siim", {"1.2.3": lesion(20, 20)})
    with (folder / "train-rle.csv").open("a") as handle:
        handle.write(f"1.2.3,{rle.encode(lesion(150, 150))}\n")
    (sample,) = index_siim(folder)
    assert len(sample.rles) == 2
    cached = build_cache([sample], 64, tmp_path / "cache", workers=1, progress=False)
    assert cached.masks[0].sum() / 255 == pytest.approx(2 * 40 * 30 / 16, rel=0.05)


def test_missing_csv_missing_file_and_bad_mask_are_named(tmp_path):
    with pytest.raises(DataError, match="train-rle.csv not found"):
        read_rle_csv(tmp_path / "train-rle.csv")
    folder = siim_folder(tmp_path / "a", {"1.2.3": None})
    with (folder / "train-rle.csv").open("a") as handle:
        handle.write("9.9.9,-1\n")
    with pytest.raises(DataError, match=r"1 ImageId\(s\) .* have no DICOM file .* e.g. 9.9.9"):
        index_siim(folder)
    folder = siim_folder(tmp_path / "b", {"1.2.3": None})
    (folder / "train-rle.csv").write_text(f"ImageId, EncodedPixels\n1.2.3,{rle.encode(np.ones((512, 512), bool))}\n")
    with pytest.raises(DataError, match="1.2.3: mask does not fit the 256x256 image"):
        build_cache(index_siim(folder), 64, tmp_path / "cache", workers=1, progress=False)


def test_png_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name, mask in (("a", lesion(10, 10)), ("b", np.zeros((256, 256), bool))):
        Image.fromarray(chest_like(bits=8).astype(np.uint8)).save(tmp_path / "images" / f"{name}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "masks" / f"{name}.png")
    cached = build_cache(index_folder(tmp_path), 64, tmp_path / "cache", workers=1, progress=False)
    assert cached.labels.tolist() == [1, 0]
    (tmp_path / "masks" / "b.png").unlink()
    with pytest.raises(DataError, match="b.png has no mask"):
        index_folder(tmp_path)


def test_folds_are_stratified_grouped_and_seeded(tmp_path):
    rng = np.random.default_rng(0)
    groups = [f"p{rng.integers(0, 300)}" for _ in range(1000)]
    labels = (rng.random(1000) < 0.22).astype(np.uint8)
    folds = make_folds(labels, groups, 5, seed=3)
    positives = [int(labels[folds == k].sum()) for k in range(5)]
    assert max(positives) - min(positives) <= 0.35 * np.mean(positives)
    assert all(len({int(folds[i]) for i, g in enumerate(groups) if g == group}) == 1 for group in set(groups))
    np.testing.assert_array_equal(folds, make_folds(labels, groups, 5, seed=3))
    assert (folds != make_folds(labels, groups, 5, seed=4)).any()
    write_folds(tmp_path / "folds.csv", [str(i) for i in range(1000)], folds, seed=3)
    lines = (tmp_path / "folds.csv").read_text().splitlines()
    assert lines[0] == "# folds seed=3 k=5 held_out=0" and len(lines) == 1002


def test_the_holdout_is_whole_patients_stratified_seeded_and_set_aside_before_the_folds(tmp_path):
    rng = np.random.default_rng(1)
    groups = [f"p{rng.integers(0, 300)}" for _ in range(1000)]
    labels = (rng.random(1000) < 0.22).astype(np.uint8)
    held = holdout_mask(labels, groups, 0.1, seed=3)
    patients = {g for g in groups}
    positive_patients = {g for g, y in zip(groups, labels) if y}
    held_patients = {g for g, h in zip(groups, held) if h}
    assert all(held[i] == (g in held_patients) for i, g in enumerate(groups)), "a patient split across the holdout"
    assert len(held_patients & positive_patients) == round(0.1 * len(positive_patients))
    assert len(held_patients - positive_patients) == round(0.1 * len(patients - positive_patients))
    np.testing.assert_array_equal(held, holdout_mask(labels, groups, 0.1, seed=3))
    assert (held != holdout_mask(labels, groups, 0.1, seed=4)).any()

    five, two = assign_folds(labels, groups, 5, 3, holdout=0.1), assign_folds(labels, groups, 2, 3, holdout=0.1)
    np.testing.assert_array_equal(five == HELD_OUT, held)  # the same films, whatever the number of folds
    np.testing.assert_array_equal(two == HELD_OUT, held)
    assert set(five[~held]) == set(range(5))
    np.testing.assert_array_equal(assign_folds(labels, groups, 5, 3), make_folds(labels, groups, 5, 3))
    write_folds(tmp_path / "folds.csv", [str(i) for i in range(1000)], five, seed=3)
    lines = (tmp_path / "folds.csv").read_text().splitlines()
    assert lines[0] == f"# folds seed=3 k=5 held_out={int(held.sum())}"
    assert sum(line.endswith(",holdout") for line in lines) == int(held.sum())
    with pytest.raises(ValueError, match=r"holdout share must be in \[0, 1\), got 1.0"):
        holdout_mask(labels, groups, 1.0, seed=3)


def test_patients_come_from_the_dicom_and_are_hashed(tmp_path):
    folder = siim_folder(tmp_path / "siim", {"1.1": None, "1.2": None, "1.3": lesion(5, 5)},
                         patient={"1.1": "SENTINEL-A", "1.2": "SENTINEL-A", "1.3": "SENTINEL-B"})
    cached = build_cache(index_siim(folder), 64, tmp_path / "cache", workers=1, progress=False)
    assert cached.groups[0] == cached.groups[1] != cached.groups[2]
    stored = "".join(p.read_bytes().decode("latin-1") for p in cached.directory.iterdir())
    assert "SENTINEL" not in stored, "no patient identifier in the cache"
