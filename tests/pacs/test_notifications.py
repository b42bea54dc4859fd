"""Pushed notifications (issue 14 §5, §6): HL7 v2.5.1 ORU^R01 over MLLP to a RIS and a signed JSON webhook,
through the store's outbox, against real receivers started here.

The RIS is hl7apy's MLLP server (threads, on a loopback port) answering each message with an ACK that hl7apy
builds (AA, AR, AE as the test asks, always with free text of its own in MSA-3); the webhook receiver is the
standard library's HTTP server checking each request's signature and replay window with `verify`, and again
with its own HMAC. The store is SQLite in a temporary folder (both databases run tests/store/test_store.py).
One test goes the whole way: a C-STORE to the PACS side, triaged by the service's flow in-process, pushed.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import http.server
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import numpy as np
import pydicom
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message
from prometheus_client import REGISTRY

from service.cascade.finding import Finding, Priority
from service.imaging.reader import Film, read_film
from service.pacs import side
from service.pacs.delivery import Backoff
from service.pacs.notify import (
    FilmIdentifiers,
    IdentifierFiles,
    MllpAddress,
    MllpSender,
    NotificationContent,
    Notifier,
    NotifySettingsError,
    SignatureError,
    WebhookSender,
    check_settings,
    sign,
    verify,
)
from service.pacs.notify.content import PatientIdentity
from service.pacs.notify.hl7 import oru_r01
from service.settings import load_settings
from service.store import (
    FindingRecord,
    NotificationChannel,
    NotificationState,
    ReceivedInstance,
    ResultsStore,
    open_store,
)
from service.store.results_files import ResultsFolder
from tests.pacs.test_dicom_listener import InProcessTriage
from tests.pacs.test_parse_once import send
from tests.realdata import CHEST
from tests.servers import free_port

SECRET = b"webhook-test-secret-" + b"7f" * 16
PEER_TEXT = "RECEIVER-FREE-TEXT-4711"  # what a receiver says in its own words: never stored nor logged
PATIENT_ID, FAMILY, GIVEN, ACCESSION = "MRN-PHI-90210", "Phiname", "Secretta", "ACC-PHI-77"
FAST = Backoff(base_s=0.1, factor=2.0, max_s=0.4, jitter=0.0)


# --- the receivers --------------------------------------------------------------------------------------------

class Ris:
    """A RIS's HL7 listener: hl7apy's MLLP server answering every ORU^R01 with an ACK built by hl7apy. MSA-1
    comes from `answers` in turn (the last one repeats), MSA-2 echoes the message's control ID unless
    `wrong_control_id`, MSA-3 is PEER_TEXT. `acked_at` maps each control ID to when its ACK was made."""

    def __init__(self, port: int | None = None, answers: tuple[str, ...] = ("AA",),
                 wrong_control_id: bool = False) -> None:
        self.port = port or free_port()
        self.answers, self.wrong_control_id = list(answers), wrong_control_id
        self.received: list[str] = []
        self.acked_at: dict[str, float] = {}
        self._lock = threading.Lock()
        self._server: MLLPServer | None = None

    def __enter__(self) -> Self:
        ris = self

        class Handler(AbstractHandler):
            def reply(self) -> str:
                return ris.answer(self.incoming_message)

        self._server = MLLPServer("127.0.0.1", self.port, {"ORU^R01^ORU_R01": (Handler,)}, timeout=10)
        threading.Thread(target=self._server.serve_forever, daemon=True, name="test-ris").start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def answer(self, text: str) -> str:
        incoming = parse_message(text, find_groups=False)
        control_id = incoming.msh.msh_10.value
        with self._lock:
            self.received.append(text)
            code = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        ack = Message("ACK", version="2.5.1")
        ack.msh.msh_3 = "RIS"
        ack.msh.msh_9 = "ACK^R01^ACK"
        ack.msh.msh_10 = f"ACK{len(self.received)}"
        ack.msh.msh_11 = "P"
        ack.msa.msa_1 = code
        ack.msa.msa_2 = "SOMETHING-ELSE" if self.wrong_control_id else control_id
        ack.msa.msa_3 = PEER_TEXT
        self.acked_at[control_id] = time.time()
        return ack.to_mllp()

    @property
    def address(self) -> MllpAddress:
        return MllpAddress("127.0.0.1", self.port)


class Receiver:
    """A webhook receiver: checks each POST with `verify` and with its own HMAC, answers from `answers` in
    turn (the last repeats) with PEER_TEXT in the body; 401 for a request that fails the checks."""

    def __init__(self, port: int | None = None, answers: tuple[int, ...] = (200,)) -> None:
        self.port = port or free_port()
        self.answers = list(answers)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.refused: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = dict(self.headers.items())
                try:
                    stamp = verify(SECRET, headers, body)
                    expected = hmac.new(SECRET, f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
                    assert headers["X-PTX-Signature"] == f"sha256={expected}"
                except (SignatureError, AssertionError) as error:
                    owner.refused.append(str(error))
                    status = 401
                else:
                    owner.requests.append((headers, body))
                    status = owner.answers.pop(0) if len(owner.answers) > 1 else owner.answers[0]
                reply = f"refused: {PEER_TEXT}".encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(reply)))
                if status == 503:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd: http.server.ThreadingHTTPServer | None = None
        self._handler = Handler

    def __enter__(self) -> Self:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), self._handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True, name="test-webhook").start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.httpd is not None
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/ptx"


def until(check: Callable[[], Any], what: str, timeout_s: float = 30.0) -> Any:
    """`check()`'s first truthy value; fails naming `what` after `timeout_s` (a wait, not a timing check)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# --- findings on a real film's header -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def film(realdata: Path) -> Film:
    """A real chest film read by the service, its header given known patient values (to look for in logs)."""
    read = read_film(realdata / CHEST[0].path)
    assert read.header is not None
    header = copy.deepcopy(read.header)
    header.PatientID, header.PatientName, header.AccessionNumber = PATIENT_ID, f"{FAMILY}^{GIVEN}", ACCESSION
    header.IssuerOfPatientID = "HOSPITAL-A"
    return Film(read.radiograph, header)


