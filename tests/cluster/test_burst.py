"""Issue 17 §5: a burst of C-STOREs across two listeners, with a listener and a triage replica killed mid-burst.

Real processes only (tests/cluster/harness.py): PostgreSQL, nginx in front of two triage replicas, two
listeners triaging through nginx, a real Orthanc sending the films (one synchronous store job per film, so each
film's acknowledgement is known) and receiving the SEG and SR. After a third of the films, SIGKILL to
listener-a's and triage-0's whole process trees; both are started again (same data folder and name) while the
burst goes on. Films whose C-STORE failed are sent again once listener-a is back. Then, bounded: every film in
the store once, done, with its finding, on the listener it was sent to; each film's SR (and SEG where positive)
in Orthanc exactly once, counted by SOP Instance UID and by the film it references; every delivery delivered;
the worklist through nginx complete and ordered by priority, then arrival. The figures are printed.

Run alone: `.venv/bin/python -m pytest tests/cluster -q -s` (docs/deploy.md, "Several listeners").
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from service.cascade.finding import Priority
from tests.cluster.films import (
    Film,
    SendLog,
    per_source,
    results_in,
    send,
    synthetic_studies,
    upload,
)
from tests.cluster.harness import Cluster, running_cluster, start_all

STUDIES, PER_STUDY = 55, 4  # 220 films; a study's films alternate between the listeners
KILL_AFTER = 70  # films handed to Orthanc before the kills: about a third of the burst
SETTLE_S = 150
RESEND_ROUNDS = 3
UID = re.compile(r"\d+(\.\d+){3,}")  # kept out of failure messages: errors are counted by what they say


def store_rows(database_url: str) -> dict[str, list[tuple[Any, ...]]]:
    """The store's rows the assertions need, read straight from PostgreSQL (what every replica reads)."""
    with psycopg.connect(database_url) as connection:
        return {
            "instances": connection.execute(
                "SELECT sop_uid, status, listener, error_code, outputs_due_at FROM instances").fetchall(),
            "findings": connection.execute("SELECT sop_uid, label, priority, rle FROM findings").fetchall(),
            "deliveries": connection.execute(
                "SELECT object_uid, kind, state, attempts, last_error, next_attempt_at FROM deliveries").fetchall(),
        }


def settled(rows: dict[str, list[tuple[Any, ...]]], acknowledged: set[str]) -> bool:
    """Every acknowledged film done with its outputs written, and every delivery out of the pending state."""
    status = {sop: (state, due) for sop, state, _, _, due in rows["instances"]}
    films_done = all(status.get(sop, ("", None)) == ("done", None) for sop in acknowledged)
    return films_done and all(state != "pending" for _, _, state, *_ in rows["deliveries"])


