"""`bentoml build` accepts bentofile.yaml, and the built bento (code + models, nothing else) serves triage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import yaml

from tests.servers import REPO, bento_server


def test_bentoml_build_packages_service_and_models_and_the_bento_serves(tmp_path, realdata):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    result = subprocess.run([sys.executable, "-m", "bentoml", "build", "--output", "tag"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    bento = tmp_path / "bentoml" / "bentos" / name / version
    sources = {path.relative_to(bento / "src").as_posix() for path in (bento / "src").rglob("*") if path.is_file()}
    assert {"service/app.py", "service/models/backends/factory.py", "service/models/networks/unet.py"} <= sources
    assert {"service/http/pages/templates/worklist.html", "service/http/pages/static/htmx.min.js",
            "service/http/pages/static/htmx.LICENSE", "service/http/pages/front.md"} <= sources  # the reading room
    assert not any(s.startswith("training/") for s in sources), "serving never imports training"
    manifests = {s for s in sources if s.endswith("manifest.json")}
    assert manifests == {"models/ptx-classifier-demo/0.2.0/manifest.json",
                         "models/ptx-segmenter-demo/0.2.0/manifest.json"}
    assert not any(s.startswith(("tests/", "data/", ".venv/")) for s in sources)
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert info["service"] == "service.app:Triage"

    # What `bentoml containerize` would build (Docker cannot run here): the generated Dockerfile installs the
    # bento's requirements.txt, which is the pinned lock (requirements/serve.lock.txt).
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM python:3.11" in dockerfile and "EXPOSE 3000" in dockerfile
    assert "pip install -r $BENTO_PATH/env/python/requirements.txt" in dockerfile
    assert (bento / "env" / "docker" / "entrypoint.sh").is_file()

    def requirements(text: str) -> set[str]:
        lines = (line.split("#")[0].strip() for line in text.splitlines())
        return {line.replace(" ", "") for line in lines if line}

    wanted = requirements((REPO / "requirements" / "serve.lock.txt").read_text())
    installed = requirements((bento / "env" / "python" / "requirements.txt").read_text())
    assert wanted and wanted <= installed and all("==" in line for line in installed if not line.startswith("-"))

    with bento_server(tmp_path / "bento.log", env={"BENTOML_HOME": str(tmp_path / "bentoml"),
                                                   "PYTHONPATH": "", "PTX_DATA_DIR": str(tmp_path / "data")}, target=tag,
                      cwd=tmp_path) as base:  # outside the repository: the bento's own copy must serve
        data = (realdata / "chest/siim_cr_jpegbaseline_mono2.dcm").read_bytes()
        request = urllib.request.Request(f"{base}/v1/triage?mask=none", data=data, method="POST",
                                         headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(request, timeout=120) as response:
            body = json.loads(response.read())
        assert response.status == 200 and 0.0 <= body["score"] <= 1.0
        assert body["models"]["classifier"]["name"] == "ptx-classifier-demo"
