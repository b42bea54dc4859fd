"""Shared fixtures: where the real data lives, and a small DICOM factory for constructed cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.realdata import require_realdata


@pytest.fixture(scope="session")
def realdata() -> Path:
    return require_realdata()
