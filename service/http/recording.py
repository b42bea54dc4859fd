"""Films triaged over HTTP on the worklist (PTX_RECORD_HTTP), recorded as the PACS path records them.

The receipt keeps the digest of the film's data set (`dataset_sha256`, as the DICOM listener computes it),
so the SOP Instance UID rule holds whichever way a film came: a repeat with the same bytes is the same
instance (recorded once), a repeat under that UID with other bytes or in another study is refused, here
with 409 `sop_uid_conflict` and over C-STORE with 0xC001. Without the digest an HTTP row could only be
compared by study, and a different film under a reused UID would have been taken for a resend. A row
without a digest (received before store migration 2) is compared by study alone.
"""

from __future__ import annotations

import logging

from service.cascade.finding import Finding
from service.errors import ServiceError
from service.store import (
    FindingRecord,
    ReceivedInstance,
    ResultsStore,
    dataset_sha256,
    utc_now,
)

log = logging.getLogger("ptx.http")


class SopUidConflictError(ServiceError):
    """A film whose SOP Instance UID the service already holds for another film: the first one is kept."""

    code, http_status = "sop_uid_conflict", 409


def record_http(store: ResultsStore, finding: Finding, data: bytes | None = None) -> None:
    """Receipt (with the digest of `data`, the request's DICOM bytes) and finding in the store; a film
    without study or SOP UID has no place on the worklist. SopUidConflictError for a reused SOP Instance
    UID with other content; nothing is recorded then."""
    if finding.sop_uid is None or finding.study_uid is None:
        return
    digest = None if data is None else dataset_sha256(data)
    now = utc_now()
    new = store.receive(ReceivedInstance(sop_uid=finding.sop_uid, study_uid=finding.study_uid,
                                         series_uid=finding.series_uid, sop_class_uid=None, source="http",
                                         spool_path=None, received_at=now, sha256=digest))
    if not new:
        _check_repeat(store, finding.sop_uid, finding.study_uid, digest)
    store.record_finding(FindingRecord.from_finding(finding, now))


def _check_repeat(store: ResultsStore, sop_uid: str, study_uid: str, digest: str | None) -> None:
    """A SOP Instance UID already received: the same film passes (its first finding stays), another is
    refused. The log names the instance's UID only, not the studies (they say whose film it is)."""
    known = store.instance(sop_uid)
    if known is None:  # cannot happen while the store keeps rows; refuse rather than guess
        raise ServiceError(f"SOP Instance UID {sop_uid} was refused by the store but is not in it")
    what = ("another study" if known.study_uid != study_uid else
            "other content" if None not in (known.sha256, digest) and known.sha256 != digest else None)
    if what is not None:
        log.warning("HTTP film %s refused: SOP Instance UID already received with %s", sop_uid, what)
        raise SopUidConflictError(f"SOP Instance UID {sop_uid} was already received with {what}; the first "
                                  f"film is kept (give this film its own SOP Instance UID)")
