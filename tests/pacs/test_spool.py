"""The spool's own logic: durable write order, UID checks, pending order, clean-up of interrupted writes.

The order of the durability steps cannot be observed from outside without pulling the power, so it is checked
by spying on `os.fsync` / `os.link` as the spool calls them: the file's bytes are synced while it is still
the temporary, then linked to its name (never over an existing file), then the directory is synced.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from service.imaging.uids import is_dicom_uid
from service.pacs.spool import InvalidUidError, Spool
from service.store import durable as durable_module

UID_A = "1.2.826.0.1.3680043.8.498.1"
UID_B = "1.2.826.0.1.3680043.8.498.2"
UID_C = "1.2.826.0.1.3680043.8.498.3"


def files_in(directory: Path) -> list[str]:
    """The names of the files in `directory` (its `receiving` folder, where the listener receives, left out)."""
    return sorted(p.name for p in directory.iterdir() if p.is_file())


def test_write_read_remove_round_trip(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    path = spool.write(UID_A, b"DICM-bytes")
    assert path == tmp_path / "spool" / f"{UID_A}.dcm" == spool.path(UID_A)
    assert spool.read(UID_A) == b"DICM-bytes" and spool.exists(UID_A)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # patient data: owner only
    assert stat.S_IMODE((tmp_path / "spool").stat().st_mode) == 0o700
    assert files_in(tmp_path / "spool") == [f"{UID_A}.dcm"]  # no temporary left
    with pytest.raises(FileExistsError):
        spool.write(UID_A, b"second copy")  # a repeat of one UID never replaces the spooled file
    assert spool.read(UID_A) == b"DICM-bytes"
    assert files_in(tmp_path / "spool") == [f"{UID_A}.dcm"]  # its temporary removed
    spool.remove(UID_A)
    spool.remove(UID_A)  # already gone: not an error
    assert not spool.exists(UID_A) and spool.pending() == []
    with pytest.raises(FileNotFoundError):
        spool.read(UID_A)


def test_write_syncs_the_file_then_links_then_syncs_the_directory(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path)
    data = b"x" * 100_000
    steps: list[tuple[str, object]] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            steps.append(("fsync-dir", info.st_ino == tmp_path.stat().st_ino))
        else:
            # The file being synced must already hold every byte and must not yet be the final name.
            final = tmp_path / f"{UID_A}.dcm"
            steps.append(("fsync-file", (info.st_size, final.exists())))
        real_fsync(fd)

    def link(source: str, target: str) -> None:
        steps.append(("link", (Path(source).name.startswith(".incoming-"), Path(target).name)))
        real_link(source, target)

    # the spool writes through service.store.durable (a hard link: never over an existing file)
    monkeypatch.setattr(durable_module.os, "fsync", fsync)
    monkeypatch.setattr(durable_module.os, "link", link)
    spool.write(UID_A, data)
    assert steps == [("fsync-file", (len(data), False)), ("link", (True, f"{UID_A}.dcm")), ("fsync-dir", True)]


@pytest.mark.parametrize("failing", ["fsync", "link"])
def test_a_failed_write_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    spool = Spool(tmp_path)

    def broken(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable_module.os, failing, broken)
    with pytest.raises(OSError, match="No space"):
        spool.write(UID_A, b"data")
    assert files_in(tmp_path) == []  # neither the final file nor the temporary


@pytest.mark.parametrize("bad", ["", "../../etc/passwd", "1.2.abc", "1..2", ".1.2", "1.2.", "1/2", "1.2 ", "1" * 65,
                                 "1.2\x00.3"])
def test_a_non_uid_never_becomes_a_file_name(tmp_path: Path, bad: str) -> None:
    spool = Spool(tmp_path)
    assert not is_dicom_uid(bad)
    for operation in (lambda: spool.write(bad, b"x"), lambda: spool.read(bad), lambda: spool.remove(bad),
                      lambda: spool.path(bad)):
        with pytest.raises(InvalidUidError):
            operation()
    assert files_in(tmp_path) == []


def test_uid_check_accepts_real_uids() -> None:
    assert is_dicom_uid("1.2.840.10008.5.1.4.1.1.1")
    assert is_dicom_uid("1." + "2" * 62)  # exactly 64 characters
    assert is_dicom_uid("1.2.392.200046.100.2.1.97028794843.150131102105.1.1.1")


def test_pending_is_oldest_first_and_ignores_other_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for uid, mtime in ((UID_A, 3_000), (UID_B, 1_000), (UID_C, 2_000)):
        os.utime(spool.write(uid, uid.encode()), ns=(mtime * 10**9, mtime * 10**9))
    (tmp_path / ".incoming-1.2.3.abcd.tmp").write_bytes(b"partial")  # a write in progress
    (tmp_path / "notes.txt").write_text("not an instance")
    (tmp_path / "not-a-uid.dcm").write_bytes(b"x")
    assert spool.pending() == [UID_B, UID_C, UID_A]


def test_opening_a_spool_removes_temporaries_of_interrupted_writes(tmp_path: Path) -> None:
    Spool(tmp_path).write(UID_A, b"complete")
    stale = [tmp_path / f".incoming-{UID_B}.k3j4.tmp", tmp_path / ".incoming-x.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    reopened = Spool(tmp_path)
    assert reopened.removed_temporaries == 2
    assert not any(path.exists() for path in stale)
    assert reopened.pending() == [UID_A] and reopened.read(UID_A) == b"complete"


def test_concurrent_writes_of_one_uid_leave_exactly_one_whole_file(tmp_path: Path) -> None:
    """The refusal is atomic (a hard link fails on an existing name), not a check then a write: of many
    writers racing on one UID exactly one succeeds, and the file holds that writer's bytes whole."""
    import threading

    spool = Spool(tmp_path / "spool")
    writers, start = 8, threading.Barrier(8)
    won: list[bytes] = []
    refused: list[int] = []

    def write(n: int) -> None:
        data = bytes([n]) * 200_000
        start.wait()
        try:
            spool.write(UID_B, data)
            won.append(data)
        except FileExistsError:
            refused.append(n)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(refused) == writers - 1
    assert spool.read(UID_B) == won[0]
    assert files_in(tmp_path / "spool") == [f"{UID_B}.dcm"]


