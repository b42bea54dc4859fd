"""Delivery of result objects (issue #5 §5) over real loopback networking, against real receivers.

C-STORE goes to dcmtk's `storescp` (a separate process, stopped by PID) or, where a receiver must answer with
a chosen failure status, to a pynetdicom SCP in this process; STOW-RS goes to a small stdlib HTTP server that
parses the multipart/related body itself (not with the sender's code) and answers as a STOW-RS origin server
does. Every delivery is recorded in a real SQLite store. Destinations that are down are closed ports (refused
at once) or "black holes" (a listening socket that never answers), to show that nothing waits longer than
the configured timeouts and that intake is never held up.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.server
import io
import json
import logging
import random
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from service.pacs.delivery import (
    Backoff,
    CStoreSender,
    DeliveryError,
    Destination,
    Dispatcher,
    StowSender,
    make_senders,
    parse_destinations,
)
from service.store import (
    DeliveryKind,
    DeliveryState,
    ReceivedInstance,
    ResultsStore,
    open_store,
)
from tests.servers import free_port, process_group, wait_port

STORESCP = shutil.which("storescp") or "/usr/bin/storescp"
STUDY = "1.2.826.0.1.3680043.8.498.1"
T0 = datetime(2030, 1, 1, 8, 0, tzinfo=UTC)
FAST = {"connect_timeout_s": 2.0, "timeout_s": 2.0}


# --- fixtures and helpers --------------------------------------------------------------------------------

@pytest.fixture
def store(tmp_path: Path) -> Iterator[ResultsStore]:
    with open_store(None, tmp_path / "db") as opened:
        opened.receive(received(STUDY))
        yield opened


def received(study_uid: str) -> ReceivedInstance:
    return ReceivedInstance(sop_uid=generate_uid(), study_uid=study_uid, series_uid=None, sop_class_uid=None,
                            source="http", spool_path=None, received_at=datetime.now(UTC))


def write_sc(path: Path, study_uid: str = STUDY) -> str:
    """A small valid Secondary Capture (8 x 8, Explicit VR Little Endian); returns its SOP Instance UID."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality, ds.ConversionType = "PTX-TEST", "Test^Delivery", "OT", "WSD"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(range(64))
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def dataset_bytes(data: bytes) -> bytes:
    """A Part 10 file's data set: what follows the file meta group, whose length (0002,0000) gives its end."""
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00", "file meta must start with (0002,0000)"
    return data[144 + int.from_bytes(data[140:144], "little"):]


@contextlib.contextmanager
def storescp(port: int, out: Path, *options: str, aet: str = "PACS") -> Iterator[Path]:
    """dcmtk's storescp on 127.0.0.1:`port`, writing what it receives, bit-preserving, into `out`."""
    if not Path(STORESCP).exists():
        pytest.fail("dcmtk's storescp is needed (apt-get install dcmtk)", pytrace=False)
    out.mkdir(parents=True, exist_ok=True)
    command = [STORESCP, "--aetitle", aet, "--output-directory", str(out), "--bit-preserving",
               "--acse-timeout", "5", "--dimse-timeout", "5", *options, str(port)]
    with process_group(command, out.parent / f"storescp-{port}.log", lambda process: wait_port(port, process),
                       grace_s=10):
        yield out


def received_file(out: Path, sop_uid: str) -> Path:
    (found,) = [path for path in out.iterdir() if path.name.endswith(sop_uid)]
    return found


