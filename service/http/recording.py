"""Films triaged over HTTP on the worklist (PTX_RECORD_HTTP), recorded as the PACS path records them."""

from __future__ import annotations

from service.cascade.finding import Finding
from service.store import FindingRecord, ReceivedInstance, ResultsStore, utc_now


def record_http(store: ResultsStore, finding: Finding) -> None:
    """Receipt and finding in the store; a film without study or SOP UID has no place on the worklist."""
    if finding.sop_uid is None or finding.study_uid is None:
        return
    now = utc_now()
    store.receive(ReceivedInstance(sop_uid=finding.sop_uid, study_uid=finding.study_uid,
                                   series_uid=finding.series_uid, sop_class_uid=None, source="http",
                                   spool_path=None, received_at=now))
    store.record_finding(FindingRecord.from_finding(finding, now))
