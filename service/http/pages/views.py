"""The reading room's routes: the worklist page, its rows and event stream, a study, its images and files.

    GET  /worklist/                          the worklist (filters and page in the query string)
    GET  /worklist/rows?…                    its rows alone (what the page fetches when the stream says so)
    GET  /worklist/events?…&v=               server-sent events (live.py)
    GET  /worklist/studies/{study}           one study: overlay, findings, boxes, models, deliveries, review
    POST /worklist/studies/{study}/ack       acknowledge at the priority shown (the API's rule: 409 if raised),
                                             with the reader's verdict where one is chosen (verdicts.py)
    POST /worklist/studies/{study}/feedback  a verdict on a study already reviewed (the same priority rule)
    GET  /worklist/studies/{study}/{sop}/{name}   overlay.png, thumbnail.png, SEG.dcm, SR.dcm, SC.dcm
    GET  /worklist/login · POST /worklist/login   the sign-in form (gate.py does the signing in)

Who may call is settled before a request gets here (`gate.PageGate`); the reader is `scope["ptx.reader"]`.
Store work runs in threads of the pages' own small limiter, not the triage's decode threads: a burst of
films must not hold back the page that shows them. Nothing here shows a patient name or ID (the store keeps
none); UIDs are shown where a reader needs them to find the study elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio
import bentoml
from fastapi import APIRouter, Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.templating import Jinja2Templates

from service.cascade.finding import Priority
from service.http.pages import live, session, verdicts
from service.http.pages.rows import (
    PAGE_SIZE,
    SINCE_LABEL,
    ListQuery,
    StudyRow,
    duration,
    priority_finding,
    study_row,
    version,
)
from service.http.pages.thumbnails import thumbnail
from service.http.pages.viewer import viewer_link
from service.store import NotFoundError, StoreError, StudyStatus, Verdict, utc_now
from service.store.base import ResultsStore, WorklistItem
from service.store.results_files import RESULT_FILES, NotShared, ResultsFolder

router = APIRouter()
templates = Jinja2Templates(directory=Path(__file__).with_name("templates"))
templates.env.filters["duration"] = duration
log = logging.getLogger("ptx.pages")

STAT_WATCH = 200  # unreviewed STAT studies the live cue compares (more at once would be a disaster anyway)
STORE_THREADS = 4
T = TypeVar("T")
_limiter: anyio.CapacityLimiter | None = None


def _service() -> Any:
    """The running edge (`service.app.Triage`): its `store`, `results`, `settings` and `cascade`."""
    return bentoml.get_current_service()


async def _in_thread(function: Callable[[], T]) -> T:
    global _limiter
    if _limiter is None:
        _limiter = anyio.CapacityLimiter(STORE_THREADS)
    return await anyio.to_thread.run_sync(function, limiter=_limiter)


def not_for_clinical_use(intended_use: str) -> bool:
    """A manifest's intended use that rules out clinical use (the demo models' says so in these words)."""
    text = intended_use.lower()
    return "not for clinical use" in text or text.startswith("demo")


def _models(service: Any) -> list[dict[str, Any]]:
    """The serving models (name, version, intended use) for the banner and the study page."""
    return [{"role": entry.role, "name": entry.manifest.name, "version": entry.manifest.version,
             "intended_use": entry.manifest.intended_use,
             "demo": not_for_clinical_use(entry.manifest.intended_use)}
            for entry in service.cascade.flow.models.entries()]


def _page_items(store: ResultsStore, query: ListQuery) -> list[WorklistItem]:
    """The page's studies plus one (whether a next page exists): the same query for page and live view."""
    return store.worklist(query.status, query.priority, query.since_time(utc_now()), PAGE_SIZE + 1, query.offset)


def _has_overlay(results: ResultsFolder, study_uid: str) -> Callable[[str], bool]:
    """Whether an instance has its overlay PNG here or in the database (blocking: called in `_in_thread`)."""
    def has(sop_uid: str) -> bool:
        try:
            return results.has(study_uid, sop_uid, "overlay.png")
        except ValueError:  # not a DICOM UID (an HTTP-recorded film may carry anything): no file of ours
            return False
    return has


def _listing(service: Any, query: ListQuery) -> tuple[list[StudyRow], str, bool]:
    items = _page_items(service.store, query)
    template = service.settings.viewer_url
    rows = []
    studies = service.store.studies([item.study_uid for item in items[:PAGE_SIZE]])  # one read for the page
    for item in items[:PAGE_SIZE]:
        study = studies.get(item.study_uid)
        if study is not None:  # removed between the two reads (retention): left out of this page
            rows.append(study_row(study, _has_overlay(service.results, study.study_uid),
                                  viewer_link(template, study.study_uid)))
    return rows, version(items), len(items) > PAGE_SIZE


def _context(request: Request, **values: Any) -> dict[str, Any]:
    reader: session.Reader | None = request.scope.get("ptx.reader")
    auth_on = bool(request.scope.get("ptx.auth_on"))
    return {"base": request.scope.get("root_path", ""), "reader": reader, "auth_on": auth_on,
            "may_review": not auth_on or (reader is not None and reader.may_review),
            "csrf": None if reader is None else reader.csrf, "now": utc_now(), **values}


