"""Readers' verdicts through the API (issue 14 §3): the worklist router on a real SQLite store.

The running edge is stubbed with the store (these tests are about how the store's outcomes become answers,
counts and exports); tests/http/test_api_worklist.py gives a verdict to a real `bentoml serve`, and
tests/test_observability.py has Prometheus scrape its count.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from starlette.testclient import TestClient

from service.cascade.finding import Priority
from service.http.pages import verdicts
from service.store import (
    FeedbackRecord,
    FindingRecord,
    ReceivedInstance,
    ResultsStore,
    open_store,
    utc_now,
)
from service.store.results_files import ResultsFolder
from tests.http.worklist_router import router_client

MODELS = {"classifier": {"name": "ptx-classifier-demo", "version": "0.1.0", "backend": "onnxruntime-cpu"}}


def receive(store: ResultsStore, study: str, sop: str) -> None:
    store.receive(ReceivedInstance(sop_uid=sop, study_uid=study, series_uid=None, sop_class_uid=None,
                                   source="dicom:TEST", spool_path=None, received_at=utc_now()))


def found(store: ResultsStore, sop: str, priority: Priority, score: float) -> None:
    store.record_finding(FindingRecord(sop_uid=sop, score=score, label="pneumothorax", priority=priority,
                                       threshold=0.5, rle="", instances=[], models=MODELS, created_at=utc_now()))


def counted(priority: str, verdict: str) -> float:
    return REGISTRY.get_sample_value("ptx_reader_feedback_total", {"priority": priority, "verdict": verdict}) or 0.0


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient, ResultsStore]]:
    with open_store(None, tmp_path) as store:
        client = router_client(monkeypatch, store, ResultsFolder(tmp_path / "results"))
        receive(store, "1.2.3", "1.2.3.1")
        found(store, "1.2.3.1", Priority.URGENT, 0.7)
        yield client, store


def test_a_verdict_goes_with_the_ack_is_counted_once_and_never_covers_a_raised_priority(api) -> None:
    client, store = api
    before = counted("URGENT", "disagree"), counted("STAT", "disagree")
    receive(store, "1.2.3", "1.2.3.2")
    found(store, "1.2.3.2", Priority.STAT, 0.96)  # raised after the reader saw URGENT
    stale = client.post("/v1/studies/1.2.3/ack?priority=URGENT&by=dr.lee&verdict=disagree")
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "conflict"
    assert "now STAT" in stale.json()["error"]["message"] and store.feedback() == []
    assert client.get("/v1/studies/1.2.3").json()["status"] == "triaged"
    done = client.post("/v1/studies/1.2.3/ack?priority=STAT&by=dr.lee&verdict=disagree")
    assert done.status_code == 200
    body = done.json()
    assert (body["status"], body["priority"], body["recorded"]) == ("reviewed", "STAT", True)
    assert {k: body["verdict"][k] for k in ("sop_uid", "priority", "score", "verdict", "reader", "superseded_at")} \
        == {"sop_uid": "1.2.3.2", "priority": "STAT", "score": 0.96, "verdict": "disagree", "reader": "dr.lee",
            "superseded_at": None}
    again = client.post("/v1/studies/1.2.3/ack?priority=STAT&by=dr.lee&verdict=disagree")  # a retried request
    assert again.status_code == 200 and again.json()["recorded"] is False
    assert (counted("URGENT", "disagree"), counted("STAT", "disagree")) == (before[0], before[1] + 1)
    study = client.get("/v1/studies/1.2.3").json()
    assert (study["status"], [f["verdict"] for f in study["feedback"]]) == ("reviewed", ["disagree"])


def test_a_later_verdict_needs_a_reviewed_study_and_supersedes_the_reader_s_own(api) -> None:
    client, store = api
    early = client.post("/v1/studies/1.2.3/feedback?priority=URGENT&by=dr.kim&verdict=agree")
    assert early.status_code == 409 and "not reviewed yet" in early.json()["error"]["message"]
    assert client.post("/v1/studies/1.2.3/ack?priority=URGENT&by=dr.lee").status_code == 200  # no verdict
    before = counted("URGENT", "agree")
    later = client.post("/v1/studies/1.2.3/feedback?priority=URGENT&by=dr.kim&verdict=agree")
    assert later.status_code == 200 and later.json()["recorded"] is True and "status" not in later.json()
    changed = client.post("/v1/studies/1.2.3/feedback?priority=URGENT&by=dr.kim&verdict=uncertain")
    assert changed.status_code == 200 and counted("URGENT", "agree") == before + 1
    history = client.get("/v1/studies/1.2.3").json()["feedback"]
    assert [(f["reader"], f["verdict"], f["superseded_at"] is None) for f in history] == [
        ("dr.kim", "agree", False), ("dr.kim", "uncertain", True)]
    assert store.study("1.2.3").reviewed_by == "dr.lee", "a later verdict does not take over the review"
    assert client.post("/v1/studies/9.9/feedback?priority=URGENT&by=dr.kim&verdict=agree").status_code == 404


@pytest.mark.parametrize(("path", "message"), [
    ("ack?priority=URGENT&verdict=agree", "by: a verdict needs the reader's login"),
    ("ack?priority=URGENT&by=dr.lee&verdict=maybe", "verdict must be one of agree, disagree, uncertain"),
    ("ack?priority=none&by=dr.lee&verdict=agree", "a study without a finding (none) has no result"),
    ("feedback?priority=URGENT&by=dr.lee", "verdict: required, one of agree, disagree, uncertain"),
    ("feedback?by=dr.lee&verdict=agree", "priority: required"),
    ("feedback?priority=URGENT&by=dr%0Alee&verdict=agree", "by: reader: a login of at most 64 printable"),
])
def test_a_verdict_the_api_cannot_keep_is_a_400_naming_the_parameter(api, path: str, message: str) -> None:
    client, store = api
    answer = client.post(f"/v1/studies/1.2.3/{path}")
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_parameter", answer.json()
    assert message in answer.json()["error"]["message"]
    assert store.feedback() == [] and store.study("1.2.3").status.value == "triaged"


def test_the_audit_export_pages_through_every_verdict_as_json_or_csv(api) -> None:
    client, store = api
    for n in range(2, 5):
        receive(store, f"1.5.{n}", f"1.5.{n}.1")
        found(store, f"1.5.{n}.1", Priority.STAT, 0.9 + n / 100)
        assert client.post(f"/v1/studies/1.5.{n}/ack?priority=STAT&by=dr.lee&verdict=agree").status_code == 200
    client.post("/v1/studies/1.5.4/feedback?priority=STAT&by=dr.lee&verdict=disagree")
    client.post("/v1/studies/1.5.4/feedback?priority=STAT&by=%3D1%2B1&verdict=uncertain")  # login "=1+1"
    whole = client.get("/v1/feedback").json()
    assert [(i["study_uid"], i["verdict"]) for i in whole["items"]] == [
        ("1.5.2", "agree"), ("1.5.3", "agree"), ("1.5.4", "agree"), ("1.5.4", "disagree"), ("1.5.4", "uncertain")]
    assert whole["next_after"] is None and whole["items"][2]["superseded_at"] is not None
    first = client.get("/v1/feedback?limit=2").json()
    rest = client.get(f"/v1/feedback?after={first['next_after']}").json()
    assert [i["id"] for i in first["items"] + rest["items"]] == [i["id"] for i in whole["items"]]
    assert client.get("/v1/feedback?since=2999-01-01T00:00:00%2B00:00").json()["items"] == []

    answer = client.get("/v1/feedback?format=csv&limit=4")
    assert answer.headers["content-type"].startswith("text/csv") and answer.headers["x-next-after"] == str(
        whole["items"][3]["id"])
    assert "attachment" in answer.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(answer.text)))
    assert list(rows[0]) == list(verdicts.CSV_FIELDS) and len(rows) == 4
    assert rows[0]["models"] == "classifier=ptx-classifier-demo 0.1.0" and rows[0]["score"] == "0.92"
    last = list(csv.DictReader(io.StringIO(client.get(f"/v1/feedback?format=csv&after={rows[-1]['id']}").text)))
    assert last[0]["reader"] == "'=1+1", "a login a spreadsheet would run as a formula is quoted"
    for query in ("since=yesterday", "since=2026-01-01T00:00:00", "limit=0", "limit=10001", "after=-1",
                  f"after={2**31}", "format=xml", "since=0001-01-01T00:00:00%2B14:00"):
        bad = client.get(f"/v1/feedback?{query}")
        assert (bad.status_code, bad.json()["error"]["code"]) == (400, "invalid_parameter"), query


def test_a_since_utc_cannot_hold_is_a_400_not_a_500(api) -> None:
    """0001-01-01T00:00+14:00 is a valid ISO 8601 time before year 1 in UTC: converting it overflowed (500)."""
    client, _ = api
    for edge in ("0001-01-01T00:00:00%2B14:00", "9999-12-31T23:59:59-14:00"):
        answer = client.get(f"/v1/worklist?since={edge}")
        assert answer.status_code == 400 and "since is out of range" in answer.json()["error"]["message"], edge


def test_the_csv_names_the_model_versions_and_keeps_formulas_inert() -> None:
    record = FeedbackRecord(id=1, study_uid="1.2", sop_uid="1.2.1", reader="@SUM(A1)", verdict=verdicts.Verdict.AGREE,
                            priority=Priority.STAT, score=0.97, models={**MODELS, "segmenter": {
                                "name": "ptx-segmenter-demo", "version": "0.2.0"}}, created_at=utc_now(),
                            superseded_at=None)
    (row,) = list(csv.DictReader(io.StringIO(verdicts.as_csv([record]))))
    assert row["models"] == "classifier=ptx-classifier-demo 0.1.0; segmenter=ptx-segmenter-demo 0.2.0"
    assert row["reader"] == "'@SUM(A1)" and row["superseded_at"] == ""
    assert verdicts.parse_verdict("") is None and verdicts.parse_verdict("agree") is verdicts.Verdict.AGREE
