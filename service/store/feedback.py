"""Readers' verdicts on the service's results, kept for audit (issue 14 §3): records and interface.

    acknowledge with a verdict ─▶ give_feedback(…, acknowledge=True)   the ack's compare-and-set, then the verdict
    later, on a reviewed study ─▶ give_feedback(…)                      the same check of the priority seen
    audit export, study view   ─▶ feedback(since=, after=, study_uid=)  every verdict, history included

Why it is kept at all: a reader's agree / disagree on a STAT or URGENT result is the only real-world signal
of the service's positive predictive value (and, on ROUTINE, of what it misses) a site has; the counts go to
Prometheus (`ptx_reader_feedback_total{priority, verdict}`), the rows stay here for the audit.

The rules, each enforced in the one write transaction:

* a verdict judges the priority the reader saw (`seen`): given only while the study is still at it, so it
  never covers a priority the reader did not see (the acknowledgement's rule, issue 13 §5); a study without
  a finding has no result to judge;
* it is given with the acknowledgement, or later on a study already reviewed (a second reader, a changed
  mind); on a study not reviewed yet it is refused: the reader acknowledges with it instead;
* one current verdict per reader per study: a different verdict supersedes the reader's current one, which
  is kept (`superseded_at` set) as history; the same verdict again changes nothing (a resent form);
* the reader is the signed-in identity the HTTP layer hands in, never a label of a metric.

A row names the finding that set the priority (its SOP Instance UID, score and model versions), so the export
says what was judged without a join; nothing of the patient is kept (the store has none).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from service.cascade.finding import Priority

MAX_READER = 64  # a login, as the acknowledgement's `by` (service/http/pages/session.py)
MAX_EXPORT = 10_000  # rows in one answer of the export; `after` pages on


class Verdict(str, Enum):
    """A reader's judgement of a result at the priority they saw."""

    AGREE = "agree"
    DISAGREE = "disagree"
    UNCERTAIN = "uncertain"


def check_reader(reader: str | None) -> str:
    """The reader a verdict is kept under, or ValueError: one current verdict per reader needs a reader."""
    if reader is None or not reader.strip():
        raise ValueError("a verdict needs the reader's login: one current verdict is kept per reader and study")
    if len(reader) > MAX_READER or not reader.isprintable():
        raise ValueError(f"reader: a login of at most {MAX_READER} printable characters")
    return reader.strip()


@dataclass(frozen=True)
class FeedbackRecord:
    """One verdict. `priority` is the one the reader saw and judged; `sop_uid`, `score` and `models` are the
    finding that set it; `superseded_at` is None for the reader's current verdict."""

    id: int
    study_uid: str
    sop_uid: str
    reader: str
    verdict: Verdict
    priority: Priority
    score: float
    models: dict[str, Any]
    created_at: datetime
    superseded_at: datetime | None

    @property
    def current(self) -> bool:
        return self.superseded_at is None


class FeedbackLog(ABC):
    """The store's verdicts (part of every `ResultsStore`)."""

    @abstractmethod
    def give_feedback(self, study_uid: str, reader: str, verdict: Verdict, *, seen: Priority,
                      acknowledge: bool = False) -> tuple[FeedbackRecord, bool]:
        """Record `reader`'s verdict on the study at `seen`, the priority they saw; with `acknowledge`, mark
        the study reviewed by them in the same transaction (`acknowledge`'s compare-and-set). Returns the
        reader's current verdict and whether it is new (False: the same verdict again, nothing changed).
        NotFoundError for an unknown study; StoreError, changing nothing, when the study's priority is no
        longer `seen` or (without `acknowledge`) it is not reviewed; ValueError for a missing reader."""

    @abstractmethod
    def feedback(self, study_uid: str | None = None, since: datetime | None = None, after: int = 0,
                 limit: int = MAX_EXPORT) -> list[FeedbackRecord]:
        """Verdicts in the order given (by id), superseded ones included: of one study, given at or after
        `since`, with an id above `after` (the last one of the previous page)."""


__all__ = ["MAX_EXPORT", "MAX_READER", "FeedbackLog", "FeedbackRecord", "Verdict", "check_reader"]