def _page(request: Request, name: str, status: int = 200, **values: Any) -> Response:
    service = _service()
    models = _models(service)
    response = templates.TemplateResponse(request, name, _context(request, models=models, **values),
                                          status_code=status)
    response.headers["Cache-Control"] = "no-store"  # worklists are not cached by browsers or proxies
    return response


def _problem(request: Request, status: int, title: str, message: str) -> Response:
    return _page(request, "problem.html", status, title=title, message=message)


def _query(request: Request) -> ListQuery | Response:
    try:
        return ListQuery.parse(request.query_params)
    except ValueError as exc:
        return _problem(request, 400, "This worklist filter is not valid", str(exc))


async def _listed(request: Request, name: str, **values: Any) -> Response:
    """`name` rendered with the page of studies the request's filters select (400 for a bad filter)."""
    query = _query(request)
    if isinstance(query, Response):
        return query
    service = _service()
    rows, shown, more = await _in_thread(lambda: _listing(service, query))
    return _page(request, name, query=query, rows=rows, version=shown, more=more, **values)


@router.get("/", include_in_schema=False)
async def worklist_page(request: Request) -> Response:
    return await _listed(request, "worklist.html", statuses=list(StudyStatus), priorities=list(Priority),
                         since_choices=SINCE_LABEL)


@router.get("/rows", include_in_schema=False)
async def worklist_rows(request: Request) -> Response:
    return await _listed(request, "rows.html")


@router.get("/events", include_in_schema=False)
async def worklist_events(request: Request) -> Response:
    query = _query(request)
    if isinstance(query, Response):
        return query
    store = _service().store

    async def page_version(view: ListQuery) -> str:
        return await _in_thread(lambda: version(_page_items(store, view)))

    async def unreviewed_stat() -> frozenset[str]:
        items = await _in_thread(lambda: store.worklist(StudyStatus.TRIAGED, Priority.STAT, None, STAT_WATCH, 0))
        return frozenset(item.study_uid for item in items)

    async def latest_change() -> str:
        return await _in_thread(store.latest_change)

    try:
        events = live.HUB.stream(query, request.query_params.get("v", ""), page_version, unreviewed_stat,
                                 latest_change)
    except live.Busy as exc:
        return JSONResponse({"error": {"code": "busy", "message": f"{exc}; the page retries by itself"}},
                            status_code=503, headers={"Retry-After": "5"})
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def _study_view(service: Any, study_uid: str) -> dict[str, Any] | None:
    study = service.store.study(study_uid)
    if study is None:
        return None
    deliveries = service.store.deliveries(study_uid=study_uid)
    notifications = service.store.notifications(study_uid=study_uid)  # states only: the payload is not shown
    has_overlay = _has_overlay(service.results, study_uid)
    findings = []
    for record in sorted(study.findings, key=lambda f: (f.priority.rank, -f.score)):
        try:
            files = service.results.present(study_uid, record.sop_uid)
        except ValueError:
            files = []
        findings.append({"record": record, "files": [(name, RESULT_FILES[name]) for name in files],
                         "overlay": has_overlay(record.sop_uid)})
    row = study_row(study, has_overlay, viewer_link(service.settings.viewer_url, study_uid))
    best = priority_finding(study.findings)
    given = service.store.feedback(study_uid=study_uid)
    current = verdicts.current_by_reader(given)
    return {"study": study, "row": row, "findings": findings, "deliveries": deliveries, "notifications": notifications,
            "seen": "none" if study.priority is None else study.priority.value,
            "main_sop": None if best is None else best.sop_uid, "verdicts": current,
            "history": len(given) - len(current), "verdict_choices": list(Verdict),
            "verdict_label": verdicts.VERDICT_LABEL}


@router.get("/studies/{study_uid}", include_in_schema=False)
async def study_page(request: Request, study_uid: str) -> Response:
    service = _service()
    view = await _in_thread(lambda: _study_view(service, study_uid))
    if view is None:
        return _problem(request, 404, "No such study", f"no study {study_uid} on the worklist")
    reader: session.Reader | None = request.scope.get("ptx.reader")
    mine = next((v for v in view["verdicts"] if reader is not None and v.reader == reader.login), None)
    return _page(request, "study.html", **view, mine=mine, notice=request.query_params.get("notice"))


async def _form(request: Request) -> Mapping[str, str]:
    form = await request.form(max_files=0, max_fields=20)
    return {name: value for name, value in form.items() if isinstance(value, str)}


@router.post("/studies/{study_uid}/ack", include_in_schema=False)
async def acknowledge(request: Request, study_uid: str) -> Response:
    """The API's acknowledgement (store.acknowledge) from the study page: at the priority the page showed,
    with the reader's verdict where the feedback form chose one (store.give_feedback, one transaction)."""
    return await _review(request, study_uid, acknowledge=True)


@router.post("/studies/{study_uid}/feedback", include_in_schema=False)
async def give_feedback(request: Request, study_uid: str) -> Response:
    """A verdict on a study already reviewed, at the priority the page showed (a second reader, a changed
    mind): the reader's earlier verdict is kept as history."""
    return await _review(request, study_uid, acknowledge=False)


