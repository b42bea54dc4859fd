"""The worklist side of the HTTP API: the prioritised list, a study's findings and result objects, review.

    GET  /v1/worklist?status=&priority=&since=&limit=&offset=   priority first, then arrival
    GET  /v1/studies/{study_uid}                                  instances, findings, links, deliveries
    POST /v1/studies/{study_uid}/ack?priority=&by=                mark reviewed, if still at the priority seen
    GET  /v1/findings/{sop_uid}                                   the stored finding (the triage JSON, no mask)
    GET  /v1/results/{study_uid}/{sop_uid}/{name}                 SEG.dcm, SR.dcm, SC.dcm, overlay.png

Reads go to the results store (`service.store`) and the results folder (`service.store.results_files`), both
owned by the service instance; nothing here decides priorities (the store upgrades only).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path as FilePath
from typing import Any

import bentoml
from fastapi import APIRouter, Path, Query, Request
from starlette.responses import FileResponse, JSONResponse, Response

from service.cascade.finding import Priority
from service.http.schemas import error
from service.store import InstanceStatus, NotFoundError, StoreError, StudyStatus
from service.store.base import (
    SPOOL_MISSING,
    DeliveryRecord,
    FindingRecord,
    WorklistItem,
)
from service.store.results_files import RESULT_FILES, ResultsFolder

router = APIRouter()
MAX_PAGE = 500
MAX_OFFSET = 2**31 - 1  # found by schemathesis: offset=2**63 reached SQLite and failed with 500
MAX_ID = 2**31 - 1  # ids are 32-bit in PostgreSQL: a larger one would fail in the driver, not answer 404

log = logging.getLogger("ptx.api")


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _item(item: WorklistItem) -> dict[str, Any]:
    return {"study_uid": item.study_uid, "priority": None if item.priority is None else item.priority.value,
            "score": item.score, "status": item.status.value, "received_at": _iso(item.received_at),
            "updated_at": _iso(item.updated_at), "reviewed_at": _iso(item.reviewed_at),
            "links": {"study": f"/v1/studies/{item.study_uid}"}}


def _finding(record: FindingRecord, results: ResultsFolder, study_uid: str) -> dict[str, Any]:
    links = {"finding": f"/v1/findings/{record.sop_uid}"}
    for name in results.present(study_uid, record.sop_uid):
        links[RESULT_FILES[name]] = f"/v1/results/{study_uid}/{record.sop_uid}/{name}"
    return {"sop_uid": record.sop_uid, "score": record.score, "label": record.label,
            "priority": record.priority.value, "threshold": record.threshold, "instances": record.instances,
            "models": record.models, "created_at": _iso(record.created_at), "links": links}


def _delivery(record: DeliveryRecord) -> dict[str, Any]:
    return {"id": record.id, "object_uid": record.object_uid, "kind": record.kind.value,
            "destination": record.destination, "state": record.state.value, "attempts": record.attempts,
            "last_error": record.last_error, "next_attempt_at": _iso(record.next_attempt_at),
            "delivered_at": _iso(record.delivered_at)}


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
        since_value = None if since is None else datetime.fromisoformat(since)
        if since_value is not None and since_value.tzinfo is None:
            raise ValueError("since needs a time zone, e.g. 2026-11-23T08:00:00+00:00")
        if not 1 <= limit <= MAX_PAGE or not 0 <= offset <= MAX_OFFSET:  # SQLite: a bigger int overflows (500)
            raise ValueError(f"limit must be 1..{MAX_PAGE} and offset 0..{MAX_OFFSET}")
    except ValueError as exc:
        return error("invalid_parameter", str(exc), 400)
    service = _service()
    items = await service.in_thread(
        lambda: service.store.worklist(status_value, priority_value, since_value, limit + 1, offset))
    page = items[:limit]
    body: dict[str, Any] = {"items": [_item(i) for i in page], "limit": limit, "offset": offset,
                            "next_offset": offset + limit if len(items) > limit else None}
    return JSONResponse(body)


@router.get("/studies/{study_uid}", summary="One study: instances, findings with links to the results, deliveries")
async def study(study_uid: str) -> Response:
    service = _service()
    record = await service.in_thread(service.store.study, study_uid)
    if record is None:
        return error("not_found", f"no study {study_uid} on the worklist", 404)
    deliveries = await service.in_thread(lambda: service.store.deliveries(study_uid=study_uid))
    body = _item(record)
    body["instances"] = [{"sop_uid": i.sop_uid, "series_uid": i.series_uid, "status": i.status.value,
                          "error_code": i.error_code, "source": i.source, "received_at": _iso(i.received_at)}
                         for i in record.instances]
    body["findings"] = [_finding(f, service.results, study_uid) for f in record.findings]
    body["deliveries"] = [_delivery(d) for d in deliveries]
    return JSONResponse(body)


@router.post("/studies/{study_uid}/ack", summary="Mark a study reviewed, at the priority the reader saw")
async def acknowledge(study_uid: str, request: Request) -> Response:
    """`priority` (required): the study's `priority` as the reader saw it in GET /v1/studies/{study_uid}
    (`none` where that was null: no finding yet). 409 `conflict`, naming the current priority, when a finding
    raised it since: an acknowledgement never covers a priority the reader did not see."""
    by = request.query_params.get("by")
    if by is not None and (len(by) > 64 or not by.isprintable()):
        return error("invalid_parameter", "by: at most 64 printable characters (a reader's login, not a name)", 400)
    seen_text = request.query_params.get("priority")
    try:
        seen = None if seen_text == "none" else Priority(seen_text)
    except ValueError:
        return error("invalid_parameter", "priority: required, the study's priority as the reader saw it (STAT, "
                                          "URGENT, ROUTINE, or none for a study without a finding)", 400)
    service = _service()
    try:
        known = await service.in_thread(lambda: service.store.acknowledge(study_uid, by, seen=seen))
    except StoreError as exc:  # the compare-and-set failed: a finding raised the priority since
        return error("conflict", str(exc), 409)
    if not known:
        return error("not_found", f"no study {study_uid} on the worklist", 404)
    return JSONResponse({"study_uid": study_uid, "status": StudyStatus.REVIEWED.value,
                         "priority": None if seen is None else seen.value})


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
    if record.spool_path is None or not await service.in_thread(FilePath(record.spool_path).exists):
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


@router.get("/findings/{sop_uid}", summary="The stored finding of one instance (no mask image; RLE included)")
async def finding(sop_uid: str) -> Response:
    service = _service()
    found = await service.in_thread(service.store.finding, sop_uid)
    if found is None:
        return error("not_found", f"no finding for instance {sop_uid}", 404)
    study_uid, record = found
    body = _finding(record, service.results, study_uid)
    body["rle"] = record.rle
    body["study_uid"] = study_uid
    return JSONResponse(body)


@router.get("/results/{study_uid}/{sop_uid}/{name}", summary="A result object: SEG.dcm, SR.dcm, SC.dcm or overlay.png")
async def result_file(study_uid: str, sop_uid: str, name: str) -> Response:
    try:
        path = _service().results.path(study_uid, sop_uid, name)
    except ValueError as exc:
        return error("invalid_parameter", str(exc), 400)
    if not path.is_file():
        return error("not_found", f"no {name} for instance {sop_uid}", 404)
    media = "image/png" if name.endswith(".png") else "application/dicom"
    return FileResponse(path, media_type=media)