def kill_and_restart(cluster: Cluster, timings: dict[str, float]) -> threading.Thread:
    """SIGKILL triage-0 (once it has a film in hand) and listener-a; start both again in the background (nginx
    routed when they are up)."""
    listener, replica = cluster.listeners[0], cluster.triage[0]
    deadline = time.monotonic() + 5  # the replica dies with films in hand if it has any (502s to the listeners)
    while replica.metric("ptx_in_flight") < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    timings["killed"] = time.monotonic()
    replica.kill()
    listener.kill()

    def restart() -> None:
        start_all([listener, replica])
        cluster.route()
        timings["restarted"] = time.monotonic()

    thread = threading.Thread(target=restart, name="restart")
    thread.start()
    return thread


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_burst_across_two_listeners_survives_a_listener_and_a_replica_killed(tmp_path, postgres_server, capsys):
    payloads = synthetic_studies(tmp_path / "synth", STUDIES, PER_STUDY)
    with running_cluster(tmp_path, postgres_server.create_database()) as cluster:
        films = upload(cluster.orthanc, payloads, [listener.name for listener in cluster.listeners])
        by_sop: dict[str, Film] = {film.sop_uid: film for film in films}
        log, timings = SendLog(), {"start": time.monotonic()}
        restarting: list[threading.Thread] = []

        def before_each(number: int) -> None:
            if number == KILL_AFTER:
                restarting.append(kill_and_restart(cluster, timings))

        send(cluster.orthanc, films, log, before_each=before_each)
        timings["burst_sent"] = time.monotonic()
        (restart,) = restarting
        restart.join(timeout=240)
        assert not restart.is_alive() and "restarted" in timings, "the killed servers did not come back"
        failed_in_burst = len(log.failed)
        assert failed_in_burst, "no C-STORE failed while listener-a was down: the kill came too late in the burst"
        for _ in range(RESEND_ROUNDS):  # films whose C-STORE failed while listener-a was down, sent again
            again = log.take_failed()
            if not again:
                break
            send(cluster.orthanc, again, log)
        acknowledged = {film.sop_uid for film in log.acknowledged}
        assert acknowledged == set(by_sop), f"{len(set(by_sop) - acknowledged)} films never acknowledged"

        deadline = time.monotonic() + SETTLE_S
        rows = store_rows(cluster.database_url)
        while not settled(rows, acknowledged):
            assert time.monotonic() < deadline, f"not settled in {SETTLE_S} s: {summary(rows)}"
            time.sleep(1.0)
            rows = store_rows(cluster.database_url)
        timings["settled"] = time.monotonic()
        seg, sr = results_in(cluster.orthanc, "SEG"), results_in(cluster.orthanc, "SR")
        positive = {sop for sop, label, _, rle in rows["findings"] if label == "pneumothorax" and rle != "-1"}
        figures = {
            "films sent": len(films), "acknowledged": len(acknowledged),
            "failed during the kill, sent again": failed_in_burst, "Orthanc store calls": sum(log.attempts.values()),
            "triaged (findings)": len(rows["findings"]), "positive films": len(positive),
            "SEG in Orthanc": len(seg), "SR in Orthanc": len(sr),
            "duplicates": sum(n - 1 for objects in (seg, sr) for n in per_source(objects, acknowledged).values()),
            "lost": len(acknowledged - {sop for sop, *_ in rows["findings"]}),
            "deliveries attempted more than once": sum(1 for *_, attempts, _, _ in rows["deliveries"] if attempts > 1),
            **traffic(cluster), **{f"{name} s": round(timings[end] - timings[begin], 1) for name, begin, end in (
                ("burst sent in", "start", "burst_sent"), ("kill to both back in", "killed", "restarted"),
                ("wall time, burst to settled", "start", "settled"))},
        }
        with capsys.disabled():
            print("\nissue 17 §5 burst figures (listener-a's metrics count from its restart):")
            for name, value in figures.items():
                print(f"  {name}: {value}")

        # The store: each film once, done, with its finding, owned by the listener it was sent to.
        instances = Counter(sop for sop, *_ in rows["instances"])
        assert set(instances) == acknowledged and set(instances.values()) == {1}
        failed = Counter(code for _, state, _, code, _ in rows["instances"] if state != "done")
        assert not failed, f"films not done, by error code: {dict(failed)}"
        owners = {sop: listener for sop, _, listener, _, _ in rows["instances"]}
        assert all(owners[sop] == by_sop[sop].listener for sop in acknowledged), "a film owned by the wrong listener"
        findings = Counter(sop for sop, *_ in rows["findings"])
        assert set(findings) == acknowledged and set(findings.values()) == {1}, "a film without its one finding"
        assert positive and positive != acknowledged, "the burst needs both positive and negative films"
        assert figures["triage answers 200 via nginx"] >= len(acknowledged), "films triaged elsewhere than the replicas"

        # Every result object delivered; in Orthanc each film's SR, and its SEG where positive, exactly once.
        assert all(state == "delivered" for _, _, state, *_ in rows["deliveries"]), summary(rows)
        assert Counter(kind for _, kind, *_ in rows["deliveries"]) == Counter(SR=len(acknowledged), SEG=len(positive))
        for objects in (seg, sr):
            assert len({o.sop_uid for o in objects}) == len(objects)
            assert all(len(o.sources & acknowledged) == 1 for o in objects), "an object references several films"
        assert per_source(sr, acknowledged) == Counter(acknowledged), "each film's SR in Orthanc exactly once"
        assert per_source(seg, acknowledged) == Counter(positive), "each positive film's SEG in Orthanc exactly once"

        # The worklist through nginx: every study, triaged, at its best film's priority; priority then arrival.
        items = cluster.api("/v1/worklist?limit=500")["items"]
        assert len(items) == STUDIES and {i["study_uid"] for i in items} == {film.study_uid for film in films}
        assert {i["status"] for i in items} == {"triaged"}
        assert {i["study_uid"]: i["priority"] for i in items} == best_priorities(rows, by_sop)
        order = [(Priority(i["priority"]).rank, datetime.fromisoformat(i["received_at"])) for i in items]
        assert order == sorted(order), "the worklist is not ordered by priority, then arrival"


def traffic(cluster: Cluster) -> dict[str, float]:
    """Triage calls as nginx answered them, and the listeners' waits on busy or unreachable triage."""
    answered = cluster.nginx.requests()
    return {
        "triage answers 200 via nginx": answered[("POST", "/v1/triage", "200")],
        "triage answers 502/503/504 via nginx": sum(answered[("POST", "/v1/triage", s)] for s in ("502", "503", "504")),
        **{f"{outcome} retries (listeners' metrics)": sum(
            listener.metric("ptx_remote_triage_total", outcome=outcome) for listener in cluster.listeners)
           for outcome in ("busy", "unreachable")},
    }


def best_priorities(rows: dict[str, list[tuple[Any, ...]]], by_sop: dict[str, Film]) -> dict[str, str]:
    """Each study's highest priority among its films' findings: what its worklist entry must show."""
    best: dict[str, str] = {}
    for sop, _, priority, _ in rows["findings"]:
        study = by_sop[sop].study_uid
        if study not in best or Priority(priority).rank < Priority(best[study]).rank:
            best[study] = priority
    return best


def summary(rows: dict[str, list[tuple[Any, ...]]]) -> str:
    """Counts by state, and the commonest delivery errors: what a failure message needs (no UIDs)."""
    instances = Counter(state for _, state, *_ in rows["instances"])
    outputs_due = sum(1 for *_, due in rows["instances"] if due is not None)
    deliveries = Counter(state for _, _, state, *_ in rows["deliveries"])
    now = datetime.now(UTC)
    later = sum(1 for _, _, state, _, _, due in rows["deliveries"] if state == "pending" and _utc(due) > now)
    errors = Counter(UID.sub("<uid>", error) for _, _, _, _, error, _ in rows["deliveries"] if error)
    return (f"instances {dict(instances)}, outputs due {outputs_due}, deliveries {dict(deliveries)} "
            f"({later} pending due later: a claim's lease or a backoff holds them), "
            f"delivery errors {dict(errors.most_common(3))}")


def _utc(value: datetime | str | None) -> datetime:
    """A stored time as an aware UTC datetime (PostgreSQL gives datetimes); the earliest time when unset."""
    if value is None:
        return datetime.min.replace(tzinfo=UTC)
    value = datetime.fromisoformat(value) if isinstance(value, str) else value
    return value if value.tzinfo else value.replace(tzinfo=UTC)
