"""The DICOM listener's PDU size limit (PTX_DICOM_MAX_PDU) as negotiated on the wire, and raw junk at the port.

A sender proposing a larger maximum PDU still associates; the A-ASSOCIATE-AC carries our limit and the
sender then cuts its P-DATA PDUs to it. The association limit itself (max + 1 refused) is tested in
tests/pacs/test_dicom_listener.py. Real loopback networking, pynetdicom as the sender.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.pdu import P_DATA_TF

from service.settings import load_settings
from service.store import open_store
from service.store.results_files import ResultsFolder
from tests.dicom_factory import chest_like
from tests.pacs.test_dicom_listener import (
    receiver,
    scu,
    send_with_pynetdicom,
    small_film,
)

OUR_MAX_PDU = 16 * 1024


def big_film():
    """~2 MB of pixels: many PDUs at a 16 KB limit."""
    return small_film(PixelData=chest_like(1024, 1024).tobytes(), Rows=1024, Columns=1024)


def test_a_larger_proposal_is_negotiated_down_to_our_limit(tmp_path: Path) -> None:
    with receiver(tmp_path, max_pdu=OUR_MAX_PDU) as rx:
        sender = scu()
        sent: list[int] = []

        def record(event: evt.Event) -> None:
            if isinstance(event.pdu, P_DATA_TF):
                sent.append(len(event.pdu.encode()) - 6)  # the PDU's length field (after its 6-byte header)

        assoc = sender.associate("127.0.0.1", rx.port, ae_title="PTXTRIAGE", max_pdu=4 * 1024 * 1024,  # proposed
                                 evt_handlers=[(evt.EVT_PDU_SENT, record)])
        assert assoc.is_established
        try:
            assert assoc.acceptor.maximum_length == OUR_MAX_PDU  # what our A-ASSOCIATE-AC said
            assert assoc.requestor.maximum_length == 4 * 1024 * 1024
            status = assoc.send_c_store(big_film())
        finally:
            assoc.release()
        assert status.Status == 0x0000
        assert len(sent) > 100 and max(sent) <= OUR_MAX_PDU, (len(sent), max(sent))
        assert len(rx.instances()) == 1


def test_unlimited_proposal_and_zero_limit(tmp_path: Path) -> None:
    """A sender proposing 0 (no limit) also associates and sends; our side still says its own limit."""
    with receiver(tmp_path, max_pdu=OUR_MAX_PDU) as rx:
        assoc = scu().associate("127.0.0.1", rx.port, ae_title="PTXTRIAGE", max_pdu=0)
        assert assoc.is_established
        try:
            assert assoc.acceptor.maximum_length == OUR_MAX_PDU
            assert assoc.send_c_store(small_film()).Status == 0x0000
        finally:
            assoc.release()


def test_the_setting_reaches_the_listener(tmp_path: Path) -> None:
    from service.pacs.side import Pacs

    settings = load_settings(environ={"PTX_DICOM_PORT": "11112", "PTX_DICOM_MAX_PDU": "65536",
                                      "PTX_DICOM_MAX_ASSOCIATIONS": "3", "PTX_DATA_DIR": str(tmp_path)})

    async def never(_: bytes):  # pragma: no cover -- the listener is not started here
        raise AssertionError("no triage in this test")

    with open_store(None, tmp_path) as store:
        pacs = Pacs(settings, store, ResultsFolder(tmp_path / "results"), never)
        assert pacs.listener.ae.maximum_pdu_size == 65536
        assert pacs.listener.max_message_bytes == settings.max_file_bytes
        assert pacs.listener.ae.maximum_associations == 3
    assert load_settings(environ={}).dicom_max_pdu == 256 * 1024
    with pytest.raises(ValueError, match="dicom_max_pdu"):
        load_settings(environ={"PTX_DICOM_MAX_PDU": "-1"})


JUNK = [
    bytes(range(64)),
    b"\x01\x00\xff\xff\xff\xff" + bytes(100),  # an A-ASSOCIATE-RQ declaring a 4 GB PDU, then stopping
    b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00",  # an A-ABORT before any association
    b"\x04\x00\x00\x00\x00\x10" + b"\x00" * 16,  # P-DATA with no association
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
]


def test_junk_at_the_port_leaves_the_listener_serving(tmp_path: Path) -> None:
    with receiver(tmp_path, max_pdu=OUR_MAX_PDU, network_timeout_s=2) as rx:
        for junk in JUNK:
            with socket.create_connection(("127.0.0.1", rx.port), timeout=10) as sock:
                sock.sendall(junk)
                sock.shutdown(socket.SHUT_WR)
                try:
                    while sock.recv(4096):
                        pass
                except (TimeoutError, ConnectionResetError):
                    pass
        started = time.monotonic()
        assoc = scu().associate("127.0.0.1", rx.port, ae_title="PTXTRIAGE")
        assert assoc.is_established, "the listener stopped accepting after junk"
        try:
            assert assoc.send_c_store(small_film()).Status == 0x0000
        finally:
            assoc.release()
        assert time.monotonic() - started < 10
        assert len(rx.instances()) == 1


# --- the limit enforced on what a peer sends (service/dicom_pdu_limit.py) -----------------------------------

ABORT_INVALID_PARAMETER = bytes([0x07, 0x00, 0, 0, 0, 4, 0, 0, 0x02, 0x06])  # A-ABORT, provider, reason 6


def pdu(pdu_type: int, body: bytes, declared: int | None = None) -> bytes:
    return bytes([pdu_type, 0]) + (len(body) if declared is None else declared).to_bytes(4, "big") + body


def test_the_socket_passes_pdus_within_the_limit_in_any_chunking_and_refuses_one_over_it() -> None:
    from service.pacs.pdu_limit import CONTROL_PDU_LIMIT, PduLimitedSocket

    stream = pdu(0x01, bytes(300)) + pdu(0x04, bytes(1000)) + pdu(0x04, bytes(1024)) + pdu(0x05, bytes(4))
    for chunk in (1, 5, 6, 7, 4096):
        ours, peer = socket.socketpair()
        with ours, peer:
            limited = PduLimitedSocket(ours, max_pdu=1024, peer="test")
            pieces = [stream[start:start + chunk] for start in range(0, len(stream), chunk)]
            sender = threading.Thread(target=lambda to=peer, each=pieces: [to.sendall(piece) for piece in each])
            sender.start()
            got = bytearray()
            while len(got) < len(stream):
                got += limited.recv(chunk)
            sender.join()
            assert bytes(got) == stream and limited.refused is None

    for max_pdu, over in ((1024, pdu(0x04, b"", declared=1025)),
                          (0, pdu(0x01, b"", declared=CONTROL_PDU_LIMIT + 1)),
                          (1024, pdu(0x01, b"", declared=0xFFFFFFFF))):
        ours, peer = socket.socketpair()
        with ours, peer:
            limited = PduLimitedSocket(ours, max_pdu=max_pdu, peer="test")
            peer.sendall(pdu(0x04, bytes(10)) + over)
            assert limited.recv(16) == pdu(0x04, bytes(10))
            assert limited.recv(6) == b"" and limited.refused == (over[0], int.from_bytes(over[2:6], "big"))
            assert limited.recv(6) == b""  # stays refused
            assert peer.recv(64) == ABORT_INVALID_PARAMETER
    # 0 = no limit for P-DATA (as pynetdicom), as large as the header can say.
    ours, peer = socket.socketpair()
    with ours, peer:
        limited = PduLimitedSocket(ours, max_pdu=0, peer="test")
        peer.sendall(pdu(0x04, b"", declared=0xFFFFFFFF))
        assert limited.recv(6) and limited.refused is None


class IgnoresTheLimit(DIMSEServiceProvider):
    """A sender's DIMSE layer that cuts P-DATA PDUs at 1 MB whatever the acceptor allowed."""

    @property
    def maximum_pdu_size(self) -> int:
        return 1024 * 1024