def found(film: Film, study: str, sop: str, priority: Priority, score: float = 0.95) -> Finding:
    return Finding(study_uid=study, series_uid=f"{study}.1", sop_uid=sop, score=score,
                   positive=priority is not Priority.ROUTINE, priority=priority, threshold=0.5,
                   mask=np.zeros((4, 4), dtype=bool), rle="", instances=[],
                   models={"classifier": {"name": "ptx-cls", "version": "3"},
                           "segmenter": {"name": "ptx-seg", "version": "5"}}, source=film)


def record(store: ResultsStore, finding: Finding) -> None:
    """What the intake does before its hook: the instance received and its finding recorded."""
    assert finding.sop_uid is not None and finding.study_uid is not None
    now = datetime.now(UTC)
    store.receive(ReceivedInstance(sop_uid=finding.sop_uid, study_uid=finding.study_uid, series_uid=None,
                                   sop_class_uid=None, source="dicom:TEST", spool_path=None, received_at=now))
    store.record_finding(FindingRecord.from_finding(finding, now))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ResultsStore]:
    with open_store(None, tmp_path) as opened:
        yield opened


@pytest.fixture
def files(tmp_path: Path) -> IdentifierFiles:
    return IdentifierFiles(ResultsFolder(tmp_path / "results"))


def notifier(store: ResultsStore, files: IdentifierFiles, ris: Ris | None = None, receiver: Receiver | None = None, *,
             patient_ids: bool = False, max_attempts: int = 24, outcomes: list[tuple[str, str]] | None = None,
             clock: Callable[[], float] = time.time) -> Notifier:
    senders: dict[str, Any] = {}
    if ris is not None:
        senders["hl7"] = MllpSender(ris.address, sending_facility="PTXTEST", identifiers=files.read,
                                    connect_timeout_s=2, timeout_s=5)
    if receiver is not None:
        senders["webhook"] = WebhookSender(receiver.url, SECRET, identifiers=files.read, connect_timeout_s=2,
                                           timeout_s=5, clock=clock)
    return Notifier(store, files, senders, priorities={Priority.STAT, Priority.URGENT}, patient_ids=patient_ids,
                    backoff=FAST, max_attempts=max_attempts, poll_interval_s=0.1,
                    on_outcome=None if outcomes is None else lambda channel, outcome: outcomes.append((channel,
                                                                                                       outcome)))


