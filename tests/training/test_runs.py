"""Runs are keyed by what defines them: folds never share a run, and each model sees only its own films."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from training.config import from_dict
from training.data import CachedSet
from training.runs import init_from_run, run_dir
from training.train import train_cascade

torch.set_num_threads(1)

TINY = {
    "name": "tiny", "seed": 4, "data": {"folds": 3, "fold": 0},
    "classifier": {"input": {"size": 64}, "network": {"width": 8, "aux_segmentation": True},
                   "optim": {"epochs": 2, "batch_size": 4, "average_top_k": 1}, "augment": {"strength": 0}},
    "segmenter": {"input": {"size": 64}, "network": {"width": 8, "decoder_blocks": 3},
                  "optim": {"epochs": 1, "batch_size": 4, "average_top_k": 1}, "augment": {"strength": 0}},
    "evaluation": {"triplet_tops": [0.5], "triplet_areas": [0], "triplet_bottoms": [0.3]},
}


def synthetic_set(tmp_path, count: int = 18, size: int = 64) -> CachedSet:
    """An in-memory cache: noise films, every other one with a bright square and its mask."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0.2, 0.4, (count, size, size)).astype(np.float16)
    masks = np.zeros((count, size, size), np.uint8)
    for index in range(0, count, 2):
        y, x = rng.integers(4, size - 20, 2)
        images[index, y:y + 16, x:x + 16] += np.float16(0.3)
        masks[index, y:y + 16, x:x + 16] = 255
    directory = tmp_path / f"{size}-synthetic"
    directory.mkdir(parents=True)
    return CachedSet(directory, [f"film{i:02d}" for i in range(count)], images, masks,
                     (masks.reshape(count, -1).max(1) > 0).astype(np.uint8), [f"p{i}" for i in range(count)], size)


def _folds(run) -> dict[str, int | str]:
    lines = (run / "folds.csv").read_text().splitlines()[2:]
    return {image: (fold if fold == "holdout" else int(fold)) for image, fold in (line.split(",") for line in lines)}


def test_two_folds_train_apart_on_their_own_films(tmp_path) -> None:
    cached = synthetic_set(tmp_path)
    runs = {}
    for fold in (0, 1):
        config = from_dict({**TINY, "data": {**TINY["data"], "fold": fold}})
        runs[fold] = run_dir(tmp_path / "work", config, cached)
        trained = train_cascade(config, cached, runs[fold], progress=False)
        folds = _folds(runs[fold])
        training_films = {image for image, k in folds.items() if k != fold}
        for name in ("classifier", "segmenter"):
            fit = trained.fits[name]
            seen = {cached.image_ids[i] for i in fit.trained_on}
            checkpoint = torch.load(runs[fold] / name / "last.pt", weights_only=False)
            assert {cached.image_ids[i] for i in checkpoint["trained_on"]} == seen
            assert seen and seen <= training_films, f"fold {fold} {name} saw validation films"
            assert not seen & {image for image, k in folds.items() if k == fold}
            assert fit.epochs == getattr(from_dict(TINY), name).optim.epochs, "a fresh run, not a resume"
    assert runs[0] != runs[1] and runs[0].parent == runs[1].parent
    assert _folds(runs[0]) == _folds(runs[1]), "one split, two validation folds"
    fold1 = from_dict({**TINY, "data": {**TINY["data"], "fold": 1}})
    with pytest.raises(ValueError, match="another configuration, fold, seed or data"):
        train_cascade(fold1, cached, runs[0], progress=False)  # fold 1 pointed at fold 0's folder


def test_a_later_stage_starts_from_the_earlier_run(tmp_path) -> None:
    cached = synthetic_set(tmp_path)
    first = from_dict({**TINY, "classifier": {**TINY["classifier"], "input": {"size": 32}},
                       "segmenter": {**TINY["segmenter"], "input": {"size": 32}}})
    earlier = train_cascade(first, cached, run_dir(tmp_path / "work", first, cached), progress=False)
    stage = run_dir(tmp_path / "work", first, cached)
    later = dataclasses.replace(from_dict(TINY),
                                classifier=dataclasses.replace(from_dict(TINY).classifier, init_from=str(stage)))
    model = later.classifier
    from training.tasks import build_classifier, build_segmenter

    fresh = build_classifier(model)
    init_from_run(fresh, stage, "classifier")
    for key, value in earlier.classifier.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with pytest.raises(ValueError, match="does not fit this config's network"):
        init_from_run(build_segmenter(dataclasses.replace(later.segmenter, network=dataclasses.replace(
            later.segmenter.network, width=16))), stage, "segmenter")
    assert run_dir(tmp_path / "work", later, cached) != stage
    trained = train_cascade(later, cached, run_dir(tmp_path / "work", later, cached), progress=False)
    assert trained.fits["classifier"].epochs == 2


