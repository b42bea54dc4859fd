"""Films recorded from HTTP (PTX_RECORD_HTTP) keep the digest of their data set, as C-STORE receipts do, so
the SOP Instance UID rule (issue 13 §3: a repeat with other bytes is refused) holds whichever way a film came.

`record_http` runs on a real SQLite store, the C-STOREs go over real loopback associations to the real
listener on that same store. The findings are constructed values (recording reads only their UIDs and
results), the films come from the DICOM factory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from service.cascade.finding import Finding, Priority
from service.http.recording import SopUidConflictError, record_http
from service.pacs.listener import UID_CONFLICT
from service.store import InstanceStatus, ResultsStore, dataset_sha256, open_store
from tests.pacs.test_dicom_listener import encode, receiver, small_film
from tests.pacs.test_sop_uid_collisions import send, twin


def finding_of(film: Dataset, score: float = 0.2) -> Finding:
    """The finding triage would give `film`, as far as recording reads it."""
    return Finding(study_uid=str(film.StudyInstanceUID), series_uid=str(film.SeriesInstanceUID),
                   sop_uid=str(film.SOPInstanceUID), score=score, positive=score >= 0.5,
                   priority=Priority.URGENT if score >= 0.5 else Priority.ROUTINE, threshold=0.5,
                   mask=np.zeros((4, 4), dtype=bool), rle="", instances=[])


def other_pixels(film: Dataset) -> Dataset:
    """Another image under `film`'s UIDs (same study and series)."""
    altered = twin(film)
    pixels = film.pixel_array.copy()
    pixels[10:20, 10:20] = 0
    altered.PixelData = pixels.astype(np.uint16).tobytes()
    return altered


@pytest.fixture
def store(tmp_path: Path) -> ResultsStore:
    with open_store(None, tmp_path) as opened:
        yield opened


def test_an_http_film_keeps_the_digest_a_c_store_of_it_gets(tmp_path: Path, store: ResultsStore) -> None:
    """One film, one digest: over HTTP as a Part 10 file or as its bare data set, and over C-STORE (the
    listener's own digest of what it spooled, in a store of its own)."""
    film = small_film()
    data = encode(film)
    record_http(store, finding_of(film), data)
    recorded = store.instance(film.SOPInstanceUID)
    assert recorded is not None and recorded.source == "http" and recorded.status is InstanceStatus.DONE
    assert recorded.sha256 == hashlib.sha256(data_set_of(data)).hexdigest() == dataset_sha256(data_set_of(data))
    with receiver(tmp_path / "dicom") as rx:
        assert send(rx.port, film) == [0x0000]
        received = rx.store.instance(film.SOPInstanceUID)
    assert received is not None and received.source == "dicom:SENDER" and received.sha256 == recorded.sha256


def data_set_of(data: bytes) -> bytes:
    """A Part 10 file's data set, by the file meta group length (0002,0000): the test's own reading."""
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00"
    return data[144 + int.from_bytes(data[140:144], "little"):]


def test_a_c_store_reusing_an_http_films_uid_with_other_bytes_is_refused(tmp_path: Path,
                                                                        store: ResultsStore) -> None:
    """Before the digest, an HTTP row could only be compared by study: another image under the same UIDs
    was answered success and taken for a resend. Now it is refused (0xC001); the same film is a success."""
    film = small_film()
    record_http(store, finding_of(film), encode(film))
    with receiver(tmp_path, store=store) as rx:
        assert send(rx.port, other_pixels(film)) == [UID_CONFLICT]
        assert send(rx.port, film) == [0x0000]
        assert rx.received == [] and rx.spool.pending() == []  # nothing queued for triage either time
    record = store.instance(film.SOPInstanceUID)
    assert record is not None and record.source == "http" and record.sha256 == dataset_sha256(encode(film))


def test_an_http_repeat_with_other_bytes_or_study_is_refused_and_the_first_finding_kept(
        store: ResultsStore) -> None:
    """Before, a repeat was dropped in silence: the caller got the second film's answer while the worklist
    kept the first film's finding. Now: 409 sop_uid_conflict, nothing recorded; an identical repeat passes."""
    film = small_film()
    record_http(store, finding_of(film, 0.2), encode(film))
    first = store.finding(film.SOPInstanceUID)
    altered = other_pixels(film)
    with pytest.raises(SopUidConflictError, match=rf"SOP Instance UID {film.SOPInstanceUID} was already received "
                                                  r"with other content; the first film is kept") as caught:
        record_http(store, finding_of(altered, 0.9), encode(altered))
    assert (caught.value.code, caught.value.http_status) == ("sop_uid_conflict", 409)
    moved = twin(film, StudyInstanceUID=generate_uid())
    with pytest.raises(SopUidConflictError, match="already received with another study"):
        record_http(store, finding_of(moved), encode(moved))
    assert store.study(moved.StudyInstanceUID) is None
    record_http(store, finding_of(film, 0.2), encode(film))  # the same film again: no error, no second row
    assert store.finding(film.SOPInstanceUID) == first
    study = store.study(film.StudyInstanceUID)
    assert study is not None and [i.sop_uid for i in study.instances] == [film.SOPInstanceUID]
    assert study.priority is Priority.ROUTINE  # the refused 0.9 never reached the worklist
