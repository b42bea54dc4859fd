"""Triage over HTTP (issue 17 §2): a listener's intake sends its films to the triage service at PTX_TRIAGE_URL.

The PACS side (`Pacs`: listener, spool, intake, result writers) runs in this process with PTX_TRIAGE_URL set
and an in-process triage that fails the test if called; films arrive by loopback C-STORE (pynetdicom). The
triage replica is a real `bentoml serve` (tests/servers.py) that records HTTP films on its own worklist
(PTX_RECORD_HTTP). Where the peer has to misbehave (503s, a 422, a 401, nobody listening) it is a small HTTP
server of the test's own, answering in turn from a script; its 200 is the in-process flow's answer for the
film, with pseudonymised UIDs, as a de-identifying replica would answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import io
import json
import threading
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from prometheus_client import REGISTRY

from service.cascade import rle
from service.cascade.finding import Finding
from service.http.answers import ApiError
from service.http.routes import _recording
from service.pacs import side
from service.pacs.remote_triage import TriageUrlError, check_settings, check_url, wait_s
from service.settings import Settings, load_settings
from service.store import InstanceRecord, InstanceStatus, ResultsStore, open_store
from service.store.results_files import ResultsFolder
from tests.pacs.test_dicom_listener import InProcessTriage
from tests.pacs.test_outputs_pending import until
from tests.pacs.test_parse_once import send
from tests.servers import bento_server, free_port

SIIM = "chest/siim_cr_jpegbaseline_mono2.dcm"
PSEUDONYMS = {"study_uid": "2.25.1", "series_uid": "2.25.2", "sop_uid": "2.25.3"}


@pytest.fixture(scope="module")
def triage() -> InProcessTriage:
    return InProcessTriage()


@pytest.fixture(scope="module")
def film(realdata: Path) -> Path:
    return realdata / SIIM


@pytest.fixture(scope="module")
def answer(film: Path, triage: InProcessTriage) -> dict:
    """The in-process flow's JSON answer for the film (mask as RLE), its UIDs pseudonymised."""
    return {**triage.run(film.read_bytes()).to_json("rle"), **PSEUDONYMS}


def remote_count(outcome: str) -> float:
    return REGISTRY.get_sample_value("ptx_remote_triage_total", {"outcome": outcome}) or 0.0


async def never(_: bytes) -> Finding:
    raise AssertionError("PTX_TRIAGE_URL is set: the in-process triage must not be called")


def settings_for(data_dir: Path, url: str) -> Settings:
    return load_settings(environ={"PTX_DICOM_PORT": str(free_port()), "PTX_DICOM_HOST": "127.0.0.1",
                                  "PTX_DATA_DIR": str(data_dir), "PTX_RETENTION_DAYS": "0", "PTX_RETRY_AFTER_S": "1",
                                  "PTX_TRIAGE_URL": url, "PTX_TRIAGE_TOKEN": "a-token-of-the-triage-service"})


@contextlib.asynccontextmanager
async def pacs_side(tmp_path: Path, url: str) -> AsyncIterator[tuple[side.Pacs, ResultsStore]]:
    with open_store(None, tmp_path) as store:
        settings = settings_for(tmp_path, url)
        pacs = side.Pacs.observed(settings, store, ResultsFolder(tmp_path / "results"), never)
        await pacs.start()
        try:
            yield pacs, store
        finally:
            await pacs.stop()


async def settled(store: ResultsStore, sop_uid: str) -> InstanceRecord:
    """The instance once done (spool file removed after its results) or failed."""
    def check() -> InstanceRecord | None:
        record = store.instance(sop_uid)
        if record is None or record.status not in (InstanceStatus.DONE, InstanceStatus.FAILED):
            return None
        return record
    return await until(check, f"instance {sop_uid} done or failed")  # type: ignore[return-value]


def sop_uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# --------------------------------------------------------------------------------------------------------------
# A stand-in triage service


@dataclass
class Scripted:
    """Answers POSTs in turn from `script` ((status, headers, JSON body); the last one repeats) and keeps
    what it was sent: (path with query, headers, body)."""

    script: list[tuple[int, dict[str, str], dict]]
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)


@contextlib.contextmanager
def stand_in(port: int, scripted: Scripted) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            scripted.requests.append((self.path, dict(self.headers.items()), body))
            status, headers, answer = scripted.script[min(len(scripted.requests), len(scripted.script)) - 1]
            data = json.dumps(answer).encode()
            self.send_response(status)
            for name, value in {**headers, "Content-Type": "application/json"}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()


def busy() -> tuple[int, dict[str, str], dict]:
    return 503, {"Retry-After": "1"}, {"error": {"code": "overloaded", "message": "the service is at capacity"}}