# --- adopt: a received file moved in without reading it into memory (issue 13 §8) --------------------------


def received_file(folder: Path, data: bytes) -> Path:
    """A file as pynetdicom leaves a received C-STORE dataset: written and flushed, 0600, its own name."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tmpk3j4.dcm"
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def test_adopt_links_a_received_file_on_the_same_file_system(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    source = received_file(tmp_path / "incoming", b"DICM-bytes" * 1000)
    path = spool.adopt(UID_A, source)
    assert path == spool.path(UID_A) and path.stat().st_ino == source.stat().st_ino  # the same file: no copy
    source.unlink()  # pynetdicom removes its name after the C-STORE handler
    assert spool.read(UID_A) == b"DICM-bytes" * 1000 and stat.S_IMODE(path.stat().st_mode) == 0o600
    other = received_file(tmp_path / "incoming", b"other bytes")
    with pytest.raises(FileExistsError):
        spool.adopt(UID_A, other)  # never over a spooled file
    assert spool.read(UID_A) == b"DICM-bytes" * 1000 and spool.pending() == [UID_A]
    with pytest.raises(InvalidUidError):
        spool.adopt("../../etc/x", other)


def test_adopt_syncs_the_file_then_links_then_syncs_the_directory(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool")
    source = received_file(tmp_path / "incoming", b"x" * 100_000)
    final = spool.path(UID_A)
    steps: list[tuple[str, object]] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            steps.append(("fsync-dir", info.st_ino == spool.directory.stat().st_ino))
        else:
            steps.append(("fsync-file", (info.st_ino == source.stat().st_ino, final.exists())))
        real_fsync(fd)

    def link(origin: str, target: str) -> None:
        steps.append(("link", Path(target).name))
        real_link(origin, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    spool.adopt(UID_A, source)
    assert steps == [("fsync-file", (True, False)), ("link", f"{UID_A}.dcm"), ("fsync-dir", True)]


SHM = Path("/dev/shm")


@pytest.mark.skipif(not SHM.is_dir() or SHM.stat().st_dev == Path(__file__).stat().st_dev,
                    reason="needs /dev/shm on another file system than the tests")
def test_adopt_copies_a_file_from_another_file_system_in_pieces(tmp_path: Path) -> None:
    """TMPDIR elsewhere than the spool (here tmpfs): the bytes are copied into a 0600 temporary beside the
    spool, fsynced and linked; the result is a separate file and no temporary is left."""
    spool = Spool(tmp_path / "spool")
    data = os.urandom(3 * (1 << 20) + 17)  # more than one copy piece, not a multiple of one
    with tempfile.TemporaryDirectory(dir=SHM) as elsewhere:
        source = received_file(Path(elsewhere), data)
        path = spool.adopt(UID_B, source)
        assert path.stat().st_dev != source.stat().st_dev
    assert spool.read(UID_B) == data and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert files_in(spool.directory) == [f"{UID_B}.dcm"]
    with tempfile.TemporaryDirectory(dir=SHM) as elsewhere, pytest.raises(FileExistsError):
        spool.adopt(UID_B, received_file(Path(elsewhere), b"another copy"))
    assert spool.read(UID_B) == data and files_in(spool.directory) == [f"{UID_B}.dcm"]



def test_a_receipt_cut_off_by_a_crash_is_swept_at_the_next_start(tmp_path: Path) -> None:
    """The listener receives datasets into the spool's `receiving` folder (not the system's /tmp): a file a
    killed process left there (never answered success, maybe patient data) goes when the spool next opens."""
    spool = Spool(tmp_path / "spool")
    assert spool.receiving.parent == spool.directory and spool.receiving.stat().st_mode & 0o077 == 0
    (spool.receiving / "tmpab12cd.dcm").write_bytes(b"DICM part of a film")
    again = Spool(tmp_path / "spool")
    assert list(again.receiving.iterdir()) == [] and again.removed_temporaries == 1 and again.pending() == []
