"""Issue 13 §9: below PTX_SPOOL_MIN_FREE_MB of free space the listener refuses new C-STOREs with 0xA700.

The floor is set relative to what the test machine really has free (a floor 1 GB above it cannot be met, a
floor of 1 MB always is), so the listener reads the real file system; no disk is filled. The outcome goes to
ptx_dicom_received_total{outcome="no_space"} the way the PACS side wires it (`side.Pacs.observed`), which
the alert PtxDicomRefusedNoSpace watches.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from service.metrics import child, metrics
from service.pacs.listener import NO_SPACE, OUT_OF_RESOURCES, OUTCOMES, DicomListener
from service.pacs.spool import Spool
from service.settings import load_settings
from service.store import open_store
from tests.pacs.test_dicom_listener import (
    SENTINELS,
    receiver,
    send_with_pynetdicom,
    small_film,
)


def no_space_count() -> float:
    return REGISTRY.get_sample_value("ptx_dicom_received_total", {"outcome": NO_SPACE}) or 0.0


def count(outcome: str) -> None:
    """What `service.pacs.side.Pacs.observed` hands the listener as `on_outcome`."""
    child(metrics().dicom_received, outcome=outcome).inc()


def test_a_cstore_below_the_floor_is_refused_counted_and_logged(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ptx.dicom")
    assert NO_SPACE in OUTCOMES
    unreachable = shutil.disk_usage(tmp_path).free // 2**20 + 1024
    film = small_film()
    outcomes: list[str] = []
    before = no_space_count()
    with receiver(tmp_path, spool_min_free_mb=unreachable,
                  on_outcome=lambda outcome: (outcomes.append(outcome), count(outcome))) as rx:
        (status,) = send_with_pynetdicom(rx.port, [film])
        assert status.Status == OUT_OF_RESOURCES  # the sender keeps the film and retries later
        assert "free-space floor" in status.ErrorComment and "retry" in status.ErrorComment
        assert rx.spool.pending() == [] and rx.instances() == {} and rx.received == []
        assert [p for p in rx.spool.directory.rglob("*") if p.is_file()] == []  # not even a temporary left
    assert outcomes == [NO_SPACE] and no_space_count() == before + 1
    (line,) = [r.getMessage() for r in caplog.records if "PTX_SPOOL_MIN_FREE_MB" in r.getMessage()]
    assert f"C-STORE {film.SOPInstanceUID} from SENDER refused (0xA700)" in line
    assert f"under PTX_SPOOL_MIN_FREE_MB={unreachable}" in line and "MB free on the spool's file system" in line
    assert not any(sentinel in caplog.text for sentinel in SENTINELS)

    with receiver(tmp_path, spool_min_free_mb=1, on_outcome=outcomes.append) as rx:  # the sender's retry
        (status,) = send_with_pynetdicom(rx.port, [film])
        assert status.Status == 0x0000 and rx.spool.pending() == [film.SOPInstanceUID]
    assert outcomes == [NO_SPACE, "received"]


def test_a_negative_floor_is_refused_with_the_setting_named(tmp_path: Path) -> None:
    with open_store(None, tmp_path) as store, pytest.raises(ValueError, match="spool_min_free_mb must be 0"):
        DicomListener(Spool(tmp_path / "spool"), store, port=0, spool_min_free_mb=-1)


def test_from_settings_passes_every_listener_setting(tmp_path: Path) -> None:
    settings = load_settings(environ={
        "PTX_DICOM_PORT": "11112", "PTX_DICOM_HOST": "127.0.0.1", "PTX_DICOM_AE_TITLE": "TRIAGE2",
        "PTX_DICOM_ALLOWED_AES": "PACS1@10.0.0.5", "PTX_DICOM_MAX_ASSOCIATIONS": "3", "PTX_DICOM_MAX_PDU": "65536",
        "PTX_MAX_FILE_BYTES": "2000000", "PTX_DICOM_ACSE_TIMEOUT_S": "4", "PTX_DICOM_NETWORK_TIMEOUT_S": "7",
        "PTX_SPOOL_MIN_FREE_MB": "300", "PTX_DATA_DIR": str(tmp_path)})
    received: list[str] = []
    with open_store(None, tmp_path) as store:
        listener = DicomListener.from_settings(settings, Spool(tmp_path / "spool"), store,
                                               on_received=received.append, on_outcome=received.append)
    assert (listener.port, listener.host, listener.ae_title) == (11112, "127.0.0.1", "TRIAGE2")
    assert listener.allowlist is not None and listener.allowlist.describe() == "PACS1@10.0.0.5/32"
    assert listener.ae.maximum_associations == 3 and listener.ae.maximum_pdu_size == 65536
    assert listener.max_message_bytes == 2_000_000
    assert (listener.timeouts.acse_s, listener.timeouts.network_s) == (4, 7)
    assert (listener.ae.acse_timeout, listener.ae.network_timeout) == (4, 7)
    assert listener.spool_min_free_mb == 300
    assert listener.on_received == received.append and listener.on_outcome == received.append
    with pytest.raises(ValueError, match="PTX_DICOM_PORT is not set"):
        DicomListener.from_settings(load_settings(environ={}), Spool(tmp_path / "spool"), store)


def test_an_unset_allowlist_is_said_loudly_and_a_set_one_is_not(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                                 ) -> None:
    """Issue 13 §7: a listener open to any caller is a configuration, never a silent default."""
    base = {"PTX_DICOM_PORT": "11112", "PTX_DATA_DIR": str(tmp_path)}
    with open_store(None, tmp_path) as store, caplog.at_level(logging.WARNING, logger="ptx"):
        DicomListener.from_settings(load_settings(environ=base), Spool(tmp_path / "spool"), store)
        open_warnings = [r.getMessage() for r in caplog.records if "PTX_DICOM_ALLOWED_AES" in r.getMessage()]
        caplog.clear()
        DicomListener.from_settings(load_settings(environ={**base, "PTX_DICOM_ALLOWED_AES": "PACS1"}),
                                    Spool(tmp_path / "spool"), store)
        closed_warnings = [r.getMessage() for r in caplog.records if "PTX_DICOM_ALLOWED_AES" in r.getMessage()]
    assert len(open_warnings) == 1 and "ANY calling AE" in open_warnings[0]
    assert closed_warnings == []