# --------------------------------------------------------------------------------------------------------------
# The real triage service


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir = tmp_path_factory.mktemp("replica")
    env = {"PTX_DATA_DIR": str(data_dir), "PTX_RECORD_HTTP": "1"}
    with bento_server(data_dir / "server.log", env=env) as base:
        yield base


def replica_studies(base: str) -> set[str]:
    with urllib.request.urlopen(f"{base}/v1/worklist?limit=100", timeout=30) as response:
        return {item["study_uid"] for item in json.loads(response.read())["items"]}


def test_a_stored_film_is_triaged_by_the_replica_as_in_process_and_recorded_once(
        replica: str, film: Path, triage: InProcessTriage, tmp_path: Path) -> None:
    local = triage.run(film.read_bytes())
    sop_uid = sop_uid_of(film)
    ok = remote_count("ok")

    async def scenario() -> tuple[InstanceRecord, object]:
        async with pacs_side(tmp_path, replica) as (pacs, store):
            assert await asyncio.to_thread(send, pacs.listener.port, [film]) == [0]
            record = await settled(store, sop_uid)
            return record, store.finding(sop_uid)

    record, found = asyncio.run(scenario())
    assert (record.status, record.attempts, record.error_code) == (InstanceStatus.DONE, 1, None)
    assert found is not None
    study_uid, finding = found  # type: ignore[misc]
    assert study_uid == local.study_uid
    assert finding.score == pytest.approx(local.score, abs=1e-5)
    assert (finding.priority, finding.rle, finding.label) == (local.priority, local.rle, local.to_json("none")["label"])
    assert remote_count("ok") == ok + 1
    # record=false: the replica records HTTP films (PTX_RECORD_HTTP), but not the intake's
    assert local.study_uid not in replica_studies(replica)
    request = urllib.request.Request(f"{replica}/v1/triage?mask=none", data=film.read_bytes(), method="POST",
                                     headers={"Content-Type": "application/dicom"})
    urllib.request.urlopen(request, timeout=120).close()
    assert local.study_uid in replica_studies(replica), "a client's film, without record=false, is recorded"


# --------------------------------------------------------------------------------------------------------------
# Stand-in peers


def test_a_busy_service_is_waited_out_without_spending_an_attempt(film: Path, answer: dict, tmp_path: Path) -> None:
    scripted = Scripted([busy(), busy(), (200, {}, answer)])
    before = remote_count("busy"), remote_count("ok")

    async def scenario() -> InstanceRecord:
        with stand_in(free_port(), scripted) as url:
            async with pacs_side(tmp_path, url) as (pacs, store):
                assert await asyncio.to_thread(send, pacs.listener.port, [film]) == [0]
                return await settled(store, sop_uid_of(film))

    record = asyncio.run(scenario())
    assert (record.status, record.attempts, record.error_code) == (InstanceStatus.DONE, 1, None)
    assert (remote_count("busy"), remote_count("ok")) == (before[0] + 2, before[1] + 1)
    assert len(scripted.requests) == 3
    for path, headers, body in scripted.requests:
        assert path.startswith("/v1/triage?") and {"mask=rle", "record=false"} <= set(path.split("?")[1].split("&"))
        assert headers["Content-Type"] == "application/dicom"
        assert headers["Authorization"] == "Bearer a-token-of-the-triage-service"
        assert body[128:132] == b"DICM" and sop_uid_of_bytes(body) == sop_uid_of(film)