def test_a_sender_ignoring_our_limit_is_aborted_and_the_listener_serves_on(tmp_path: Path, caplog) -> None:
    """A peer that sends P-DATA PDUs larger than the A-ASSOCIATE-AC allowed: its first such PDU is refused
    unread with an A-ABORT, nothing is stored, and the next (well-behaved) sender is served."""
    with receiver(tmp_path, max_pdu=OUR_MAX_PDU) as rx:
        assoc = scu().associate("127.0.0.1", rx.port, ae_title="PTXTRIAGE")
        assert assoc.is_established and assoc.acceptor.maximum_length == OUR_MAX_PDU
        assoc.dimse.__class__ = IgnoresTheLimit  # the sender cuts its PDUs as if we allowed 1 MB
        with caplog.at_level("WARNING", logger="ptx.dicom"):
            status = assoc.send_c_store(big_film())
        assert not status  # no C-STORE response: the association was aborted
        assoc.join(timeout=5)
        assert not assoc.is_alive() and not assoc.is_established
        assert any("sent a PDU" in record.getMessage() and "over the limit of 16384 (PTX_DICOM_MAX_PDU)"
                   in record.getMessage() for record in caplog.records)
        assert not rx.instances()

        good = scu().associate("127.0.0.1", rx.port, ae_title="PTXTRIAGE")
        assert good.is_established
        try:
            assert good.send_c_store(big_film()).Status == 0x0000
        finally:
            good.release()
        assert len(rx.instances()) == 1


