"""The DICOM listener and the intake behind it, over real loopback networking.

Senders are dcmtk's `storescu` / `echoscu` (another implementation than the one under test) where a plain
send is enough, and pynetdicom where the test must hold associations open or read negotiation results. The
intake runs the real triage in-process (`Edge` + `ModelRunner` with the bundled demo models), so "the
worklist has the right priority" means the priority the service gives that film over HTTP. The crash test
SIGKILLs a real listener process in the middle of a burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore
    ComputedRadiographyImageStorage,
    CTImageStorage,
    Verification,
)

from service.cascade.finding import Finding
from service.cascade.flow import Flow
from service.imaging.radiograph import RadiographError
from service.models.backends.onnxruntime_cpu import OnnxRuntimeCPU
from service.models.model_set import resolve
from service.models.runner import CLASSIFY_ROW, ModelRunner, unpack
from service.pacs.allowlist import CallingAeAllowlist
from service.pacs.intake import INTERNAL_ERROR, Intake
from service.pacs.listener import OUT_OF_RESOURCES, DicomListener
from service.pacs.spool import Spool
from service.settings import load_settings
from service.store import (
    SPOOL_MISSING,
    FindingRecord,
    InstanceRecord,
    InstanceStatus,
    ReceivedInstance,
    ResultsStore,
    StudyStatus,
    open_store,
    utc_now,
)
from tests.dicom_factory import chest_like, dataset
from tests.realdata import CHEST
from tests.servers import REPO

STORESCU, ECHOSCU = "/usr/bin/storescu", "/usr/bin/echoscu"
pytestmark = pytest.mark.skipif(not (os.access(STORESCU, os.X_OK) and os.access(ECHOSCU, os.X_OK)),
                                reason="dcmtk's storescu/echoscu are needed (apt-get install dcmtk)")

# storescu proposes only uncompressed syntaxes unless told which compressed one the file is in.
STORESCU_SYNTAX_FLAG = {"1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx",
                        "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw",
                        "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu",
                        "1.2.840.10008.1.2.5": "-xr"}
SENTINELS = ("Sentinel^Patient", "SENTINEL-ID-0001")  # the factory's patient name and ID


# --------------------------------------------------------------------------------------------------------------
# Senders


def storescu(port: int, path: Path, calling_ae: str = "SENDER") -> bool:
    """Send one file with dcmtk; True when it answered success (the response line, not only the exit code)."""
    syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    flags = ["-R", STORESCU_SYNTAX_FLAG[syntax]] if syntax in STORESCU_SYNTAX_FLAG else []
    result = subprocess.run([STORESCU, "-v", *flags, "-aet", calling_ae, "-aec", "PTXTRIAGE", "127.0.0.1",
                             str(port), str(path)], check=False, capture_output=True, text=True, timeout=60)
    return result.returncode == 0 and "Received Store Response (Success)" in result.stdout + result.stderr


def scu(calling_ae: str = "SENDER", contexts: tuple[str, ...] = (ComputedRadiographyImageStorage,)) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5  # a dead peer must not stall a test for 30 s
    for context in contexts:
        ae.add_requested_context(context)
    ae.add_requested_context(Verification)
    return ae


def small_film(**attributes: object) -> Dataset:
    """A 64×64 CR chest dataset with the factory's sentinel patient name and ID."""
    return dataset(chest_like(64, 64), **attributes)


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def send_with_pynetdicom(port: int, datasets: list[Dataset], calling_ae: str = "SENDER") -> list[Dataset]:
    assoc = scu(calling_ae).associate("127.0.0.1", port, ae_title="PTXTRIAGE")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()


def rejection(assoc: Any) -> tuple[int, int, int]:
    primitive = assoc.acceptor.primitive
    return primitive.result, primitive.result_source, primitive.diagnostic


# --------------------------------------------------------------------------------------------------------------
# Fixtures


@dataclass
class Receiver:
    spool: Spool
    store: ResultsStore
    listener: DicomListener
    received: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.listener.port

    def instances(self) -> dict[str, InstanceRecord]:
        return all_instances(self.store)


def all_instances(store: ResultsStore) -> dict[str, InstanceRecord]:
    """sop_uid → record, over every study on the worklist."""
    found = {}
    for item in store.worklist(limit=1000):
        study = store.study(item.study_uid)
        assert study is not None
        found.update({i.sop_uid: i for i in study.instances})
    return found


@contextlib.contextmanager
def receiver(data_dir: Path, *, store: ResultsStore | None = None, spool: Spool | None = None,
             on_received: Callable[[str], None] | None = None, **options: Any) -> Iterator[Receiver]:
    own_store = store is None
    store = store or open_store(None, data_dir)
    spool = spool or Spool(data_dir / "spool")
    received: list[str] = []

    def note(sop_uid: str) -> None:
        received.append(sop_uid)
        if on_received is not None:
            on_received(sop_uid)

    listener = DicomListener(spool, store, port=0, host="127.0.0.1", on_received=note, **options)
    listener.start()
    try:
        yield Receiver(spool, store, listener, received)
    finally:
        listener.stop()
        if own_store:
            store.close()


