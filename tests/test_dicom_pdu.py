"""The DICOM listener's PDU size limit (PTX_DICOM_MAX_PDU) as negotiated on the wire, and raw junk at the port.

A sender proposing a larger maximum PDU still associates; the A-ASSOCIATE-AC carries our limit and the
sender then cuts its P-DATA PDUs to it. The association limit itself (max + 1 refused) is tested in
tests/test_dicom_listener.py. Real loopback networking, pynetdicom as the sender.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from pynetdicom import evt
from pynetdicom.pdu import P_DATA_TF

from service.results_files import ResultsFolder
from service.settings import load_settings
from service.store import open_store
from tests.dicom_factory import chest_like
from tests.test_dicom_listener import receiver, scu, small_film

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
    from service.pacs import Pacs

    settings = load_settings(environ={"PTX_DICOM_PORT": "11112", "PTX_DICOM_MAX_PDU": "65536",
                                      "PTX_DICOM_MAX_ASSOCIATIONS": "3", "PTX_DATA_DIR": str(tmp_path)})

    async def never(_: bytes):  # pragma: no cover -- the listener is not started here
        raise AssertionError("no triage in this test")

    with open_store(None, tmp_path) as store:
        pacs = Pacs(settings, store, ResultsFolder(tmp_path / "results"), never)
        assert pacs.listener.ae.maximum_pdu_size == 65536
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
                except (ConnectionResetError, socket.timeout):
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