async def _review(request: Request, study_uid: str, acknowledge: bool) -> Response:
    form = await _form(request)
    reader: session.Reader | None = request.scope.get("ptx.reader")
    if not session.csrf_matches(reader, form.get(session.CSRF_FIELD) or request.headers.get(session.CSRF_HEADER)):
        return _problem(request, 403, "This form has expired", "the form's session token does not match your "
                                                               "session: open the study again and resend")
    seen_text = form.get("priority", "")
    try:
        try:
            seen = None if seen_text == "none" else Priority(seen_text)
        except ValueError:
            raise ValueError("priority must be STAT, URGENT, ROUTINE or none (the page's hidden field)") from None
        by = reader.login if reader is not None and reader.login else (
            session.check_login(form["reader"]) if form.get("reader") else None)
        verdict = verdicts.parse_verdict(form.get("verdict"))
        if verdict is None and not acknowledge:
            raise ValueError("choose a verdict: agree, disagree or uncertain")
        if verdict is not None and by is None:
            raise ValueError("a verdict is kept per reader: sign in with your login (a token sent by a proxy "
                             "names nobody)")
        if verdict is not None and seen is None:
            raise ValueError("a study without a finding has no result to give a verdict on")
    except ValueError as exc:
        title = "The acknowledgement is not valid" if acknowledge else "The verdict is not valid"
        return _problem(request, 400, title, str(exc))
    service = _service()
    try:
        if verdict is None:
            known = await _in_thread(lambda: service.store.acknowledge(study_uid, by, seen=seen))
        else:
            verdicts.counted(await _in_thread(lambda: service.store.give_feedback(
                study_uid, by, verdict, seen=seen, acknowledge=acknowledge)))
            known = True
    except NotFoundError:
        known = False
    except StoreError as exc:  # a finding raised the priority since the page was drawn, or not reviewed yet
        view = await _in_thread(lambda: _study_view(service, study_uid))
        return _page(request, "study.html", 409, **(view or {}), conflict=str(exc), conflict_ack=acknowledge)
    if not known:
        return _problem(request, 404, "No such study", f"no study {study_uid} on the worklist")
    log.info("study %s from the worklist page at priority %s", "acknowledged" if acknowledge else "given a verdict",
             seen_text)
    notice = "acknowledged" if acknowledge else "verdict"
    base = request.scope.get("root_path", "")
    return RedirectResponse(f"{base}/studies/{study_uid}?notice={notice}", status_code=303)


@router.get("/studies/{study_uid}/{sop_uid}/{name}", include_in_schema=False)
async def study_file(study_uid: str, sop_uid: str, name: str) -> Response:
    """A result file of one instance, or the worklist thumbnail of its overlay: this replica's file, else the
    database's copy (made by another replica; a thumbnail's overlay is copied here once, for the cache)."""
    results: ResultsFolder = _service().results
    source = "overlay.png" if name == "thumbnail.png" else name
    try:
        path = results.path(study_uid, sop_uid, source)
    except ValueError as exc:
        return JSONResponse({"error": {"code": "invalid_parameter", "message": str(exc)}}, status_code=400)
    cache = {"Cache-Control": "private, max-age=3600"}
    media = "image/png" if name.endswith(".png") else "application/dicom"
    try:
        if name == "thumbnail.png":
            data = await _in_thread(lambda: thumbnail(results.local_copy(path)))
        elif path.is_file():
            return FileResponse(path, media_type=media, headers=cache)
        else:
            data = await _in_thread(lambda: results.read(study_uid, sop_uid, source))
    except NotShared as exc:
        return JSONResponse({"error": {"code": "not_on_this_replica", "message": str(exc)}}, status_code=404)
    except FileNotFoundError:
        return JSONResponse({"error": {"code": "not_found", "message": f"no {name} for instance {sop_uid}"}},
                            status_code=404)
    return Response(data, media_type=media, headers=cache)


@router.get("/login", include_in_schema=False)
async def login_page(request: Request) -> Response:
    if not request.scope.get("ptx.auth_on"):
        return RedirectResponse(f"{request.scope.get('root_path', '')}/", status_code=303)
    return _page(request, "login.html", next=session.safe_next(request.query_params.get("next")), reader_name="")


@router.post("/login", include_in_schema=False)
async def login_refused(request: Request) -> Response:
    """Reached only when the gate refused a sign-in (its reason in the scope), or with authentication off."""
    refused: tuple[int, str] | None = request.scope.get("ptx.sign_in_error")
    if refused is None:
        return RedirectResponse(f"{request.scope.get('root_path', '')}/", status_code=303)
    form = await _form(request)
    status, message = refused
    return _page(request, "login.html", status, error=message, next=session.safe_next(form.get("next")),
                 reader_name=form.get("reader", ""))


def iso(value: datetime | None) -> str:
    return "" if value is None else value.isoformat(timespec="seconds")


def mm2(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f} mm²"


templates.env.filters.update(iso=iso, mm2=mm2)
