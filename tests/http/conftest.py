"""Fixtures shared by the HTTP tests that check a real server's answers against the cascade run in-process."""

from __future__ import annotations

import pytest

from service.models.manifest import find_models
from tests.servers import REPO
from training.evaluate import load_cascade


@pytest.fixture(scope="module")
def in_process():
    """The bundled models' cascade in this process: what a served film's answer must match."""
    models = {manifest.task: path for path, manifest in find_models(REPO / "models")}
    cascade, _ = load_cascade(models["classification"], models["segmentation"])
    return cascade
