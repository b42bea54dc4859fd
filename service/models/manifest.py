"""Model manifests: the only way the service finds, trusts and configures a model.

`models/<name>/<version>/manifest.json` says what a model is (task, input size, normalisation, output
names), how to use it (thresholds), where it came from (training command, config, seed, data fingerprint,
metrics, export checks) and, above all, the sha256 of every file it ships. Why hashes: a model file that
differs from the one that was validated (a half-copied download, a retrained file dropped into the wrong
folder) would produce plausible-looking but unvalidated triage scores; the service refuses it instead.

Serving side: pydantic and the standard library only -- the serving install has no torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from typing_extensions import TypeAliasType

from service.errors import ServiceError
from service.models.fusion import ScoreFusion
from service.models.input_spec import InputSpec
from service.models.ood import OodStatistics
from service.models.thresholds import TripletThreshold

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
INT8_ROLE = "onnx_int8"  # the statically quantised (QDQ) ONNX file, made by training/quantize.py
_DIGEST_PREFIX = 12
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")

#: A metric value: a number, None (undefined, e.g. Dice with no positives) or a nested group of them.
MetricValue = TypeAliasType(
    "MetricValue",
    Union[Annotated[float, Field(allow_inf_nan=False)], None, list["MetricValue"], dict[str, "MetricValue"]],
)


class ManifestError(ServiceError, ValueError):
    """A manifest that cannot be trusted: unreadable, invalid, or not matching the files next to it."""

    code = "invalid_manifest"


class _Strict(BaseModel):
    """Unknown keys are errors: a misspelt threshold must never fall back silently to a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _probability(name: str, value: float) -> float:
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise ValueError(f"{name} must be a probability in (0, 1), got {value!r}")
    return value


class ModelInput(_Strict):
    """The input tensor: (batch, channels, size, size) float32, normalised as (x - mean) / std."""

    size: int
    mean: float
    std: float
    channels: int
    name: str = "image"
    layout: Literal["NCHW"] = "NCHW"

    @model_validator(mode="after")
    def _valid_spec(self) -> ModelInput:
        InputSpec(self.size, self.mean, self.std, self.channels)  # one set of rules for what a model accepts
        return self


class ClassificationThresholds(_Strict):
    """`gate`: send to the segmenter above this (chosen for sensitivity); `operating_point`: call positive.

    Why gate <= operating_point is required: an image called positive must also have been segmented,
    otherwise a positive finding would be reported without a mask.
    """

    gate: float
    operating_point: float

    @model_validator(mode="after")
    def _in_range(self) -> ClassificationThresholds:
        _probability("gate", self.gate)
        _probability("operating_point", self.operating_point)
        if self.gate > self.operating_point:
            raise ValueError(
                f"gate ({self.gate}) must not exceed operating_point ({self.operating_point}): "
                "every image called positive must have been segmented"
            )
        return self


class Triplet(_Strict):
    top_score: float
    min_area: int
    bottom_score: float

    @model_validator(mode="after")
    def _valid_rule(self) -> Triplet:
        TripletThreshold(self.top_score, self.min_area, self.bottom_score)
        return self


class SegmentationThresholds(_Strict):
    """The triplet rule; `min_area` is in pixels of a square map of side `min_area_reference_size`."""

    triplet: Triplet
    min_area_reference_size: int = Field(ge=1)


class TrainingInfo(_Strict):
    command: str = Field(min_length=1)
    config: dict
    seed: int
    data_fingerprint: str = Field(min_length=1)
    git_commit: str | None = None


class Int8Calibration(_Strict):
    """The films the INT8 ranges were measured on: training films, never test films (see training/quantize.py).

    `fingerprint` is the sha256 of the preprocessed float32 calibration batch, so that a re-run can show it
    calibrated on the very same inputs.
    """

    description: str = Field(min_length=1)
    films: int = Field(ge=1)
    fingerprint: str = Field(min_length=1)


class Int8Info(_Strict):
    """How the INT8 file (files role `onnx_int8`) was made and how far it is from the FP32 file.

    Static quantisation by ONNX Runtime in the QDQ format; `max_abs_error` / `mean_abs_error` compare its
    sigmoid probabilities with the FP32 ONNX file's on the calibration films, and the export is refused when
    the mean exceeds `tolerance` (a broken calibration, not a small rounding difference).
    """

    quant_format: Literal["QDQ"] = "QDQ"
    method: str = Field(min_length=1)
    calibration_method: str = Field(min_length=1)
    activation_type: str = Field(min_length=1)
    weight_type: str = Field(min_length=1)
    per_channel: bool
    calibration: Int8Calibration
    tolerance: float = Field(ge=0)
    max_abs_error: float = Field(ge=0)
    mean_abs_error: float = Field(ge=0)