def settled(store: ResultsStore, study: str, count: int) -> list[Any]:
    rows = store.notifications(study)
    return rows if len(rows) == count and all(r.state is not NotificationState.PENDING for r in rows) else []


# --- the message ----------------------------------------------------------------------------------------------

def test_the_oru_r01_validates_as_v2_5_1_and_carries_the_result(film: Film) -> None:
    """hl7apy reads our message back strictly as ORU_R01 v2.5.1: result status preliminary, priority in TQ1,
    score, finding text, Accession Number, Study Instance UID, software and model versions; a '^' or '|' in
    a value is escaped, not taken as a separator."""
    odd = copy.deepcopy(film.header)
    odd.PatientName = "O|Brien^Se&n"
    content = NotificationContent.from_finding(found(film, "1.2.3.4", "1.2.3.4.5", Priority.STAT, 0.9731),
                                               datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC))
    identifiers = FilmIdentifiers.from_header(odd, patient_ids=True)
    text = oru_r01(content, identifiers, sending_facility="PTXTRIAGE", now=datetime(2030, 1, 2, 3, 4, 6, tzinfo=UTC))
    message = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT)
    assert message.validate()
    segments = {line.split("|", 1)[0]: line for line in text.split("\r") if line}
    assert segments["MSH"].startswith("MSH|^~\\&|PTX-TRIAGE|PTXTRIAGE|||20300102030406+0000||ORU^R01^ORU_R01|"
                                      f"{content.control_id}|P|2.5.1")
    assert message.msh.msh_12.to_er7() == "2.5.1" and len(content.control_id) <= 20
    assert message.sft.sft_3.to_er7() == "ptx-triage"
    result = message.oru_r01_patient_result
    pid = result.oru_r01_patient.pid
    assert pid.pid_3.to_er7() == f"{PATIENT_ID}^^^HOSPITAL-A"
    assert pid.pid_5.to_er7() == "O\\F\\Brien^Se\\T\\n"  # escaped: one family name, one given name
    order = result.oru_r01_order_observation
    assert order.obr.obr_3.to_er7() == ACCESSION and order.obr.obr_25.to_er7() == "P"
    assert order.oru_r01_timing_qty.tq1.tq1_9.to_er7() == "S^Stat^HL70485"
    observations = {obx.obx_3.to_er7(): (obx.obx_5.to_er7(), obx.obx_11.to_er7())
                    for obx in (group.obx for group in order.oru_r01_observation)}
    assert observations["PTX-SCORE^Pneumothorax score^L"] == ("0.9731", "P")
    assert observations["PTX-PRIORITY^Triage priority^L"] == ("STAT", "P")
    assert observations["110180^Study Instance UID^DCM"] == ("1.2.3.4", "P")
    assert observations["PTX-FINDING^AI triage finding^L"][0].startswith(
        "AI triage: pneumothorax suspected (score 0.973)")
    models = [obx.obx_5.to_er7() for obx in (g.obx for g in order.oru_r01_observation)
              if "PTX-MODEL" in obx.obx_3.to_er7()]
    assert models == ["classifier: ptx-cls 3", "segmenter: ptx-seg 5"]


def test_invalid_film_identifiers_are_left_out_never_shortened(film: Film) -> None:
    """As in our DICOM results: a 56-character Accession Number (SH holds 16) or one with a control character
    is not sent at all; without the setting there is no patient identity, and without a header nothing."""
    content = NotificationContent.from_finding(found(film, "1.2", "1.2.1", Priority.STAT), datetime.now(UTC))
    for bad in ("A" * 56, "ACC\r4711", ["ACC1", "ACC2"]):
        header = copy.deepcopy(film.header)
        header.AccessionNumber = bad
        identifiers = FilmIdentifiers.from_header(header, patient_ids=True)
        assert identifiers.accession_number is None and identifiers.patient is not None
        assert "ACC" not in oru_r01(content, identifiers, sending_facility="X", now=datetime.now(UTC))
    plain = FilmIdentifiers.from_header(film.header, patient_ids=False)
    assert plain.patient is None and plain.accession_number == ACCESSION
    assert FilmIdentifiers.from_header(None, patient_ids=True) == FilmIdentifiers()


