"""The DICOM storage SCP for C-STORE and C-ECHO (long: receipt, keys, repeats and conflicts belong together).

Modalities and PACS send chest radiographs here with C-STORE (and check us with C-ECHO).

    connection ──address admitted by the allowlist? (else closed at accept) ──▶ read deadlines, keepalive
    association ──calling AE allowed from that address? under the limit?──▶ accepted (else A-ASSOCIATE-RJ)
    C-STORE (dataset streamed to a file) ──▶ spool.adopt (fsync, atomic link, never over a file)
                  ──▶ store.receive ──▶ 0x0000 ──▶ on_received
                  ├─ SOP Instance UID known with another study or other bytes ──▶ 0xC001 (conflict; not retried)
                  ├─ spool's free space under PTX_SPOOL_MIN_FREE_MB ──────────▶ 0xA700 (outcome "no_space")
                  └─ any failure ─────────────────────────────────────▶ 0xA700 (the sender retries)

Success goes back only once the instance is on disk and recorded: that is what lets "every instance that
got a success status has a worklist entry" hold across a SIGKILL. Triage happens later, in
`service.pacs.intake`, so a slow model never holds an association open.

A repeated SOP Instance UID is looked up by the UID alone (in whichever study it arrived). An identical
repeat (same study, same SHA-256 of the dataset bytes) is success without being spooled or queued again. A
repeat naming another study, or carrying other bytes, is refused with 0xC001 (`UID_CONFLICT`) and counted
as outcome "conflict": accepting it would either overwrite a film still waiting for triage (its finding
then recorded on the first study) or silently drop a different image behind a success status. The first
film and its spool file stay as they were. The digest covers the dataset as received without the file meta
group we add (which names the sender), so one film from two senders is still one instance; the same film
resent in another transfer syntax is different bytes and is refused too (the first copy is kept).

Accepted: Verification, and CR / DX (for presentation and for processing) / Secondary Capture image storage
(the SOP classes of `service.imaging.acceptance`) in the uncompressed little-endian syntaxes and the
compressed syntaxes the service decodes (JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE), each
offered only when a pixel decoder for it is installed, so a sender is never accepted in a syntax we would
then refuse. Other SOP classes (a CT, say) get no presentation context. Deflated Explicit VR Little Endian
is not offered: a deflated dataset is inflated whole in memory (reading its keys here, pydicom later) before
any size limit applies, and deflate reaches ~1000:1, so a small C-STORE could exhaust memory. Senders fall
back to an uncompressed syntax, which `max_message_bytes` bounds as it arrives.

Datasets are received to disk, not memory: pynetdicom's `_config.STORE_RECV_CHUNKED_DATASET` writes each
C-STORE dataset to a temporary Part 10 file as its PDUs arrive (in the spool's `receiving` folder: see
`_receive_into`), and the handler reads three tags and the SHA-256 from that file and links it into the spool
(no copy; a copy in 1 MiB pieces only if the file came from another file system). Ten concurrent 60 MB
C-STOREs then need a few MB of memory, not a gigabyte (tests/pacs/test_cstore_memory.py). The flag is
module-global and `start` sets it for the whole process; that is acceptable because this listener is the
process's only C-STORE SCP (our delivery side sends, which the flag does not touch), and a handler elsewhere
that reads `event.dataset` still works (pynetdicom reads it from the file); only `event.encoded_dataset()`
would not.

Slow or stalled peers cannot hold association slots (service/pacs/connection_guard.py: read deadlines from
PTX_DICOM_ACSE_TIMEOUT_S and PTX_DICOM_NETWORK_TIMEOUT_S, TCP keepalive, the allowlist's addresses at
accept), and `stop` closes every connection still open after its grace, stalled or not.

Logs name associations (calling AE, address), SOP Instance UIDs and statuses, never patient attributes.
`python -m service.pacs.listener --port N --data-dir D` runs a listener with its spool and SQLite store
alone (no triage): an intake in another process, or the crash test, can drain it.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Self

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from service.imaging.acceptance import (
    CR_IMAGE_STORAGE,
    DX_FOR_PRESENTATION,
    DX_FOR_PROCESSING,
    SECONDARY_CAPTURE,
)
from service.imaging.uids import is_dicom_uid
from service.pacs.allowlist import CallingAeAllowlist
from service.pacs.connection_guard import GuardedServer, PeerTimeouts
from service.pacs.pdu_limit import limited_request_handler
from service.pacs.spool import Spool
from service.settings import Settings
from service.store import (
    InstanceRecord,
    InstanceStatus,
    ReceivedInstance,
    ResultsStore,
    file_dataset_sha256,
    utc_now,
)

log = logging.getLogger("ptx.dicom")

DEFAULT_AE_TITLE = "PTXTRIAGE"
DEFAULT_MAX_PDU = 256 * 1024  # bytes; larger PDUs mean fewer round trips for multi-megabyte films
DEFAULT_MAX_MESSAGE = 96 * 1024 * 1024  # bytes of one C-STORE dataset: PTX_MAX_FILE_BYTES's default

STORAGE_SOP_CLASSES: tuple[UID, ...] = (CR_IMAGE_STORAGE, DX_FOR_PRESENTATION, DX_FOR_PROCESSING, SECONDARY_CAPTURE)
CANDIDATE_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian,  # not Deflated Explicit VR LE: see the module docstring
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
    JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless,
)

KEY_TAGS = ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]  # all the listener reads of a dataset

# C-STORE statuses (PS3.4 B.2.3). Failures carry an Error Comment without patient data.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # "refused: out of resources": the sender keeps the instance and retries
CANNOT_UNDERSTAND = 0xC000  # the dataset lacks what we need to key it (not worth retrying unchanged)
# A SOP Instance UID already received with another study or other bytes. PS3.4 B.2.3 "Error: Cannot
# understand" (Cxxx, the low bits ours to define): a failure the sender should not retry unchanged. Not
# A7xx (out of resources: the sender would retry forever), not A900 (dataset does not match SOP class: it
# may match), not 0x0111 (Duplicate SOP Instance: a DIMSE-N status, not listed for C-STORE). Distinct from
# 0xC000 so a sender's log tells a UID conflict from an unreadable dataset.
UID_CONFLICT = 0xC001

# Outcomes of a C-STORE, for `on_outcome` (the label of ptx_dicom_received_total)
RECEIVED, DUPLICATE, REFUSED, FAILED, CONFLICT = "received", "duplicate", "refused", "failed", "conflict"
NO_SPACE = "no_space"  # refused with 0xA700: the spool's file system is under PTX_SPOOL_MIN_FREE_MB
OUTCOMES = (RECEIVED, DUPLICATE, REFUSED, FAILED, CONFLICT, NO_SPACE)


def decodable_transfer_syntaxes(candidates: Iterable[UID] = CANDIDATE_TRANSFER_SYNTAXES) -> list[UID]:
    """The candidates whose pixel data this installation can decode (uncompressed ones always can)."""
    usable = []
    for syntax in candidates:
        if not syntax.is_compressed:
            usable.append(syntax)
            continue
        try:
            available = get_decoder(syntax).is_available
        except NotImplementedError:
            available = False
        if available:
            usable.append(syntax)
        else:
            log.warning("not offering %s (%s): no pixel decoder installed", syntax.name, syntax)
    return usable


def _receive_into(folder: Path) -> None:
    """Make pynetdicom write received datasets into `folder` (the spool's own) instead of the system's temporary
    folder: patient data stays on the service's volume, a receipt cut off by a crash is swept at the next start
    (`Spool`), and the file is linked into the spool without a copy. pynetdicom 3 offers no setting for it; it
    calls `NamedTemporaryFile` through its module `dimse_messages`, which is replaced here by the same function
    with `dir=` (process-wide like `_config`: one C-STORE SCP per process; a later listener takes over)."""
    from pynetdicom import dimse_messages

    named = functools.partial(tempfile.NamedTemporaryFile, dir=str(folder))
    dimse_messages.NamedTemporaryFile = named  # type: ignore[attr-defined]


def _discard_partial_dataset(event: evt.Event) -> None:
    """Remove the file of a C-STORE dataset whose connection closed before it was complete (aborted, timed
    out, over a limit). pynetdicom removes its received file only after our handler ran, so such a partial
    file (patient data, never answered) would otherwise stay until the next start. The in-progress message and its
    file are pynetdicom 3's private attributes: read defensively, a missing one means nothing to remove."""
    message = getattr(getattr(event.assoc, "dimse", None), "message", None)
    handle = getattr(message, "_data_set_file", None)
    if handle is None:
        return
    try:
        handle.close()
        os.unlink(handle.name)
    except OSError:
        log.warning("could not remove a partly received dataset's temporary file", exc_info=True)
    else:
        log.info("removed the temporary file of a C-STORE dataset cut off before its end")


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]  # LO
    return status


