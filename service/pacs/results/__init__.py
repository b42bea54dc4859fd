"""DICOM results of one finding, for the PACS: SEG (the mask), SR TID 1500 (the report), SC (a picture).

    source film (pydicom Dataset) + Finding + ResultIdentity
      └─ build_seg      binary SEG, one segment "Pneumothorax"     positive findings with a mask only
      └─ build_sr       TID 1500: present/absent, score, areas      always; references the SEG where made
      └─ build_overlay  Secondary Capture with outline and banner   optional, for PACS without SEG display

Every object gets new SOP Instance and Series UIDs (one new series per kind), the source's Study Instance
UID, Patient and Study modules copied from the source by highdicom, Manufacturer `ptx-triage`, and Software
Versions naming the package and each model. A copied attribute whose value in the source is invalid (the
Canon test film's 56-character Accession Number) is left empty, never shortened or guessed, and the object
names it, without its value, in its Original Attributes Sequence (`service.pacs.results.source`). Every
object passes dicom3tools' `dciodvfy` without errors (tests/pacs/test_dicom_results.py).

`build_results` is the one place where the rules for which objects a finding gets are applied; the
builders enforce them too, so they cannot be bypassed.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from service.cascade.finding import Finding
from service.pacs.results.identity import ResultIdentity, ResultKind
from service.pacs.results.overlay import build_overlay
from service.pacs.results.seg import build_seg
from service.pacs.results.sr import build_sr

__all__ = ["DicomResults", "ResultIdentity", "ResultKind", "build_overlay", "build_results", "build_seg",
           "build_sr", "wants_seg"]


@dataclass(frozen=True)
class DicomResults:
    """The objects made for one finding; `seg` and `overlay` are None where none was made."""

    sr: hd.sr.EnhancedSR
    seg: hd.seg.Segmentation | None = None
    overlay: hd.sc.SCImage | None = None

    def datasets(self) -> list[Dataset]:
        """SEG before SR (the SR references it), then SC: the order to send them in."""
        return [ds for ds in (self.seg, self.sr, self.overlay) if ds is not None]


def wants_seg(finding: Finding) -> bool:
    """A SEG is made for a positive finding with a non-empty mask (see `service.pacs.results.seg`)."""
    return finding.positive and bool(finding.mask.any())


def build_results(source: Dataset, finding: Finding, identity: ResultIdentity | None = None, *,
                  overlay: bool = False, pixels: np.ndarray | None = None) -> DicomResults:
    """SEG (where wanted), SR, and the SC when `overlay`; `identity` defaults to the finding's own models."""
    identity = identity or ResultIdentity.from_models(finding.models)
    seg = build_seg(source, finding, identity) if wants_seg(finding) else None
    return DicomResults(
        sr=build_sr(source, finding, seg, identity),
        seg=seg,
        overlay=build_overlay(source, finding, identity, pixels) if overlay else None,
    )