# --- once per priority raise ------------------------------------------------------------------------------------

def test_one_notification_per_channel_and_priority_raise(store: ResultsStore, files: IdentifierFiles,
                                                        film: Film) -> None:
    """URGENT notifies; a second URGENT film of the study does not; STAT notifies again; an URGENT film after
    that does not (the priority never goes down); ROUTINE is not a notified priority by default."""
    notify = notifier(store, files, Ris(), Receiver())  # never started: only the outbox is looked at
    study = "1.2.840.99.1"
    steps = [("1", Priority.URGENT, 2), ("2", Priority.URGENT, 2), ("3", Priority.STAT, 4), ("4", Priority.URGENT, 4),
             ("5", Priority.STAT, 4)]
    for sop, priority, rows_after in steps:
        finding = found(film, study, f"{study}.{sop}", priority)
        record(store, finding)
        first = notify.notify(finding)
        assert notify.notify(finding) == first, "the hook run again (outputs retried, a restart) is idempotent"
        assert len(store.notifications(study)) == rows_after, f"after film {sop} ({priority.value})"
    rows = store.notifications(study)
    assert [(r.channel.value, r.priority.value) for r in rows] == [
        ("hl7", "URGENT"), ("webhook", "URGENT"), ("hl7", "STAT"), ("webhook", "STAT")]
    routine = found(film, "1.2.840.99.2", "1.2.840.99.2.1", Priority.ROUTINE, 0.1)
    record(store, routine)
    assert notify.notify(routine) == {} and store.notifications("1.2.840.99.2") == []


# --- delivery, outages, acknowledgements --------------------------------------------------------------------------

