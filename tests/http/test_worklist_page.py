"""The reading room's pages (service/http/pages) on a real SQLite store, behind the real auth middleware.

The pages app is mounted at /worklist as service/app.py mounts it and wrapped in `auth.BearerAuth`, the
running edge stubbed with the store, results folder, settings and the bundled demo models (these tests are
about what the pages and the gate do with them; tests/browser runs the whole service in Chromium). Pure
rules (rows, viewer template, session cookie) are tested on plain values.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import types
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from service.cascade.finding import Priority
from service.http import auth
from service.http.pages import live, pages, session, views
from service.http.pages.rows import PAGE_SIZE, ListQuery, duration, study_row
from service.http.pages.viewer import ViewerUrlError, check_template, viewer_link
from service.models.model_set import resolve
from service.settings import load_settings
from service.store import (
    FindingRecord,
    ReceivedInstance,
    StudyStatus,
    open_store,
    utc_now,
)
from service.store.results_files import ResultsFolder

REVIEWER = "tok-reviewer-3f9c1e7d5b2a4c6e8f0a"
READER = "tok-readonly-0a1b2c3d4e5f60718293"
ORIGIN = {"origin": "http://testserver"}
VIEWER = "https://pacs.example/ohif/viewer?StudyInstanceUIDs={study_uid}"


def receive(store, study: str, sop: str, source: str = "dicom:TEST") -> None:
    store.receive(ReceivedInstance(sop_uid=sop, study_uid=study, series_uid=None, sop_class_uid=None,
                                   source=source, spool_path=None, received_at=utc_now()))


def found(store, sop: str, priority: Priority, score: float, area_mm2: float | None = None) -> None:
    boxes = [] if area_mm2 is None else [{"bbox_px": [1, 2, 30, 40], "bbox_mm": [0.1, 0.2, 3.0, 4.0],
                                          "area_px": 900, "area_mm2": area_mm2, "centroid_px": [10, 20]}]
    store.record_finding(FindingRecord(sop_uid=sop, score=score, label="pneumothorax", priority=priority,
                                       threshold=0.5, rle="", instances=boxes, models={"classifier": {
                                           "name": "ptx-classifier-demo", "version": "0.1.0", "backend": "ort"}},
                                       created_at=utc_now()))


@pytest.fixture
def room(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[types.SimpleNamespace]:
    """The pages behind BearerAuth with a reviewer's and a read-only token; a store with three studies."""
    store = open_store(None, tmp_path)
    results = ResultsFolder(tmp_path / "results")
    edge = types.SimpleNamespace(store=store, results=results, settings=types.SimpleNamespace(viewer_url=VIEWER),
                                 cascade=types.SimpleNamespace(flow=types.SimpleNamespace(
                                     models=resolve(load_settings(environ={})))))
    monkeypatch.setattr(views, "_service", lambda: edge)
    for study, priority, score in (("1.2.1", Priority.ROUTINE, 0.1), ("1.2.2", Priority.STAT, 0.97),
                                   ("1.2.3", None, None)):
        receive(store, study, f"{study}.1")
        if priority is not None:
            found(store, f"{study}.1", priority, score, area_mm2=1234.5 if priority is Priority.STAT else None)
    results.write("1.2.2", "1.2.2.1", "overlay.png", png(640, 480))
    config = auth.AuthConfig.from_tokens([REVIEWER, (READER, session.Role.READ_ONLY)])
    app = auth.BearerAuth(Starlette(routes=[Mount("/worklist", pages)]), config)
    with TestClient(app, base_url="http://testserver") as client:
        yield types.SimpleNamespace(client=client, store=store, results=results)
    store.close()


def png(width: int, height: int) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def sign_in(client: TestClient, token: str = REVIEWER, login: str = "dr.lee") -> str:
    """Through the form; returns the session's CSRF secret (from the page, as a browser would have it)."""
    answer = client.post("/worklist/login", data={"token": token, "reader": login, "next": "/worklist/"},
                         headers=ORIGIN, follow_redirects=False)
    assert answer.status_code == 303, answer.text
    page = client.get("/worklist/studies/1.2.2")
    found_secret = re.search(r'"X-CSRF-Token": "([^"]+)"', page.text)
    assert found_secret is not None
    return found_secret.group(1)


