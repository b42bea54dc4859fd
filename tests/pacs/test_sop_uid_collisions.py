"""SOP Instance UID collisions and deflate over C-STORE (issue 13 §3, §4), over real loopback associations.

A second C-STORE reusing a SOP Instance UID with another study or other bytes (a modality bug, a hostile
sender) must neither replace the film waiting for triage (its finding would land on the first study) nor be
answered success; an identical resend stays a success. Deflated Explicit VR Little Endian is not offered,
because pynetdicom and pydicom inflate a deflated dataset whole before any size limit.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore

from service.pacs.listener import CONFLICT, DUPLICATE, RECEIVED, UID_CONFLICT
from tests.pacs.test_dicom_listener import SENTINELS, receiver, scu, small_film


def send(port: int, *films: Dataset, calling_ae: str = "SENDER") -> list[int]:
    """C-STORE each film on one association; the statuses answered."""
    assoc = scu(calling_ae).associate("127.0.0.1", port, ae_title="PTXTRIAGE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(film).Status) for film in films]
    finally:
        assoc.release()


def twin(film: Dataset, **attributes: object) -> Dataset:
    """Another film carrying `film`'s SOP Instance UID (and study, unless overridden)."""
    other = small_film(SOPInstanceUID=film.SOPInstanceUID, StudyInstanceUID=film.StudyInstanceUID,
                       SeriesInstanceUID=film.SeriesInstanceUID)
    for keyword, value in attributes.items():
        setattr(other, keyword, value)
    return other


@pytest.fixture
def outcomes() -> list[str]:
    return []