def test_both_channels_deliver_and_only_hl7_carries_patient_identifiers_where_allowed(
        store: ResultsStore, files: IdentifierFiles, film: Film, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Patient ID and Name go in the HL7 PID only (with the setting), never in the webhook, a log or the
    database: the film's identifiers wait in a file beside its results, the outbox rows hold none."""
    caplog.set_level(logging.DEBUG)
    outcomes: list[tuple[str, str]] = []
    study = "1.2.840.99.3"
    with Ris() as ris, Receiver() as receiver:
        notify = notifier(store, files, ris, receiver, patient_ids=True, outcomes=outcomes)
        notify.start()
        try:
            finding = found(film, study, f"{study}.1", Priority.STAT)
            record(store, finding)
            ids = notify.notify(finding)
            rows = until(lambda: settled(store, study, 2), "both notifications to be sent")
        finally:
            notify.close()
    assert {r.channel: r.state for r in rows} == {NotificationChannel.HL7: NotificationState.SENT,
                                                   NotificationChannel.WEBHOOK: NotificationState.SENT}
    assert sorted(outcomes) == [("hl7", "ok"), ("webhook", "ok")]
    (message,) = ris.received
    assert f"PID|||{PATIENT_ID}^^^HOSPITAL-A||{FAMILY}^{GIVEN}" in message
    ((headers, body),) = receiver.requests
    assert headers["X-PTX-Notification-Id"] == str(ids["webhook"])
    payload = json.loads(body)
    assert (payload["priority"], payload["accession_number"], payload["study_instance_uid"]) == ("STAT", ACCESSION,
                                                                                                  study)
    assert payload["result_status"] == "preliminary" and payload["software"].startswith("ptx-triage ")
    for secret in (PATIENT_ID, FAMILY, GIVEN):
        assert secret not in body.decode(), "the webhook never carries patient identifiers"
        assert secret not in caplog.text
    assert ACCESSION not in caplog.text and study not in caplog.text
    database = b"".join(path.read_bytes() for path in tmp_path.glob("ptx.sqlite3*"))
    assert b"notifications" in database and f'"study_uid":"{study}"'.encode() in database  # the rows are there
    for secret in (PATIENT_ID, FAMILY, GIVEN, ACCESSION):
        assert secret.encode() not in database, "the database holds no patient data"
    kept = files.results.notification_path(study, f"{study}.1").read_bytes()
    assert PATIENT_ID.encode() in kept and ACCESSION.encode() in kept
    assert f"notification {ids['hl7']} (STAT) to hl7: ok" in caplog.text


def test_receivers_that_are_down_get_the_notification_after_they_come_back(store: ResultsStore, files: IdentifierFiles,
                                                                           film: Film) -> None:
    """Nothing listens at first (connection refused): attempts fail and are retried with backoff; once the RIS
    and the webhook receiver start on their ports, the next attempt delivers."""
    outcomes: list[tuple[str, str]] = []
    study = "1.2.840.99.4"
    ris, receiver = Ris(), Receiver()
    notify = notifier(store, files, ris, receiver, outcomes=outcomes)
    notify.start()
    try:
        finding = found(film, study, f"{study}.1", Priority.URGENT)
        record(store, finding)
        notify.notify(finding)

        def retried() -> list[Any]:
            rows = store.notifications(study)
            return rows if len(rows) == 2 and all(r.attempts >= 2 for r in rows) else []

        failing = until(retried, "two failed attempts each")
        assert {r.last_error for r in failing} == {"hl7: no connection to the RIS (ConnectionRefusedError)",
                                                   "webhook: ConnectError (no answer)"}
        assert all(r.state is NotificationState.PENDING for r in failing)
        with ris, receiver:
            rows = until(lambda: settled(store, study, 2), "delivery once the receivers are back")
            assert all(r.state is NotificationState.SENT for r in rows)
            assert len(ris.received) >= 1 and len(receiver.requests) >= 1
    finally:
        notify.close()
    assert ("hl7", "failed") in outcomes and ("hl7", "ok") in outcomes and ("webhook", "ok") in outcomes


def test_a_reject_is_retried_and_an_error_is_kept_without_the_ris_text(store: ResultsStore, files: IdentifierFiles,
                                                                       film: Film,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """AR (application reject: busy, down) is sent again and passes on AA; AE (an error in the message) is a
    rejection: kept, failed for good once the attempts are spent, counted as given_up. An ACK for another
    control ID is not taken as ours. MSA-3, the RIS's own text, is in no error and no log."""
    caplog.set_level(logging.DEBUG)
    outcomes: list[tuple[str, str]] = []
    with Ris(answers=("AR", "AA")) as ris:
        notify = notifier(store, files, ris, outcomes=outcomes)
        notify.start()
        try:
            finding = found(film, "1.2.840.99.5", "1.2.840.99.5.1", Priority.STAT)
            record(store, finding)
            notify.notify(finding)
            (sent,) = until(lambda: settled(store, "1.2.840.99.5", 1), "the AR to be retried and accepted")
        finally:
            notify.close()
    assert (sent.state, sent.attempts) == (NotificationState.SENT, 2) and len(ris.received) == 2
    assert outcomes == [("hl7", "failed"), ("hl7", "ok")]
    assert ris.received[0].split("\r")[0].split("|")[9] == ris.received[1].split("\r")[0].split("|")[9], \
        "a resend keeps its control ID (MSH-10), so the RIS can recognise it"

    outcomes.clear()
    for study, ris in (("1.2.840.99.6", Ris(answers=("AE",))), ("1.2.840.99.7", Ris(wrong_control_id=True))):
        with ris:
            notify = notifier(store, files, ris, max_attempts=2, outcomes=outcomes)
            notify.start()
            try:
                finding = found(film, study, f"{study}.1", Priority.STAT)
                record(store, finding)
                notify.notify(finding)
                (failed,) = until(lambda study=study: settled(store, study, 1), "the notification to fail for good")
            finally:
                notify.close()
        assert failed.state is NotificationState.FAILED and failed.attempts == 2
        if study.endswith("6"):
            assert failed.last_error == ("hl7: the RIS answered AE (application error in the message); kept and "
                                         "retried rarely")
        else:
            assert failed.last_error == "hl7: the RIS acknowledged another message (AA for another control ID)"
    assert outcomes == [("hl7", "failed"), ("hl7", "given_up")] * 2
    assert PEER_TEXT not in caplog.text and "failed for good after 2 attempts" in caplog.text
    assert all(PEER_TEXT not in (r.last_error or "") for r in store.notifications())
    assert store.retry_notification(failed.id).state is NotificationState.PENDING  # an operator's retry


def test_webhook_requests_are_signed_afresh_and_replays_are_refused(store: ResultsStore, files: IdentifierFiles,
                                                                    film: Film) -> None:
    """Each attempt is signed with its own timestamp (a retry after 503 passes the receiver's replay window);
    `verify` refuses a replay outside the window, a changed body, another secret and a missing header."""
    stamps = iter([1_000_000_000.0, 1_000_000_001.0, time.time() - 10])  # two long ago: refused as replays

    def clock() -> float:
        return next(stamps, None) or time.time()

    with Receiver(answers=(503, 200)) as receiver:
        notify = notifier(store, files, receiver=receiver, clock=clock)
        notify.start()
        try:
            finding = found(film, "1.2.840.99.8", "1.2.840.99.8.1", Priority.URGENT)
            record(store, finding)
            notify.notify(finding)
            (sent,) = until(lambda: settled(store, "1.2.840.99.8", 1), "the webhook to accept a fresh signature")
        finally:
            notify.close()
    assert sent.state is NotificationState.SENT and sent.attempts == 4  # refused twice (401), 503, 200
    assert len(receiver.refused) == 2 and all("replay window" in why for why in receiver.refused)
    (first, second) = receiver.requests
    assert first[0]["X-PTX-Timestamp"] != second[0]["X-PTX-Timestamp"], "every attempt signs afresh"

    headers, body = second
    stamp = int(headers["X-PTX-Timestamp"])
    assert verify(SECRET, headers, body, now=stamp + 299) == stamp
    with pytest.raises(SignatureError, match="outside the 300 s replay window"):
        verify(SECRET, headers, body, now=stamp + 301)
    with pytest.raises(SignatureError, match="does not match the body and timestamp"):
        verify(SECRET, headers, body.replace(b"URGENT", b"ROUTINE"), now=stamp)
    with pytest.raises(SignatureError, match="does not match"):
        verify(b"another-secret", headers, body, now=stamp)
    with pytest.raises(SignatureError, match="does not match"):
        verify(SECRET, {**headers, "X-PTX-Timestamp": str(stamp + 1)}, body, now=stamp)
    with pytest.raises(SignatureError, match="missing X-PTX-Signature header"):
        verify(SECRET, {"X-PTX-Timestamp": str(stamp)}, body, now=stamp)
    assert sign(SECRET, stamp, body) == headers["X-PTX-Signature"]


# --- settings --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("environ", "message"), [
    ({"PTX_NOTIFY_WEBHOOK": "https://hooks.example/ptx"}, "PTX_NOTIFY_WEBHOOK is set but PTX_NOTIFY_WEBHOOK_SECRET"),
    ({"PTX_NOTIFY_WEBHOOK": "ftp://hooks.example/ptx", "PTX_NOTIFY_WEBHOOK_SECRET": "s"}, "http:// or https://"),
    ({"PTX_NOTIFY_HL7": "http://ris:2575"}, "PTX_NOTIFY_HL7 must start with mllp://"),
    ({"PTX_NOTIFY_HL7": "mllp://ris"}, "PTX_NOTIFY_HL7 needs a host and a port"),
    ({"PTX_NOTIFY_PRIORITIES": "STAT,SOON"}, "PTX_NOTIFY_PRIORITIES: 'SOON' is not a priority"),
])
def test_bad_notification_settings_stop_the_pacs_side_naming_the_setting(tmp_path: Path, store: ResultsStore,
                                                                         environ: dict[str, str], message: str) -> None:
    settings = load_settings(environ={"PTX_DICOM_PORT": str(free_port()), "PTX_DATA_DIR": str(tmp_path), **environ})

    async def triage(data: bytes) -> Finding:
        raise AssertionError("never called: the PACS side must not be built")

    with pytest.raises(NotifySettingsError, match=message):
        side.Pacs(settings, store, ResultsFolder(tmp_path / "results"), triage)
    with pytest.raises(NotifySettingsError, match=message):
        check_settings(settings)  # what start-up can call before any worker starts


