"""What a reader sees of a study, computed from the store's records: pure functions, no I/O.

The worklist page and the live updates both read a `ListQuery` (the filters and page in the URL) and
render `StudyRow`s. Kept apart from the routes so that the rules (what "time to notification" means, which
finding gives the thumbnail, how a bad filter is named) are tested on plain records.

* time since arrival: now minus the study's first instance's arrival;
* time to notification: from that arrival to the first finding at the study's current priority, i.e. how
  long the reading room waited to be told what it is told now (None while no finding is recorded);
* largest area: the largest pneumothorax instance in mm² over all of the study's findings (None where no
  film had a pixel spacing, so no area in mm²);
* thumbnail: the overlay of the finding that set the priority (highest priority, then highest score).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from service.cascade.finding import Priority
from service.store.base import FindingRecord, StudyRecord, StudyStatus, WorklistItem

PAGE_SIZE = 25
MAX_PAGE = 10_000  # a page beyond it is a typo, not a worklist
#: the `since` choices of the filter form: a window back from now (a date picker's local time would need the
#: reader's time zone; "the last 8 hours" needs none)
SINCE = {"1h": timedelta(hours=1), "8h": timedelta(hours=8), "24h": timedelta(hours=24), "7d": timedelta(days=7)}
SINCE_LABEL = {"1h": "hour", "8h": "8 hours", "24h": "24 hours", "7d": "7 days"}
PRIORITY_LABEL = {Priority.STAT: "STAT", Priority.URGENT: "Urgent", Priority.ROUTINE: "Routine"}


@dataclass(frozen=True)
class ListQuery:
    """The worklist page's filters and page number, as validated from the query string."""

    status: StudyStatus | None = None
    priority: Priority | None = None
    since: str | None = None  # a key of SINCE
    page: int = 1

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> ListQuery:
        """From query parameters; ValueError naming the parameter and the allowed values. Empty means unset
        (the filter form sends every field)."""
        status, priority, since, page = (params.get(name) or None for name in ("status", "priority", "since", "page"))
        try:
            status_value = None if status is None else StudyStatus(status)
        except ValueError:
            raise ValueError(f"status must be one of {', '.join(s.value for s in StudyStatus)}") from None
        try:
            priority_value = None if priority is None else Priority(priority)
        except ValueError:
            raise ValueError(f"priority must be one of {', '.join(p.value for p in Priority)}") from None
        if since is not None and since not in SINCE:
            raise ValueError(f"since must be one of {', '.join(SINCE)} (a window back from now)")
        if page is not None and not (page.isdigit() and 1 <= int(page) <= MAX_PAGE):
            raise ValueError(f"page must be a whole number from 1 to {MAX_PAGE}")
        return cls(status_value, priority_value, since, 1 if page is None else int(page))

    @property
    def offset(self) -> int:
        return (self.page - 1) * PAGE_SIZE

    def since_time(self, now: datetime) -> datetime | None:
        return None if self.since is None else now - SINCE[self.since]

    def params(self, **changes: Any) -> str:
        """The query string of this view, with `changes` (e.g. page=2); unset filters left out."""
        values = {"status": None if self.status is None else self.status.value,
                  "priority": None if self.priority is None else self.priority.value,
                  "since": self.since, "page": self.page, **changes}
        if values["page"] == 1:
            values["page"] = None
        return urlencode({k: v for k, v in values.items() if v is not None})


@dataclass(frozen=True)
class StudyRow:
    """One line of the worklist."""

    study_uid: str
    priority: Priority | None
    score: float | None
    status: StudyStatus
    received_at: datetime
    reviewed_by: str | None
    instances: int
    largest_mm2: float | None
    notified_after_s: float | None
    thumbnail_sop: str | None  # the instance whose overlay PNG stands for the study; None: none to show
    viewer_url: str | None
    thumbnail_ready: bool = True  # False: the PACS side is still writing it (the page retries the image)

    @property
    def priority_label(self) -> str:
        return "Pending" if self.priority is None else PRIORITY_LABEL[self.priority]

    @property
    def priority_class(self) -> str:
        return "pending" if self.priority is None else self.priority.value.lower()


def priority_finding(findings: Iterable[FindingRecord]) -> FindingRecord | None:
    """The finding that set the study's priority: highest priority, then highest score, then earliest."""
    return min(findings, key=lambda f: (f.priority.rank, -f.score, f.created_at), default=None)


def largest_area_mm2(findings: Iterable[FindingRecord]) -> float | None:
    areas = [float(i["area_mm2"]) for f in findings for i in f.instances if i.get("area_mm2") is not None]
    return max(areas, default=None)


def notified_after_s(study: StudyRecord) -> float | None:
    """Seconds from the study's arrival to the first finding at its current priority."""
    if study.priority is None:
        return None
    times = [f.created_at for f in study.findings if f.priority is study.priority]
    return None if not times else max(0.0, (min(times) - study.received_at).total_seconds())


def study_row(study: StudyRecord, has_overlay: Callable[[str], bool], viewer_url: str | None) -> StudyRow:
    """The row of one study; `has_overlay(sop_uid)` says whether that instance's overlay PNG exists. A film
    that came over DICOM gets its overlay just after its finding is stored (the PACS side writes it next): such
    a row names the image anyway, not ready, and the page fetches it again shortly; a film triaged over HTTP
    never gets one."""
    best = priority_finding(study.findings)
    thumbnail, ready = None, True
    if best is not None:
        if has_overlay(best.sop_uid):
            thumbnail = best.sop_uid
        elif any(i.sop_uid == best.sop_uid and i.source.startswith("dicom:") for i in study.instances):
            thumbnail, ready = best.sop_uid, False
    return StudyRow(study.study_uid, study.priority, study.score, study.status, study.received_at,
                    study.reviewed_by, len(study.instances), largest_area_mm2(study.findings),
                    notified_after_s(study), thumbnail, viewer_url, ready)


def version(items: Iterable[WorklistItem]) -> str:
    """What the live view compares: the page's studies with their state, not the clock (ages move alone)."""
    text = "|".join(f"{i.study_uid},{i.status.value},{i.priority and i.priority.value},{i.score},"
                    f"{i.updated_at.isoformat()}" for i in items)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def duration(seconds: float | None) -> str:
    """A duration for people: "0.4 s", "40 s", "12 min", "3 h 05 min", "2 d 4 h"; an em dash for none."""
    if seconds is None:
        return "—"
    if seconds < 10:
        return f"{max(0.0, seconds):.1f} s"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"
