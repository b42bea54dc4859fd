"""The deployment of deploy/k8s, as real processes on loopback: one PostgreSQL store, nginx in front of triage
replicas (`bentoml serve` each), listeners (`bentoml serve` with PTX_DICOM_PORT, each its own data folder and
name, triaging through nginx), and a real Orthanc that sends the films and receives the SEG and SR.

Each listener runs in a mount namespace of its own where its folder is mounted at one path shared by all
(`own_volume`), as each listener pod mounts its own claim at /var/lib/ptx: the paths one listener records
(spool, result files) then name nothing on another, which must find a result object in the database like a
pod on another node would (on one machine without it, listener-b's dispatcher would quietly open listener-a's
files). That needs root (CI runs as root) or unprivileged user namespaces.

Each server can be killed with SIGKILL (its whole process tree: `tests.servers.kill_tree`) and started again
with the same settings, data folder and name; a triage replica comes back on a new port and nginx is told
(`Nginx.route`), as a Kubernetes Service's endpoints follow a pod. Settings sized for a 2-core box: one ONNX
Runtime thread per server, no model warm-up (four servers warming at once would take a minute more).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.nginx import Nginx, nginx_balancer
from tests.orthanc import Orthanc, orthanc_server
from tests.servers import bento_server, free_port, kill_tree, server_process, wait_port

TOKEN = "cluster-test-token-0123456789abcdef"  # the replicas' PTX_API_TOKEN, sent by the listeners and the test
LISTENER_AE = "PTXTRIAGE"
#: Every server: one store, one token, small and quick on two cores, results in the database (issue 17 §4).
COMMON = {"PTX_API_TOKEN": TOKEN, "PTX_INTRA_OP_THREADS": "1", "PTX_WARMUP": "false", "PTX_MAX_BATCH_SIZE": "8",
          "PTX_RESULTS_IN_DATABASE": "true"}
#: Listeners: retries of results and deliveries in seconds, not the production half-minute.
LISTENER = {"PTX_DICOM_HOST": "127.0.0.1", "PTX_DICOM_AE_TITLE": LISTENER_AE, "PTX_INTAKE_WORKERS": "4",
            "PTX_OUTPUTS_RETRY_S": "2", "PTX_DELIVERY_BACKOFF_S": "2", "PTX_DELIVERY_BACKOFF_MAX_S": "10"}


@dataclass(frozen=True)
class Volume:
    """A listener's own folder (`backing`) and where its process sees it (`mount`, the same for every listener)."""

    backing: Path
    mount: Path


def unshare_prefix() -> list[str]:
    """The command that runs the rest in a new mount namespace: as root plainly, else as root of a user namespace."""
    unshare = shutil.which("unshare") or "/usr/bin/unshare"
    if not Path(unshare).exists():
        raise RuntimeError("util-linux's unshare is needed for the listeners' own volumes (apt-get install util-linux)")
    return [unshare, "--mount", "--propagation", "private", *([] if os.geteuid() == 0 else ["--map-root-user"])]


