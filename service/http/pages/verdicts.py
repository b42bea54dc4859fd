"""Readers' verdicts (issue 14 §3) as the study page and the API take and show them.

    study page: Acknowledge with a verdict · Record my verdict   ─┐
    POST /v1/studies/{uid}/ack?verdict=  · /v1/studies/{uid}/feedback ─┴▶ store.give_feedback ─▶ counted()
    GET /v1/feedback?format=json|csv (the audit export)  ◀─ store.feedback ─▶ as_json() · as_csv()

One place for what both sides share: the verdict parsed from a form or a query (the error names the allowed
words), the count in `ptx_reader_feedback_total{priority, verdict}` (labels from two closed sets, never the
reader or a UID) once per verdict actually recorded (a resent form counts nothing), and the shapes a verdict
is shown in. The rows hold UIDs, the priority judged, the finding's score and model versions, the verdict,
the reader's login and times: nothing of the patient (the store has none).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from service.metrics import child, metrics
from service.store.feedback import FeedbackRecord, Verdict

VERDICT_LABEL = {Verdict.AGREE: "Agree", Verdict.DISAGREE: "Disagree", Verdict.UNCERTAIN: "Uncertain"}
CSV_FIELDS = ("id", "study_uid", "sop_uid", "priority", "score", "verdict", "reader", "created_at", "superseded_at",
              "models")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet would run such a cell (CSV injection)


def parse_verdict(text: str | None) -> Verdict | None:
    """A verdict from a form field or query parameter; None when absent or empty (an acknowledgement without
    one); ValueError naming the allowed words otherwise."""
    if text is None or text == "":
        return None
    try:
        return Verdict(text)
    except ValueError:
        allowed = ", ".join(v.value for v in Verdict)
        raise ValueError(f"verdict must be one of {allowed} (the result as the reader judged it)") from None


def counted(outcome: tuple[FeedbackRecord, bool]) -> FeedbackRecord:
    """The store's answer, counted in Prometheus when the verdict is new (not a resent one)."""
    record, new = outcome
    if new:
        child(metrics().reader_feedback, priority=record.priority.value, verdict=record.verdict.value).inc()
    return record


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def as_json(record: FeedbackRecord) -> dict[str, Any]:
    """A verdict in the API's JSON (the study answer's `feedback` and the export's `items`)."""
    return {"id": record.id, "study_uid": record.study_uid, "sop_uid": record.sop_uid,
            "priority": record.priority.value, "score": record.score, "verdict": record.verdict.value,
            "reader": record.reader, "created_at": _iso(record.created_at),
            "superseded_at": _iso(record.superseded_at), "models": record.models}


def models_text(models: dict[str, Any]) -> str:
    """`classifier=ptx-classifier-demo 0.1.0; segmenter=…`: the model versions in one CSV cell."""
    parts = []
    for role, model in sorted(models.items()):
        if isinstance(model, dict):
            parts.append(f"{role}={model.get('name', '?')} {model.get('version', '?')}")
    return "; ".join(parts)


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def as_csv(records: Iterable[FeedbackRecord]) -> str:
    """The export as CSV (RFC 4180, a header line): one row per verdict, superseded ones included."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_FIELDS)
    for record in records:
        row = as_json(record)
        row["models"] = models_text(record.models)
        writer.writerow(_cell(row[field]) for field in CSV_FIELDS)
    return out.getvalue()


def current_by_reader(records: Iterable[FeedbackRecord]) -> list[FeedbackRecord]:
    """Each reader's current verdict, newest first (what the study page lists)."""
    return sorted((r for r in records if r.current), key=lambda r: r.created_at, reverse=True)