def test_held_out_films_are_in_no_fold_of_any_run(tmp_path) -> None:
    from training.train import split

    cached = synthetic_set(tmp_path, count=24)
    held, validated = None, []
    for fold in (0, 1, 2):
        config = from_dict({**TINY, "data": {"folds": 3, "fold": fold, "holdout": 0.25}})
        train, validation = split(config, cached, tmp_path)
        folds = _folds(tmp_path)
        films = {image for image, k in folds.items() if k == "holdout"}
        assert held is None or films == held, "every fold holds out the same films"
        held = films
        used = {cached.image_ids[i] for i in np.concatenate([train, validation])}
        assert len(held) == 6 and not used & held
        assert len(used) == 18
        validated.append({cached.image_ids[i] for i in validation})
    assert set().union(*validated) == set(cached.image_ids) - held
    with pytest.raises(ValueError, match=r"data.holdout must be a share in \[0, 0.5\), got 0.5"):
        from_dict({**TINY, "data": {"holdout": 0.5}})


def test_a_run_starts_from_the_same_weights_whatever_came_before_it_in_the_process(tmp_path) -> None:
    cached = synthetic_set(tmp_path)
    config = from_dict({**TINY, "segmenter": {**TINY["segmenter"], "optim": {"epochs": 1, "batch_size": 4}}})
    trained = []
    for noise in (123, 456):  # whatever drew from PyTorch's generator before this run (PyTorch seeds it at random)
        torch.manual_seed(noise)
        trained.append(train_cascade(config, cached, tmp_path / f"run{noise}", progress=False))
    for role in ("classifier", "segmenter"):
        first, second = (getattr(run, role).state_dict() for run in trained)
        assert all(torch.equal(first[key], second[key]) for key in first), role


def test_a_segmenter_change_reuses_the_finished_classifier_stage(tmp_path) -> None:
    """Stages keyed by their own identity: changing the segmenter's settings retrains the segmenter alone."""
    from training.runs import stage_dir

    cached = synthetic_set(tmp_path)
    work = tmp_path / "work"
    first = from_dict(TINY)
    earlier = train_cascade(first, cached, run_dir(work, first, cached), progress=False, stages=work)
    classifier_stage = stage_dir(work, first, cached, "classifier")
    written = {path.name: path.stat().st_mtime_ns for path in classifier_stage.glob("*.pt")}
    assert "last.pt" in written and any(name.startswith("epoch") for name in written)

    later = from_dict({**TINY, "segmenter": {**TINY["segmenter"], "optim": {"epochs": 2, "batch_size": 4,
                                                                             "average_top_k": 1}}})
    assert run_dir(work, later, cached) != run_dir(work, first, cached)
    assert stage_dir(work, later, cached, "classifier") == classifier_stage
    assert stage_dir(work, later, cached, "segmenter") != stage_dir(work, first, cached, "segmenter")
    trained = train_cascade(later, cached, run_dir(work, later, cached), progress=False, stages=work)
    assert {path.name: path.stat().st_mtime_ns for path in classifier_stage.glob("epoch*.pt")} == {
        name: stamp for name, stamp in written.items() if name.startswith("epoch")}, "the classifier trained again"
    for key, value in earlier.classifier.state_dict().items():
        assert torch.equal(trained.classifier.state_dict()[key], value), key
    assert trained.fits["segmenter"].epochs == 2 and earlier.fits["segmenter"].epochs == 1


def test_a_segmenter_whose_encoder_starts_from_the_classifier_follows_the_classifiers_changes(tmp_path) -> None:
    from training.runs import stage_dir

    cached = synthetic_set(tmp_path)
    for shared, follows in ((False, False), (True, True)):
        network = {**TINY["segmenter"]["network"], "encoder_from_classifier": shared}
        segmenter = {**TINY["segmenter"], "network": network}
        before = from_dict({**TINY, "segmenter": segmenter})
        after = from_dict({**TINY, "segmenter": segmenter,
                           "classifier": {**TINY["classifier"], "optim": {**TINY["classifier"]["optim"], "lr": 0.01}}})
        assert stage_dir(tmp_path, after, cached, "classifier") != stage_dir(tmp_path, before, cached, "classifier")
        moved = stage_dir(tmp_path, after, cached, "segmenter") != stage_dir(tmp_path, before, cached, "segmenter")
        assert moved == follows, f"encoder_from_classifier={shared}"


def test_a_run_links_its_stages_and_keeps_a_folder_from_before_stages(tmp_path) -> None:
    from training.runs import linked_stage

    run, stage = tmp_path / "work" / "tiny" / "fold0-seed4-abc", tmp_path / "work" / "tiny" / "stages" / "classifier-x"
    (run / "classifier").mkdir(parents=True)
    (run / "classifier" / "last.pt").write_bytes(b"an older run's checkpoint")
    assert linked_stage(run, stage) == stage and stage.is_dir()
    assert (run / "classifier").is_symlink() and (run / "classifier").resolve() == stage.resolve()
    assert (run / "classifier.before-stages" / "last.pt").read_bytes() == b"an older run's checkpoint"
    linked_stage(run, stage)  # again: the link is renewed, nothing else moves
    assert (run / "classifier").is_symlink() and sorted(p.name for p in run.iterdir()) == [
        "classifier", "classifier.before-stages"]
