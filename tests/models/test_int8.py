"""INT8 models on the CPU (issue 15 §2): the setting picks the INT8 file, refuses a model without one, and the
INT8 cascade stays with the FP32 one on held-out synthetic films.

The accuracy bound of the issue (AUC within 0.005 and Dice on positives within 0.01 of FP32) is measured on
the 600-film synthetic test set by `python load_tests/bench_int8.py --accuracy DIR` (docs/models.md): 0.0013
and 0.0006. A suite-sized set is small for the Dice bound (31 positives moved it by 0.013 on one seed while
the per-film figures stayed put), so here the comparison is also paired, film by film, on films never used
in training: the score differences, the masks' Dice to the FP32 masks and the decisions. Both bounds of the
issue are still asserted on this set, whose seed is fixed: its 44 positives give a Dice difference of 0.0015
(two other 120-film seeds: 0.0009 and 0.0007), so `make test` carries the issue's bar with room to spare.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnxruntime as ort
import pytest

from service.cascade.preprocess import to_batch
from service.models.backends import BackendUnavailable
from service.models.backends.factory import load_backend
from service.models.manifest import (
    INT8_ROLE,
    ManifestError,
    input_spec,
    load_manifest,
    write_manifest,
)
from service.models.model_set import resolve
from service.models.runner import default_loader
from service.settings import load_settings
from tests.dicom_factory import chest_like
from tests.servers import REPO
from training.__main__ import main as training_main
from training.data import index_siim
from training.quantize import compare_precisions

MODELS = {"classifier": REPO / "models" / "ptx-classifier-demo" / "0.2.0",
          "segmenter": REPO / "models" / "ptx-segmenter-demo" / "0.2.0"}
HELD_OUT_SEED = 20261207  # never used for training (demo: 1), the test report (9001) nor other tests


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, realdata):
    """INT8 vs FP32 cascades on 120 fresh films (real SIIM lesion shapes need `realdata`)."""
    data = tmp_path_factory.mktemp("held-out")
    assert training_main(["synth", "--out", str(data), "--count", "120", "--seed", str(HELD_OUT_SEED),
                          "--prevalence", "0.3", "--uncompressed", "--quiet"]) == 0
    return compare_precisions(MODELS["classifier"], MODELS["segmenter"], index_siim(data), threads=2)


def test_int8_auc_stays_within_0_005_of_fp32(comparison):
    assert comparison.positives >= 20 and comparison.films - comparison.positives >= 60
    assert abs(comparison.auc_delta) <= 0.005, comparison.summary()


def test_int8_dice_on_positives_stays_within_0_01_of_fp32(comparison):
    """The issue's Dice bar itself: mean Dice on positives against the ground truth, INT8 vs FP32 masks."""
    assert comparison.positives >= 40
    assert abs(comparison.dice_positive_delta) <= 0.01, comparison.summary()


def test_int8_scores_and_decisions_follow_fp32_film_by_film(comparison):
    """Bounds from the 600-film test set (0.2.0: mean |Δp| 0.016, max 0.13, 93.5 % same call; 0.1.0: 0.008, 0.17,
    96 %), with room for the sample: a calibration on the wrong inputs moves the mean by several times and the
    calls by far more."""
    assert comparison.mean_score_difference <= 0.025, comparison.summary()
    assert comparison.max_score_difference <= 0.25, comparison.summary()
    assert comparison.decisions_agree >= 0.9, comparison.summary()


def test_int8_masks_follow_fp32_masks(comparison):
    """Dice of each INT8 mask to the FP32 mask of the same film (films with a mask at either precision)."""
    dice = np.asarray(comparison.mask_dice)
    assert len(dice) >= 20
    assert np.median(dice) >= 0.95 and dice.mean() >= 0.85, comparison.summary()
    assert abs(comparison.dice_positive_delta) <= 0.02, comparison.summary()


# --- the setting -----------------------------------------------------------------------------------------

def test_int8_setting_runs_the_int8_file_on_the_cpu():
    settings = load_settings(environ={"PTX_PRECISION": "int8", "PTX_INTRA_OP_THREADS": "1"})
    models = resolve(settings)
    films = [chest_like(300, 280).astype(np.float32) / 4095, chest_like(256, 256).astype(np.float32) / 4095]
    for entry in models.entries():
        backend = default_loader(entry, settings)
        assert (backend.model_path.name, backend.name, backend.provider) == (
            "model.int8.onnx", "onnxruntime-cpu-int8", "cpu")
        batch = to_batch(films, input_spec(entry.manifest))
        plain = ort.InferenceSession(str(entry.directory / "model.int8.onnx"), providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(backend.run(batch), plain.run(None, {"image": batch})[0])


def test_auto_and_fp32_keep_the_fp32_file_on_the_cpu():
    for precision in ("auto", "fp32"):
        settings = load_settings(environ={"PTX_PRECISION": precision, "PTX_INTRA_OP_THREADS": "1"})
        backend = default_loader(resolve(settings).classifier, settings)
        assert (backend.model_path.name, backend.name) == ("model.onnx", "onnxruntime-cpu")


def test_int8_without_an_int8_file_fails_at_start_naming_the_model_and_the_setting(tmp_path):
    root = tmp_path / "models"
    shutil.copytree(REPO / "models", root)
    directory = root / "ptx-segmenter-demo" / "0.2.0"
    manifest = load_manifest(directory)
    files = {role: name for role, name in manifest.files.items() if role != INT8_ROLE}
    write_manifest(manifest.model_copy(update={
        "files": files, "sha256": {name: manifest.sha256[name] for name in files.values()},
        "export": manifest.export.model_copy(update={"int8": None})}), directory)
    (directory / "model.int8.onnx").unlink()
    settings = load_settings(environ={"PTX_MODELS_DIR": str(root), "PTX_PRECISION": "int8"})
    with pytest.raises(ManifestError, match=r"PTX_PRECISION=int8: model ptx-segmenter-demo 0\.2\.0 has no INT8 file "
                                            r"\(no 'onnx_int8' role.*set PTX_PRECISION=auto"):
        resolve(settings)
    assert resolve(settings.model_copy(update={"precision": "auto"})).segmenter.directory == directory


def test_int8_with_the_torch_backend_is_refused():
    manifest = load_manifest(MODELS["classifier"])
    with pytest.raises(BackendUnavailable, match="PTX_PRECISION=int8 .* PTX_BACKEND=torch cannot"):
        load_backend(MODELS["classifier"], manifest, "torch", precision="int8")


def test_fp16_on_a_cpu_only_onnxruntime_is_refused():
    if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()):
        pytest.skip("a GPU provider is listed here: fp16 is allowed")
    manifest = load_manifest(MODELS["classifier"])
    with pytest.raises(BackendUnavailable, match="PTX_PRECISION=fp16 needs a GPU provider"):
        load_backend(MODELS["classifier"], manifest, "onnxruntime", precision="fp16")


def test_int8_says_at_start_that_the_operating_point_was_fitted_on_fp32(caplog):
    """Not silent: the INT8 classifier calls some films differently from the FP32 metrics in its manifest."""
    with caplog.at_level("WARNING", logger="ptx.models"):
        resolve(load_settings(environ={"PTX_PRECISION": "int8"}))
    assert any("PTX_PRECISION=int8" in r.message and "fitted on FP32 scores" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="ptx.models"):
        resolve(load_settings(environ={}))
    assert not [r for r in caplog.records if "fitted on FP32" in r.message]