def study_order(html: str) -> list[str]:
    return re.findall(r'data-study="([^"]+)"', html)


# --------------------------------------------------------------------------------------------------------------
# Pure rules


def test_list_query_names_the_bad_parameter_and_round_trips() -> None:
    for params, message in (({"priority": "HIGH"}, "priority must be one of STAT"),
                            ({"status": "done"}, "status must be one of pending"),
                            ({"since": "yesterday"}, "since must be one of 1h"),
                            ({"page": "0"}, "page must be a whole number"), ({"page": "x"}, "page must be")):
        with pytest.raises(ValueError, match=message):
            ListQuery.parse(params)
    query = ListQuery.parse({"status": "triaged", "priority": "", "since": "8h", "page": "3"})
    assert (query.status, query.priority, query.offset) == (StudyStatus.TRIAGED, None, 2 * PAGE_SIZE)
    assert ListQuery.parse(dict(p.split("=") for p in query.params().split("&"))) == query
    assert query.params(page=1) == "status=triaged&since=8h"
    now = utc_now()
    assert query.since_time(now) == now - timedelta(hours=8)
    assert [duration(s) for s in (None, 0.42, 45, 125, 3 * 3600 + 300, 2 * 86400 + 4 * 3600)] == [
        "—", "0.4 s", "45 s", "2 min", "3 h 05 min", "2 d 4 h"]


def test_a_row_says_when_the_reading_room_was_told_and_which_overlay_stands_for_the_study(tmp_path: Path) -> None:
    with open_store(None, tmp_path) as store:
        receive(store, "1.2.9", "1.2.9.1")
        receive(store, "1.2.9", "1.2.9.2")
        found(store, "1.2.9.1", Priority.URGENT, 0.6, area_mm2=400.0)
        found(store, "1.2.9.2", Priority.STAT, 0.95, area_mm2=3100.0)
        study = store.study("1.2.9")
        receive(store, "1.2.8", "1.2.8.1", source="http")
        found(store, "1.2.8.1", Priority.URGENT, 0.6)
        over_http = store.study("1.2.8")
    row = study_row(study, lambda sop: sop == "1.2.9.2", viewer_link(VIEWER, "1.2.9"))
    stat = next(f for f in study.findings if f.priority is Priority.STAT)
    assert row.thumbnail_sop == "1.2.9.2" and row.instances == 2 and row.largest_mm2 == 3100.0
    assert row.notified_after_s == pytest.approx((stat.created_at - study.received_at).total_seconds())
    assert row.viewer_url == "https://pacs.example/ohif/viewer?StudyInstanceUIDs=1.2.9"
    waiting = study_row(study, lambda sop: False, None)  # a DICOM film: its overlay is being written
    assert (waiting.thumbnail_sop, waiting.thumbnail_ready) == ("1.2.9.2", False)
    assert study_row(over_http, lambda sop: False, None).thumbnail_sop is None  # HTTP triage makes no overlay


def test_the_viewer_template_is_checked_and_names_the_setting() -> None:
    for bad, why in (("https://pacs.example/viewer", "has no {study_uid}"),
                     ("https://x.example/{study_uid}/{series_uid}", "the only field"),
                     ("https://x.example/{study_uid!r}", "the only field"), ("ftp://x.example/{study_uid}", "http"),
                     ("pacs.example/{study_uid}", "http"), ("https:///{study_uid}", "names no host"),
                     ("https://x.example/{study_uid", "not a valid template")):
        with pytest.raises(ViewerUrlError, match="PTX_VIEWER_URL") as caught:
            check_template(bad)
        assert why in str(caught.value), (bad, str(caught.value))
    assert viewer_link(None, "1.2.3") is None
    assert viewer_link("/orthanc/ui/app/#/filtered-studies?StudyInstanceUID={study_uid}", "1.2.3").endswith("=1.2.3")
    assert viewer_link(VIEWER, "1.2&x=3") == "https://pacs.example/ohif/viewer?StudyInstanceUIDs=1.2%26x%3D3"


