"""Where the service keeps the result objects it made: `<data_dir>/results/<study>/<sop>/<name>`.

One folder per triaged instance holds its SEG, SR, optional Secondary Capture and an overlay PNG: the
API links to them and the delivery sends the DICOM ones. Names come from a fixed list and UIDs must be
DICOM UIDs, so no request can make the service read or write outside this folder.
"""

from __future__ import annotations

from pathlib import Path

from service.imaging.uids import is_dicom_uid
from service.store.durable import durable_write

#: file name → the link name the API uses for it
RESULT_FILES = {"SEG.dcm": "seg", "SR.dcm": "sr", "SC.dcm": "overlay_dicom", "overlay.png": "overlay_png"}


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
        """Write atomically and durably (`service.pacs.spool.durable_write`): a reader never sees half an object."""
        target = self.path(study_uid, sop_uid, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        return durable_write(target, data)

    def present(self, study_uid: str, sop_uid: str) -> list[str]:
        """The result files that exist for an instance, in the fixed order."""
        folder = self.root / check_uid(study_uid, "study_uid") / check_uid(sop_uid, "sop_uid")
        return [name for name in RESULT_FILES if (folder / name).is_file()]