@contextlib.contextmanager
def own_volume(log_path: Path, env: dict[str, str], volume: Volume, timeout_s: float,
               started: list[subprocess.Popen[bytes]]) -> Iterator[str]:
    """`tests.servers.bento_server`, inside a mount namespace where `volume.backing` is bound at `volume.mount`.

    (bento_server builds its own command line, so its three lines are repeated here with the mount in front.)"""
    volume.backing.mkdir(parents=True, exist_ok=True)
    volume.mount.mkdir(parents=True, exist_ok=True)
    env = {"BENTOML_HOME": str(log_path.parent / f"{log_path.stem}-bentoml-home"), **env}
    port = free_port()
    command = [*unshare_prefix(), "sh", "-c", 'mount --bind "$0" "$1" && shift && exec "$@"',
               str(volume.backing), str(volume.mount),
               sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with server_process(command, log_path, env, timeout_s, port=port, started=started) as base:
        yield base


@dataclass
class Server:
    """One `bentoml serve` the test may kill and start again: same settings, same data folder."""

    name: str
    env: dict[str, str]
    logs: Path
    dicom_port: int | None = None
    volume: Volume | None = None
    url: str = ""
    starts: int = 0
    process: subprocess.Popen[bytes] | None = None
    _context: contextlib.AbstractContextManager[str] | None = field(default=None, repr=False)

    def start(self, timeout_s: float = 150) -> None:
        """Start and wait until /readyz is 200 (and, for a listener, its DICOM port accepts)."""
        self.starts += 1
        started: list[subprocess.Popen[bytes]] = []
        log = self.logs / f"{self.name}-{self.starts}.log"
        context = (bento_server(log, env=self.env, timeout_s=timeout_s, started=started) if self.volume is None
                   else own_volume(log, self.env, self.volume, timeout_s, started))
        self.url = context.__enter__()
        self._context, self.process = context, started[0]
        if self.dicom_port is not None:  # the PACS side starts once the models are ready
            try:
                wait_port(self.dicom_port, self.process, timeout_s=60)
            except (RuntimeError, TimeoutError):
                self.stop()
                raise

    def kill(self) -> None:
        """SIGKILL the whole server at once (arbiter, edge worker with the listener and intake, model worker)."""
        if self.process is not None:
            kill_tree(self.process)
        self.stop()

    def stop(self) -> None:
        context, self._context, self.process = self._context, None, None
        if context is not None:
            context.__exit__(None, None, None)

    @property
    def address(self) -> str:
        return self.url.removeprefix("http://")

    def get(self, path: str) -> bytes:
        request = urllib.request.Request(f"{self.url}{path}", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def metric(self, name: str, **labels: str) -> float:
        """The sum of this server's /metrics samples `name` with `labels` (0 when none: a counter never moved)."""
        total = 0.0
        for family in text_string_to_metric_families(self.get("/metrics").decode()):
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    total += sample.value
        return total


def start_all(servers: list[Server]) -> None:
    """Start servers side by side (each waits on its own models); if one fails, those started are stopped."""
    with ThreadPoolExecutor(len(servers)) as pool:
        outcomes = [pool.submit(server.start) for server in servers]
    failures = [outcome.exception() for outcome in outcomes if outcome.exception() is not None]
    if failures:
        for server in servers:
            server.stop()
        raise failures[0]  # type: ignore[misc]


@dataclass
class Cluster:
    orthanc: Orthanc
    nginx: Nginx
    triage: list[Server]
    listeners: list[Server]
    database_url: str

    def route(self) -> None:
        """nginx balances over the triage replicas' current addresses (after one came back on a new port)."""
        self.nginx.route([replica.address for replica in self.triage])

    def api(self, path: str) -> Any:
        """A JSON answer of the triage replicas through nginx, as a reader's client gets it."""
        request = urllib.request.Request(f"{self.nginx.url}{path}", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def listener(self, name: str) -> Server:
        (found,) = [server for server in self.listeners if server.name == name]
        return found


@contextlib.contextmanager
def running_cluster(workdir: Path, database_url: str, replicas: int = 2,
                    listener_names: tuple[str, ...] = ("listener-a", "listener-b")) -> Iterator[Cluster]:
    """Orthanc, nginx, `replicas` triage replicas and the named listeners, all on one PostgreSQL database;
    everything stopped by PID however the block ends. Orthanc knows each listener as a modality of its name."""
    ports = {name: free_port() for name in listener_names}
    modalities = {name: (LISTENER_AE, "127.0.0.1", port) for name, port in ports.items()}
    with contextlib.ExitStack() as stack:
        orthanc = stack.enter_context(orthanc_server(workdir / "orthanc", modalities))
        # No replica is up yet: nginx starts on a port nothing listens on and is routed once they are.
        nginx = stack.enter_context(nginx_balancer([f"127.0.0.1:{free_port()}"]))
        shared = {**COMMON, "PTX_DATABASE_URL": database_url}
        triage = [Server(f"triage-{n}", {**shared, "PTX_DATA_DIR": str(workdir / f"triage-{n}")}, workdir)
                  for n in range(replicas)]
        mount = workdir / "volume"  # every listener's PTX_DATA_DIR; each sees its own folder there
        listeners = [Server(name, {**shared, **LISTENER, "PTX_DATA_DIR": str(mount),
                                   "PTX_LISTENER_NAME": name, "PTX_DICOM_PORT": str(ports[name]),
                                   "PTX_DICOM_ALLOWED_AES": orthanc.aet, "PTX_TRIAGE_URL": nginx.url,
                                   "PTX_TRIAGE_TOKEN": TOKEN,
                                   "PTX_DESTINATIONS": f"orthanc=dicom://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"},
                            workdir, dicom_port=ports[name], volume=Volume(workdir / name, mount))
                     for name in listener_names]
        for server in (*triage, *listeners):
            stack.callback(server.stop)
        start_all([*triage, *listeners])
        cluster = Cluster(orthanc, nginx, triage, listeners, database_url)
        cluster.route()
        yield cluster