def ort_loader(entry: Any, settings: Any) -> OnnxRuntimeCPU:
    return OnnxRuntimeCPU(entry.directory / entry.manifest.files["onnx"], intra_op_threads=1)


class InProcessTriage:
    """The service's triage without BentoML: the same `Flow.run`, the models through a `ModelRunner`.

    Async like `service.cascade.served.ServedCascade.triage`; CPU steps in threads, the models one batch at a
    time; the parsed header and pixels kept on the Finding, as for the intake.
    """

    def __init__(self) -> None:
        settings = load_settings(environ={})
        models = resolve(settings)
        self.runner = ModelRunner(models, settings, loader=ort_loader)
        self.flow = Flow.from_settings(settings, models, {"classifier": "onnxruntime-cpu",
                                                          "segmenter": "onnxruntime-cpu"})
        self.side = models.segmenter_spec.size
        self.lock = threading.Lock()

    def _locked(self, run: Any, batch: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        with self.lock:
            return unpack(run(batch), shape).outputs

    async def classify(self, batch: np.ndarray) -> np.ndarray:
        return await asyncio.to_thread(self._locked, self.runner.classify, batch, CLASSIFY_ROW)  # [score, OOD]

    async def segment(self, batch: np.ndarray) -> np.ndarray:
        return await asyncio.to_thread(self._locked, self.runner.segment, batch, (self.side, self.side))

    def run(self, payload: bytes) -> Finding:
        return asyncio.run(self(payload))

    async def __call__(self, payload: bytes) -> Finding:
        return await self.flow.run(payload, self.classify, self.segment, asyncio.to_thread, keep_source=True)


@pytest.fixture(scope="module")
def triage() -> InProcessTriage:
    return InProcessTriage()


def chest_paths(realdata: Path) -> list[Path]:
    return [realdata / item.path for item in CHEST]


def sop_uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# --------------------------------------------------------------------------------------------------------------
# Verification and storage


def test_echo_answers_dcmtk(tmp_path: Path) -> None:
    with receiver(tmp_path) as rx:
        result = subprocess.run([ECHOSCU, "-v", "-aec", "PTXTRIAGE", "127.0.0.1", str(rx.port)],
                                check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Received Echo Response (Success)" in result.stdout + result.stderr


def test_real_chest_films_are_spooled_and_recorded_once(tmp_path: Path, realdata: Path) -> None:
    """The four real films (JPEG 2000 lossless DX, JPEG 2000 lossy CR, two JPEG baseline SC that share one SOP
    Instance UID) arrive as sent; a resend is success without a second row or queueing, and the second SIIM
    file (the same UID with other bytes: MONOCHROME1 flagged) is refused (issue 13 §3), the first kept."""
    paths = chest_paths(realdata)
    with receiver(tmp_path) as rx:
        seen: set[str] = set()
        for path in paths:
            first = sop_uid_of(path) not in seen
            seen.add(sop_uid_of(path))
            assert storescu(rx.port, path) == first, path.name
        resent = rx.spool.path(sop_uid_of(paths[-1]))
        written = resent.stat().st_mtime_ns
        assert storescu(rx.port, paths[-1])  # the same file again
        assert resent.stat().st_mtime_ns == written  # not even rewritten
        instances = rx.instances()
        pending = rx.spool.pending()
        assert all(item.status is StudyStatus.PENDING for item in rx.store.worklist())
    first_by_uid: dict[str, Path] = {}
    for path in paths:
        first_by_uid.setdefault(sop_uid_of(path), path)
    assert len(first_by_uid) == 3  # the two SIIM files are one instance
    assert sorted(instances) == sorted(first_by_uid) == sorted(pending)
    assert sorted(rx.received) == sorted(first_by_uid)  # each new instance queued exactly once
    for uid, path in first_by_uid.items():
        record = instances[uid]
        assert record.status is InstanceStatus.RECEIVED and record.source == "dicom:SENDER"
        assert record.spool_path == str(rx.spool.path(uid))
        spooled = pydicom.dcmread(rx.spool.path(uid))
        original = pydicom.dcmread(path)
        assert spooled.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID  # not transcoded
        assert spooled.PixelData == original.PixelData  # the first copy of the repeated UID, not the second
        assert spooled.PhotometricInterpretation == original.PhotometricInterpretation
        assert record.study_uid == original.StudyInstanceUID and record.sop_class_uid == original.SOPClassUID


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, RLELossless],
                         ids=lambda uid: uid.name)
