"""Which two models the service runs, found and verified through their manifests.

Both sides of the service read this: the model worker to load the weights, the HTTP edge for the input
specs and thresholds. Both resolve from the same settings and the same hash-verified manifests, so they
cannot disagree about which model version (and so which thresholds) is in use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from service.models import manifest as manifests
from service.models.fusion import ScoreFusion
from service.models.input_spec import InputSpec
from service.models.manifest import (
    ClassificationThresholds,
    Manifest,
    ManifestError,
    SegmentationThresholds,
)
from service.models.precision import require_variant
from service.models.thresholds import TripletThreshold
from service.settings import Settings

log = logging.getLogger("ptx.models")


@dataclass(frozen=True)
class ModelEntry:
    role: str  # "classifier" or "segmenter"
    directory: Path
    manifest: Manifest
    members: tuple[str, ...] = ()  # an ensemble's members, "<version> (run <key>)" (training/cv.py); () otherwise

    @property
    def label(self) -> str:
        return f"{self.manifest.name} {self.manifest.version}"


@dataclass(frozen=True)
class ModelSet:
    """The cascade's two models and what their manifests say about using them."""

    classifier: ModelEntry
    segmenter: ModelEntry

    @property
    def classifier_spec(self) -> InputSpec:
        return manifests.input_spec(self.classifier.manifest)

    @property
    def segmenter_spec(self) -> InputSpec:
        return manifests.input_spec(self.segmenter.manifest)

    @property
    def decode_side(self) -> int:
        """The side a reduced decode must keep (issue 15): the larger of the two models' inputs."""
        return max(self.classifier_spec.size, self.segmenter_spec.size)

    @property
    def _classification(self) -> ClassificationThresholds:
        thresholds = self.classifier.manifest.thresholds
        assert isinstance(thresholds, ClassificationThresholds)
        return thresholds

    @property
    def gate(self) -> float:
        return self._classification.gate

    @property
    def operating_point(self) -> float:
        return self._classification.operating_point

    @property
    def fusion(self) -> ScoreFusion | None:
        """The triage score's fusion of both models' evidence (service/models/fusion.py), if the classifier has one."""
        return self.classifier.manifest.fusion

    @property
    def ood_threshold(self) -> float | None:
        """The classifier's out-of-distribution threshold (service/models/ood.py), if its manifest has one."""
        ood = self.classifier.manifest.ood
        return None if ood is None else ood.threshold

    @property
    def triplet(self) -> TripletThreshold:
        return manifests.triplet(self.segmenter.manifest)

    @property
    def triplet_reference_size(self) -> int:
        thresholds = self.segmenter.manifest.thresholds
        assert isinstance(thresholds, SegmentationThresholds)
        return thresholds.min_area_reference_size

    def entries(self) -> tuple[ModelEntry, ModelEntry]:
        return self.classifier, self.segmenter


def _resolve(root: Path, name: str | None, task: str, role: str, setting: str) -> ModelEntry:
    found = manifests.find_models(root, task)
    if name is None:
        names = sorted({manifest.name for _, manifest in found})
        if len(names) != 1:
            raise ManifestError(
                f"{len(names)} {task} models under {root} ({', '.join(names) or 'none'}); "
                f"name one with {setting}"
            )
        name = names[0]
    directory, manifest = manifests.latest(root, name)
    if manifest.task != task:
        raise ManifestError(f"{setting}={name} is a {manifest.task} model; the {role} must be a {task} model")
    return ModelEntry(role, directory, manifest, manifests.read_members(directory, manifest))


def resolve(settings: Settings) -> ModelSet:
    """The highest version of the named (or only) classifier and segmenter under `settings.models_dir`.

    Raises `ManifestError` (naming the file and the mismatch) for any model that fails its hashes: a
    service never starts on unvalidated weights; nor on a precision (PTX_PRECISION) whose file a model's
    manifest does not list.
    """
    root = Path(settings.models_dir)
    if not root.is_dir():
        raise ManifestError(f"models directory {root} (PTX_MODELS_DIR) does not exist")
    models = ModelSet(
        classifier=_resolve(root, settings.classifier, "classification", "classifier", "PTX_CLASSIFIER"),
        segmenter=_resolve(root, settings.segmenter, "segmentation", "segmenter", "PTX_SEGMENTER"),
    )
    for entry in models.entries():
        require_variant(entry.manifest, settings.precision)
    if settings.precision == "int8":  # said, not silent: the thresholds were fitted on FP32 scores
        log.warning("PTX_PRECISION=int8: %s's operating point and gate were fitted on FP32 scores; the INT8 "
                    "models' scores differ from FP32's, so some films are called differently from what the "
                    "manifest's metrics describe (docs/models.md, INT8 variant)", models.classifier.label)
    return models