def test_a_huge_declared_association_request_is_aborted_at_once(tmp_path: Path) -> None:
    """Before: read until the network timeout (the 4 GB never came). Now: an A-ABORT as soon as the header
    is read, the connection closed."""
    with (receiver(tmp_path, max_pdu=OUR_MAX_PDU, network_timeout_s=30) as rx,
          socket.create_connection(("127.0.0.1", rx.port), timeout=10) as sock):
        started = time.monotonic()
        sock.sendall(b"\x01\x00\xff\xff\xff\xff" + bytes(100))
        answer = b""
        while chunk := sock.recv(64):
            answer += chunk
        assert answer == ABORT_INVALID_PARAMETER
        assert time.monotonic() - started < 2


def pdv(body: bytes, last: bool, command: bool = False, context_id: int = 1) -> bytes:
    control = (0x02 if last else 0) | (0x01 if command else 0)
    return (len(body) + 2).to_bytes(4, "big") + bytes([context_id, control]) + body


def test_the_meter_counts_a_message_across_pdus_and_starts_again_after_its_last_fragment() -> None:
    from service.pacs.pdu_limit import DatasetMeter

    meter = DatasetMeter(limit=1000)
    message = pdv(bytes(400), last=False) + pdv(bytes(400), last=False)
    for step in (1, 3, 7, len(message)):  # PDV headers split anywhere
        meter = DatasetMeter(limit=1000)
        assert all(meter.feed(message[start:start + step]) for start in range(0, len(message), step))
        assert meter.message_bytes == 800
    assert meter.feed(pdv(bytes(200), last=True))  # exactly the limit
    assert meter.message_bytes == 0  # the next message starts from nothing
    assert meter.feed(pdv(bytes(60), last=True, command=True) + pdv(bytes(999), last=True))
    assert not meter.feed(pdv(bytes(600), last=False) + pdv(bytes(401), last=False))
    assert meter.message_bytes == 1001


def test_a_dataset_over_the_message_limit_is_aborted_though_every_pdu_is_small(tmp_path: Path, caplog) -> None:
    """PDUs within PTX_DICOM_MAX_PDU, but a dataset larger than the message limit (PTX_MAX_FILE_BYTES in the
    service): aborted when its fragments pass the limit, nothing stored; a smaller film is then received."""
    with receiver(tmp_path, max_pdu=OUR_MAX_PDU, max_message_bytes=1024 * 1024) as rx:
        assoc = scu().associate("127.0.0.1", rx.port, ae_title="PTXTRIAGE")
        assert assoc.is_established
        with caplog.at_level("WARNING", logger="ptx.dicom"):
            status = assoc.send_c_store(big_film())  # ~2 MB of pixels in 16 KB PDUs
        assoc.join(timeout=5)
        assert not status and not assoc.is_alive()
        assert any("sent a message" in record.getMessage() and "over the limit of 1048576 (PTX_MAX_FILE_BYTES)"
                   in record.getMessage() for record in caplog.records)
        assert not rx.instances()
        assert send_with_pynetdicom(rx.port, [small_film()], calling_ae="SENDER")[0].Status == 0x0000
        assert len(rx.instances()) == 1
