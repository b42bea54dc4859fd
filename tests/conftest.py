"""Shared fixtures: where the real data lives, and a small DICOM factory for constructed cases."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pg import PostgresServer, PostgresUnavailable, running_postgres
from tests.realdata import require_realdata


@pytest.fixture(scope="session")
def realdata() -> Path:
    return require_realdata()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session (started only when a test asks); missing binaries fail."""
    why = ""
    try:
        with running_postgres() as server:
            yield server
    except PostgresUnavailable as error:
        why = str(error)
    if why:  # outside the except block: the message alone, not a chained traceback
        pytest.fail(why, pytrace=False)