def test_each_transfer_syntax_is_spooled_as_a_readable_file(tmp_path: Path, syntax: UID) -> None:
    """What goes into the spool is a valid DICOM file in the syntax it was sent in, with the same pixels."""
    film = small_film()
    expected = film.pixel_array.copy()
    if syntax == RLELossless:
        film.compress(RLELossless, encoding_plugin="pydicom")
    else:
        film.file_meta.TransferSyntaxUID = syntax
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(ComputedRadiographyImageStorage, [syntax])
    with receiver(tmp_path) as rx:
        assoc = ae.associate("127.0.0.1", rx.port, ae_title="PTXTRIAGE")
        assert assoc.is_established and assoc.accepted_contexts[0].transfer_syntax[0] == syntax
        try:
            assert assoc.send_c_store(film).Status == 0x0000
        finally:
            assoc.release()
        spooled = pydicom.dcmread(rx.spool.path(film.SOPInstanceUID))
    assert spooled.file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(spooled.pixel_array, expected)


def test_stop_ends_open_associations(tmp_path: Path) -> None:
    with receiver(tmp_path) as rx:
        held = scu().associate("127.0.0.1", rx.port, ae_title="PTXTRIAGE")
        assert held.is_established
        started = time.monotonic()
        rx.listener.stop(grace_s=0.5)
        assert time.monotonic() - started < 5
        deadline = time.monotonic() + 5
        while held.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        assert held.is_aborted
        refused = scu().associate("127.0.0.1", rx.port, ae_title="PTXTRIAGE")
        assert not refused.is_established  # nothing listens any more


def test_unknown_calling_ae_is_rejected_at_association(tmp_path: Path) -> None:
    with receiver(tmp_path, allowed_calling_aes={"MODALITY1"}) as rx:
        assoc = scu("INTRUDER").associate("127.0.0.1", rx.port, ae_title="PTXTRIAGE")
        assert assoc.is_rejected
        # rejected-permanent, by the service-user, "calling AE title not recognised" (PS3.8 9.3.4)
        assert rejection(assoc) == (0x01, 0x01, 0x03)
        echo = subprocess.run([ECHOSCU, "-aet", "INTRUDER", "-aec", "PTXTRIAGE", "127.0.0.1", str(rx.port)],
                              check=False, capture_output=True, text=True, timeout=30)
        assert echo.returncode != 0 and "Calling AE Title Not Recognized" in echo.stdout + echo.stderr
        statuses = send_with_pynetdicom(rx.port, [small_film()], calling_ae="MODALITY1")
        assert [s.Status for s in statuses] == [0x0000]
        assert [r.source for r in rx.instances().values()] == ["dicom:MODALITY1"]


def test_allowlist_entries_tie_a_calling_ae_to_addresses() -> None:
    allow = CallingAeAllowlist.parse("PACS1@10.0.0.5, MOD@10.1.0.0/16, MOD@fd00::/8, WORKSTATION ,")
    assert allow.allows("PACS1", "10.0.0.5") and not allow.allows("PACS1", "10.0.0.6")
    assert allow.allows("MOD", "10.1.255.3") and not allow.allows("MOD", "10.2.0.1")
    assert allow.allows("MOD", "fd00::17") and not allow.allows("MOD", "fe80::1")
    assert allow.allows("PACS1", "::ffff:10.0.0.5")  # an IPv4 peer on a dual-stack socket
    assert allow.allows("WORKSTATION", "192.0.2.1") and allow.allows("WORKSTATION ", "::1")  # bare: anywhere
    assert not allow.allows("pacs1", "10.0.0.5") and not allow.allows("OTHER", "10.0.0.5")
    assert not allow.allows("PACS1", "not-an-address")
    # A bare title and an address entry for the same title: the bare one wins (any address).
    assert CallingAeAllowlist.parse(["A@10.0.0.1", "A"]).allows("A", "192.0.2.9")
    assert CallingAeAllowlist.parse(["A", "A@10.0.0.1"]).allows("A", "192.0.2.9")
    assert CallingAeAllowlist.parse("A@10.0.0.1,A@10.0.0.2").describe() == "A@10.0.0.1/32, A@10.0.0.2/32"
    for bad, why in (("PACS1@pacs.example.org", "not an IP address"), ("@10.0.0.1", "AE title"),
                     ("A" * 17, "AE title"), (" , ", "empty"), ("PACS1@10.0.0.300", "not an IP address")):
        with pytest.raises(ValueError, match=why):
            CallingAeAllowlist.parse(bad)
    with pytest.raises(ValueError, match="dicom_allowed_aes"):
        load_settings(environ={"PTX_DICOM_ALLOWED_AES": "PACS1@pacs.example.org"})


