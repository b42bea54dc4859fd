"""What the PACS-side latency scripts share (notify_latency.py, worklist_live.py): a film sent with dcmtk's
storescu, the service's JSON API read with a token, and the latency summary (percentiles) made the same way in
both reports."""

from __future__ import annotations

import json
import statistics
import subprocess
import urllib.request
from pathlib import Path

STORESCU = "/usr/bin/storescu"  # dcmtk's (pynetdicom installs its own `storescu` into the venv)


def api(base: str, path: str, token: str, method: str = "GET") -> dict:
    request = urllib.request.Request(f"{base}{path}", method=method, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile (`share` in 0..1) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def spread(values: list[float], digits: int = 2) -> str:
    """`p50 … s   p95 … s   max … s` of `values` (seconds), the latency scripts' one summary line."""
    return (f"p50 {statistics.median(values):.{digits}f} s   p95 {percentile(values, 0.95):.{digits}f} s   "
            f"max {max(values):.{digits}f} s")


def send(dicom_port: int, path: Path) -> None:
    """One C-STORE of `path` to the listener on loopback; RuntimeError with storescu's last words on failure."""
    sent = subprocess.run([STORESCU, "-aet", "LOADTEST", "-aec", "PTXTRIAGE", "127.0.0.1", str(dicom_port), str(path)],
                          check=False, capture_output=True, text=True, timeout=60)
    if sent.returncode != 0:
        raise RuntimeError(f"storescu failed: {sent.stderr[-500:]}")
