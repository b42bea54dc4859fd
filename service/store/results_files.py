"""Where the service keeps the result objects it made: `<data_dir>/results/<study>/<sop>/<name>`, and a copy
in the database where several replicas must read them (issue 17 §4).

One folder per triaged instance holds its SEG, SR, optional Secondary Capture and an overlay PNG: the
API links to them and the delivery sends the DICOM ones. Names come from a fixed list and UIDs must be
DICOM UIDs, so no request can make the service read or write outside this folder.

With PTX_RESULTS_IN_DATABASE (default: on with PostgreSQL, off with SQLite) each object written here is also
put in the store's `result_objects` table (`result_objects.ResultObjects`), up to
PTX_RESULTS_DATABASE_MAX_BYTES: the delivery and notification dispatchers of every listener claim rows from
one outbox, and the API may be answered by any replica, so the replica that reads an object is often not the
one that wrote it. Readers take this replica's file first, else the database's copy (`read`, `present`,
`local_copy` for the senders, which send files). The folder stays the writer's copy and the embedded default.
"""

from __future__ import annotations

import logging
import shutil
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.imaging.uids import is_dicom_uid
from service.store.durable import durable_folder, durable_write
from service.store.result_objects import ResultObjects

if TYPE_CHECKING:
    from service.settings import Settings

#: file name → the link name the API uses for it
RESULT_FILES = {"SEG.dcm": "seg", "SR.dcm": "sr", "SC.dcm": "overlay_dicom", "overlay.png": "overlay_png"}
#: the film's identifiers for its pushed notifications (service/pacs/notify/content.py): beside the SEG/SR that
#: carry the same attributes (and, where they are shared, in the database with them); not a result file, so
#: `path` and `read` (the API's) never name it
NOTIFICATION_FILE = "notification.json"
DEFAULT_MAX_BYTES = 16 * 1024 * 1024  # as settings.results_database_max_bytes

log = logging.getLogger("ptx.results")


class NotShared(FileNotFoundError):
    """The object exists, but was over the database's size bound when it was made: only the folder of the
    replica that made it has it. A FileNotFoundError, so a reader that does not care why still sees none."""

    def __init__(self, name: str, sop_uid: str, size: int) -> None:
        super().__init__(f"{name} of instance {sop_uid} ({size} bytes) was over PTX_RESULTS_DATABASE_MAX_BYTES "
                         f"when it was made: only the replica that made it keeps it (in its results folder)")
        self.name, self.sop_uid, self.size = name, sop_uid, size


def check_uid(value: str, name: str) -> str:
    if not is_dicom_uid(value):
        raise ValueError(f"{name} must be a DICOM UID (digits and dots, at most 64 characters)")
    return value


def shared_by_default(database_url: str | None) -> bool:
    """PTX_RESULTS_IN_DATABASE unset: on with PostgreSQL (replicas share it), off with SQLite (one machine)."""
    return bool(database_url) and str(database_url).split("://", 1)[0] in ("postgresql", "postgres")


