"""Who made a DICOM result: our manufacturer, software and models, in the attributes each object needs.

Every object the service writes says it is AI output and names what produced it: Manufacturer `ptx-triage`,
the package version and each model's name and version in Software Versions (0018,1020), the segmenter in the
SEG's Segmentation Algorithm Identification, the models in the SR's algorithm identification and the device
observer. The model names and versions come from the finding (`Finding.models`, filled from the manifests
by the edge), and every builder checks the identity against the finding it is given, so an object can never
name a model other than the one that produced its content.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from importlib import metadata
from typing import TYPE_CHECKING, Any

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.uid import UID, generate_uid

if TYPE_CHECKING:
    from service.cascade.finding import Finding

MANUFACTURER = "ptx-triage"
MANUFACTURER_MODEL_NAME = "ptx-triage pneumothorax triage"
PACKAGE = "ptx-triage"
# The Enhanced General Equipment module (SEG) needs a Device Serial Number (Type 1). Software has none of
# its own: a deployment names its installation here; this default says plainly that nobody did.
UNASSIGNED_SERIAL = "unassigned"
AI_NOTICE = "AI RESULT - NOT FOR DIAGNOSIS"
_LO_MAX = 64  # Long String: Manufacturer, Software Versions, Series Description, Algorithm Name/Version


class ResultKind(str, Enum):
    """The objects we write. Each kind gets its own new series with a fixed, recognisable number.

    The numbers are high so that PACS which sort series by number list the AI results after the films.
    """

    SEG = "SEG"
    SR = "SR"
    SC = "SC"

    @property
    def series_number(self) -> int:
        return {"SEG": 9901, "SR": 9902, "SC": 9903}[self.value]

    @property
    def series_description(self) -> str:
        what = {"SEG": "pneumothorax mask", "SR": "pneumothorax report", "SC": "pneumothorax overlay"}[self.value]
        return f"AI {what} ({MANUFACTURER}) - not for diagnosis"


def new_uid() -> UID:
    """A fresh UID under the UUID-derived root 2.25 (ours to use without a registered organisation root)."""
    return generate_uid(prefix=None)


def name_based_uid(*parts: str) -> UID:
    """A name-based (SHA-1) UUID under 2.25, as ISO/IEC 9834-8 allows: the same `parts` always give the same
    UID (pydicom's `generate_uid(prefix=None)` ignores names and returns a random UUID)."""
    name = "\\".join(parts)
    return UID(f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}")


@functools.cache
def package_version() -> str:
    """The installed ptx-triage version; read once, on first use (never at import time)."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "0+not-installed"  # running from a checkout without `pip install -e .`; visible, not invented


@dataclass(frozen=True)
class ModelIdentity:
    """One model as the manifests name it; `role` is "classifier" or "segmenter"."""

    role: str
    name: str
    version: str

    def __post_init__(self) -> None:
        for attribute in ("role", "name", "version"):
            value = getattr(self, attribute)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"model {attribute} must be a non-empty string, got {value!r}")
            if "\\" in value or len(value) > _LO_MAX:
                raise ValueError(f"model {attribute} {value!r} does not fit a DICOM Long String "
                                 f"(at most {_LO_MAX} characters, no backslash)")

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


@dataclass(frozen=True)
class ResultIdentity:
    """Manufacturer, software and models for the equipment modules and algorithm identification of our objects."""

    models: tuple[ModelIdentity, ...]
    manufacturer: str = MANUFACTURER
    manufacturer_model_name: str = MANUFACTURER_MODEL_NAME
    software_version: str = field(default_factory=package_version)
    device_serial_number: str = UNASSIGNED_SERIAL

    def __post_init__(self) -> None:
        roles = [model.role for model in self.models]
        if len(set(roles)) != len(roles):
            raise ValueError(f"each model role may appear once, got {roles}")
        for value in (self.manufacturer, self.manufacturer_model_name, self.device_serial_number,
                      *self.software_versions):
            if not value or "\\" in value or len(value) > _LO_MAX:
                raise ValueError(f"{value!r} does not fit a DICOM Long String "
                                 f"(1 to {_LO_MAX} characters, no backslash)")

    @classmethod
    def from_models(cls, models: Mapping[str, Mapping[str, Any]], **equipment: str) -> ResultIdentity:
        """From `Finding.models` (role → {"name", "version", "backend"}); `equipment` overrides the defaults."""
        return cls(tuple(ModelIdentity(role, str(entry.get("name", "")), str(entry.get("version", "")))
                         for role, entry in sorted(models.items())), **equipment)

    @property
    def software_versions(self) -> tuple[str, ...]:
        """Software Versions (0018,1020): the package first, then each model as "name version"."""
        return (f"{PACKAGE} {self.software_version}", *(model.label for model in self.models))

    @property
    def device_uid(self) -> UID:
        """The SR's Device Observer UID: the same software, models and installation always give the same UID
        (`name_based_uid`), not a new "device" for every report."""
        return name_based_uid(*self._installation)

    @property
    def _installation(self) -> tuple[str, ...]:
        """What names this installation's software: the parts every name-based UID of ours starts with."""
        return (self.manufacturer, self.device_serial_number, *self.software_versions)

    def uid(self, finding: Finding, purpose: str) -> UID:
        """The UID of one of our objects (or of an item in one, `purpose` says which) for `finding`.

        Name-based (SHA-1 UUID under 2.25) from this identity (installation, software, models), the film's
        SOP Instance UID, the operating point and `purpose`: making the results of a film again gives the
        same UIDs. That makes writing and delivering them idempotent: the results of a film made again after
        a crash (service/intake.py) are the same objects, which a PACS stores once (a duplicate C-STORE),
        never a second SR for the same film. Other software, models or operating point: other UIDs (a
        different result). A finding without a SOP Instance UID (not from a DICOM film) gets random UIDs.
        """
        if not finding.sop_uid:
            return new_uid()
        return name_based_uid(*self._installation, str(finding.sop_uid), f"{finding.threshold:.6g}", purpose)

    def model(self, role: str) -> ModelIdentity:
        for model in self.models:
            if model.role == role:
                return model
        present = ", ".join(m.role for m in self.models) or "none"
        raise ValueError(f"no {role} model in this identity (it has: {present}); "
                         f"the finding's `models` must name every model whose output a DICOM object carries")

    def check(self, models: Mapping[str, Mapping[str, Any]]) -> None:
        """Refuse to label a finding's content with models other than the ones that produced it."""
        if ResultIdentity.from_models(models).models != self.models:
            named = ", ".join(f"{m.role} {m.label}" for m in self.models) or "no models"
            found = ", ".join(f"{role} {entry.get('name')} {entry.get('version')}"
                              for role, entry in sorted(models.items())) or "no recorded models"
            raise ValueError(f"the identity names {named}, but the finding was made by {found}")

    def segment_algorithm(self, parameters: Mapping[str, str] | None = None) -> hd.AlgorithmIdentificationSequence:
        """Segmentation Algorithm Identification: the segmenter drew the mask, so it is the algorithm named."""
        segmenter = self.model("segmenter")
        return hd.AlgorithmIdentificationSequence(
            name=segmenter.name, family=codes.cid7162.ArtificialIntelligence, version=segmenter.version,
            source=self.manufacturer, parameters=dict(parameters) if parameters else None,
        )

    def sr_algorithm(self, role: str) -> hd.sr.AlgorithmIdentification:
        """TID 4019 Algorithm Identification for measurements made by the model in `role`."""
        model = self.model(role)
        return hd.sr.AlgorithmIdentification(name=model.name, version=model.version)

    def equipment(self) -> dict[str, Any]:
        """The General / Enhanced General Equipment keyword arguments every highdicom constructor takes."""
        return {
            "manufacturer": self.manufacturer,
            "manufacturer_model_name": self.manufacturer_model_name,
            "software_versions": self.software_versions,
            "device_serial_number": self.device_serial_number,
        }
