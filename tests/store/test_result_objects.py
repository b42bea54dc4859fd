"""Result objects kept in the database (issue 17 §4): written on one replica, read on another, on SQLite and a
real PostgreSQL server.

Two "replicas" are two results folders (each its own root, as each replica has its own volume) over two
stores opened on one database (as two processes would). Bytes go in and come back out unchanged, every byte
value included, so BYTEA and BLOB are both exercised.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from service.settings import load_settings
from service.store import ResultsStore, open_store
from service.store.result_objects import ResultObjects
from service.store.results_files import (
    NOTIFICATION_FILE,
    RESULT_FILES,
    NotShared,
    ResultsFolder,
)

STUDY, SOP = "1.2.826.0.1.3680043.8.498.10", "1.2.826.0.1.3680043.8.498.10.1"
T0 = datetime(2030, 1, 1, 8, 0, tzinfo=UTC)
OBJECT = bytes(range(256)) * 64  # every byte value, NUL included: 16 KiB


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Replicas:
    """Replica A and replica B: their own results roots, one database; `url` for settings."""

    url: str
    root: Path
    a_store: ResultsStore
    b_store: ResultsStore
    clock: Any

    def folder(self, name: str, store: ResultsStore, max_bytes: int = 1 << 20) -> ResultsFolder:
        return ResultsFolder(self.root / name / "results", ResultObjects(store), max_bytes)

    @property
    def a(self) -> ResultsFolder:
        return self.folder("a", self.a_store)

    @property
    def b(self) -> ResultsFolder:
        return self.folder("b", self.b_store)


@contextlib.contextmanager
def two_replicas(request: pytest.FixtureRequest, root: Path,
                 clock: Callable[[], datetime] | None = None) -> Iterator[Replicas]:
    """Replicas A and B on the database `request.param` names (sqlite, or postgresql: tests/pg.py's server),
    their stores on `clock` (default: a `Clock` the test moves)."""
    if request.param == "sqlite":
        url = f"sqlite:///{root / 'shared.sqlite3'}"
    else:
        url = request.getfixturevalue("postgres_server").create_database()
    clock = clock or Clock()
    with open_store(url, root, clock=clock) as a_store, open_store(url, root, clock=clock) as b_store:
        yield Replicas(url, root, a_store, b_store, clock)


@pytest.fixture(params=["sqlite", "postgresql"])
def replicas(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Replicas]:
    with two_replicas(request, tmp_path) as both:
        yield both


def test_what_replica_a_writes_replica_b_reads_byte_for_byte(replicas: Replicas) -> None:
    a, b = replicas.a, replicas.b
    written = {name: OBJECT + name.encode() for name in RESULT_FILES}
    for name, data in written.items():
        path = a.write(STUDY, SOP, name, data)
        assert path == a.root / STUDY / SOP / name and path.read_bytes() == data, "the writer's file, as before"
    a.write_notification(STUDY, SOP, b'{"accession_number": "A1"}')
    assert not (b.root / STUDY).exists(), "nothing in B's folder: what B reads comes from the database"
    for name, data in written.items():
        assert b.read(STUDY, SOP, name) == data
        assert b.has(STUDY, SOP, name)
    assert b.read_notification(STUDY, SOP) == b'{"accession_number": "A1"}'
    assert b.present(STUDY, SOP) == list(RESULT_FILES) == a.present(STUDY, SOP)
    with pytest.raises(ValueError, match="unknown result file 'notification.json'"):
        b.read(STUDY, SOP, NOTIFICATION_FILE)  # the API's reader never names the identifiers


def test_a_rewrite_replaces_the_copy(replicas: Replicas) -> None:
    """Results made again (outputs pending, retried) replace the first copy rather than failing on the key."""
    replicas.a.write(STUDY, SOP, "SEG.dcm", b"first")
    replicas.a.write(STUDY, SOP, "SEG.dcm", b"second, made again")
    assert replicas.b.read(STUDY, SOP, "SEG.dcm") == b"second, made again"


def test_local_copy_fetches_another_replicas_object_under_this_root(replicas: Replicas) -> None:
    a, b = replicas.a, replicas.b
    path = a.write(STUDY, SOP, "SEG.dcm", OBJECT)
    copied = b.local_copy(path)
    assert copied == b.root / STUDY / SOP / "SEG.dcm" and copied.read_bytes() == OBJECT
    assert a.local_copy(path) == path, "the writer's own file is used as it is"
    with pytest.raises(FileNotFoundError, match="no SR.dcm for instance"):
        b.local_copy(a.root / STUDY / SOP / "SR.dcm")
    for bad, message in ((Path("SEG.dcm"), "does not end in <study>/<sop>/<name>"),
                         (a.root / STUDY / "../etc" / "SEG.dcm", "study_uid must be a DICOM UID"),
                         (a.root / STUDY / SOP / NOTIFICATION_FILE, "unknown result file")):
        with pytest.raises(ValueError, match=message):
            b.local_copy(bad)


def test_an_object_over_the_bound_stays_in_its_writers_folder_and_says_so(
        replicas: Replicas, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "ptx.results")
    a = replicas.folder("a", replicas.a_store, max_bytes=1000)
    a.write(STUDY, SOP, "SEG.dcm", OBJECT)  # 16 KiB > 1000 bytes
    a.write(STUDY, SOP, "SR.dcm", b"small")
    assert a.read(STUDY, SOP, "SEG.dcm") == OBJECT and a.present(STUDY, SOP) == ["SEG.dcm", "SR.dcm"]
    b = replicas.b
    assert b.present(STUDY, SOP) == ["SR.dcm"] and not b.has(STUDY, SOP, "SEG.dcm")
    with pytest.raises(NotShared, match=r"SEG.dcm of instance .* \(16384 bytes\) was over "
                                        r"PTX_RESULTS_DATABASE_MAX_BYTES"):
        b.read(STUDY, SOP, "SEG.dcm")
    assert "over PTX_RESULTS_DATABASE_MAX_BYTES (1000): kept in this replica's results folder only" in caplog.text


def test_without_the_database_copy_another_replica_finds_nothing(replicas: Replicas) -> None:
    """PTX_RESULTS_IN_DATABASE=false: each replica has only its own folder (the single-machine behaviour)."""
    settings = load_settings(environ={"PTX_DATA_DIR": str(replicas.root / "a"), "PTX_DATABASE_URL": replicas.url,
                                      "PTX_RESULTS_IN_DATABASE": "false"})
    a = ResultsFolder.from_settings(settings, replicas.a_store)
    assert a.objects is None and a.root == replicas.root / "a" / "results"
    a.write(STUDY, SOP, "SEG.dcm", OBJECT)
    b = replicas.b
    with pytest.raises(FileNotFoundError, match="no SEG.dcm for instance") as caught:
        b.read(STUDY, SOP, "SEG.dcm")
    assert not isinstance(caught.value, NotShared)
    assert b.present(STUDY, SOP) == []


def test_the_default_shares_with_postgresql_only(replicas: Replicas) -> None:
    environ = {"PTX_DATA_DIR": str(replicas.root / "a"), "PTX_DATABASE_URL": replicas.url,
               "PTX_RESULTS_DATABASE_MAX_BYTES": "4096"}
    folder = ResultsFolder.from_settings(load_settings(environ=environ), replicas.a_store)
    assert (folder.objects is not None) is replicas.url.startswith("postgresql://")
    assert folder.max_bytes == 4096
    forced = ResultsFolder.from_settings(load_settings(environ={**environ, "PTX_RESULTS_IN_DATABASE": "true"}),
                                         replicas.a_store)
    assert forced.objects is not None, "SQLite shares too when asked (several processes on one machine)"


def test_remove_takes_folder_and_rows_and_stale_finds_rows_no_folder_owns(replicas: Replicas) -> None:
    a, b = replicas.a, replicas.b
    a.write(STUDY, SOP, "SEG.dcm", OBJECT)
    a.write_notification(STUDY, SOP, b"{}")
    replicas.clock.now = T0 + timedelta(days=2)
    young = f"{SOP}.2"
    a.write(STUDY, young, "SR.dcm", b"young")
    assert b.stale_in_database(T0 + timedelta(days=1)) == [(STUDY, SOP)]
    with pytest.raises(ValueError, match="timezone-aware"):
        b.stale_in_database(datetime(2030, 1, 2))
    b.remove(STUDY, SOP)  # from B, whose folder never had it: the rows go, A's own file is A's sweep's
    with pytest.raises(FileNotFoundError):
        b.read(STUDY, SOP, "SEG.dcm")
    with pytest.raises(FileNotFoundError):
        b.read_notification(STUDY, SOP)
    a.remove(STUDY, young)
    assert not (a.root / STUDY / young).exists() and b.present(STUDY, young) == []
    assert b.stale_in_database(T0 + timedelta(days=30)) == []


def test_result_objects_check_their_arguments(replicas: Replicas) -> None:
    objects = ResultObjects(replicas.a_store)
    with pytest.raises(ValueError, match="an empty result object is not stored"):
        objects.put(STUDY, SOP, "SEG.dcm", b"")
    with pytest.raises(ValueError, match="positive size"):
        objects.put_oversize(STUDY, SOP, "SEG.dcm", 0)
    with pytest.raises(TypeError, match="need the SQL results store"):
        ResultObjects(object())
    with pytest.raises(ValueError, match="PTX_RESULTS_DATABASE_MAX_BYTES must be 0 or more"):
        ResultsFolder(replicas.root, objects, -1)
