"""Manifests: validation, hash verification and model discovery. No torch: this is the serving side."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from service.models.input_spec import InputSpec
from service.models.manifest import (
    Manifest,
    ManifestError,
    find_models,
    input_spec,
    latest,
    load_manifest,
    sha256_file,
    triplet,
    version_key,
    write_manifest,
)
from service.models.thresholds import TripletThreshold


def manifest_dict(name: str = "ptx-seg", version: str = "1.0", task: str = "segmentation", **changes) -> dict:
    thresholds = (
        {"triplet": {"top_score": 0.75, "min_area": 2000, "bottom_score": 0.3}, "min_area_reference_size": 1024}
        if task == "segmentation"
        else {"gate": 0.2, "operating_point": 0.5}
    )
    data = {
        "schema_version": 1,
        "name": name,
        "version": version,
        "task": task,
        "files": {"onnx": "model.onnx"},
        "sha256": {"model.onnx": "0" * 64},
        "input": {"size": 256, "mean": 0.5, "std": 0.25, "channels": 1, "name": "image", "layout": "NCHW"},
        "outputs": ["mask_logits" if task == "segmentation" else "logit"],
        "thresholds": thresholds,
        "training": {"command": "python -m training train x.yaml", "config": {"lr": 0.002}, "seed": 7,
                     "data_fingerprint": "sha256:abcd"},
        "metrics": {"dice": 0.81, "folds": {"0": 0.8, "1": None}},
        "export": {"opset": 17, "exporter": "torch", "tolerance": 1e-4, "max_abs_error": 1e-7,
                   "max_rel_error": 1e-6, "fp16_max_abs_error": 1e-3},
        "intended_use": "Research demo on synthetic radiographs; not for clinical use.",
        "created": "2025-06-01",
    }
    data.update(changes)
    return data


INT8_INFO = {"method": "onnxruntime quantize_static", "calibration_method": "MinMax", "activation_type": "QUInt8",
             "weight_type": "QInt8", "per_channel": True, "tolerance": 0.02, "max_abs_error": 0.08,
             "mean_abs_error": 0.007,
             "calibration": {"description": "128 training films", "films": 128, "fingerprint": "sha256:00"}}


def write_model(root: Path, name: str = "ptx-seg", version: str = "1.0", task: str = "segmentation",
                payload: bytes = b"onnx bytes", **changes) -> Path:
    directory = root / name / version
    directory.mkdir(parents=True)
    (directory / "model.onnx").write_bytes(payload)
    data = manifest_dict(name, version, task, sha256={"model.onnx": sha256_file(directory / "model.onnx")})
    data.update(changes)
    (directory / "manifest.json").write_text(json.dumps(data))
    return directory


def test_manifest_round_trip_and_accessors(tmp_path: Path) -> None:
    directory = write_model(tmp_path)
    manifest = load_manifest(directory)
    assert manifest.task == "segmentation" and manifest.files == {"onnx": "model.onnx"}
    assert input_spec(manifest) == InputSpec(256, 0.5, 0.25, 1)
    assert triplet(manifest) == TripletThreshold(0.75, 2000, 0.3)
    assert triplet(manifest, 512) == TripletThreshold(0.75, 500, 0.3)  # min_area scales with the pixel count
    assert Manifest.model_validate_json(manifest.model_dump_json()) == manifest


def test_service_manifest_does_not_import_torch() -> None:
    import subprocess

    code = "import sys, service.models.manifest; sys.exit(1 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr or "service.models.manifest imported torch"


def test_hash_mismatch_is_refused_naming_file_and_digests(tmp_path: Path) -> None:
    directory = write_model(tmp_path)
    expected = sha256_file(directory / "model.onnx")
    (directory / "model.onnx").write_bytes(b"a different model")
    actual = sha256_file(directory / "model.onnx")
    with pytest.raises(ManifestError, match=rf"model\.onnx: sha256 is {actual[:12]}…, manifest says "
                       rf"{expected[:12]}…: refusing a model file that differs from its manifest"):
        load_manifest(directory)


def test_missing_file_and_missing_manifest_are_refused(tmp_path: Path) -> None:
    directory = write_model(tmp_path)
    (directory / "model.onnx").unlink()
    with pytest.raises(ManifestError, match=r"model\.onnx: listed in .*manifest\.json but missing"):
        load_manifest(directory)
    with pytest.raises(ManifestError, match="no manifest"):
        load_manifest(tmp_path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"colour": "blue"}, r"colour\s+Extra inputs are not permitted"),
        ({"thresholds": {"gate": 0.2, "operating_point": 0.5, "gait": 0.1}}, "Extra inputs are not permitted"),
        ({"task": "detection"}, "Input should be 'classification' or 'segmentation'"),
        ({"sha256": {"model.onnx": "0" * 64, "extra.onnx": "0" * 64}}, r"unlisted \['extra\.onnx'\]"),
        ({"sha256": {"model.onnx": "XYZ"}}, "64 lowercase hex digits"),
        ({"files": {"onnx": "../model.onnx"}}, "plain file name"),
        ({"files": {"checkpoint": "model.pt"}, "sha256": {"model.pt": "0" * 64}}, "'onnx' role"),
        ({"intended_use": "  "}, "intended_use must say"),
        ({"created": "yesterday"}, "ISO 8601"),
        ({"schema_version": 2}, "Input should be 1"),
        ({"name": "a/b"}, "names a folder"),
        ({"input": {"size": 100, "mean": 0.5, "std": 0.25, "channels": 1}}, "multiple of 32"),
        ({"metrics": {"dice": float("nan")}}, "finite number"),
        ({"files": {"onnx": "model.onnx", "onnx_int8": "model.int8.onnx"},
          "sha256": {"model.onnx": "0" * 64, "model.int8.onnx": "0" * 64}}, "export.int8 is missing"),
        ({"export": {**manifest_dict()["export"], "int8": INT8_INFO}}, "no 'onnx_int8' file is listed"),
        ({"export": {**manifest_dict()["export"], "int8": {**INT8_INFO, "quant_format": "QOperator"}}},
         "Input should be 'QDQ'"),
    ],
)
def test_invalid_manifests_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Manifest.model_validate(manifest_dict(**changes))


@pytest.mark.parametrize(
    ("thresholds", "message"),
    [
        ({"gate": 0.0, "operating_point": 0.5}, r"gate must be a probability in \(0, 1\)"),
        ({"gate": 0.2, "operating_point": 1.0}, r"operating_point must be a probability in \(0, 1\)"),
        ({"gate": 0.6, "operating_point": 0.5}, "must not exceed operating_point"),
    ],
)
def test_classification_thresholds_out_of_range_are_refused(thresholds: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Manifest.model_validate(manifest_dict(task="classification", thresholds=thresholds))


@pytest.mark.parametrize(
    ("triplet_values", "message"),
    [
        ({"top_score": 1.2, "min_area": 10, "bottom_score": 0.3}, "need 0 < bottom_score <= top_score < 1"),
        ({"top_score": 0.7, "min_area": -1, "bottom_score": 0.3}, "min_area must be an integer >= 0"),
    ],
)
def test_segmentation_thresholds_out_of_range_are_refused(triplet_values: dict, message: str) -> None:
    thresholds = {"triplet": triplet_values, "min_area_reference_size": 1024}
    with pytest.raises(ValueError, match=message):
        Manifest.model_validate(manifest_dict(thresholds=thresholds))


def test_thresholds_must_match_the_task() -> None:
    with pytest.raises(ValueError, match="task 'classification' needs ClassificationThresholds"):
        Manifest.model_validate(manifest_dict(task="classification", thresholds=manifest_dict()["thresholds"]))
    manifest = Manifest.model_validate(manifest_dict(task="classification"))
    with pytest.raises(ValueError, match="is a classification model: no triplet"):
        triplet(manifest)


def test_version_ordering_is_numeric() -> None:
    versions = ["1.9", "1.10", "0.2", "1.10.1", "1.2", "2"]
    assert sorted(versions, key=version_key) == ["0.2", "1.2", "1.9", "1.10", "1.10.1", "2"]
    assert version_key("1.0") > version_key("1.rc")


def test_find_models_and_latest(tmp_path: Path) -> None:
    for version in ("1.9", "1.10", "1.2"):
        write_model(tmp_path, version=version, payload=version.encode())
    write_model(tmp_path, name="ptx-cls", version="3", task="classification")
    (tmp_path / "README.md").write_text("not a model")

    found = find_models(tmp_path)
    assert [(m.name, m.version) for _, m in found] == [
        ("ptx-cls", "3"), ("ptx-seg", "1.2"), ("ptx-seg", "1.9"), ("ptx-seg", "1.10")]
    assert [m.name for _, m in find_models(tmp_path, task="classification")] == ["ptx-cls"]
    directory, manifest = latest(tmp_path, "ptx-seg")
    assert manifest.version == "1.10" and directory == tmp_path / "ptx-seg" / "1.10"
    with pytest.raises(FileNotFoundError, match=r"no model named 'nope'.*\['ptx-cls', 'ptx-seg'\]"):
        latest(tmp_path, "nope")
    with pytest.raises(ValueError, match="task must be None"):
        find_models(tmp_path, task="detection")


def test_find_models_refuses_a_tampered_or_misfiled_model(tmp_path: Path) -> None:
    directory = write_model(tmp_path, version="1.0")
    (directory / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(ManifestError, match="refusing a model file that differs"):
        find_models(tmp_path)
    misfiled = tmp_path / "other"
    write_model(misfiled, version="2.0", name="ptx-seg")
    (misfiled / "ptx-seg" / "2.0").rename(misfiled / "ptx-seg" / "3.0")
    with pytest.raises(ManifestError, match=r"manifest says ptx-seg/2\.0 but lives in ptx-seg/3\.0"):
        find_models(misfiled)


def test_write_manifest_refuses_an_invalid_update_and_keeps_interval_metrics(tmp_path):
    """model_copy(update=...) skips validation; write_manifest must not let such a manifest reach the disk."""
    directory = write_model(tmp_path)
    manifest = load_manifest(directory)
    with_interval = manifest.model_copy(update={"metrics": {"test": {"sensitivity_ci95": [0.88, 0.97], "auc": 0.9}}})
    write_manifest(with_interval, directory)
    assert load_manifest(directory).metrics["test"]["sensitivity_ci95"] == [0.88, 0.97]
    broken = manifest.model_copy(update={"metrics": {"auc": "high"}})
    with pytest.raises(ValueError, match="metrics"):
        write_manifest(broken, directory)
    assert load_manifest(directory).metrics["test"]["auc"] == 0.9, "the file on disk is unchanged"