def test_a_known_calling_ae_from_another_address_is_rejected_at_association(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ptx.dicom")
    allowed = ["MODALITY1@127.0.0.0/8", "PACS1@10.0.0.5", "ANYWHERE"]
    with receiver(tmp_path, allowed_calling_aes=allowed) as rx:
        remote_only = scu("PACS1").associate("127.0.0.1", rx.port, ae_title="PTXTRIAGE")
        assert remote_only.is_rejected and rejection(remote_only) == (0x01, 0x01, 0x03)
        stranger = scu("INTRUDER").associate("127.0.0.1", rx.port, ae_title="PTXTRIAGE")
        assert stranger.is_rejected and rejection(stranger) == (0x01, 0x01, 0x03)
        echo = subprocess.run([ECHOSCU, "-aet", "PACS1", "-aec", "PTXTRIAGE", "127.0.0.1", str(rx.port)],
                              check=False, capture_output=True, text=True, timeout=30)
        assert echo.returncode != 0 and "Calling AE Title Not Recognized" in echo.stdout + echo.stderr
        assert [s.Status for s in send_with_pynetdicom(rx.port, [small_film()], calling_ae="MODALITY1")] == [0]
        assert [s.Status for s in send_with_pynetdicom(rx.port, [small_film()], calling_ae="ANYWHERE")] == [0]
        assert sorted(r.source for r in rx.instances().values()) == ["dicom:ANYWHERE", "dicom:MODALITY1"]
    rejected = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert any("'PACS1' at 127.0.0.1" in line and "from that address" in line for line in rejected), rejected
    assert any("'INTRUDER' at 127.0.0.1" in line for line in rejected), rejected


def test_a_ct_image_gets_no_presentation_context(tmp_path: Path, realdata: Path) -> None:
    with receiver(tmp_path) as rx:
        assoc = scu(contexts=(CTImageStorage, ComputedRadiographyImageStorage)).associate(
            "127.0.0.1", rx.port, ae_title="PTXTRIAGE")
        assert assoc.is_established
        try:
            accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
            refused = {str(cx.abstract_syntax): cx.result for cx in assoc.rejected_contexts}
            assert CTImageStorage not in accepted and ComputedRadiographyImageStorage in accepted
            assert refused == {CTImageStorage: 0x03}  # abstract syntax not supported
            with pytest.raises(ValueError, match="presentation context"):
                assoc.send_c_store(pydicom.dcmread(realdata / "other" / "CT_small.dcm"))
        finally:
            assoc.release()
        assert not storescu(rx.port, realdata / "other" / "CT_small.dcm")
        assert rx.instances() == {} and rx.spool.pending() == []


def test_associations_beyond_the_limit_are_rejected(tmp_path: Path) -> None:
    with receiver(tmp_path, max_associations=2) as rx:
        held = [scu().associate("127.0.0.1", rx.port, ae_title="PTXTRIAGE") for _ in range(2)]
        assert all(a.is_established for a in held)
        extra = scu().associate("127.0.0.1", rx.port, ae_title="PTXTRIAGE")
        assert extra.is_rejected
        assert rejection(extra) == (0x02, 0x03, 0x02)  # rejected-transient, presentation, local limit exceeded
        held[0].release()
        deadline = time.monotonic() + 10
        while len([a for a in rx.listener.ae.active_associations if a.is_acceptor]) > 1:
            assert time.monotonic() < deadline, "the released association never ended"
            time.sleep(0.05)
        again = scu().associate("127.0.0.1", rx.port, ae_title="PTXTRIAGE")
        assert again.is_established  # a freed slot is usable
        again.release()
        held[1].release()


class FailingStore:
    """A store whose `receive` fails until told otherwise (a locked or unreachable database)."""

    def __init__(self, store: ResultsStore) -> None:
        self.store, self.broken = store, True

    def receive(self, instance: ReceivedInstance) -> bool:
        if self.broken:
            raise OSError("database is locked")
        return self.store.receive(instance)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


class FullSpool(Spool):
    def adopt(self, sop_uid: str, source: Path) -> Path:
        raise OSError(28, "No space left on device")


def test_no_success_before_the_instance_is_durable(tmp_path: Path) -> None:
    """A spool or store failure answers 0xA700 (the sender keeps the film and retries), never success."""
    film = small_film()
    with open_store(None, tmp_path) as real_store:
        failing = FailingStore(real_store)
        with receiver(tmp_path, store=failing) as rx:  # type: ignore[arg-type]
            (status,) = send_with_pynetdicom(rx.port, [film])
            assert status.Status == OUT_OF_RESOURCES and rx.received == []
            failing.broken = False
            (status,) = send_with_pynetdicom(rx.port, [film])  # the sender's retry
            assert status.Status == 0x0000 and rx.received == [film.SOPInstanceUID]
        with receiver(tmp_path, store=real_store, spool=FullSpool(tmp_path / "full")) as rx:
            (status,) = send_with_pynetdicom(rx.port, [small_film()])
            assert status.Status == OUT_OF_RESOURCES
            assert "retry" in status.ErrorComment
        assert [i.sop_uid for i in real_store.pending_instances()] == [film.SOPInstanceUID]


def test_unusable_datasets_are_refused_and_logs_carry_no_patient_data(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    good, no_study = small_film(), small_film(StudyInstanceUID=None)
    with receiver(tmp_path) as rx:
        statuses = send_with_pynetdicom(rx.port, [good, no_study, good])
        assert [s.Status for s in statuses] == [0x0000, 0xC000, 0x0000]
        assert "Study Instance UID" in statuses[1].ErrorComment
        assert rx.spool.pending() == [good.SOPInstanceUID] and list(rx.instances()) == [good.SOPInstanceUID]
    logged = caplog.text + "".join(str(s) for s in statuses)
    assert good.SOPInstanceUID in caplog.text  # UIDs are logged ...
    assert not any(sentinel in logged for sentinel in SENTINELS)  # ... patient attributes never


# --------------------------------------------------------------------------------------------------------------
# Intake: the spool drained through the real triage


def test_intake_puts_received_films_on_the_worklist(tmp_path: Path, realdata: Path, triage: InProcessTriage) -> None:
    """C-STOREs of the real chest films and a hip film → one worklist entry per study; each chest study has
    the priority the triage gives its film; the hip film fails as not_chest and its study has no priority."""
    paths = [*chest_paths(realdata), realdata / "other" / "cr_hip_jpegls_lossless.dcm"]
    firsts = {sop_uid_of(path): path for path in reversed(paths)}
    repeats = [path for path in paths if firsts[sop_uid_of(path)] != path]
    expected = {}
    for path in paths:
        if sop_uid_of(path) not in expected:
            try:
                expected[sop_uid_of(path)] = triage.run(path.read_bytes()).priority
            except RadiographError as exc:
                expected[sop_uid_of(path)] = exc.code.value
    waits: list[float] = []
    outputs: list[tuple[bytes, Finding]] = []

    async def on_finding(data: bytes, finding: Finding) -> None:
        outputs.append((data, finding))

    async def scenario() -> None:
        with open_store(None, tmp_path) as store:
            spool = Spool(tmp_path / "spool")
            intake = Intake(spool, store, triage, workers=2, on_finding=on_finding,
                            observe_notification=waits.append, poll_interval_s=60)
            await intake.start()
            try:
                with receiver(tmp_path, store=store, spool=spool, on_received=intake.notify) as rx:
                    for path in paths:
                        # the second file of a reused SOP Instance UID carries other bytes: refused (issue 13 §3)
                        assert await asyncio.to_thread(storescu, rx.port, path) == (path not in repeats)
                    await intake.wait_idle(60)
                    check(rx)
            finally:
                await intake.stop()

    def check(rx: Receiver) -> None:
        worklist = rx.store.worklist()
        assert len(worklist) == 4  # three chest studies and the hip study
        instances = rx.instances()
        assert sorted(instances) == sorted(expected)
        for uid, want in expected.items():
            record = instances[uid]
            study = next(item for item in worklist if item.study_uid == record.study_uid)
            if want == "not_chest":
                assert (record.status, record.error_code) == (InstanceStatus.FAILED, "not_chest")
                assert study.priority is None and study.status is StudyStatus.PENDING
            else:
                assert record.status is InstanceStatus.DONE and record.error_code is None
                assert study.priority == want and study.status is StudyStatus.TRIAGED
        ranks = [item.priority.rank if item.priority else 2 for item in worklist]
        assert ranks == sorted(ranks)
        assert rx.spool.pending() == []  # every outcome recorded, nothing left to drain
        assert len(waits) == 3 and all(0 < w < 60 for w in waits)
        assert sorted(f.sop_uid for _, f in outputs) == sorted(u for u, w in expected.items() if w != "not_chest")
        assert all(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID == f.sop_uid
                   for data, f in outputs)

    asyncio.run(scenario())


def spool_and_receive(spool: Spool, store: ResultsStore, path: Path) -> str:
    """What the listener does for one file (for intake tests that need no network)."""
    data = path.read_bytes()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    written = spool.write(ds.SOPInstanceUID, data)
    store.receive(ReceivedInstance(sop_uid=ds.SOPInstanceUID, study_uid=ds.StudyInstanceUID,
                                   series_uid=ds.SeriesInstanceUID, sop_class_uid=ds.SOPClassUID,
                                   source="dicom:TEST", spool_path=str(written), received_at=utc_now()))
    return str(ds.SOPInstanceUID)


def test_intake_resumes_after_a_restart(tmp_path: Path, realdata: Path, triage: InProcessTriage) -> None:
    """Stopped with films in progress → a new intake over the same spool and database finishes them; it also
    adopts a spooled film whose receipt was never recorded, fails one whose bytes are gone, and clears a
    leftover file of a finished film without triaging it again."""
    canon, philips, siim = (realdata / item.path for item in (CHEST[3], CHEST[2], CHEST[0]))
    started: list[str] = []

    async def stuck(payload: bytes) -> Finding:
        started.append(pydicom.dcmread(io.BytesIO(payload), stop_before_pixels=True).SOPInstanceUID)
        await asyncio.Event().wait()  # never returns: the "process" dies with these in progress
        raise AssertionError("unreachable")

    async def first_run() -> tuple[list[str], str]:
        with open_store(None, tmp_path) as store:
            spool = Spool(tmp_path / "spool")
            uids = [spool_and_receive(spool, store, path) for path in (canon, philips)]
            intake = Intake(spool, store, stuck, workers=2, poll_interval_s=60)
            await intake.start()
            for _ in range(200):
                if len(started) == 2:
                    break
                await asyncio.sleep(0.02)
            await intake.stop()
            assert sorted(started) == sorted(uids)
            assert {i.status for i in store.pending_instances()} == {InstanceStatus.PROCESSING}
            # Between runs: a film spooled but never recorded (killed between the two steps), a pending
            # record whose file is gone, and a leftover file of a film already finished.
            orphan = sop_uid_of(siim)
            spool.write(orphan, siim.read_bytes())
            lost = small_film()
            store.receive(ReceivedInstance(sop_uid=lost.SOPInstanceUID, study_uid=lost.StudyInstanceUID,
                                           series_uid=None, sop_class_uid=None, source="dicom:TEST",
                                           spool_path=str(spool.path(lost.SOPInstanceUID)), received_at=utc_now()))
            finished = small_film()
            store.receive(ReceivedInstance(sop_uid=finished.SOPInstanceUID, study_uid=finished.StudyInstanceUID,
                                           series_uid=None, sop_class_uid=None, source="dicom:TEST",
                                           spool_path=None, received_at=utc_now()))
            store.mark_instance(finished.SOPInstanceUID, InstanceStatus.FAILED, "not_chest")
            spool.write(finished.SOPInstanceUID, encode(finished))
            return uids + [orphan], lost.SOPInstanceUID

    triaged: list[str] = []

    async def counting(payload: bytes) -> Finding:
        finding = await triage(payload)
        triaged.append(str(finding.sop_uid))
        return finding

    async def second_run(uids: list[str], lost: str) -> None:
        with open_store(None, tmp_path) as store:  # a new process: new connections, new spool object
            spool = Spool(tmp_path / "spool")
            intake = Intake(spool, store, counting, workers=2, poll_interval_s=60)
            await intake.start()
            await intake.wait_idle(60)
            await intake.stop()
            assert sorted(triaged) == sorted(uids)  # the leftover was not triaged again
            assert store.pending_instances() == [] and spool.pending() == []
            records = all_instances(store)
            assert all(records[uid].status is InstanceStatus.DONE for uid in uids)
            assert records[uids[0]].attempts == 2 and records[uids[2]].attempts == 1
            assert records[uids[2]].source == "spool"
            assert (records[lost].status, records[lost].error_code) == (InstanceStatus.FAILED, SPOOL_MISSING)

    uids, lost = asyncio.run(first_run())
    asyncio.run(second_run(uids, lost))


def test_results_interrupted_after_the_finding_was_recorded_are_made_again(tmp_path: Path, realdata: Path,
                                                                          triage: InProcessTriage) -> None:
    """The process died after recording a finding and before removing the spool file (which follows the
    SEG/SR): at the next start the results are made again, the recorded finding is kept as it was, and the
    file goes only once they are made. A hook that fails keeps the file for the start after."""
    siim = realdata / CHEST[0].path
    with open_store(None, tmp_path) as store:
        spool = Spool(tmp_path / "spool")
        sop_uid = spool_and_receive(spool, store, siim)
        finding = asyncio.run(triage(siim.read_bytes()))
        assert store.record_finding(FindingRecord.from_finding(finding, utc_now()))
        before = store.finding(sop_uid)
    made: list[tuple[str, float]] = []

    async def broken(data: bytes, finding: Finding) -> None:
        raise OSError("results folder unwritable")

    async def making(data: bytes, finding: Finding) -> None:
        made.append((str(finding.sop_uid), finding.score))

    async def run(hook) -> None:
        with open_store(None, tmp_path) as store:
            intake = Intake(Spool(tmp_path / "spool"), store, triage, workers=1, poll_interval_s=60, on_finding=hook)
            await intake.start()
            await intake.wait_idle(60)
            await intake.stop()

    asyncio.run(run(broken))
    assert Spool(tmp_path / "spool").exists(sop_uid), "results not made: the file must stay for the next start"
    asyncio.run(run(making))
    assert made == [(sop_uid, pytest.approx(finding.score, abs=1e-6))]
    assert Spool(tmp_path / "spool").pending() == []
    with open_store(None, tmp_path) as store:
        assert store.finding(sop_uid) == before  # not recorded again
        assert all_instances(store)[sop_uid].status is InstanceStatus.DONE
    asyncio.run(run(making))  # nothing left: nothing made a third time
    assert len(made) == 1


def test_intake_polls_for_instances_it_was_not_told_about(tmp_path: Path, realdata: Path,
                                                          triage: InProcessTriage) -> None:
    """A lost notification (or a listener in another process) costs at most one poll interval."""
    waits: list[float] = []

    async def scenario() -> None:
        with open_store(None, tmp_path) as store:
            spool = Spool(tmp_path / "spool")
            intake = Intake(spool, store, triage, poll_interval_s=0.05, observe_notification=waits.append)
            await intake.start()
            try:
                uid = spool_and_receive(spool, store, realdata / CHEST[0].path)  # no notify()
                for _ in range(300):
                    if all_instances(store)[uid].status is InstanceStatus.DONE:
                        break
                    await asyncio.sleep(0.02)
                await intake.wait_idle(10)
            finally:
                await intake.stop()
            assert all_instances(store)[uid].status is InstanceStatus.DONE and spool.pending() == []
            assert len(waits) == 1 and waits[0] > 0

    asyncio.run(scenario())


class StaleReads:
    """A store whose `pending_instances`, once armed, answers with what was pending when the read began but
    returns only after the intake has finished those instances: the snapshot a slow poll sees."""

    def __init__(self, store: ResultsStore, spool: Spool) -> None:
        self.store, self.spool = store, spool
        self.armed, self.served_stale, self.read = False, False, threading.Event()

    def pending_instances(self, limit: int | None = None, listener: str | None = None) -> list[InstanceRecord]:
        records = self.store.pending_instances(limit, listener)
        if self.armed and records:
            self.armed = False
            self.read.set()  # lets the triage finish
            deadline = time.monotonic() + 30
            while any(self.spool.exists(r.sop_uid) for r in records) and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.1)  # and the worker untrack it
            self.served_stale = True
        return records

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_a_stale_poll_does_not_take_up_a_finished_instance_again(tmp_path: Path, realdata: Path,
                                                                 triage: InProcessTriage) -> None:
    async def scenario() -> None:
        with open_store(None, tmp_path) as real_store:
            spool = Spool(tmp_path / "spool")
            store = StaleReads(real_store, spool)

            async def after_the_poll_read(payload: bytes) -> Finding:
                await asyncio.to_thread(store.read.wait, 30)
                return await triage(payload)

            intake = Intake(spool, store, after_the_poll_read, poll_interval_s=0.02)  # type: ignore[arg-type]
            await intake.start()
            try:
                store.armed = True
                uid = spool_and_receive(spool, real_store, realdata / CHEST[0].path)
                intake.notify(uid)
                for _ in range(200):
                    if store.served_stale:
                        break
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.3)  # several more polls and any re-processing
                await intake.wait_idle(10)
            finally:
                await intake.stop()
            assert store.served_stale
            record = all_instances(real_store)[uid]
            assert (record.status, record.error_code, record.attempts) == (InstanceStatus.DONE, None, 1)

    asyncio.run(scenario())