@dataclass(frozen=True)
class _Keys:
    sop_uid: str
    study_uid: str
    series_uid: str | None
    sop_class_uid: str


class DicomListener:
    """A pynetdicom storage SCP over a spool and the results store.

    `allowed_calling_aes`: who may associate (None: anyone), a `CallingAeAllowlist` or its entries (`AE`,
    `AE@10.0.0.5`, `AE@10.1.0.0/16`); others get A-ASSOCIATE-RJ "rejected-permanent, service-user, calling
    AE title not recognised" (also for a known title from an address it is not allowed from: PS3.8 has no
    reason for addresses, and the caller need not learn that the title itself was right). `max_associations`: concurrent
    associations; one more gets "rejected-transient, service-provider (presentation), local limit exceeded".
    `max_pdu`: our Maximum Length Received, announced and enforced; `max_message_bytes`: the largest C-STORE
    dataset read (None: no limit); a peer over either is aborted unread (service/pacs/pdu_limit.py).
    `acse_timeout_s`: from connection to a complete A-ASSOCIATE-RQ; `network_timeout_s`: the longest silence
    inside an association or a PDU (service/pacs/connection_guard.py). `spool_min_free_mb`: a new C-STORE
    is refused with 0xA700 (outcome "no_space") while the spool's file system has less free (0: no floor).
    `on_received(sop_uid)` is called after a new instance is durably received (the intake's wake-up; it must
    not block). `on_outcome(outcome)` is called once per C-STORE answered, with one of `OUTCOMES` (a metrics
    counter: the C-STORE rate by outcome). `port=0` binds a free port (see `port` after `start`). `name`:
    PTX_LISTENER_NAME, recorded with each instance (its spool is this listener's: several listeners may share
    one store, each with its own spool; service/pacs/intake.py).
    """

    def __init__(self, spool: Spool, store: ResultsStore, *, port: int, host: str = "0.0.0.0",
                 ae_title: str = DEFAULT_AE_TITLE,
                 allowed_calling_aes: CallingAeAllowlist | Iterable[str] | None = None,
                 max_associations: int = 10, max_pdu: int = DEFAULT_MAX_PDU,
                 max_message_bytes: int | None = DEFAULT_MAX_MESSAGE,
                 on_received: Callable[[str], None] | None = None, acse_timeout_s: float = 10.0,
                 network_timeout_s: float = 30.0, spool_min_free_mb: int = 0,
                 clock: Callable[[], datetime] = utc_now, on_outcome: Callable[[str], None] | None = None,
                 name: str | None = None) -> None:
        if max_associations < 1:
            raise ValueError(f"max_associations must be at least 1, got {max_associations}")
        if spool_min_free_mb < 0:
            raise ValueError(f"spool_min_free_mb must be 0 (no floor) or more, got {spool_min_free_mb}")
        self.timeouts = PeerTimeouts(acse_timeout_s, network_timeout_s)  # ValueError names the bad one
        self.spool_min_free_mb = spool_min_free_mb
        self.spool, self.store = spool, store
        self.host, self._port = host, port
        self.ae_title = ae_title
        self.allowlist = (allowed_calling_aes if allowed_calling_aes is None
                          or isinstance(allowed_calling_aes, CallingAeAllowlist)
                          else CallingAeAllowlist.parse(allowed_calling_aes))  # ValueError when empty
        self.max_message_bytes = max_message_bytes
        self.on_received = on_received
        self.on_outcome = on_outcome
        self.clock = clock
        self.name = name
        self.ae = self._build_ae(max_associations, max_pdu)
        self._server: GuardedServer | None = None

    @classmethod
    def from_settings(cls, settings: Settings, spool: Spool, store: ResultsStore, *,
                      on_received: Callable[[str], None] | None = None,
                      on_outcome: Callable[[str], None] | None = None) -> DicomListener:
        """The listener the settings describe (PTX_DICOM_*, PTX_MAX_FILE_BYTES, PTX_SPOOL_MIN_FREE_MB)."""
        if settings.dicom_port is None:
            raise ValueError("PTX_DICOM_PORT is not set: there is no DICOM listener to build")
        allowed = CallingAeAllowlist.parse(settings.dicom_allowed_aes) if settings.dicom_allowed_aes else None
        if allowed is None:  # issue 13 §7: open by configuration only, and said loudly
            log.warning("PTX_DICOM_ALLOWED_AES is not set: ANY calling AE from ANY address may store films on "
                        "%s:%d; list the PACS and modalities that may send (docs/security.md)",
                        settings.dicom_host, settings.dicom_port)
        return cls(spool, store, port=settings.dicom_port, host=settings.dicom_host,
                   ae_title=settings.dicom_ae_title, allowed_calling_aes=allowed,
                   max_associations=settings.dicom_max_associations, max_pdu=settings.dicom_max_pdu,
                   max_message_bytes=settings.max_file_bytes, acse_timeout_s=settings.dicom_acse_timeout_s,
                   network_timeout_s=settings.dicom_network_timeout_s,
                   spool_min_free_mb=settings.spool_min_free_mb, on_received=on_received, on_outcome=on_outcome,
                   name=settings.listener_name)

    def _build_ae(self, max_associations: int, max_pdu: int) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = max_associations
        ae.maximum_pdu_size = max_pdu
        ae.acse_timeout = self.timeouts.acse_s  # pynetdicom's ARTIM: a peer silent from the start
        ae.network_timeout = self.timeouts.network_s  # pynetdicom's idle timer: silence between PDUs
        # pynetdicom's defaults for C-ECHO, less deflate: no context of ours may carry a deflated dataset
        ae.add_supported_context(Verification, [syntax for syntax in DEFAULT_TRANSFER_SYNTAXES
                                                if syntax != DeflatedExplicitVRLittleEndian])
        syntaxes = decodable_transfer_syntaxes()
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        return ae

    # --- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Listen in background threads (one per association); returns at once."""
        if self._server is not None:
            raise RuntimeError("the DICOM listener is already running")
        handlers = [(evt.EVT_REQUESTED, self._on_requested),
                    (evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_ACCEPTED, self._on_accepted), (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_ABORTED, self._on_aborted), (evt.EVT_CONN_CLOSE, _discard_partial_dataset)]
        _config.STORE_RECV_CHUNKED_DATASET = True  # datasets to files, not memory: see the module docstring
        _receive_into(self.spool.receiving)
        # What `AE.start_server(block=False)` does, with our server and request handler: addresses checked at
        # accept, every PDU header checked before its body is read and every read under a deadline
        # (service/pacs/pdu_limit.py, connection_guard.py). The server registers with the AE as there,
        # since its shutdown() deregisters itself.
        server = self.ae.make_server((self.host, self._port), evt_handlers=handlers, server_class=GuardedServer,
                                     request_handler=limited_request_handler(self.max_message_bytes, self.timeouts))
        assert isinstance(server, GuardedServer)
        server.allowlist = self.allowlist
        threading.Thread(target=server.serve_forever, name=f"DicomListener@{self.ae_title}", daemon=True).start()
        self.ae._servers.append(server)
        self._server = server
        log.info("DICOM listener %s on %s:%d (calling AEs: %s, at most %d associations)", self.ae_title, self.host,
                 self.port, self.allowlist.describe() if self.allowlist else "any",
                 self.ae.maximum_associations)

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with port=0 and started)."""
        if self._server is not None:
            return int(self._server.server_address[1])
        return self._port

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, give established associations `grace_s` to finish, then abort them (their senders
        retry what was not answered) and close every connection still open, a stalled one included, so
        this returns within about `grace_s` + 1 s whatever the peers do. Instances already answered
        success are durable either way."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server = None
        self._wait(lambda: any(assoc.is_established for assoc in self._acceptors()), grace_s)
        for assoc in self._acceptors():
            if assoc.is_established:
                log.warning("aborting the association with %s at shutdown", assoc.requestor.ae_title or "?")
                assoc.abort(block=False)  # A-ABORT queued; blocking could wait on a stalled peer
        self._wait(lambda: any(self._open_socket(assoc) for assoc in self._acceptors()), 0.5)
        for assoc in self._acceptors():
            if (sock := self._open_socket(assoc)) is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # a blocked read returns: pynetdicom sees the transport close
                except OSError:
                    pass
        log.info("DICOM listener %s stopped", self.ae_title)

    @staticmethod
    def _wait(condition: Callable[[], bool], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while condition() and time.monotonic() < deadline:
            time.sleep(0.05)

    @staticmethod
    def _open_socket(assoc: Any) -> Any:
        """The association's socket while its connection is open, else None."""
        transport = assoc.dul.socket
        sock = getattr(transport, "socket", None) if transport is not None else None
        return sock if sock is not None and sock.fileno() >= 0 else None

    def _acceptors(self) -> list[Any]:
        return [assoc for assoc in self.ae.active_associations if assoc.is_acceptor and assoc.is_alive()]

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- association events (the allowlist here; pynetdicom enforces the association limit) ------------

    def _on_requested(self, event: evt.Event) -> None:
        """The allowlist, checked on the A-ASSOCIATE-RQ before any negotiation: an unknown caller gets
        A-ASSOCIATE-RJ (permanent, service-user, calling AE title not recognised) and the socket closes.
        Done here rather than with pynetdicom's `require_calling_aet`, which knows titles but not addresses.
        The log names the calling AE and the address (equipment, not patient data)."""
        if self.allowlist is None:
            return
        assoc = event.assoc
        calling_ae = str(assoc.requestor.primitive.calling_ae_title or "").strip()
        address = str(assoc.requestor.address)
        if self.allowlist.allows(calling_ae, address):
            return
        log.warning("association from calling AE %r at %s:%s rejected: not in PTX_DICOM_ALLOWED_AES%s",
                    calling_ae, address, assoc.requestor.port,
                    " from that address" if calling_ae in self.allowlist.entries else "")
        assoc.acse.send_reject(0x01, 0x01, 0x03)  # rejected-permanent, service-user, calling AE not recognised
        assoc.is_rejected = True
        assoc.kill()

    @staticmethod
    def _peer(event: evt.Event) -> str:
        requestor = event.assoc.requestor
        return f"{requestor.ae_title or '?'}@{requestor.address}:{requestor.port}"

    def _on_accepted(self, event: evt.Event) -> None:
        log.info("association accepted from %s", self._peer(event))

    def _on_rejected(self, event: evt.Event) -> None:
        log.warning("association rejected from %s (the association limit, PTX_DICOM_MAX_ASSOCIATIONS, reached)",
                    self._peer(event))

    def _on_aborted(self, event: evt.Event) -> None:
        log.warning("association with %s aborted", self._peer(event))  # by either side

    def _on_echo(self, event: evt.Event) -> int:
        log.info("C-ECHO from %s", self._peer(event))
        return SUCCESS

    # --- C-STORE --------------------------------------------------------------------------------------------

    def _on_store(self, event: evt.Event) -> int | Dataset:
        """Spool, record, then answer (`_store`); report the outcome."""
        answer, outcome = self._store(event)
        if self.on_outcome is not None:
            try:
                self.on_outcome(outcome)
            except Exception:  # counting must never change the answer
                log.warning("on_outcome failed", exc_info=True)
        return answer

    def _store(self, event: evt.Event) -> tuple[int | Dataset, str]:
        """Spool, record, then answer, with the outcome (`OUTCOMES`). Never success before both are durable,
        and never a success or a spool write for a SOP Instance UID already known with other content."""
        calling_ae = (event.assoc.requestor.ae_title or "").strip() or "unknown"
        sop_uid = str(event.request.AffectedSOPInstanceUID or "")
        received = event.dataset_path  # the Part 10 file pynetdicom wrote (and removes after this handler)
        if received is None:
            log.error("C-STORE %s from %s: no received file (STORE_RECV_CHUNKED_DATASET was turned off); answered "
                      "0x%04X", sop_uid, calling_ae, OUT_OF_RESOURCES)
            return _status(OUT_OF_RESOURCES, "could not store the instance durably; retry later"), FAILED
        try:
            keys = self._keys(event, sop_uid, received)
        except ValueError as exc:
            log.warning("C-STORE from %s refused (0x%04X): %s", calling_ae, CANNOT_UNDERSTAND, exc)
            return _status(CANNOT_UNDERSTAND, str(exc)), REFUSED
        try:
            digest = file_dataset_sha256(received)
            known = self._known(keys)
            if known is not None:
                return self._repeat(known, keys, digest, calling_ae)
            if self._short_of_space(sop_uid, calling_ae):
                return _status(OUT_OF_RESOURCES, "spool below its free-space floor; retry later"), NO_SPACE
            try:
                path = self.spool.adopt(sop_uid, received)
                wrote = True
            except FileExistsError:  # spooled but not (yet) recorded: a concurrent copy, or a crash's leftover
                known = self._known(keys)
                if known is not None:
                    return self._repeat(known, keys, digest, calling_ae)
                path = self.spool.path(sop_uid)
                if file_dataset_sha256(path) != digest:
                    return self._conflict(keys, calling_ae, "other content")
                wrote = False  # the same bytes are on disk already: record them
            received = ReceivedInstance(sop_uid=keys.sop_uid, study_uid=keys.study_uid, series_uid=keys.series_uid,
                                        sop_class_uid=keys.sop_class_uid, source=f"dicom:{calling_ae}",
                                        spool_path=str(path), received_at=self.clock(), sha256=digest,
                                        listener=self.name)
            new = self.store.receive(received)
            if not new:  # recorded concurrently between our lookup and our write
                known = self._known(keys)
                if known is None:  # cannot happen while receive() keeps rows; be safe: let the sender retry
                    raise RuntimeError("the store refused the instance and has no record of it")
                answer = self._repeat(known, keys, digest, calling_ae)
                if wrote:
                    self._discard_our_copy(known, keys, answer[1])
                return answer
        except Exception as exc:  # noqa: BLE001 -- disk full, database locked...: the sender must retry
            log.error("C-STORE %s from %s not stored (%s); answered 0x%04X so the sender retries", sop_uid,
                      calling_ae, type(exc).__name__, OUT_OF_RESOURCES)
            return _status(OUT_OF_RESOURCES, "could not store the instance durably; retry later"), FAILED
        log.info("C-STORE %s from %s: received (study %s)", sop_uid, calling_ae, keys.study_uid)
        if self.on_received is not None:
            try:
                self.on_received(sop_uid)
            except Exception:  # the instance is durable; the intake's poll will find it
                log.exception("on_received failed for %s; the intake will find it when it polls", sop_uid)
        return SUCCESS, RECEIVED

    def _short_of_space(self, sop_uid: str, calling_ae: str) -> bool:
        """Whether the spool's file system has less free than PTX_SPOOL_MIN_FREE_MB (logged: the alert's
        counterpart in the log; the count is outcome "no_space")."""
        if not self.spool_min_free_mb:
            return False
        free_mb = self.spool.free_bytes() // (1024 * 1024)
        if free_mb >= self.spool_min_free_mb:
            return False
        log.warning("C-STORE %s from %s refused (0x%04X): %d MB free on the spool's file system, under "
                    "PTX_SPOOL_MIN_FREE_MB=%d; the sender retries", sop_uid, calling_ae, OUT_OF_RESOURCES, free_mb,
                    self.spool_min_free_mb)
        return True

    def _repeat(self, known: InstanceRecord, keys: _Keys, digest: str,
                calling_ae: str) -> tuple[int | Dataset, str]:
        """The answer to a SOP Instance UID already recorded: success for an identical copy, else a conflict.

        Rows without a digest (received before migration 2, or over HTTP) are compared with their spool file
        where it is still there; with neither, the same study is all that can be checked."""
        if known.study_uid != keys.study_uid:
            return self._conflict(keys, calling_ae, "another study")
        expected = known.sha256
        if expected is None:
            try:
                expected = file_dataset_sha256(self.spool.path(keys.sop_uid))
            except FileNotFoundError:
                expected = None
        if expected is not None and expected != digest:
            return self._conflict(keys, calling_ae, "other content")
        log.info("C-STORE %s from %s: already received; success without queueing again", keys.sop_uid, calling_ae)
        return SUCCESS, DUPLICATE

    @staticmethod
    def _conflict(keys: _Keys, calling_ae: str, what: str) -> tuple[Dataset, str]:
        """Refuse a reused SOP Instance UID. The log names the instance's UID only: not the studies (those
        say whose film it is), nor any other attribute."""
        log.warning("C-STORE %s from %s refused (0x%04X): SOP Instance UID already received with %s; the "
                    "first copy is kept", keys.sop_uid, calling_ae, UID_CONFLICT, what)
        return _status(UID_CONFLICT, f"SOP Instance UID already received with {what}"), CONFLICT

    def _known(self, keys: _Keys) -> InstanceRecord | None:
        """The stored record of this SOP Instance UID in any study, or None (by the UID alone: a repeat that
        names another study must be found, not taken for a new instance)."""
        return self.store.instance(keys.sop_uid)

    def _discard_our_copy(self, known: InstanceRecord, keys: _Keys, outcome: str) -> None:
        """We spooled a file for a UID another C-STORE recorded meanwhile (its own file already removed). Keep
        it only where it is an identical copy still waiting for triage here; a finished instance's would
        linger, a conflicting one must never be read as the recorded instance's bytes, and one another
        listener recorded is triaged from that listener's own spool."""
        if (outcome == DUPLICATE and known.status in (InstanceStatus.RECEIVED, InstanceStatus.PROCESSING)
                and known.listener in (None, self.name)):
            return
        try:
            self.spool.remove(keys.sop_uid)
        except Exception:  # noqa: BLE001 -- a leftover file is cleared by the intake at its next start
            log.warning("could not remove the repeat of %s; a leftover spool file may remain", keys.sop_uid)

    @staticmethod
    def _keys(event: evt.Event, sop_uid: str, received: Path) -> _Keys:
        """The UIDs that key an instance, read from the header alone (three tags, no pixel data: triage parses
        the film once, later); ValueError (message with UIDs and tags only) when unusable."""
        if not is_dicom_uid(sop_uid):
            raise ValueError("Affected SOP Instance UID is not a valid UID")
        try:
            dataset = dcmread(received, stop_before_pixels=True, force=True, specific_tags=KEY_TAGS)
            dataset_sop_uid = str(dataset.get("SOPInstanceUID", "") or "")
            study_uid = str(dataset.get("StudyInstanceUID", "") or "")
            series_uid = str(dataset.get("SeriesInstanceUID", "") or "") or None
        except Exception:  # noqa: BLE001 -- a decoder's message may quote values: say only that it failed
            raise ValueError("the dataset could not be decoded") from None
        if dataset_sop_uid != sop_uid:
            raise ValueError("SOP Instance UID (0008,0018) differs from the Affected SOP Instance UID")
        if not is_dicom_uid(study_uid):
            raise ValueError("Study Instance UID (0020,000D) is missing or not a valid UID")
        return _Keys(sop_uid, study_uid, series_uid if series_uid and len(series_uid) <= 64 else None,
                     str(event.request.AffectedSOPClassUID))


# --------------------------------------------------------------------------------------------------------------
# Standalone: listener + spool + store, no triage (`python -m service.pacs.listener`)


def main(argv: list[str] | None = None) -> None:
    from service.store import open_store

    parser = argparse.ArgumentParser(description="DICOM storage SCP writing to a spool and the results store")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--data-dir", type=Path, required=True, help="spool in <dir>/spool, SQLite in <dir>")
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--ae-title", default=DEFAULT_AE_TITLE)
    parser.add_argument("--max-associations", type=int, default=10)
    parser.add_argument("--allow", action="append", default=None, help="allowed calling AE title (repeatable)")
    parser.add_argument("--name", default="listener", help="the name recorded with its instances "
                        "(PTX_LISTENER_NAME of the service that drains this spool)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    with open_store(args.database_url, args.data_dir) as store:
        listener = DicomListener(Spool(args.data_dir / "spool"), store, port=args.port, host=args.host,
                                 ae_title=args.ae_title, allowed_calling_aes=args.allow,
                                 max_associations=args.max_associations, name=args.name)
        with listener:
            print(f"listening on {args.host}:{listener.port}", flush=True)
            stopped.wait()


if __name__ == "__main__":
    main()
