"""Where the service keeps the result objects it made: `<data_dir>/results/<study>/<sop>/<name>`.

One folder per triaged instance holds its SEG, SR, optional Secondary Capture and an overlay PNG: the
API links to them and the delivery sends the DICOM ones. Names come from a fixed list and UIDs must be
DICOM UIDs, so no request can make the service read or write outside this folder.
"""

from __future__ import annotations

from pathlib import Path

from service.imaging.uids import is_dicom_uid
from service.store.durable import durable_folder, durable_write

#: file name → the link name the API uses for it
RESULT_FILES = {"SEG.dcm": "seg", "SR.dcm": "sr", "SC.dcm": "overlay_dicom", "overlay.png": "overlay_png"}
#: the film's identifiers for its pushed notifications (service/pacs/notify/content.py): beside the SEG/SR that
#: carry the same attributes, out of the database; not a result file, so `path` (the API's) never names it
NOTIFICATION_FILE = "notification.json"


def check_uid(value: str, name: str) -> str:
    if not is_dicom_uid(value):
        raise ValueError(f"{name} must be a DICOM UID (digits and dots, at most 64 characters)")
    return value


class ResultsFolder:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, study_uid: str, sop_uid: str, name: str) -> Path:
        if name not in RESULT_FILES:
            raise ValueError(f"unknown result file {name!r}; one of {', '.join(RESULT_FILES)}")
        return self.root / check_uid(study_uid, "study_uid") / check_uid(sop_uid, "sop_uid") / name

    def write(self, study_uid: str, sop_uid: str, name: str, data: bytes) -> Path:
        """Write atomically and durably (`service.store.durable`): a reader never sees half an object, and a
        delivery queued for it never names a file, or a new folder, that a power cut can take back."""
        target = self.path(study_uid, sop_uid, name)
        durable_folder(target.parent)
        return durable_write(target, data)

    def notification_path(self, study_uid: str, sop_uid: str) -> Path:
        return self.root / check_uid(study_uid, "study_uid") / check_uid(sop_uid, "sop_uid") / NOTIFICATION_FILE

    def write_notification(self, study_uid: str, sop_uid: str, data: bytes) -> Path:
        """As `write`, for NOTIFICATION_FILE: durable before the outbox rows that will read it."""
        target = self.notification_path(study_uid, sop_uid)
        durable_folder(target.parent)
        return durable_write(target, data)

    def present(self, study_uid: str, sop_uid: str) -> list[str]:
        """The result files that exist for an instance, in the fixed order."""
        folder = self.root / check_uid(study_uid, "study_uid") / check_uid(sop_uid, "sop_uid")
        return [name for name in RESULT_FILES if (folder / name).is_file()]