@contextlib.contextmanager
def black_hole() -> Iterator[int]:
    """A port whose socket listens but never accepts or answers: connects succeed, then silence."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


@dataclasses.dataclass
class StowRequest:
    path: str
    headers: dict[str, str]
    parts: list[tuple[dict[str, str], bytes]]


def parse_multipart_related(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """RFC 2046/2387 parts of a multipart/related body, strictly: the test's own reading, not the sender's."""
    media, _, params = content_type.partition(";")
    assert media.strip().lower() == "multipart/related", content_type
    parameters = dict(re.findall(r'\s*([\w-]+)=("[^"]*"|[^;]*)', params))
    assert parameters.get("type", "").strip('"') == "application/dicom", content_type
    boundary = parameters["boundary"].strip('"').encode()
    assert body.startswith(b"--" + boundary + b"\r\n"), "body must open with the boundary"
    closing = b"\r\n--" + boundary + b"--"
    assert closing in body, "body must close with the final boundary"
    inner = body[len(boundary) + 4: body.index(closing)]
    parts = []
    for chunk in inner.split(b"\r\n--" + boundary + b"\r\n"):
        head, _, content = chunk.partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("ascii").split("\r\n"):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        parts.append((headers, content))
    return parts


class StowServer:
    """A STOW-RS origin server at http://127.0.0.1:port/dicom-web on its own thread. `answer` decides the
    response from the parsed request (default: 200 with a Referenced SOP Sequence of what was stored)."""

    def __init__(self, port: int = 0, answer: Callable[[StowRequest], tuple[int, dict[str, str], bytes]] | None = None,
                 credentials: tuple[str, str] | None = None) -> None:
        self.requests: list[StowRequest] = []
        self.stored: list[bytes] = []
        self.answer = answer
        self.credentials = credentials
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if owner.credentials is not None:
                    token = base64.b64encode(":".join(owner.credentials).encode()).decode()
                    if self.headers.get("Authorization") != f"Basic {token}":
                        self._reply(401, {"WWW-Authenticate": 'Basic realm="pacs"'}, b"")
                        return
                if self.path != "/dicom-web/studies":
                    self._reply(404, {}, b"")
                    return
                request = StowRequest(self.path, {k.lower(): v for k, v in self.headers.items()},
                                      parse_multipart_related(self.headers["Content-Type"], body))
                owner.requests.append(request)
                status, headers, reply = (owner.answer or owner.store_all)(request)
                self._reply(status, headers, reply)

            def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def store_all(self, request: StowRequest) -> tuple[int, dict[str, str], bytes]:
        items = []
        for headers, content in request.parts:
            assert headers["content-type"] == "application/dicom"
            ds = pydicom.dcmread(io.BytesIO(content))
            self.stored.append(content)
            items.append({"00081150": {"vr": "UI", "Value": [ds.SOPClassUID]},
                          "00081155": {"vr": "UI", "Value": [ds.SOPInstanceUID]}})
        return 200, {"Content-Type": "application/dicom+json"}, json.dumps(
            {"00081190": {"vr": "UR", "Value": [f"{self.base}/studies/{STUDY}"]},
             "00081199": {"vr": "SQ", "Value": items}}).encode()

    def __enter__(self) -> StowServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def failed_sop_json(status: int, reason: int) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/dicom+json"}, json.dumps({"00081198": {"vr": "SQ", "Value": [{
        "00081150": {"vr": "UI", "Value": [SecondaryCaptureImageStorage]},
        "00081155": {"vr": "UI", "Value": ["1.2.3.4"]},
        "00081197": {"vr": "US", "Value": [reason]}}]}}).encode()


def failed_sop_xml(status: int, reason: int) -> tuple[int, dict[str, str], bytes]:
    xml = ('<?xml version="1.0" encoding="UTF-8"?><NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/'
           'NativeDICOM"><DicomAttribute tag="00081198" vr="SQ" keyword="FailedSOPSequence"><Item number="1">'
           '<DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2.3.4</Value></DicomAttribute>'
           f'<DicomAttribute tag="00081197" vr="US"><Value number="1">{reason}</Value></DicomAttribute>'
           '</Item></DicomAttribute></NativeDicomModel>')
    return status, {"Content-Type": "application/dicom+xml"}, xml.encode()


def dispatcher(store: ResultsStore, destinations: str, **options: object) -> tuple[Dispatcher, list[tuple[str, bool]]]:
    """A dispatcher over `destinations` with short timeouts, recording its on_attempt calls."""
    seen: list[tuple[str, bool]] = []
    senders = make_senders(parse_destinations(destinations), calling_ae="PTX_TEST", **FAST)
    options = {"rng": random.Random(5), "on_attempt": lambda name, ok: seen.append((name, ok)), **options}
    return Dispatcher(store, senders, **options), seen  # type: ignore[arg-type]


# --- destinations ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("dicom://PACS@10.0.0.5:104", dict(name="dicom://PACS@10.0.0.5:104", protocol="dicom", host="10.0.0.5",
                                       port=104, ae_title="PACS")),
    ("main=dicom://STORE_SCP@pacs.example:11112", dict(name="main", host="pacs.example", ae_title="STORE_SCP")),
    ("dicom://PACS@[::1]:4242", dict(host="::1", port=4242, name="dicom://PACS@[::1]:4242")),
    ("dicomweb+http://127.0.0.1:8042/dicom-web/", dict(protocol="dicomweb", port=8042,
                                                        base_url="http://127.0.0.1:8042/dicom-web")),
    ("web=https://pacs.example/wado/rs", dict(name="web", port=443, base_url="https://pacs.example/wado/rs")),
    ("dicomweb+https://pacs.example:8443", dict(base_url="https://pacs.example:8443", port=8443)),
])
def test_destinations_parse(text, expected):
    destination = Destination.parse(text)
    assert {key: getattr(destination, key) for key in expected} == expected
    if destination.protocol == "dicomweb":
        assert destination.stow_url == f"{destination.base_url}/studies"


@pytest.mark.parametrize(("text", "message"), [
    ("", "must not be empty"),
    ("pacs.example:104", "must start with dicom://"),
    ("ftp://pacs.example/x", "got ftp"),
    ("dicom://pacs.example:104", "needs the called AE title"),
    ("dicom://PACS@pacs.example", "needs a port"),
    ("dicom://PACS@pacs.example:99999", "port must be"),
    ("dicom://PACS@pacs.example:abc", "port must be"),
    ("dicom://THIS_AE_TITLE_IS_TOO_LONG@h:104", "1 to 16 printable ASCII"),
    ("dicom://PACS:secret@h:104", "not user:password"),
    ("dicom://PACS@h:104/path", "takes no path"),
    ("https:///dicom-web", "names no host"),
    ("https://h/dicom-web?x=1", "query or fragment"),
    ("bad name!=dicom://PACS@h:104", "destination name 'bad name!'"),
])
def test_destination_errors_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Destination.parse(text)


def test_credentials_stay_out_of_names_reprs_and_errors():
    destination = Destination.parse("https://reader:s3cr%40t@pacs.example/dicom-web")
    assert (destination.username, destination.password) == ("reader", "s3cr@t")
    for shown in (destination.name, destination.url, repr(destination), str(destination), destination.stow_url):
        assert "s3cr" not in shown and "reader" not in shown
    for bad in ("https://reader:s3cret@pacs.example:99999/x", "https://reader:s3cret@pacs.example/x?q=1"):
        with pytest.raises(ValueError) as caught:
            Destination.parse(bad)
        assert "s3cret" not in str(caught.value)


def test_destination_lists_need_unique_names_and_targets():
    both = parse_destinations("a=dicom://PACS@h:104, b=https://h/dicom-web,,")
    assert [d.name for d in both] == ["a", "b"] and parse_destinations("") == [] == parse_destinations(None)
    assert [d.name for d in parse_destinations(["dicom://PACS@h:104"])] == ["dicom://PACS@h:104"]
    with pytest.raises(ValueError, match="'a' is used twice"):
        parse_destinations("a=dicom://PACS@h:104,a=dicom://PACS@h:105")
    with pytest.raises(ValueError, match="'x' and 'y' name the same target"):
        parse_destinations("x=https://h/dicom-web/,y=dicomweb+https://h/dicom-web")


def test_backoff_grows_is_capped_and_jitter_stays_in_bounds():
    backoff = Backoff(base_s=10, factor=3, max_s=200, jitter=0.25)
    assert [backoff.ceiling_s(n) for n in range(1, 6)] == [10, 30, 90, 200, 200]
    assert backoff.ceiling_s(10_000) == 200, "a huge attempt count must not overflow"
    rng = random.Random(1)
    delays = [backoff.delay_s(3, rng) for _ in range(500)]
    assert 67.5 <= min(delays) < 70 and 88 < max(delays) <= 90, "jitter must spread over [(1-j)·d, d]"
    assert 150 <= backoff.delay_s(1, rng, longest=True) <= 200
    for bad in (dict(base_s=0), dict(base_s=10, max_s=5), dict(factor=0.5), dict(jitter=1.0)):
        with pytest.raises(ValueError):
            Backoff(**bad)


# --- C-STORE ---------------------------------------------------------------------------------------------

MODELS = {
    "classifier": {"name": "ptx-classifier-demo", "version": "0.1.0", "backend": "onnxruntime-cpu"},
    "segmenter": {"name": "ptx-segmenter-demo", "version": "0.2.0", "backend": "onnxruntime-cpu"},
}


@pytest.fixture(scope="module")
def real_seg(realdata: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A real SEG (service.pacs.results.build_seg) over the SIIM chest film: (file, study UID, SOP UID)."""
    from service.cascade.finding import PriorityBands, build_finding
    from service.cascade.postprocess import CascadeResult
    from service.imaging.reader import read_radiograph
    from service.pacs.results import ResultIdentity, build_seg

    film = realdata / "chest/siim_cr_jpegbaseline_mono2.dcm"
    source, radiograph = pydicom.dcmread(film), read_radiograph(film)
    mask = np.zeros(radiograph.pixels.shape, dtype=bool)
    rows, columns = mask.shape
    mask[rows // 8: rows // 3, columns // 5: columns // 2] = True
    result = CascadeResult(score=0.93, positive=True, gated=True, mask=mask, probability_max=0.93)
    finding = build_finding(radiograph, result, 0.5, PriorityBands(), models=MODELS)
    seg = build_seg(source, finding, ResultIdentity.from_models(MODELS))
    path = tmp_path_factory.mktemp("seg") / "SEG.dcm"
    pydicom.dcmwrite(path, seg, enforce_file_format=True)
    return path, str(source.StudyInstanceUID), str(seg.SOPInstanceUID)


def test_a_real_seg_reaches_storescp_unchanged(store, real_seg, tmp_path):
    path, study_uid, sop_uid = real_seg
    store.receive(received(study_uid))
    port = free_port()
    with storescp(port, tmp_path / "pacs") as out:
        deliver, seen = dispatcher(store, f"pacs=dicom://PACS@127.0.0.1:{port}")
        assert deliver.enqueue(study_uid, sop_uid, DeliveryKind.SEG, path) == {"pacs": 1}
        assert deliver.run_once() == 1
        got = received_file(out, sop_uid)
    (record,) = store.deliveries(study_uid)
    assert (record.state, record.attempts, record.last_error) == (DeliveryState.DELIVERED, 1, None)
    assert record.delivered_at is not None and record.next_attempt_at is None
    assert seen == [("pacs", True)]
    assert deliver.counts() == {DeliveryState.PENDING: 0, DeliveryState.DELIVERED: 1, DeliveryState.FAILED: 0}
    sent, stored = path.read_bytes(), got.read_bytes()
    assert dataset_bytes(stored) == dataset_bytes(sent), "the receiver must hold the SEG's data set byte for byte"
    stored_ds = pydicom.dcmread(got)
    assert stored_ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert stored_ds.file_meta.SourceApplicationEntityTitle == "PTX_TEST", "our calling AE title"


def test_compressed_objects_need_a_receiver_that_accepts_their_syntax(realdata, store, tmp_path):
    """A JPEG Secondary Capture is proposed in its own syntax only: storescp's default (uncompressed only)
    accepts no context, which is a rejection (non-retryable); with --accept-all it is stored as sent."""
    path = realdata / "other/SC_rgb_jpeg_dcmtk.dcm"
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    port = free_port()
    destination = Destination.parse(f"dicom://PACS@127.0.0.1:{port}")
    with storescp(port, tmp_path / "strict"):
        with pytest.raises(DeliveryError, match="accepted no presentation context for .*JPEG Baseline") as caught:
            CStoreSender(destination, calling_ae="PTX_TEST", **FAST).send(path)
    assert caught.value.retryable is False and caught.value.destination_down is False
    with storescp(port, tmp_path / "lenient", "--accept-all") as out:
        CStoreSender(destination, calling_ae="PTX_TEST", **FAST).send(path)
        got = received_file(out, str(ds.SOPInstanceUID))
    assert dataset_bytes(got.read_bytes()) == dataset_bytes(path.read_bytes())


@contextlib.contextmanager
def pynetdicom_scp(status: int | Dataset, port: int, calling_aets: list[str] | None = None,
                   delay_s: float = 0.0) -> Iterator[list[str]]:
    """A storage SCP in this process that answers every C-STORE with `status` (after `delay_s`; a Dataset
    for a status with an Error Comment); yields the SOP UIDs it saw. With `calling_aets` it rejects
    associations from any other calling AE title."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    seen: list[str] = []

    def on_store(event: object) -> int | Dataset:
        seen.append(str(event.dataset.SOPInstanceUID))  # type: ignore[attr-defined]
        time.sleep(delay_s)
        return status

    ae = AE(ae_title="PACS")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.require_calling_aet = calling_aets or []
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield seen
    finally:
        server.shutdown()


@pytest.mark.parametrize(("status", "message", "retryable"), [
    (0xA900, "0xA900 (data set does not match SOP class)", False),
    (0xC123, "0xC123 (cannot understand)", False),
    (0xA702, "0xA702 (out of resources)", True),
])
def test_a_cstore_failure_status_is_recorded_with_its_reason(store, tmp_path, status, message, retryable):
    uid = write_sc(tmp_path / "SC.dcm")
    port = free_port()
    backoff = Backoff(base_s=10, factor=2, max_s=1000, jitter=0.2)
    with pynetdicom_scp(status, port) as seen_by_scp:
        deliver, seen = dispatcher(store, f"pacs=dicom://PACS@127.0.0.1:{port}", backoff=backoff)
        deliver.enqueue(STUDY, uid, "SC", tmp_path / "SC.dcm")
        assert deliver.run_once(T0) == 1
    assert seen_by_scp == [uid]
    (record,) = store.deliveries(STUDY)
    assert record.state is DeliveryState.PENDING and record.attempts == 1
    assert message in record.last_error and record.last_error.startswith("pacs: C-STORE failed")
    wait = (record.next_attempt_at - T0).total_seconds()
    # A rejection waits the longest backoff; a retryable failure the first step.
    assert (800 <= wait <= 1000) if not retryable else (8 <= wait <= 10)
    assert seen == [("pacs", False)]


@pytest.mark.parametrize("status", [0xB000, 0xB007, 0x0111])
def test_cstore_warnings_and_duplicates_count_as_delivered(store, tmp_path, status):
    """Warning statuses mean stored (with coercion); 0x0111 means the PACS already has this very instance,
    which is what an earlier send whose answer was lost looks like."""
    uid = write_sc(tmp_path / "SC.dcm")
    port = free_port()
    with pynetdicom_scp(status, port) as seen_by_scp:
        deliver, seen = dispatcher(store, f"pacs=dicom://PACS@127.0.0.1:{port}")
        deliver.enqueue(STUDY, uid, "SC", tmp_path / "SC.dcm")
        deliver.run_once(T0)
    assert seen_by_scp == [uid] and store.deliveries(STUDY)[0].state is DeliveryState.DELIVERED
    assert seen == [("pacs", True)]


def test_a_cstore_without_an_answer_times_out(tmp_path):
    """The PACS takes the object but answers after our DIMSE timeout: a bounded, retryable failure."""
    write_sc(tmp_path / "SC.dcm")
    port = free_port()
    with pynetdicom_scp(0x0000, port, delay_s=1.5):
        sender = CStoreSender(Destination.parse(f"dicom://PACS@127.0.0.1:{port}"), connect_timeout_s=1,
                              timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(DeliveryError, match="no C-STORE response within 0.5 s") as caught:
            sender.send(tmp_path / "SC.dcm")
        assert time.monotonic() - started < 1.4
    assert caught.value.retryable and caught.value.destination_down


def test_a_rejected_association_is_recorded(store, tmp_path):
    """A PACS that does not know our calling AE title rejects the association permanently: recorded with
    its reason, as a rejection (the longest backoff), without any C-STORE."""
    uid = write_sc(tmp_path / "SC.dcm")
    port = free_port()
    with pynetdicom_scp(0x0000, port, calling_aets=["SOMEONE_ELSE"]) as seen_by_scp:
        deliver, _ = dispatcher(store, f"pacs=dicom://PACS@127.0.0.1:{port}",
                                backoff=Backoff(base_s=1, max_s=100, jitter=0))
        deliver.enqueue(STUDY, uid, "SC", tmp_path / "SC.dcm")
        deliver.run_once(T0)
    (record,) = store.deliveries(STUDY)
    assert seen_by_scp == [] and record.state is DeliveryState.PENDING
    assert record.last_error == ("pacs: association rejected (Rejected Permanent, Service User: "
                                 "Calling AE title not recognised)")
    assert record.next_attempt_at == T0 + timedelta(seconds=100)


# --- STOW-RS ---------------------------------------------------------------------------------------------

def test_stow_sends_the_file_unchanged_with_basic_auth_and_no_credentials_in_logs(store, real_seg, tmp_path,
                                                                                   caplog):
    caplog.set_level(logging.DEBUG)
    path, study_uid, sop_uid = real_seg
    store.receive(received(study_uid))
    with StowServer(credentials=("reader", "s3cr@t")) as server:
        url = server.base.replace("http://", "dicomweb+http://reader:s3cr%40t@")
        deliver, seen = dispatcher(store, f"web={url}")
        deliver.enqueue(study_uid, sop_uid, "SEG", path)
        assert deliver.run_once() == 1
    (request,) = server.requests
    assert request.headers["accept"] == "application/dicom+json"
    (part,) = request.parts
    assert part[1] == path.read_bytes(), "the part must be the Part 10 file byte for byte"
    assert server.stored == [path.read_bytes()]
    (record,) = store.deliveries(study_uid)
    assert record.state is DeliveryState.DELIVERED and seen == [("web", True)]
    assert "HTTP Request: POST" in caplog.text, "httpx's request log must be captured for this check to mean much"
    assert "s3cr" not in caplog.text


def test_stow_without_the_right_credentials_is_refused_and_recorded(store, tmp_path):
    uid = write_sc(tmp_path / "SC.dcm")
    with StowServer(credentials=("reader", "right")) as server:
        url = server.base.replace("http://", "http://reader:wrong@")
        deliver, _ = dispatcher(store, f"web={url}")
        deliver.enqueue(STUDY, uid, "SC", tmp_path / "SC.dcm")
        deliver.run_once(T0)
    (record,) = store.deliveries(STUDY)
    assert record.last_error == "web: STOW-RS answered 401 Unauthorized" and "wrong" not in record.last_error


@pytest.mark.parametrize(("answer", "message", "retryable", "down", "retry_after"), [
    (lambda: failed_sop_json(409, 0xA900), "409 Conflict with failure reasons 0xA900 (data set does not match",
     False, False, None),
    (lambda: failed_sop_xml(409, 0xC000), "409 Conflict with failure reasons 0xC000 (cannot understand)",
     False, False, None),
    (lambda: failed_sop_json(202, 0xA700), "202 Accepted with failure reasons 0xA700 (out of resources)",
     True, False, None),
    (lambda: failed_sop_xml(200, 0x0110), "200 OK with failure reasons 0x0110 (processing failure)",
     True, False, None),
    (lambda: (503, {"Retry-After": "120"}, b"busy"), "503 Service Unavailable", True, True, 120.0),
    (lambda: (400, {}, b""), "400 Bad Request", False, False, None),
    (lambda: (301, {"Location": "http://elsewhere/"}, b""), "a redirect", False, True, None),
])
def test_stow_failures_are_classified(tmp_path, answer, message, retryable, down, retry_after):
    write_sc(tmp_path / "SC.dcm")
    with StowServer(answer=lambda request: answer()) as server:
        sender = StowSender(Destination.parse(f"web={server.base}"), **FAST)
        with pytest.raises(DeliveryError) as caught:
            sender.send(tmp_path / "SC.dcm")
        sender.close()
    error = caught.value
    assert message in error.message and error.message.startswith("web: STOW-RS answered")
    assert (error.retryable, error.destination_down, error.retry_after_s) == (retryable, down, retry_after)


@pytest.mark.parametrize("answer", [
    lambda: failed_sop_json(409, 0x0111),  # duplicate SOP instance: an earlier send got there
    lambda: (202, {"Content-Type": "application/dicom+json"}, json.dumps({"00081199": {"vr": "SQ", "Value": [
        {"00081155": {"vr": "UI", "Value": ["1.2.3"]}, "00081196": {"vr": "US", "Value": [0xB000]}}]}}).encode()),
    lambda: (200, {}, b""),
])
def test_stow_successes_include_duplicates_and_warnings(tmp_path, answer):
    write_sc(tmp_path / "SC.dcm")
    with StowServer(answer=lambda request: answer()) as server:
        sender = StowSender(Destination.parse(server.base), **FAST)
        sender.send(tmp_path / "SC.dcm")  # no DeliveryError
        sender.close()
    assert len(server.requests) == 1


def test_a_stow_rejection_is_recorded_and_kept(store, tmp_path):
    uid = write_sc(tmp_path / "SC.dcm")
    with StowServer(answer=lambda request: failed_sop_json(409, 0xA900)) as server:
        deliver, seen = dispatcher(store, f"web={server.base}", max_attempts=2,
                                   backoff=Backoff(base_s=1, max_s=50, jitter=0))
        deliver.enqueue(STUDY, uid, "SC", tmp_path / "SC.dcm")
        assert deliver.run_once(T0) == 1
        (first,) = store.deliveries(STUDY)
        assert first.next_attempt_at == T0 + timedelta(seconds=50), "a rejection waits the longest backoff"
        assert deliver.run_once(T0 + timedelta(seconds=49)) == 0
        assert deliver.run_once(T0 + timedelta(seconds=50)) == 1
    (record,) = store.deliveries(STUDY)
    assert record.state is DeliveryState.FAILED and record.attempts == 2 and record.next_attempt_at is None
    assert "409 Conflict with failure reasons 0xA900" in record.last_error
    assert seen == [("web", False), ("web", False)] and len(server.requests) == 2


# --- unreachable destinations, retries, recovery ---------------------------------------------------------

@pytest.mark.parametrize("scheme", ["dicom", "dicomweb"])
def test_an_unreachable_destination_backs_off_until_failed_and_keeps_the_delivery(store, tmp_path, scheme):
    uid = write_sc(tmp_path / "SC.dcm")
    port = free_port()  # nothing listens: refused at once
    url = f"dicom://PACS@127.0.0.1:{port}" if scheme == "dicom" else f"http://127.0.0.1:{port}/dicom-web"
    backoff = Backoff(base_s=30, factor=2, max_s=600, jitter=0.2)
    deliver, seen = dispatcher(store, f"down={url}", max_attempts=5, backoff=backoff)
    deliver.enqueue(STUDY, uid, "SC", tmp_path / "SC.dcm")
    now, waits = T0, []
    for attempt in range(1, 6):
        started = time.monotonic()
        assert deliver.run_once(now) == 1
        assert time.monotonic() - started < 3, "a refused connection must not wait for a timeout"
        (record,) = store.deliveries(STUDY)
        assert record.attempts == attempt
        assert ("could not connect" if scheme == "dicom" else "ConnectError") in record.last_error
        if attempt < 5:
            assert record.state is DeliveryState.PENDING
            wait = (record.next_attempt_at - now).total_seconds()
            ceiling = backoff.ceiling_s(attempt)
            assert 0.8 * ceiling <= wait <= ceiling
            waits.append(wait)
            assert deliver.run_once(record.next_attempt_at - timedelta(seconds=1)) == 0, "not due yet"
            now = record.next_attempt_at
    assert waits == sorted(waits) and len(set(waits)) == 4, f"waits must grow: {waits}"
    assert record.state is DeliveryState.FAILED and record.next_attempt_at is None
    assert store.deliveries(STUDY, DeliveryState.FAILED) == [record], "a failed delivery stays in the store"
    assert deliver.run_once(now + timedelta(days=1)) == 0, "a failed delivery is not sent again"
    assert seen == [("down", False)] * 5
    assert deliver.counts()[DeliveryState.FAILED] == 1


@pytest.mark.parametrize("scheme", ["dicom", "dicomweb"])
def test_a_receiver_that_comes_up_later_gets_the_pending_delivery(store, tmp_path, scheme):
    uid = write_sc(tmp_path / "SC.dcm")
    port = free_port()
    url = f"dicom://PACS@127.0.0.1:{port}" if scheme == "dicom" else f"http://127.0.0.1:{port}/dicom-web"
    deliver, seen = dispatcher(store, f"later={url}")
    deliver.enqueue(STUDY, uid, "SC", tmp_path / "SC.dcm")
    assert deliver.run_once(T0) == 1
    (pending,) = store.deliveries(STUDY)
    assert pending.state is DeliveryState.PENDING
    if scheme == "dicom":
        with storescp(port, tmp_path / "pacs") as out:
            assert deliver.run_once(pending.next_attempt_at) == 1
            got = received_file(out, uid).read_bytes()
    else:
        with StowServer(port=port) as server:
            assert deliver.run_once(pending.next_attempt_at) == 1
        (got,) = server.stored
    (record,) = store.deliveries(STUDY)
    assert record.state is DeliveryState.DELIVERED and record.attempts == 2
    assert dataset_bytes(got) == dataset_bytes((tmp_path / "SC.dcm").read_bytes())
    assert seen == [("later", False), ("later", True)]


def test_a_down_destination_costs_one_timeout_per_round_and_does_not_hold_up_the_others(store, tmp_path):
    """Three objects for a black hole and one for a working STOW server: the round takes about one timeout
    (not three), the working destination is served, and every black-hole delivery gets an attempt recorded
    (so they cannot crowd the working one out of later rounds)."""
    uids = [write_sc(tmp_path / f"SC{i}.dcm") for i in range(3)]
    with black_hole() as port, StowServer() as server:
        deliver, seen = dispatcher(store, f"hole=dicom://PACS@127.0.0.1:{port},web={server.base}")
        senders = deliver.senders
        assert isinstance(senders["hole"], CStoreSender)
        senders["hole"].timeout_s = 1.0
        for i, uid in enumerate(uids):
            deliver.enqueue(STUDY, uid, "SC", tmp_path / f"SC{i}.dcm")
        started = time.monotonic()
        assert deliver.run_once(T0 + timedelta(seconds=1)) == 6
        took = time.monotonic() - started
    assert 0.9 <= took < 2.5, f"one ACSE timeout, not three: {took:.2f} s"
    by_state = {(r.destination, r.state) for r in store.deliveries(STUDY)}
    assert by_state == {("hole", DeliveryState.PENDING), ("web", DeliveryState.DELIVERED)}
    hole = [r for r in store.deliveries(STUDY) if r.destination == "hole"]
    assert all(r.attempts == 1 for r in hole)
    assert sum(r.last_error.startswith("not sent: hole: association aborted or no answer within 1 s")
               for r in hole) == 2
    assert len(server.stored) == 3 and sorted(seen) == [("hole", False)] * 3 + [("web", True)] * 3


def test_the_background_thread_never_blocks_intake(store, tmp_path):
    """With the only destination a black hole, enqueue returns at database speed while the delivery thread
    waits out its timeout; stop() returns within that timeout and leaves what it has not tried untouched
    (no attempts spent on shutdown); the attempt made is recorded; nothing is lost."""
    paths = [tmp_path / f"SC{i}.dcm" for i in range(5)]
    uids = [write_sc(path) for path in paths]
    with black_hole() as port:
        deliver, seen = dispatcher(store, f"hole=dicom://PACS@127.0.0.1:{port}", poll_interval_s=0.2)
        deliver.senders["hole"].timeout_s = 1.5  # type: ignore[attr-defined]
        deliver.enqueue(STUDY, uids[0], "SC", paths[0])
        deliver.enqueue(STUDY, uids[1], "SC", paths[1])  # same round, after the first
        deliver.start()
        try:
            time.sleep(0.3)  # the thread is now inside the first association attempt
            for uid, path in zip(uids[2:], paths[2:], strict=True):
                started = time.monotonic()
                deliver.enqueue(STUDY, uid, "SC", path)
                assert time.monotonic() - started < 0.5, "enqueue must not wait for the destination"
            assert deliver.running
        finally:
            started = time.monotonic()
            assert deliver.stop(timeout_s=5)
            assert time.monotonic() - started < 3.5
        assert not deliver.running
    records = store.deliveries(STUDY)
    assert len(records) == 5 and all(r.state is DeliveryState.PENDING for r in records), "nothing dropped"
    assert [r.attempts for r in records] == [1, 0, 0, 0, 0]
    assert records[0].last_error == "hole: association aborted or no answer within 1.5 s"
    assert seen == [("hole", False)]


def test_a_black_hole_does_not_delay_the_next_round_of_another_destination(store, tmp_path):
    """Background loops, one per destination: while the black hole waits out its 3 s timeout, an object
    enqueued for both destinations is stored by the working one at once (a shared round would have held it
    until the timeout ended). A delivery to a destination no longer configured gets its attempt too."""
    paths = [tmp_path / f"SC{i}.dcm" for i in range(2)]
    uids = [write_sc(path) for path in paths]
    gone = store.add_delivery(STUDY, generate_uid(), DeliveryKind.SC, "gone", str(paths[0]))
    with black_hole() as port, StowServer() as server:
        deliver, seen = dispatcher(store, f"hole=dicom://PACS@127.0.0.1:{port},web={server.base}",
                                   poll_interval_s=30)
        deliver.senders["hole"].timeout_s = 3.0  # type: ignore[attr-defined]
        deliver.enqueue(STUDY, uids[0], "SC", paths[0])
        deliver.start()
        try:
            deadline = time.monotonic() + 2
            while len(server.stored) < 1:  # the first object reached the working destination
                assert time.monotonic() < deadline
                time.sleep(0.02)
            time.sleep(0.2)  # the hole's loop is inside its association attempt now
            enqueued = time.monotonic()
            deliver.enqueue(STUDY, uids[1], "SC", paths[1])
            while len(server.stored) < 2:
                assert time.monotonic() - enqueued < 1.5, "the working destination waited for the black hole"
                time.sleep(0.02)
            hole_pending = [r for r in store.deliveries(STUDY) if r.destination == "hole" and r.attempts == 0]
            assert hole_pending, "the second object must still wait for the hole's loop (it is busy)"
            deadline = time.monotonic() + 5
            while not next(r for r in store.deliveries(STUDY) if r.id == gone).attempts:
                assert time.monotonic() < deadline, "the unconfigured destination's delivery was never attempted"
                time.sleep(0.05)
        finally:
            assert deliver.stop(timeout_s=10)
    unconfigured = next(r for r in store.deliveries(STUDY) if r.id == gone)
    assert "is not configured" in unconfigured.last_error
    assert ("web", True) in seen and seen.count(("web", True)) == 2


def test_the_background_thread_delivers_what_is_enqueued(store, tmp_path):
    uid = write_sc(tmp_path / "SC.dcm")
    with StowServer() as server:
        deliver, seen = dispatcher(store, f"web={server.base}", poll_interval_s=30)
        deliver.start()
        try:
            deliver.enqueue(STUDY, uid, "SC", tmp_path / "SC.dcm")  # wakes the thread; no 30 s poll wait
            deadline = time.monotonic() + 5
            while store.delivery_counts()[DeliveryState.DELIVERED] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            deliver.close()
    assert store.deliveries(STUDY)[0].state is DeliveryState.DELIVERED and seen == [("web", True)]
    assert server.stored == [(tmp_path / "SC.dcm").read_bytes()]


def test_enqueue_is_idempotent_and_one_per_destination(store, tmp_path):
    uid = write_sc(tmp_path / "SC.dcm")
    deliver, _ = dispatcher(store, "a=dicom://PACS@127.0.0.1:9,b=http://127.0.0.1:9/dicom-web")
    first = deliver.enqueue(STUDY, uid, DeliveryKind.SC, tmp_path / "SC.dcm")
    assert sorted(first) == ["a", "b"] and deliver.enqueue(STUDY, uid, "SC", tmp_path / "SC.dcm") == first
    assert [(r.destination, r.kind, r.path) for r in store.deliveries(STUDY)] == [
        ("a", DeliveryKind.SC, str(tmp_path / "SC.dcm")), ("b", DeliveryKind.SC, str(tmp_path / "SC.dcm"))]
    with pytest.raises(FileNotFoundError, match="no result object"):
        deliver.enqueue(STUDY, generate_uid(), "SC", tmp_path / "missing.dcm")


def test_unconfigured_destinations_and_vanished_files_are_recorded_not_dropped(store, tmp_path):
    uid = write_sc(tmp_path / "SC.dcm")
    store.add_delivery(STUDY, uid, DeliveryKind.SC, "removed", str(tmp_path / "SC.dcm"))
    with StowServer() as server:
        deliver, seen = dispatcher(store, f"web={server.base}", backoff=Backoff(base_s=1, max_s=100, jitter=0))
        deliver.enqueue(STUDY, uid, "SC", tmp_path / "SC.dcm")
        (tmp_path / "SC.dcm").unlink()
        assert deliver.run_once(T0) == 2
    assert not server.requests
    removed, web = store.deliveries(STUDY)
    assert "'removed' is not configured" in removed.last_error
    assert web.last_error.startswith("the object file is missing")
    assert all(r.state is DeliveryState.PENDING and r.next_attempt_at == T0 + timedelta(seconds=100)
               for r in (removed, web))
    assert sorted(seen) == [("removed", False), ("web", False)]


def test_hooks_that_raise_and_store_records_that_moved_on_do_not_break_a_round(store, tmp_path, caplog):
    uid = write_sc(tmp_path / "SC.dcm")
    with StowServer() as server:
        senders = make_senders(parse_destinations(f"web={server.base}"), **FAST)

        def broken(name: str, ok: bool) -> None:
            raise RuntimeError("metrics down")

        deliver = Dispatcher(store, senders, on_attempt=broken)
        deliver.enqueue(STUDY, uid, "SC", tmp_path / "SC.dcm")
        (due,) = store.due_deliveries(now=T0 + timedelta(days=1))
        store.delivery_attempt(due.id, True)  # another process delivered it in between
        assert deliver._record(due, None, T0) == 0  # noqa: SLF001 - the race is not reachable otherwise
        assert "could not record the attempt" in caplog.text
        uid2 = write_sc(tmp_path / "SC2.dcm")
        deliver.enqueue(STUDY, uid2, "SC", tmp_path / "SC2.dcm")
        assert deliver.run_once(T0 + timedelta(days=1)) == 1
    assert "delivery metrics hook failed" in caplog.text
    assert store.delivery_counts()[DeliveryState.DELIVERED] == 2


def test_run_once_refuses_a_naive_time(store):
    deliver, _ = dispatcher(store, "")
    with pytest.raises(ValueError, match="timezone-aware"):
        deliver.run_once(datetime(2030, 1, 1))


def test_a_real_pacs_takes_the_seg_by_stow_rs_and_c_store(store, real_seg, tmp_path):
    """Orthanc (with its DICOMweb plugin) as the PACS: the SEG goes in once by STOW-RS and once by C-STORE
    (to two Orthancs, so neither send can pass for the other) and each PACS holds it, byte for byte."""
    from tests.orthanc import orthanc_server

    path, study_uid, sop_uid = real_seg
    store.receive(received(study_uid))
    with orthanc_server(tmp_path / "a", {}) as web_pacs, orthanc_server(tmp_path / "b", {}) as dicom_pacs:
        deliver, seen = dispatcher(store, f"web={web_pacs.http.replace('http://', 'dicomweb+http://')}/dicom-web,"
                                          f"pacs=dicom://{dicom_pacs.aet}@127.0.0.1:{dicom_pacs.dicom_port}")
        deliver.enqueue(study_uid, sop_uid, "SEG", path)
        assert deliver.run_once() == 2
        for pacs in (web_pacs, dicom_pacs):
            (found,) = pacs.post("/tools/lookup", sop_uid.encode(), "text/plain")
            stored = pacs.get_bytes(f"/instances/{found['ID']}/file")
            assert dataset_bytes(stored) == dataset_bytes(path.read_bytes())
    assert {(r.destination, r.state) for r in store.deliveries(study_uid)} == {
        ("web", DeliveryState.DELIVERED), ("pacs", DeliveryState.DELIVERED)}
    assert sorted(seen) == [("pacs", True), ("web", True)]


# --- the peer's free text stays out of the store and the logs (issue 13 §11a) ---------------------------------

PEER_TEXT = "DOE^JOHN"  # what a receiver might quote from the object it refused


def test_a_cstore_error_comment_is_neither_stored_nor_logged(store, tmp_path, caplog):
    """The receiver's Error Comment is its own free text (it can quote the object's values): the delivery
    keeps the status code and our words for it only."""
    caplog.set_level(logging.DEBUG)
    uid = write_sc(tmp_path / "SC.dcm")
    status = Dataset()
    status.Status, status.ErrorComment = 0xC123, f"bad name {PEER_TEXT}"
    port = free_port()
    with pynetdicom_scp(status, port) as seen_by_scp:
        deliver, _ = dispatcher(store, f"pacs=dicom://PACS@127.0.0.1:{port}")
        deliver.enqueue(STUDY, uid, "SC", tmp_path / "SC.dcm")
        assert deliver.run_once(T0) == 1
    assert seen_by_scp == [uid]
    (record,) = store.deliveries(STUDY)
    assert record.last_error == "pacs: C-STORE failed with status 0xC123 (cannot understand)"
    assert "attempt 1 of 10 failed" in caplog.text and PEER_TEXT not in caplog.text


def test_a_stow_reason_phrase_and_body_are_neither_stored_nor_logged(store, tmp_path, caplog):
    """A server's own reason phrase and its response body are its free text: the delivery keeps the status
    with the standard phrase, and so does httpx's request log line (INFO; httpcore's DEBUG traces are off)."""
    caplog.set_level(logging.INFO)
    uid = write_sc(tmp_path / "SC.dcm")

    class Quoting(StowServer):
        def __init__(self) -> None:
            super().__init__(answer=lambda request: (400, {"Content-Type": "text/plain"},
                                                     f"rejected: patient {PEER_TEXT}".encode()))
            handler = self.httpd.RequestHandlerClass
            plain = handler.send_response

            def send_response(this: http.server.BaseHTTPRequestHandler, code: int, message: str | None = None) -> None:
                plain(this, code, f"Refused {PEER_TEXT}" if code == 400 else message)

            handler.send_response = send_response  # type: ignore[method-assign]

    with Quoting() as server:
        deliver, _ = dispatcher(store, f"web={server.base}")
        deliver.enqueue(STUDY, uid, "SC", tmp_path / "SC.dcm")
        assert deliver.run_once(T0) == 1
    (record,) = store.deliveries(STUDY)
    assert record.last_error == "web: STOW-RS answered 400 Bad Request"
    assert '400 Bad Request"' in caplog.text, "httpx's request line must be captured for this check to mean much"
    assert "attempt 1 of 10 failed" in caplog.text and PEER_TEXT not in caplog.text


@contextlib.contextmanager
def garbled_http() -> Iterator[int]:
    """A port whose server answers every request with a status line no HTTP client accepts, quoting text."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    stop = threading.Event()

    def serve() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                connection, _ = sock.accept()
            except OSError:
                continue
            with connection:
                connection.settimeout(2)
                with contextlib.suppress(OSError):
                    connection.recv(1 << 16)
                    connection.sendall(f"HTTP/1.1 4xx {PEER_TEXT} said no\r\n\r\n".encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(sock.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        sock.close()


def test_a_protocol_error_quoting_the_server_is_recorded_by_its_type(store, tmp_path, caplog):
    """httpx's protocol errors quote what the server sent; only the error's type is kept."""
    caplog.set_level(logging.INFO)
    uid = write_sc(tmp_path / "SC.dcm")
    with garbled_http() as port:
        deliver, _ = dispatcher(store, f"web=http://127.0.0.1:{port}/dicom-web")
        deliver.enqueue(STUDY, uid, "SC", tmp_path / "SC.dcm")
        assert deliver.run_once(T0) == 1
    (record,) = store.deliveries(STUDY)
    assert record.last_error == "web: RemoteProtocolError (no STOW-RS answer)"
    assert PEER_TEXT not in caplog.text


def test_a_sender_bug_is_recorded_by_its_type_not_its_message(store, tmp_path, caplog):
    """An exception the sender did not expect (a bug) keeps its type and frames, not its message, which may
    quote a library's reading of the object (a unit test of the dispatcher's handling: the sender is ours)."""
    uid = write_sc(tmp_path / "SC.dcm")

    class Buggy:
        destination = Destination.parse("bug=dicom://PACS@127.0.0.1:104")

        def send(self, path: object) -> None:
            raise RuntimeError(f"could not encode {PEER_TEXT}")

        def close(self) -> None:
            pass

    deliver = Dispatcher(store, {"bug": Buggy()})
    deliver.enqueue(STUDY, uid, "SC", tmp_path / "SC.dcm")
    assert deliver.run_once(T0) == 1
    (record,) = store.deliveries(STUDY)
    assert record.last_error == "internal error in the sender (RuntimeError)"
    assert "the sender raised RuntimeError at test_delivery.py" in caplog.text and PEER_TEXT not in caplog.text
