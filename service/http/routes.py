"""The triage API: `POST /v1/inspect`, `/v1/triage`, `/v1/triage/batch` (the worklist API is `worklist.py`).

Errors are JSON `{"error": {"code", "message"}}` (`answers.error_answer`): 400 not DICOM / bad parameter,
413 too large, 415 media type, 422 rejected radiograph (the imaging code), 503 overloaded, shutting down or
model out of service (with Retry-After), 500 a bug; 401 without the bearer token when one is configured
(`auth.py`). Each request is admitted (`ServedCascade.admitted`) before its body is read: a refused upload
costs no memory, and the refusal reaches the client whole (`lingering.py`).
The routes reach the running edge (`service.app.Triage`: its `cascade`, `settings`, `private`) through
BentoML's current service.
"""

from __future__ import annotations

import asyncio
from typing import Any

import bentoml
from fastapi import FastAPI, Query
from starlette.requests import Request
from starlette.responses import JSONResponse

from service.cascade.finding import Finding
from service.cascade.served import count_rejection
from service.http import bodies
from service.http.answers import ApiError, as_service_error, error_answer
from service.http.recording import record_http
from service.http.schemas import (
    BATCH_BODY,
    DICOM_BODY,
    ERRORS,
    BatchOut,
    TriageOut,
    error_content,
)
from service.http.worklist import router as worklist_router
from service.imaging.reader import read_radiograph

http = FastAPI(title="ptx-triage", version="1",
               description="Pneumothorax triage for chest radiographs: score, priority, mask, boxes, worklist.")
http.include_router(worklist_router)

MASK_QUERY = Query(None, description="mask in the answer: png (base64 PNG + RLE), rle (RLE only) or none; "
                                      "default from PTX_MASK_DEFAULT (png)")
BOOLEAN_QUERY = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
RECORD_QUERY = Query(None, description="put the film on the worklist: default PTX_RECORD_HTTP; false for a caller "
                                       "that records it itself (a DICOM listener's intake, PTX_TRIAGE_URL); true "
                                       "only where PTX_RECORD_HTTP is on")


def _edge() -> Any:
    """The running edge (`service.app.Triage`)."""
    return bentoml.get_current_service()


@http.post("/inspect", openapi_extra={"requestBody": DICOM_BODY}, responses=ERRORS,
           summary="Decode and validate a radiograph without triaging it")
async def inspect(request: Request) -> JSONResponse:
    """What the service makes of a file (UIDs, size, spacing, photometric, window, warnings), or its
    rejection with the code: a PACS team checks their exports with it."""
    edge = _edge()
    try:
        with edge.cascade.admitted():
            (_, payload), = await bodies.payloads(request, edge.settings, many=False)
            radiograph = await edge.cascade.in_thread(read_radiograph, payload, edge.cascade.flow.policy)
    except Exception as exc:  # noqa: BLE001 -- a bug answers our JSON 500, logged, never a traceback
        return error_answer(as_service_error(exc, "inspect",
                                             "the file could not be inspected (internal error, logged)"))
    return JSONResponse(edge.private(radiograph.metadata()))


@http.post("/triage", response_model=TriageOut, openapi_extra={"requestBody": DICOM_BODY}, responses=ERRORS,
           summary="Triage one chest radiograph")
async def triage(request: Request, mask: str | None = MASK_QUERY, record: str | None = RECORD_QUERY) -> JSONResponse:
    """Body: one DICOM file (application/dicom), a PNG, or a multipart `file` field. Answer: triage score,
    label at the operating point, priority, mask, SIIM RLE, instances with boxes in px and mm, timings.

    `record` (default PTX_RECORD_HTTP) puts the film on the worklist. A listener that triages over HTTP
    (PTX_TRIAGE_URL) sends `record=false`: it records the film itself, with its listener and spool file, and a
    replica recording HTTP films must not record it a second time. It can only turn recording off: `true` on a
    replica without PTX_RECORD_HTTP is a 400 (an operator chose not to put HTTP films on this worklist).
    A recorded film's notifications (PTX_NOTIFY_*) are queued as a C-STORE'd film's are, from its header
    (Accession Number; patient identifiers only where allowed); a failure to queue them answers 500 after the
    finding was recorded, and the client's retry queues them (the queue keeps one per study and priority)."""
    edge = _edge()
    try:
        mask_format = bodies.mask_format(mask, edge.settings)
        recording = _recording(record, edge.settings.record_http)
        notifying = recording and getattr(edge, "notifier", None) is not None
        with edge.cascade.admitted():
            (_, payload), = await bodies.payloads(request, edge.settings, many=False)
            finding = await edge.cascade.triage(payload, admit=False, keep_source=notifying)
        if recording:
            await edge.cascade.in_thread(record_http, edge.store, finding, payload)  # 409 on a reused SOP UID
        if notifying:
            await edge.notifier.notify_async(finding)
    except Exception as exc:  # noqa: BLE001 -- a bug must not take the service down or leak a traceback
        return error_answer(as_service_error(exc, "triage", "the film could not be triaged (internal error, logged)"))
    return JSONResponse(edge.private(finding.to_json(mask_format)))


def _recording(text: str | None, record_http: bool) -> bool:
    """Whether to record this film: PTX_RECORD_HTTP unless the query turns it off; ApiError for turning it on.
    Parsed here, not by FastAPI, so that a bad value gets our 400 `invalid_parameter`, not FastAPI's 422."""
    record = None if text is None else BOOLEAN_QUERY.get(text.strip().lower())
    if text is not None and record is None:
        raise ApiError(400, "invalid_parameter", f"record={text[:20]!r}; use true or false")
    if record and not record_http:
        raise ApiError(400, "invalid_parameter", "record=true needs PTX_RECORD_HTTP on this service; leave record "
                                                 "out or set it to false")
    return record_http if record is None else record


@http.post("/triage/batch", response_model=BatchOut, openapi_extra={"requestBody": BATCH_BODY}, responses=ERRORS,
           summary="Triage several radiographs in one request")
async def triage_batch(request: Request, mask: str | None = MASK_QUERY) -> JSONResponse:
    """Several films as multipart `file` fields: one result or error per file, in order. The films join the
    same adaptive batches as single requests."""
    edge = _edge()
    try:
        mask_format = bodies.mask_format(mask, edge.settings)
        with edge.cascade.admitted():  # one slot to read the body; the first film triages on it
            payloads = await bodies.payloads(request, edge.settings, many=True)
            outcomes = await asyncio.gather(*(edge.cascade.triage(payload, admit=n > 0)
                                              for n, (_, payload) in enumerate(payloads)), return_exceptions=True)
    except Exception as exc:  # noqa: BLE001
        return error_answer(as_service_error(exc, "triage", "the films could not be triaged (internal error, logged)"))
    results: list[dict[str, Any]] = []
    for (filename, _), outcome in zip(payloads, outcomes):
        if isinstance(outcome, Finding):
            item: dict[str, Any] = outcome.to_json(mask_format)
        else:
            refused = as_service_error(outcome, "triage in a batch", "the film could not be triaged (logged)")
            count_rejection(refused.code_text)
            item = error_content(refused.code_text, refused.message)
        results.append(edge.private({"filename": filename, **item}))
    return JSONResponse({"results": results})
