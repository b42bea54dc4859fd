"""The DICOM spool: received instances on disk, durable before the sender is told success.

    listener: adopt(sop_uid, received file) ──▶ <dir>/<sop_uid>.dcm ──▶ intake: read → triage → remove
              (or write(sop_uid, bytes))

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

`adopt` takes a file already on disk (pynetdicom's copy of a received C-STORE dataset) instead of bytes, so
a large film is never held in memory: where the file is on the spool's file system it is fsynced and
hard-linked under its name (no copy at all), elsewhere it is copied in 1 MiB pieces to a temporary beside
the spool and linked from there, with the same durability and the same refusal of an existing name.
`free_bytes` is what the listener holds against PTX_SPOOL_MIN_FREE_MB before it spools a new instance.

`remove` does not fsync the directory: if a removal is lost in a crash, the file comes back as a leftover of
an instance the store already finished, which the intake clears at its next start. Files are created 0600 in
a 0700 directory: they hold patient data.

One process owns a spool directory (the one running the listener and the intake): opening a `Spool` removes
every temporary file in it, including one another process might be writing.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path

from service.errors import ServiceError
from service.imaging.uids import MAX_UID_LENGTH, is_dicom_uid
from service.store.durable import durable_create, fsync_directory

log = logging.getLogger("ptx.spool")

SUFFIX = ".dcm"
TEMP_PREFIX = ".incoming-"
TEMP_SUFFIX = ".tmp"
RECEIVING = "receiving"  # the listener's received-dataset files (a folder: never taken for `<UID>.dcm`)
COPY_CHUNK = 1 << 20  # bytes per read when a received file must be copied in


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
        # Where the listener receives C-STORE datasets as they arrive: on the spool's file system, so a
        # received file is linked in (no copy), the free-space floor covers it, and a file cut off by a crash
        # stays in a folder of ours (removed here at the next start) rather than in the system's /tmp.
        self.receiving = self.directory / RECEIVING
        self.receiving.mkdir(mode=0o700, exist_ok=True)
        self.removed_temporaries = self._clean_temporaries()

    def _clean_temporaries(self) -> int:
        """Remove temporary files left by a crash mid-write or mid-receipt (never answered success)."""
        count = 0
        for path in [*self.directory.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"), *self.receiving.iterdir()]:
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

    def adopt(self, sop_uid: str, source: Path) -> Path:
        """Store the file at `source` under `sop_uid` durably and atomically, as `write` does with bytes,
        without reading it into memory; returns the final path. `source` stays where it is (its owner
        removes it; a hard link keeps the spooled name valid). FileExistsError, with nothing spooled, when
        `sop_uid` is already spooled; on any other failure nothing is left in the spool."""
        final = self.path(sop_uid)
        try:
            _fsync_file(source)
            os.link(source, final)  # FileExistsError when spooled already; EXDEV on another file system
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            return self._copy_in(source, final, sop_uid)
        fsync_directory(self.directory)
        return final

    def _copy_in(self, source: Path, final: Path, sop_uid: str) -> Path:
        """`adopt` across file systems: a 0600 temporary in the spool, copied in pieces, fsynced, linked."""
        fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=f"{TEMP_PREFIX}{sop_uid}.", suffix=TEMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as target, source.open("rb") as origin:
                shutil.copyfileobj(origin, target, COPY_CHUNK)
                target.flush()
                os.fsync(target.fileno())
            os.link(temporary, final)  # FileExistsError when `final` exists: nothing replaced
        finally:
            Path(temporary).unlink(missing_ok=True)
        fsync_directory(self.directory)
        return final

    def free_bytes(self) -> int:
        """Bytes free on the spool's file system for this (unprivileged) process."""
        return shutil.disk_usage(self.directory).free

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


def _fsync_file(path: Path) -> None:
    """Flush a file's bytes to stable storage through a descriptor of our own (fsync works on any
    descriptor of the inode, read-only included), so a link made next is to durable bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
