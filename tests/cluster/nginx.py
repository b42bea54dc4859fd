"""nginx (Debian's) balancing the triage replicas, as the Kubernetes Service `ptx-triage` does in deploy/k8s.

Why `proxy_next_upstream error timeout` (nginx's default) and not `http_502 http_503` or `non_idempotent`: a
request that never reached a replica (connection refused: the replica was killed) goes to the other one, which
is all a Service does too; a request a replica had already taken when it died, or answered 503 (admission,
drain), comes back to the listener as 502/503. The listener must wait those out itself (issue 17 §2): a
Kubernetes Service retries nothing, so the test would prove less if nginx hid them.

The server runs in the foreground (`daemon off`) in its own process group and is stopped by its PID
(`tests.servers.process_group`); it writes its pid file, logs and temporary files to a folder of its own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.servers import free_port, process_group, wait_http

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
INSTALL_HINT = "install Debian's nginx: `apt-get install -y --no-install-recommends nginx-light` (.ci/run does)"
MAX_BODY = "96m"  # = PTX_MAX_FILE_BYTES (96 MiB): docs/deploy.md's proxy block
#: One access-log line per request: what the test counts (triage answers by status, which replica answered).
LOG_FORMAT = "$request_method $uri $status $upstream_status $upstream_addr"
READY_PATH = "/nginx-generation"  # answered by nginx itself: the config generation it serves


class NginxUnavailable(RuntimeError):
    """nginx is not installed here, or it refused its configuration; the message says which."""


def render_config(root: Path, port: int, upstreams: list[str], generation: int) -> str:
    """The whole nginx.conf: one upstream of the triage replicas (`host:port` each), one loopback server."""
    if not upstreams:
        raise ValueError("nginx needs at least one triage replica in its upstream")
    servers = "\n".join(f"        server {address} max_fails=1 fail_timeout=5s;" for address in upstreams)
    return f"""
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 512; }}
http {{
    log_format ptx '{LOG_FORMAT}';
    access_log {root}/access.log ptx;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    upstream ptx_triage {{
{servers}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size {MAX_BODY};
        client_body_buffer_size 1m;     # a film stays in memory
        proxy_connect_timeout 2s;
        proxy_send_timeout 300s;        # = the service's request timeout (traffic.timeout)
        proxy_read_timeout 300s;
        proxy_next_upstream error timeout;
        location = {READY_PATH} {{
            access_log off;
            return 200 "{generation}";
        }}
        location / {{
            proxy_pass http://ptx_triage;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }}
    }}
}}
"""


def write_config(root: Path, port: int, upstreams: list[str], generation: int) -> Path:
    """Write root/nginx.conf and check it (`nginx -t`): a refused one raises with nginx's own words."""
    path = root / "nginx.conf"
    path.write_text(render_config(root, port, upstreams, generation))
    check = subprocess.run([NGINX, "-t", "-q", "-p", str(root), "-e", str(root / "error.log"), "-c", str(path)],
                           capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise NginxUnavailable(f"nginx refused its configuration: {check.stderr.strip()[-2000:]}")
    return path


@dataclass
class Nginx:
    """A running nginx: `url` is what the listeners get as PTX_TRIAGE_URL."""

    url: str
    port: int
    root: Path
    process: subprocess.Popen[bytes]
    generation: int = 0

    def route(self, upstreams: list[str], timeout_s: float = 10) -> None:
        """Balance over `upstreams` from now on: a new config, SIGHUP to the master, until it serves the new one.

        What an endpoints update does to a Kubernetes Service when a pod comes back on a new address."""
        self.generation += 1
        write_config(self.root, self.port, upstreams, self.generation)
        os.kill(self.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout_s
        while self._serving() != str(self.generation):
            if time.monotonic() > deadline:
                raise TimeoutError(f"nginx did not take its configuration {self.generation} in {timeout_s} s; "
                                   f"its error log:\n{self.error_log()}")
            time.sleep(0.1)

    def _serving(self) -> str | None:
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}{READY_PATH}", timeout=2) as answer:
            return answer.read().decode()
        return None

    def requests(self) -> Counter[tuple[str, str, str]]:
        """(method, path, status) of every request nginx answered, from its access log."""
        counts: Counter[tuple[str, str, str]] = Counter()
        log = self.root / "access.log"
        for line in log.read_text().splitlines() if log.exists() else []:
            method, path, status, *_ = line.split()
            counts[(method, path, status)] += 1
        return counts

    def error_log(self) -> str:
        path = self.root / "error.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no error log)"


@contextlib.contextmanager
def nginx_balancer(upstreams: list[str]) -> Iterator[Nginx]:
    """nginx on a free loopback port in front of `upstreams`; stopped by its PID and its files removed."""
    if not Path(NGINX).exists():
        raise NginxUnavailable(f"{NGINX} not found: {INSTALL_HINT}")
    # Not pytest's tmp_path: nginx's workers drop root for `nobody`, who could not enter a 0700 folder.
    root = Path(tempfile.mkdtemp(prefix="ptx-nginx-"))
    root.chmod(0o755)
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        config = write_config(root, port, upstreams, generation=1)
        command = [NGINX, "-p", str(root), "-e", str(root / "error.log"), "-c", str(config), "-g", "daemon off;"]
        with process_group(command, root / "nginx.out",
                           lambda process: wait_http(f"{url}{READY_PATH}", 10, process)) as process:
            yield Nginx(url=url, port=port, root=root, process=process, generation=1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