def sop_uid_of_bytes(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def test_the_finding_takes_its_uids_and_mask_size_from_the_film_not_the_answer(film: Path, answer: dict,
                                                                               tmp_path: Path) -> None:
    """The answer's UIDs are pseudonyms (a de-identifying replica): the finding is recorded on the film's own."""
    ds = pydicom.dcmread(film, stop_before_pixels=True)

    async def scenario() -> tuple[InstanceRecord, object]:
        with stand_in(free_port(), Scripted([(200, {}, answer)])) as url:
            async with pacs_side(tmp_path, url) as (pacs, store):
                assert await asyncio.to_thread(send, pacs.listener.port, [film]) == [0]
                return await settled(store, str(ds.SOPInstanceUID)), store.finding(str(ds.SOPInstanceUID))

    record, found = asyncio.run(scenario())
    assert record.status is InstanceStatus.DONE and found is not None
    study_uid, finding = found  # type: ignore[misc]
    assert study_uid == ds.StudyInstanceUID
    assert rle.decode(finding.rle, ds.Rows, ds.Columns).shape == (ds.Rows, ds.Columns)
    assert finding.rle == answer["rle"]


def test_a_rejection_fails_the_film_with_its_code(film: Path, tmp_path: Path) -> None:
    rejected = remote_count("rejected")
    not_chest = {"error": {"code": "not_chest", "message": "Body Part Examined (0018,0015) is HAND, not CHEST"}}

    async def scenario() -> tuple[InstanceRecord, list[str]]:
        with stand_in(free_port(), Scripted([(422, {}, not_chest)])) as url:
            async with pacs_side(tmp_path, url) as (pacs, store):
                assert await asyncio.to_thread(send, pacs.listener.port, [film]) == [0]
                record = await settled(store, sop_uid_of(film))
                await until(lambda: not pacs.spool.pending(), "the rejected film's spool file removed")
                return record, pacs.spool.pending()

    record, _ = asyncio.run(scenario())
    assert (record.status, record.error_code, record.attempts) == (InstanceStatus.FAILED, "not_chest", 1)
    assert remote_count("rejected") == rejected + 1


def test_a_refused_token_spends_an_attempt_and_never_fails_the_film_for_its_content(film: Path,
                                                                                   tmp_path: Path) -> None:
    unauthorized = {"error": {"code": "unauthorized", "message": "a bearer token is required"}}
    failed = remote_count("failed")

    async def scenario() -> InstanceRecord:
        with stand_in(free_port(), Scripted([(401, {}, unauthorized)])) as url:
            async with pacs_side(tmp_path, url) as (pacs, store):
                assert await asyncio.to_thread(send, pacs.listener.port, [film]) == [0]
                sop_uid = sop_uid_of(film)

                def retrying() -> InstanceRecord | None:  # between its attempts: received, one spent
                    record = store.instance(sop_uid)
                    return record if record is not None and record.attempts == 1 and record.status is \
                        InstanceStatus.RECEIVED else None

                return await until(retrying, "a first attempt spent")  # type: ignore[return-value]

    record = asyncio.run(scenario())
    assert (record.status, record.error_code) == (InstanceStatus.RECEIVED, None), "retried, not rejected"
    assert remote_count("failed") >= failed + 1


def test_a_service_nobody_answers_yet_is_waited_for_then_used(film: Path, answer: dict, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there until the stand-in starts
    unreachable = remote_count("unreachable")

    async def scenario() -> InstanceRecord:
        async with pacs_side(tmp_path, f"http://127.0.0.1:{port}") as (pacs, store):
            assert await asyncio.to_thread(send, pacs.listener.port, [film]) == [0]
            await until(lambda: remote_count("unreachable") > unreachable, "a refused connection")
            with stand_in(port, Scripted([(200, {}, answer)])):
                return await settled(store, sop_uid_of(film))

    record = asyncio.run(scenario())
    assert (record.status, record.attempts, record.error_code) == (InstanceStatus.DONE, 1, None)


# --------------------------------------------------------------------------------------------------------------
# Settings and parameters


@pytest.mark.parametrize(("url", "says"), [
    ("ftp://triage:3000", "must start with http:// or https://"),
    ("http://", "names no host"),
    ("http://user:secret-password@triage:3000", "must not carry credentials"),
    ("http://triage:3000/?x=1", "without query or fragment"),
    ("http://triage:99999", "invalid port"),
])
def test_a_bad_triage_url_stops_the_pacs_side_naming_the_setting(url: str, says: str, tmp_path: Path) -> None:
    with open_store(None, tmp_path) as store, pytest.raises(TriageUrlError, match=says) as raised:
        side.Pacs(settings_for(tmp_path, url), store, ResultsFolder(tmp_path / "results"), never)
    assert "PTX_TRIAGE_URL" in str(raised.value) and "secret-password" not in str(raised.value)
    with pytest.raises(TriageUrlError, match=says):  # what service/app.py checks at import
        check_settings(settings_for(tmp_path, url))


def test_the_base_url_and_retry_after_are_read_as_documented() -> None:
    assert check_url("https://triage.example:8443/ptx/") == "https://triage.example:8443/ptx"
    assert [wait_s(v, 2.0) for v in ("1", "0", "3600", "soon", None, "nan")] == [1.0, 1.0, 60.0, 2.0, 2.0, 2.0]


def test_record_can_only_turn_recording_off() -> None:
    assert [_recording(None, True), _recording("false", True), _recording(None, False)] == [True, False, False]
    assert [_recording("0", True), _recording("True", True), _recording("no", False)] == [False, True, False]
    with pytest.raises(ApiError, match="PTX_RECORD_HTTP") as raised:
        _recording("true", False)
    assert raised.value.http_status == 400
    with pytest.raises(ApiError, match="record='null'; use true or false") as raised:  # schemathesis sent it
        _recording("null", True)
    assert (raised.value.http_status, raised.value.code_text) == (400, "invalid_parameter")