# --- the whole way ---------------------------------------------------------------------------------------------

def test_a_c_stored_film_is_pushed_to_the_ris_and_the_webhook(tmp_path: Path, realdata: Path) -> None:
    """C-STORE → spool → triage (the service's flow, in-process) → finding recorded → HL7 ACKed and webhook
    answered, with the metrics counted; the SEG/SR are made all the same. Every priority is notified here, so
    whatever the demo models say of this film, it is pushed, at the priority the worklist shows."""
    path = realdata / CHEST[0].path
    header = pydicom.dcmread(path, stop_before_pixels=True)
    study = str(header.StudyInstanceUID)
    ris, receiver = Ris(), Receiver()
    settings = load_settings(environ={
        "PTX_DICOM_PORT": str(free_port()), "PTX_DICOM_HOST": "127.0.0.1", "PTX_DATA_DIR": str(tmp_path),
        "PTX_RETENTION_DAYS": "0", "PTX_NOTIFY_PRIORITIES": "STAT,URGENT,ROUTINE", "PTX_NOTIFY_HL7": str(ris.address),
        "PTX_NOTIFY_WEBHOOK": receiver.url, "PTX_NOTIFY_WEBHOOK_SECRET": SECRET.decode()})

    def sample(channel: str) -> float:
        return REGISTRY.get_sample_value("ptx_notifications_total", {"channel": channel, "outcome": "ok"}) or 0.0

    before = sample("hl7"), sample("webhook")
    with ris, receiver:

        async def scenario() -> None:
            with open_store(None, tmp_path) as store:
                pacs = side.Pacs.observed(settings, store, ResultsFolder(tmp_path / "results"), InProcessTriage())
                await pacs.start()
                try:
                    assert await asyncio.to_thread(send, settings.dicom_port, [path]) == [0x0000]
                    await asyncio.to_thread(until, lambda: settled(store, study, 2), "both notifications sent", 90)
                    await pacs.intake.wait_idle(60)
                    (triaged,) = store.study(study).findings  # type: ignore[union-attr]
                    assert {(r.priority, r.state) for r in store.notifications(study)} == {
                        (triaged.priority, NotificationState.SENT)}
                    assert pacs.results.present(study, str(header.SOPInstanceUID)), "the results are made too"
                finally:
                    await pacs.stop()
            (message,) = ris.received
            assert f"|110180^Study Instance UID^DCM||{study}|" in message and "\rPID|" not in message
            code = {"STAT": "S^Stat", "URGENT": "A^ASAP", "ROUTINE": "R^Routine"}[triaged.priority.value]
            assert f"\rTQ1|||||||||{code}^HL70485\r" in message
            ((_, body),) = receiver.requests
            assert json.loads(body)["priority"] == triaged.priority.value

        asyncio.run(scenario())
    assert (sample("hl7"), sample("webhook")) == (before[0] + 1, before[1] + 1)


def test_content_and_identifiers_round_trip_and_a_swept_file_means_none(film: Film, files: IdentifierFiles) -> None:
    content = NotificationContent.from_finding(found(film, "1.2", "1.2.1", Priority.URGENT), datetime.now(UTC))
    assert NotificationContent.from_json(content.to_json()) == content
    identifiers = FilmIdentifiers.from_header(film.header, patient_ids=True)
    assert identifiers.patient == PatientIdentity(id=PATIENT_ID, issuer="HOSPITAL-A", family=FAMILY, given=GIVEN)
    assert files.read(content) == FilmIdentifiers(), "no file (never written, or swept by retention): none"
    files.write(content, identifiers)
    assert files.read(content) == identifiers
    other = replace(content, sop_uid="1.2.2")
    files.write(other, FilmIdentifiers())
    assert not files.results.notification_path("1.2", "1.2.2").exists(), "nothing to keep: no file"
