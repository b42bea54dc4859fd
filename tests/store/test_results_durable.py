"""Result folders are written like spool files (issue 13 §9): the objects fsynced, and every folder made for
them fsynced into its parent, so a delivery queued for `<study>/<sop>/SEG.dcm` never names a file a power cut
can take back with its new folder.

What reaches the disk cannot be observed without cutting power, so these tests watch which files and
folders `os.fsync` is called on (a spy that passes every call through to the real fsync): a unit test of
our own logic, the order of creations and syncs, on a real file system.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.store.results_files import ResultsFolder

STUDY, SOP = "1.2.826.0.1.3680043.8.498.10", "1.2.826.0.1.3680043.8.498.11"


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The paths `os.fsync` was called on, in order (resolved from /proc/self/fd before the real call)."""
    calls: list[Path] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        calls.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return calls


def test_each_new_result_folder_is_fsynced_into_its_parent_before_the_object(tmp_path: Path,
                                                                            synced: list[Path]) -> None:
    root = tmp_path / "results"
    path = ResultsFolder(root).write(STUDY, SOP, "SEG.dcm", b"first object")
    assert path == root / STUDY / SOP / "SEG.dcm" and path.read_bytes() == b"first object"
    folders = [p for p in synced if p.is_dir()]
    # results/ made in tmp_path, <study>/ in results/, <sop>/ in <study>/; then the object's rename in <sop>/
    assert folders == [tmp_path, root, root / STUDY, root / STUDY / SOP]
    (temporary,) = [p for p in synced if not p.is_dir()]
    assert temporary.parent == root / STUDY / SOP and not temporary.exists()  # the object, fsynced, renamed
    assert synced.index(temporary) == 3  # after the folders were made durable, before its own rename


def test_an_existing_folder_is_not_synced_again(tmp_path: Path, synced: list[Path]) -> None:
    results = ResultsFolder(tmp_path / "results")
    results.write(STUDY, SOP, "SEG.dcm", b"first")
    synced.clear()
    results.write(STUDY, SOP, "SR.dcm", b"second")
    assert [p for p in synced if p.is_dir()] == [tmp_path / "results" / STUDY / SOP]
    assert results.present(STUDY, SOP) == ["SEG.dcm", "SR.dcm"]


def test_a_file_in_place_of_the_results_folder_fails_the_write_and_leaves_nothing(tmp_path: Path) -> None:
    """The fault the outputs-pending tests use (a results path that is a file): no folder, no temporary."""
    blocker = tmp_path / "results"
    blocker.write_bytes(b"not a folder")
    with pytest.raises(FileExistsError, match="results"):
        ResultsFolder(blocker).write(STUDY, SOP, "SEG.dcm", b"object")
    assert blocker.read_bytes() == b"not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["results"]