class ResultsFolder:
    """This replica's results folder, with the database copy (`objects`) where replicas share the store."""

    def __init__(self, root: Path, objects: ResultObjects | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"PTX_RESULTS_DATABASE_MAX_BYTES must be 0 or more, got {max_bytes}")
        self.root = Path(root)
        self.objects = objects
        self.max_bytes = max_bytes

    @classmethod
    def from_settings(cls, settings: Settings, store: Any) -> ResultsFolder:
        """`<data_dir>/results`, with the database copy when PTX_RESULTS_IN_DATABASE says so (unset: on iff
        PTX_DATABASE_URL is PostgreSQL)."""
        shared = settings.results_in_database
        if shared is None:
            shared = shared_by_default(settings.database_url)
        return cls(settings.data_dir / "results", ResultObjects(store) if shared else None,
                   settings.results_database_max_bytes)

    def path(self, study_uid: str, sop_uid: str, name: str) -> Path:
        if name not in RESULT_FILES:
            raise ValueError(f"unknown result file {name!r}; one of {', '.join(RESULT_FILES)}")
        return self.root / check_uid(study_uid, "study_uid") / check_uid(sop_uid, "sop_uid") / name

    def write(self, study_uid: str, sop_uid: str, name: str, data: bytes) -> Path:
        """Write atomically and durably (`service.store.durable`): a reader never sees half an object, and a
        delivery queued for it never names a file, or a new folder, that a power cut can take back. Then the
        database copy, before the caller queues a delivery that another replica may send: a failure there
        raises, so the results are made again later (outputs pending) rather than left unreadable elsewhere."""
        target = self.path(study_uid, sop_uid, name)
        durable_folder(target.parent)
        durable_write(target, data)
        self._share(study_uid, sop_uid, name, data)
        return target

    def notification_path(self, study_uid: str, sop_uid: str) -> Path:
        return self.root / check_uid(study_uid, "study_uid") / check_uid(sop_uid, "sop_uid") / NOTIFICATION_FILE

    def write_notification(self, study_uid: str, sop_uid: str, data: bytes) -> Path:
        """As `write`, for NOTIFICATION_FILE: durable (and shared) before the outbox rows that will read it."""
        target = self.notification_path(study_uid, sop_uid)
        durable_folder(target.parent)
        durable_write(target, data)
        self._share(study_uid, sop_uid, NOTIFICATION_FILE, data)
        return target

    def _share(self, study_uid: str, sop_uid: str, name: str, data: bytes) -> None:
        if self.objects is None:
            return
        if len(data) > self.max_bytes:
            log.warning("%s of instance %s is %d bytes, over PTX_RESULTS_DATABASE_MAX_BYTES (%d): kept in this "
                        "replica's results folder only; other replicas can neither serve nor send it",
                        name, sop_uid, len(data), self.max_bytes)
            self.objects.put_oversize(study_uid, sop_uid, name, len(data))
        else:
            self.objects.put(study_uid, sop_uid, name, data)

    def read(self, study_uid: str, sop_uid: str, name: str) -> bytes:
        """A result object's bytes: this replica's file, else the database's copy. FileNotFoundError when
        neither has it (`NotShared` when it was too large for the database); ValueError for a bad UID or name."""
        return self._read(study_uid, sop_uid, name, self.path(study_uid, sop_uid, name))

    def read_notification(self, study_uid: str, sop_uid: str) -> bytes:
        """NOTIFICATION_FILE's bytes, as `read` (never reachable through `read`'s names: the API's)."""
        return self._read(study_uid, sop_uid, NOTIFICATION_FILE, self.notification_path(study_uid, sop_uid))

    def _read(self, study_uid: str, sop_uid: str, name: str, target: Path) -> bytes:
        try:
            return target.read_bytes()
        except FileNotFoundError:
            if self.objects is None:
                raise FileNotFoundError(f"no {name} for instance {sop_uid}") from None
        stored = self.objects.get(study_uid, sop_uid, name)
        if stored is None:
            raise FileNotFoundError(f"no {name} for instance {sop_uid}, in this replica's folder or the database")
        if stored.data is None:
            raise NotShared(name, sop_uid, stored.size)
        return stored.data

    def present(self, study_uid: str, sop_uid: str) -> list[str]:
        """The result files that exist for an instance, here or in the database, in the fixed order."""
        folder = self.root / check_uid(study_uid, "study_uid") / check_uid(sop_uid, "sop_uid")
        found = {name for name in RESULT_FILES if (folder / name).is_file()}
        if self.objects is not None and len(found) < len(RESULT_FILES):
            found.update(self.objects.names(study_uid, sop_uid))
        return [name for name in RESULT_FILES if name in found]

    def has(self, study_uid: str, sop_uid: str, name: str) -> bool:
        """Whether `read` would find the object (a file here costs no database query)."""
        if self.path(study_uid, sop_uid, name).is_file():
            return True
        return self.objects is not None and name in self.objects.names(study_uid, sop_uid)

    def local_copy(self, path: str | Path) -> Path:
        """A file on this replica for a result object named by `path`, written on whichever replica made it
        (a delivery row's path): its last three parts are <study>/<sop>/<name>, checked as `path` checks
        them. This replica's file when it has one, else the database's copy written under this root (where a
        second send finds it, and the retention sweep removes it). FileNotFoundError / NotShared as `read`."""
        parts = Path(path).parts
        if len(parts) < 3:
            raise ValueError(f"{path} does not end in <study>/<sop>/<name> of a results folder")
        study_uid, sop_uid, name = parts[-3:]
        target = self.path(study_uid, sop_uid, name)
        if target.is_file():
            return target
        data = self._read(study_uid, sop_uid, name, target)
        durable_folder(target.parent)
        return durable_write(target, data)

    def remove(self, study_uid: str, sop_uid: str) -> None:
        """An instance's results, folder and database copy (retention): the folder first, so a failure with the
        database leaves rows that `stale_in_database` finds at the next sweep, never a file without its row."""
        folder = self.root / check_uid(study_uid, "study_uid") / check_uid(sop_uid, "sop_uid")
        shutil.rmtree(folder, ignore_errors=True)
        if self.objects is not None:
            self.objects.remove(study_uid, sop_uid)

    def stale_in_database(self, cutoff: datetime) -> list[tuple[str, str]]:
        """(study, sop) whose database copies are all older than `cutoff` (none when there is no copy)."""
        return [] if self.objects is None else self.objects.stale(cutoff)
