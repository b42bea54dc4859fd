"""De-identified answers (PTX_DEIDENTIFY_RESPONSES): the triage and inspect JSON without DICOM UIDs.

The JSON never carries patient attributes (names, IDs, birth dates never enter a `Radiograph`); what can
still tie an answer to a patient are the study, series and instance UIDs, which any PACS resolves to the
patient. In this mode they are replaced by keyed pseudonyms, `2.25.<HMAC-SHA256(key, UID) as a UUID>`:

* keyed (PTX_DEIDENTIFY_KEY), not a plain hash: a UID is guessable (org root + date + counter), so an
  unkeyed hash could be reversed by hashing candidates; without the key nobody can map back or forward;
* deterministic: the same film gives the same pseudonym in every answer, every edge worker and after a
  restart, so a research pipeline can still group films by study and drop repeats;
* still a DICOM UID (the 2.25 UUID root, the UUID's version bits set): clients keep their schema.

Without a key the UIDs are left out (null): nothing links the answer back, nor two answers together. The
uploaded file names in batch answers (`filename`) are left out too: a client may name files after patients.
The worklist API is not affected: it is keyed by the study UID, for PACS-integrated use.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Callable
from typing import Any

UID_FIELDS = ("study_uid", "series_uid", "sop_uid")
MIN_KEY_LENGTH = 16


class Pseudonymiser:
    """UID → keyed pseudonym (with a key) or None (without)."""

    def __init__(self, key: str | None) -> None:
        if key is not None and len(key) < MIN_KEY_LENGTH:
            raise ValueError(f"PTX_DEIDENTIFY_KEY holds {len(key)} characters; at least {MIN_KEY_LENGTH} are needed")
        self._key = None if key is None else key.encode("utf-8")

    def __repr__(self) -> str:
        return f"Pseudonymiser(keyed={self._key is not None})"

    def uid(self, value: str | None) -> str | None:
        if value is None or self._key is None:
            return None
        digest = hmac.new(self._key, value.encode("ascii", "replace"), hashlib.sha256).digest()
        return f"2.25.{uuid.UUID(bytes=digest[:16], version=4).int}"

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """A triage / inspect / batch-item body with its UIDs replaced and any file name dropped."""
        out = dict(body)
        for name in UID_FIELDS:
            if name in out:
                out[name] = self.uid(out[name])
        if "filename" in out:
            out["filename"] = None
        return out


def from_settings(settings: Any) -> Pseudonymiser | None:
    """None when answers are not de-identified."""
    if not settings.deidentify_responses:
        return None
    key = settings.deidentify_key.get_secret_value() if settings.deidentify_key is not None else None
    return Pseudonymiser(key)


def answer_filter(pseudonymiser: Pseudonymiser | None) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The answer as sent: with PTX_DEIDENTIFY_RESPONSES its UIDs pseudonymised and file names dropped."""
    return (lambda body: body) if pseudonymiser is None else pseudonymiser.answer