def test_a_session_cookie_is_only_what_this_service_signed_and_not_expired() -> None:
    config = auth.AuthConfig.from_tokens([REVIEWER, (READER, session.Role.READ_ONLY)])
    assert config.role_of(READER) is session.Role.READ_ONLY and config.role_of(REVIEWER) is session.Role.REVIEWER
    assert config.role_of(REVIEWER[:-1] + "x") is None and config.sign_in("") is None
    role, key = config.sign_in(READER)
    cookie = session.issue(key, "dr.lee", role, now=1000.0)
    reader = session.verify(cookie, config.session_keys, now=1000.0)
    assert reader is not None and (reader.login, reader.role, reader.may_review) == ("dr.lee", role, False)
    assert session.verify(cookie, config.session_keys, now=1000.0 + session.SESSION_S + 1) is None
    body, _, signature = cookie.partition(".")
    forged = session._b64(session._unb64(body).replace(b"read-only", b"reviewer"))
    assert session.verify(f"{forged}.{signature}", config.session_keys, now=1000.0) is None
    rotated = auth.AuthConfig.from_tokens([REVIEWER])  # the read-only token removed from the file
    assert session.verify(cookie, rotated.session_keys, now=1000.0) is None
    for target in ("https://evil.example/", "//evil.example/", "/worklist/\\evil", "/v1/worklist", None):
        assert session.safe_next(target) == "/worklist/"
    assert session.safe_next("/worklist/?status=triaged") == "/worklist/?status=triaged"


def test_token_file_roles(tmp_path: Path) -> None:
    file = tmp_path / "tokens"
    file.write_text(f"{REVIEWER}\n{READER} role=read-only\n")
    file.chmod(0o600)
    assert auth.read_token_entries(file) == [(REVIEWER, session.Role.REVIEWER), (READER, session.Role.READ_ONLY)]
    file.write_text(f"{READER} role=admin\n")
    with pytest.raises(auth.TokenError, match="role must be reviewer or read-only"):
        auth.read_token_entries(file)
    file.write_text(f"{READER} secret-second-half\n")
    with pytest.raises(auth.TokenError, match="unknown text after the token") as caught:
        auth.read_token_entries(file)
    assert "secret-second-half" not in str(caught.value) and READER not in str(caught.value)


# --------------------------------------------------------------------------------------------------------------
# The pages behind the gate