def test_intake_retries_unexpected_errors_with_a_bound(tmp_path: Path, realdata: Path,
                                                       triage: InProcessTriage) -> None:
    """An exception other than a rejection is retried (with backoff) and succeeds once the fault clears; one
    that never clears ends as failed internal_error after `max_attempts`, its spool file kept; a failing
    on_finding hook does not undo the finding (the instance is outputs_pending, its film kept). After the
    fault is fixed, an operator's retry (`store.retry_instance`) sends the failed one through again: done."""
    flaky_uid, broken_uid = sop_uid_of(realdata / CHEST[0].path), sop_uid_of(realdata / CHEST[2].path)
    calls: dict[str, int] = {}

    async def faulty(payload: bytes) -> Finding:
        uid = pydicom.dcmread(io.BytesIO(payload), stop_before_pixels=True).SOPInstanceUID
        calls[uid] = calls.get(uid, 0) + 1
        if uid == broken_uid or calls[uid] <= 2:
            raise RuntimeError("model worker went away")
        return await triage(payload)

    async def broken_hook(data: bytes, finding: Finding) -> None:
        raise RuntimeError("SEG writer bug")

    async def scenario() -> None:
        with open_store(None, tmp_path) as store:
            spool = Spool(tmp_path / "spool")
            for item in (CHEST[0], CHEST[2]):
                spool_and_receive(spool, store, realdata / item.path)
            intake = Intake(spool, store, faulty, workers=2, max_attempts=4, retry_delay_s=0.01,
                            poll_interval_s=60, on_finding=broken_hook)
            await intake.start()
            await intake.wait_idle(60)
            await intake.stop()
            assert store.pending_instances() == []
            records = all_instances(store)
            flaky, broken = records[flaky_uid], records[broken_uid]
            assert (flaky.status, flaky.attempts, flaky.outputs_attempts) == (InstanceStatus.OUTPUTS_PENDING, 3, 1)
            assert (broken.status, broken.error_code, broken.attempts) == (InstanceStatus.FAILED, INTERNAL_ERROR, 4)
            assert calls == {flaky_uid: 3, broken_uid: 4} and sorted(spool.pending()) == sorted([broken_uid, flaky_uid])

            # A restart does not take the kept file for a leftover, nor triage it by itself.
            again = Intake(spool, store, faulty, workers=1, poll_interval_s=60)
            await again.start()
            await again.wait_idle(10)
            await again.stop()
            assert sorted(spool.pending()) == sorted([broken_uid, flaky_uid]) and calls[broken_uid] == 4

            # The fault fixed, the operator's retry: received with a fresh budget, then triaged.
            retried = store.retry_instance(broken_uid)
            assert (retried.status, retried.error_code, retried.attempts) == (InstanceStatus.RECEIVED, None, 0)
            fixed = Intake(spool, store, triage, workers=1, poll_interval_s=0.05)
            await fixed.start()  # a running intake finds it by its poll of the store's pending instances
            for _ in range(200):
                if all_instances(store)[broken_uid].status is InstanceStatus.DONE:
                    break
                await asyncio.sleep(0.05)
            await fixed.wait_idle(60)
            await fixed.stop()
            assert all_instances(store)[broken_uid].status is InstanceStatus.DONE
            assert spool.pending() == [flaky_uid]  # an intake without on_finding leaves outputs_pending alone

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------------------------
# Crash: SIGKILL in the middle of a burst


