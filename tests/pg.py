"""A real PostgreSQL server for tests, from Debian's packages, on a loopback port; stopped by PID.

The server runs from a fresh temporary cluster (initdb, trust authentication on 127.0.0.1 and its own unix
socket in the temporary directory, fsync off: the tests need a real server, not a durable one). PostgreSQL
refuses to run as root, so as root it runs as the unprivileged `postgres` user that Debian's package creates,
from a directory that user owns. Missing binaries are a test failure that says how to install them, never
a silent skip: the same suite must run on both databases.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers import free_port

INSTALL_HINT = ("install Debian's PostgreSQL server: `apt-get install -y --no-install-recommends postgresql` "
                "(`bash .ci/run` does), or set PTX_PG_BIN to a folder holding initdb and postgres")
SUPERUSER = "ptx"


class PostgresUnavailable(RuntimeError):
    """The server cannot be started here; the message says why and how to fix it."""


def find_binaries() -> Path:
    """The newest /usr/lib/postgresql/<major>/bin holding initdb and postgres, or $PTX_PG_BIN."""
    candidates = [Path(os.environ["PTX_PG_BIN"])] if os.environ.get("PTX_PG_BIN") else sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    looked = ", ".join(str(c) for c in candidates) or "/usr/lib/postgresql/*/bin"
    raise PostgresUnavailable(f"PostgreSQL server binaries (initdb, postgres) not found in {looked}: {INSTALL_HINT}")


def _run_as() -> str | None:
    """The user to run the server as: `postgres` when we are root (initdb and postgres refuse root)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable("running as root, and there is no `postgres` user to run the server as "
                                  f"(Debian's package creates it): {INSTALL_HINT}") from None
    return "postgres"


@dataclass
class PostgresServer:
    """A running server; `create_database()` gives each test a fresh, empty database."""

    port: int
    root: Path
    process: subprocess.Popen[bytes]
    _names: Iterator[int] = field(default_factory=itertools.count)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        import psycopg

        name = f"test_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')  # a name we made: digits and underscores only
        return self.url(name)

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else "(no log)"


def _wait_ready(server: PostgresServer, timeout_s: float) -> None:
    import psycopg

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise PostgresUnavailable(f"postgres exited with {server.process.returncode} while starting; "
                                      f"its log:\n{server.log()}")
        try:
            with psycopg.connect(server.url(), connect_timeout=2):
                return
        except psycopg.OperationalError as error:
            last = error
            time.sleep(0.1)
    raise PostgresUnavailable(f"postgres did not accept connections within {timeout_s:.0f} s ({last}); "
                              f"its log:\n{server.log()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGINT is PostgreSQL's fast shutdown (SIGTERM waits for clients to leave); SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the backends go too
        process.wait()


@contextlib.contextmanager
def running_postgres(timeout_s: float = 60) -> Iterator[PostgresServer]:
    """Start a throw-away server; stop it and delete its files however the block ends."""
    binaries = find_binaries()
    user = _run_as()
    # Not pytest's tmp_path: its root is 0700 and owned by us, so the `postgres` user could not enter it.
    root = Path(tempfile.mkdtemp(prefix="ptx-pg-"))
    try:
        if user:
            entry = pwd.getpwnam(user)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        as_user = {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []} if user else {}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        initdb = subprocess.run(
            [str(binaries / "initdb"), "-D", str(root / "data"), "-U", SUPERUSER, "--auth=trust",
             "--encoding=UTF8", "--no-locale", "--no-sync"],
            cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False, **as_user)
        if initdb.returncode != 0:
            raise PostgresUnavailable(f"initdb failed ({initdb.returncode}): {initdb.stderr[-2000:]}")
        port = free_port()
        with (root / "server.log").open("wb") as log:
            if user:
                os.chown(root / "server.log", pwd.getpwnam(user).pw_uid, -1)
            process = subprocess.Popen(
                [str(binaries / "postgres"), "-D", str(root / "data"), "-h", "127.0.0.1", "-p", str(port),
                 "-k", str(root), "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "max_connections=200"],
                cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **as_user)
        server = PostgresServer(port=port, root=root, process=process)
        try:
            _wait_ready(server, timeout_s)
            yield server
        finally:
            _stop(process)
    finally:
        shutil.rmtree(root, ignore_errors=True)
