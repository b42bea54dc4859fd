"""A real Orthanc PACS for tests: Debian's `orthanc` + `orthanc-dicomweb`, on unusual loopback ports.

Orthanc 1.10 binds all interfaces; `RemoteAccessAllowed: false` makes its HTTP side refuse anything but
localhost, and the ports are chosen free at random. Stopped by PID (`tests.servers.server_process`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.servers import free_port, server_process

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@dataclass(frozen=True)
class Orthanc:
    http: str  # base URL of the REST API
    dicom_port: int
    aet: str

    def get(self, path: str) -> object:
        with urllib.request.urlopen(f"{self.http}{path}", timeout=30) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(f"{self.http}{path}", timeout=30) as response:
            return response.read()

    def post(self, path: str, body: bytes | dict, content_type: str = "application/json") -> object:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(f"{self.http}{path}", data=data, method="POST",
                                         headers={"Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=120) as response:
            raw = response.read()
        return json.loads(raw) if raw else None


def require_orthanc() -> None:
    if not Path(ORTHANC).exists() or not DICOMWEB_PLUGIN.exists():
        raise RuntimeError("Orthanc with its DICOMweb plugin is needed: apt-get install orthanc orthanc-dicomweb "
                           "(.ci/run installs them)")


@contextlib.contextmanager
def orthanc_server(workdir: Path, modalities: dict[str, tuple[str, str, int]], aet: str = "ORTHANC",
                   timeout_s: float = 60) -> Iterator[Orthanc]:
    """Orthanc with an empty database in `workdir`; `modalities` name the DICOM peers it may send to."""
    require_orthanc()
    http_port, dicom_port = free_port(), free_port()
    storage = workdir / "orthanc-db"
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "ptx-test-pacs",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomModalities": {name: list(peer) for name, peer in modalities.items()},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
        "StableAge": 1,
        "HttpTimeout": 60,
    }
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=1))
    with server_process([ORTHANC, str(config_path)], workdir / "orthanc.log", timeout_s=timeout_s, cwd=workdir,
                        ready_path="/system", port=http_port) as base:
        yield Orthanc(base, dicom_port, aet)