class ExportInfo(_Strict):
    """How the ONNX files were checked against PyTorch (see training/export.py and docs/models.md).

    `max_abs_error` / `max_rel_error` compare raw outputs (logits), the relative one against
    max |PyTorch output|; `fp16_max_abs_error` compares sigmoid probabilities of the FP16 variant; `int8`
    says how the INT8 variant was calibrated and checked (present exactly when the files list one).
    """

    opset: int = Field(ge=17)
    exporter: str = Field(min_length=1)
    tolerance: float = Field(ge=0)
    max_abs_error: float = Field(ge=0)
    max_rel_error: float = Field(ge=0)
    fp16_tolerance: float | None = Field(default=None, ge=0)
    fp16_max_abs_error: float | None = Field(default=None, ge=0)
    checked_batch_sizes: list[int] = Field(default_factory=lambda: [1, 3])
    real_inputs_checked: int = Field(default=0, ge=0)
    int8: Int8Info | None = None


class Manifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    version: str
    task: Literal["classification", "segmentation"]
    files: dict[str, str]
    sha256: dict[str, str]
    input: ModelInput
    outputs: list[str] = Field(min_length=1)
    thresholds: ClassificationThresholds | SegmentationThresholds
    training: TrainingInfo
    metrics: dict[str, MetricValue]
    export: ExportInfo
    intended_use: str
    created: str
    ood: OodStatistics | None = None  # classifiers with a `features` output (service/models/ood.py)
    fusion: ScoreFusion | None = None  # classifiers: the triage score from both models (service/models/fusion.py)

    @field_validator("name", "version")
    @classmethod
    def _directory_safe(cls, value: str) -> str:
        if not _SAFE_NAME.match(value):
            raise ValueError(f"must be letters, digits, '.', '_' or '-' (it names a folder), got {value!r}")
        return value

    @field_validator("files")
    @classmethod
    def _plain_files(cls, files: dict[str, str]) -> dict[str, str]:
        if "onnx" not in files:
            raise ValueError(f"files must include the 'onnx' role, got roles {sorted(files)}")
        for role, filename in files.items():
            if not _SAFE_NAME.match(filename):
                raise ValueError(f"files[{role!r}] must be a plain file name in the model folder, got {filename!r}")
        if len(set(files.values())) != len(files):
            raise ValueError(f"two roles name the same file: {files}")
        return files

    @field_validator("sha256")
    @classmethod
    def _hex_digests(cls, digests: dict[str, str]) -> dict[str, str]:
        for filename, digest in digests.items():
            if not _HEX_DIGEST.match(digest):
                raise ValueError(f"sha256[{filename!r}] must be 64 lowercase hex digits, got {digest!r}")
        return digests

    @field_validator("outputs")
    @classmethod
    def _unique_outputs(cls, outputs: list[str]) -> list[str]:
        if len(set(outputs)) != len(outputs) or not all(outputs):
            raise ValueError(f"outputs must be distinct non-empty names, got {outputs}")
        return outputs

    @field_validator("intended_use")
    @classmethod
    def _stated(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("intended_use must say what the model is (and is not) for")
        return value

    @field_validator("created")
    @classmethod
    def _iso(cls, value: str) -> str:
        try:
            datetime.fromisoformat(value)
        except ValueError as error:
            raise ValueError(f"created must be an ISO 8601 date, got {value!r}") from error
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        listed, hashed = set(self.files.values()), set(self.sha256)
        if listed != hashed:
            raise ValueError(
                f"sha256 must cover exactly the listed files: missing {sorted(listed - hashed)}, "
                f"unlisted {sorted(hashed - listed)}"
            )
        if (INT8_ROLE in self.files) != (self.export.int8 is not None):
            raise ValueError(
                f"files role {INT8_ROLE!r} and export.int8 (how it was calibrated) go together: "
                f"{'export.int8 is missing' if INT8_ROLE in self.files else f'no {INT8_ROLE!r} file is listed'}"
            )
        if (self.ood or self.fusion) and self.task != "classification":
            raise ValueError("ood and fusion describe a classifier: a segmentation manifest has neither")
        if self.ood is not None and self.ood.output not in self.outputs:
            raise ValueError(f"ood reads the output {self.ood.output!r}, which outputs {self.outputs} lack")
        wanted = ClassificationThresholds if self.task == "classification" else SegmentationThresholds
        if not isinstance(self.thresholds, wanted):
            raise ValueError(f"task {self.task!r} needs {wanted.__name__}, got {type(self.thresholds).__name__}")
        return self


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (model files can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_files(manifest: Manifest, directory: Path) -> None:
    """Raise ManifestError unless every listed file exists with the manifest's sha256."""
    for filename, expected in manifest.sha256.items():
        path = directory / filename
        if not path.is_file():
            raise ManifestError(f"{filename}: listed in {directory / MANIFEST_FILE} but missing from {directory}")
        actual = sha256_file(path)
        if actual != expected:
            raise ManifestError(
                f"{path}: sha256 is {actual[:_DIGEST_PREFIX]}…, manifest says {expected[:_DIGEST_PREFIX]}…: "
                "refusing a model file that differs from its manifest"
            )


def load_manifest(directory: str | Path) -> Manifest:
    """Read and validate `directory/manifest.json` and verify the sha256 of every file it lists."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    try:
        manifest = Manifest.model_validate_json(path.read_bytes())
    except FileNotFoundError as error:
        raise ManifestError(f"{path}: no manifest; the service loads models only through manifests") from error
    except ValidationError as error:
        raise ManifestError(f"{path}: invalid manifest: {error}") from error
    verify_files(manifest, directory)
    return manifest


def write_manifest(manifest: Manifest, directory: str | Path) -> Path:
    """Write `manifest.json` (indented, keys in schema order) after checking it against the files.

    The manifest is validated again first: `model_copy(update=...)` does not validate, and a manifest the
    service cannot read back must never reach the disk.
    """
    directory = Path(directory)
    manifest = Manifest.model_validate(manifest.model_dump(mode="json", warnings=False))  # errors come next
    verify_files(manifest, directory)
    path = directory / MANIFEST_FILE
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    return path


def find_models(root: str | Path, task: str | None = None) -> list[tuple[Path, Manifest]]:
    """Every verified model under `root/<name>/<version>/`, sorted by name then version.

    A manifest whose name or version disagrees with its folder is an error (it would make `latest`
    pick a model by a name it does not carry), as is any file failing its hash: a broken repository
    is reported, not skipped.
    """
    if task not in (None, "classification", "segmentation"):
        raise ValueError(f"task must be None, 'classification' or 'segmentation', got {task!r}")
    found = []
    for path in sorted(Path(root).glob(f"*/*/{MANIFEST_FILE}")):
        directory = path.parent
        manifest = load_manifest(directory)
        if (manifest.name, manifest.version) != (directory.parent.name, directory.name):
            raise ManifestError(
                f"{path}: manifest says {manifest.name}/{manifest.version} but lives in "
                f"{directory.parent.name}/{directory.name}"
            )
        if task is None or manifest.task == task:
            found.append((directory, manifest))
    found.sort(key=lambda item: (item[1].name, version_key(item[1].version)))
    return found


def version_key(version: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key comparing numeric parts as integers ("1.10" > "1.9"); a number outranks a word ("1.0" > "1.rc")."""
    return tuple((1, int(part), "") if part.isdigit() else (0, 0, part) for part in re.split(r"[._-]", version))


def latest(root: str | Path, name: str) -> tuple[Path, Manifest]:
    """The highest version of model `name` under `root` (see `version_key`)."""
    models = find_models(root)
    candidates = [item for item in models if item[1].name == name]
    if not candidates:
        names = sorted({manifest.name for _, manifest in models})
        raise FileNotFoundError(f"no model named {name!r} under {root}; found {names}")
    return max(candidates, key=lambda item: version_key(item[1].version))


def input_spec(manifest: Manifest) -> InputSpec:
    """The preprocessing the model was trained with."""
    spec = manifest.input
    return InputSpec(spec.size, spec.mean, spec.std, spec.channels)


def triplet(manifest: Manifest, size: int | tuple[int, int] | None = None) -> TripletThreshold:
    """The segmentation triplet, with `min_area` rescaled to a map of `size` (default: as recorded).

    Pass the size of the map the rule is applied to (the radiograph's rows x columns after upsampling,
    or the model's input size), since min_area counts pixels of that map.
    """
    thresholds = manifest.thresholds
    if not isinstance(thresholds, SegmentationThresholds):
        raise ValueError(f"model {manifest.name} {manifest.version} is a {manifest.task} model: no triplet")
    rule = TripletThreshold(
        thresholds.triplet.top_score, thresholds.triplet.min_area, thresholds.triplet.bottom_score
    )
    return rule if size is None else rule.at_size(size, from_size=thresholds.min_area_reference_size)


def read_members(directory: Path, manifest: Manifest) -> tuple[str, ...]:
    """An ensemble's members, "<version> (run <key>)" each, from the file its manifest lists under the role
    "members" (training/cv.py writes it; its sha256 is checked with the other files); () for a single model."""
    name = manifest.files.get("members")
    if name is None:
        return ()
    try:
        listed = json.loads((Path(directory) / name).read_text(encoding="utf-8"))["members"]
        return tuple(f"{member['version']} (run {member['run_key']})" for member in listed)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ManifestError(f"{Path(directory) / name}: not an ensemble's member list ({type(error).__name__})"
                            ) from error