def test_a_person_signs_in_with_a_token_and_gets_a_strict_cookie(room) -> None:
    client = room.client
    first = client.get("/worklist/?status=triaged", headers={"accept": "text/html"}, follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"] == "/worklist/login?next=%2Fworklist%2F%3Fstatus" \
                                                                       "%3Dtriaged"
    assert client.get("/worklist/rows").status_code == 401  # a script or fragment: no redirect
    wrong = client.post("/worklist/login", data={"token": REVIEWER[:-1] + "x", "reader": "dr.lee"}, headers=ORIGIN)
    assert wrong.status_code == 401 and "that token is not accepted" in wrong.text and "set-cookie" not in wrong.headers
    assert REVIEWER[:-1] not in wrong.text and 'value="dr.lee"' in wrong.text  # the login kept, never the token
    nameless = client.post("/worklist/login", data={"token": REVIEWER, "reader": " "}, headers=ORIGIN)
    assert nameless.status_code == 400 and "your login is needed" in nameless.text
    answer = client.post("/worklist/login", data={"token": REVIEWER, "reader": "dr.lee",
                                                  "next": "/worklist/?status=triaged"},
                         headers=ORIGIN, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/worklist/?status=triaged"
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/worklist" in cookie
    assert "Secure" not in cookie  # plain http here
    page = client.get("/worklist/")
    assert page.status_code == 200 and "Signed in as <strong>dr.lee</strong>" in page.text
    assert client.post("/worklist/logout", headers=ORIGIN, follow_redirects=False).headers["set-cookie"].startswith(
        "ptx_session=;")
    proxied = client.post("/worklist/login", data={"token": REVIEWER, "reader": "dr.lee"},
                          headers={**ORIGIN, "x-forwarded-proto": "https"}, follow_redirects=False)
    assert "; Secure" in proxied.headers["set-cookie"]  # behind a proxy that terminated TLS


def test_the_worklist_page_lists_by_priority_with_its_facts_and_filters(room) -> None:
    client = room.client
    sign_in(client)
    page = client.get("/worklist/")
    assert study_order(page.text) == ["1.2.2", "1.2.1", "1.2.3"]  # STAT, ROUTINE, pending (with the routine)
    assert "Not for clinical use." in page.text and "ptx-classifier-demo 0.2.0" in page.text
    assert "1,234 mm²" in page.text and "StudyInstanceUIDs=1.2.2" in page.text
    assert 'src="/worklist/studies/1.2.2/1.2.2.1/thumbnail.png"' in page.text and 'data-version="' in page.text
    assert study_order(client.get("/worklist/?priority=STAT").text) == ["1.2.2"]
    assert study_order(client.get("/worklist/rows?status=pending").text) == ["1.2.3"]
    bad = client.get("/worklist/?since=yesterday")
    assert bad.status_code == 400 and "since must be one of 1h, 8h, 24h, 7d" in bad.text
    for index in range(PAGE_SIZE):
        receive(room.store, f"1.3.{index}", f"1.3.{index}.1")
    first, second = client.get("/worklist/").text, client.get("/worklist/?page=2").text
    assert 'rel="next"' in first and 'rel="prev"' in second and len(study_order(second)) == 3
    thumb = client.get("/worklist/studies/1.2.2/1.2.2.1/thumbnail.png")
    assert thumb.status_code == 200 and max(Image.open(__import__("io").BytesIO(thumb.content)).size) == 128
    assert client.get("/worklist/studies/1.2.2/1.2.2.1/SEG.dcm").status_code == 404
    assert client.get("/worklist/studies/1.2.2/..%2f..%2fetc/passwd").status_code in (400, 404)
    assert client.get("/worklist/studies/x/1.2/overlay.png").status_code == 400


def test_the_study_view_and_its_acknowledgement_follow_the_api_rule(room) -> None:
    client = room.client
    csrf = sign_in(client)
    view = client.get("/worklist/studies/1.2.1")
    assert view.status_code == 200 and 'name="priority" value="ROUTINE"' in view.text
    assert 'id="feedback"' in view.text and "ptx-classifier-demo 0.2.0" in view.text
    assert client.get("/worklist/studies/9.9.9").status_code == 404
    found_later = "1.2.1.2"
    receive(room.store, "1.2.1", found_later)
    found(room.store, found_later, Priority.STAT, 0.99, area_mm2=5000.0)  # raised after the page was drawn
    stale = client.post("/worklist/studies/1.2.1/ack", data={"priority": "ROUTINE", "csrf": csrf}, headers=ORIGIN)
    assert stale.status_code == 409 and "STAT" in stale.text and 'name="priority" value="STAT"' in stale.text
    assert room.store.study("1.2.1").status is StudyStatus.TRIAGED
    done = client.post("/worklist/studies/1.2.1/ack", data={"priority": "STAT", "csrf": csrf}, headers=ORIGIN,
                       follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == "/worklist/studies/1.2.1?notice=acknowledged"
    study = room.store.study("1.2.1")
    assert study.status is StudyStatus.REVIEWED and study.reviewed_by == "dr.lee"  # the session's login


def test_a_verdict_posts_with_the_acknowledgement_shows_on_the_study_view_and_can_change(room) -> None:
    """Issue 14 §3 on the page: the reader's verdict goes with the acknowledgement (the same priority rule),
    shows in the study's feedback list, and can be changed later (kept as history); counted once each."""
    from prometheus_client import REGISTRY

    def count(verdict: str) -> float:
        return REGISTRY.get_sample_value("ptx_reader_feedback_total", {"priority": "STAT", "verdict": verdict}) or 0

    client = room.client
    csrf = sign_in(client)
    before = count("disagree"), count("agree")
    view = client.get("/worklist/studies/1.2.2").text
    assert 'action="/worklist/studies/1.2.2/ack"' in view and "Acknowledge with my verdict" in view
    assert 'name="verdict" value="disagree"' in view and "No verdict yet." in view
    done = client.post("/worklist/studies/1.2.2/ack", data={"priority": "STAT", "verdict": "disagree", "csrf": csrf},
                       headers=ORIGIN, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == "/worklist/studies/1.2.2?notice=acknowledged"
    shown = client.get(done.headers["location"]).text
    assert "Acknowledged at STAT, your verdict:\n  Disagree." in shown
    assert 'data-reader="dr.lee" data-verdict="disagree"' in shown and "Record my verdict" in shown
    assert 'action="/worklist/studies/1.2.2/feedback"' in shown and 'value="disagree" required checked' in shown
    study = room.store.study("1.2.2")
    assert (study.status, study.reviewed_by) == (StudyStatus.REVIEWED, "dr.lee")
    changed = client.post("/worklist/studies/1.2.2/feedback", data={"priority": "STAT", "verdict": "agree",
                                                                     "csrf": csrf}, headers=ORIGIN)
    assert changed.status_code == 200 and "Your verdict on the STAT result is recorded:\n  Agree." in changed.text
    assert 'data-verdict="agree"' in changed.text and "1 earlier verdict, since" in changed.text
    assert (count("disagree"), count("agree")) == (before[0] + 1, before[1] + 1)
    assert [(f.verdict.value, f.current) for f in room.store.feedback(study_uid="1.2.2")] == [
        ("disagree", False), ("agree", True)]

    early = client.post("/worklist/studies/1.2.1/feedback", data={"priority": "ROUTINE", "verdict": "agree",
                                                                   "csrf": csrf}, headers=ORIGIN)
    assert early.status_code == 409 and "Not recorded" in early.text and "not reviewed yet" in early.text
    blank = client.post("/worklist/studies/1.2.2/feedback", data={"priority": "STAT", "csrf": csrf}, headers=ORIGIN)
    assert blank.status_code == 400 and "choose a verdict" in blank.text
    assert "No result yet to give a verdict on." in client.get("/worklist/studies/1.2.3").text
    pending = client.post("/worklist/studies/1.2.3/ack", data={"priority": "none", "verdict": "agree", "csrf": csrf},
                          headers=ORIGIN)
    assert pending.status_code == 400 and "no result to give a verdict on" in pending.text
    assert room.store.study("1.2.3").status is StudyStatus.PENDING and room.store.feedback(study_uid="1.2.1") == []


def test_a_verdict_needs_a_reader_with_a_login_and_the_reviewer_role(room) -> None:
    client = room.client
    proxied = client.post("/worklist/studies/1.2.2/ack", data={"priority": "STAT", "verdict": "agree"},
                          headers={**ORIGIN, "authorization": f"Bearer {REVIEWER}"})  # a proxy's token: nobody
    assert proxied.status_code == 400 and "sign in with your login" in proxied.text
    assert room.store.study("1.2.2").status is StudyStatus.TRIAGED
    sign_in(client, READER, "student")
    view = client.get("/worklist/studies/1.2.2").text
    assert 'id="feedback"' in view and 'name="verdict"' not in view
    refused = client.post("/worklist/studies/1.2.2/feedback", data={"priority": "STAT", "verdict": "agree"},
                          headers=ORIGIN)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "read_only"
    app = auth.BearerAuth(Starlette(routes=[Mount("/worklist", pages)]), None)
    with TestClient(app, base_url="http://testserver") as open_client:  # no token: the form asks for the login
        assert 'id="verdict-reader" name="reader"' in open_client.get("/worklist/studies/1.2.2").text
        nameless = open_client.post("/worklist/studies/1.2.2/ack", data={"priority": "STAT", "verdict": "agree"},
                                    headers=ORIGIN)
        assert nameless.status_code == 400 and "sign in with your login" in nameless.text
        named = open_client.post("/worklist/studies/1.2.2/ack", data={"priority": "STAT", "verdict": "agree",
                                                                       "reader": "dr.lee"}, headers=ORIGIN)
        assert named.status_code == 200 and 'data-reader="dr.lee" data-verdict="agree"' in named.text
    assert room.store.feedback()[0].reader == "dr.lee"


def test_posts_need_this_origin_and_the_session_secret_and_read_only_may_only_look(room) -> None:
    client = room.client
    csrf = sign_in(client)
    for headers, data in (({"origin": "https://evil.example"}, {"priority": "STAT", "csrf": csrf}),
                          ({"referer": "https://evil.example/x"}, {"priority": "STAT", "csrf": csrf}),
                          ({}, {"priority": "STAT", "csrf": csrf})):
        refused = client.post("/worklist/studies/1.2.2/ack", data=data, headers=headers)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "cross_origin"
    wrong_secret = client.post("/worklist/studies/1.2.2/ack", data={"priority": "STAT", "csrf": "x" * 32},
                               headers=ORIGIN)
    assert wrong_secret.status_code == 403 and "does not match your session" in wrong_secret.text
    via_header = client.post("/worklist/studies/1.2.2/ack", data={"priority": "STAT"},
                             headers={**ORIGIN, "x-csrf-token": csrf}, follow_redirects=False)
    assert via_header.status_code == 303  # htmx sends the secret as a header
    client.cookies.clear()
    sign_in(client, READER, "student")
    view = client.get("/worklist/studies/1.2.1")
    assert view.status_code == 200 and "read-only" in view.text and "Acknowledge at" not in view.text
    refused = client.post("/worklist/studies/1.2.1/ack", data={"priority": "ROUTINE"}, headers=ORIGIN)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "read_only"


def test_without_a_token_the_pages_are_open_as_the_api_is_and_still_check_the_origin(room) -> None:
    """No token configured (a loopback-only service, or PTX_ALLOW_ANONYMOUS): nobody signs in; the study view
    asks for the reader's login with the acknowledgement; a POST from another site is still refused."""
    app = auth.BearerAuth(Starlette(routes=[Mount("/worklist", pages)]), None)
    with TestClient(app, base_url="http://testserver") as client:
        assert study_order(client.get("/worklist/").text) == ["1.2.2", "1.2.1", "1.2.3"]
        assert client.get("/worklist/login", follow_redirects=False).headers["location"] == "/worklist/"
        view = client.get("/worklist/studies/1.2.2")
        assert 'name="reader"' in view.text and 'name="csrf"' not in view.text
        assert client.post("/worklist/studies/1.2.2/ack", data={"priority": "STAT", "reader": "dr.lee"},
                           headers={"origin": "https://evil.example"}).status_code == 403
        done = client.post("/worklist/studies/1.2.2/ack", data={"priority": "STAT", "reader": "dr.lee"},
                           headers=ORIGIN, follow_redirects=False)
        assert done.status_code == 303 and room.store.study("1.2.2").reviewed_by == "dr.lee"


def test_read_only_tokens_may_not_change_anything_through_the_api_either() -> None:
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def ok(_: object) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/v1/studies/1.2/ack", ok, methods=["GET", "POST"])])
    config = auth.AuthConfig.from_tokens([REVIEWER, (READER, session.Role.READ_ONLY)])
    with TestClient(auth.BearerAuth(app, config)) as client:  # type: ignore[arg-type]
        read_only = {"Authorization": f"Bearer {READER}"}
        assert client.get("/v1/studies/1.2/ack", headers=read_only).status_code == 200
        refused = client.post("/v1/studies/1.2/ack", headers=read_only)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "read_only"
        assert client.post("/v1/studies/1.2/ack", headers={"Authorization": f"Bearer {REVIEWER}"}).status_code == 200


# --------------------------------------------------------------------------------------------------------------
# Live updates


def events(lines: Iterator[str]) -> Iterator[dict]:
    import json

    for line in lines:
        if line.startswith("data: "):
            yield json.loads(line.removeprefix("data: "))


def test_the_event_stream_says_when_the_page_changed_and_names_a_new_stat(room, monkeypatch) -> None:
    monkeypatch.setattr(live, "HUB", live.LiveHub(poll_s=0.05))
    client = room.client
    sign_in(client)
    shown = re.search(r'data-version="([^"]+)"', client.get("/worklist/").text).group(1)
    with client.stream("GET", f"/worklist/events?v={shown}") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        receive(room.store, "1.2.4", "1.2.4.1")  # a new study (pending): the page changed, no STAT yet
        first = next(events(lines))
        assert first["stat"] == [] and first["version"] != shown
        found(room.store, "1.2.4.1", Priority.STAT, 0.99)  # upgraded to STAT
        second = next(events(lines))
        assert second["stat"] == ["1.2.4"] and second["stat_count"] == 1
    rows = client.get("/worklist/rows")
    assert study_order(rows.text)[:2] == ["1.2.2", "1.2.4"] and second["version"] in rows.text


def test_the_live_poll_runs_the_page_queries_only_when_the_store_changed() -> None:
    """The change token first: an unchanged token (and no page joined) skips the page queries; a moved one,
    a page that joins, or FULL_EVERY_S passed runs them. The store's side is tests/store's token test."""
    calls: list[str] = []
    token = ["t1"]

    async def version(view: object) -> str:
        calls.append("version")
        return "v"

    async def no_stat() -> frozenset[str]:
        calls.append("stat")
        return frozenset()

    async def changed() -> str:
        return token[0]

    async def scenario() -> list[int]:
        hub = live.LiveHub(poll_s=3600, full_every_s=3600)
        hub.stream("a", "v", version, no_stat, changed)
        await asyncio.sleep(0.05)  # the poller's first poll: in full
        seen = [len(calls)]
        await hub.poll_once()  # nothing written since
        seen.append(len(calls))
        token[0] = "t2"
        await hub.poll_once()
        seen.append(len(calls))
        hub.stream("b", "v", version, no_stat, changed)  # a page opened: its view is compared at once
        await hub.poll_once()
        seen.append(len(calls))
        await hub.poll_once()
        seen.append(len(calls))
        hub.close()
        always = live.LiveHub(poll_s=3600, full_every_s=0.0)  # "last hour" views: compared in full now and then
        always.stream("a", "v", version, no_stat, changed)
        await asyncio.sleep(0.05)
        await always.poll_once()  # the token has not moved, the full-compare interval has passed
        seen.append(len(calls))
        always.close()
        return seen

    assert asyncio.run(asyncio.wait_for(scenario(), timeout=10)) == [2, 2, 4, 7, 7, 11]


def test_streams_are_bounded_and_end_on_shutdown(room, monkeypatch) -> None:
    hub = live.LiveHub(poll_s=0.05, max_streams=1, heartbeat_s=0.05)
    monkeypatch.setattr(live, "HUB", hub)
    client = room.client
    sign_in(client)
    with client.stream("GET", "/worklist/events") as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith(":")) == ": keep-alive"
        busy = client.get("/worklist/events")
        assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
        hub.close()
        assert list(lines)[-1:] in ([], [""])  # the stream ended by itself
    assert hub.open_streams == 0


def test_a_sigterm_ends_open_streams_and_reaches_the_previous_handler(room) -> None:
    """uvicorn waits for open responses before its lifespan shutdown: the hook must end them on the signal."""
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda number, frame: seen.append(number))
    hub = live.LiveHub(poll_s=0.05)

    async def version(_: object) -> str:
        return "v"

    async def no_stat() -> frozenset[str]:
        return frozenset()

    async def scenario() -> list[bytes]:
        chunks = [chunk async for chunk in _after(hub.stream("view", "v", version, no_stat), 0.1)]
        return chunks

    async def _after(stream, delay: float):
        asyncio.get_running_loop().call_later(delay, os.kill, os.getpid(), signal.SIGTERM)
        async for chunk in stream:
            yield chunk

    try:
        chunks = asyncio.run(asyncio.wait_for(scenario(), timeout=10))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert chunks == [b"retry: 1000\n\n"] and seen == [signal.SIGTERM] and hub.open_streams == 0


def test_the_study_view_lists_its_notifications_and_their_states(room) -> None:
    """Issue 14 §1: the study view shows the pushed notifications (channel, priority, state, attempts, error),
    never what the message said."""
    from service.store import NotificationChannel, utc_now

    client = room.client
    sign_in(client)
    assert "Nothing pushed" in client.get("/worklist/studies/1.2.2").text
    payload = '{"sop_uid": "1.2.2.1", "text": "SECRET-PAYLOAD"}'
    sent = room.store.add_notification("1.2.2", NotificationChannel.HL7, Priority.STAT, payload)
    failing = room.store.add_notification("1.2.2", NotificationChannel.WEBHOOK, Priority.STAT, payload,
                                          max_attempts=3)
    room.store.notification_attempt(sent, ok=True)
    room.store.notification_attempt(failing, ok=False, error="HTTP 503 Service Unavailable", next_attempt_at=utc_now())
    view = client.get("/worklist/studies/1.2.2").text
    section = view[view.index('id="notifications-h"'):view.index('id="instances-h"')]
    assert "<td>HL7</td>" in section and "<td>Sent</td>" in section
    assert "<td>Webhook</td>" in section and "<td>Pending</td>" in section and "1 of 3" in section
    assert "HTTP 503 Service Unavailable" in section and "SECRET-PAYLOAD" not in view
