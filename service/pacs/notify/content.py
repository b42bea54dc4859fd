"""What a pushed notification says, taken once from the finding and the film's header when it is queued.

Two parts, kept in two places, because the outbox's rows hold no patient data (docs/security.md): the
identifiers live with the result objects, which carry the patient module by design:

* `NotificationContent`, the outbox row's payload (JSON in the store): the finding in our words, the study's
  and film's UIDs, our versions and the HL7 control ID. The database already holds UIDs, scores, priorities.
* `FilmIdentifiers`, the film's Accession Number and (only where PTX_NOTIFY_HL7_PATIENT_IDS allows) Patient
  ID and Name: a file beside the film's results (`ResultsFolder.write_notification`), where its SEG and SR,
  which copy the same attributes, already are; with PTX_RESULTS_IN_DATABASE it is copied into the database's
  `result_objects` beside them, so the listener whose dispatcher claims the notification reads it wherever it
  was written. Removed with them by the retention sweep. The API never serves it. A file gone (retention) or
  never written (no header) leaves them out of the message.

A notification sent after a restart says exactly what it would have said at once; the message (HL7 or JSON)
is built from both parts at each attempt (a fresh timestamp and signature; the same HL7 control ID, so that
a receiver can recognise a resend). Nothing is read from logs.

Identifiers from the film follow the rule of our DICOM results (service/pacs/results/source.py): a value that
is not valid for its VR (too long, several values, control characters) is left out, never shortened or
guessed: a truncated Accession Number would be another, valid-looking order. Only the HL7 channel sends the
patient's ID and Name; the webhook never does.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from pydicom import config
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName, validate_value

from service.cascade.finding import Finding, Priority
from service.pacs.results.identity import PACKAGE, package_version
from service.store.results_files import ResultsFolder

CONTROL_ID_PREFIX = "PTX"  # MSH-10: at most 20 characters in HL7 v2.5.1; "PTX" + 16 hex digits


def parse_priorities(text: str) -> frozenset[Priority]:
    """PTX_NOTIFY_PRIORITIES: comma-separated STAT, URGENT, ROUTINE (any case); ValueError naming the setting."""
    names = [part.strip().upper() for part in text.split(",") if part.strip()]
    allowed = ", ".join(p.value for p in Priority)
    if not names:
        raise ValueError(f"PTX_NOTIFY_PRIORITIES names no priority; give some of {allowed}")
    unknown = [name for name in names if name not in Priority.__members__]
    if unknown:
        raise ValueError(f"PTX_NOTIFY_PRIORITIES: {', '.join(repr(n) for n in unknown)} is not a priority; "
                         f"use {allowed}")
    return frozenset(Priority(name) for name in names)


@dataclass(frozen=True)
class PatientIdentity:
    """Patient ID (with its issuer) and the alphabetic Patient's Name components, as the film has them."""

    id: str | None
    issuer: str | None
    family: str | None = None
    given: str | None = None
    middle: str | None = None
    prefix: str | None = None
    suffix: str | None = None


@dataclass(frozen=True)
class FilmIdentifiers:
    """The film's identifiers a message may carry: never in the database, never in a log."""

    accession_number: str | None = None
    patient: PatientIdentity | None = None  # HL7 only, and only where the setting allows

    @classmethod
    def from_header(cls, header: Dataset | None, *, patient_ids: bool) -> FilmIdentifiers:
        if header is None:
            return cls()
        return cls(accession_number=film_value(header, "AccessionNumber", "SH"),
                   patient=patient_identity(header) if patient_ids else None)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> FilmIdentifiers:
        values: dict[str, Any] = json.loads(data)
        patient = values.get("patient")
        return cls(accession_number=values.get("accession_number"),
                   patient=None if patient is None else PatientIdentity(**patient))


class IdentifierFiles:
    """The film identifiers of notified findings, beside the film's results (see the module docstring)."""

    def __init__(self, results: ResultsFolder) -> None:
        self.results = results

    def write(self, content: NotificationContent, identifiers: FilmIdentifiers) -> None:
        """Durably, before the outbox rows that need it (nothing to write when the film gave none)."""
        if identifiers != FilmIdentifiers():
            self.results.write_notification(content.study_uid, content.sop_uid, identifiers.to_json())

    def read(self, content: NotificationContent) -> FilmIdentifiers:
        """The identifiers written for `content`'s film, from this replica's file or (written by another
        listener, whose notification this one's dispatcher claimed) the database's copy; none when there is
        neither (none written, or swept)."""
        try:
            return FilmIdentifiers.from_json(self.results.read_notification(content.study_uid, content.sop_uid))
        except FileNotFoundError:
            return FilmIdentifiers()


