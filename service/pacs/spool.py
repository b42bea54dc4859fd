"""The DICOM spool: received instances on disk, durable before the sender is told success.

    listener: write(sop_uid, bytes) ──▶ <dir>/<sop_uid>.dcm ──▶ intake: read → triage → remove

A C-STORE may only be answered with success once the instance survives a crash, so `write` is the classic
sequence: a temporary file in the same directory, write, flush, fsync the file, hard-link it to the final
name (atomic on POSIX, and refused when the name exists: a reader never sees half a file), then fsync the
directory so the new name itself is on disk. A crash before the rename leaves only a temporary file, never a
truncated `<uid>.dcm`; those temporaries are removed when a `Spool` is opened.

File names are SOP Instance UIDs, so a UID is checked to be a DICOM UID (digits and dots, at most 64
characters) before it touches the file system: a crafted UID such as `../../etc/x` never becomes a path.
Writing a UID that is already spooled is refused (FileExistsError), never a replacement: a second C-STORE
with the same SOP Instance UID may carry another study or other pixels (a modality bug, a hostile sender),
and replacing the pending file would triage those bytes and record the finding on the first study. The
refusal is atomic (`link(2)` fails on an existing name), so two concurrent writers cannot both succeed;
the listener decides what the repeat means (service/pacs/listener.py).

`remove` does not fsync the directory: if a removal is lost in a crash, the file comes back as a leftover of
an instance the store already finished, which the intake clears at its next start. Files are created 0600 in
a 0700 directory: they hold patient data.

One process owns a spool directory (the one running the listener and the intake): opening a `Spool` removes
every temporary file in it, including one another process might be writing.
"""

from __future__ import annotations

import logging
from pathlib import Path

from service.errors import ServiceError
from service.imaging.uids import MAX_UID_LENGTH, is_dicom_uid
from service.store.durable import durable_create

log = logging.getLogger("ptx.spool")

SUFFIX = ".dcm"
TEMP_PREFIX = ".incoming-"
TEMP_SUFFIX = ".tmp"
class InvalidUidError(ServiceError, ValueError):
    """A SOP Instance UID that is not a DICOM UID; it is never used as a file name."""

    code, http_status = "invalid_uid", 400


def _check_uid(sop_uid: str) -> str:
    if not is_dicom_uid(sop_uid):
        shown = sop_uid[:80] if isinstance(sop_uid, str) else type(sop_uid).__name__
        raise InvalidUidError(f"SOP Instance UID {shown!r} is not a DICOM UID (digits and dots, at most "
                              f"{MAX_UID_LENGTH} characters)")
    return sop_uid


class Spool:
    """Instances waiting for triage, one file per SOP Instance UID. Thread-safe (every write is its own file)."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.removed_temporaries = self._clean_temporaries()

    def _clean_temporaries(self) -> int:
        """Remove temporary files left by a crash mid-write (their C-STORE was never answered success)."""
        count = 0
        for path in self.directory.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
            path.unlink(missing_ok=True)
            count += 1
        if count:
            log.warning("spool %s: removed %d unfinished temporary file(s) left by an interrupted write",
                        self.directory, count)
        return count

    def path(self, sop_uid: str) -> Path:
        """Where the instance `sop_uid` is (or would be) spooled; raises InvalidUidError for a non-UID."""
        return self.directory / f"{_check_uid(sop_uid)}{SUFFIX}"

    def write(self, sop_uid: str, data: bytes) -> Path:
        """Store `data` under `sop_uid` durably and atomically; returns the final path.

        On return the bytes and the directory entry are on stable storage. FileExistsError, with nothing
        written, when `sop_uid` is already spooled (an existing file is never replaced). On any failure the
        temporary file is removed and the exception propagates (the caller answers "out of resources").
        """
        return durable_create(self.path(sop_uid), data, prefix=f"{TEMP_PREFIX}{sop_uid}.", suffix=TEMP_SUFFIX)

    def read(self, sop_uid: str) -> bytes:
        """The spooled bytes; FileNotFoundError when the instance is not (or no longer) spooled."""
        return self.path(sop_uid).read_bytes()

    def exists(self, sop_uid: str) -> bool:
        return self.path(sop_uid).is_file()

    def remove(self, sop_uid: str) -> None:
        """Forget an instance once its outcome is recorded; a missing file is not an error."""
        self.path(sop_uid).unlink(missing_ok=True)

    def pending(self) -> list[str]:
        """SOP Instance UIDs of the spooled instances, oldest write first (UID order within a tie).

        Temporary files and names that are not `<UID>.dcm` are ignored.
        """
        entries: list[tuple[int, str]] = []
        for path in self.directory.iterdir():
            if path.suffix != SUFFIX or not is_dicom_uid(path.stem):
                continue
            try:
                entries.append((path.stat().st_mtime_ns, path.stem))
            except FileNotFoundError:  # removed between listing and stat
                continue
        return [uid for _, uid in sorted(entries)]
