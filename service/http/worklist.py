"""The worklist side of the HTTP API: the prioritised list, a study's findings and result objects, review.

    GET  /v1/worklist?status=&priority=&since=&limit=&offset=   priority first, then arrival
    GET  /v1/studies/{study_uid}                                  instances, findings, links, deliveries
                                                                  (links.viewer: the site's viewer, PTX_VIEWER_URL)
    POST /v1/studies/{study_uid}/ack?priority=&by=[&verdict=]     mark reviewed, if still at the priority seen
                                                                  (with a verdict: agree, disagree, uncertain)
    POST /v1/studies/{study_uid}/feedback?priority=&by=&verdict=  a verdict on a study already reviewed
    GET  /v1/feedback?since=&after=&limit=&format=json|csv        every verdict, for audit (pages/verdicts.py)
    GET  /v1/findings/{sop_uid}                                   the stored finding (the triage JSON, no mask)
    GET  /v1/results/{study_uid}/{sop_uid}/{name}                 SEG.dcm, SR.dcm, SC.dcm, overlay.png

Reads go to the results store (`service.store`) and the results folder (`service.store.results_files`), both
owned by the service instance; nothing here decides priorities (the store upgrades only). A result object
made by another replica is read from the database's copy (PTX_RESULTS_IN_DATABASE), so a study's links work
whichever replica answers.

Who gives a verdict: an API token carries a role, not a person, so `by` names the reader and is required with
a verdict (one current verdict per reader and study); the pages take the signed-in login instead. The export
is a GET, so a read-only token may read it: it holds no patient data, and an auditor or a quality dashboard is
what a read-only token is for (it can acknowledge nothing and give no verdict).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path as FilePath
from typing import Any

import bentoml
from fastapi import APIRouter, Path, Query, Request
from starlette.responses import FileResponse, JSONResponse, Response

from service.cascade.finding import Priority
from service.http.pages import verdicts
from service.http.pages.viewer import viewer_link
from service.http.schemas import error
from service.store import (
    InstanceStatus,
    NotFoundError,
    NotificationRecord,
    StoreError,
    StudyStatus,
)
from service.store.base import (
    SPOOL_MISSING,
    DeliveryRecord,
    FindingRecord,
    WorklistItem,
)
from service.store.feedback import MAX_EXPORT, Verdict, check_reader
from service.store.results_files import RESULT_FILES, NotShared, ResultsFolder

router = APIRouter()
MAX_PAGE = 500
MAX_OFFSET = 2**31 - 1  # found by schemathesis: offset=2**63 reached SQLite and failed with 500
MAX_ID = 2**31 - 1  # ids are 32-bit in PostgreSQL: a larger one would fail in the driver, not answer 404

log = logging.getLogger("ptx.api")


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _item(item: WorklistItem, viewer_url: str | None = None) -> dict[str, Any]:
    """A study as the API shows it; `links.viewer` (the site's viewer, PTX_VIEWER_URL) and `links.page` (the
    worklist's study page) are there for a person to follow."""
    links = {"study": f"/v1/studies/{item.study_uid}", "page": f"/worklist/studies/{item.study_uid}"}
    viewer = viewer_link(viewer_url, item.study_uid)
    if viewer is not None:
        links["viewer"] = viewer
    return {"study_uid": item.study_uid, "priority": None if item.priority is None else item.priority.value,
            "score": item.score, "status": item.status.value, "received_at": _iso(item.received_at),
            "updated_at": _iso(item.updated_at), "reviewed_at": _iso(item.reviewed_at), "links": links}


def _since(text: str | None) -> datetime | None:
    """A `since` parameter: ISO 8601 with a zone, in UTC; ValueError saying what is wrong (a time at the ends of
    the calendar that UTC cannot hold, e.g. 0001-01-01T00:00+14:00, was a 500 before: found by reading)."""
    if text is None:
        return None
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise ValueError("since needs a time zone, e.g. 2026-11-23T08:00:00+00:00")
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("since is out of range: a time between years 1 and 9999 in UTC") from None


def _viewer_url(service: Any) -> str | None:
    """PTX_VIEWER_URL of the running edge (None where the edge has no settings: the router's unit tests)."""
    settings = getattr(service, "settings", None)
    return None if settings is None else settings.viewer_url


def _present(results: ResultsFolder, study_uid: str, findings: Iterable[FindingRecord]) -> dict[str, list[str]]:
    """Each finding's result objects, here or in the database (blocking: run it in a thread)."""
    return {f.sop_uid: results.present(study_uid, f.sop_uid) for f in findings}


def _finding(record: FindingRecord, present: list[str], study_uid: str) -> dict[str, Any]:
    """A finding as the API shows it; `present`: its result objects, linked (any replica serves them)."""
    links = {"finding": f"/v1/findings/{record.sop_uid}"}
    for name in present:
        links[RESULT_FILES[name]] = f"/v1/results/{study_uid}/{record.sop_uid}/{name}"
    return {"sop_uid": record.sop_uid, "score": record.score, "label": record.label,
            "priority": record.priority.value, "threshold": record.threshold, "instances": record.instances,
            "models": record.models, "created_at": _iso(record.created_at), "links": links}


def _delivery(record: DeliveryRecord) -> dict[str, Any]:
    return {"id": record.id, "object_uid": record.object_uid, "kind": record.kind.value,
            "destination": record.destination, "state": record.state.value, "attempts": record.attempts,
            "last_error": record.last_error, "next_attempt_at": _iso(record.next_attempt_at),
            "delivered_at": _iso(record.delivered_at)}


def _notification(record: NotificationRecord) -> dict[str, Any]:
    """A pushed notification's state (never its payload)."""
    return {"id": record.id, "channel": record.channel.value, "priority": record.priority.value,
            "state": record.state.value, "attempts": record.attempts, "max_attempts": record.max_attempts,
            "last_error": record.last_error, "next_attempt_at": _iso(record.next_attempt_at),
            "sent_at": _iso(record.sent_at), "created_at": _iso(record.created_at)}


def _service() -> Any:
    """The running edge (`service.app.Triage`): its `store`, `results` folder and `in_thread`."""
    return bentoml.get_current_service()


@router.get("/worklist", summary="The reading worklist: priority first, then arrival")
async def worklist(status: str | None = Query(None, description="pending, triaged or reviewed"),
                   priority: str | None = Query(None, description="STAT, URGENT or ROUTINE"),
                   since: str | None = Query(None, description="ISO 8601 time with zone: studies first received "
                                                               "at or after it"),
                   limit: int = Query(50, description=f"1 to {MAX_PAGE}"),
                   offset: int = Query(0, description=f"items to skip, 0 to {MAX_OFFSET}")) -> Response:
    try:
        status_value = None if status is None else StudyStatus(status)
        priority_value = None if priority is None else Priority(priority)
        since_value = _since(since)
        if not 1 <= limit <= MAX_PAGE or not 0 <= offset <= MAX_OFFSET:  # SQLite: a bigger int overflows (500)
            raise ValueError(f"limit must be 1..{MAX_PAGE} and offset 0..{MAX_OFFSET}")
    except ValueError as exc:
        return error("invalid_parameter", str(exc), 400)
    service = _service()
    items = await service.in_thread(
        lambda: service.store.worklist(status_value, priority_value, since_value, limit + 1, offset))
    page = items[:limit]
    viewer_url = _viewer_url(service)
    body: dict[str, Any] = {"items": [_item(i, viewer_url) for i in page], "limit": limit, "offset": offset,
                            "next_offset": offset + limit if len(items) > limit else None}
    return JSONResponse(body)


@router.get("/studies/{study_uid}", summary="One study: instances, findings with links to the results, deliveries")
async def study(study_uid: str) -> Response:
    service = _service()
    record = await service.in_thread(service.store.study, study_uid)
    if record is None:
        return error("not_found", f"no study {study_uid} on the worklist", 404)
    store, results = service.store, service.results
    deliveries, notifications, feedback, present = await service.in_thread(lambda: (
        store.deliveries(study_uid=study_uid), store.notifications(study_uid=study_uid),
        store.feedback(study_uid=study_uid), _present(results, study_uid, record.findings)))  # one trip, four reads
    body = _item(record, _viewer_url(service))
    body["instances"] = [{"sop_uid": i.sop_uid, "series_uid": i.series_uid, "status": i.status.value,
                          "error_code": i.error_code, "source": i.source, "received_at": _iso(i.received_at),
                          "outputs_attempts": i.outputs_attempts, "outputs_due_at": _iso(i.outputs_due_at)}
                         for i in record.instances]
    body["findings"] = [_finding(f, present[f.sop_uid], study_uid) for f in record.findings]
    body["deliveries"] = [_delivery(d) for d in deliveries]
    body["notifications"] = [_notification(n) for n in notifications]
    body["feedback"] = [verdicts.as_json(f) for f in feedback]  # history included: `superseded_at` set
    return JSONResponse(body)


def _seen(request: Request) -> Priority | None:
    """The `priority` parameter: the study's priority as the reader saw it (`none`: no finding yet)."""
    text = request.query_params.get("priority")
    try:
        return None if text == "none" else Priority(text)
    except ValueError:
        raise ValueError("priority: required, the study's priority as the reader saw it (STAT, URGENT, ROUTINE, "
                         "or none for a study without a finding)") from None


@router.post("/studies/{study_uid}/ack", summary="Mark a study reviewed, at the priority the reader saw")
async def acknowledge(study_uid: str, request: Request) -> Response:
    """`priority` (required): the study's `priority` as the reader saw it in GET /v1/studies/{study_uid}
    (`none` where that was null: no finding yet). 409 `conflict`, naming the current priority, when a finding
    raised it since: an acknowledgement never covers a priority the reader did not see. `verdict` (agree,
    disagree, uncertain; needs `by`): the reader's verdict on that result, recorded with the acknowledgement."""
    by = request.query_params.get("by")
    if by is not None and (len(by) > 64 or not by.isprintable()):
        return error("invalid_parameter", "by: at most 64 printable characters (a reader's login, not a name)", 400)
    try:
        seen = _seen(request)
        verdict = verdicts.parse_verdict(request.query_params.get("verdict"))
    except ValueError as exc:
        return error("invalid_parameter", str(exc), 400)
    if verdict is not None:
        return await _give_feedback(study_uid, by, verdict, seen, acknowledge=True)
    service = _service()
    try:
        known = await service.in_thread(lambda: service.store.acknowledge(study_uid, by, seen=seen))
    except StoreError as exc:  # the compare-and-set failed: a finding raised the priority since
        return error("conflict", str(exc), 409)
    if not known:
        return error("not_found", f"no study {study_uid} on the worklist", 404)
    return JSONResponse({"study_uid": study_uid, "status": StudyStatus.REVIEWED.value,
                         "priority": None if seen is None else seen.value})


@router.post("/studies/{study_uid}/feedback", summary="A reader's verdict on a reviewed study, at the priority seen")
async def give_feedback(study_uid: str, request: Request) -> Response:
    """`verdict` (agree, disagree, uncertain), `by` (the reader's login) and `priority` (as the reader saw it)
    are required. 409 `conflict` when the priority changed since, or the study is not reviewed yet (give the
    verdict with the acknowledgement). A reader's new verdict supersedes their current one (kept as history);
    the same verdict again changes nothing (`recorded`: false)."""
    try:
        seen = _seen(request)
        verdict = verdicts.parse_verdict(request.query_params.get("verdict"))
        if verdict is None:
            raise ValueError("verdict: required, one of agree, disagree, uncertain")
    except ValueError as exc:
        return error("invalid_parameter", str(exc), 400)
    return await _give_feedback(study_uid, request.query_params.get("by"), verdict, seen, acknowledge=False)


async def _give_feedback(study_uid: str, by: str | None, verdict: Verdict, seen: Priority | None,
                         acknowledge: bool) -> Response:
    """The store's verdict (with or without the acknowledgement), counted; its errors as answers."""
    if seen is None:
        return error("invalid_parameter", "priority: a study without a finding (none) has no result to give a "
                                          "verdict on", 400)
    try:
        reader = check_reader(by)
    except ValueError as exc:
        return error("invalid_parameter", f"by: {exc}", 400)
    service = _service()
    try:
        outcome = await service.in_thread(lambda: service.store.give_feedback(
            study_uid, reader, verdict, seen=seen, acknowledge=acknowledge))
    except NotFoundError:
        return error("not_found", f"no study {study_uid} on the worklist", 404)
    except StoreError as exc:  # the priority changed since it was seen, or (later verdicts) not reviewed yet
        return error("conflict", str(exc), 409)
    record = verdicts.counted(outcome)
    body: dict[str, Any] = {"study_uid": study_uid, "priority": seen.value, "verdict": verdicts.as_json(record),
                            "recorded": outcome[1]}
    if acknowledge:
        body["status"] = StudyStatus.REVIEWED.value
    return JSONResponse(body)


@router.get("/feedback", summary="Readers' verdicts for audit (JSON or CSV), superseded ones included")
async def feedback_export(since: str | None = Query(None, description="ISO 8601 time with zone: verdicts given at "
                                                                      "or after it"),
                          after: int = Query(0, description=f"the last `id` of the previous page, 0 to {MAX_ID}"),
                          limit: int = Query(MAX_EXPORT, description=f"1 to {MAX_EXPORT}"),
                          format: str = Query("json", description="json or csv")) -> Response:
    """Oldest first (by id). No patient data: UIDs, the priority judged, the finding's score and model versions,
    the verdict, the reader's login and times. More rows than `limit`: `next_after` (JSON) or the
    `X-Next-After` header (CSV) is the `after` of the next page."""
    try:
        since_value = _since(since)
        if not 0 <= after <= MAX_ID or not 1 <= limit <= MAX_EXPORT:
            raise ValueError(f"after must be 0..{MAX_ID} and limit 1..{MAX_EXPORT}")
        if format not in ("json", "csv"):
            raise ValueError("format must be json or csv")
    except ValueError as exc:
        return error("invalid_parameter", str(exc), 400)
    service = _service()
    rows = await service.in_thread(lambda: service.store.feedback(since=since_value, after=after, limit=limit))
    next_after = rows[-1].id if len(rows) == limit else None
    if format == "csv":
        headers = {"Content-Disposition": 'attachment; filename="ptx-feedback.csv"', "Cache-Control": "no-store"}
        if next_after is not None:
            headers["X-Next-After"] = str(next_after)
        return Response(verdicts.as_csv(rows), media_type="text/csv; charset=utf-8", headers=headers)
    return JSONResponse({"items": [verdicts.as_json(r) for r in rows], "limit": limit, "next_after": next_after},
                        headers={"Cache-Control": "no-store"})


async def _retried(retry: Callable[[], Any], not_found: str) -> Any:
    """A store retry (`retry_instance`, `retry_delivery`) off the event loop: its record, or the answer saying
    why not (404 `not_found`: unknown; 409 `conflict`: the store's reason, e.g. the state it is in)."""
    try:
        return await _service().in_thread(retry)
    except NotFoundError:
        return error("not_found", not_found, 404)
    except StoreError as exc:
        return error("conflict", str(exc), 409)


@router.post("/instances/{sop_uid}/retry",
             summary="Triage an instance that failed with internal_error again (after a fix), from its kept bytes")
async def retry_instance(sop_uid: str) -> Response:
    """Only the store changes (the instance back to received, attempts reset): the intake, in whichever edge
    worker runs the PACS side, takes it up at its next poll of the store (every 10 s)."""
    service = _service()
    record = await _retried(lambda: service.store.retry_instance(sop_uid), f"no instance {sop_uid} was received")
    if isinstance(record, Response):
        return record
    # Another listener's file is not on this replica: its own intake fails a truly missing one (issue 17 §1).
    if record.spool_path is None or (record.listener in (None, service.settings.listener_name)
                                     and not await service.in_thread(FilePath(record.spool_path).exists)):
        await service.in_thread(lambda: service.store.mark_instance(sop_uid, InstanceStatus.FAILED, SPOOL_MISSING))
        return error("conflict", f"instance {sop_uid}: its spooled bytes are gone (retention, PTX_RETENTION_DAYS, "
                                 "or removed by hand); send it again from the PACS", 409)
    log.info("instance %s queued for triage again by an operator", sop_uid)
    return JSONResponse({"sop_uid": record.sop_uid, "study_uid": record.study_uid, "status": record.status.value,
                         "attempts": record.attempts})


@router.post("/deliveries/{delivery_id}/retry",
             summary="Send a failed delivery again (a fresh attempt budget), once its destination is fixed")
async def retry_delivery(
        delivery_id: int = Path(ge=1, le=MAX_ID, description="a delivery's `id` in GET /v1/studies/{study_uid}"),
) -> Response:
    """Only the store changes: the dispatcher (in whichever edge worker runs the PACS side) finds the delivery
    due at its next poll, so this works from any worker."""
    service = _service()
    record = await _retried(lambda: service.store.retry_delivery(delivery_id), f"no delivery with id {delivery_id}")
    if isinstance(record, Response):
        return record
    log.info("delivery %d of %s to %s queued again by an operator", record.id, record.object_uid, record.destination)
    return JSONResponse(_delivery(record))


@router.post("/notifications/{notification_id}/retry",
             summary="Push a failed notification again (a fresh attempt budget), once its receiver is fixed")
async def retry_notification(
        notification_id: int = Path(ge=1, le=MAX_ID, description="a notification's `id` in GET /v1/studies/{uid}"),
) -> Response:
    """Only the store changes: the notification dispatcher finds it due at its next poll."""
    service = _service()
    record = await _retried(lambda: service.store.retry_notification(notification_id),
                            f"no notification with id {notification_id}")
    if isinstance(record, Response):
        return record
    log.info("notification %d (%s) to %s queued again by an operator", record.id, record.priority.value,
             record.channel.value)
    return JSONResponse(_notification(record))


@router.get("/findings/{sop_uid}", summary="The stored finding of one instance (no mask image; RLE included)")
async def finding(sop_uid: str) -> Response:
    service = _service()
    found = await service.in_thread(service.store.finding, sop_uid)
    if found is None:
        return error("not_found", f"no finding for instance {sop_uid}", 404)
    study_uid, record = found
    present = await service.in_thread(_present, service.results, study_uid, [record])
    body = _finding(record, present[record.sop_uid], study_uid)
    body["rle"] = record.rle
    body["study_uid"] = study_uid
    return JSONResponse(body)


@router.get("/results/{study_uid}/{sop_uid}/{name}", summary="A result object: SEG.dcm, SR.dcm, SC.dcm or overlay.png")
async def result_file(study_uid: str, sop_uid: str, name: str) -> Response:
    """This replica's file, else the database's copy (another replica made it: PTX_RESULTS_IN_DATABASE).
    404 `not_on_this_replica` for an object too large for the database that another replica made."""
    service = _service()
    results: ResultsFolder = service.results
    try:
        path = results.path(study_uid, sop_uid, name)
    except ValueError as exc:
        return error("invalid_parameter", str(exc), 400)
    media = "image/png" if name.endswith(".png") else "application/dicom"
    if path.is_file():
        return FileResponse(path, media_type=media)
    try:
        data = await service.in_thread(results.read, study_uid, sop_uid, name)
    except NotShared as exc:
        return error("not_on_this_replica", str(exc), 404)
    except FileNotFoundError:
        return error("not_found", f"no {name} for instance {sop_uid}", 404)
    return Response(data, media_type=media)