@dataclass(frozen=True)
class NotificationContent:
    """One notification's content in the outbox (no patient data): the finding in our words, UIDs, versions."""

    study_uid: str
    sop_uid: str  # the film whose finding raised the study: where its identifiers are kept
    priority: Priority
    score: float
    positive: bool
    largest_area_mm2: float | None
    recorded_at: str  # ISO 8601 UTC: when the finding was recorded
    software: str  # "ptx-triage 0.1.0"
    models: dict[str, dict[str, str]]  # role → {"name", "version"}
    control_id: str = field(default_factory=lambda: f"{CONTROL_ID_PREFIX}{uuid.uuid4().hex[:16].upper()}")

    @property
    def text(self) -> str:
        """The finding in words, the same on every channel: what it is, how sure, and what it is not."""
        found = "pneumothorax suspected" if self.positive else "no pneumothorax suspected"
        size = "" if self.largest_area_mm2 is None else f", largest area {self.largest_area_mm2:.0f} mm2"
        return (f"AI triage: {found} (score {self.score:.3f}{size}), priority {self.priority.value}. "
                f"Preliminary, not a diagnosis: it sets the reading order only.")

    @classmethod
    def from_finding(cls, finding: Finding, recorded_at: datetime) -> NotificationContent:
        """From a recorded finding (its identifiers: `FilmIdentifiers.from_header`)."""
        if finding.study_uid is None or finding.sop_uid is None:
            raise ValueError("a finding without Study and SOP Instance UIDs cannot be notified (nothing names it)")
        areas = [i.area_mm2 for i in finding.instances if i.area_mm2 is not None]
        return cls(
            study_uid=str(finding.study_uid), sop_uid=str(finding.sop_uid), priority=finding.priority,
            score=round(float(finding.score), 6), positive=bool(finding.positive),
            largest_area_mm2=round(max(areas), 1) if areas else None,
            recorded_at=recorded_at.isoformat(timespec="seconds"), software=f"{PACKAGE} {package_version()}",
            models={role: {"name": str(entry.get("name", "")), "version": str(entry.get("version", ""))}
                    for role, entry in sorted(finding.models.items())})

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> NotificationContent:
        data: dict[str, Any] = json.loads(text)
        return cls(**{**data, "priority": Priority(data["priority"])})


def film_value(header: Dataset, keyword: str, vr: str) -> str | None:
    """One text attribute of the film where it is present and valid for `vr` (one value, no control
    characters, within its length), else None: left out, never shortened or corrected."""
    value = header.get(keyword)
    if value is None or not isinstance(value, str | PersonName):
        return None  # absent, or several values (a MultiValue): no single identifier to send
    text = str(value).strip()
    if not text or not _printable(text):
        return None
    try:
        validate_value(vr, text, config.RAISE)
    except ValueError:
        return None
    return text


def patient_identity(header: Dataset) -> PatientIdentity | None:
    """Patient ID, its issuer and the name's alphabetic components; None when the film has neither ID nor name."""
    patient_id = film_value(header, "PatientID", "LO")
    issuer = film_value(header, "IssuerOfPatientID", "LO") if patient_id else None
    name = film_value(header, "PatientName", "PN")
    parts: dict[str, str | None] = {}
    if name is not None:
        person = PersonName(name.split("=", 1)[0])  # the alphabetic group; ideographic/phonetic ones not sent
        parts = {"family": person.family_name, "given": person.given_name, "middle": person.middle_name,
                 "prefix": person.name_prefix, "suffix": person.name_suffix}
        parts = {key: value or None for key, value in parts.items()}
    if patient_id is None and not any(parts.values()):
        return None
    return PatientIdentity(id=patient_id, issuer=issuer, **parts)


def _printable(text: str) -> bool:
    """No control characters and no backslash (DICOM's value separator): nothing that could end a segment."""
    return not any(ord(c) < 32 or ord(c) == 127 or c == "\\" for c in text)