def start_listener_process(data_dir: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A listener process (pynetdicom writes datasets as they arrive into its spool's `receiving` folder, so
    the partial files a SIGKILL leaves stay in the test's folder, removed at the next start)."""
    log = log_path.open("ab")
    process = subprocess.Popen([sys.executable, "-m", "service.pacs.listener", "--port", "0",
                                "--data-dir", str(data_dir)], cwd=REPO, stdout=subprocess.PIPE, stderr=log,
                               start_new_session=True)
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    match = re.search(r"listening on [\d.]+:(\d+)", line)
    assert match, f"listener did not start: {line!r}; see {log_path}"
    return process, int(match.group(1))


def test_every_acknowledged_instance_survives_sigkill(tmp_path: Path) -> None:
    """Three associations send as fast as they can; the listener process is SIGKILLed after 40 successes.
    After a restart, every instance that got 0x0000 has its spool file and its row (a worklist entry).

    SIGKILL keeps the kernel's page cache, so this catches success sent before the write or the commit, not
    a missing fsync (that needs power loss; the fsync order is unit-tested in test_spool.py).
    """
    log_path = tmp_path / "listener.log"
    process, port = start_listener_process(tmp_path, log_path)
    acknowledged: list[Dataset] = []
    unanswered = 0
    lock = threading.Lock()
    stop_sending = threading.Event()

    def burst(index: int) -> None:
        nonlocal unanswered
        assoc = scu(f"BURST{index}").associate("127.0.0.1", port, ae_title="PTXTRIAGE")
        while assoc.is_established and not stop_sending.is_set():
            film = small_film(StudyInstanceUID=generate_uid())
            try:
                status = assoc.send_c_store(film)
            except RuntimeError:  # aborted between the check and the send
                status = None
            with lock:
                if getattr(status, "Status", None) == 0x0000:
                    acknowledged.append(film)
                else:
                    unanswered += 1
        assoc.release()

    senders = [threading.Thread(target=burst, args=(n,)) for n in range(3)]
    for sender in senders:
        sender.start()
    try:
        deadline = time.monotonic() + 60
        while len(acknowledged) < 40:
            assert time.monotonic() < deadline, "the burst never reached 40 acknowledged instances"
            assert all(s.is_alive() for s in senders), "a sender stopped before the kill"
            time.sleep(0.005)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        for sender in senders:
            sender.join(timeout=30)
    finally:
        stop_sending.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert unanswered >= 1  # the senders were still sending when the process died
    with lock:
        acknowledged_now = list(acknowledged)

    process, port = start_listener_process(tmp_path, log_path)  # the restart
    try:
        repeat = send_with_pynetdicom(port, [acknowledged_now[0]])  # a sender retrying after the crash
        assert repeat[0].Status == 0x0000
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)

    spool = Spool(tmp_path / "spool")
    with open_store(None, tmp_path) as store:
        worklist = {item.study_uid for item in store.worklist(limit=1000)}
        for film in acknowledged_now:
            assert film.StudyInstanceUID in worklist
            study = store.study(film.StudyInstanceUID)
            assert study is not None and [i.sop_uid for i in study.instances] == [film.SOPInstanceUID]
            spooled = pydicom.dcmread(spool.path(film.SOPInstanceUID))
            assert spooled.SOPInstanceUID == film.SOPInstanceUID
            assert np.array_equal(spooled.pixel_array, film.pixel_array)
    assert not list((tmp_path / "spool").glob(".incoming-*"))  # interrupted writes cleared at the restart
