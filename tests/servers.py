"""Start real servers for tests on loopback ports, and stop them by PID (process group)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


_HANDED_OUT: set[int] = set()
_RANDOM = random.Random()


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out by itself (to `bind(0)` and to outgoing connections)."""
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return 32768


def free_port() -> int:
    """A loopback port nothing listens on, below the kernel's ephemeral range, never handed out twice in a run.

    Why not `bind(0)`: that port comes from the ephemeral range, and between our pick and the server's bind the
    kernel may give the same port to an outgoing connection or to a port a server reserves for itself (BentoML
    does, for its workers): a server then exits with "address in use" (seen once in CI). Ports below the range
    are only ever taken by name. Why the set: a port picked for one server and not yet bound is still free, and
    was once given to a second server in the same test (Orthanc's C-STORE to our DICOM port reached HTTP).
    """
    low = max(1025, min(_ephemeral_low(), 65536) - 12000)
    high = max(low + 1000, min(_ephemeral_low(), 65536)) - 1
    for _ in range(1000):
        port = _RANDOM.randint(low, high)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free loopback port between {low} and {high}")


def wait_http(url: str, timeout_s: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before {url} answered")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s} s")


def wait_port(port: int, process: subprocess.Popen | None = None, timeout_s: float = 10) -> None:
    """Until something accepts TCP connections on 127.0.0.1:`port` (for servers that speak no HTTP)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def descendants(pid: int) -> list[psutil.Process]:
    """Every process below `pid`. BentoML's workers run in sessions of their own, so a signal to the
    server's process group does not reach them: they must be found through the process tree."""
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid).children(recursive=True)
    return []


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the process, its group and every descendant at once: a crash of the whole service."""
    below = descendants(process.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for child in below:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(below, timeout=10)
    process.wait()


def stop_group(process: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM to the process's whole group, SIGKILL if it is still there after `grace_s`; then SIGKILL
    whatever is left of its descendants (workers in their own sessions, orphaned by an earlier SIGKILL)."""
    below = descendants(process.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    _, alive = psutil.wait_procs(below, timeout=grace_s)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


@contextlib.contextmanager
def process_group(command: list[str], log_path: Path, ready: Callable[[subprocess.Popen], None],
                  env: dict[str, str] | None = None, cwd: Path = REPO, grace_s: float = 20,
                  started: list[subprocess.Popen] | None = None) -> Iterator[subprocess.Popen]:
    """Run `command` in its own process group, logging to `log_path`; `ready(process)` waits until it serves;
    stop the whole group (`stop_group`) however the block ends. `started` receives the process as soon as
    it exists (its pid is the group's), for tests that kill it themselves."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        if started is not None:
            started.append(process)
        try:
            try:
                ready(process)
            except (RuntimeError, TimeoutError) as failure:
                log.flush()
                raise type(failure)(f"{failure}; the end of {log_path.name}:\n{log_tail(log_path)}") from failure
            yield process
        finally:
            stop_group(process, grace_s)


def log_tail(log_path: Path, lines: int = 30) -> str:
    """The last lines of a server's log, for the error of a server that did not come up: CI keeps no files."""
    with contextlib.suppress(OSError):
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


@contextlib.contextmanager
def server_process(command: list[str], log_path: Path, env: dict[str, str] | None = None, timeout_s: float = 90,
                   cwd: Path = REPO, ready_path: str = "/readyz", port: int | None = None,
                   started: list[subprocess.Popen] | None = None) -> Iterator[str]:
    """An HTTP server (`process_group`) listening on `port`: yields its base URL once `ready_path` is 200."""
    base = f"http://127.0.0.1:{port or free_port()}"
    with process_group(command, log_path, lambda process: wait_http(f"{base}{ready_path}", timeout_s, process),
                       env, cwd, started=started):
        yield base


@contextlib.contextmanager
def bento_server(log_path: Path, env: dict[str, str] | None = None, timeout_s: float = 90,
                 target: str | None = None, cwd: Path = REPO,
                 started: list[subprocess.Popen] | None = None) -> Iterator[str]:
    """`bentoml serve [target]` on a free loopback port; yields the base URL once /readyz is 200.

    Without `target` BentoML reads bentofile.yaml (the repository's service); a bento tag serves a build.
    Each server gets its own BENTOML_HOME (beside its log) unless `env` names one: BentoML wipes
    `$BENTOML_HOME/prometheus_multiproc_dir` when a server starts, so two servers sharing a home erase
    each other's metrics (seen: samples missing from /metrics while another suite ran).
    """
    env = {"BENTOML_HOME": str(log_path.parent / f"{log_path.stem}-bentoml-home"), **(env or {})}
    port = free_port()
    command = [sys.executable, "-m", "bentoml", "serve", *([target] if target else []),
               "--host", "127.0.0.1", "--port", str(port)]
    with server_process(command, log_path, env, timeout_s, cwd, port=port, started=started) as base:
        yield base
