"""A real Prometheus (Debian's `prometheus` package) for tests, on a free loopback port; stopped by PID.

The server gets a temporary data directory and a configuration derived from the shipped one
(deploy/prometheus/prometheus.yml): same job and rules file, but the test's target, a 1 s scrape and
evaluation interval, and the shipped rules file named by its absolute path, unchanged. Missing binaries are
a test failure that says how to install them, never a silent skip.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.servers import REPO, free_port, server_process

DEPLOY = REPO / "deploy" / "prometheus"
SHIPPED_CONFIG = DEPLOY / "prometheus.yml"
SHIPPED_RULES = DEPLOY / "ptx-rules.yml"
INSTALL_HINT = ("install Debian's Prometheus: `apt-get install -y --no-install-recommends prometheus` "
                "(`bash .ci/run` does)")


class PrometheusUnavailable(RuntimeError):
    """The binaries are missing; the message says how to install them."""


def binary(name: str) -> str:
    """`prometheus` or `promtool` from PATH or /usr/bin."""
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None)
    if found is None:
        raise PrometheusUnavailable(f"{name} not found: {INSTALL_HINT}")
    return found


def promtool(*args: str, cwd: Path = DEPLOY) -> subprocess.CompletedProcess[str]:
    """Run promtool; the caller checks returncode (its output says what failed)."""
    return subprocess.run([binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False)


def scrape_config_for(target: str, interval: str = "1s", shipped: Path = SHIPPED_CONFIG) -> dict[str, Any]:
    """The shipped configuration with the test's `target` (host:port), a short interval, and the shipped rules
    by absolute path (the configuration is written elsewhere; the rules file itself is used as shipped)."""
    config = yaml.safe_load(shipped.read_text())
    config["global"].update(scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval)
    config["rule_files"] = [str((shipped.parent / name).resolve()) for name in config["rule_files"]]
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [target]}]
    return config


# --- metric names in PromQL -------------------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_OFFSET = re.compile(r"\boffset\s+-?\w+")
_AT = re.compile(r"@\s*[\w.]+(?:\(\))?")
_IDENTIFIER = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless",
             "atan2", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Prometheus 2.42 has no /api/v1/parse_query, promtool no
    parser command): strings, label matchers, ranges, label lists and offsets are cut out first; what is left
    that is neither a function call nor a keyword is a metric name. Grafana variables ($x) are never names."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _LABEL_LISTS.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    text = _AT.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.groups()
        if not call and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


@dataclass(frozen=True)
class PrometheusServer:
    base: str

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/`path`; the response's `data` (raises with Prometheus's error message otherwise)."""
        url = f"{self.base}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read())
        if body.get("status") != "success":
            raise ValueError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        data = self.api("query", query=expr)
        return list(data["result"]) if data["resultType"] == "vector" else [data["result"]]

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule (recording and alerting), each with its group name added."""
        return [{**rule, "group": group["name"]} for group in self.api("rules")["groups"] for rule in group["rules"]]


@contextlib.contextmanager
def running_prometheus(config: dict[str, Any], workdir: Path, timeout_s: float = 60) -> Iterator[PrometheusServer]:
    """Prometheus with `config` on a free 127.0.0.1 port and a data directory under `workdir`; stopped by PID."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    command = [binary("prometheus"), f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
               f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with server_process(command, workdir / "prometheus.log", timeout_s=timeout_s, ready_path="/-/ready",
                        port=port) as base:
        yield PrometheusServer(base)
