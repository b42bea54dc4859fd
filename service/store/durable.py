"""Files that survive a crash: written to a temporary name, fsynced, renamed, and the folder fsynced.

The spool (a film acknowledged to a PACS) and the results folder (objects queued for delivery) both rely
on it: an acknowledgement or a queued delivery must never point at a file a power cut can take back. A
folder made for such a file is made durable too (`durable_folder`): fsyncing a file and its folder does not
make the folder's own entry in its parent durable, so a new `<study>/<sop>/` could vanish with its files.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Make a rename (or creation) in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_folder(folder: Path) -> Path:
    """Create `folder` and its missing parents, each new one's entry fsynced in its parent before the next is
    made inside it. An existing folder costs one `stat`; a file in the way raises FileExistsError."""
    missing: list[Path] = []
    current = Path(folder)
    while not current.is_dir() and current != current.parent:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            if not directory.is_dir():
                raise
            continue  # made by a concurrent writer, which fsyncs its own entry
        fsync_directory(directory.parent)
    return Path(folder)


def _written_temporary(final: Path, data: bytes, prefix: str, suffix: str) -> str:
    """A temporary file beside `final` holding `data`, flushed and fsynced; removed if writing fails."""
    fd, temporary = tempfile.mkstemp(dir=final.parent, prefix=prefix, suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return temporary


def durable_write(final: Path, data: bytes, prefix: str = ".tmp-", suffix: str = "") -> Path:
    """Write `data` to `final` atomically and durably: a temporary file in the same folder, written,
    flushed and fsynced, renamed over `final`, then the folder fsynced (so the new name survives a crash).
    On failure the temporary file is removed and the exception propagates."""
    temporary = _written_temporary(final, data, prefix, suffix)
    try:
        os.replace(temporary, final)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(final.parent)
    return final


def durable_create(final: Path, data: bytes, prefix: str = ".tmp-", suffix: str = "") -> Path:
    """As `durable_write`, but never replaces an existing `final`: FileExistsError instead, data unwritten.

    Why a hard link rather than `os.replace`: `link(2)` fails with EEXIST when the name is taken, in the same
    atomic step that would create it, so two writers of one name cannot both win and a file already there
    (a film the intake has yet to triage) is never overwritten. A check-then-replace would leave a window
    between the check and the rename. The temporary name is unlinked once the link exists; a crash between
    the two leaves only a temporary, which its owner clears (the spool does when it is opened)."""
    temporary = _written_temporary(final, data, prefix, suffix)
    try:
        os.link(temporary, final)  # FileExistsError when `final` exists: nothing replaced
    finally:
        Path(temporary).unlink(missing_ok=True)
    fsync_directory(final.parent)
    return final