def test_same_uid_in_another_study_is_refused_and_the_first_film_is_untouched(
        tmp_path: Path, outcomes: list[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ptx.dicom")
    first = small_film()
    intruder_study = generate_uid()
    intruder = twin(first, StudyInstanceUID=intruder_study)
    with receiver(tmp_path, on_outcome=outcomes.append) as rx:
        assert send(rx.port, first) == [0x0000]
        spooled = rx.spool.path(first.SOPInstanceUID)
        before, written = spooled.read_bytes(), spooled.stat().st_mtime_ns
        assert send(rx.port, intruder) == [UID_CONFLICT]
        assert spooled.read_bytes() == before and spooled.stat().st_mtime_ns == written  # not rewritten
        record = rx.store.instance(first.SOPInstanceUID)
        assert record is not None and record.study_uid == first.StudyInstanceUID
        assert rx.store.study(intruder_study) is None  # no study created for the refused copy
        assert rx.received == [first.SOPInstanceUID]  # queued once, for the first film only
        assert rx.spool.pending() == [first.SOPInstanceUID]
    assert outcomes == [RECEIVED, CONFLICT]
    refused = [r.getMessage() for r in caplog.records if f"0x{UID_CONFLICT:04X}" in r.getMessage()]
    assert len(refused) == 1 and first.SOPInstanceUID in refused[0]
    assert intruder_study not in refused[0] and first.StudyInstanceUID not in refused[0]  # the instance's UID only
    assert not any(s in r.getMessage() for r in caplog.records for s in SENTINELS)


def test_same_uid_same_study_other_pixels_is_refused(tmp_path: Path, outcomes: list[str]) -> None:
    first = small_film()
    altered = twin(first)
    pixels = first.pixel_array.copy()
    pixels[10:20, 10:20] = 0  # another image under the same UIDs
    altered.PixelData = pixels.astype(np.uint16).tobytes()
    with receiver(tmp_path, on_outcome=outcomes.append) as rx:
        assert send(rx.port, first) == [0x0000]
        before = rx.spool.read(first.SOPInstanceUID)
        statuses = send(rx.port, altered)
        assert statuses == [UID_CONFLICT]
        assert rx.spool.read(first.SOPInstanceUID) == before
        record = rx.store.instance(first.SOPInstanceUID)
        assert record is not None and record.sha256 is not None and len(record.sha256) == 64
        assert len(rx.instances()) == 1 and rx.received == [first.SOPInstanceUID]
    assert outcomes == [RECEIVED, CONFLICT]


def test_an_identical_repeat_is_a_success_with_one_record(tmp_path: Path, outcomes: list[str]) -> None:
    """The same film again, from another sender too (the file meta group we write names the sender, so
    the comparison must not see it): success, one record, queued once, the spool file not rewritten."""
    film = small_film()
    with receiver(tmp_path, on_outcome=outcomes.append) as rx:
        assert send(rx.port, film) == [0x0000]
        spooled = rx.spool.path(film.SOPInstanceUID)
        written = spooled.stat().st_mtime_ns
        assert send(rx.port, film, film) == [0x0000, 0x0000]
        assert send(rx.port, film, calling_ae="PACS2") == [0x0000]
        assert spooled.stat().st_mtime_ns == written
        instances = rx.instances()
        assert list(instances) == [film.SOPInstanceUID] and instances[film.SOPInstanceUID].source == "dicom:SENDER"
        stored = rx.spool.read(film.SOPInstanceUID)
        # the data set after the file meta group: preamble, "DICM", (0002,0000) UL 4 <its length>, then the group
        dataset_bytes = stored[128 + 4 + 12 + int.from_bytes(stored[140:144], "little"):]
        assert instances[film.SOPInstanceUID].sha256 == hashlib.sha256(dataset_bytes).hexdigest()  # kept at receipt
        assert rx.received == [film.SOPInstanceUID]
    assert outcomes == [RECEIVED, DUPLICATE, DUPLICATE, DUPLICATE]


def test_a_leftover_spool_file_with_other_bytes_is_not_replaced(tmp_path: Path, outcomes: list[str]) -> None:
    """A file spooled but never recorded (a crash between spool and store, or a concurrent copy): a C-STORE
    with other bytes under that UID is refused and the file kept; the same bytes are recorded as received."""
    film = small_film()
    other = twin(film, StudyInstanceUID=generate_uid())
    with receiver(tmp_path, on_outcome=outcomes.append) as rx:
        assert send(rx.port, film) == [0x0000]
        kept = rx.spool.read(film.SOPInstanceUID)
        orphan = small_film()
        rx.spool.write(orphan.SOPInstanceUID, kept)  # bytes under another UID's name: other content
        assert send(rx.port, orphan) == [UID_CONFLICT]
        assert rx.spool.read(orphan.SOPInstanceUID) == kept and rx.store.instance(orphan.SOPInstanceUID) is None
        assert send(rx.port, other) == [UID_CONFLICT]
    assert outcomes == [RECEIVED, CONFLICT, CONFLICT]


def test_deflate_is_not_offered_and_the_listener_still_serves(tmp_path: Path) -> None:
    """Deflate alone for CR: no accepted presentation context (nothing to C-STORE on); a normal association
    afterwards stores as usual."""
    deflate_only = AE(ae_title="SENDER")
    deflate_only.acse_timeout = deflate_only.dimse_timeout = deflate_only.network_timeout = 5
    deflate_only.add_requested_context(ComputedRadiographyImageStorage, [DeflatedExplicitVRLittleEndian])
    film = small_film()
    with receiver(tmp_path) as rx:
        assoc = deflate_only.associate("127.0.0.1", rx.port, ae_title="PTXTRIAGE")
        try:
            assert not assoc.is_established or assoc.accepted_contexts == []
            if assoc.is_established:
                assert [c.abstract_syntax for c in assoc.rejected_contexts] == [ComputedRadiographyImageStorage]
        finally:
            if assoc.is_established:
                assoc.release()
        assert send(rx.port, film) == [0x0000]
        assert rx.received == [film.SOPInstanceUID]
        supported = {syntax for context in rx.listener.ae.supported_contexts for syntax in context.transfer_syntax}
    assert DeflatedExplicitVRLittleEndian not in supported and ExplicitVRLittleEndian in supported
