"""The burst's films, sent by a real Orthanc, and the SEG and SR objects that come back to it.

Why Orthanc's REST store (`POST /modalities/{listener}/store`, one film per synchronous job) and not dcmtk's
storescu: Orthanc is the router that sends our listeners films in the deployment docs/deploy.md draws, and its
answer for one film is that film's C-STORE outcome (200 only once the listener answered success), so the test
knows exactly which films were acknowledged; storescu sends many files per association and says which
succeeded only in its log. Orthanc runs at most two jobs at once (its default `ConcurrentJobs`), so the senders
are as many as that and the listeners see a steady stream, not the first few films of 200 threads.
"""

from __future__ import annotations

import io
import threading
import urllib.error
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

from tests.orthanc import Orthanc
from training.__main__ import main as training_main


@dataclass(frozen=True)
class Film:
    """One film of the burst: which listener (Orthanc modality) it goes to, and Orthanc's ID for it."""

    sop_uid: str
    study_uid: str
    listener: str
    orthanc_id: str


def synthetic_studies(folder: Path, studies: int, per_study: int, templates: int = 24,
                      seed: int = 17) -> list[bytes]:
    """`studies` × `per_study` distinct films (own SOP and series UIDs, one patient and study UID per study).

    The pixels come from `templates` synthetic films (training's synth, 256 px, half with a lesion) reused
    round-robin: what matters here is the number of instances and their mix of priorities, not their pixels."""
    if not training_main(["synth", "--out", str(folder), "--count", str(templates), "--seed", str(seed),
                          "--prevalence", "0.5", "--size", "256", "--uncompressed", "--quiet"]) == 0:
        raise RuntimeError("training synth failed to write the burst's template films")
    sources = [path.read_bytes() for path in sorted((folder / "dicom").glob("*.dcm"))]
    films = []
    for study in range(studies):
        study_uid = generate_uid()
        for number in range(per_study):
            ds = pydicom.dcmread(io.BytesIO(sources[(study * per_study + number) % len(sources)]))
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.PatientID, ds.PatientName = f"BURST-{study:04d}", f"Burst^{study:04d}"
            ds.InstanceNumber = number + 1
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            films.append(buffer.getvalue())
    return films


def upload(orthanc: Orthanc, films: Iterable[bytes], listeners: list[str]) -> list[Film]:
    """Store the films in Orthanc, each assigned to a listener in turn (a study's films reach both)."""
    out = []
    for index, data in enumerate(films):
        answer = orthanc.post("/instances", data, "application/dicom")
        if not isinstance(answer, dict) or answer.get("Status") != "Success":
            raise RuntimeError(f"Orthanc did not store film {index}: {answer}")
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        out.append(Film(ds.SOPInstanceUID, ds.StudyInstanceUID, listeners[index % len(listeners)], answer["ID"]))
    return out


@dataclass
class SendLog:
    """What Orthanc's store jobs said, per film: acknowledged (C-STORE success) or failed, and each failure."""

    acknowledged: list[Film] = field(default_factory=list)
    failed: list[Film] = field(default_factory=list)
    attempts: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, film: Film, ok: bool) -> None:
        with self._lock:
            self.attempts[film.sop_uid] += 1
            (self.acknowledged if ok else self.failed).append(film)

    def take_failed(self) -> list[Film]:
        """The films whose last send failed and that were not acknowledged since: to send again."""
        with self._lock:
            done = {film.sop_uid for film in self.acknowledged}
            failed, self.failed = [f for f in self.failed if f.sop_uid not in done], []
            return list({film.sop_uid: film for film in failed}.values())


def store_one(orthanc: Orthanc, film: Film) -> bool:
    """Orthanc C-STOREs one film to its listener; True only when the listener answered success."""
    try:
        orthanc.post(f"/modalities/{film.listener}/store", {"Resources": [film.orthanc_id], "Synchronous": True})
    except urllib.error.HTTPError as error:  # Orthanc's 500: the association or the C-STORE failed
        error.close()
        return False
    return True


def send(orthanc: Orthanc, films: list[Film], log: SendLog, senders: int = 2,
         before_each: Callable[[int], None] | None = None) -> None:
    """Send `films` in order from `senders` threads; `before_each(n)` runs before the n-th film (the test's
    hook to kill processes mid-burst)."""
    queue = list(reversed(films))
    lock = threading.Lock()
    sent = 0

    def work() -> None:
        nonlocal sent
        while True:
            with lock:
                if not queue:
                    return
                film, number = queue.pop(), sent
                sent += 1
            if before_each is not None:
                before_each(number)
            log.record(film, store_one(orthanc, film))

    threads = [threading.Thread(target=work, name=f"orthanc-sender-{n}") for n in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _referenced(tags: Any, into: set[str]) -> None:
    """Every ReferencedSOPInstanceUID anywhere in Orthanc's simplified tags (SEG: Referenced Series Sequence;
    SR: Current Requested Procedure Evidence Sequence)."""
    if isinstance(tags, dict):
        for key, value in tags.items():
            if key == "ReferencedSOPInstanceUID" and isinstance(value, str):
                into.add(value)
            else:
                _referenced(value, into)
    elif isinstance(tags, list):
        for item in tags:
            _referenced(item, into)


@dataclass(frozen=True)
class ResultObject:
    """A SEG or SR in Orthanc: its SOP Instance UID and every instance it references (its film; an SR also
    its SEG)."""

    modality: str
    sop_uid: str
    sources: frozenset[str]


def results_in(orthanc: Orthanc, modality: str) -> list[ResultObject]:
    """Every instance of `modality` (SEG or SR) stored in Orthanc, with the films it references."""
    ids = orthanc.post("/tools/find", {"Level": "Instance", "Query": {"Modality": modality}})
    found = []
    for orthanc_id in ids if isinstance(ids, list) else []:
        tags = orthanc.get(f"/instances/{orthanc_id}/simplified-tags")
        sources: set[str] = set()
        _referenced(tags, sources)
        found.append(ResultObject(modality, str(tags["SOPInstanceUID"]), frozenset(sources)))  # type: ignore[index]
    return found


def per_source(objects: list[ResultObject], films: set[str]) -> Counter[str]:
    """How many of `objects` reference each of `films`."""
    counts: Counter[str] = Counter()
    for result in objects:
        counts.update(result.sources & films)
    return counts

