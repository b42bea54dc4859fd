"""The worklist API through a real server, fed over HTTP (PTX_RECORD_HTTP): order, filters, pages, review."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from service.cascade.finding import Priority
from tests.http.test_app_triage import metrics_text, post, sample
from tests.servers import bento_server
from training.__main__ import main as training_main


def get(base: str, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{base}{path}", timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def fed(tmp_path_factory, realdata):
    root = tmp_path_factory.mktemp("worklist")
    assert training_main(["synth", "--out", str(root / "synth"), "--count", "8", "--seed", "31", "--prevalence",
                          "0.5", "--size", "512", "--uncompressed", "--quiet"]) == 0
    films = sorted((root / "synth" / "dicom").glob("*.dcm"))
    env = {"PTX_DATA_DIR": str(root / "data"), "PTX_RECORD_HTTP": "true"}
    with bento_server(root / "server.log", env=env) as base:
        answers = []
        for path in films:
            status, answer, _ = post(f"{base}/v1/triage?mask=rle", path.read_bytes(), "application/dicom")
            assert status == 200
            answers.append(answer)
        yield base, answers


def test_worklist_orders_by_priority_then_arrival(fed):
    base, answers = fed
    status, body = get(base, "/v1/worklist")
    assert status == 200 and body["next_offset"] is None
    items = body["items"]
    assert {i["study_uid"] for i in items} == {a["study_uid"] for a in answers}
    expected = sorted(answers, key=lambda a: Priority(a["priority"]).rank)  # stable: arrival order kept
    assert [i["study_uid"] for i in items] == [a["study_uid"] for a in expected]
    assert all(i["status"] == "triaged" for i in items)


def test_filters_pages_and_bad_parameters(fed):
    base, answers = fed
    routine = [a["study_uid"] for a in answers if a["priority"] == "ROUTINE"]
    _, body = get(base, "/v1/worklist?priority=ROUTINE")
    assert [i["study_uid"] for i in body["items"]] == routine
    _, first = get(base, "/v1/worklist?limit=3")
    _, second = get(base, f"/v1/worklist?limit=3&offset={first['next_offset']}")
    _, whole = get(base, "/v1/worklist")
    assert [i["study_uid"] for i in first["items"] + second["items"]] == [i["study_uid"] for i in whole["items"]][:6]
    _, future = get(base, "/v1/worklist?since=2999-01-01T00:00:00%2B00:00")
    assert future["items"] == []
    for query in ("priority=HIGH", "status=done", "limit=0", "since=yesterday", "since=2026-01-01T00:00:00"):
        status, error = get(base, f"/v1/worklist?{query}")
        assert (status, error["error"]["code"]) == (400, "invalid_parameter"), query


def test_study_finding_and_review(fed):
    base, answers = fed
    answer = answers[0]
    status, study = get(base, f"/v1/studies/{answer['study_uid']}")
    assert status == 200 and study["instances"][0]["sop_uid"] == answer["sop_uid"]
    status, finding = get(base, study["findings"][0]["links"]["finding"])
    assert status == 200 and finding["rle"] == answer["rle"] and finding["score"] == pytest.approx(answer["score"])
    request = urllib.request.Request(  # with the reader's verdict (issue 14 §3)
        f"{base}/v1/studies/{answer['study_uid']}/ack?by=reader1&priority={study['priority']}&verdict=disagree",
        method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        acked = json.loads(response.read())
    assert (acked["status"], acked["verdict"]["verdict"], acked["verdict"]["sop_uid"]) == (
        "reviewed", "disagree", answer["sop_uid"])
    _, reviewed = get(base, "/v1/worklist?status=reviewed")
    assert [i["study_uid"] for i in reviewed["items"]] == [answer["study_uid"]]
    with urllib.request.urlopen(f"{base}/v1/feedback?format=csv", timeout=30) as response:
        exported = response.read().decode()
    assert exported.splitlines()[1].split(",")[1:4] == [answer["study_uid"], answer["sop_uid"], study["priority"]]
    counted = sample(metrics_text(base), "ptx_reader_feedback_total", priority=study["priority"], verdict="disagree")
    assert counted == 1.0  # from whichever edge worker took the request (multiprocess collection)
    assert get(base, "/v1/studies/1.2.3.4")[0] == 404
    assert get(base, "/v1/findings/1.2.3.4")[0] == 404
    for path in (f"{answer['study_uid']}/{answer['sop_uid']}/passwd", f"{answer['study_uid']}/..%2e/SEG.dcm",
                 f"x{answer['study_uid']}/{answer['sop_uid']}/SR.dcm"):
        status, error = get(base, f"/v1/results/{path}")
        assert (status, error["error"]["code"]) == (400, "invalid_parameter"), path
    status, error = get(base, f"/v1/results/{answer['study_uid']}/{answer['sop_uid']}/SEG.dcm")
    assert status == 404  # HTTP triage makes no DICOM results (the PACS path does)


@pytest.fixture
def api_on_store(tmp_path, monkeypatch):
    """The worklist API's router on a real SQLite store, the edge around it stubbed (these tests are about
    how store outcomes map to answers; the real service runs the retries elsewhere): (client, store)."""
    from service.store import open_store
    from service.store.results_files import ResultsFolder
    from tests.http.worklist_router import router_client

    with open_store(None, tmp_path) as store:
        yield router_client(monkeypatch, store, ResultsFolder(tmp_path / "results")), store


def test_retrying_a_delivery_answers_its_state_or_names_the_conflict(api_on_store):
    """tests/pacs/test_pacs_unreachable.py retries a delivery through the real service."""
    from service.store import DeliveryKind, ReceivedInstance, utc_now

    client, store = api_on_store
    store.receive(ReceivedInstance(sop_uid="1.2.3.4", study_uid="1.2.3", series_uid=None, sop_class_uid=None,
                                   source="test", spool_path=None, received_at=utc_now()))
    failed = store.add_delivery("1.2.3", "1.2.3.9", DeliveryKind.SR, "pacs", "/x/SR.dcm", max_attempts=1)
    store.delivery_attempt(failed, ok=False, error="refused", next_attempt_at=utc_now())
    answer = client.post(f"/v1/deliveries/{failed}/retry")
    assert answer.status_code == 200
    body = answer.json()
    assert (body["id"], body["state"], body["attempts"], body["last_error"]) == (failed, "pending", 0, "refused")
    again = client.post(f"/v1/deliveries/{failed}/retry")
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
    assert "pending" in again.json()["error"]["message"]
    unknown = client.post(f"/v1/deliveries/{failed + 1}/retry")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    for bad in ("x", "0", str(2**63)):
        assert client.post(f"/v1/deliveries/{bad}/retry").status_code == 422  # FastAPI's check of the path


def test_retrying_an_instance_answers_its_state_or_why_not(api_on_store, tmp_path):
    """With real spool files; tests/pacs/test_dicom_listener.py runs a retried instance through the intake."""
    from service.store import InstanceStatus, ReceivedInstance, utc_now

    client, store = api_on_store
    kept, gone = tmp_path / "1.2.3.1.dcm", tmp_path / "1.2.3.2.dcm"
    kept.write_bytes(b"DICM")
    for sop_uid, path in (("1.2.3.1", kept), ("1.2.3.2", gone)):
        store.receive(ReceivedInstance(sop_uid=sop_uid, study_uid="1.2.3", series_uid=None, sop_class_uid=None,
                                       source="dicom:TEST", spool_path=str(path), received_at=utc_now()))
        store.mark_instance(sop_uid, InstanceStatus.FAILED, "internal_error")
    answer = client.post("/v1/instances/1.2.3.1/retry")
    assert answer.status_code == 200
    assert answer.json() == {"sop_uid": "1.2.3.1", "study_uid": "1.2.3", "status": "received", "attempts": 0}
    again = client.post("/v1/instances/1.2.3.1/retry")
    assert again.status_code == 409 and "only a failed instance" in again.json()["error"]["message"]
    lost = client.post("/v1/instances/1.2.3.2/retry")
    assert lost.status_code == 409 and "spooled bytes are gone" in lost.json()["error"]["message"]
    status = {i.sop_uid: (i.status, i.error_code) for i in store.study("1.2.3").instances}
    assert status["1.2.3.2"] == (InstanceStatus.FAILED, "spool_missing")
    assert client.post("/v1/instances/1.2.3.404/retry").status_code == 404


def test_an_ack_is_refused_when_the_priority_changed_since_the_reader_saw_it(api_on_store):
    """Issue 13 §5 through the router: the ack carries the priority the study JSON showed; a STAT finding
    recorded in between makes it 409 `conflict` naming STAT, and the study stays triaged. Before: 200."""
    from service.store import FindingRecord, ReceivedInstance, utc_now

    client, store = api_on_store
    for sop_uid in ("1.2.3.1", "1.2.3.2"):
        store.receive(ReceivedInstance(sop_uid=sop_uid, study_uid="1.2.3", series_uid=None, sop_class_uid=None,
                                       source="test", spool_path=None, received_at=utc_now()))

    def found(sop_uid: str, priority: Priority, score: float) -> None:
        store.record_finding(FindingRecord(sop_uid=sop_uid, score=score, label="pneumothorax", priority=priority,
                                           threshold=0.5, rle="", instances=[], models={}, created_at=utc_now()))

    missing = client.post("/v1/studies/1.2.3/ack")  # no priority: nothing is acknowledged blind
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "invalid_parameter"
    assert "priority" in missing.json()["error"]["message"]
    assert client.post("/v1/studies/1.2.3/ack?priority=HIGH").status_code == 400
    found("1.2.3.1", Priority.ROUTINE, 0.1)
    seen = client.get("/v1/studies/1.2.3").json()["priority"]
    assert seen == "ROUTINE"
    found("1.2.3.2", Priority.STAT, 0.95)  # a second film, after the reader opened the study
    stale = client.post(f"/v1/studies/1.2.3/ack?priority={seen}&by=reader1")
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "conflict"
    assert "changed since" in stale.json()["error"]["message"] and "STAT" in stale.json()["error"]["message"]
    assert client.get("/v1/studies/1.2.3").json()["status"] == "triaged"
    fresh = client.post("/v1/studies/1.2.3/ack?priority=STAT&by=reader1")
    assert fresh.status_code == 200 and fresh.json() == {"study_uid": "1.2.3", "status": "reviewed",
                                                         "priority": "STAT"}
    assert client.post("/v1/studies/9.9.9/ack?priority=none").status_code == 404
    store.receive(ReceivedInstance(sop_uid="1.2.4.1", study_uid="1.2.4", series_uid=None, sop_class_uid=None,
                                   source="test", spool_path=None, received_at=utc_now()))
    assert client.get("/v1/studies/1.2.4").json()["priority"] is None
    assert client.post("/v1/studies/1.2.4/ack?priority=none").status_code == 200  # pending: seen without a finding


def test_the_study_answer_shows_notifications_and_outputs_and_a_failed_notification_can_be_retried(api_on_store):
    """Issue 14 §5 ("visible per study") and issue 13 §9 (outputs pending visible in the study answer)."""
    from datetime import timedelta

    from service.cascade.finding import Priority
    from service.store import (
        FindingRecord,
        NotificationChannel,
        ReceivedInstance,
        utc_now,
    )

    client, store = api_on_store
    store.receive(ReceivedInstance(sop_uid="1.2.3.4", study_uid="1.2.3", series_uid=None, sop_class_uid=None,
                                   source="dicom:TEST", spool_path="/x/1.2.3.4.dcm", received_at=utc_now()))
    store.record_finding(FindingRecord(sop_uid="1.2.3.4", score=0.97, label="pneumothorax", priority=Priority.STAT,
                                       threshold=0.5, rle="1 2", instances=[], models={}, created_at=utc_now()))
    due = utc_now() + timedelta(seconds=60)
    store.defer_outputs("1.2.3.4", due)
    sent = store.add_notification("1.2.3", NotificationChannel.HL7, Priority.STAT, '{"sop_uid": "1.2.3.4"}',
                                  max_attempts=1)
    failed = store.add_notification("1.2.3", NotificationChannel.WEBHOOK, Priority.STAT, '{"sop_uid": "1.2.3.4"}',
                                    max_attempts=1)
    store.notification_attempt(sent, ok=True)
    store.notification_attempt(failed, ok=False, error="HTTP 503 Service Unavailable", next_attempt_at=utc_now())
    body = client.get("/v1/studies/1.2.3").json()
    (instance,) = body["instances"]
    assert (instance["status"], instance["outputs_attempts"]) == ("outputs_pending", 1)
    assert instance["outputs_due_at"] == due.isoformat()
    states = {n["channel"]: (n["state"], n["priority"], n["attempts"]) for n in body["notifications"]}
    assert states == {"hl7": ("sent", "STAT", 1), "webhook": ("failed", "STAT", 1)}
    assert all("payload" not in n for n in body["notifications"])  # what the message says stays in the outbox
    retried = client.post(f"/v1/notifications/{failed}/retry")
    assert retried.status_code == 200 and (retried.json()["state"], retried.json()["attempts"]) == ("pending", 0)
    assert client.post(f"/v1/notifications/{sent}/retry").status_code == 409  # sent: nothing to retry
    assert client.post(f"/v1/notifications/{failed + 99}/retry").status_code == 404
