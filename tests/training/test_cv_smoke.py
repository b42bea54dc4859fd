"""The whole SIIM recipe at toy scale (training/configs/siim-smoke*.yaml): synthetic data, a held-out split, two
folds through two stages (128 px, then 256 px started from the 128 px run), out-of-fold thresholds, the
ensemble exported and served through the service's in-process cascade, `evaluate` refusing training films."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from service.cascade.preprocess import to_batch
from service.imaging.reader import read_radiograph
from service.models.inference import segment_maps
from service.models.manifest import load_manifest, sha256_file
from training.__main__ import main as training_main
from training.config import load as load_config
from training.data import index_siim
from training.evaluate import load_cascade
from training.films import film_key
from training.tasks import input_spec
from training.train import load as load_run

REPO = Path(__file__).resolve().parents[2]
STAGES = [REPO / "training" / "configs" / "siim-smoke.yaml", REPO / "training" / "configs" / "siim-smoke-256.yaml"]
NAME = "siim-smoke-256-ensemble"


def _folds(run: Path) -> dict[str, str]:
    return dict(line.split(",") for line in (run / "folds.csv").read_text().splitlines()[2:])


def _identity(last: Path) -> dict:
    return json.loads(torch.load(last, weights_only=False)["config"])["identity"]


@torch.no_grad()
def _mirrored_probability(network: torch.nn.Module, batch: torch.Tensor) -> np.ndarray:
    """One member's probability with the service's hflip TTA (the mean with the mirrored film's, mirrored back)."""
    plain, mirrored = torch.sigmoid(network(batch)), torch.sigmoid(network(batch.flip(-1)))
    return ((plain + (mirrored.flip(-1) if plain.ndim == 4 else mirrored)) / 2).numpy()


def test_the_smoke_recipe_end_to_end(tmp_path, capsys) -> None:
    torch.set_num_threads(1)
    data, work, models = tmp_path / "data", tmp_path / "work", tmp_path / "models"
    assert training_main(["synth", "--out", str(data), "--count", "64", "--seed", "11", "--size", "256",
                          "--prevalence", "0.5", "--difficulty", "easy", "--procedural-shapes", "--quiet",
                          "--workers", "1"]) == 0
    cv = ["cv", *(arg for stage in STAGES for arg in ("--config", str(stage))), "--data", str(data),
          "--cache", str(tmp_path / "cache"), "--work", str(work), "--models", str(models), "--quiet"]
    assert training_main([*cv, "--report", str(tmp_path / "report")]) == 0
    samples = index_siim(data)
    ids = [sample.image_id for sample in samples]

    # The members: one per fold, each its 128 px run and the 256 px run started from it.
    directories = {role: models / f"ptx-{role}-{NAME}" / "0.0.1" for role in ("classifier", "segmenter")}
    manifests = {role: load_manifest(directory) for role, directory in directories.items()}  # hashes verified
    listed = json.loads((directories["classifier"] / "members.json").read_text())
    assert listed == json.loads((directories["segmenter"] / "members.json").read_text())
    assert [member["fold"] for member in listed["members"]] == [0, 1]
    held: set[str] | None = None
    for member in listed["members"]:
        first, second = (work / run for run in member["runs"])
        assert (first.parent.name, second.parent.name) == ("siim-smoke-128", "siim-smoke-256")
        assert second.name.endswith(member["run_key"]) and member["version"] == f"0.0.1+fold{member['fold']}"
        for role in ("classifier", "segmenter"):
            assert _identity(first / role / "last.pt")["model"]["input"]["size"] == 128  # the stage's own identity
            later = _identity(second / role / "last.pt")["model"]
            assert (later["input"]["size"], later["init_from"]) == (256, str(first / "cascade.pt")), "from stage 1"
            assert _identity(second / role / "last.pt")["files"][f"{role}.init_from"] == sha256_file(
                first / "cascade.pt"), "stage 2's identity holds the weights it started from"
        # The held-out films: the same in every run, in no model's training films, not in the folds.
        for run in (first, second):
            films = {image for image, fold in _folds(run).items() if fold == "holdout"}
            assert held is None or films == held
            held = films
            for role in ("classifier", "segmenter"):
                trained_on = {ids[i] for i in torch.load(run / role / "last.pt", weights_only=False)["trained_on"]}
                assert trained_on and not trained_on & held
    positives = sum(sample.positive for sample in samples)  # one film per patient: the share of each class
    assert held and len(held) == round(0.2 * positives) + round(0.2 * (len(samples) - positives))
    record = set((directories["classifier"] / "training-films.txt").read_text().splitlines()[1:])
    assert record == {film_key(image) for image in ids if image not in held}

    # Thresholds chosen out of fold: every film not held out, each scored by the fold model that never saw it.
    assert manifests["classifier"].metrics["out_of_fold"]["validation_images"] == len(samples) - len(held)

    # The exported graph is the mean probability of the fold models, as the service's cascade runs it.
    cascade, _ = load_cascade(directories["classifier"], directories["segmenter"])
    films = [read_radiograph(sample.path).pixels for sample in samples if sample.image_id in held]
    stage = load_config(STAGES[1])
    runs = [load_run(work / member["runs"][-1] / "cascade.pt", stage) for member in listed["members"]]
    served = {"classifier": cascade.classify(films),
              "segmenter": segment_maps(cascade.segmenter, to_batch(films, cascade.segmenter_spec))}
    for role, outputs in served.items():
        batch = torch.from_numpy(to_batch(films, input_spec(getattr(stage, role))))
        mean = np.mean([_mirrored_probability(getattr(run, role), batch) for run in runs], axis=0)
        np.testing.assert_allclose(outputs, mean.reshape(outputs.shape), atol=1e-4, err_msg=role)

    # Evaluated on the held-out films through the in-process cascade; the figures are in both manifests.
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["counts"]["images"] == len(held)
    assert report["info"]["training_films_overlap"].startswith("none")
    for manifest in manifests.values():
        assert 0.0 <= manifest.metrics["holdout"]["siim_mean_dice"] <= 1.0

    # `evaluate` refuses training films, even a copy under another name (by its SOP Instance UID).
    capsys.readouterr()
    evaluate = ["evaluate", "--classifier", str(directories["classifier"]), "--segmenter",
                str(directories["segmenter"]), "--out", str(tmp_path / "again"), "--quiet"]
    assert training_main([*evaluate, "--data", str(data)]) == 2
    assert (f"{len(samples) - len(held)} of the {len(samples)} films to evaluate were used to train or tune "
            f"ptx-classifier-{NAME} 0.0.1 and ptx-segmenter-{NAME} 0.0.1") in capsys.readouterr().err
    copy = tmp_path / "copy"
    (copy / "dicom").mkdir(parents=True)
    trained_film = next(sample for sample in samples if sample.image_id not in held)
    shutil.copy(trained_film.path, copy / "dicom" / "renamed.dcm")
    (copy / "train-rle.csv").write_text("ImageId, EncodedPixels\nrenamed,-1\n")
    assert training_main([*evaluate, "--data", str(copy)]) == 2
    assert "1 of the 1 films to evaluate were used to train" in capsys.readouterr().err

    # Resumable per fold: a fold whose runs are finished is loaded, not trained again.
    stamps = {path: path.stat().st_mtime_ns for path in work.rglob("last.pt")}
    assert training_main([*cv, "--fold", "1"]) == 0
    out = capsys.readouterr().out
    assert "fold 1 stage 1 (siim-smoke-128): finished run" in out
    assert "fold 1 stage 2 (siim-smoke-256): finished run" in out
    assert stamps == {path: path.stat().st_mtime_ns for path in work.rglob("last.pt")}

    # The service names every member (its answer's `models`), and the torch backend rebuilds the ensemble from
    # model.pt: the same mean probability as the ONNX graph.
    from service.models.backends.torch_backend import load_network
    from service.models.model_set import resolve
    from service.settings import load_settings

    settings = load_settings(environ={"PTX_MODELS_DIR": str(models), "PTX_CLASSIFIER": f"ptx-classifier-{NAME}",
                                      "PTX_SEGMENTER": f"ptx-segmenter-{NAME}"})
    model_set = resolve(settings)
    expected = tuple(f"{m['version']} (run {m['run_key']})" for m in listed["members"])
    assert model_set.classifier.members == expected and model_set.segmenter.members == expected
    network = load_network(directories["classifier"], manifests["classifier"])
    batch = torch.from_numpy(to_batch(films, input_spec(stage.classifier)))
    with torch.no_grad():
        rebuilt = torch.sigmoid(network(batch)).numpy().ravel()
        mean = np.mean([torch.sigmoid(run.classifier.eval()(batch)).numpy().ravel() for run in runs], axis=0)
    np.testing.assert_allclose(rebuilt, mean, atol=1e-5)
